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

/// An in-place sum of `buf` on `c`, with the communicator's options.
fn sum_in_place(c: &mut Communicator, buf: &wccl::DeviceBuffer<f32>) -> wccl::Result<Outcome> {
    c.run(
        Collective::AllReduce {
            input: buf.view(),
            output: buf.view(),
            op: ReduceOp::Sum,
        },
        CallOptions::default(),
    )
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
            // The root died before it sent anything (0 frames): its data is lost. After one
            // frame (over channels), the broadcast's next rank holds it whole and takes over; a reduce's root
            // may have had the whole result and told the others before it died (then the call
            // stands), or not (lost).
            let lost = match (kind, frames) {
                ("broadcast_2", 0) | ("reduce_2", 0) => Some(true),
                // Over TCP the frame may still be in flight when the root dies, and is lost with
                // it (a killed rank's frames are delivered only if they arrived): either way.
                ("broadcast_2", 1) if crate::base_stack().tcp_options().is_none() => Some(false),
                _ => None,
            };
            let any_lost = res
                .iter()
                .any(|(_, (x, _))| matches!(x, Err(Error::RootLost { .. })));
            if let Some(lost) = lost {
                assert_eq!(any_lost, lost, "{what}");
            }
            if kind.ends_with("_2") && any_lost {
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
                // Found in this call, or (a rank that had returned) in its next.
                assert!(
                    x.excluded.is_empty() || x.excluded == [2],
                    "{what}: {outcomes:?}"
                );
                assert_eq!(x.excluded.is_empty(), x.recovered_in.is_none(), "{what}");
            }
            if frames < 4 {
                // Early: nobody can have finished; every survivor found the death here.
                assert!(
                    outcomes.iter().all(|x| x.excluded == [2]),
                    "{what}: {outcomes:?}"
                );
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

/// A second death during the recovery: rank 2 of 5 dies in the call, and rank 1 right after its
/// next frame, which is its proposal to the agreement's coordinator (its frames of the call go
/// to rank 2, and frames to a dead rank are not counted). The three left agree, finish among
/// themselves, and the result is exactly theirs.
#[test]
fn a_second_death_during_the_recovery() {
    let (n, count) = (5, 999);
    let faults = FaultPlan::new();
    let mut cs = comms(n, &faults, Duration::from_secs(20));
    faults.kill_after_death_of(2, 1, 1);
    faults.kill_after(2, 3);
    let res = each(&mut cs, |c| {
        let me = c.rank();
        let buf = c.upload(&input(me, count)).expect("upload");
        let got = sum_in_place(c, &buf);
        (got, c.download(&buf).expect("download"))
    });
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
        let got = sum_in_place(c, &buf);
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
/// recover from it. Ranks 1 and 2 wait in a call rank 0 never makes; rank 0's handle revokes
/// from another thread (before or while they wait: either way the same): both report it,
/// naming rank 0, and so does rank 0's next call.
#[test]
fn a_revoke_is_not_recovered_from() {
    let faults = FaultPlan::new();
    let mut cs = comms(3, &faults, Duration::from_secs(20));
    let handle = cs[0].abort_handle();
    let mut rest = cs.split_off(1);
    let res = std::thread::scope(|s| {
        let revoker = s.spawn(|| handle.revoke("stop"));
        let res = each(&mut rest, |c| c.barrier());
        revoker.join().expect("revoker");
        res
    });
    for (r, x) in res.iter().enumerate() {
        assert!(
            matches!(x, Err(Error::Revoked { by: 0, .. })),
            "rank {}: {x:?}",
            r + 1
        );
    }
    let own = cs[0].barrier();
    assert!(matches!(own, Err(Error::Revoked { by: 0, .. })), "{own:?}");
}

/// A call that is wrong in itself is not run again without the rank that refused it: rank 1
/// passes a reduce-scatter whose input is not ranks x output; every rank fails, none excludes
/// it.
#[test]
fn a_refused_call_is_not_recovered_from() {
    let faults = FaultPlan::new();
    let mut cs = comms(3, &faults, Duration::from_secs(20));
    let res = each(&mut cs, |c| {
        let me = c.rank();
        let input = c
            .buffer::<f32>(if me == 1 { 10 } else { 9 })
            .expect("buffer");
        let output = c.buffer::<f32>(3).expect("buffer");
        c.run(
            Collective::ReduceScatter {
                input: input.view(),
                output: output.view(),
                op: ReduceOp::Sum,
            },
            CallOptions::default(),
        )
    });
    assert!(
        matches!(&res[1], Err(Error::InvalidArgument { .. })),
        "{:?}",
        res[1]
    );
    for r in [0, 2] {
        assert!(
            matches!(&res[r], Err(Error::PeerAborted { peer: 1, .. })),
            "rank {r}: {:?}",
            res[r]
        );
    }
}

/// `Avg` divides by the contributors: rank 0 of 4 dies one frame into the call, and the three
/// left get the mean of their three inputs.
#[test]
fn avg_divides_by_the_contributors() {
    let (n, count) = (4, 1001);
    let faults = FaultPlan::new();
    let mut cs = comms(n, &faults, Duration::from_secs(20));
    faults.kill_after(0, 1);
    let res = each(&mut cs, |c| {
        let me = c.rank();
        let buf = c.upload(&input(me, count)).expect("upload");
        let o = c.run(
            Collective::AllReduce {
                input: buf.view(),
                output: buf.view(),
                op: ReduceOp::Avg,
            },
            CallOptions::default(),
        );
        (o, c.download(&buf).expect("download"))
    });
    let want: Vec<f64> = sum_of(&[1, 2, 3], count).iter().map(|v| v / 3.0).collect();
    for (r, (o, got)) in res.iter().enumerate().skip(1) {
        let o = o.as_ref().unwrap_or_else(|e| panic!("rank {r}: {e}"));
        assert_eq!(o.contributors, [1, 2, 3], "rank {r}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (f64::from(*g) - w).abs() <= 1e-6 * w.abs(),
                "rank {r}, element {i}: {g} against {w}"
            );
        }
    }
}

/// A fresh device for a newcomer.
fn newcomer_device(rank: usize) -> wccl::RankDevice {
    let (device, queue) = common::user_devices(1).pop().expect("a device");
    wccl::RankDevice::from_wgpu(rank, device, queue)
}

/// Three ranks grow onto a fresh mesh of four and a newcomer joins: the newcomer is told the
/// epoch to go on in, sequence numbers start again everywhere, and an all-reduce of the four
/// is exact; then the newcomer dies two frames into the next call, and the other three finish
/// it with exactly their sum.
#[test]
fn a_newcomer_joins_and_the_four_go_on() {
    let faults = FaultPlan::new();
    let mut cs = comms(3, &faults, Duration::from_secs(20));
    let later = FaultPlan::new();
    let mesh = crate::base_stack()
        .faults(later.clone())
        .mesh(4)
        .expect("mesh");
    let mut links: Vec<Option<Box<dyn wccl::link::Link>>> = mesh.into_iter().map(Some).collect();
    let newcomer_link = links[3].take().expect("link");
    let config = CommConfig::default()
        .timeout(Duration::from_secs(20))
        .on_failure(OnFailure::FinishAmongSurvivors);
    let count = 1001;
    #[allow(clippy::type_complexity)]
    let grown: Vec<(
        usize,
        (wccl::Result<Outcome>, Vec<f32>, u64),
        (wccl::Result<Outcome>, Vec<f32>),
    )> = std::thread::scope(|s| {
        let mut hs = Vec::new();
        for mut c in cs.drain(..) {
            let link = links[c.rank()].take().expect("link");
            hs.push(s.spawn(move || {
                c.grow(link).expect("grow");
                (c, 0)
            }));
        }
        let config = config.clone();
        hs.push(s.spawn(move || {
            let c = Communicator::join(newcomer_device(3), newcomer_link, config).expect("join");
            (c, 1)
        }));
        let mut grown: Vec<Communicator> =
            hs.into_iter().map(|h| h.join().expect("rank").0).collect();
        assert!(grown.iter().all(|c| c.size() == 4 && c.seq() == 0));
        let epoch = grown[0].epoch();
        assert!(epoch > 0 && grown.iter().all(|c| c.epoch() == epoch));
        each(&mut grown, |c| {
            let me = c.rank();
            let buf = c.upload(&input(me, count)).expect("upload");
            let o = sum_in_place(c, &buf);
            let first = (o, c.download(&buf).expect("download"), c.seq());
            // The newcomer dies two frames into the next call; the others finish it.
            if me == 3 {
                later.kill_after(3, 2);
            }
            c.write(&buf, &input(me, count)).expect("write");
            let o = sum_in_place(c, &buf);
            let second = (o, c.download(&buf).expect("download"));
            (me, first, second)
        })
    });
    for (r, (o, got, seq), (o2, got2)) in &grown {
        let o = o.as_ref().unwrap_or_else(|e| panic!("rank {r}: {e}"));
        assert_eq!(o.contributors, [0, 1, 2, 3]);
        assert_eq!(*seq, 1, "rank {r}: sequence numbers start again");
        assert_exact(&format!("rank {r}"), got, &sum_of(&[0, 1, 2, 3], count));
        if *r == 3 {
            continue;
        }
        let o2 = o2
            .as_ref()
            .unwrap_or_else(|e| panic!("rank {r}: second call: {e}"));
        assert_eq!(
            (&o2.contributors[..], &o2.excluded[..]),
            (&[0, 1, 2][..], &[3][..])
        );
        assert_exact(
            &format!("rank {r}, second call"),
            got2,
            &sum_of(&[0, 1, 2], count),
        );
    }
}

/// A grow the ranks disagree on is refused on every rank, and the members' communicator is left
/// as it was: a newcomer that takes a member's number, and a link that does not give a member
/// its number.
#[test]
fn a_grow_that_does_not_add_up_is_refused_and_changes_nothing() {
    let faults = FaultPlan::new();
    let mut cs = comms(3, &faults, Duration::from_secs(5));
    // Not this rank's number, or not larger: refused before anything is sent.
    let mut wrong = LinkStack::new().mesh(4).expect("mesh");
    let e = cs[1]
        .grow(wrong.remove(2))
        .expect_err("another rank's link");
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    let e = cs[1]
        .grow(LinkStack::new().mesh(3).expect("mesh").remove(1))
        .expect_err("not larger");
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    // Members 0 and 1 grow; a newcomer takes member 2's number, another joins as rank 3.
    let mesh = LinkStack::new().mesh(4).expect("mesh");
    let mut links: Vec<Option<Box<dyn wccl::link::Link>>> = mesh.into_iter().map(Some).collect();
    let config = CommConfig::default().timeout(Duration::from_secs(5));
    let results: Vec<wccl::Result<()>> = std::thread::scope(|s| {
        let mut hs = Vec::new();
        for c in cs.iter_mut().take(2) {
            let link = links[c.rank()].take().expect("link");
            hs.push(s.spawn(move || c.grow(link)));
        }
        for r in [2, 3] {
            let (link, config) = (links[r].take().expect("link"), config.clone());
            hs.push(
                s.spawn(move || Communicator::join(newcomer_device(r), link, config).map(drop)),
            );
        }
        hs.into_iter().map(|h| h.join().expect("rank")).collect()
    });
    for (i, x) in results.iter().enumerate() {
        assert!(
            matches!(x, Err(Error::Connect { message, .. }) if message.contains("rank 2")),
            "{i}: {x:?}"
        );
    }
    // Unchanged: the three members still all-reduce among themselves.
    let got = each(&mut cs, |c| {
        assert_eq!(c.size(), 3);
        let buf = c.upload(&input(c.rank(), 10)).expect("upload");
        c.all_reduce(&buf, ReduceOp::Sum).expect("all_reduce");
        c.download(&buf).expect("download")
    });
    for (r, g) in got.iter().enumerate() {
        assert_exact(&format!("rank {r}"), g, &sum_of(&[0, 1, 2], 10));
    }
}

/// A second death while the survivors run an all-gather again: rank 2 of 5 dies one frame into
/// the call, and rank 1 after `k` more frames (its proposal, its relays of the decision, then
/// the frames of the second try: its data, then its commit round). Whichever try it dies in,
/// the three left agree on one result, every block of a contributor holds that rank's input
/// and every other block is zero.
#[test]
fn a_second_death_during_an_all_gather_run_again() {
    let (n, c) = (5, 301);
    for k in 3..=9 {
        let faults = FaultPlan::new();
        let mut cs = comms(n, &faults, Duration::from_secs(20));
        faults.kill_after_death_of(2, 1, k);
        faults.kill_after(2, 1);
        let res = each(&mut cs, |comm| {
            let me = comm.rank();
            let input = comm.upload(&input(me, c)).expect("upload");
            let output = comm.upload(&vec![f32::NAN; n * c]).expect("upload");
            let o = comm.run(
                Collective::AllGather {
                    input: input.view(),
                    output: output.view(),
                },
                CallOptions::default(),
            );
            let got = comm.download(&output).expect("download");
            // Go on, as a training loop does: a rank that returned before the second death
            // joins the recovery from its next call.
            if o.is_ok() && me != 1 && me != 2 {
                let next = comm.barrier();
                assert!(next.is_ok(), "k {k}: rank {me}: next call: {next:?}");
            }
            (o, got)
        });
        let what = format!("rank 1 dead {k} frames after rank 2");
        let first = res[0].0.as_ref().map(|o| o.contributors.clone()).ok();
        for r in [0, 3, 4] {
            let (o, got) = &res[r];
            let o = o
                .as_ref()
                .unwrap_or_else(|e| panic!("{what}: rank {r}: {e}"));
            assert_eq!(Some(&o.contributors), first.as_ref(), "{what}: rank {r}");
            let want: Vec<f64> = (0..n)
                .flat_map(|b| {
                    let present = o.contributors.contains(&b);
                    input(b, c)
                        .into_iter()
                        .map(move |v| if present { f64::from(v) } else { 0.0 })
                })
                .collect();
            assert_exact(&format!("{what}: rank {r}"), got, &want);
        }
    }
}

/// `CommGroup::recover`, the group's wrapper over every rank's `recover`: rank 1 of 4 is killed,
/// the group's call fails, and the group goes on with the three others, renumbered, exactly.
#[test]
fn a_group_recovers_as_its_ranks_do() {
    let faults = FaultPlan::new();
    let mut g = common::group_linked(
        4,
        CommConfig::default().timeout(Duration::from_secs(20)),
        crate::base_stack().faults(faults.clone()),
    );
    faults.kill(1);
    let bufs: Vec<_> = (0..4)
        .map(|r| g.comm(r).upload(&input(r, 101)).expect("upload"))
        .collect();
    let views: Vec<_> = bufs.iter().map(|b| b.view()).collect();
    assert!(g.all_reduce(&views, ReduceOp::Sum).is_err());
    assert_eq!(g.recover().expect("recover"), [1]);
    assert_eq!(g.size(), 3);
    let bufs: Vec<_> = [0usize, 2, 3]
        .iter()
        .enumerate()
        .map(|(r, &old)| g.comm(r).upload(&input(old, 101)).expect("upload"))
        .collect();
    let views: Vec<_> = bufs.iter().map(|b| b.view()).collect();
    g.all_reduce(&views, ReduceOp::Sum)
        .expect("all_reduce among three");
    for (r, b) in bufs.iter().enumerate() {
        let got = g.comm(r).download(b).expect("download");
        assert_exact(&format!("rank {r}"), &got, &sum_of(&[0, 2, 3], 101));
    }
}
