//! One trial of the campaign on the parameter server: 3 servers with every key on a chain of
//! 2, 2 or 3 workers training a few `Sync` steps of plain SGD, one fault, and the final
//! parameters judged against an f64 reference of every push.
//!
//! Under `Strong` no update a worker was answered for may be lost silently: parameters off the
//! reference after every worker finished, every push applied and no server lost, fail the
//! campaign. A worker told [`Error::Lost`] is counted apart: `Strong` loses acknowledged
//! updates, and says so, when a head that had dropped its member (a missed ack deadline)
//! commits alone and then dies (`ps`'s documentation). Under `Eventual` losses are the CAP
//! choice: counted, not failed.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::Rng;

use super::blame::blamed;
use super::trial::{Setup, TrialResult, Verdict};
use super::{Fault, Target};
use crate::link::FaultPlan;
use crate::ps::{Consistency, Mode, ParameterServer, PsWorker, ServerReport, Sgd};
use crate::{DeviceBuffer, Error};

const SERVERS: usize = 3;
const REPLICAS: usize = 2;
const KEYS: usize = 3;
const STEPS: u64 = 4;
/// The learning rate of the plain SGD every trial uses.
pub(in crate::bench) const LR: f32 = 0.01;

fn key_name(k: usize) -> String {
    format!("k{k}")
}

/// Worker `q`'s gradient of `key` at `step`, element `i`: distinct per (worker, key, step,
/// element) over a period of 11.
pub(in crate::bench) fn grad_value(q: usize, key: usize, step: u64, i: usize) -> f32 {
    let n = (q * 7 + key * 3 + (step % 11) as usize * 5 + i) % 11;
    n as f32 / 11.0 - 0.45
}

/// Key `key`'s initial value, element `i`.
pub(in crate::bench) fn init_value(key: usize, i: usize) -> f32 {
    ((key * 5 + i) % 7) as f32 / 7.0
}

/// The parameters after every worker pushed every step: plain SGD on the mean of each step's
/// pushes, in f64.
fn reference(key: usize, len: usize, workers: usize, steps: u64) -> Vec<f64> {
    (0..len)
        .map(|i| {
            let mut w = f64::from(init_value(key, i));
            for step in 0..steps {
                let sum: f64 = (0..workers)
                    .map(|q| f64::from(grad_value(q, key, step, i)))
                    .sum();
                w -= f64::from(LR) * sum / workers as f64;
            }
            w
        })
        .collect()
}

enum Done {
    Worker(usize, Result<u64, Error>),
    Server(usize, Result<ServerReport, Error>),
    Panicked(usize),
}

/// One worker's run: every step pulls then pushes every key; `late` before `late_step`.
fn work(w: &mut PsWorker, len: usize, late: Duration, late_step: u64) -> Result<u64, Error> {
    let q = w.index();
    let bufs = (0..KEYS)
        .map(|_| w.comm().buffer::<f32>(len))
        .collect::<Result<Vec<DeviceBuffer<f32>>, Error>>()?;
    for step in 0..STEPS {
        if step == late_step && !late.is_zero() {
            // The fault itself: this worker is late for a step (stalled or slow).
            std::thread::sleep(late);
        }
        for (k, buf) in bufs.iter().enumerate() {
            w.pull(&key_name(k), step, buf)?;
        }
        for k in 0..KEYS {
            let g: Vec<f32> = (0..len).map(|i| grad_value(q, k, step, i)).collect();
            let g = w.comm().upload(&g)?;
            w.push(&key_name(k), &g, step)?;
        }
    }
    Ok(w.lost_updates())
}

/// Runs one parameter-server trial.
pub(super) fn run(setup: &Setup, rng: &mut impl Rng) -> Result<TrialResult, Error> {
    let (target, fault, deadline) = (setup.target, setup.fault, setup.deadline);
    let consistency = if target == Target::PsStrong {
        Consistency::Strong
    } else {
        Consistency::Eventual
    };
    let workers = rng.random_range(2..=3usize);
    let n = SERVERS + workers;
    let len = rng.random_range(5..=40usize);
    let plan = FaultPlan::new();
    let mut b = ParameterServer::builder()
        .servers(SERVERS)
        .workers(workers)
        .replicas(REPLICAS)
        .consistency(consistency)
        .mode(Mode::Sync)
        .rule(Sgd {
            lr: LR,
            momentum: 0.0,
        })
        .timeout(deadline)
        .faults(plan.clone());
    for k in 0..KEYS {
        b = b.param(key_name(k), (0..len).map(|i| init_value(k, i)).collect());
    }
    let (servers, ranks) = b.build()?;

    // Servers are ranks 0..SERVERS, workers the rest.
    let server = rng.random_range(0..SERVERS);
    let worker = SERVERS + rng.random_range(0..workers);
    // Workers talk to servers only: the pair's other end is a server.
    let peer = rng.random_range(0..SERVERS);
    let (mut late, late_step) = (Duration::ZERO, rng.random_range(0..STEPS));
    let victim = match fault {
        Fault::Kill => {
            plan.kill_after(server, rng.random_range(0..40));
            server
        }
        Fault::Stall => {
            late = deadline.saturating_mul(3) / 2;
            worker
        }
        Fault::Slow => {
            late = deadline / 4;
            worker
        }
        Fault::Delay => {
            plan.delay(server, deadline / 40);
            server
        }
        Fault::Drop => {
            plan.drop_next(worker, peer, 1);
            worker
        }
        Fault::Duplicate => {
            plan.duplicate_next(peer, worker, 1);
            peer
        }
        Fault::Corrupt => {
            plan.corrupt_next(worker, peer, 1);
            worker
        }
        Fault::Partition => {
            // A server cut off from everyone: a crash that closes no link.
            let rest: Vec<usize> = (0..n).filter(|&r| r != server).collect();
            plan.partition(&[&[server], &rest]);
            server
        }
    };

    // A frame lost, doubled or corrupted on a pair: either end is the fault's.
    let culprits: Vec<usize> = match fault {
        Fault::Drop | Fault::Duplicate | Fault::Corrupt => vec![worker, peer],
        _ => vec![victim],
    };
    let (tx, rx) = mpsc::channel();
    let mut threads = Vec::with_capacity(n);
    for sv in servers {
        let tx = tx.clone();
        let r = sv.rank();
        let thread = spawn(format!("chaos server {r}"), move || {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sv.serve()));
            let _ = tx.send(match ran {
                Ok(rep) => Done::Server(r, rep),
                Err(_) => Done::Panicked(r),
            });
        })
        .map_err(|m| Error::InvalidArgument {
            at: crate::At::rank(r),
            message: m,
        })?;
        threads.push(thread);
    }
    for mut w in ranks {
        let tx = tx.clone();
        let r = SERVERS + w.index();
        let wait = if r == victim { late } else { Duration::ZERO };
        let thread = spawn(format!("chaos worker {r}"), move || {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                let out = work(&mut w, len, wait, late_step);
                // A worker that failed drops its end: the servers see it gone and finish.
                // `done` consumes the worker: its device is gone before the report, so that
                // no trial's devices outlive it into the next (see `trial::Ranks`).
                match out {
                    Ok(lost) => w.done().map(|()| lost),
                    Err(e) => {
                        drop(w);
                        Err(e)
                    }
                }
            }));
            let _ = tx.send(match ran {
                Ok(out) => Done::Worker(r, out),
                Err(_) => Done::Panicked(r),
            });
        })
        .map_err(|m| Error::InvalidArgument {
            at: crate::At::rank(r),
            message: m,
        })?;
        threads.push(thread);
    }
    drop(tx);

    let mut trial = TrialResult::new(setup, n, victim);
    // Every request may wait out a deadline and fail over, a few times in a run.
    let watchdog = deadline
        .saturating_mul(40)
        .saturating_add(late)
        .saturating_add(Duration::from_secs(10));
    let give_up = crate::deadline::deadline_after(watchdog);
    let mut worker_results: Vec<(usize, Result<u64, Error>)> = Vec::new();
    let mut server_results: Vec<(usize, Result<ServerReport, Error>)> = Vec::new();
    while worker_results.len() + server_results.len() < n {
        let left = give_up.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Done::Worker(r, out)) => worker_results.push((r, out)),
            Ok(Done::Server(r, rep)) => server_results.push((r, rep)),
            Ok(Done::Panicked(rank)) => {
                trial.verdict = Verdict::Panicked { rank };
                return Ok(trial);
            }
            Err(_) => {
                let missing: Vec<usize> = (0..n)
                    .filter(|r| {
                        !worker_results.iter().any(|x| x.0 == *r)
                            && !server_results.iter().any(|x| x.0 == *r)
                    })
                    .collect();
                trial.verdict = Verdict::Hang {
                    call: 1,
                    ranks: missing,
                };
                return Ok(trial);
            }
        }
    }
    // Every server and worker has reported, its device gone: see it out.
    super::join_ended(threads, give_up);
    // A kill is armed on the server (the victim).
    trial.fired = super::trial::fired(fault, &plan, victim);
    let dead = plan.is_killed(server).then_some(server);
    let mut all_ok = true;
    // No returns or detection times are counted here: a run of several steps has no one
    // deadline to hold them against (the calls' latencies are the collectives' figures).
    for (_, out) in &worker_results {
        match out {
            Ok(lost) => trial.lost_eventual = trial.lost_eventual.saturating_add(*lost),
            Err(e) => {
                all_ok = false;
                if matches!(e, Error::Lost { .. }) && consistency == Consistency::Strong {
                    // Reported, not silent: a head that had dropped its member (a missed ack
                    // deadline) committed alone and then died; the worker is told.
                    trial.lost_reported = trial.lost_reported.saturating_add(1);
                }
                let named = blamed(e);
                trial.named.push(culprits.iter().any(|c| named.contains(c)));
            }
        }
    }
    // A push that came after its step's update (a worker the servers had stopped waiting for,
    // a stalled one or one whose push was lost and sent again) is answered but not applied,
    // as a backup worker's is: the reference of every push then does not hold, and the run
    // is judged only on what the workers were told.
    let late: u64 = server_results
        .iter()
        .filter_map(|(_, rep)| rep.as_ref().ok())
        .map(|rep| rep.late)
        .sum();
    let live_servers_ok = server_results
        .iter()
        .all(|(r, rep)| Some(*r) == dead || rep.is_ok());
    // A killed server's report, and with it its count of late pushes, dies with it: a run
    // that lost a server is judged on what the workers were told.
    if all_ok && late == 0 && live_servers_ok && dead.is_none() {
        trial.verified = true;
        // Every push was applied: the first live replica of each chain holds all of them.
        for k in 0..KEYS {
            let name = key_name(k);
            let chain: Vec<usize> = (0..REPLICAS).map(|j| (k + j) % SERVERS).collect();
            let held = chain.iter().filter(|&&r| Some(r) != dead).find_map(|&r| {
                let rep = server_results.iter().find(|x| x.0 == r)?.1.as_ref().ok()?;
                rep.params
                    .iter()
                    .find(|(p, _)| *p == name)
                    .map(|p| p.1.clone())
            });
            let want = reference(k, len, workers, STEPS);
            let mut held = held;
            if setup.plant == Some(super::Plant::WrongElement)
                && let Some(x) = held.as_mut().and_then(|h| h.first_mut())
            {
                // The planted bug: one element of the final parameters off.
                *x += 1.0;
            }
            let wrong = match &held {
                None => Some((0, f64::NAN, f64::NAN)),
                Some(got) if got.len() != want.len() => Some((got.len(), f64::NAN, f64::NAN)),
                Some(got) => got
                    .iter()
                    .zip(&want)
                    .enumerate()
                    .find(|(_, (g, w))| (f64::from(**g) - **w).abs() > 1e-4 * w.abs().max(1.0))
                    .map(|(i, (g, w))| (i, f64::from(*g), *w)),
            };
            if let Some((index, got, want)) = wrong {
                if consistency == Consistency::Strong {
                    trial.lost_acknowledged = trial.lost_acknowledged.saturating_add(1);
                    trial.verdict = Verdict::SilentlyWrong {
                        rank: chain.first().copied().unwrap_or(0),
                        call: 1,
                        index,
                        got,
                        want,
                    };
                    return Ok(trial);
                }
                trial.lost_eventual = trial.lost_eventual.saturating_add(1);
            }
        }
    } else if !all_ok {
        trial.verdict = Verdict::Detected;
    }
    if trial.lost_acknowledged > 0 {
        trial.verdict = Verdict::LostUpdate {
            count: trial.lost_acknowledged,
        };
    }
    Ok(trial)
}

/// Starts a named thread; the error as text.
fn spawn(
    name: String,
    f: impl FnOnce() + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, String> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map_err(|e| format!("cannot start a thread: {e}"))
}
