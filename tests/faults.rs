//! Fault injection through the links: a killed rank, a partition, a slow rank and a lost frame
//! each give every rank a clear error (or, for the slow rank, the right answer), never a hang.

mod common;

use std::time::{Duration, Instant};

use wccl::link::{FaultPlan, LinkStack};
use wccl::{CallOptions, Collective, CommConfig, CommGroup, Error, ReduceOp};

/// The links under the faults: channels here; `tests/faults_tcp.rs` includes this file and
/// puts loopback TCP sockets there instead (`Checksummed<FaultyLink<TcpLink>>`). `crate::` is whichever
/// test crate includes the file.
#[allow(dead_code)]
pub fn base_stack() -> LinkStack {
    LinkStack::new()
}

fn group(n: usize, faults: &FaultPlan, timeout: Duration) -> CommGroup {
    common::group_linked(
        n,
        CommConfig::default().timeout(timeout),
        crate::base_stack().faults(faults.clone()),
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

/// Input of `rank`: distinct per (rank, element), period 997 (not a power of two), small
/// integers so that the f32 sum of a few ranks is exact.
fn distinct_input(rank: usize, count: usize) -> Vec<f32> {
    (0..count)
        .map(|i| ((rank * 7919 + i * 31) % 997) as f32 - 498.0)
        .collect()
}

/// An out-of-place all-reduce of [`distinct_input`] into poisoned outputs on every rank, each
/// rank's result checked against an f64 reference where it succeeded.
fn checked_all_reduce(g: &mut CommGroup, count: usize) -> Vec<wccl::Result<()>> {
    let n = g.size();
    let inputs: Vec<_> = (0..n)
        .map(|r| g.comm(r).upload(&distinct_input(r, count)).expect("upload"))
        .collect();
    let outputs: Vec<_> = (0..n)
        .map(|r| g.comm(r).upload(&vec![f32::NAN; count]).expect("upload"))
        .collect();
    let res = g.run_each(|c| {
        let r = c.rank();
        c.run(
            Collective::AllReduce {
                input: inputs[r].view(),
                output: outputs[r].view(),
                op: ReduceOp::Sum,
            },
            CallOptions::default(),
        )
        .map(drop)
    });
    let want: Vec<f64> = (0..count)
        .map(|i| (0..n).map(|r| f64::from(distinct_input(r, count)[i])).sum())
        .collect();
    for (r, x) in res.iter().enumerate() {
        if x.is_ok() {
            let got = g.comm(r).download(&outputs[r]).expect("download");
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(f64::from(g), w, "rank {r}, element {i}");
            }
        }
    }
    res
}

/// Every rank failed at once (by the dead links, not the 30 s deadline), naming rank `dead`.
fn all_name(res: Vec<wccl::Result<()>>, dead: usize) {
    for (r, e) in res.into_iter().enumerate() {
        let e = e.expect_err("a collective with a dead rank fails");
        assert!(!matches!(e, Error::Timeout { .. }), "rank {r}: {e}");
        assert!(
            e.to_string().contains(&format!("rank {dead}")),
            "rank {r}: {e}"
        );
    }
}

/// The link stack belongs to the group, not to one set of links: a rebuild, in place or from
/// the communicators taken out, wraps the fresh links in the same plan, so a fault injected
/// after the rebuild still reaches them.
#[test]
fn a_rebuilt_group_keeps_its_fault_plan() {
    let faults = FaultPlan::new();
    let mut g = group(3, &faults, Duration::from_secs(30));
    for x in checked_all_reduce(&mut g, 1001) {
        x.expect("no fault yet");
    }
    g.rebuild();
    faults.kill(1);
    all_name(checked_all_reduce(&mut g, 1001), 1);
    // Killed ranks stay dead: the plan still holds rank 1 once the links are rebuilt again.
    let mut g = CommGroup::rebuild_from(g.into_communicators());
    all_name(checked_all_reduce(&mut g, 1001), 1);
}

/// Injects `fault(plan, from, to)` on each edge of a 4-rank ring in turn and hands every
/// rank's error to `check(from, to, rank, error)` (every rank must fail: one that returned had
/// its result checked against the f64 reference); a rebuilt group then computes the exact sum.
fn on_each_ring_edge(
    fault: impl Fn(&FaultPlan, usize, usize),
    check: impl Fn(usize, usize, usize, Error),
) {
    let faults = FaultPlan::new();
    let n = 4;
    let mut g = group(n, &faults, Duration::from_secs(30));
    for from in 0..n {
        let to = (from + 1) % n;
        fault(&faults, from, to);
        for (r, e) in checked_all_reduce(&mut g, 1001).into_iter().enumerate() {
            check(
                from,
                to,
                r,
                e.expect_err("a fault on the ring fails the call on every rank"),
            );
        }
        g.rebuild();
    }
    for x in checked_all_reduce(&mut g, 1001) {
        x.expect("no fault left");
    }
}

/// A payload corrupted on the way (one bit flipped, on each edge of the ring in turn) is refused
/// by its receiver, which names the sender, and never folded in: every rank fails, the
/// receiver with `Error::Corrupt` naming the sender, the others with the receiver's reason,
/// which names it too.
#[test]
fn a_corrupted_payload_is_refused_naming_its_sender() {
    on_each_ring_edge(
        |faults, from, to| faults.corrupt_next(from, to, 1),
        |from, to, r, e| {
            if r == to {
                assert!(
                    matches!(e, Error::Corrupt { peer, .. } if peer == from),
                    "{from} -> {to}: the receiver: {e}"
                );
            }
            let text = e.to_string();
            assert!(
                text.contains(&format!("rank {from}")) && text.contains("CRC32C"),
                "{from} -> {to}: rank {r}: {e}"
            );
        },
    );
}

/// A frame delivered twice (on each edge of the ring in turn) is refused by its receiver as a
/// repeated frame, naming the sender; every rank fails, none folds the copy in.
#[test]
fn a_duplicated_frame_is_refused_naming_its_sender() {
    on_each_ring_edge(
        |faults, from, to| faults.duplicate_next(from, to, 1),
        |from, to, r, e| {
            if r == to {
                assert!(
                    matches!(e, Error::Mismatch { peer, .. } if peer == from),
                    "{from} -> {to}: the receiver: {e}"
                );
            }
            // The receiver's reason, as every rank reports it: the sender and the repeat.
            assert!(
                e.to_string()
                    .contains(&format!("rank {from} disagrees on frame (unit, bytes)")),
                "{from} -> {to}: rank {r}: {e}"
            );
        },
    );
}

/// Runs `f` on every communicator, one thread each, as the ranks of one job would.
fn run_each_comm<R: Send>(
    comms: &mut [wccl::Communicator],
    f: impl Fn(&mut wccl::Communicator) -> wccl::Result<R> + Sync,
) -> Vec<wccl::Result<R>> {
    let f = &f;
    std::thread::scope(|s| {
        let hs: Vec<_> = comms.iter_mut().map(|c| s.spawn(move || f(c))).collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    })
}

/// An out-of-place all-reduce of the survivors' [`distinct_input`]s (by their ranks in the
/// original group, `old`) into poisoned outputs, every result checked against the f64 sum of
/// those inputs alone.
fn survivors_all_reduce(comms: &mut [wccl::Communicator], old: &[usize], count: usize) {
    let inputs: Vec<_> = comms
        .iter()
        .zip(old)
        .map(|(c, &o)| c.upload(&distinct_input(o, count)).expect("upload"))
        .collect();
    let outputs: Vec<_> = comms
        .iter()
        .map(|c| c.upload(&vec![f32::NAN; count]).expect("upload"))
        .collect();
    let res = run_each_comm(comms, |c| {
        let r = c.rank();
        c.run(
            Collective::AllReduce {
                input: inputs[r].view(),
                output: outputs[r].view(),
                op: ReduceOp::Sum,
            },
            CallOptions::default(),
        )
        .map(drop)
    });
    let want: Vec<f64> = (0..count)
        .map(|i| {
            old.iter()
                .map(|&o| f64::from(distinct_input(o, count)[i]))
                .sum()
        })
        .collect();
    for (r, x) in res.into_iter().enumerate() {
        if let Err(e) = x {
            panic!("survivor {r} (rank {} before): {e}", old[r]);
        }
        let got = comms[r].download(&outputs[r]).expect("download");
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(f64::from(g), w, "survivor {r}, element {i}");
        }
    }
}

/// Rank 2 of 4 dies: every call fails naming it; each survivor shrinks itself (no group
/// object) to the other three, renumbered 0, 1, 2 in the old order, and their all-reduces are
/// exact against the f64 sum of the survivors' inputs, though the failed call left frames and
/// aborts on the links. Then the new rank 0 dies too and the last two shrink again.
#[test]
fn the_survivors_shrink_and_go_on() {
    let faults = FaultPlan::new();
    let mut g = group(4, &faults, Duration::from_secs(30));
    faults.kill(2);
    all_name(checked_all_reduce(&mut g, 1001), 2);
    let mut comms = g.into_communicators();
    drop(comms.remove(2));
    for r in run_each_comm(&mut comms, |c| c.shrink(&[2])) {
        r.expect("shrink");
    }
    let ranks: Vec<_> = comms.iter().map(|c| (c.rank(), c.size())).collect();
    assert_eq!(ranks, [(0, 3), (1, 3), (2, 3)]);
    survivors_all_reduce(&mut comms, &[0, 1, 3], 1001);
    survivors_all_reduce(&mut comms, &[0, 1, 3], 37);
    // The old rank 3, now rank 2 of three, dies (the plan names ranks as built): the errors
    // name it as the survivors now number it.
    faults.kill(3);
    let failed = run_each_comm(&mut comms[..2], |c| {
        let input = c.upload(&[1.0f32; 64])?;
        c.all_reduce(&input, ReduceOp::Sum)
    });
    for (r, e) in failed.into_iter().enumerate() {
        let e = e.expect_err("a call with a dead rank fails");
        let text = e.to_string();
        assert!(
            text.contains("rank 2") && !text.contains("rank 3"),
            "survivor {r}: {e}"
        );
    }
    drop(comms.remove(2));
    for r in run_each_comm(&mut comms, |c| c.shrink(&[2])) {
        r.expect("shrink");
    }
    assert_eq!(
        comms
            .iter()
            .map(|c| (c.rank(), c.size(), c.epoch()))
            .collect::<Vec<_>>(),
        [(0, 2, 2), (1, 2, 2)]
    );
    survivors_all_reduce(&mut comms, &[0, 1], 1001);
}

/// `shrink` refuses a failed set that names this rank or a rank outside the group, and the
/// communicator is left as it was.
#[test]
fn shrink_refuses_bad_sets_and_loses_nothing() {
    let faults = FaultPlan::new();
    let g = group(3, &faults, Duration::from_secs(30));
    let mut comms = g.into_communicators();
    for bad in [&[0usize][..], &[1, 3]] {
        let e = comms[0].shrink(bad).expect_err("refused");
        assert!(matches!(e, Error::InvalidArgument { .. }), "{bad:?}: {e}");
        assert_eq!(
            (comms[0].rank(), comms[0].size(), comms[0].epoch()),
            (0, 3, 0)
        );
    }
    survivors_all_reduce(&mut comms, &[0, 1, 2], 101);
}

/// Rank 1 of 5 dies: every call fails naming it. The survivors `recover` (agree, then shrink)
/// with no suspects of their own, while rank 0, the agreement's first coordinator, dies as the
/// agreement begins: the other three agree on both (1 and 0) on every rank, shrink, and their
/// all-reduce is exact against the f64 sum of their inputs.
#[test]
fn the_survivors_agree_even_when_the_coordinator_dies_during_it() {
    let faults = FaultPlan::new();
    let mut g = group(5, &faults, Duration::from_secs(5));
    faults.kill(1);
    all_name(checked_all_reduce(&mut g, 1001), 1);
    let mut comms = g.into_communicators();
    drop(comms.remove(1));
    let res = run_each_comm(&mut comms, |c| {
        if c.rank() == 0 {
            // Dies instead of agreeing.
            faults.kill(0);
            return Ok(None);
        }
        c.recover(&[]).map(Some)
    });
    for (i, r) in res.into_iter().enumerate().skip(1) {
        match r {
            Ok(Some(failed)) => assert_eq!(failed, [0, 1], "survivor {i}"),
            other => panic!("survivor {i}: {other:?}"),
        }
    }
    drop(comms.remove(0));
    assert_eq!(
        comms
            .iter()
            .map(|c| (c.rank(), c.size()))
            .collect::<Vec<_>>(),
        [(0, 3), (1, 3), (2, 3)]
    );
    survivors_all_reduce(&mut comms, &[2, 3, 4], 1001);
}

/// A refused `agree` (a bad suspect) does not put the rank out of step: the next agreement of
/// every rank still meets and keeps everyone, and after `shrink(&[])` the group computes
/// exactly.
#[test]
fn a_refused_agreement_leaves_the_ranks_in_step() {
    let faults = FaultPlan::new();
    let g = group(3, &faults, Duration::from_secs(10));
    let mut comms = g.into_communicators();
    for bad in [&[0usize][..], &[3]] {
        let e = comms[0].agree(bad).expect_err("refused");
        assert!(matches!(e, Error::InvalidArgument { .. }), "{bad:?}: {e}");
    }
    for (r, x) in run_each_comm(&mut comms, |c| c.agree(&[]))
        .into_iter()
        .enumerate()
    {
        assert_eq!(x.ok(), Some(vec![]), "rank {r}");
    }
    // A call before the shrink is refused (the agreement's messages are still on the links),
    // and leaves the ranks in step too.
    let one = comms[0].upload(&[1.0f32; 8]).expect("upload");
    let e = comms[0]
        .all_reduce(&one, ReduceOp::Sum)
        .expect_err("refused until the shrink");
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    for r in run_each_comm(&mut comms, |c| c.shrink(&[])) {
        r.expect("shrink");
    }
    survivors_all_reduce(&mut comms, &[0, 1, 2], 77);
}

/// ULFM's revoke, agree, shrink with nobody dead. Ranks 1 to 3 wait in an all-reduce that
/// rank 0 never joins; another thread revokes rank 0's communicator: their pending calls and
/// every later call fail with `Revoked` naming rank 0 and the reason, as do rank 0's own. Then
/// every rank recovers (`recover(&[])`: the agreement finds nobody failed) and computes exactly
/// again.
#[test]
fn a_revoke_ends_pending_and_later_calls_until_the_ranks_recover() {
    let faults = FaultPlan::new();
    let g = group(4, &faults, Duration::from_secs(30));
    let mut comms = g.into_communicators();
    let handle = comms[0].abort_handle();
    let inputs: Vec<_> = comms
        .iter()
        .map(|c| c.upload(&distinct_input(c.rank(), 64)).expect("upload"))
        .collect();
    let (started_tx, started_rx) = crossbeam::channel::bounded::<()>(3);
    let res = std::thread::scope(|s| {
        let revoker = s.spawn(|| {
            // Once the three are about to wait (bounded: a missing signal fails the test).
            for _ in 0..3 {
                started_rx
                    .recv_timeout(Duration::from_secs(60))
                    .expect("the ranks started");
            }
            handle.revoke("the job is being resized");
        });
        let res = run_each_comm(&mut comms[1..], |c| {
            let _ = started_tx.send(());
            c.all_reduce(&inputs[c.rank()], ReduceOp::Sum)
        });
        revoker.join().expect("revoker");
        res
    });
    let is_revoke = |e: &Error| matches!(e, Error::Revoked { by: 0, reason, .. } if reason == "the job is being resized");
    for (r, x) in res.into_iter().enumerate() {
        let e = x.expect_err("a revoked call fails");
        assert!(is_revoke(&e), "rank {}: {e}", r + 1);
    }
    // Later calls, every rank, the revoker's own included.
    for (r, x) in run_each_comm(&mut comms, |c| {
        c.all_reduce(&inputs[c.rank()], ReduceOp::Sum)
    })
    .into_iter()
    .enumerate()
    {
        let e = x.expect_err("a revoked communicator refuses later calls");
        assert!(is_revoke(&e), "rank {r}: {e}");
    }
    for (r, x) in run_each_comm(&mut comms, |c| c.recover(&[]))
        .into_iter()
        .enumerate()
    {
        assert_eq!(x.ok(), Some(vec![]), "rank {r}");
    }
    survivors_all_reduce(&mut comms, &[0, 1, 2, 3], 1001);
}

/// A revoke between calls, from the rank's own thread (`Communicator::revoke`): the idle
/// peers' next call fails with `Revoked` naming the revoker, and so does the revoker's.
#[test]
fn a_revoke_between_calls_reaches_the_idle_peers() {
    let faults = FaultPlan::new();
    let g = group(3, &faults, Duration::from_secs(30));
    let mut comms = g.into_communicators();
    comms[2].revoke("checkpoint and stop");
    let inputs: Vec<_> = comms
        .iter()
        .map(|c| c.upload(&distinct_input(c.rank(), 40)).expect("upload"))
        .collect();
    for (r, x) in run_each_comm(&mut comms, |c| {
        c.all_reduce(&inputs[c.rank()], ReduceOp::Sum)
    })
    .into_iter()
    .enumerate()
    {
        let e = x.expect_err("revoked");
        assert!(
            matches!(&e, Error::Revoked { by: 2, reason, .. } if reason == "checkpoint and stop"),
            "rank {r}: {e}"
        );
    }
}
