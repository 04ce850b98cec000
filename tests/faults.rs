//! Fault injection through the links: a killed rank, a partition, a slow rank and a lost frame
//! each give every rank a clear error (or, for the slow rank, the right answer), never a hang.

mod common;

use std::time::{Duration, Instant};

use wccl::link::FaultPlan;
use wccl::{CommConfig, CommGroup, Error, ReduceOp};

fn group(n: usize, faults: &FaultPlan, timeout: Duration) -> CommGroup {
    common::group_with(
        n,
        CommConfig::default()
            .timeout(timeout)
            .faults(faults.clone()),
    )
}

fn all_reduce(
    g: &mut CommGroup,
    count: usize,
) -> (
    Vec<wccl::Result<()>>,
    Vec<wccl::DeviceBuffer<f32>>,
    Duration,
) {
    let bufs: Vec<_> = (0..g.size())
        .map(|r| {
            g.comm(r)
                .upload(&vec![r as f32 + 1.0; count])
                .expect("upload")
        })
        .collect();
    let t = Instant::now();
    let res = g.run_each(|c| c.all_reduce(&bufs[c.rank()], ReduceOp::Sum));
    (res, bufs, t.elapsed())
}

#[test]
fn a_killed_rank_is_named_by_everyone_at_once() {
    let faults = FaultPlan::new();
    let mut g = group(4, &faults, Duration::from_secs(30));
    faults.kill(2);
    let (res, _, _) = all_reduce(&mut g, 1000);
    for (r, e) in res.into_iter().enumerate() {
        let e = e.expect_err("a collective with a dead rank fails");
        // At once: by the dead links, not by the 30 s deadline.
        assert!(!matches!(e, Error::Timeout { .. }), "rank {r}: {e}");
        let text = e.to_string();
        assert!(text.contains("rank 2"), "rank {r}: {text}");
    }
}

#[test]
fn a_partition_times_out_within_the_deadline_and_heals() {
    let faults = FaultPlan::new();
    let deadline = Duration::from_millis(1500);
    let mut g = group(4, &faults, deadline);
    faults.partition(&[&[0, 1], &[2, 3]]);
    let (res, _, took) = all_reduce(&mut g, 1000);
    // Only the deadline ends a partition (nothing closes), and nothing hangs past a generous
    // multiple of it.
    assert!(took >= deadline && took < deadline * 10, "{took:?}");
    assert!(
        res.iter()
            .all(|r| matches!(r, Err(Error::Timeout { .. } | Error::PeerAborted { .. }))),
        "{res:?}"
    );
    assert!(faults.dropped() > 0);
    faults.heal();
    g.rebuild();
    let (res, bufs, _) = all_reduce(&mut g, 1000);
    for (r, x) in res.into_iter().enumerate() {
        x.expect("healed");
        assert!(
            g.comm(r)
                .download(&bufs[r])
                .unwrap()
                .iter()
                .all(|&v| v == 10.0)
        );
    }
}

#[test]
fn a_slow_rank_still_gives_the_right_answer() {
    let faults = FaultPlan::new();
    let mut g = group(3, &faults, Duration::from_secs(30));
    faults.delay(1, Duration::from_millis(30));
    let (res, bufs, took) = all_reduce(&mut g, 10_000);
    // Rank 1 sends 2(n-1) = 4 frames, each held back 30 ms.
    assert!(took >= Duration::from_millis(120), "{took:?}");
    for (r, x) in res.into_iter().enumerate() {
        x.expect("slow is not wrong");
        assert!(
            g.comm(r)
                .download(&bufs[r])
                .unwrap()
                .iter()
                .all(|&v| v == 6.0)
        );
    }
}

/// A lost frame is caught by the frame counter in the header (the next frame arrives out of
/// order) or, if none follows, by the deadline; either way rank 1 names rank 0.
#[test]
fn a_lost_frame_is_detected_naming_the_sender() {
    let faults = FaultPlan::new();
    let mut g = group(3, &faults, Duration::from_millis(1000));
    faults.drop_next(0, 1, 1);
    let (res, _, _) = all_reduce(&mut g, 100);
    match &res[1] {
        Err(Error::Timeout { waiting_on, .. }) => assert_eq!(waiting_on, &vec![0]),
        Err(Error::Mismatch { peer: 0, field, .. }) => assert!(field.contains("frame"), "{field}"),
        other => panic!("rank 1 should report rank 0's lost frame: {other:?}"),
    }
    assert!(res.iter().all(|r| r.is_err()));
}
