//! Data-parallel SGD through the parameter server on a synthetic linear-regression problem:
//! every worker has the same model and its own data; the servers aggregate the gradients on
//! their devices and apply SGD. Prints what happened and the loss; the weights converge to the
//! true ones.
//!
//! ```text
//! cargo run --release --example ps_training -- [--mode sync|ssp|async] [--workers 4]
//!     [--kill-worker] [--slow-worker] [--backups 1] [--steps 300]
//! ```
//! `--kill-worker` drops worker 1 halfway (its link closes; the servers go on without it),
//! `--kill-primary` runs two replicated servers (Strong) and kills the primary halfway (the
//! backup takes over; no update the workers saw is lost),
//! `--partition-backup` runs two replicated servers and cuts the backup (rank 1) off from
//! everyone for the middle third of the run (the primary stops replicating to it),
//! `--slow-worker` makes worker 0 sleep `--slow-ms` (default 16, about ten times the others'
//! step time on the software adapter) every step.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use wccl::link::FaultPlan;
use wccl::ps::{Mode, ParameterServer, ServerReport, Sgd};

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
    pub slow_worker: bool,
    pub slow_ms: u64,
    pub dim: usize,
    pub rows: usize,
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
            slow_worker: false,
            slow_ms: 16,
            dim: 16,
            rows: 64,
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
    pub reports: Vec<ServerReport>,
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
    let n_servers = if o.kill_primary || o.partition_backup {
        2
    } else {
        1
    };
    let (servers, workers) = ParameterServer::builder()
        .servers(n_servers)
        .replicas(n_servers)
        .faults(faults.clone())
        .workers(o.workers)
        .backups(o.backups)
        .mode(o.mode)
        .rule(Sgd {
            lr: 0.2,
            momentum: 0.5,
        })
        .param("w", vec![0.0; o.dim])
        .timeout(Duration::from_secs(10))
        .build()?;
    let started = Instant::now();
    let shards = &shards;
    let faults = &faults;
    let (reports, finished) =
        std::thread::scope(|s| -> wccl::Result<(Vec<ServerReport>, Vec<f64>)> {
            let hs: Vec<_> = servers
                .into_iter()
                .map(|sv| s.spawn(move || sv.serve()))
                .collect();
            let ws: Vec<_> = workers
                .into_iter()
                .map(|mut w| {
                    s.spawn(move || -> wccl::Result<f64> {
                        let q = w.index();
                        let params = w.comm().buffer::<f32>(o.dim)?;
                        for step in 0..o.steps {
                            if o.kill_worker && q == 1 && step == o.steps / 2 {
                                println!("worker {q}: killed at step {step}");
                                // Dropped without a word: its link closes.
                                return Ok(started.elapsed().as_secs_f64());
                            }
                            if o.partition_backup && q == 0 && step == o.steps / 3 {
                                println!("cutting the backup server (rank 1) off at step {step}");
                                faults.partition(&[&[1]]);
                            }
                            if o.partition_backup && q == 0 && step == 2 * o.steps / 3 {
                                println!("healing the partition at step {step}");
                                faults.heal();
                            }
                            if o.kill_primary && q == 0 && step == o.steps / 2 {
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
                        w.done()?;
                        Ok(started.elapsed().as_secs_f64())
                    })
                })
                .collect();
            let finished = ws
                .into_iter()
                .map(|h| joined(h.join()))
                .collect::<wccl::Result<Vec<f64>>>()?;
            // A killed server's report (or error) describes a world nobody else sees any more:
            // keep the survivors'.
            let reports = hs
                .into_iter()
                .enumerate()
                .filter_map(|(r, h)| {
                    let report = joined(h.join());
                    (!(o.kill_primary && r == 0)).then_some(report)
                })
                .collect::<wccl::Result<Vec<ServerReport>>>()?;
            Ok((reports, finished))
        })?;
    let learned = reports[0].params[0].1.clone();
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
        finished,
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
        "{} steps in {:.2} s; the median worker finished at {:.2} s ({:.0} steps/s); largest weight error {:.2e}",
        o.steps,
        out.seconds,
        median,
        o.steps as f64 / median,
        out.max_error
    );
    if out.max_error > 1e-3 {
        return Err(format!("did not converge: error {:.2e}", out.max_error).into());
    }
    println!("converged: every weight within 1e-3 of the truth");
    Ok(())
}
