//! An error leaves nothing behind: a call broken mid-way (a dropped frame, a partition, a killed
//! rank, a lost device) returns with no read-back staging slot busy or mapped on any rank, the
//! broken communicator refuses further engine work, and after `rebuild` the next all-reduce is
//! exact against an f64 reference.

mod common;

use std::time::Duration;

use wccl::link::{FaultPlan, LinkStack};
use wccl::{Algorithm, CommConfig, CommGroup, DeviceBuffer, Error, ReduceOp};

const RANKS: usize = 3;
/// Many slices per chunk (256 f32 per slice), so that read-backs are in flight when it breaks.
const COUNT: usize = 3 * 1000 + 7;

fn group(faults: &FaultPlan, timeout: Duration) -> CommGroup {
    group_with(faults, timeout, CommConfig::default().algorithm)
}

fn group_with(faults: &FaultPlan, timeout: Duration, algorithm: Algorithm) -> CommGroup {
    common::group_linked(
        RANKS,
        CommConfig::default()
            .timeout(timeout)
            .slice_bytes(1024)
            .pipeline_depth(3)
            .algorithm(algorithm),
        LinkStack::new().faults(faults.clone()),
    )
}

/// Input of `rank`: distinct per (rank, element), period 997 (not a power of two), small
/// integers so that the f32 sum is exact.
fn input(rank: usize) -> Vec<f32> {
    (0..COUNT)
        .map(|i| ((rank * 7919 + i * 31) % 997) as f32 - 498.0)
        .collect()
}

fn reference() -> Vec<f64> {
    (0..COUNT)
        .map(|i| (0..RANKS).map(|r| f64::from(input(r)[i])).sum())
        .collect()
}

struct Bufs {
    inputs: Vec<DeviceBuffer<f32>>,
    outputs: Vec<DeviceBuffer<f32>>,
}

fn buffers(g: &mut CommGroup) -> Bufs {
    let inputs = (0..RANKS)
        .map(|r| g.comm(r).upload(&input(r)).expect("upload"))
        .collect();
    let outputs = (0..RANKS)
        .map(|r| g.comm(r).upload(&vec![f32::NAN; COUNT]).expect("poison"))
        .collect();
    Bufs { inputs, outputs }
}

fn all_reduce(g: &mut CommGroup, b: &Bufs) -> Vec<wccl::Result<()>> {
    g.run_each(|c| {
        let r = c.rank();
        c.all_reduce_into(&b.inputs[r], &b.outputs[r], ReduceOp::Sum)
    })
}

/// Every rank failed, and none holds a staging slot.
fn assert_failed_clean(g: &mut CommGroup, res: &[wccl::Result<()>], what: &str) {
    for (r, x) in res.iter().enumerate() {
        assert!(x.is_err(), "{what}: rank {r} should fail: {x:?}");
        assert_eq!(
            g.comm(r).staging_in_use(),
            0,
            "{what}: rank {r} left read-back staging slots busy or mapped after {x:?}"
        );
    }
}

/// After a rebuild the next all-reduce is exact on every rank (outputs re-poisoned first).
fn assert_exact_after_rebuild(g: CommGroup, b: &Bufs, what: &str) -> CommGroup {
    let mut g = g;
    g.rebuild();
    for r in 0..RANKS {
        b.outputs[r]
            .write(g.comm(r).device(), &vec![f32::NAN; COUNT])
            .expect("re-poison");
    }
    let want = reference();
    for (r, x) in all_reduce(&mut g, b).into_iter().enumerate() {
        x.unwrap_or_else(|e| panic!("{what}: rank {r} after rebuild: {e}"));
        let got = g.comm(r).download(&b.outputs[r]).expect("download");
        for (i, (&x, &w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(f64::from(x), w, "{what}: rank {r} element {i}");
        }
        assert_eq!(
            g.comm(r).staging_in_use(),
            0,
            "{what}: rank {r} after success"
        );
    }
    g
}

#[test]
fn a_dropped_frame_leaves_no_staging_mapped_and_the_rebuilt_group_is_exact() {
    let faults = FaultPlan::new();
    let mut g = group(&faults, Duration::from_secs(5));
    let b = buffers(&mut g);
    faults.drop_next(0, 1, 1);
    let res = all_reduce(&mut g, &b);
    assert_failed_clean(&mut g, &res, "dropped frame");
    // The broken communicator refuses engine work until the rebuild.
    let e = g
        .comm_mut(0)
        .reduce_local(&b.outputs[0], &b.inputs[0], ReduceOp::Sum)
        .expect_err("a broken communicator refuses reduce_local");
    assert!(matches!(e, Error::Broken { .. }), "{e}");
    faults.heal();
    assert_exact_after_rebuild(g, &b, "dropped frame");
}

/// The algorithms that read back into host memory through staging buffers, whose read-backs
/// the executor begins ahead of their copies (naive's root, halving-doubling on host memory):
/// a dropped frame fails every rank with no slot left busy, and the rebuilt group is exact.
/// The frame dropped is one every other rank's result depends on (rank 1's buffer to naive's
/// root; on 3 ranks rank 0's buffer to its halving-doubling partner, rank 1): a frame only its
/// receiver needs, such as a last result sent back, fails only that receiver.
#[test]
fn a_dropped_frame_leaves_no_read_back_begun_ahead_busy() {
    for (algorithm, from, to) in [
        (Algorithm::Naive, 1, 0),
        (Algorithm::StagedHalvingDoubling, 0, 1),
    ] {
        let faults = FaultPlan::new();
        let mut g = group_with(&faults, Duration::from_secs(5), algorithm);
        let b = buffers(&mut g);
        faults.drop_next(from, to, 1);
        let res = all_reduce(&mut g, &b);
        let what = format!("dropped frame, {algorithm}");
        assert_failed_clean(&mut g, &res, &what);
        faults.heal();
        assert_exact_after_rebuild(g, &b, &what);
    }
}

#[test]
fn a_partition_leaves_no_staging_mapped_and_the_rebuilt_group_is_exact() {
    let faults = FaultPlan::new();
    let mut g = group(&faults, Duration::from_secs(2));
    let b = buffers(&mut g);
    faults.partition(&[&[0], &[1, 2]]);
    let res = all_reduce(&mut g, &b);
    assert_failed_clean(&mut g, &res, "partition");
    faults.heal();
    assert_exact_after_rebuild(g, &b, "partition");
}

#[test]
fn a_killed_rank_leaves_no_staging_mapped() {
    let faults = FaultPlan::new();
    let mut g = group(&faults, Duration::from_secs(2));
    let b = buffers(&mut g);
    faults.kill(2);
    let res = all_reduce(&mut g, &b);
    assert_failed_clean(&mut g, &res, "killed rank");
}

#[test]
fn a_device_lost_on_one_rank_leaves_no_staging_mapped_on_any() {
    let faults = FaultPlan::new();
    let mut g = group(&faults, Duration::from_secs(5));
    let b = buffers(&mut g);
    g.comm(1).device().device().destroy();
    let res = all_reduce(&mut g, &b);
    assert_failed_clean(&mut g, &res, "lost device");
    assert!(
        matches!(res[1], Err(Error::Device { .. })),
        "rank 1 names its device: {:?}",
        res[1]
    );
}

#[test]
fn a_broken_communicator_refuses_to_probe() {
    let faults = FaultPlan::new();
    let mut g = group(&faults, Duration::from_secs(5));
    let cause = Error::InvalidArgument {
        at: wccl::At {
            rank: 1,
            op: None,
            seq: 0,
        },
        message: "test".into(),
    };
    g.comm_mut(1).abort(&cause);
    let e = g.probe(4096).expect_err("a broken rank cannot be probed");
    assert!(matches!(e, Error::Broken { .. }), "{e}");
}

#[test]
fn a_rank_that_panics_in_a_group_call_is_broken_and_its_peers_told() {
    let faults = FaultPlan::new();
    let mut g = group(&faults, Duration::from_secs(30));
    let res = g.run_each(|c| -> wccl::Result<()> {
        if c.rank() == 1 {
            panic!("a bug in the caller's closure");
        }
        Ok(())
    });
    assert!(
        matches!(res[1], Err(Error::Panicked { .. })),
        "{:?}",
        res[1]
    );
    assert!(
        matches!(g.comm(1).broken(), Some(Error::Panicked { .. })),
        "the panicked rank is broken"
    );
    // Its peers hear of it at their next call instead of waiting out the deadline.
    let b = buffers(&mut g);
    for (r, x) in all_reduce(&mut g, &b).iter().enumerate() {
        assert!(x.is_err(), "rank {r}: {x:?}");
        assert_eq!(g.comm(r).staging_in_use(), 0, "rank {r}");
    }
}

/// The host-staged ring works in its tensors mapped in place (a unified-memory device: the
/// CI's lavapipe): a call broken mid-way by a dropped frame, a partition or a killed rank leaves
/// every tensor unmapped on every rank. Device work on a mapped buffer fails, so the writes
/// and reads after the failure, and the rebuilt group's exact call (in the mapped tensors
/// again), show it.
#[test]
fn a_broken_staged_ring_leaves_its_mapped_tensors_unmapped() {
    for fault in ["dropped frame", "partition", "killed rank"] {
        let faults = FaultPlan::new();
        let mut g = group_with(&faults, Duration::from_secs(2), Algorithm::Staged);
        let b = buffers(&mut g);
        match fault {
            "dropped frame" => faults.drop_next(0, 1, 1),
            "partition" => faults.partition(&[&[0], &[1, 2]]),
            _ => faults.kill(2),
        }
        let res = all_reduce(&mut g, &b);
        assert_failed_clean(&mut g, &res, fault);
        let unified = g.comm(0).device().unified_memory();
        for r in 0..RANKS {
            let c = g.comm(r);
            // The ranks that got as far as the ring had mapped their tensors.
            assert!(
                !unified || r == 2 || c.mapped_calls() == 1,
                "{fault}: rank {r}"
            );
            if r == 2 && fault == "killed rank" {
                continue;
            }
            b.outputs[r]
                .write(c.device(), &vec![f32::NAN; COUNT])
                .unwrap_or_else(|e| panic!("{fault}: rank {r}'s output after the failure: {e}"));
            let got = b.inputs[r]
                .read(c.device())
                .unwrap_or_else(|e| panic!("{fault}: rank {r}'s input after the failure: {e}"));
            assert_eq!(got, input(r), "{fault}: rank {r}'s input is kept");
        }
        if fault == "killed rank" {
            continue;
        }
        faults.heal();
        let g = assert_exact_after_rebuild(g, &b, fault);
        for r in 0..RANKS {
            assert_eq!(
                g.comm(r).mapped_calls(),
                u64::from(unified),
                "{fault}: rank {r}'s rebuilt call ran in its tensors"
            );
        }
    }
}

/// A tensor its owner has mapped cannot be mapped in place for a call: the call fails with an
/// error that says so (no panic), and the owner's mapping and view are left as they were.
#[test]
fn a_tensor_mapped_by_its_owner_is_refused_and_left_mapped() {
    let faults = FaultPlan::new();
    let mut g = group_with(&faults, Duration::from_secs(5), Algorithm::Staged);
    if !g.comm(0).device().unified_memory() {
        println!("skipped: the device does not map tensors in place");
        return;
    }
    let b = buffers(&mut g);
    let raw = b.inputs[0].raw().clone();
    let mapped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&mapped);
    raw.map_async(wgpu::MapMode::Read, .., move |r| {
        flag.store(r.is_ok(), std::sync::atomic::Ordering::Release)
    });
    g.comm(0)
        .device()
        .device()
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("poll");
    assert!(
        mapped.load(std::sync::atomic::Ordering::Acquire),
        "the owner's map"
    );
    let view = raw.get_mapped_range(..).expect("the owner's view");
    let res = all_reduce(&mut g, &b);
    let text = res[0]
        .as_ref()
        .expect_err("rank 0's tensor is mapped")
        .to_string();
    assert!(text.contains("mapped already"), "{text}");
    assert!(res.iter().all(|r| r.is_err()), "{res:?}");
    // The owner's view still reads its data, and its unmap is its own to make.
    let got: Vec<f32> = bytemuck::pod_collect_to_vec(&view[..COUNT * 4]);
    assert_eq!(got, input(0));
    drop(view);
    raw.unmap();
    assert_exact_after_rebuild(g, &b, "owner's map");
}

/// A tensor destroyed before a host-staged call cannot be mapped (wgpu refuses): an error on
/// every rank, no panic, and the other tensors are left unmapped (they take writes after).
#[test]
fn a_destroyed_tensor_fails_the_staged_call_cleanly() {
    let faults = FaultPlan::new();
    let mut g = group_with(&faults, Duration::from_secs(5), Algorithm::Staged);
    let b = buffers(&mut g);
    b.inputs[0].raw().destroy();
    let res = all_reduce(&mut g, &b);
    assert!(res.iter().all(|r| r.is_err()), "{res:?}");
    if g.comm(0).device().unified_memory() {
        let text = res[0]
            .as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default();
        assert!(text.contains("mapping a tensor in place failed"), "{text}");
    }
    for r in 0..RANKS {
        let c = g.comm(r);
        b.outputs[r]
            .write(c.device(), &vec![f32::NAN; COUNT])
            .unwrap_or_else(|e| panic!("rank {r}'s output after the failure: {e}"));
        if r > 0 {
            let got = b.inputs[r]
                .read(c.device())
                .unwrap_or_else(|e| panic!("rank {r}'s input after the failure: {e}"));
            assert_eq!(got, input(r), "rank {r}'s input is kept");
        }
    }
}
