//! The ring's training runs: every rank computes for a while (a sleep standing in for the
//! forward and backward pass), then all-reduces its gradient in place; every step's result on
//! every rank is checked against the f64 sum of exactly the ranks its [`Outcome`] names. One
//! fault per run, at a chosen step: a rank killed, cut off, or slow on every step.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::link::{FaultPlan, LinkStack};
use crate::{CallOptions, Collective, CommConfig, CommGroup, Error, OnFailure, Outcome, ReduceOp};

use super::Check;
use crate::bench::BenchError;

/// One training run of the ring.
#[derive(Clone, Copy, Debug)]
pub(super) struct Train {
    /// Ranks at the start.
    pub ranks: usize,
    /// f32 elements of the gradient.
    pub len: usize,
    /// Steps.
    pub steps: u64,
    /// One step's compute on a healthy rank.
    pub compute: Duration,
    /// Every call's deadline.
    pub deadline: Duration,
    /// A rank and its compute on every step (a straggler).
    pub slow: Option<(usize, Duration)>,
    /// A rank killed at the start of a step.
    pub kill: Option<(usize, u64)>,
    /// A rank cut off from the others at the start of a step (it stays alive).
    pub cut: Option<(usize, u64)>,
    /// What the calls do when a rank fails.
    pub on_failure: OnFailure,
    /// Skip ranks that enter a call this long after rank 0.
    pub skip_after: Option<Duration>,
}

impl Train {
    /// A fault-free run.
    pub fn new(
        ranks: usize,
        len: usize,
        steps: u64,
        compute: Duration,
        deadline: Duration,
    ) -> Self {
        Train {
            ranks,
            len,
            steps,
            compute,
            deadline,
            slow: None,
            kill: None,
            cut: None,
            on_failure: OnFailure::Error,
            skip_after: None,
        }
    }
}

/// What one rank saw.
#[derive(Debug)]
pub(super) struct RankLog {
    /// The rank's number at the start.
    pub id: usize,
    /// After the warm-up call.
    pub start: Instant,
    /// The end of each step that succeeded, in order, with its outcome.
    pub steps: Vec<(Instant, Outcome)>,
    /// The step that failed, its error, when, and when its call began.
    pub error: Option<(u64, Error, Instant, Instant)>,
}

/// A whole run.
pub(super) struct Ran {
    /// Every rank's log, by its number at the start.
    pub logs: Vec<RankLog>,
    /// Building the group (devices and links).
    pub built_in: Duration,
    /// When the fault was injected.
    pub fault_at: Option<Instant>,
}

impl Ran {
    /// Rank `id`'s log.
    pub fn log(&self, id: usize) -> Option<&RankLog> {
        self.logs.iter().find(|l| l.id == id)
    }
}

/// Rank `id`'s gradient at `step`, element `i`: small integers (sums of a few are exact in
/// f32), distinct per (rank, step, element) over a period of 97, not a power of two.
pub(super) fn grad(id: usize, step: u64, i: usize) -> f32 {
    let n = (id as u64)
        .wrapping_mul(131)
        .wrapping_add(step.wrapping_mul(17))
        .wrapping_add((i as u64).wrapping_mul(7))
        % 97;
    n as f32 - 48.0
}

/// Runs `t`, checking every step's result: a wrong element is recorded in `check`.
pub(super) fn run(t: &Train, check: &Check) -> Result<Ran, BenchError> {
    let plan = FaultPlan::new();
    let built = Instant::now();
    let comms = CommGroup::builder()
        .ranks(t.ranks)
        .config(
            CommConfig::default()
                .timeout(t.deadline)
                .on_failure(t.on_failure),
        )
        .links(LinkStack::new().faults(plan.clone()))
        .build()?
        .into_communicators();
    let built_in = built.elapsed();
    let fault_at = Mutex::new(None::<Instant>);
    let finished = AtomicBool::new(false);
    let leave = Leave::default();
    // Every call of a run ends within its deadline; a cut-off minority learns it has no quorum
    // after one more (the agreement holds silent ranks failed), or two for each coordinator
    // that hangs after it spoke: the bound is for the worst case.
    let waits = u32::try_from(t.ranks)
        .unwrap_or(u32::MAX)
        .saturating_mul(2)
        .saturating_add(4);
    let leave_within = t
        .deadline
        .saturating_mul(waits)
        .saturating_add(Duration::from_secs(5));
    let (plan, fault_at_ref, finished, leave) = (&plan, &fault_at, &finished, &leave);
    let joined: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                s.spawn(move || -> Result<RankLog, BenchError> {
                    let out = rank_loop(t, check, plan, fault_at_ref, finished, &mut c);
                    // Every rank keeps its communicator until the others are done: a rank that
                    // leaves closes its links, which a cut-off rank still in its agreement would
                    // take for the survivors' deaths (a harness artifact, not a fault).
                    leave.arrive_and_wait(t.ranks, leave_within);
                    drop(c);
                    out
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join()).collect()
    });
    let mut logs = Vec::new();
    for j in joined {
        match j {
            Ok(log) => logs.push(log?),
            Err(_) => return Err("a ring rank's thread panicked".into()),
        }
    }
    let fault_at = *fault_at.lock().unwrap_or_else(|p| p.into_inner());
    Ok(Ran {
        logs,
        built_in,
        fault_at,
    })
}

/// One rank's run: the warm-up, then every step (or until its fault or an error).
fn rank_loop(
    t: &Train,
    check: &Check,
    plan: &FaultPlan,
    fault_at_ref: &Mutex<Option<Instant>>,
    finished: &AtomicBool,
    c: &mut crate::Communicator,
) -> Result<RankLog, BenchError> {
    let id = c.rank();
    let buf = c.buffer::<f32>(t.len)?;
    let opts = CallOptions {
        skip_after: t.skip_after,
        ..CallOptions::default()
    };
    // Warm-up, every rank in.
    c.run(
        Collective::AllReduce {
            input: buf.view(),
            output: buf.view(),
            op: ReduceOp::Sum,
        },
        CallOptions::default(),
    )?;
    // The ranks of the current communicator, by their numbers at the start.
    let mut members: Vec<usize> = (0..t.ranks).collect();
    let mut log = RankLog {
        id,
        start: Instant::now(),
        steps: Vec::new(),
        error: None,
    };
    for step in 0..t.steps {
        if t.kill == Some((id, step)) {
            // Killed between steps: what it sent is still read, as a socket's buffered bytes
            // are, so the fault lands in step `step` and not in the one before.
            plan.kill_after(id, 0);
            set_once(fault_at_ref, Instant::now());
            return Ok(log);
        }
        if t.cut == Some((id, step)) {
            let rest: Vec<usize> = (0..t.ranks).filter(|&r| r != id).collect();
            plan.partition(&[&[id], &rest]);
            set_once(fault_at_ref, Instant::now());
        }
        let slow = matches!(t.slow, Some((r, _)) if r == id);
        if slow && finished.load(Ordering::Acquire) {
            // Rank 0 is done: a straggler that is skipped has nobody left to call with.
            break;
        }
        // The step's compute, emulated.
        std::thread::sleep(match t.slow {
            Some((r, d)) if r == id => d,
            _ => t.compute,
        });
        let values: Vec<f32> = (0..t.len).map(|i| grad(id, step, i)).collect();
        c.write(&buf, &values)?;
        let me = c.rank();
        let began = Instant::now();
        let got = c.run(
            Collective::AllReduce {
                input: buf.view(),
                output: buf.view(),
                op: ReduceOp::Sum,
            },
            opts,
        );
        match got {
            Ok(o) => {
                let end = Instant::now();
                if !o.skipped.contains(&me) {
                    let out = c.download(&buf)?;
                    check_step(check, id, step, &o, &members, &out);
                }
                if !o.excluded.is_empty() {
                    members = (0..members.len())
                        .filter(|r| !o.excluded.contains(r))
                        .filter_map(|r| members.get(r).copied())
                        .collect();
                }
                log.steps.push((end, o));
            }
            Err(e) => {
                log.error = Some((step, e, Instant::now(), began));
                return Ok(log);
            }
        }
    }
    if id == 0 {
        finished.store(true, Ordering::Release);
    }
    Ok(log)
}

fn set_once(at: &Mutex<Option<Instant>>, now: Instant) {
    let mut g = at.lock().unwrap_or_else(|p| p.into_inner());
    g.get_or_insert(now);
}

/// Checks rank `id`'s result of `step` against the f64 sum of the contributors' gradients
/// (`members` maps the call's numbering to the numbers at the start).
fn check_step(check: &Check, id: usize, step: u64, o: &Outcome, members: &[usize], out: &[f32]) {
    let mut ids = Vec::new();
    for &c in &o.contributors {
        match members.get(c) {
            Some(&m) => ids.push(m),
            None => {
                check.wrong(format!(
                    "ring rank {id}, step {step}: contributor {c} is not a member ({members:?})"
                ));
                return;
            }
        }
    }
    check.count(out.len() as u64);
    for (i, &g) in out.iter().enumerate() {
        // The planted bug (`--plant`): the first element one off.
        let g = if check.plant && i == 0 { g + 1.0 } else { g };
        let want: f64 = ids.iter().map(|&m| f64::from(grad(m, step, i))).sum();
        if f64::from(g) != want {
            check.wrong(format!(
                "ring rank {id}, step {step}, element {i}: {g}, want {want} (the sum over ranks {ids:?})"
            ));
            return;
        }
    }
}

/// Steps per second of the steps in `range` of `log` (ending at those steps' ends, starting at
/// the end of the step before, or at the log's start); `None` for fewer than one step.
pub(super) fn pace(log: &RankLog, from: usize, to: usize) -> Option<f64> {
    let to = to.min(log.steps.len());
    if to <= from {
        return None;
    }
    let start = match from.checked_sub(1) {
        None => log.start,
        Some(prev) => log.steps.get(prev)?.0,
    };
    let end = log.steps.get(to - 1)?.0;
    let secs = end.saturating_duration_since(start).as_secs_f64();
    (secs > 0.0).then(|| (to - from) as f64 / secs)
}

/// The ranks that finished their run, waited for before any leaves.
#[derive(Default)]
struct Leave {
    done: Mutex<usize>,
    all: Condvar,
}

impl Leave {
    /// Counts this rank done and waits (at most `within`) until `ranks` are.
    fn arrive_and_wait(&self, ranks: usize, within: Duration) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        *done = done.saturating_add(1);
        self.all.notify_all();
        let _ = self
            .all
            .wait_timeout_while(done, within, |d| *d < ranks)
            .unwrap_or_else(|p| p.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(contributors: Vec<usize>) -> Outcome {
        Outcome {
            contributors,
            excluded: Vec::new(),
            skipped: Vec::new(),
            recovered_in: None,
        }
    }

    fn sum(ids: &[usize], step: u64, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ids.iter().map(|&m| grad(m, step, i)).sum())
            .collect()
    }

    #[test]
    fn a_step_is_checked_against_the_contributors_by_their_first_numbers() {
        // After rank 1 of 4 died, the call's ranks 0, 1, 2 are the first numbers 0, 2, 3.
        let members = [0, 2, 3];
        let right = sum(&[0, 2, 3], 5, 300);
        let check = Check::default();
        check_step(&check, 2, 5, &outcome(vec![0, 1, 2]), &members, &right);
        assert!(check.problems.lock().unwrap().is_empty());
        // Read in the call's numbering (ranks 0, 1, 2 of the start): wrong.
        check_step(&check, 2, 5, &outcome(vec![0, 1, 2]), &[0, 1, 2], &right);
        // One element off, a contributor that is not a member, the planted bug.
        let mut off = right.clone();
        off[299] += 1.0;
        check_step(&check, 2, 5, &outcome(vec![0, 1, 2]), &members, &off);
        check_step(&check, 2, 5, &outcome(vec![0, 3]), &members, &right);
        let planted = Check {
            plant: true,
            ..Check::default()
        };
        check_step(&planted, 2, 5, &outcome(vec![0, 1, 2]), &members, &right);
        assert_eq!(check.problems.lock().unwrap().len(), 3);
        assert_eq!(planted.problems.lock().unwrap().len(), 1);
    }

    #[test]
    fn gradients_differ_per_rank_step_and_element() {
        let mut seen = std::collections::HashSet::new();
        for id in 0..3 {
            let row: Vec<u32> = (0..97).map(|i| grad(id, 1, i).to_bits()).collect();
            assert!(seen.insert(row));
        }
        assert_ne!(grad(0, 0, 0), grad(0, 1, 0));
        assert_ne!(grad(0, 0, 0), grad(0, 0, 64));
    }
}
