//! Ranks that disagree about a call: one rank passes another count, element type, op, root or
//! collective than the rest. README promises an error on every rank, so every rank must return
//! an error (none `Ok`, none hanging until its deadline), each error must lead to the rank that
//! disagreed, and the rebuilt group's next call must be exact. The disagreeing rank takes each
//! part a chain gives a rank: the root, the first rank after it, one in the middle, the last.

mod common;

use std::time::Duration;

use wccl::{CallOptions, Collective, CollectiveKind, CommGroup, DType, Error, ReduceOp, TensorRef};

const KINDS: [CollectiveKind; 6] = [
    CollectiveKind::AllReduce,
    CollectiveKind::ReduceScatter,
    CollectiveKind::AllGather,
    CollectiveKind::Broadcast,
    CollectiveKind::Reduce,
    CollectiveKind::Barrier,
];

/// The root everyone else agrees on: not rank 0, so that chain order and rank order differ.
const ROOT: usize = 1;
/// Elements per rank, not a power of two.
const COUNT: usize = 7;
/// The deadline of the disagreeing call: short, so that a rank that hangs fails by its deadline
/// (and is then caught by the check on the error kind) instead of stalling the test.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The deadline where no rank sends first (see [`starts`]): every rank must time out, so the
/// wait is the case's whole length, and a short one proves as much.
const SILENT_TIMEOUT: Duration = Duration::from_secs(1);

/// What the odd rank passes differently.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Disagreement {
    Count,
    DType,
    Op,
    Root,
    Collective(CollectiveKind),
}

/// One rank's view of the call.
#[derive(Clone, Copy, Debug)]
struct Call {
    kind: CollectiveKind,
    count: usize,
    dtype: DType,
    op: ReduceOp,
    root: usize,
}

impl Call {
    fn agreed(kind: CollectiveKind) -> Call {
        Call {
            kind,
            count: COUNT,
            dtype: DType::U32,
            op: ReduceOp::Sum,
            root: ROOT,
        }
    }

    fn with(self, d: Disagreement, n: usize) -> Call {
        match d {
            Disagreement::Count => Call { count: 10, ..self },
            Disagreement::DType => Call {
                dtype: DType::F32,
                ..self
            },
            Disagreement::Op => Call {
                op: ReduceOp::Prod,
                ..self
            },
            Disagreement::Root => Call {
                root: (self.root + 1) % n,
                ..self
            },
            Disagreement::Collective(kind) => Call { kind, ..self },
        }
    }

    /// Input and output lengths on `n` ranks.
    fn lens(&self, n: usize) -> (usize, usize) {
        match self.kind {
            CollectiveKind::ReduceScatter => (n * self.count, self.count),
            CollectiveKind::AllGather => (self.count, n * self.count),
            _ => (self.count, self.count),
        }
    }
}

/// Whether `rank` sends before it receives in its own view of the call `c`: every rank of a
/// ring, the root of a broadcast, the head (root+1) of a reduce. Every plan receives from
/// rank-1 only, so when no rank starts, no frame is ever sent.
fn starts(c: &Call, rank: usize, n: usize) -> bool {
    match c.kind {
        CollectiveKind::Broadcast => rank == c.root,
        CollectiveKind::Reduce => rank == (c.root + 1) % n,
        _ => true,
    }
}

/// Every disagreement that makes sense for `kind`.
fn disagreements(kind: CollectiveKind) -> Vec<Disagreement> {
    use CollectiveKind::*;
    let mut v = Vec::new();
    if kind != Barrier {
        v.extend([Disagreement::Count, Disagreement::DType]);
    }
    if matches!(kind, AllReduce | ReduceScatter | Reduce) {
        v.push(Disagreement::Op);
    }
    if matches!(kind, Broadcast | Reduce) {
        v.push(Disagreement::Root);
    }
    v.extend(
        KINDS
            .into_iter()
            .filter(|&k| k != kind)
            .map(Disagreement::Collective),
    );
    v
}

/// The distinct parts of the chains rooted at `ROOT` on `n` ranks: the root, the rank after it
/// (broadcast's first receiver, reduce's head), one in the middle, and the rank before it
/// (broadcast's tail, the last rank before the root in reduce).
fn positions(n: usize) -> Vec<(&'static str, usize)> {
    let mut v: Vec<(&'static str, usize)> = Vec::new();
    for (name, r) in [
        ("root", ROOT),
        ("first", (ROOT + 1) % n),
        ("middle", (ROOT + n / 2) % n),
        ("last", (ROOT + n - 1) % n),
    ] {
        if v.iter().all(|&(_, q)| q != r) {
            v.push((name, r));
        }
    }
    v
}

/// Input element `i` of rank `r`: distinct per (rank, element), period 1009 (a prime).
fn value(r: usize, i: usize) -> f64 {
    (1 + (r * 131 + i * 7) % 1009) as f64
}

/// Each rank's input (its values) and output (poisoned) buffers; `None` for a barrier.
fn buffers(group: &mut CommGroup, calls: &[Call]) -> Vec<Option<(wgpu::Buffer, wgpu::Buffer)>> {
    let n = group.size();
    (0..n)
        .map(|r| {
            let c = calls[r];
            if c.kind == CollectiveKind::Barrier {
                return None;
            }
            let (in_len, out_len) = c.lens(n);
            let input: Vec<f64> = (0..in_len).map(|i| value(r, i)).collect();
            let comm = group.comm(r);
            Some((
                common::make_buffer(comm, c.dtype, &input, 0),
                common::make_buffer(comm, c.dtype, &vec![common::poison(c.dtype); out_len], 0),
            ))
        })
        .collect()
}

fn collective<'a>(
    c: Call,
    n: usize,
    bufs: &'a Option<(wgpu::Buffer, wgpu::Buffer)>,
) -> Collective<'a> {
    let Some((i, o)) = bufs else {
        return Collective::Barrier;
    };
    let (in_len, out_len) = c.lens(n);
    let input = TensorRef::new(i, 0, in_len, c.dtype);
    let output = TensorRef::new(o, 0, out_len, c.dtype);
    match c.kind {
        CollectiveKind::AllReduce => Collective::AllReduce {
            input,
            output,
            op: c.op,
        },
        CollectiveKind::ReduceScatter => Collective::ReduceScatter {
            input,
            output,
            op: c.op,
        },
        CollectiveKind::AllGather => Collective::AllGather { input, output },
        CollectiveKind::Broadcast => Collective::Broadcast {
            input,
            output,
            root: c.root,
        },
        CollectiveKind::Reduce => Collective::Reduce {
            input,
            output,
            op: c.op,
            root: c.root,
        },
        CollectiveKind::Barrier => Collective::Barrier,
    }
}

/// Runs one call per rank (each with `opts`) and returns each rank's result.
fn run(
    group: &mut CommGroup,
    calls: &[Call],
    bufs: &[Option<(wgpu::Buffer, wgpu::Buffer)>],
    opts: CallOptions,
) -> Vec<wccl::Result<()>> {
    let n = group.size();
    let colls: Vec<Collective<'_>> = (0..n).map(|r| collective(calls[r], n, &bufs[r])).collect();
    group.run_each(|c| c.run(colls[c.rank()], opts).map(drop))
}

/// Rank `odd` calls `kind` with disagreement `d`, the others agree: every rank must fail with a
/// mismatch or with the abort of a rank that found one, and every mismatch must involve `odd`.
fn disagree(group: &mut CommGroup, kind: CollectiveKind, d: Disagreement, odd: usize, pos: &str) {
    let n = group.size();
    let agreed = Call::agreed(kind);
    let calls: Vec<Call> = (0..n)
        .map(|r| if r == odd { agreed.with(d, n) } else { agreed })
        .collect();
    let bufs = buffers(group, &calls);
    let silent = !(0..n).any(|r| starts(&calls[r], r, n));
    let timeout = if silent { SILENT_TIMEOUT } else { TIMEOUT };
    let results = run(group, &calls, &bufs, CallOptions::timeout(timeout));
    let what = format!("{kind} on {n} ranks, rank {odd} ({pos}) disagreeing on {d:?}");
    let errors: Vec<Error> = results
        .into_iter()
        .enumerate()
        .map(|(r, res)| match res {
            Ok(()) => panic!("{what}: rank {r} returned Ok"),
            Err(e) => e,
        })
        .collect();
    for (r, e) in errors.iter().enumerate() {
        let at = e.at().expect("a collective's error names its call");
        assert_eq!(
            (at.rank, at.op, at.seq),
            (r, Some(calls[r].kind), 1),
            "{what}: {e}"
        );
    }
    if silent {
        // Nobody sends first, so nobody ever hears from anyone: every rank waits for its
        // predecessor until the deadline (an MPI program like this hangs), and the first to
        // give up aborts the others.
        let timed_out: Vec<usize> = (0..n)
            .filter(|&r| matches!(errors[r], Error::Timeout { .. }))
            .collect();
        assert!(!timed_out.is_empty(), "{what}: nobody timed out");
        for (r, e) in errors.iter().enumerate() {
            let prev = (r + n - 1) % n;
            match e {
                Error::Timeout { waiting_on, .. } => {
                    assert_eq!(waiting_on, &vec![prev], "{what}: rank {r}: {e}")
                }
                Error::PeerAborted { peer, .. } => {
                    assert!(timed_out.contains(peer), "{what}: rank {r}: {e}")
                }
                other => panic!("{what}: rank {r}: {other}"),
            }
        }
        return;
    }
    let found: Vec<usize> = (0..n)
        .filter(|&r| matches!(errors[r], Error::Mismatch { .. }))
        .collect();
    assert!(!found.is_empty(), "{what}: no rank found the mismatch");
    for (r, e) in errors.iter().enumerate() {
        match e {
            // Only the odd rank's header differs, so a mismatch is seen by it or names it.
            Error::Mismatch { peer, .. } => {
                assert!(r == odd || *peer == odd, "{what}: rank {r} blames {e}")
            }
            // The abort comes from a rank that found the mismatch.
            Error::PeerAborted { peer, .. } => {
                assert!(found.contains(peer), "{what}: rank {r}: {e}")
            }
            other => panic!("{what}: rank {r}: {other}"),
        }
    }
}

/// Every rank calls `kind` alike: each output must be exact against an f64 reference.
fn exact(group: &mut CommGroup, kind: CollectiveKind) {
    exact_with(group, kind, &|_| None);
}

/// [`exact`] with each rank's call passing the algorithm `algorithm(rank)`.
fn exact_with(
    group: &mut CommGroup,
    kind: CollectiveKind,
    algorithm: &(dyn Fn(usize) -> Option<wccl::Algorithm> + Sync),
) {
    let n = group.size();
    let calls = vec![Call::agreed(kind); n];
    let bufs = buffers(group, &calls);
    let colls: Vec<Collective<'_>> = (0..n).map(|r| collective(calls[r], n, &bufs[r])).collect();
    let results = group.run_each(|c| {
        let opts = CallOptions {
            algorithm: algorithm(c.rank()),
            ..CallOptions::default()
        };
        c.run(colls[c.rank()], opts).map(drop)
    });
    for (r, res) in results.into_iter().enumerate() {
        if let Err(e) = res {
            panic!("{kind} on {n} ranks after rebuild: rank {r}: {e}");
        }
    }
    let sum = |i: usize| (0..n).map(|q| value(q, i)).sum::<f64>();
    for (r, b) in bufs.iter().enumerate() {
        let Some((_, out)) = b else { continue };
        let (_, out_len) = calls[r].lens(n);
        let got = common::read(group.comm(r), TensorRef::new(out, 0, out_len, DType::U32));
        let expected: Vec<f64> = (0..out_len)
            .map(|i| match kind {
                CollectiveKind::AllReduce => sum(i),
                CollectiveKind::ReduceScatter => sum(r * COUNT + i),
                CollectiveKind::AllGather => value(i / COUNT, i % COUNT),
                CollectiveKind::Broadcast => value(ROOT, i),
                CollectiveKind::Reduce if r == ROOT => sum(i),
                // Non-root outputs of a reduce are not written.
                _ => common::poison(DType::U32),
            })
            .collect();
        assert_eq!(got, expected, "{kind} on {n} ranks after rebuild, rank {r}");
    }
}

/// Every collective, every disagreement, the odd rank in every part of the chain; the failed
/// cases are listed together at the end (each one's message is printed as it fails).
fn every_rank_errs(n: usize) {
    let mut group = common::group(n);
    let mut failed = Vec::new();
    for kind in KINDS {
        for d in disagreements(kind) {
            for (pos, odd) in positions(n) {
                let case = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    disagree(&mut group, kind, d, odd, pos)
                }));
                if case.is_err() {
                    failed.push(format!("{kind}/{d:?}/rank {odd} ({pos})"));
                }
                group.rebuild();
                exact(&mut group, kind);
                group.rebuild();
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} cases failed: {failed:#?}",
        failed.len()
    );
}

#[test]
fn every_rank_errs_when_ranks_disagree_on_3_ranks() {
    every_rank_errs(3);
}

#[test]
fn every_rank_errs_when_ranks_disagree_on_8_ranks() {
    every_rank_errs(8);
}

/// Ranks that disagree on the algorithm (one runs halving-doubling, the others the ring, and
/// the other way round; for reduce-scatter and all-gather, one the host-staged ring, the
/// others the device ring): the algorithm is in every frame's header, so every rank fails (a
/// mismatch, the abort of a rank that found one, or the deadline where no rank reads the other
/// plan's frames), none returns Ok, and the rebuilt group's next call is exact. The staged and
/// device rings send the same frames: only the header tells them apart, and it must.
#[test]
fn every_rank_errs_when_ranks_disagree_on_the_algorithm() {
    use wccl::Algorithm::{HalvingDoubling, Ring, Staged};
    let cases = [
        (CollectiveKind::AllReduce, HalvingDoubling),
        (CollectiveKind::ReduceScatter, Staged),
        (CollectiveKind::AllGather, Staged),
    ];
    for n in [3, 4, 6] {
        let mut group = common::group(n);
        for (kind, other) in cases {
            for (mine, theirs) in [(other, Ring), (Ring, other)] {
                for odd in [0, n - 1] {
                    let what = format!(
                        "{kind:?} on {n} ranks, rank {odd} runs {mine}, the others {theirs}"
                    );
                    let calls = vec![Call::agreed(kind); n];
                    let bufs = buffers(&mut group, &calls);
                    let colls: Vec<Collective<'_>> =
                        (0..n).map(|r| collective(calls[r], n, &bufs[r])).collect();
                    let results = group.run_each(|c| {
                        let algorithm = if c.rank() == odd { mine } else { theirs };
                        let opts = CallOptions {
                            algorithm: Some(algorithm),
                            ..CallOptions::timeout(Duration::from_secs(2))
                        };
                        c.run(colls[c.rank()], opts).map(drop)
                    });
                    for (r, res) in results.iter().enumerate() {
                        match res {
                            Ok(()) => panic!("{what}: rank {r} returned Ok"),
                            Err(
                                Error::Mismatch { .. }
                                | Error::PeerAborted { .. }
                                | Error::Timeout { .. },
                            ) => {}
                            Err(e) => panic!("{what}: rank {r}: {e}"),
                        }
                    }
                    // Found by a header (a rank read a frame of the other algorithm) or, where no
                    // rank reads one (each waits on a peer the other plan does not send to), by the
                    // deadline, as the chains' root disagreements are.
                    let named = results.iter().any(|r| {
                        matches!(
                            r,
                            Err(Error::Mismatch {
                                field: "algorithm",
                                ..
                            })
                        )
                    });
                    let timed_out = results
                        .iter()
                        .any(|r| matches!(r, Err(Error::Timeout { .. })));
                    if other == Staged {
                        // The same frames both ways: every frame is read, and its header named.
                        assert!(named, "{what}: {results:?}");
                    } else {
                        assert!(named || timed_out, "{what}: {results:?}");
                    }
                    group.rebuild();
                    exact(&mut group, kind);
                    group.rebuild();
                }
            }
        }
    }
}

/// Ranks that pass different algorithms which all run reduce-scatter and all-gather as the
/// device ring (the ring, halving-doubling, naive, `Auto` without a cost model) agree: every
/// rank's result is exact, none fails.
#[test]
fn algorithms_that_all_mean_the_device_ring_agree() {
    use wccl::Algorithm::{Auto, HalvingDoubling, Naive, Ring};
    let mine = [Ring, HalvingDoubling, Auto, Naive];
    let mut group = common::group(mine.len());
    for kind in [CollectiveKind::ReduceScatter, CollectiveKind::AllGather] {
        exact_with(&mut group, kind, &|r| Some(mine[r]));
        for r in 0..mine.len() {
            assert_eq!(
                group.comm(r).last_algorithm(),
                Some(Ring),
                "{kind}, rank {r}"
            );
        }
    }
}
