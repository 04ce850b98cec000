//! One trial of the campaign: a fresh group, one fault, one call on every rank, and every
//! rank's result judged against an f64 reference of exactly the ranks it says it holds.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::Rng;

use super::blame::blamed;
use super::{Fault, Plant, Target};
use crate::link::{FaultPlan, LinkStack};
use crate::{
    CallOptions, Collective, CommConfig, CommGroup, Communicator, DeviceBuffer, Error, OnFailure,
    Outcome, ReduceOp,
};

/// What happened in one trial.
#[derive(Debug, Clone)]
pub struct TrialResult {
    /// The trial's index in the campaign.
    pub index: usize,
    /// The call the fault hit.
    pub target: Target,
    /// The fault.
    pub fault: Fault,
    /// Ranks in the group.
    pub ranks: usize,
    /// The faulty rank (for a partition: a rank of the side cut off, which may be the larger).
    pub victim: usize,
    /// Whether the fault touched anything (a frame dropped, corrupted or duplicated, a rank
    /// killed, a rank late): a drop on a pair that carried no frame did not.
    pub fired: bool,
    /// The trial's verdict.
    pub verdict: Verdict,
    /// For each rank other than a killed one that returned an error: whether the error named
    /// the fault's rank(s).
    pub named: Vec<bool>,
    /// For each such error: the time from the fault taking effect (the kill, or the call's
    /// start) to the return.
    pub detection: Vec<Duration>,
    /// Recoveries reported by the ranks that finished among survivors.
    pub recoveries: Vec<Duration>,
    /// The slowest rank's return, from the call's start.
    pub slowest: Duration,
}

/// A trial's verdict; only the last two fail the campaign.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Every rank returned the right result (the fault cost nothing, or was recovered from).
    Correct,
    /// At least one rank returned an error; every result returned was right.
    Detected,
    /// A rank returned success with a wrong element.
    SilentlyWrong {
        /// The rank.
        rank: usize,
        /// The first wrong element's index, what it held and what it should have.
        index: usize,
        /// What the rank's output held there.
        got: f64,
        /// What the reference holds.
        want: f64,
    },
    /// A rank had not returned when the watchdog gave up on it.
    Hang {
        /// The ranks that had not returned.
        ranks: Vec<usize>,
    },
}

/// Distinct per (rank, element), period 997 (not a power of two), integers, so that f32 sums
/// of a few ranks are exact.
fn input(rank: usize, count: usize) -> Vec<f32> {
    (0..count)
        .map(|i| ((rank * 1009 + i * 7) % 997) as f32 + 1000.0 * rank as f32)
        .collect()
}

/// A value no correct output holds (the inputs are non-negative).
const POISON: f32 = -12_345.0;

/// One rank's part in a trial, returned by its thread.
struct RankResult {
    rank: usize,
    result: Result<Outcome, Error>,
    output: Option<Vec<f32>>,
    returned: Instant,
}

/// The settings one trial needs from the campaign.
pub(super) struct Setup {
    pub index: usize,
    pub target: Target,
    pub fault: Fault,
    pub deadline: Duration,
    pub plant: Option<Plant>,
}

/// Runs one trial; `Err` only for a group that could not be built.
pub(super) fn run(setup: &Setup, rng: &mut impl Rng) -> Result<TrialResult, Error> {
    let Setup {
        target,
        fault,
        deadline,
        ..
    } = *setup;
    let n = rng.random_range(3..=5usize);
    let block = rng.random_range(1..=1500usize);
    let in_place = rng.random_bool(0.5) && target.in_place_allowed();
    let root = rng.random_range(0..n);
    let victim = rng.random_range(0..n);
    let plan = FaultPlan::new();
    let on_failure = if target == Target::SurvivingRing {
        OnFailure::FinishAmongSurvivors
    } else {
        OnFailure::Error
    };
    let group = CommGroup::builder()
        .ranks(n)
        .config(
            CommConfig::default()
                .timeout(deadline)
                .on_failure(on_failure),
        )
        .links(LinkStack::new().faults(plan.clone()))
        .build()?;
    let comms = group.into_communicators();
    let (in_len, out_len) = target.lengths(block, n);
    let inputs: Vec<Vec<f32>> = (0..n).map(|r| input(r, in_len)).collect();

    // The fault, armed before the call: what it does happens inside it.
    let peer = (victim + 1 + rng.random_range(0..n - 1)) % n; // any rank but the victim
    let next = (victim + 1) % n; // the ring's successor: where the ring's frames go
    let to = if rng.random_bool(0.5) { next } else { peer };
    let mut late = Duration::ZERO;
    let mut cut: Vec<usize> = vec![victim];
    match fault {
        Fault::Kill => plan.kill_after(victim, rng.random_range(0..8)),
        Fault::Stall => late = deadline.saturating_mul(3) / 2,
        Fault::Slow => late = deadline / 4,
        Fault::Delay => plan.delay(victim, deadline / 40),
        Fault::Drop => plan.drop_next(victim, to, 1),
        Fault::Duplicate => plan.duplicate_next(victim, to, 1),
        Fault::Corrupt => plan.corrupt_next(victim, to, 1),
        Fault::Partition => {
            // The victim alone, or the victim and its successor: a minority or (of 4) a tie.
            if rng.random_bool(0.5) {
                cut.push(next);
            }
            let rest: Vec<usize> = (0..n).filter(|r| !cut.contains(r)).collect();
            plan.partition(&[&cut, &rest]);
        }
    }

    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    for (rank, comm) in comms.into_iter().enumerate() {
        let tx = tx.clone();
        let data = inputs[rank].clone();
        let wait = if rank == victim { late } else { Duration::ZERO };
        // Not scoped: a rank that hangs must not hang the campaign; the watchdog below gives
        // up on it and the process exits with the verdict.
        std::thread::spawn(move || {
            let r = one_rank(comm, rank, &data, out_len, in_place, target, root, wait);
            // The campaign may have given up on this rank already; nothing to tell then.
            let _ = tx.send(r);
        });
    }
    drop(tx);
    // Every rank returns within its call's deadline, a recovery's agreements and the stall;
    // this is far past all of them, so that a loaded machine is not taken for a hang.
    let watchdog = deadline.saturating_mul(8) + late + Duration::from_secs(5);
    let give_up = crate::deadline::deadline_after(watchdog);
    let mut results: Vec<RankResult> = Vec::with_capacity(n);
    while results.len() < n {
        let left = give_up.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(r) => results.push(r),
            Err(_) => break,
        }
    }
    let fired = match fault {
        Fault::Kill => plan.is_killed(victim),
        Fault::Stall | Fault::Slow | Fault::Partition | Fault::Delay => true,
        Fault::Drop => plan.dropped() > 0,
        Fault::Duplicate => plan.duplicated() > 0,
        Fault::Corrupt => plan.corrupted() > 0,
    };
    let mut trial = TrialResult {
        index: setup.index,
        target,
        fault,
        ranks: n,
        victim,
        fired,
        verdict: Verdict::Correct,
        named: Vec::new(),
        detection: Vec::new(),
        recoveries: Vec::new(),
        slowest: results
            .iter()
            .map(|r| r.returned.saturating_duration_since(start))
            .max()
            .unwrap_or_default(),
    };
    if results.len() < n {
        let mut missing: Vec<usize> = (0..n)
            .filter(|r| !results.iter().any(|x| x.rank == *r))
            .collect();
        missing.sort_unstable();
        trial.verdict = Verdict::Hang { ranks: missing };
        return Ok(trial);
    }
    results.sort_by_key(|r| r.rank);
    let killed_at = plan.killed_at(victim);
    let mut erred = false;
    for r in &mut results {
        if killed_at.is_some() && r.rank == victim {
            continue; // a dead process reports nothing
        }
        plant(setup.plant, r, out_len);
        match &r.result {
            Err(e) => {
                erred = true;
                let named = blamed(e);
                // The fault's rank; across a partition, any rank of the other side.
                let culprits: Vec<usize> = match fault {
                    Fault::Partition if cut.contains(&r.rank) => {
                        (0..n).filter(|x| !cut.contains(x)).collect()
                    }
                    Fault::Partition => cut.clone(),
                    _ => vec![victim],
                };
                trial.named.push(culprits.iter().any(|c| named.contains(c)));
                // From the kill; else from the call's start, or for the stalled rank itself
                // from its late arrival (its lateness is the fault, not its detection).
                let from = match (killed_at, fault) {
                    (Some(t), _) => t,
                    (None, Fault::Stall) if r.rank == victim => {
                        start.checked_add(late).unwrap_or(start)
                    }
                    _ => start,
                };
                trial
                    .detection
                    .push(r.returned.saturating_duration_since(from));
            }
            Ok(outcome) => {
                if let Some(d) = outcome.recovered_in {
                    trial.recoveries.push(d);
                }
                let want = target.reference(&inputs, &outcome.contributors, r.rank, root, n);
                let got = r.output.as_deref().unwrap_or_default();
                if let Some(v) = first_wrong(got, want.as_deref()) {
                    trial.verdict = Verdict::SilentlyWrong {
                        rank: r.rank,
                        index: v.0,
                        got: v.1,
                        want: v.2,
                    };
                    return Ok(trial);
                }
            }
        }
    }
    if erred {
        trial.verdict = Verdict::Detected;
    }
    Ok(trial)
}

/// A bug planted in what the ranks returned, to show that the checks catch it.
fn plant(plant: Option<Plant>, r: &mut RankResult, out_len: usize) {
    match plant {
        // An error swallowed: the call "succeeds" with whatever the output holds.
        Some(Plant::Unreported) if r.result.is_err() => {
            r.result = Ok(Outcome {
                contributors: Vec::new(),
                excluded: Vec::new(),
                skipped: Vec::new(),
                recovered_in: None,
            });
            r.output = Some(r.output.take().unwrap_or_else(|| vec![POISON; out_len]));
        }
        // One element of a successful result changed.
        Some(Plant::WrongElement) => {
            if let (Ok(_), Some(out)) = (&r.result, r.output.as_mut())
                && let Some(x) = out.first_mut()
            {
                *x += 1.0;
            }
        }
        _ => {}
    }
}

/// The first element where `got` differs from `want` (`None` for `want`: nothing to check).
fn first_wrong(got: &[f32], want: Option<&[f64]>) -> Option<(usize, f64, f64)> {
    let want = want?;
    if got.len() != want.len() {
        return Some((got.len().min(want.len()), f64::NAN, f64::NAN));
    }
    got.iter()
        .zip(want)
        .enumerate()
        .find(|(_, (g, w))| f64::from(**g) != **w)
        .map(|(i, (g, w))| (i, f64::from(*g), *w))
}

/// One rank's call: waits `late` first (a stalled or slow rank), runs the call, reads its
/// output back.
#[allow(clippy::too_many_arguments)]
fn one_rank(
    mut comm: Communicator,
    rank: usize,
    data: &[f32],
    out_len: usize,
    in_place: bool,
    target: Target,
    root: usize,
    late: Duration,
) -> RankResult {
    let fail = |e: Error| RankResult {
        rank,
        result: Err(e),
        output: None,
        returned: Instant::now(),
    };
    let input = match comm.upload(data) {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    let output: DeviceBuffer<f32> = match comm.upload(&vec![POISON; out_len]) {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    if !late.is_zero() {
        // The fault itself: this rank comes to the call late (a stalled or slow process).
        std::thread::sleep(late);
    }
    let out = if in_place { &input } else { &output };
    let call = match target {
        Target::RingFailStop | Target::SurvivingRing => Collective::AllReduce {
            input: input.view(),
            output: out.view(),
            op: ReduceOp::Sum,
        },
        Target::ReduceScatter => Collective::ReduceScatter {
            input: input.view(),
            output: output.view(),
            op: ReduceOp::Sum,
        },
        Target::AllGather => Collective::AllGather {
            input: input.view(),
            output: output.view(),
        },
        Target::Broadcast => Collective::Broadcast {
            input: input.view(),
            output: out.view(),
            root,
        },
        Target::Reduce => Collective::Reduce {
            input: input.view(),
            output: out.view(),
            op: ReduceOp::Sum,
            root,
        },
    };
    let result = comm.run(call, CallOptions::default());
    let returned = Instant::now();
    // Read back after an error too: a planted bug that swallows the error is judged on it.
    let output = comm.download(out).ok();
    RankResult {
        rank,
        result,
        output,
        returned,
    }
}

impl Target {
    /// Whether the call may run in place (reduce-scatter and all-gather have outputs of another
    /// length).
    fn in_place_allowed(self) -> bool {
        !matches!(self, Target::ReduceScatter | Target::AllGather)
    }

    /// Input and output lengths for a block of `block` elements per rank.
    fn lengths(self, block: usize, n: usize) -> (usize, usize) {
        match self {
            Target::ReduceScatter => (block.saturating_mul(n), block),
            Target::AllGather => (block, block.saturating_mul(n)),
            _ => (block, block),
        }
    }

    /// What `rank`'s output must hold when its call returned success naming `contributors`
    /// (`None`: nothing to check, as a reduce's non-root output).
    fn reference(
        self,
        inputs: &[Vec<f32>],
        contributors: &[usize],
        rank: usize,
        root: usize,
        n: usize,
    ) -> Option<Vec<f64>> {
        let sum = |range: std::ops::Range<usize>| -> Vec<f64> {
            range
                .map(|i| contributors.iter().map(|&c| f64::from(inputs[c][i])).sum())
                .collect()
        };
        let block = inputs.first().map_or(0, Vec::len);
        match self {
            Target::RingFailStop | Target::SurvivingRing => Some(sum(0..block)),
            Target::ReduceScatter => {
                let b = block / n;
                Some(sum(rank * b..(rank + 1) * b))
            }
            Target::AllGather => Some(
                (0..n)
                    .flat_map(|r| inputs[r].iter().map(|&x| f64::from(x)))
                    .collect(),
            ),
            Target::Broadcast => Some(inputs[root].iter().map(|&x| f64::from(x)).collect()),
            Target::Reduce => (rank == root).then(|| sum(0..block)),
        }
    }
}
