//! `OnFailure::FinishAmongSurvivors`: a rank killed at every point of a call, and the
//! survivors' results checked element by element against an f64 reference of exactly the ranks
//! the `Outcome` names; every collective; a second death during the recovery; a minority
//! partition; a revoke. `tests/survive_tcp.rs` runs the same over loopback TCP.

mod common;

use std::time::Duration;

use wccl::link::{FaultPlan, LinkStack};
use wccl::{
    CallOptions, Collective, CommConfig, Communicator, Error, OnFailure, Outcome, ReduceOp,
};

/// The links under the faults: channels here, TCP in `survive_tcp.rs`.
#[allow(dead_code)]
pub fn base_stack() -> LinkStack {
    LinkStack::new()
}

fn comms(n: usize, faults: &FaultPlan, timeout: Duration) -> Vec<Communicator> {
    common::group_linked(
        n,
        CommConfig::default()
            .timeout(timeout)
            .on_failure(OnFailure::FinishAmongSurvivors),
        crate::base_stack().faults(faults.clone()),
    )
    .into_communicators()
}

/// Distinct per (rank, element), with a period (997) that is not a power of two, integers so
/// that f32 sums of a few ranks are exact.
fn input(rank: usize, count: usize) -> Vec<f32> {
    (0..count)
        .map(|i| ((rank * 1009 + i * 7) % 997) as f32 + 1000.0 * rank as f32)
        .collect()
}

fn sum_of(ranks: &[usize], count: usize) -> Vec<f64> {
    (0..count)
        .map(|i| ranks.iter().map(|&r| f64::from(input(r, count)[i])).sum())
        .collect()
}

/// Runs `f` on every rank's communicator in a thread of its own; results in rank order.
fn each<R: Send>(comms: &mut [Communicator], f: impl Fn(&mut Communicator) -> R + Sync) -> Vec<R> {
    std::thread::scope(|s| {
        let hs: Vec<_> = comms.iter_mut().map(|c| s.spawn(|| f(c))).collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| panic!("a rank panicked")))
            .collect()
    })
}

fn assert_exact(what: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| f64::from(got[i]) != want[i]) {
        panic!(
            "{what}: element {i} is {}, the reference {} ({} wrong elements)",
            got[i],
            want[i],
            (0..got.len())
                .filter(|&i| f64::from(got[i]) != want[i])
                .count()
        );
    }
}

/// Every survivor's result holds the same ranks, one of the two sets the issue allows: every
/// rank, or exactly the survivors. (Whether a survivor saw the death in this call or will in
/// its next may differ: one that returned before it never saw it.)
fn same_contributors(outcomes: &[&Outcome], n: usize, victim: usize) -> Outcome {
    let first = outcomes[0].clone();
    let all: Vec<usize> = (0..n).collect();
    let survivors: Vec<usize> = all.iter().copied().filter(|&r| r != victim).collect();
    for o in outcomes {
        assert_eq!(
            o.contributors, first.contributors,
            "survivors disagree: {outcomes:?}"
        );
        assert!(
            o.excluded.is_empty() || o.excluded == [victim],
            "{outcomes:?}"
        );
        assert_eq!(
            o.excluded.is_empty(),
            o.recovered_in.is_none(),
            "{outcomes:?}"
        );
    }
    assert!(
        first.contributors == all || first.contributors == survivors,
        "contributors {:?}",
        first.contributors
    );
    first
}

/// Rank 2 of 4 dies after each possible number of its frames (0: before the call; 9: after
/// its last, with the call done everywhere): every survivor's result is exactly the reduction
/// of the ranks its outcome names, the same on every survivor, in place and out of place. Each
/// rank then goes on at once (as a training loop does: a rank that returned before the death
/// joins the recovery from its next call) with an all-reduce that must be exact among the
/// three.
#[test]
fn all_reduce_finishes_among_survivors_wherever_a_rank_dies() {
    let (n, victim, count) = (4, 2, 1001);
    let mut seen = (0, 0);
    for in_place in [true, false] {
        // One slice per ring step: 2 (n-1) data frames, then n-1 commit frames.
        for frames in 0..=3 * (n - 1) {
            let faults = FaultPlan::new();
            let mut cs = comms(n, &faults, Duration::from_secs(20));
            faults.kill_after(victim, frames);
            let what = format!("in place {in_place}, killed after {frames} frames");
            let res = each(&mut cs, |c| {
                // Numbered as at the start: ranks are renumbered by a recovery.
                let me = c.rank();
                let inp = c.upload(&input(me, count)).expect("upload");
                let out = c.upload(&vec![f32::NAN; count]).expect("upload");
                let output = if in_place { inp.view() } else { out.view() };
                let got = c.run(
                    Collective::AllReduce {
                        input: inp.view(),
                        output,
                        op: ReduceOp::Sum,
                    },
                    CallOptions::default(),
                );
                let values = got
                    .as_ref()
                    .ok()
                    .map(|_| c.read::<f32>(output).expect("read"));
                if me == victim {
                    return (got, values, None);
                }
                let buf = c.upload(&[me as f32 + 1.0; 7]).expect("upload");
                let next = c
                    .run(
                        Collective::AllReduce {
                            input: buf.view(),
                            output: buf.view(),
                            op: ReduceOp::Sum,
                        },
                        CallOptions::default(),
                    )
                    .map(|_| (c.download(&buf).expect("download"), c.size()));
                (got, values, Some(next))
            });
            let outcomes: Vec<&Outcome> = res
                .iter()
                .enumerate()
                .filter(|(r, _)| *r != victim)
                .map(|(r, (x, _, _))| {
                    x.as_ref()
                        .unwrap_or_else(|e| panic!("{what}: rank {r}: {e}"))
                })
                .collect();
            let outcome = same_contributors(&outcomes, n, victim);
            if outcome.contributors.len() == n {
                seen.0 += 1;
            } else {
                seen.1 += 1;
            }
            let want = sum_of(&outcome.contributors, count);
            for (r, (_, values, next)) in res.iter().enumerate().filter(|(r, _)| *r != victim) {
                let got = values.as_ref().expect("values");
                assert_exact(&format!("{what}: rank {r}"), got, &want);
                let (values, size) = match next {
                    Some(Ok(x)) => x,
                    Some(Err(e)) => panic!("{what}: rank {r}: next call: {e}"),
                    None => panic!("{what}: rank {r}: no next call"),
                };
                assert_eq!(*size, 3, "{what}: rank {r}: the communicator is shrunk");
                // Ranks 0, 1 and 3 (numbered as at the start) added their rank + 1.
                assert_eq!(values, &vec![7.0; 7], "{what}: rank {r}: next call");
            }
        }
    }
    assert!(seen.0 > 0 && seen.1 > 0, "both outcomes happen: {seen:?}");
}

/// What one rank's call of `kind` read back: its output (the whole buffer), or the error.
type Got = (wccl::Result<Outcome>, Vec<f32>);

/// Runs one call of `kind` on 4 ranks with rank 2 killed after `frames` of its frames; the
/// survivors' results (the victim's dropped).
fn one_call(kind: &str, frames: usize) -> Vec<(usize, Got)> {
    let (n, victim, c) = (4, 2, 301);
    let faults = FaultPlan::new();
    let mut cs = comms(n, &faults, Duration::from_secs(20));
    faults.kill_after(victim, frames);
    let res = each(&mut cs, |comm| {
        let me = comm.rank();
        // Inputs of n chunks (reduce-scatter) or one (the others); outputs poisoned.
        let long = comm.upload(&input(me, n * c)).expect("upload");
        let short = comm.upload(&input(me, c)).expect("upload");
        let out_long = comm.upload(&vec![f32::NAN; n * c]).expect("upload");
        let out_short = comm.upload(&vec![f32::NAN; c]).expect("upload");
        let (call, out) = match kind {
            "reduce_scatter" => (
                Collective::ReduceScatter {
                    input: long.view(),
                    output: out_short.view(),
                    op: ReduceOp::Sum,
                },
                out_short.view(),
            ),
            "reduce_scatter_in_place" => (
                Collective::ReduceScatter {
                    input: long.view(),
                    output: long.range(me * c, c),
                    op: ReduceOp::Sum,
                },
                long.range(me * c, c),
            ),
            "all_gather" => (
                Collective::AllGather {
                    input: short.view(),
                    output: out_long.view(),
                },
                out_long.view(),
            ),
            "broadcast_0" | "broadcast_2" => (
                Collective::Broadcast {
                    input: short.view(),
                    output: short.view(),
                    root: if kind == "broadcast_0" { 0 } else { 2 },
                },
                short.view(),
            ),
            "reduce_0" | "reduce_2" => (
                Collective::Reduce {
                    input: short.view(),
                    output: out_short.view(),
                    op: ReduceOp::Sum,
                    root: if kind == "reduce_0" { 0 } else { 2 },
                },
                out_short.view(),
            ),
            _ => (Collective::Barrier, out_short.view()),
        };
        let got = comm.run(call, CallOptions::default());
        let values = comm.read::<f32>(out).expect("read");
        // Go on, as a training loop does: a rank that returned before the death joins the
        // recovery from its next call.
        if me != victim {
            let next = comm.barrier();
            assert!(
                next.is_ok(),
                "{kind}, {frames} frames: rank {me}: next call: {next:?}"
            );
        }
        (got, values)
    });
    res.into_iter()
        .enumerate()
        .filter(|(r, _)| *r != victim)
        .collect()
}

/// Every collective, with rank 2 of 4 dead before the call, killed early in it (after 1 frame)
/// and late (after 4); rank 2 is also the root of a broadcast (the survivor that received it
/// whole takes over, or all report it lost) and of a reduce. Each survivor's result is checked against the reference of the ranks its outcome names,
/// and the survivors agree on it.
#[test]
fn every_collective_finishes_among_survivors() {
    let (n, c) = (4, 301);
    for frames in [0, 1, 4] {
        for kind in [
            "reduce_scatter",
            "reduce_scatter_in_place",
            "all_gather",
            "broadcast_0",
            "broadcast_2",
            "reduce_0",
            "reduce_2",
            "barrier",
        ] {
            let what = format!("{kind}, killed after {frames} frames");
            let res = one_call(kind, frames);
            // A root that died: every survivor reports the loss, or every survivor finished.
            if kind.ends_with("_2")
                && res
                    .iter()
                    .any(|(_, (x, _))| matches!(x, Err(Error::RootLost { .. })))
            {
                for (r, (x, _)) in &res {
                    assert!(
                        matches!(x, Err(Error::RootLost { root: 2, .. })),
                        "{what}: rank {r}: {x:?}"
                    );
                }
                continue;
            }
            let outcomes: Vec<&Outcome> = res
                .iter()
                .map(|(r, (x, _))| {
                    x.as_ref()
                        .unwrap_or_else(|e| panic!("{what}: rank {r}: {e}"))
                })
                .collect();
            let o = outcomes[0].clone();
            for x in &outcomes {
                assert_eq!(x.contributors, o.contributors, "{what}: {outcomes:?}");
            }
            for (r, (_, got)) in &res {
                let what = format!("{what}: rank {r}");
                match kind {
                    "reduce_scatter" | "reduce_scatter_in_place" => {
                        let all = sum_of(&o.contributors, n * c);
                        assert_exact(&what, got, &all[r * c..(r + 1) * c]);
                    }
                    "all_gather" => {
                        let want: Vec<f64> = (0..n)
                            .flat_map(|b| {
                                let present = o.contributors.contains(&b);
                                input(b, c)
                                    .into_iter()
                                    .map(move |v| if present { f64::from(v) } else { 0.0 })
                            })
                            .collect();
                        assert_exact(&what, got, &want);
                    }
                    "broadcast_0" | "broadcast_2" => {
                        let root = if kind == "broadcast_0" { 0 } else { 2 };
                        assert_eq!(o.contributors, [root], "{what}");
                        assert_exact(&what, got, &sum_of(&[root], c));
                    }
                    "reduce_0" if *r == 0 => assert_exact(&what, got, &sum_of(&o.contributors, c)),
                    "reduce_0" | "reduce_2" => {
                        assert!(got.iter().all(|v| v.is_nan()), "{what}: written")
                    }
                    _ => {}
                }
            }
        }
    }
}

/// A second death during the recovery: rank 2 of 5 dies in the call, and rank 1 as soon as it
/// sends its next frame after that (its proposal, or a frame of the call it has not yet seen
/// fail). The three left agree, finish among themselves, and the result is exactly theirs.
#[test]
fn a_second_death_during_the_recovery() {
    let (n, count) = (5, 999);
    let faults = FaultPlan::new();
    let mut cs = comms(n, &faults, Duration::from_secs(20));
    faults.kill_after(2, 3);
    let watcher = {
        let faults = faults.clone();
        std::thread::spawn(move || {
            // Bounded: the call cannot outlast this.
            let end = std::time::Instant::now() + Duration::from_secs(120);
            while !faults.is_killed(2) && std::time::Instant::now() < end {
                std::thread::yield_now();
            }
            faults.kill_after(1, 1);
        })
    };
    let res = each(&mut cs, |c| {
        let me = c.rank();
        let buf = c.upload(&input(me, count)).expect("upload");
        let got = c.run(
            Collective::AllReduce {
                input: buf.view(),
                output: buf.view(),
                op: ReduceOp::Sum,
            },
            CallOptions::default(),
        );
        (got, c.download(&buf).expect("download"))
    });
    watcher.join().expect("watcher");
    for r in [0, 3, 4] {
        let (x, got) = &res[r];
        let o = x.as_ref().unwrap_or_else(|e| panic!("rank {r}: {e}"));
        assert_eq!(o.excluded, [1, 2], "rank {r}");
        assert_eq!(o.contributors, [0, 3, 4], "rank {r}");
        assert_exact(&format!("rank {r}"), got, &sum_of(&[0, 3, 4], count));
    }
}

/// A partition into 2 and 3 of 5 during a call: the three finish among themselves with exactly
/// their result, the two get `NoQuorum` (the split-brain guard) and stay broken.
#[test]
fn a_minority_partition_gets_no_quorum() {
    let (n, count) = (5, 500);
    let faults = FaultPlan::new();
    let mut cs = comms(n, &faults, Duration::from_secs(1));
    faults.partition(&[&[0, 1], &[2, 3, 4]]);
    let res = each(&mut cs, |c| {
        let me = c.rank();
        let buf = c.upload(&input(me, count)).expect("upload");
        let got = c.run(
            Collective::AllReduce {
                input: buf.view(),
                output: buf.view(),
                op: ReduceOp::Sum,
            },
            CallOptions::default(),
        );
        let after = c.barrier();
        (got, c.download(&buf).expect("download"), after)
    });
    for r in [2, 3, 4] {
        let (x, got, after) = &res[r];
        let o = x.as_ref().unwrap_or_else(|e| panic!("rank {r}: {e}"));
        assert_eq!(
            (&o.contributors[..], &o.excluded[..]),
            (&[2, 3, 4][..], &[0, 1][..])
        );
        assert_exact(&format!("rank {r}"), got, &sum_of(&[2, 3, 4], count));
        assert!(after.is_ok(), "rank {r}: {after:?}");
    }
    for r in [0, 1] {
        let (x, _, after) = &res[r];
        assert!(
            matches!(x, Err(Error::NoQuorum { survivors, size: 5, .. }) if *survivors == [0, 1]),
            "rank {r}: {x:?}"
        );
        assert!(
            matches!(after, Err(Error::Broken { cause, .. }) if matches!(**cause, Error::NoQuorum { .. })),
            "rank {r}: {after:?}"
        );
    }
}

/// A revoke is the user stopping the communicator: a call finishing among survivors does not
/// recover from it; every rank reports it, naming the revoker.
#[test]
fn a_revoke_is_not_recovered_from() {
    let faults = FaultPlan::new();
    let mut cs = comms(3, &faults, Duration::from_secs(20));
    cs[0].revoke("stop");
    let res = each(&mut cs, |c| c.barrier());
    for (r, x) in res.iter().enumerate() {
        assert!(
            matches!(x, Err(Error::Revoked { by: 0, .. })),
            "rank {r}: {x:?}"
        );
    }
}
