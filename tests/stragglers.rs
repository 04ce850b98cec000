//! `CallOptions::skip_after`: an all-reduce among the ranks that arrive in time, the late ones
//! skipped (their outputs untouched) and back in the first call they reach in time; every
//! result checked against the f64 sum of exactly the ranks the `Outcome` names.

mod common;

use std::time::Duration;

use wccl::{CallOptions, Collective, CommConfig, Communicator, Error, ReduceOp};

fn input(rank: usize, count: usize) -> Vec<f32> {
    (0..count)
        .map(|i| ((rank * 1009 + i * 7) % 997) as f32 + 1000.0 * rank as f32)
        .collect()
}

fn sum_of(ranks: &[usize], count: usize) -> Vec<f32> {
    (0..count)
        .map(|i| {
            ranks
                .iter()
                .map(|&r| f64::from(input(r, count)[i]))
                .sum::<f64>() as f32
        })
        .collect()
}

fn all_reduce(
    c: &mut Communicator,
    count: usize,
    opts: CallOptions,
) -> (wccl::Result<wccl::Outcome>, Vec<f32>) {
    let me = c.rank();
    let input = c.upload(&input(me, count)).expect("upload");
    let output = c.upload(&vec![f32::NAN; count]).expect("upload");
    let o = c.run(
        Collective::AllReduce {
            input: input.view(),
            output: output.view(),
            op: ReduceOp::Sum,
        },
        opts,
    );
    (o, c.download(&output).expect("download"))
}

/// Rank 3 of 4 enters the first call only once rank 0 has returned from it (so, certainly
/// late), and rank 0 only once ranks 1 and 2 are entering it, with a window of 2 s for them: rank
/// 3 is skipped, its output untouched, and the three others hold exactly their sum. The second
/// call is a plain one, in which rank 0 reads from rank 3 past its late arrival: all four hold
/// the sum. In the third, skipping again, rank 0 waits long enough: all four are in.
#[test]
fn a_late_rank_is_skipped_then_back() {
    let (n, count) = (4, 1001);
    let comms = common::group_with(n, CommConfig::default().timeout(Duration::from_secs(30)))
        .into_communicators();
    let (done_tx, done_rx) = crossbeam::channel::bounded::<()>(1);
    let (in_tx, in_rx) = crossbeam::channel::bounded::<()>(2);
    let res: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                let (done_tx, done_rx) = (done_tx.clone(), done_rx.clone());
                let (in_tx, in_rx) = (in_tx.clone(), in_rx.clone());
                s.spawn(move || {
                    let me = c.rank();
                    match me {
                        0 => {
                            for _ in 0..2 {
                                in_rx
                                    .recv_timeout(Duration::from_secs(60))
                                    .expect("ranks 1 and 2 enter the first call");
                            }
                        }
                        3 => {
                            done_rx
                                .recv_timeout(Duration::from_secs(60))
                                .expect("rank 0 finished the first call");
                        }
                        _ => in_tx.send(()).expect("signal"),
                    }
                    let first = all_reduce(
                        &mut c,
                        count,
                        CallOptions::default().skip_after(Duration::from_secs(2)),
                    );
                    if me == 0 {
                        done_tx.send(()).expect("signal");
                    }
                    let second = all_reduce(&mut c, count, CallOptions::default());
                    let third = all_reduce(
                        &mut c,
                        count,
                        CallOptions::default().skip_after(Duration::from_secs(20)),
                    );
                    (first, second, third)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("rank")).collect()
    });
    for (r, ((o1, got1), (o2, got2), (o3, got3))) in res.iter().enumerate() {
        let o1 = o1.as_ref().unwrap_or_else(|e| panic!("rank {r}: {e}"));
        assert_eq!(
            (&o1.contributors[..], &o1.skipped[..]),
            (&[0, 1, 2][..], &[3][..])
        );
        if r == 3 {
            assert!(
                got1.iter().all(|v| v.is_nan()),
                "the skipped rank's output was written"
            );
        } else {
            assert_eq!(got1, &sum_of(&[0, 1, 2], count), "rank {r}, first call");
        }
        for (o, got, call) in [(o2, got2, "second"), (o3, got3, "third")] {
            let o = o
                .as_ref()
                .unwrap_or_else(|e| panic!("rank {r}, {call} call: {e}"));
            assert_eq!(o.contributors, [0, 1, 2, 3], "rank {r}, {call} call");
            assert!(o.skipped.is_empty(), "rank {r}, {call} call");
            assert_eq!(got, &sum_of(&[0, 1, 2, 3], count), "rank {r}, {call} call");
        }
    }
}

/// Ranks that disagree on skipping (rank 1 runs a plain all-reduce, the others skip after
/// 100 ms): rank 1 fails with an error (it reads rank 0's decision as a frame of its call), none
/// hangs, and a rank that returns holds exactly the sum of the ranks its outcome names (the
/// others may finish among themselves before rank 1's abort reaches them). And skip_after on
/// another collective is refused on that rank and reported to the others.
#[test]
fn disagreeing_on_skipping_is_an_error_everywhere() {
    let n = 4;
    let mut comms = common::group_with(n, CommConfig::default().timeout(Duration::from_secs(10)))
        .into_communicators();
    let res: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter_mut()
            .map(|c| {
                s.spawn(move || {
                    let opts = if c.rank() == 1 {
                        CallOptions::default()
                    } else {
                        CallOptions::default().skip_after(Duration::from_millis(100))
                    };
                    all_reduce(c, 10, opts)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank"))
            .collect::<Vec<_>>()
    });
    assert!(res[1].0.is_err(), "rank 1: {:?}", res[1].0);
    for (r, (x, got)) in res.iter().enumerate() {
        if let Ok(o) = x {
            assert_eq!(got, &sum_of(&o.contributors, 10), "rank {r}: {o:?}");
        }
    }
    let mut comms = common::group_with(3, CommConfig::default().timeout(Duration::from_secs(10)))
        .into_communicators();
    let res: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter_mut()
            .map(|c| {
                s.spawn(move || {
                    if c.rank() == 1 {
                        c.run(
                            Collective::Barrier,
                            CallOptions::default().skip_after(Duration::from_millis(1)),
                        )
                        .map(drop)
                    } else {
                        c.barrier()
                    }
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank"))
            .collect::<Vec<_>>()
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

/// The other way round: rank 2 of 3 skips, ranks 0 and 1 do not. Rank 0 reads rank 2's
/// arrival for this very call where a ring frame belongs: a disagreement, reported at once
/// (not a wait to the deadline), and every rank fails.
#[test]
fn a_skipping_rank_among_plain_ones_is_a_disagreement_at_once() {
    let mut comms = common::group_with(3, CommConfig::default().timeout(Duration::from_secs(60)))
        .into_communicators();
    let res: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter_mut()
            .map(|c| {
                s.spawn(move || {
                    let opts = if c.rank() == 2 {
                        CallOptions::default().skip_after(Duration::from_millis(100))
                    } else {
                        CallOptions::default()
                    };
                    all_reduce(c, 10, opts).0
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank"))
            .collect::<Vec<_>>()
    });
    for (r, x) in res.iter().enumerate() {
        assert!(
            matches!(x, Err(e) if !matches!(e, Error::Timeout { .. })),
            "rank {r}: {x:?}"
        );
    }
    assert!(
        matches!(
            &res[0],
            Err(Error::Mismatch {
                field: "skip_after",
                ..
            })
        ),
        "{:?}",
        res[0]
    );
}
