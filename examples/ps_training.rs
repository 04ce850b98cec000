//! Data-parallel SGD through the parameter server on a synthetic linear-regression problem:
//! every worker has the same model and its own data; the servers aggregate the gradients on
//! their devices and apply SGD. Prints what happened and the loss; the weights converge to the
//! true ones.
//!
//! ```text
//! cargo run --release --example ps_training -- [--mode sync|ssp|async] [--workers 4]
//!     [--kill-worker] [--slow-worker] [--backups 1] [--steps 300]
//!     [--servers N] [--replicas R] [--consistency strong|eventual]
//!     [--kill-primary] [--partition-backup] [--heal-then-kill]
//! ```
//! The one parameter `w` lives on `--replicas` of the `--servers` (default 1 and 1, or 2 and 2
//! when a server fault below is asked for): its primary is rank 0, its first backup rank 1.
//! `--consistency` says what replication promises (default strong).
//! `--kill-worker` drops worker 1 halfway (its link closes; the servers go on without it),
//! `--kill-primary` kills the primary halfway (the backup takes over; under strong no update
//! the workers saw is lost),
//! `--partition-backup` cuts the backup (rank 1) off from everyone for the middle third of the
//! run (the primary stops replicating to it),
//! `--heal-then-kill` cuts the backup off for a few steps from a quarter of the run, heals the
//! partition, then kills the primary halfway (the backup it left behind must have caught up),
//! `--slow-worker` makes worker 0 sleep `--slow-ms` (default 16, about ten times the others'
//! step time on the software adapter) every step.
//! It prints the updates the workers lost to a take-over (the sum of their `lost_updates()`)
//! and the largest weight error.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use wccl::link::FaultPlan;
use wccl::ps::{Consistency, Mode, ParameterServer, ServerReport, Sgd};

/// How to train.
#[derive(Clone, Debug)]
pub struct Options {
    pub mode: Mode,
    pub workers: usize,
    pub backups: usize,
    pub steps: u64,
    pub kill_worker: bool,
    pub kill_primary: bool,
    pub partition_backup: bool,
    /// Partition the backup for a few steps, heal, then kill the primary.
    pub heal_then_kill: bool,
    pub slow_worker: bool,
    pub slow_ms: u64,
    pub dim: usize,
    pub rows: usize,
    /// Server ranks; `None`: 2 when a server fault is asked for, else 1.
    pub servers: Option<usize>,
    /// Copies of `w`; `None`: 2 when a server fault is asked for, else 1.
    pub replicas: Option<usize>,
    pub consistency: Consistency,
    /// The servers' and workers' deadline.
    pub timeout: Duration,
}

impl Options {
    /// Whether a server is killed or cut off during the run.
    fn server_fault(&self) -> bool {
        self.kill_primary || self.partition_backup || self.heal_then_kill
    }

    /// Whether the primary (rank 0) is killed during the run.
    fn kills_primary(&self) -> bool {
        self.kill_primary || self.heal_then_kill
    }

    /// (servers, replicas) as asked, or the defaults.
    pub fn layout(&self) -> (usize, usize) {
        let default = if self.server_fault() { 2 } else { 1 };
        (
            self.servers.unwrap_or(default),
            self.replicas.unwrap_or(default),
        )
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: Mode::Sync,
            workers: 4,
            backups: 0,
            steps: 300,
            kill_worker: false,
            kill_primary: false,
            partition_backup: false,
            heal_then_kill: false,
            slow_worker: false,
            slow_ms: 16,
            dim: 16,
            rows: 64,
            servers: None,
            replicas: None,
            consistency: Consistency::Strong,
            timeout: Duration::from_secs(10),
        }
    }
}

/// The outcome of a run.
#[derive(Debug)]
pub struct Outcome {
    pub truth: Vec<f64>,
    pub learned: Vec<f32>,
    pub max_error: f64,
    pub seconds: f64,
    /// When each worker finished its steps, seconds from the start (a killed worker: when it
    /// stopped).
    pub finished: Vec<f64>,
    /// Updates the workers had been answered with that a server taking over no longer had,
    /// summed over the workers (0 under `Strong`).
    pub lost: u64,
    /// Times the workers moved to a backup server, summed.
    pub failovers: u64,
    /// The surviving servers' reports (a killed primary's is left out).
    pub reports: Vec<ServerReport>,
}

/// What one worker thread returns: when it finished, its lost updates and failovers.
struct WorkerEnd {
    finished: f64,
    lost: u64,
    failovers: u64,
}

/// One worker's data: rows of x and y = x . truth.
struct Shard {
    x: Vec<Vec<f64>>,
    y: Vec<f64>,
}

impl Shard {
    /// The gradient of the mean squared error at `w`, and the loss.
    fn gradient(&self, w: &[f32]) -> (Vec<f32>, f64) {
        let mut g = vec![0.0f64; w.len()];
        let mut loss = 0.0;
        for (x, y) in self.x.iter().zip(&self.y) {
            let err: f64 = x.iter().zip(w).map(|(a, b)| a * *b as f64).sum::<f64>() - y;
            loss += err * err;
            for (gi, xi) in g.iter_mut().zip(x) {
                *gi += 2.0 * err * xi;
            }
        }
        let n = self.x.len() as f64;
        (g.iter().map(|v| (v / n) as f32).collect(), loss / n)
    }
}

/// Trains and returns what happened.
pub fn train(o: &Options) -> wccl::Result<Outcome> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let truth: Vec<f64> = (0..o.dim).map(|_| rng.random_range(-1.0..1.0)).collect();
    let shards: Vec<Shard> = (0..o.workers)
        .map(|_| {
            let x: Vec<Vec<f64>> = (0..o.rows)
                .map(|_| (0..o.dim).map(|_| rng.random_range(-1.0..1.0)).collect())
                .collect();
            let y = x
                .iter()
                .map(|r| r.iter().zip(&truth).map(|(a, b)| a * b).sum())
                .collect();
            Shard { x, y }
        })
        .collect();
    let faults = FaultPlan::new();
    let (n_servers, replicas) = o.layout();
    if o.server_fault() && replicas < 2 {
        // Killing or cutting off the only copy of `w` cannot end well: say so up front.
        return Err(wccl::Error::InvalidArgument {
            at: wccl::At {
                rank: 0,
                op: None,
                seq: 0,
            },
            message: format!(
                "a server fault needs 2 or more replicas of 'w', not {replicas} (--replicas)"
            ),
        });
    }
    let (servers, workers) = ParameterServer::builder()
        .servers(n_servers)
        .replicas(replicas)
        .consistency(o.consistency)
        .faults(faults.clone())
        .workers(o.workers)
        .backups(o.backups)
        .mode(o.mode)
        .rule(Sgd {
            lr: 0.2,
            momentum: 0.5,
        })
        .param("w", vec![0.0; o.dim])
        .timeout(o.timeout)
        .build()?;
    // --heal-then-kill: the backup is cut off for a few steps from a quarter of the run.
    let cut_at = o.steps / 4;
    let heal_at = cut_at + (o.steps / 10).max(2);
    let started = Instant::now();
    let shards = &shards;
    let faults = &faults;
    let (reports, ends) =
        std::thread::scope(|s| -> wccl::Result<(Vec<ServerReport>, Vec<WorkerEnd>)> {
            let hs: Vec<_> = servers
                .into_iter()
                .map(|sv| s.spawn(move || sv.serve()))
                .collect();
            let ws: Vec<_> = workers
                .into_iter()
                .map(|mut w| {
                    s.spawn(move || -> wccl::Result<WorkerEnd> {
                        let q = w.index();
                        let params = w.comm().buffer::<f32>(o.dim)?;
                        for step in 0..o.steps {
                            if o.kill_worker && q == 1 && step == o.steps / 2 {
                                println!("worker {q}: killed at step {step}");
                                // Dropped without a word: its link closes.
                                return Ok(WorkerEnd {
                                    finished: started.elapsed().as_secs_f64(),
                                    lost: w.lost_updates(),
                                    failovers: w.failovers(),
                                });
                            }
                            if o.partition_backup && q == 0 && step == o.steps / 3 {
                                println!("cutting the backup server (rank 1) off at step {step}");
                                faults.partition(&[&[1]]);
                            }
                            if o.partition_backup && q == 0 && step == 2 * o.steps / 3 {
                                println!("healing the partition at step {step}");
                                faults.heal();
                            }
                            if o.heal_then_kill && q == 0 && step == cut_at {
                                println!("cutting the backup server (rank 1) off at step {step}");
                                faults.partition(&[&[1]]);
                            }
                            if o.heal_then_kill && q == 0 && step == heal_at {
                                println!("healing the partition at step {step}");
                                faults.heal();
                            }
                            if o.kills_primary() && q == 0 && step == o.steps / 2 {
                                println!("killing the primary server (rank 0) at step {step}");
                                faults.kill(0);
                            }
                            w.pull("w", step, &params)?;
                            let weights = w.comm().download(&params)?;
                            let (grad, loss) = shards[q].gradient(&weights);
                            if o.slow_worker && q == 0 {
                                // The emulated straggler.
                                std::thread::sleep(Duration::from_millis(o.slow_ms));
                            }
                            if q == 0 && step % (o.steps / 5).max(1) == 0 {
                                println!("step {step:>4}: worker 0 loss {loss:.3e}");
                            }
                            let g = w.comm().upload(&grad)?;
                            w.push("w", &g, step)?;
                        }
                        let (lost, failovers) = (w.lost_updates(), w.failovers());
                        w.done()?;
                        Ok(WorkerEnd {
                            finished: started.elapsed().as_secs_f64(),
                            lost,
                            failovers,
                        })
                    })
                })
                .collect();
            let ends = ws
                .into_iter()
                .map(|h| joined(h.join()))
                .collect::<wccl::Result<Vec<WorkerEnd>>>()?;
            // A killed server's report (or error) describes a world nobody else sees any more:
            // keep the survivors'.
            let reports = hs
                .into_iter()
                .enumerate()
                .filter_map(|(r, h)| {
                    let report = joined(h.join());
                    (!(o.kills_primary() && r == 0)).then_some(report)
                })
                .collect::<wccl::Result<Vec<ServerReport>>>()?;
            Ok((reports, ends))
        })?;
    // The first surviving server that holds `w` (with more servers than replicas some hold
    // nothing).
    let learned = reports
        .iter()
        .find_map(|r| r.params.iter().find(|(n, _)| n == "w"))
        .map(|(_, v)| v.clone())
        .ok_or_else(|| wccl::Error::InvalidArgument {
            at: wccl::At {
                rank: 0,
                op: None,
                seq: 0,
            },
            message: "no surviving server reports 'w'".into(),
        })?;
    let max_error = learned
        .iter()
        .zip(&truth)
        .map(|(l, t)| (*l as f64 - t).abs())
        .fold(0.0, f64::max);
    Ok(Outcome {
        truth,
        learned,
        max_error,
        seconds: started.elapsed().as_secs_f64(),
        finished: ends.iter().map(|e| e.finished).collect(),
        lost: ends.iter().map(|e| e.lost).sum(),
        failovers: ends.iter().map(|e| e.failovers).sum(),
        reports,
    })
}

/// A thread's result, a panic turned into an error.
fn joined<T>(r: std::thread::Result<wccl::Result<T>>) -> wccl::Result<T> {
    r.unwrap_or_else(|_| {
        Err(wccl::Error::Panicked {
            at: wccl::At {
                rank: 0,
                op: None,
                seq: 0,
            },
            message: "a parameter-server thread panicked".into(),
        })
    })
}

#[allow(dead_code)]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut o = Options::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mode" => {
                o.mode = match args.next().as_deref() {
                    Some("sync") => Mode::Sync,
                    Some("ssp") => Mode::BoundedStaleness(2),
                    Some("async") => Mode::Async,
                    other => return Err(format!("--mode sync|ssp|async, not {other:?}").into()),
                }
            }
            "--workers" => o.workers = args.next().ok_or("--workers N")?.parse()?,
            "--backups" => o.backups = args.next().ok_or("--backups N")?.parse()?,
            "--steps" => o.steps = args.next().ok_or("--steps N")?.parse()?,
            "--kill-worker" => o.kill_worker = true,
            "--kill-primary" => o.kill_primary = true,
            "--partition-backup" => o.partition_backup = true,
            "--heal-then-kill" => o.heal_then_kill = true,
            "--servers" => o.servers = Some(args.next().ok_or("--servers N")?.parse()?),
            "--replicas" => o.replicas = Some(args.next().ok_or("--replicas R")?.parse()?),
            "--consistency" => {
                o.consistency = match args.next().as_deref() {
                    Some("strong") => Consistency::Strong,
                    Some("eventual") => Consistency::Eventual,
                    other => {
                        return Err(format!("--consistency strong|eventual, not {other:?}").into());
                    }
                }
            }
            "--slow-worker" => o.slow_worker = true,
            "--slow-ms" => o.slow_ms = args.next().ok_or("--slow-ms N")?.parse()?,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    println!("training: {o:?}");
    let out = train(&o)?;
    for r in &out.reports {
        for e in &r.events {
            println!("server: {e}");
        }
        println!(
            "server: {} updates applied, {} late pushes dropped, {} duplicates",
            r.applied, r.late, r.duplicates
        );
    }
    // The fast workers' pace: the median worker's finish time.
    let mut fin = out.finished.clone();
    fin.sort_by(f64::total_cmp);
    let median = fin[fin.len() / 2];
    println!(
        "{} steps in {:.2} s; the median worker finished at {:.2} s ({:.0} steps/s)",
        o.steps,
        out.seconds,
        median,
        o.steps as f64 / median,
    );
    println!(
        "lost updates: {} ({} failovers, {:?}); final weight error (largest): {:.2e}",
        out.lost, out.failovers, o.consistency, out.max_error
    );
    if out.max_error > 1e-3 {
        return Err(format!("did not converge: error {:.2e}", out.max_error).into());
    }
    println!("converged: every weight within 1e-3 of the truth");
    Ok(())
}
