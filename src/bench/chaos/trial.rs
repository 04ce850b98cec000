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
    /// Returns of the faulty call, success or error, and how many came later than the
    /// deadline plus 10% after the rank could start (for a call finishing among survivors, two
    /// deadlines plus 10%: the deadline, then the agreement's).
    pub returns: usize,
    /// See [`returns`](Self::returns).
    pub late_returns: usize,
    /// Whether the follow-up call (fault-free, faults healed, dead ranks still dead) succeeded
    /// on some rank (`Some(true)`), failed on every rank (`Some(false)`), or did not run.
    pub follow_up_ok: Option<bool>,
    /// Parameter server under `Strong`: acknowledged updates lost silently (a key off the
    /// reference after every worker finished with every push applied).
    pub lost_acknowledged: u64,
    /// Parameter server under `Strong`: workers told `Error::Lost` (a head that committed
    /// alone died).
    pub lost_reported: u64,
    /// Parameter server under `Eventual`: updates lost (the workers' counts, and keys off the
    /// reference), the CAP choice rather than a failure.
    pub lost_eventual: u64,
    /// Parameter server: whether the final parameters were checked against the reference of
    /// every push (not when a worker failed, a live server failed, or a push came after its
    /// step's update and was answered without being applied).
    pub verified: bool,
}

/// A trial's verdict; every one but the first two fails the campaign.
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
        /// Which call: 1 the faulty one, 2 the follow-up.
        call: u8,
        /// The first wrong element's index.
        index: usize,
        /// What the rank's output held there.
        got: f64,
        /// What the reference holds.
        want: f64,
    },
    /// Ranks returned success with outcomes that cannot all be true: a fail-stop call that
    /// left a rank out, survivors that disagree on who contributed, a minority that went on.
    Inconsistent {
        /// Which call: 1 the faulty one, 2 the follow-up.
        call: u8,
        /// What is wrong.
        why: String,
    },
    /// A rank had not returned when the watchdog gave up on it.
    Hang {
        /// Which call: 1 the faulty one, 2 the follow-up.
        call: u8,
        /// The ranks that had not returned.
        ranks: Vec<usize>,
    },
    /// Acknowledged parameter-server updates lost under `Strong`.
    LostUpdate {
        /// How many losses were seen (workers told, keys off the reference).
        count: u64,
    },
    /// A rank's thread panicked.
    Panicked {
        /// The rank.
        rank: usize,
    },
}

impl TrialResult {
    /// A trial of `setup` on `n` ranks hitting `victim`, before anything is judged.
    pub(super) fn new(setup: &Setup, n: usize, victim: usize) -> Self {
        TrialResult {
            index: setup.index,
            target: setup.target,
            fault: setup.fault,
            ranks: n,
            victim,
            fired: false,
            verdict: Verdict::Correct,
            named: Vec::new(),
            detection: Vec::new(),
            recoveries: Vec::new(),
            returns: 0,
            late_returns: 0,
            follow_up_ok: None,
            lost_acknowledged: 0,
            lost_reported: 0,
            lost_eventual: 0,
            verified: false,
        }
    }
}

/// Whether `fault` touched anything by now (`victim`: the rank it was armed on).
pub(super) fn fired(fault: Fault, plan: &FaultPlan, victim: usize) -> bool {
    match fault {
        Fault::Kill => plan.is_killed(victim),
        Fault::Stall | Fault::Slow | Fault::Partition | Fault::Delay => true,
        Fault::Drop => plan.dropped() > 0,
        Fault::Duplicate => plan.duplicated() > 0,
        Fault::Corrupt => plan.corrupted() > 0,
    }
}

impl Verdict {
    /// Whether this verdict fails the campaign.
    pub fn fails(&self) -> bool {
        !matches!(self, Verdict::Correct | Verdict::Detected)
    }
}

/// Distinct per (rank, element) over the whole buffer (`rank * len + i`), integers whose sums
/// over 5 ranks stay exact in f32 (below 2^24), offset per call.
fn input(rank: usize, len: usize, call: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (rank * len + i + 1 + call * 1_000_000) as f32)
        .collect()
}

/// A value no correct output holds (the inputs are positive).
const POISON: f32 = -12_345.0;

/// The follow-up call's length (an all-reduce, out of place).
const FOLLOW_UP_LEN: usize = 257;

/// One rank's result of one call, returned by its thread.
struct RankResult {
    rank: usize,
    result: Result<Outcome, Error>,
    output: Option<Vec<f32>>,
    returned: Instant,
}

/// What a rank's thread reports.
enum Report {
    First(RankResult),
    Second(RankResult),
    Panicked(usize),
    /// The rank's communicator, and with it its device, is gone: its last report.
    Gone,
}

/// The ranks' threads of one trial: their reports, and their go-ahead for the follow-up.
/// Dropped at the end of the trial, it withholds the go-ahead from those still waiting and
/// waits (with a deadline) until every rank's device is torn down, so that no trial's devices
/// outlive it into the next: on OpenGL, a device torn down on one thread while the next
/// trial's are used on others ended in `BadDisplay` and a corrupted heap.
struct Ranks {
    rx: mpsc::Receiver<Report>,
    go: Vec<mpsc::Sender<()>>,
    /// The ranks' threads, joined once they have ended (see [`super::join_ended`]).
    threads: Vec<std::thread::JoinHandle<()>>,
    n: usize,
    gone: std::cell::Cell<usize>,
    within: Duration,
}

impl Drop for Ranks {
    fn drop(&mut self) {
        self.go.clear();
        let give_up = crate::deadline::deadline_after(self.within);
        while self.gone.get() < self.n {
            let left = give_up.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(Report::Gone) => self.gone.set(self.gone.get() + 1),
                Ok(_) => {}
                // Past the deadline (a hung rank: the campaign stops) or every thread gone.
                Err(_) => break,
            }
        }
        super::join_ended(std::mem::take(&mut self.threads), give_up);
    }
}

/// The settings one trial needs from the campaign.
pub(super) struct Setup {
    pub index: usize,
    pub target: Target,
    pub fault: Fault,
    pub deadline: Duration,
    pub plant: Option<Plant>,
}

/// One rank's two calls, as its thread runs them.
struct RankJob {
    rank: usize,
    comm: Communicator,
    data: Vec<f32>,
    out_len: usize,
    in_place: bool,
    target: Target,
    root: usize,
    late: Duration,
}

/// Runs one trial; `Err` only for a group that could not be built or a thread that could not
/// be started.
pub(super) fn run(setup: &Setup, rng: &mut impl Rng) -> Result<TrialResult, Error> {
    let Setup {
        target,
        fault,
        deadline,
        ..
    } = *setup;
    if matches!(target, Target::PsStrong | Target::PsEventual) {
        return super::ps::run(setup, rng);
    }
    let n = rng.random_range(3..=5usize);
    let block = rng.random_range(1..=1500usize);
    let in_place = rng.random_bool(0.5) && target.in_place_allowed();
    let root = rng.random_range(0..n);
    let victim = rng.random_range(0..n);
    let plan = FaultPlan::new();
    let survivors = target == Target::SurvivingRing;
    let on_failure = if survivors {
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
    let inputs: Vec<Vec<f32>> = (0..n).map(|r| input(r, in_len, 0)).collect();

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
    let mut go = Vec::with_capacity(n);
    let mut threads = Vec::with_capacity(n);
    let start = Instant::now();
    for (rank, comm) in comms.into_iter().enumerate() {
        let tx = tx.clone();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        go.push(go_tx);
        let job = RankJob {
            rank,
            comm,
            data: inputs[rank].clone(),
            out_len,
            in_place,
            target,
            root,
            late: if rank == victim { late } else { Duration::ZERO },
        };
        let wait_for_go = watchdog(deadline, late);
        // Not scoped: a rank that hangs must not hang the campaign; the watchdog below gives
        // up on it and the campaign stops with the verdict.
        let thread = std::thread::Builder::new()
            .name(format!("chaos rank {rank}"))
            .spawn(move || rank_thread(job, &tx, &go_rx, wait_for_go))
            .map_err(|e| Error::InvalidArgument {
                at: crate::At::rank(rank),
                message: format!("cannot start the rank's thread: {e}"),
            })?;
        threads.push(thread);
    }
    drop(tx);
    let ranks = Ranks {
        rx,
        go,
        threads,
        n,
        gone: std::cell::Cell::new(0),
        within: watchdog(deadline, late),
    };
    let fired = |plan: &FaultPlan| fired(fault, plan, victim);
    let mut trial = TrialResult::new(setup, n, victim);
    let mut results = match collect(&ranks, watchdog(deadline, late), 1) {
        Ok(r) => r,
        Err(v) => {
            trial.fired = fired(&plan);
            trial.verdict = v;
            return Ok(trial);
        }
    };
    trial.fired = fired(&plan);
    let killed_at = plan.killed_at(victim);
    // Every rank may start at the call's start but the late one, at its arrival.
    let bound = |rank: usize| {
        let rounds = if survivors { 2.2 } else { 1.1 };
        let from = if rank == victim { late } else { Duration::ZERO };
        from.saturating_add(deadline.mul_f64(rounds))
    };
    let mut erred = false;
    let mut oks: Vec<(usize, Vec<usize>)> = Vec::new();
    let everyone: Vec<usize> = (0..n).collect();
    // The ranks the survivors agreed failed: after them the communicator is renumbered over
    // the rest, and the follow-up's outcome numbers its contributors that way.
    let mut excluded: Vec<usize> = Vec::new();
    for r in &mut results {
        if killed_at.is_some() && r.rank == victim {
            continue; // a dead process reports nothing
        }
        trial.returns += 1;
        if r.returned.saturating_duration_since(start) > bound(r.rank) {
            trial.late_returns += 1;
        }
        plant(setup.plant, r, out_len, target, root, n);
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
                    // A frame lost, doubled or corrupted on a pair: either end is the fault's.
                    Fault::Drop | Fault::Duplicate | Fault::Corrupt => vec![victim, to],
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
                if let Some(v) = judge(r, outcome, target, &inputs, root, &everyone, 1) {
                    trial.verdict = v;
                    return Ok(trial);
                }
                oks.push((r.rank, outcome.contributors.clone()));
                excluded.extend(outcome.excluded.iter().copied().filter(|&x| x < n));
            }
        }
    }
    if let Some(why) = consistent(&oks, target, root, &everyone, survivors) {
        trial.verdict = Verdict::Inconsistent { call: 1, why };
        return Ok(trial);
    }
    if erred {
        trial.verdict = Verdict::Detected;
    }

    // The follow-up: the faults healed (the dead stay dead), every rank calls a fault-free
    // all-reduce; it must end, and what succeeds must be right and agree.
    plan.heal();
    for g in &ranks.go {
        // A thread that is gone has already reported; nothing to tell it.
        let _ = g.send(());
    }
    let follow = match collect(&ranks, watchdog(deadline, Duration::ZERO), 2) {
        Ok(r) => r,
        Err(v) => {
            trial.verdict = v;
            return Ok(trial);
        }
    };
    let follow_inputs: Vec<Vec<f32>> = (0..n).map(|r| input(r, FOLLOW_UP_LEN, 1)).collect();
    let members: Vec<usize> = (0..n).filter(|r| !excluded.contains(r)).collect();
    let mut oks: Vec<(usize, Vec<usize>)> = Vec::new();
    for r in &follow {
        if plan.is_killed(r.rank) {
            continue;
        }
        if let Ok(outcome) = &r.result {
            if let Some(v) = judge(
                r,
                outcome,
                Target::RingFailStop,
                &follow_inputs,
                0,
                &members,
                2,
            ) {
                trial.verdict = v;
                return Ok(trial);
            }
            oks.push((r.rank, map_ranks(&outcome.contributors, &members)));
        }
    }
    if let Some(why) = consistent(&oks, Target::RingFailStop, 0, &members, survivors) {
        trial.verdict = Verdict::Inconsistent { call: 2, why };
        return Ok(trial);
    }
    trial.follow_up_ok = Some(!oks.is_empty());
    Ok(trial)
}

/// Far past every deadline a call can run into (its own, a recovery's agreements, a stall),
/// so that a loaded machine is not taken for a hang.
fn watchdog(deadline: Duration, late: Duration) -> Duration {
    deadline
        .saturating_mul(8)
        .saturating_add(late)
        .saturating_add(Duration::from_secs(5))
}

/// `n` results of call `call` (1 or 2) from the ranks' threads, in rank order, or the verdict
/// when one panicked or had not reported by `within`.
fn collect(ranks: &Ranks, within: Duration, call: u8) -> Result<Vec<RankResult>, Verdict> {
    let n = ranks.n;
    let give_up = crate::deadline::deadline_after(within);
    let mut results: Vec<RankResult> = Vec::with_capacity(n);
    while results.len() < n {
        let left = give_up.saturating_duration_since(Instant::now());
        match ranks.rx.recv_timeout(left) {
            Ok(Report::First(r) | Report::Second(r)) => results.push(r),
            Ok(Report::Panicked(rank)) => return Err(Verdict::Panicked { rank }),
            Ok(Report::Gone) => ranks.gone.set(ranks.gone.get() + 1),
            Err(_) => {
                let missing: Vec<usize> = (0..n)
                    .filter(|r| !results.iter().any(|x| x.rank == *r))
                    .collect();
                return Err(Verdict::Hang {
                    call,
                    ranks: missing,
                });
            }
        }
    }
    results.sort_by_key(|r| r.rank);
    Ok(results)
}

/// `ranks` numbered in a communicator of `members` (its rank i is `members[i]`), in the
/// group's original numbering; a number past the members stays out of range (`usize::MAX`).
fn map_ranks(ranks: &[usize], members: &[usize]) -> Vec<usize> {
    ranks
        .iter()
        .map(|&c| members.get(c).copied().unwrap_or(usize::MAX))
        .collect()
}

/// The verdict on one rank's successful call, if it is wrong: an outcome naming ranks that do
/// not exist, or an output that is not the reference of the ranks it names. The call ran on a
/// communicator of `members` (original ranks, in its order).
fn judge(
    r: &RankResult,
    outcome: &Outcome,
    target: Target,
    inputs: &[Vec<f32>],
    root: usize,
    members: &[usize],
    call: u8,
) -> Option<Verdict> {
    let n = inputs.len();
    let contributors = map_ranks(&outcome.contributors, members);
    if contributors.iter().any(|&c| c >= n) {
        return Some(Verdict::Inconsistent {
            call,
            why: format!(
                "rank {} names contributors {:?} of a communicator of {members:?}",
                r.rank, outcome.contributors
            ),
        });
    }
    let want = target.reference(inputs, &contributors, r.rank, root, n);
    let got = r.output.as_deref().unwrap_or_default();
    first_wrong(got, want.as_deref()).map(|(index, got, want)| Verdict::SilentlyWrong {
        rank: r.rank,
        call,
        index,
        got,
        want,
    })
}

/// What is wrong with the successful ranks' outcomes taken together, if anything: a fail-stop
/// success names every rank (a broadcast, its root); survivors agree on one set, a strict
/// majority that holds every rank that succeeded.
fn consistent(
    oks: &[(usize, Vec<usize>)],
    target: Target,
    root: usize,
    members: &[usize],
    survivors: bool,
) -> Option<String> {
    let n = members.len();
    let everyone: Vec<usize> = match target {
        Target::Broadcast => vec![root],
        _ => members.to_vec(),
    };
    if !survivors {
        return oks.iter().find(|(_, c)| *c != everyone).map(|(r, c)| {
            format!("rank {r} succeeded fail-stop naming contributors {c:?}, not {everyone:?}")
        });
    }
    let (first_rank, set) = oks.first()?;
    if let Some((r, c)) = oks.iter().find(|(_, c)| c != set) {
        return Some(format!(
            "survivors disagree: rank {first_rank} names {set:?}, rank {r} names {c:?}"
        ));
    }
    if set.len().saturating_mul(2) <= n {
        return Some(format!(
            "ranks {:?} went on as {set:?}, not a majority of {n}",
            oks.iter().map(|o| o.0).collect::<Vec<_>>()
        ));
    }
    oks.iter()
        .find(|(r, _)| !set.contains(r))
        .map(|(r, _)| format!("rank {r} succeeded but is not among the contributors {set:?}"))
}

/// A rank's thread: the faulty call, its report, then (when told) the follow-up and its
/// report; the communicator is dropped only after both, so that tearing down its device is
/// not timed as part of a call. A panic is reported as one.
fn rank_thread(
    job: RankJob,
    tx: &mpsc::Sender<Report>,
    go: &mpsc::Receiver<()>,
    wait_for_go: Duration,
) {
    let rank = job.rank;
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let RankJob {
            rank,
            mut comm,
            data,
            out_len,
            in_place,
            target,
            root,
            late,
        } = job;
        let first = one_call(
            &mut comm, rank, &data, out_len, in_place, target, root, late,
        );
        // The campaign may have given up on this rank already; nothing to tell then.
        let _ = tx.send(Report::First(first));
        if go.recv_timeout(wait_for_go).is_ok() {
            let data = input(rank, FOLLOW_UP_LEN, 1);
            let second = one_call(
                &mut comm,
                rank,
                &data,
                FOLLOW_UP_LEN,
                false,
                Target::RingFailStop,
                0,
                Duration::ZERO,
            );
            let _ = tx.send(Report::Second(second));
        }
        drop(comm);
    }));
    if ran.is_err() {
        let _ = tx.send(Report::Panicked(rank));
    }
    let _ = tx.send(Report::Gone);
}

/// A bug planted in what the ranks returned, to show that the checks catch it.
fn plant(
    plant: Option<Plant>,
    r: &mut RankResult,
    out_len: usize,
    target: Target,
    root: usize,
    n: usize,
) {
    match plant {
        // An error swallowed: the call "succeeds", claiming what a fault-free call would, with
        // whatever the output holds: only the data can give it away.
        Some(Plant::Unreported) if r.result.is_err() => {
            r.result = Ok(Outcome {
                contributors: match target {
                    Target::Broadcast => vec![root],
                    _ => (0..n).collect(),
                },
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
fn one_call(
    comm: &mut Communicator,
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
        // (The parameter server's trials run in `ps.rs`, never here.)
        Target::RingFailStop
        | Target::SurvivingRing
        | Target::PsStrong
        | Target::PsEventual
        | Target::Processes => Collective::AllReduce {
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
            // Judged in `ps.rs` against the parameters' own reference.
            Target::PsStrong | Target::PsEventual | Target::Processes => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_that_cannot_all_be_true_are_caught() {
        let all: Vec<usize> = (0..5).collect();
        let ok = |r: usize, c: &[usize]| (r, c.to_vec());
        // Fail-stop: a success names everyone (a broadcast, its root).
        assert!(consistent(&[ok(0, &all), ok(1, &all)], Target::Reduce, 0, &all, false).is_none());
        assert!(
            consistent(
                &[ok(0, &[0, 1, 2, 3])],
                Target::RingFailStop,
                0,
                &all,
                false
            )
            .is_some()
        );
        assert!(consistent(&[ok(3, &[2])], Target::Broadcast, 2, &all, false).is_none());
        assert!(consistent(&[ok(3, &all)], Target::Broadcast, 2, &all, false).is_some());
        // Survivors: one set, a strict majority, holding every rank that succeeded.
        let three = [0, 2, 4];
        assert!(
            consistent(
                &[ok(0, &three), ok(2, &three), ok(4, &three)],
                Target::SurvivingRing,
                0,
                &all,
                true
            )
            .is_none()
        );
        let split = consistent(
            &[ok(0, &three), ok(1, &[1, 3])],
            Target::SurvivingRing,
            0,
            &all,
            true,
        );
        assert!(split.is_some_and(|w| w.contains("disagree")));
        let minority = consistent(
            &[ok(1, &[1, 3]), ok(3, &[1, 3])],
            Target::SurvivingRing,
            0,
            &all,
            true,
        );
        assert!(minority.is_some_and(|w| w.contains("not a majority")));
        let outsider = consistent(&[ok(1, &three)], Target::SurvivingRing, 0, &all, true);
        assert!(outsider.is_some_and(|w| w.contains("not among")));
        // After a shrink to [0, 2, 4], the communicator's 1 is the group's 2; past it, nobody.
        assert_eq!(map_ranks(&[0, 1, 2, 3], &three), [0, 2, 4, usize::MAX]);
    }
}
