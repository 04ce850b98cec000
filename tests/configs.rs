//! Settings and entry points the other tests leave at their defaults, each against an f64
//! reference: a group over several devices the caller opened (`CommGroup::from_devices`),
//! collectives over emulated links, `Communicator::reduce_local` for every operator, and
//! pipeline depths other than the default 3 over several slices.

mod common;

use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::StdRng;
use wccl::link::{LinkEmulation, LinkStack};
use wccl::{CommConfig, CommGroup, DType, Error, ReduceOp, TensorRef};

use common::{Case, KINDS};

/// Every data-moving collective, in and out of place, with poison around the tensors.
fn check_all_kinds(g: &mut CommGroup, dtype: DType, op: ReduceOp, count: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for kind in KINDS {
        for in_place in [false, true] {
            let case = Case {
                kind,
                op,
                dtype,
                count,
                in_place,
                root: g.size() - 1,
                pad: 3,
            };
            common::check(g, case, &mut rng);
        }
    }
}

/// Inputs distinct per (rank, element), period 1009, exact in f32 as are their sums.
fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + rank * 131) % 1009) as f32 - 500.0)
        .collect()
}

/// Every rank's buffer holds the exact f64 sum of `inputs`.
fn expect_sums(g: &mut CommGroup, bufs: &[wccl::DeviceBuffer<f32>], inputs: &[Vec<f64>]) {
    let want = common::reference(DType::F32, ReduceOp::Sum, inputs);
    for (r, b) in bufs.iter().enumerate() {
        let got: Vec<f64> = g
            .comm(r)
            .download(b)
            .expect("download")
            .into_iter()
            .map(f64::from)
            .collect();
        common::assert_close(&format!("rank {r}"), &got, &want, |_| 0.0);
    }
}

#[test]
fn from_devices_with_three_distinct_devices() {
    // Three devices of their own (not one device shared three times).
    let devices = common::user_devices(3);
    let handles: Vec<wgpu::Device> = devices.iter().map(|d| d.0.clone()).collect();
    assert!(handles[0] != handles[1] && handles[1] != handles[2] && handles[0] != handles[2]);
    let mut g = CommGroup::from_devices(devices, CommConfig::default()).expect("group");
    assert_eq!(g.size(), 3);
    for (r, h) in handles.iter().enumerate() {
        assert_eq!(g.comm(r).rank(), r);
        // Rank r runs on the r-th device given, not on a device of its own choosing.
        assert!(g.comm(r).device().device() == h, "rank {r}'s device");
    }
    let len = 1000;
    let bufs: Vec<_> = (0..3)
        .map(|r| g.comm(r).upload(&input(r, len)).expect("upload"))
        .collect();
    let views: Vec<_> = bufs.iter().map(|b| b.view()).collect();
    g.all_reduce(&views, ReduceOp::Sum).expect("all_reduce");
    let inputs: Vec<Vec<f64>> = (0..3)
        .map(|r| input(r, len).into_iter().map(f64::from).collect())
        .collect();
    expect_sums(&mut g, &bufs, &inputs);
    // And every other collective, random inputs against f64.
    check_all_kinds(&mut g, DType::F32, ReduceOp::Max, 333, 1);
}

#[test]
fn collectives_over_emulated_links_are_exact_and_take_the_wire_time() {
    // 1 MB/s egress per rank, 2 ms latency.
    let emu = LinkEmulation {
        gbps: 0.001,
        latency_us: 2000.0,
        jitter_us: 500.0,
    };
    let n = 3;
    let mut g = common::group_linked(n, CommConfig::default(), LinkStack::new().emulate(emu));
    check_all_kinds(&mut g, DType::F32, ReduceOp::Sum, 101, 2);
    check_all_kinds(&mut g, DType::I32, ReduceOp::Prod, 64, 3);

    // A ring all-reduce sends 2(n-1)/n of the payload from each rank, and each rank's egress
    // carries one frame at a time: at least that much wire time, however fast the devices.
    let len = 30_000;
    let bufs: Vec<_> = (0..n)
        .map(|r| g.comm(r).upload(&input(r, len)).expect("upload"))
        .collect();
    let views: Vec<_> = bufs.iter().map(|b| b.view()).collect();
    let sent_before: Vec<u64> = (0..n).map(|r| g.comm(r).bytes_sent()).collect();
    let t = Instant::now();
    g.all_reduce(&views, ReduceOp::Sum).expect("all_reduce");
    let took = t.elapsed().as_secs_f64();
    let payload = (2 * (n - 1) * len * 4 / n) as f64;
    for (r, before) in sent_before.iter().enumerate() {
        let sent = g.comm(r).bytes_sent() - before;
        assert!(sent as f64 >= payload, "rank {r} sent {sent} bytes");
    }
    // 1 MB/s: at least 80 ms.
    let wire = payload / 1e6;
    assert!(
        took >= wire,
        "{took} s for {payload} bytes at 1 MB/s: the emulated bandwidth was not applied"
    );
    let inputs: Vec<Vec<f64>> = (0..n)
        .map(|r| input(r, len).into_iter().map(f64::from).collect())
        .collect();
    expect_sums(&mut g, &bufs, &inputs);
}

#[test]
fn reduce_local_for_every_operator_and_type() {
    let mut g = common::group(1);
    let comm = g.comm_mut(0);
    let mut rng = StdRng::seed_from_u64(4);
    let pad = 5;
    for dtype in [DType::F32, DType::F16, DType::BF16, DType::I32, DType::U32] {
        for op in [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max] {
            let len = 777;
            let d = common::random_values(&mut rng, dtype, op, len);
            let s = common::random_values(&mut rng, dtype, op, len);
            let dst_buf = common::make_buffer(comm, dtype, &d, pad);
            let src_buf = common::make_buffer(comm, dtype, &s, pad);
            let at = pad as u64 * dtype.size() as u64;
            let dst = TensorRef::new(&dst_buf, at, len, dtype);
            let src = TensorRef::new(&src_buf, at, len, dtype);
            comm.reduce_local(dst, src, op)
                .unwrap_or_else(|e| panic!("{dtype} {op:?}: {e}"));
            let inputs = [d.clone(), s.clone()];
            let want = common::reference(dtype, op, &inputs);
            let what = format!("reduce_local {dtype} {op:?}");
            common::assert_close(&what, &common::read(comm, dst), &want, |i| {
                common::tolerance(dtype, op, &inputs, i, want[i])
            });
            common::assert_close(
                &format!("{what} (src kept)"),
                &common::read(comm, src),
                &s,
                |_| 0.0,
            );
            // Nothing written around dst.
            let end = at + len as u64 * dtype.size() as u64;
            for around in [
                TensorRef::new(&dst_buf, 0, pad, dtype),
                TensorRef::new(&dst_buf, end, pad, dtype),
            ] {
                let p = common::poison(dtype);
                assert!(
                    common::read(comm, around)
                        .iter()
                        .all(|&v| v == p || (v.is_nan() && p.is_nan())),
                    "{what}: wrote outside dst"
                );
            }
        }
    }
    // Avg needs a count of contributions: refused by name, dst untouched.
    let a = comm.upload(&[1.0f32, 2.0]).expect("upload");
    let b = comm.upload(&[3.0f32, 4.0]).expect("upload");
    let e = comm
        .reduce_local(&a, &b, ReduceOp::Avg)
        .expect_err("avg refused");
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    assert!(e.to_string().contains("avg"), "{e}");
    assert_eq!(comm.download(&a).expect("download"), vec![1.0, 2.0]);
}

#[test]
fn pipeline_depths_1_2_and_8_over_many_slices() {
    for depth in [1usize, 2, 8] {
        // 1000 f32 per rank are 4000 bytes: 16 slices, and several per ring chunk.
        let config = CommConfig::default().pipeline_depth(depth).slice_bytes(256);
        let mut g = common::group_with(3, config);
        assert_eq!(g.comm(0).config().pipeline_depth, depth);
        check_all_kinds(&mut g, DType::F32, ReduceOp::Sum, 1000, 10 + depth as u64);
        check_all_kinds(&mut g, DType::F16, ReduceOp::Max, 999, 20 + depth as u64);
    }
}
