//! The fault campaign of `wccl-bench chaos`: random faults injected into collectives, every
//! result judged against an f64 reference, as Jepsen checks a history.
//!
//! Each trial builds a fresh group of 3 to 5 ranks over channels with a [`FaultPlan`](crate::link::FaultPlan) under a
//! checksum (the [`LinkStack`](crate::link::LinkStack) of the fault tests), arms one fault, runs
//! one call on every rank (random size, root, in or out of place), and judges every rank:
//!
//! - a rank that returns success must hold exactly the reference of the ranks its
//!   [`Outcome`](crate::Outcome) names (all of them unless it finished among survivors);
//!   anything else is a *silently wrong* result;
//! - a rank that returns an error has *detected* the fault; the error is *correctly named* when
//!   it names the faulty rank ([`blame::blamed`]);
//! - the successful ranks' outcomes must all be true together: a fail-stop success names every
//!   rank (a broadcast, its root); ranks finishing among survivors name one set, a strict
//!   majority holding every rank that succeeded (two sides of a partition never both go on);
//! - a rank that has not returned long after every deadline (8 deadlines and 5 s) is a *hang*;
//! - then, the faults healed (the dead stay dead), every rank makes one more, fault-free call:
//!   it must end, and what succeeds is judged the same way (a communicator a fault left in a
//!   state that hangs or corrupts its next call fails the trial).
//!
//! The campaign fails (and `wccl-bench chaos` exits non-zero) on any hang, silently wrong
//! result, inconsistent outcome or panic. Returns later than the deadline plus 10% are
//! counted and shown, not failed: a loaded 2-core machine can miss a wall-clock bound without
//! anything being wrong.
//!
//! A killed rank's own result is not judged (a dead process reports nothing).
//!
//! The parameter server's trials (`ps.rs`) run 3 servers, each key on a chain of 2, and 2 or 3
//! workers for a few `Sync` steps; under `Strong` an acknowledged update lost (a worker told,
//! or the parameters off the f64 reference after every worker finished) fails the campaign,
//! under `Eventual` losses are counted as its CAP choice.

pub mod blame;
pub mod procs;
pub(in crate::bench) mod ps;
mod trial;

use std::fmt::Write as _;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

pub use trial::{TrialResult, Verdict};

use super::BenchError;

/// The calls the campaign injects faults into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// Ring all-reduce, fail-stop (the default `OnFailure::Error`).
    RingFailStop,
    /// All-reduce finishing among survivors (`OnFailure::FinishAmongSurvivors`).
    SurvivingRing,
    /// Reduce-scatter, fail-stop.
    ReduceScatter,
    /// All-gather, fail-stop.
    AllGather,
    /// Broadcast, fail-stop.
    Broadcast,
    /// Reduce, fail-stop.
    Reduce,
    /// The replicated parameter server, `Strong`.
    PsStrong,
    /// The replicated parameter server, `Eventual`.
    PsEventual,
    /// All-reduce between real processes over TCP, fail-stop or finishing among survivors;
    /// the fault is a real SIGKILL or SIGSTOP ([`procs`]). Only with
    /// [`ChaosSettings::program`].
    Processes,
}

impl Target {
    /// Every target, in the report's order.
    pub const ALL: [Target; 9] = [
        Target::RingFailStop,
        Target::SurvivingRing,
        Target::ReduceScatter,
        Target::AllGather,
        Target::Broadcast,
        Target::Reduce,
        Target::PsStrong,
        Target::PsEventual,
        Target::Processes,
    ];

    /// The report's name.
    pub fn name(self) -> &'static str {
        match self {
            Target::RingFailStop => "all_reduce fail-stop",
            Target::SurvivingRing => "all_reduce survivors",
            Target::ReduceScatter => "reduce_scatter",
            Target::AllGather => "all_gather",
            Target::Broadcast => "broadcast",
            Target::Reduce => "reduce",
            Target::PsStrong => "ps Strong",
            Target::PsEventual => "ps Eventual",
            Target::Processes => "all_reduce processes",
        }
    }

    /// The name `wccl-bench chaos --call` takes.
    pub fn key(self) -> &'static str {
        match self {
            Target::RingFailStop => "fail-stop",
            Target::SurvivingRing => "survivors",
            Target::ReduceScatter => "reduce_scatter",
            Target::AllGather => "all_gather",
            Target::Broadcast => "broadcast",
            Target::Reduce => "reduce",
            Target::PsStrong => "ps-strong",
            Target::PsEventual => "ps-eventual",
            Target::Processes => "processes",
        }
    }

    /// The target of [`key`](Self::key) `key`.
    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.key() == key)
    }
}

/// The faults the campaign injects (one per trial, into one rank or one pair).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// A rank dies after 0 to 7 of its frames
    /// ([`FaultPlan::kill_after`](crate::link::FaultPlan::kill_after)).
    Kill,
    /// A rank comes to the call 1.5 deadlines late (a stalled process).
    Stall,
    /// Every frame a rank sends is held back 1/40 of the deadline (a slow link).
    Delay,
    /// One frame from a rank to its successor or another peer is lost.
    Drop,
    /// One such frame is delivered twice.
    Duplicate,
    /// One such frame has a bit flipped.
    Corrupt,
    /// The rank (or it and its successor) is cut off from the others.
    Partition,
    /// A rank comes to the call a quarter of the deadline late (a straggler).
    Slow,
}

impl Fault {
    /// Every fault, in the report's order.
    pub const ALL: [Fault; 8] = [
        Fault::Kill,
        Fault::Stall,
        Fault::Delay,
        Fault::Drop,
        Fault::Duplicate,
        Fault::Corrupt,
        Fault::Partition,
        Fault::Slow,
    ];

    /// The report's name.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Stall => "stall",
            Fault::Delay => "delay",
            Fault::Drop => "drop",
            Fault::Duplicate => "duplicate",
            Fault::Corrupt => "corrupt",
            Fault::Partition => "partition",
            Fault::Slow => "slow rank",
        }
    }

    /// The name `wccl-bench chaos --fault` takes.
    pub fn key(self) -> &'static str {
        match self {
            Fault::Slow => "slow",
            f => f.name(),
        }
    }

    /// The fault of [`key`](Self::key) `key`.
    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.key() == key)
    }
}

/// A bug planted between the ranks and the checks, to show that the checks can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plant {
    /// Every error is swallowed: the call reports success with whatever its output holds.
    Unreported,
    /// One element of every successful result is off by one.
    WrongElement,
}

/// What a campaign runs.
#[derive(Debug, Clone)]
pub struct ChaosSettings {
    /// Trials (one fault each).
    pub faults: usize,
    /// The seed of every random choice (the run is the same for a seed, timing aside).
    pub seed: u64,
    /// Every call's deadline.
    pub deadline: Duration,
    /// A bug to plant, to check the checks.
    pub plant: Option<Plant>,
    /// The calls to inject faults into (empty: all of [`Target::ALL`], less
    /// [`Target::Processes`] without a [`program`](Self::program)).
    pub targets: Vec<Target>,
    /// The faults to inject (empty: all of [`Fault::ALL`]; on real processes, only kills and
    /// stalls, so they take part only when one of those is listed).
    pub kinds: Vec<Fault>,
    /// A program that runs [`procs::child`] when [`procs::CHILD_VAR`] is set (`wccl-bench`
    /// does): with one, the campaign also kills real processes.
    pub program: Option<std::path::PathBuf>,
}

/// Every trial of a campaign.
#[derive(Debug, Clone)]
pub struct ChaosReport {
    /// The settings it ran with.
    pub settings: ChaosSettings,
    /// The trials, in order.
    pub trials: Vec<TrialResult>,
}

/// Runs the campaign, printing a line per trial that failed into `log` as it goes.
pub fn run(
    settings: &ChaosSettings,
    log: &mut dyn std::io::Write,
) -> Result<ChaosReport, BenchError> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(settings.seed);
    // Not sized from the settings: a huge --faults must not allocate up front.
    let mut trials = Vec::new();
    let kinds: Vec<Fault> = if settings.kinds.is_empty() {
        Fault::ALL.to_vec()
    } else {
        settings.kinds.clone()
    };
    // A real process can be killed or stopped; the other faults act on frames.
    let on_processes: Vec<Fault> = [Fault::Kill, Fault::Stall]
        .into_iter()
        .filter(|f| kinds.contains(f))
        .collect();
    let targets: Vec<Target> = if settings.targets.is_empty() {
        Target::ALL
            .into_iter()
            .filter(|&t| {
                t != Target::Processes
                    || (settings.program.is_some() && cfg!(unix) && !on_processes.is_empty())
            })
            .collect()
    } else {
        settings.targets.clone()
    };
    if targets.contains(&Target::Processes) && on_processes.is_empty() {
        return Err("chaos: trials on processes take kills and stalls only".into());
    }
    if targets.contains(&Target::Processes) && (settings.program.is_none() || !cfg!(unix)) {
        return Err(
            "chaos: trials on processes need a Unix machine and the program to run as a child"
                .into(),
        );
    }
    for index in 0..settings.faults {
        let Some(&target) = targets.get(rng.random_range(0..targets.len().max(1))) else {
            return Err("chaos: no target to inject faults into".into());
        };
        let allowed = if target == Target::Processes {
            &on_processes
        } else {
            &kinds
        };
        let Some(&fault) = allowed.get(rng.random_range(0..allowed.len().max(1))) else {
            return Err("chaos: no fault to inject".into());
        };
        let setup = trial::Setup {
            index,
            target,
            fault,
            deadline: settings.deadline,
            plant: settings.plant,
        };
        let t = match (&settings.program, target) {
            (Some(program), Target::Processes) => procs::run(&setup, &mut rng, program)?,
            _ => trial::run(&setup, &mut rng)?,
        };
        if t.verdict.fails() {
            writeln!(
                log,
                "# trial {index}: {} into {} (victim {} of {}): {:?}",
                fault.name(),
                target.name(),
                t.victim,
                t.ranks,
                t.verdict
            )?;
        }
        let hung = matches!(t.verdict, Verdict::Hang { .. } | Verdict::Panicked { .. });
        trials.push(t);
        if hung {
            // The hung rank's thread still holds its device; stop here, the verdict is in.
            break;
        }
    }
    Ok(ChaosReport {
        settings: settings.clone(),
        trials,
    })
}

/// `d` plus 10%, saturating.
fn plus_ten_percent(d: Duration) -> Duration {
    d.saturating_add(d / 10)
}

/// The `p`-th percentile (0..1) of `xs`, sorted in place; `None` for none.
fn percentile(xs: &mut [Duration], p: f64) -> Option<Duration> {
    xs.sort_unstable();
    let last = xs.len().checked_sub(1)?;
    let i = ((last as f64) * p).round() as usize;
    xs.get(i.min(last)).copied()
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
}

impl ChaosReport {
    /// Trials that hung.
    pub fn hangs(&self) -> usize {
        self.count(|t| matches!(t.verdict, Verdict::Hang { .. }))
    }

    /// Trials where a rank returned success with a wrong result.
    pub fn silently_wrong(&self) -> usize {
        self.count(|t| matches!(t.verdict, Verdict::SilentlyWrong { .. }))
    }

    /// Trials whose successful ranks' outcomes cannot all be true, or where a rank panicked.
    pub fn inconsistent(&self) -> usize {
        self.count(|t| {
            matches!(
                t.verdict,
                Verdict::Inconsistent { .. } | Verdict::Panicked { .. }
            )
        })
    }

    /// Whether the campaign failed: any hang, silently wrong result, inconsistent outcome or
    /// panic.
    pub fn failed(&self) -> bool {
        self.trials.iter().any(|t| t.verdict.fails())
    }

    fn count(&self, f: impl Fn(&TrialResult) -> bool) -> usize {
        self.trials.iter().filter(|t| f(t)).count()
    }

    /// Detections later than the deadline plus 10%, of all detections.
    pub fn late_detections(&self) -> (usize, usize) {
        let limit = plus_ten_percent(self.settings.deadline);
        let all: Vec<Duration> = self
            .trials
            .iter()
            .flat_map(|t| t.detection.iter().copied())
            .collect();
        (all.iter().filter(|&&d| d > limit).count(), all.len())
    }

    /// The report: a row per fault, then the totals and the latencies.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let d = self.settings.deadline;
        let _ = writeln!(
            s,
            "# chaos: {} faults, seed {}, deadline {} ms, 3-5 ranks over channels with checksums; {} trials on 3-4 real processes over TCP (SIGKILL or SIGSTOP)",
            self.trials.len(),
            self.settings.seed,
            d.as_millis(),
            self.count(|t| t.target == Target::Processes)
        );
        if let Some(p) = self.settings.plant {
            let _ = writeln!(s, "# PLANTED BUG: {p:?} (the checks must fail this run)");
        }
        let _ = writeln!(
            s,
            "# {:<20} {:>8} {:>6} {:>8} {:>8} {:>13} {:>9} {:>6} {:>6}",
            "fault", "injected", "fired", "detected", "correct", "named", "late", "wrong", "hangs"
        );
        let row = |s: &mut String, name: &str, ts: &[&TrialResult]| {
            let named: usize = ts
                .iter()
                .map(|t| t.named.iter().filter(|&&x| x).count())
                .sum();
            let errors: usize = ts.iter().map(|t| t.named.len()).sum();
            let late: usize = ts.iter().map(|t| t.late_returns).sum();
            let returns: usize = ts.iter().map(|t| t.returns).sum();
            let _ = writeln!(
                s,
                "  {:<20} {:>8} {:>6} {:>8} {:>8} {:>13} {:>9} {:>6} {:>6}",
                name,
                ts.len(),
                ts.iter().filter(|t| t.fired).count(),
                ts.iter().filter(|t| t.verdict == Verdict::Detected).count(),
                ts.iter().filter(|t| t.verdict == Verdict::Correct).count(),
                format!("{named}/{errors}"),
                format!("{late}/{returns}"),
                ts.iter()
                    .filter(|t| {
                        matches!(
                            t.verdict,
                            Verdict::SilentlyWrong { .. }
                                | Verdict::Inconsistent { .. }
                                | Verdict::LostUpdate { .. }
                                | Verdict::Panicked { .. }
                        )
                    })
                    .count(),
                ts.iter()
                    .filter(|t| matches!(t.verdict, Verdict::Hang { .. }))
                    .count(),
            );
        };
        for f in Fault::ALL {
            let ts: Vec<&TrialResult> = self.trials.iter().filter(|t| t.fault == f).collect();
            row(&mut s, f.name(), &ts);
        }
        let all: Vec<&TrialResult> = self.trials.iter().collect();
        row(&mut s, "all", &all);
        let _ = writeln!(s, "# by call:");
        for t in Target::ALL {
            let ts: Vec<&TrialResult> = self.trials.iter().filter(|x| x.target == t).collect();
            row(&mut s, t.name(), &ts);
        }
        let mut det: Vec<Duration> = self
            .trials
            .iter()
            .flat_map(|t| t.detection.iter().copied())
            .collect();
        let (late, of) = self.late_detections();
        // Which faults the late detections came from.
        let limit = plus_ten_percent(d);
        let by_fault: Vec<String> = Fault::ALL
            .iter()
            .filter_map(|&f| {
                let k = self
                    .trials
                    .iter()
                    .filter(|t| t.fault == f)
                    .flat_map(|t| t.detection.iter())
                    .filter(|&&x| x > limit)
                    .count();
                (k > 0).then(|| format!("{} {k}", f.name()))
            })
            .collect();
        let _ = writeln!(
            s,
            "# detection (fault, or the start of a call that began after it, to error return): \
             p50 {}, p99 {}, deadline {} ms; later than deadline + 10%: {late} of {of}{}",
            ms(percentile(&mut det, 0.5)),
            ms(percentile(&mut det, 0.99)),
            d.as_millis(),
            if by_fault.is_empty() {
                String::new()
            } else {
                format!(" ({})", by_fault.join(", "))
            }
        );
        let mut rec: Vec<Duration> = self
            .trials
            .iter()
            .flat_map(|t| t.recoveries.iter().copied())
            .collect();
        let _ = writeln!(
            s,
            "# recovery (finish among survivors, failure to end of call): p50 {}, p99 {} over {}",
            ms(percentile(&mut rec, 0.5)),
            ms(percentile(&mut rec, 0.99)),
            rec.len()
        );
        let ps: Vec<&TrialResult> = self
            .trials
            .iter()
            .filter(|t| matches!(t.target, Target::PsStrong | Target::PsEventual))
            .collect();
        let _ = writeln!(
            s,
            "# parameter server ({} trials, {} with every push applied, no server lost and the \
             parameters checked against the reference): acknowledged updates lost silently \
             under Strong {} (target 0); reported lost under Strong (Error::Lost) {}; updates \
             lost under Eventual {} (its CAP choice)",
            ps.len(),
            ps.iter().filter(|t| t.verified).count(),
            ps.iter().map(|t| t.lost_acknowledged).sum::<u64>(),
            ps.iter().map(|t| t.lost_reported).sum::<u64>(),
            ps.iter().map(|t| t.lost_eventual).sum::<u64>()
        );
        let follow: Vec<bool> = self.trials.iter().filter_map(|t| t.follow_up_ok).collect();
        let _ = writeln!(
            s,
            "# follow-up call after each trial (faults healed, the dead still dead): ran {}, \
             succeeded somewhere {}, failed everywhere {} (a fail-stop communicator stays \
             broken)",
            follow.len(),
            follow.iter().filter(|&&x| x).count(),
            follow.iter().filter(|&&x| !x).count()
        );
        let _ = writeln!(
            s,
            "# late: returns later than the deadline + 10% after the rank could start (two \
             deadlines + 10% finishing among survivors); wrong: silently wrong, inconsistent \
             outcomes, panics"
        );
        let _ = writeln!(
            s,
            "# hangs {}, silently wrong results {}, inconsistent outcomes or panics {}, lost \
             acknowledged updates {}: {}",
            self.hangs(),
            self.silently_wrong(),
            self.inconsistent(),
            self.count(|t| matches!(t.verdict, Verdict::LostUpdate { .. })),
            if self.failed() { "FAILED" } else { "passed" }
        );
        s
    }
}

/// Joins each of `threads` once it has ended, waiting for that until `give_up`. A trial's
/// thread that has sent its last report (its device torn down) still runs its thread-local
/// destructors on the way out, the OpenGL driver's per-thread state among them; a thread
/// still in them when the program exits runs beside the driver's own exit handlers, and on
/// Mesa's OpenGL the two corrupted the heap ("corrupted size vs. prev_size in fastbins",
/// after a campaign that passed: a core showed a `chaos rank` thread in its exit and the main
/// thread in `libgbm`'s). A thread still running at `give_up` (a hung rank, which the
/// campaign reports) is left.
pub(crate) fn join_ended(threads: Vec<JoinHandle<()>>, give_up: Instant) {
    for t in threads {
        // `join` has no deadline: poll for the end of the thread's function first (what is
        // left of a thread that has reported is its return, microseconds). `is_finished` turns
        // true when the function returns, before the thread's local destructors and the C
        // library's per-thread cleanup: `join` waits for those, which is the point here, and
        // has no deadline of its own; a driver destructor that never returned would hold it.
        while !t.is_finished() && Instant::now() < give_up {
            std::thread::sleep(Duration::from_micros(100));
        }
        if t.is_finished() {
            // Its closure catches panics; nothing to report from the join.
            let _ = t.join();
        }
    }
}
