//! Nothing a caller passes can overflow or panic: extreme timeouts, offsets, counts and shapes
//! each give `Ok` (with the right answer) or a clear error, never a panic nor a wrapped value
//! that passes validation. Case counts are small: every case runs on the software adapter.

mod common;

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use wccl::tp::{Kernels, Matmul};
use wccl::{
    CallOptions, Collective, CommConfig, CommGroup, DType, DeviceBuffer, Error, ReduceOp, TensorRef,
};

const RANKS: usize = 2;
/// Elements per rank buffer.
const LEN: usize = 61;

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    })
}

fn group() -> CommGroup {
    common::group_with(
        RANKS,
        CommConfig::default().timeout(Duration::from_secs(30)),
    )
}

/// Rank `r`'s input: distinct per (rank, element), period 13 (not a power of two), small
/// integers (exact in f32).
fn input(r: usize) -> Vec<f32> {
    (0..LEN)
        .map(|i| ((r * 5 + i * 3) % 13) as f32 - 6.0)
        .collect()
}

fn timeouts() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::MAX),
        Just(Duration::new(u64::MAX, 0)),
        Just(Duration::from_secs(u64::MAX / 2)),
        Just(Duration::from_secs(365 * 24 * 3600 * 1000)),
        any::<u64>().prop_map(Duration::from_secs),
        (1u64..120).prop_map(Duration::from_secs),
    ]
}

/// Byte offsets, from the aligned and in range to the far end of `u64`.
fn offsets() -> impl Strategy<Value = u64> {
    prop_oneof![
        (0u64..(4 * LEN as u64 + 8)),
        Just(u64::MAX),
        Just(u64::MAX - 3),
        Just(1 << 63),
        (0u64..16).prop_map(|d| u64::MAX - 4 * d),
        any::<u64>(),
    ]
}

/// Element counts, with the ones whose byte size wraps to (near) zero.
fn counts() -> impl Strategy<Value = usize> {
    prop_oneof![
        0usize..(LEN + 4),
        Just(usize::MAX),
        Just(usize::MAX / 2 + 1),
        Just(usize::MAX / 4 + 1),
        (0usize..4).prop_map(|d| usize::MAX / 4 + 1 + d),
        any::<usize>(),
    ]
}

/// Whether `count` f32 at byte `offset` fit a buffer of `size` bytes, computed in u128.
fn fits(offset: u64, count: usize, size: u64) -> bool {
    let end = offset as u128 + 4 * count as u128;
    offset.is_multiple_of(4) && end.next_multiple_of(4) <= size as u128
}

#[test]
fn extreme_timeouts_never_panic() {
    let g = group();
    let bufs: Vec<DeviceBuffer<f32>> = (0..RANKS)
        .map(|r| g.comm(r).upload(&input(r)).expect("upload"))
        .collect();
    let want: Vec<f32> = (0..LEN)
        .map(|i| (0..RANKS).map(|r| input(r)[i]).sum())
        .collect();
    let g = std::cell::RefCell::new(g);
    let result = runner(12).run(&(timeouts(), any::<bool>()), |(t, per_call)| {
        let mut g = g.borrow_mut();
        for (r, b) in bufs.iter().enumerate() {
            b.write(g.comm(r).device(), &input(r)).expect("reset");
        }
        let calls: Vec<Collective<'_>> = bufs
            .iter()
            .map(|b| Collective::AllReduce {
                input: b.view(),
                output: b.view(),
                op: ReduceOp::Sum,
            })
            .collect();
        let res = if per_call {
            g.run(&calls, CallOptions::timeout(t))
        } else {
            for r in 0..RANKS {
                g.comm_mut(r).set_timeout(t);
            }
            g.run(&calls, CallOptions::default())
        };
        prop_assert!(res.is_ok(), "timeout {t:?}: {res:?}");
        for (r, b) in bufs.iter().enumerate() {
            // The communicator's own waits (download, local reduce) take the timeout too.
            let got = g.comm(r).download(b).expect("download");
            prop_assert_eq!(&got, &want, "timeout {:?} rank {}", t, r);
            let scratch = g.comm(r).buffer::<f32>(LEN).expect("buffer");
            g.comm_mut(r)
                .reduce_local(&scratch, b, ReduceOp::Sum)
                .map_err(|e| TestCaseError::fail(format!("reduce_local {t:?}: {e}")))?;
            prop_assert_eq!(
                g.comm(r).download(&scratch).expect("download"),
                want.clone()
            );
            g.comm_mut(r).set_timeout(Duration::from_secs(30));
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn extreme_offsets_and_counts_are_refused_or_exact() {
    let g = std::cell::RefCell::new(Some(group()));
    let size = (4 * LEN as u64).next_multiple_of(4);
    let strategy = (offsets(), counts(), 0usize..4);
    let result = runner(48).run(&strategy, |(offset, count, which)| {
        let mut slot = g.borrow_mut();
        let gr = slot.as_mut().expect("group");
        let bufs: Vec<DeviceBuffer<f32>> = (0..RANKS)
            .map(|r| gr.comm(r).upload(&input(r)).expect("upload"))
            .collect();
        let others: Vec<DeviceBuffer<f32>> = (0..RANKS)
            .map(|r| gr.comm(r).buffer::<f32>(LEN).expect("buffer"))
            .collect();
        let view = |r: usize| TensorRef::new(bufs[r].raw(), offset, count, DType::F32);
        let (calls, valid): (Vec<Collective<'_>>, bool) = match which {
            0 => (
                (0..RANKS)
                    .map(|r| Collective::AllReduce {
                        input: view(r),
                        output: view(r),
                        op: ReduceOp::Sum,
                    })
                    .collect(),
                fits(offset, count, size),
            ),
            1 => (
                (0..RANKS)
                    .map(|r| Collective::ReduceScatter {
                        input: others[r].range(0, LEN - 1),
                        output: view(r),
                        op: ReduceOp::Sum,
                    })
                    .collect(),
                fits(offset, count, size) && RANKS as u128 * count as u128 == LEN as u128 - 1,
            ),
            2 => (
                (0..RANKS)
                    .map(|r| Collective::AllGather {
                        input: view(r),
                        output: others[r].range(0, LEN - 1),
                    })
                    .collect(),
                fits(offset, count, size) && RANKS as u128 * count as u128 == LEN as u128 - 1,
            ),
            _ => {
                // Outside collectives: a local reduction and a read of the same view.
                let c = gr.comm_mut(0);
                let local = c.reduce_local(view(0), others[0].view(), ReduceOp::Sum);
                let read = c.read::<f32>(view(0));
                let ok = fits(offset, count, size) && count == LEN;
                prop_assert_eq!(
                    local.is_ok(),
                    ok,
                    "reduce_local {} {}: {:?}",
                    offset,
                    count,
                    local
                );
                if let Err(e) = &local {
                    prop_assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
                }
                match read {
                    Ok(v) => {
                        prop_assert!(fits(offset, count, size));
                        let o = (offset / 4) as usize;
                        let want: Vec<f32> = input(0)[o..o + count].to_vec();
                        prop_assert_eq!(v, want);
                    }
                    Err(e) => {
                        prop_assert!(!fits(offset, count, size), "{e}");
                        prop_assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
                    }
                }
                return Ok(());
            }
        };
        let res = gr.run_each(|c| c.run(calls[c.rank()], CallOptions::default()));
        for (r, x) in res.iter().enumerate() {
            match x {
                Ok(_) => prop_assert!(valid, "rank {r}: invalid view {offset} {count} passed"),
                Err(Error::InvalidArgument { .. }) => {
                    prop_assert!(!valid, "rank {r}: valid view refused: {x:?}")
                }
                Err(e) => prop_assert!(false, "rank {r}: not a clear refusal: {e}"),
            }
        }
        if valid && which == 0 {
            let o = (offset / 4) as usize;
            for (r, b) in bufs.iter().enumerate() {
                let got = gr.comm(r).download(b).expect("download");
                for (i, &x) in got.iter().enumerate() {
                    let summed = (o..o + count).contains(&i);
                    let want: f32 = if summed {
                        (0..RANKS).map(|q| input(q)[i]).sum()
                    } else {
                        input(r)[i]
                    };
                    prop_assert_eq!(x, want, "rank {} element {}", r, i);
                }
            }
        }
        if res.iter().any(|x| x.is_err()) {
            slot.as_mut().expect("group").rebuild();
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn extreme_buffer_lengths_and_shapes_are_refused() {
    let g = group();
    let comm = g.comm(0);
    for len in [usize::MAX, usize::MAX / 4 + 1, usize::MAX / 2 + 1, 1 << 62] {
        let e = comm
            .buffer::<f32>(len)
            .err()
            .unwrap_or_else(|| panic!("a buffer of {len} elements"));
        assert!(matches!(e, Error::InvalidArgument { .. }), "{len}: {e}");
    }
    let a = comm.upload(&input(0)[..16]).expect("upload");
    let b = comm.upload(&input(1)[..16]).expect("upload");
    let c = comm.buffer::<f32>(16).expect("buffer");
    let dev = comm.device();
    let kernels = std::cell::RefCell::new(Kernels::new(dev));
    let dims = prop_oneof![
        0usize..6,
        Just(4usize),
        Just(usize::MAX),
        Just(usize::MAX / 2 + 1),
        Just(1usize << 32),
        Just(1usize << 62),
        any::<usize>(),
    ];
    let result = runner(64).run(
        &(dims.clone(), dims.clone(), dims.clone(), dims),
        |(m, n, k, ld)| {
            let mut kernels = kernels.borrow_mut();
            let spec = Matmul::new(m, n, k);
            let res = kernels.matmul(dev, &spec, a.view(), b.view(), c.view());
            let exact = |x: usize, y: usize| x.checked_mul(y) == Some(16);
            let valid = exact(m, k) && exact(k, n) && exact(m, n);
            match &res {
                Ok(()) => prop_assert!(valid, "matmul {m}x{n}x{k} passed"),
                Err(e) => prop_assert!(
                    !valid && matches!(e, Error::InvalidArgument { .. }),
                    "matmul {m}x{n}x{k}: {e}"
                ),
            }
            // Column copies: rows x cols with strides; any overflow is refused.
            let res = kernels.copy_columns(dev, a.view(), ld, c.view(), ld, m, n);
            let span = m
                .checked_sub(1)
                .and_then(|r| r.checked_mul(ld))
                .and_then(|s| s.checked_add(n));
            let valid = m == 0 || n == 0 || (ld >= n && span.is_some_and(|s| s <= 16));
            match &res {
                Ok(()) => prop_assert!(valid, "copy_columns {m}x{n} stride {ld} passed"),
                Err(e) => prop_assert!(
                    !valid && matches!(e, Error::InvalidArgument { .. }),
                    "copy_columns {m}x{n} stride {ld}: {e}"
                ),
            }
            Ok(())
        },
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    kernels
        .borrow()
        .finish(dev, Duration::MAX)
        .expect("finish with no deadline");
}

#[test]
fn a_huge_rank_range_in_the_model_ends() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wccl-bench"))
        .args(["model", "--ranks", &format!("2..{}", usize::MAX)])
        .output()
        .expect("run wccl-bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ranks: Vec<usize> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(ranks.len(), usize::BITS as usize - 1, "{text}");
    assert_eq!(ranks.last(), Some(&(1usize << (usize::BITS - 1))), "{text}");
}

#[test]
fn wild_group_settings_are_refused_or_bounded() {
    let e = CommGroup::builder()
        .ranks(usize::MAX)
        .build()
        .err()
        .unwrap_or_else(|| panic!("a group of usize::MAX ranks"));
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    // A wild pipeline depth is capped (it only allocates staging buffers); the group works.
    let mut g = common::group_with(
        RANKS,
        CommConfig::default()
            .pipeline_depth(usize::MAX)
            .slice_bytes(4096)
            .timeout(Duration::MAX),
    );
    let bufs: Vec<DeviceBuffer<f32>> = (0..RANKS)
        .map(|r| g.comm(r).upload(&input(r)).expect("upload"))
        .collect();
    let views: Vec<TensorRef<'_>> = bufs.iter().map(|b| b.view()).collect();
    g.all_reduce(&views, ReduceOp::Sum).expect("all-reduce");
    let want: Vec<f32> = (0..LEN)
        .map(|i| (0..RANKS).map(|r| input(r)[i]).sum())
        .collect();
    for (r, b) in bufs.iter().enumerate() {
        assert_eq!(g.comm(r).download(b).expect("download"), want, "rank {r}");
    }
}
