//! The parameter server's training runs: every worker computes for a while (a sleep standing
//! in for the forward and backward pass), pulls every key as of the step and pushes its
//! gradients; the servers' final parameters are checked against an f64 reference of the pushes
//! that count. One fault per run: a worker killed or slow, a server killed, a server cut off.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::Check;
use crate::bench::BenchError;
use crate::bench::chaos::ps::{LR, grad_value, init_value};
use crate::link::FaultPlan;
use crate::ps::{Consistency, Mode, ParameterServer, PullInfo, ServerReport, Sgd};
use crate::{DeviceBuffer, Error};

/// One training run of the parameter server.
#[derive(Clone, Copy, Debug)]
pub(super) struct PsTrain {
    /// Server ranks (ranks 0..servers); key k's chain starts at server k mod servers.
    pub servers: usize,
    /// Copies of each key.
    pub replicas: usize,
    /// What replication promises.
    pub consistency: Consistency,
    /// Workers.
    pub workers: usize,
    /// Backup workers (`Sync` applies a step after `workers - backups` pushes).
    pub backups: usize,
    /// Keys (one per server).
    pub keys: usize,
    /// f32 elements of each key.
    pub len: usize,
    /// Steps.
    pub steps: u64,
    /// One step's compute on a healthy worker.
    pub compute: Duration,
    /// The servers' and workers' deadline.
    pub deadline: Duration,
    /// A worker (by index) and its compute on every step.
    pub slow: Option<(usize, Duration)>,
    /// A worker (by index) killed at the start of a step.
    pub kill_worker: Option<(usize, u64)>,
    /// A worker (by index) cut off from everyone at the start of a step: alive, silent, its
    /// links open until the run ends.
    pub cut_worker: Option<(usize, u64)>,
    /// A server killed by worker 0 at the start of a step.
    pub kill_server: Option<(usize, u64)>,
}

impl PsTrain {
    /// A fault-free run: one server, `Sync`, no replication.
    pub fn new(
        workers: usize,
        len: usize,
        steps: u64,
        compute: Duration,
        deadline: Duration,
    ) -> Self {
        PsTrain {
            servers: 1,
            replicas: 1,
            consistency: Consistency::Strong,
            workers,
            backups: 0,
            keys: 1,
            len,
            steps,
            compute,
            deadline,
            slow: None,
            kill_worker: None,
            cut_worker: None,
            kill_server: None,
        }
    }

    /// With `servers` servers, each key on a chain of `replicas`, under `consistency`.
    pub fn replicated(mut self, servers: usize, replicas: usize, consistency: Consistency) -> Self {
        self.servers = servers;
        self.keys = servers;
        self.replicas = replicas;
        self.consistency = consistency;
        self
    }
}

/// What one worker saw.
#[derive(Debug)]
pub(super) struct WorkerLog {
    /// The worker's index.
    pub q: usize,
    /// When the workers started together.
    pub start: Instant,
    /// The end of each step that succeeded.
    pub ends: Vec<Instant>,
    /// The step that failed, its error, when, and when the step's requests began.
    pub error: Option<(u64, Error, Instant, Instant)>,
    /// Updates this worker saw lost (`Eventual`).
    pub lost: u64,
    /// Times this worker turned to another replica.
    pub failovers: u64,
}

/// A whole run.
pub(super) struct PsRan {
    /// Every worker's log, by index.
    pub workers: Vec<WorkerLog>,
    /// Every server's report, by rank (a killed server's is its error).
    pub servers: Vec<Result<ServerReport, Error>>,
    /// When the fault was injected.
    pub fault_at: Option<Instant>,
}

impl PsRan {
    /// Worker `q`'s log.
    pub fn worker(&self, q: usize) -> Option<&WorkerLog> {
        self.workers.iter().find(|w| w.q == q)
    }

    /// Whether a server declared a worker failed (it missed a deadline): the steps after it
    /// applied without that worker's pushes, whatever the plan of the run was.
    pub fn declared_failed(&self) -> bool {
        self.servers
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .any(|r| r.events.iter().any(|e| e.contains("declared failed")))
    }

    /// The workers (by index) a server declared failed.
    pub fn declared_failed_workers(&self, servers: usize) -> Vec<usize> {
        let mut out: Vec<usize> = self
            .servers
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .flat_map(|r| r.events.iter())
            .filter(|e| e.contains("declared failed"))
            .filter_map(|e| {
                let rank = e.strip_prefix("worker rank ")?.split(' ').next()?;
                rank.parse::<usize>().ok()?.checked_sub(servers)
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Pushes that came after their step's update, summed over the servers that reported.
    pub fn late(&self) -> u64 {
        self.servers
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|r| r.late)
            .sum()
    }
}

fn key_name(k: usize) -> String {
    format!("k{k}")
}

/// Runs `t`.
pub(super) fn run(t: &PsTrain) -> Result<PsRan, BenchError> {
    let plan = FaultPlan::new();
    let mut b = ParameterServer::builder()
        .servers(t.servers)
        .workers(t.workers)
        .backups(t.backups)
        .replicas(t.replicas)
        .consistency(t.consistency)
        .mode(Mode::Sync)
        .rule(Sgd {
            lr: LR,
            momentum: 0.0,
        })
        .timeout(t.deadline)
        .faults(plan.clone());
    for k in 0..t.keys {
        b = b.param(key_name(k), (0..t.len).map(|i| init_value(k, i)).collect());
    }
    let (servers, workers) = b.build()?;
    let fault_at = Mutex::new(None::<Instant>);
    let finished = Finished::default();
    // Every request of a run ends within a few deadlines: the longest a cut-off worker holds
    // its links open, waiting for worker 0 to finish.
    let hold = t
        .deadline
        .saturating_mul(u32::try_from(t.steps).unwrap_or(u32::MAX).saturating_add(4))
        .saturating_add(Duration::from_secs(10));
    let start = std::sync::Barrier::new(workers.len());
    let (plan, fault_at_ref, finished, start) = (&plan, &fault_at, &finished, &start);
    let (ws, ss) = std::thread::scope(|s| {
        let hs: Vec<_> = servers
            .into_iter()
            .map(|sv| s.spawn(move || sv.serve()))
            .collect();
        let ws: Vec<_> = workers
            .into_iter()
            .map(|mut w| {
                s.spawn(move || -> Result<WorkerLog, BenchError> {
                    let q = w.index();
                    // Worker 0 is done however it ends: a cut-off worker waits for that.
                    let _done = (q == 0).then(|| SetOnDrop(finished));
                    let bufs = (0..t.keys)
                        .map(|_| w.comm().buffer::<f32>(t.len))
                        .collect::<Result<Vec<DeviceBuffer<f32>>, Error>>();
                    // Every worker reaches the start, failed or not: one that returned before
                    // it would leave the others waiting there.
                    start.wait();
                    let bufs = bufs?;
                    let mut log = WorkerLog {
                        q,
                        start: Instant::now(),
                        ends: Vec::new(),
                        error: None,
                        lost: 0,
                        failovers: 0,
                    };
                    for step in 0..t.steps {
                        if t.kill_worker == Some((q, step)) {
                            // Killed between steps: what it sent is still read, as a socket's
                            // buffered bytes are.
                            plan.kill_after(t.servers.saturating_add(q), 0);
                            set_once(fault_at_ref, Instant::now());
                            return Ok(log);
                        }
                        if t.cut_worker == Some((q, step)) {
                            let me = t.servers.saturating_add(q);
                            let rest: Vec<usize> = (0..t.servers.saturating_add(t.workers))
                                .filter(|&r| r != me)
                                .collect();
                            plan.partition(&[&[me], &rest]);
                            set_once(fault_at_ref, Instant::now());
                            // Silent, not gone: its links stay open until worker 0 is done.
                            finished.wait(hold);
                            return Ok(log);
                        }
                        if let Some((server, at)) = t.kill_server
                            && q == 0
                            && at == step
                        {
                            plan.kill(server);
                            set_once(fault_at_ref, Instant::now());
                        }
                        let slow = matches!(t.slow, Some((r, _)) if r == q);
                        if slow && t.backups > 0 && finished.is_set() {
                            // Worker 0 is done: the straggler's late pushes no longer matter.
                            // (Without backups every step waits for the straggler: it makes
                            // every step.)
                            break;
                        }
                        std::thread::sleep(match t.slow {
                            Some((r, d)) if r == q => d,
                            _ => t.compute,
                        });
                        let began = Instant::now();
                        if let Err(e) = one_step(&mut w, t, step, &bufs) {
                            log.error = Some((step, e, Instant::now(), began));
                            (log.lost, log.failovers) = (w.lost_updates(), w.failovers());
                            return Ok(log);
                        }
                        log.ends.push(Instant::now());
                    }
                    (log.lost, log.failovers) = (w.lost_updates(), w.failovers());
                    let began = Instant::now();
                    if let Err(e) = w.done() {
                        log.error = Some((t.steps, e, Instant::now(), began));
                    }
                    Ok(log)
                })
            })
            .collect();
        let ws: Vec<_> = ws.into_iter().map(|h| h.join()).collect();
        let ss: Vec<_> = hs.into_iter().map(|h| h.join()).collect();
        (ws, ss)
    });
    let mut workers = Vec::new();
    for w in ws {
        match w {
            Ok(log) => workers.push(log?),
            Err(_) => return Err("a parameter-server worker's thread panicked".into()),
        }
    }
    let mut reports = Vec::new();
    for s in ss {
        match s {
            Ok(rep) => reports.push(rep),
            Err(_) => return Err("a parameter server's thread panicked".into()),
        }
    }
    let fault_at = *fault_at.lock().unwrap_or_else(|p| p.into_inner());
    Ok(PsRan {
        workers,
        servers: reports,
        fault_at,
    })
}

/// One step of worker `w`: pull every key as of `step`, push every key's gradient.
fn one_step(
    w: &mut crate::ps::PsWorker,
    t: &PsTrain,
    step: u64,
    bufs: &[DeviceBuffer<f32>],
) -> Result<(), Error> {
    let q = w.index();
    for (k, buf) in bufs.iter().enumerate() {
        w.pull(&key_name(k), step, buf)?;
    }
    for k in 0..t.keys {
        let g: Vec<f32> = (0..t.len).map(|i| grad_value(q, k, step, i)).collect();
        let g = w.comm().upload(&g)?;
        w.push(&key_name(k), &g, step)?;
    }
    Ok(())
}

fn set_once(at: &Mutex<Option<Instant>>, now: Instant) {
    let mut g = at.lock().unwrap_or_else(|p| p.into_inner());
    g.get_or_insert(now);
}

/// Checks every key's final parameters, on the first server of its chain that reported,
/// against plain SGD on the mean of the pushes `counted(step)` names, in f64. Returns the keys
/// that differ (for `Eventual`, updates lost); a key no server reports counts as differing.
pub(super) fn keys_off(
    t: &PsTrain,
    ran: &PsRan,
    counted: impl Fn(u64) -> Vec<usize>,
    check: &Check,
) -> Vec<String> {
    let mut off = Vec::new();
    for k in 0..t.keys {
        let name = key_name(k);
        let held = (0..t.replicas)
            .map(|j| k.saturating_add(j) % t.servers.max(1))
            .find_map(|r| {
                let rep = ran.servers.get(r)?.as_ref().ok()?;
                rep.params.iter().find(|p| p.0 == name).map(|p| &p.1)
            });
        let Some(got) = held else {
            off.push(name);
            continue;
        };
        check.count(got.len() as u64);
        let mut want: Vec<f64> = (0..t.len).map(|i| f64::from(init_value(k, i))).collect();
        for step in 0..t.steps {
            let qs = counted(step);
            if qs.is_empty() {
                continue;
            }
            let scale = f64::from(LR) / qs.len() as f64;
            for (i, w) in want.iter_mut().enumerate() {
                let sum: f64 = qs
                    .iter()
                    .map(|&q| f64::from(grad_value(q, k, step, i)))
                    .sum();
                *w -= scale * sum;
            }
        }
        let differs = got.len() != want.len()
            || got.iter().zip(&want).enumerate().any(|(i, (&g, &w))| {
                // The planted bug (`--plant`): the first element one off.
                let g = if check.plant && i == 0 { g + 1.0 } else { g };
                (f64::from(g) - w).abs() > 1e-4 * w.abs().max(1.0)
            });
        if differs {
            off.push(name);
        }
    }
    off
}

/// The partition run of the CAP row: 2 servers (one key on both), 1 worker, `Async`; after 3
/// steps the primary is cut off from everyone for 2 steps, then the cut heals and the worker
/// makes one more: each step's pull (a push refused stands for its step), when the cut began,
/// when each step's result came, and the servers' reports.
pub(super) struct Partitioned {
    /// Each step's pull, or the error that stood for it.
    pub pulls: Vec<Result<PullInfo, Error>>,
    /// When each step ended.
    pub ends: Vec<Instant>,
    /// When the cut began.
    pub cut_at: Instant,
    /// The servers' reports.
    pub servers: Vec<Result<ServerReport, Error>>,
}

/// Runs the partition of [`Partitioned`] under `consistency`.
pub(super) fn partition_run(
    consistency: Consistency,
    len: usize,
    deadline: Duration,
) -> Result<Partitioned, BenchError> {
    let plan = FaultPlan::new();
    let (servers, mut workers) = ParameterServer::builder()
        .servers(2)
        .workers(1)
        .replicas(2)
        .consistency(consistency)
        .mode(Mode::Async)
        .rule(Sgd {
            lr: LR,
            momentum: 0.0,
        })
        .param("w", (0..len).map(|i| init_value(0, i)).collect())
        .timeout(deadline)
        .faults(plan.clone())
        .build()?;
    let Some(mut w) = workers.pop() else {
        return Err("the partition run has no worker".into());
    };
    let plan = &plan;
    let (ran, ss) = std::thread::scope(|s| {
        let hs: Vec<_> = servers
            .into_iter()
            .map(|sv| s.spawn(move || sv.serve()))
            .collect();
        let ran = (|| -> Result<Partitioned, Error> {
            let p = w.comm().buffer::<f32>(len)?;
            let g: Vec<f32> = (0..len).map(|i| grad_value(0, 0, 0, i)).collect();
            let g = w.comm().upload(&g)?;
            let (mut pulls, mut ends) = (Vec::new(), Vec::new());
            let mut cut_at = Instant::now();
            for t in 0..6u64 {
                if t == 3 {
                    // The primary (rank 0) | the backup (rank 1) and the worker (rank 2).
                    plan.partition(&[&[0], &[1, 2]]);
                    cut_at = Instant::now();
                }
                if t == 5 {
                    plan.heal();
                }
                let pushed = w.push("w", &g, t);
                pulls.push(pushed.and_then(|()| w.pull("w", t + 1, &p)));
                ends.push(Instant::now());
            }
            Ok(Partitioned {
                pulls,
                ends,
                cut_at,
                servers: Vec::new(),
            })
        })();
        // The servers finish once the worker is gone, with or without its goodbye.
        let _ = w.done();
        let ss: Vec<_> = hs.into_iter().map(|h| h.join()).collect();
        (ran, ss)
    });
    let mut ran = ran?;
    for s in ss {
        match s {
            Ok(rep) => ran.servers.push(rep),
            Err(_) => return Err("a parameter server's thread panicked".into()),
        }
    }
    Ok(ran)
}

/// Whether worker 0 has finished, and a wait for it.
#[derive(Default)]
struct Finished {
    done: Mutex<bool>,
    cv: Condvar,
}

impl Finished {
    fn set(&self) {
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }

    fn is_set(&self) -> bool {
        *self.done.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until set, at most `within`.
    fn wait(&self, within: Duration) {
        let done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self
            .cv
            .wait_timeout_while(done, within, |d| !*d)
            .unwrap_or_else(|p| p.into_inner());
    }
}

/// Sets a [`Finished`] when dropped.
struct SetOnDrop<'a>(&'a Finished);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.set();
    }
}
