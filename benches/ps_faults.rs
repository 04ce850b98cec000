//! The replicated parameter server under faults, three measurements side by side in one run,
//! each against a baseline measured in the same run (only same-run ratios mean anything on a
//! loaded machine):
//!
//! - **Head-of-line**: 3 servers, 2 replicas (chains 0→1, 1→2, 2→0), `Strong`, `Sync`, 3
//!   workers, 3 keys; a worker's step is a pull and a push of every key. The link between the
//!   primary of key 0 (server 0) and its backup (server 1) is cut for the whole run, both ways;
//!   every other link stays up, so server 1 still serves key 1 and backs up nothing it cannot
//!   reach. Once the head drops the backup, steps should be as fast as fault-free ones: the
//!   median step time of the cut run over the fault-free run's, target at most 2x.
//! - **Failover**: a fresh group per kill (3 servers, 2 replicas, 2 workers, `Strong`, `Sync`,
//!   a 200 ms deadline); worker 0 kills the primary of key 0 right after a successful pull of
//!   it, then pulls the same step again: the time from the kill to that pull's success, p50
//!   and p99 over the kills, target p99 at most 0.5 s (ps-lite reports 0.8 s). Baseline: the
//!   same re-pull with nobody killed, one step earlier in the same run.
//! - **Silent failover**: the same shape under `Eventual` with one worker, the head of key 0 cut
//!   off from everyone instead of killed (a crash that closes no link): from the cut to the
//!   first successful pull, p50 and p99 over 30 runs, target p99 at most 0.5 s. (Under `Strong`
//!   the backup refuses a silent head by design.)
//! - **Straggler that comes and goes**: 1 server, 4 workers, 100 steps, one 15-value key. A
//!   step's compute is a 2 ms sleep; in every block of ten steps each worker sleeps 20 ms on
//!   one step (drawn from a seeded RNG, the same in both runs). Steps/s of the whole job
//!   (steps over the last worker's finish) under `BoundedStaleness(3)` over `Sync`'s, target at
//!   least 1.5x.
//!
//! Every run checks its result: the server's final parameters against a host f64 reference
//! (plain SGD, so the order the pushes applied in does not matter), and under `Strong` that no
//! worker lost an update.
//!
//! ```text
//! cargo bench --bench ps_faults              # 100 steps, 100 kills
//! cargo bench --bench ps_faults -- --quick   # 20 steps, 10 kills, 30 straggler steps (CI)
//! cargo bench --bench ps_faults -- --steps 50 --kills 40 --only failover  # or silent-failover
//! ```
//!
//! PASS/MISS says whether a target was met; it does not change the exit status (a loaded
//! machine can miss a ratio). A run that fails (an error, a wrong result, a lost update) exits
//! with status 1.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use wccl::link::FaultPlan;
use wccl::ps::{Consistency, Mode, ParameterServer, PsWorker, ServerReport, Sgd};

/// Why a measurement failed.
#[derive(Debug, thiserror::Error)]
enum BenchError {
    /// The library failed; `what` says where.
    #[error("{what}: {source}")]
    Ps {
        what: String,
        #[source]
        source: wccl::Error,
    },
    /// A run finished but its result is wrong.
    #[error("check failed: {0}")]
    Check(String),
    /// A thread of the run panicked.
    #[error("a {0} thread panicked")]
    Panicked(String),
    /// A command-line argument is malformed.
    #[error("bad argument: {0}")]
    Arg(String),
}

type Result<T> = std::result::Result<T, BenchError>;

/// Attaches `what` to a library error.
fn ctx(what: impl Into<String>) -> impl FnOnce(wccl::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Ps { what, source }
}

/// Learning rate of the plain SGD every run uses.
const LR: f32 = 0.01;

/// The gradient worker `q` pushes for `key` at `step`, element `i`: distinct per (worker,
/// element) over a period of 11 (not a power of two), so a swapped or dropped push shows.
fn grad_value(q: usize, key: usize, step: u64, i: usize) -> f32 {
    let n = (q * 7 + key * 3 + (step % 11) as usize * 5 + i) % 11;
    n as f32 / 11.0 - 0.45
}

fn grads(q: usize, key: usize, step: u64, len: usize) -> Vec<f32> {
    (0..len).map(|i| grad_value(q, key, step, i)).collect()
}

/// The initial value of `key`'s element `i`.
fn init_value(key: usize, i: usize) -> f32 {
    ((key * 5 + i) % 7) as f32 / 7.0
}

/// The final parameters after every worker pushed every step, in f64: plain SGD applies each
/// push's gradient scaled by 1/workers in `Sync` (the mean of the step) and in the other
/// modes alike, so the order does not matter.
fn reference(key: usize, len: usize, workers: usize, steps: u64) -> Vec<f64> {
    (0..len)
        .map(|i| {
            let mut w = init_value(key, i) as f64;
            for step in 0..steps {
                let sum: f64 = (0..workers)
                    .map(|q| grad_value(q, key, step, i) as f64)
                    .sum();
                w -= LR as f64 * sum / workers as f64;
            }
            w
        })
        .collect()
}

/// The shape of one group.
#[derive(Clone, Copy, Debug)]
struct Setup {
    servers: usize,
    workers: usize,
    replicas: usize,
    consistency: Consistency,
    mode: Mode,
    keys: usize,
    len: usize,
    timeout: Duration,
}

fn key_name(k: usize) -> String {
    format!("k{k}")
}

/// Key `k`'s chain: servers k, k+1, ... (mod servers), head first.
fn chain(s: &Setup, k: usize) -> Vec<usize> {
    (0..s.replicas).map(|j| (k + j) % s.servers).collect()
}

/// What a group's run returns: each worker's result (by index) and each server's.
struct Ran<T> {
    workers: Vec<Result<T>>,
    servers: Vec<Result<ServerReport>>,
}

/// Builds a group and runs `body` on every worker (its own thread; in `Sync` a push or pull
/// may wait for the others), then tells the servers it is done. The workers start together.
fn run_group<T, F>(s: &Setup, faults: &FaultPlan, before: impl FnOnce(), body: F) -> Result<Ran<T>>
where
    T: Send,
    F: Fn(&mut PsWorker, Instant) -> Result<T> + Sync,
{
    let mut b = ParameterServer::builder()
        .servers(s.servers)
        .workers(s.workers)
        .replicas(s.replicas)
        .consistency(s.consistency)
        .mode(s.mode)
        .rule(Sgd {
            lr: LR,
            momentum: 0.0,
        })
        .timeout(s.timeout)
        .faults(faults.clone());
    for k in 0..s.keys {
        b = b.param(key_name(k), (0..s.len).map(|i| init_value(k, i)).collect());
    }
    let (servers, workers) = b.build().map_err(ctx("building the group"))?;
    before();
    let start = Barrier::new(workers.len());
    let (start, body) = (&start, &body);
    let started = Instant::now();
    let (workers, servers) = std::thread::scope(|sc| {
        let hs: Vec<_> = servers
            .into_iter()
            .map(|sv| sc.spawn(move || sv.serve()))
            .collect();
        let ws: Vec<_> = workers
            .into_iter()
            .map(|mut w| {
                sc.spawn(move || -> Result<T> {
                    start.wait();
                    let out = body(&mut w, started)?;
                    let q = w.index();
                    w.done().map_err(ctx(format!("worker {q}: done")))?;
                    Ok(out)
                })
            })
            .collect();
        // A worker that failed drops its end: the servers see it gone and finish.
        let workers: Vec<Result<T>> = ws
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(BenchError::Panicked("worker".into())))
            })
            .collect();
        let servers: Vec<Result<ServerReport>> = hs
            .into_iter()
            .enumerate()
            .map(|(r, h)| match h.join() {
                Ok(rep) => rep.map_err(ctx(format!("server {r}"))),
                Err(_) => Err(BenchError::Panicked(format!("server {r}"))),
            })
            .collect();
        (workers, servers)
    });
    Ok(Ran { workers, servers })
}

/// Checks every key's final copy on the first live server of its chain (`dead` excluded)
/// against the reference; every other server must have returned Ok.
fn check_servers(
    s: &Setup,
    ran_servers: &[Result<ServerReport>],
    dead: Option<usize>,
    steps: u64,
) -> Result<()> {
    for (r, rep) in ran_servers.iter().enumerate() {
        if Some(r) == dead {
            continue;
        }
        if let Err(e) = rep {
            return Err(BenchError::Check(format!("a live server failed: {e}")));
        }
    }
    for k in 0..s.keys {
        let name = key_name(k);
        let held = chain(s, k)
            .into_iter()
            .filter(|&r| Some(r) != dead)
            .find_map(|r| {
                let rep = ran_servers.get(r)?.as_ref().ok()?;
                rep.params
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|p| (r, &p.1))
            });
        let Some((r, got)) = held else {
            return Err(BenchError::Check(format!(
                "no live server reports '{name}'"
            )));
        };
        let want = reference(k, s.len, s.workers, steps);
        if got.len() != want.len() {
            return Err(BenchError::Check(format!(
                "'{name}' on server {r}: {} values, want {}",
                got.len(),
                want.len()
            )));
        }
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            if (*g as f64 - w).abs() > 1e-4 * w.abs().max(1.0) {
                return Err(BenchError::Check(format!(
                    "'{name}'[{i}] on server {r} is {g}, the reference {w}"
                )));
            }
        }
    }
    Ok(())
}

/// The first few events each server reported (a backup dropped, a take-over), indented.
fn print_events(servers: &[Result<ServerReport>]) {
    for (r, rep) in servers.iter().enumerate() {
        if let Ok(rep) = rep {
            for e in rep.events.iter().take(3) {
                println!("    server {r}: {e}");
            }
            if rep.events.len() > 3 {
                println!("    server {r}: ({} more events)", rep.events.len() - 3);
            }
        }
    }
}

/// The workers' results, or the first error.
fn all<T>(ws: Vec<Result<T>>) -> Result<Vec<T>> {
    ws.into_iter().collect()
}

/// The nearest-rank percentile `p` (0..=100) of `v`, sorted; 0 for an empty `v`.
fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

fn ms(secs: f64) -> String {
    format!("{:.2} ms", secs * 1e3)
}

/// One step of every key: pull each (as of `step`), push each; returns when done.
fn step_all_keys(
    w: &mut PsWorker,
    s: &Setup,
    step: u64,
    bufs: &[wccl::DeviceBuffer<f32>],
) -> Result<()> {
    let q = w.index();
    for (k, buf) in bufs.iter().enumerate() {
        w.pull(&key_name(k), step, buf)
            .map_err(ctx(format!("worker {q}: pull of k{k} at step {step}")))?;
    }
    for k in 0..s.keys {
        let g = w
            .comm()
            .upload(&grads(q, k, step, s.len))
            .map_err(ctx(format!("worker {q}: upload")))?;
        w.push(&key_name(k), &g, step)
            .map_err(ctx(format!("worker {q}: push of k{k} at step {step}")))?;
    }
    Ok(())
}

fn key_buffers(w: &mut PsWorker, s: &Setup) -> Result<Vec<wccl::DeviceBuffer<f32>>> {
    (0..s.keys)
        .map(|_| w.comm().buffer::<f32>(s.len).map_err(ctx("buffer")))
        .collect()
}

/// Head-of-line: every worker's step times, fault-free or with the 0↔1 link cut, and every
/// server's events ("server r: ...").
fn head_of_line_run(s: &Setup, steps: u64, cut: bool) -> Result<(Vec<f64>, Vec<String>)> {
    let faults = FaultPlan::new();
    let ran = run_group(
        s,
        &faults,
        || {
            if cut {
                // Far more frames than any run sends: cut for the whole run, both ways.
                faults.drop_next(0, 1, usize::MAX / 2);
                faults.drop_next(1, 0, usize::MAX / 2);
            }
        },
        |w, _| {
            let bufs = key_buffers(w, s)?;
            let mut times = Vec::new();
            for step in 0..steps {
                let t = Instant::now();
                step_all_keys(w, s, step, &bufs)?;
                times.push(t.elapsed().as_secs_f64());
            }
            let q = w.index();
            if w.lost_updates() != 0 {
                return Err(BenchError::Check(format!(
                    "worker {q} lost {} updates under Strong",
                    w.lost_updates()
                )));
            }
            Ok(times)
        },
    )?;
    let times = all(ran.workers)?;
    check_servers(s, &ran.servers, None, steps)?;
    print_events(&ran.servers);
    let events = ran
        .servers
        .iter()
        .enumerate()
        .filter_map(|(r, rep)| Some((r, rep.as_ref().ok()?)))
        .flat_map(|(r, rep)| rep.events.iter().map(move |e| format!("server {r}: {e}")))
        .collect();
    Ok((times.concat(), events))
}

fn head_of_line(steps: u64) -> Result<bool> {
    let s = Setup {
        servers: 3,
        workers: 3,
        replicas: 2,
        consistency: Consistency::Strong,
        mode: Mode::Sync,
        keys: 3,
        len: 33,
        timeout: Duration::from_millis(500),
    };
    println!(
        "head-of-line: 3 servers, 2 replicas, Strong, Sync, 3 workers, 3 keys of 33, {steps} steps, deadline 500 ms"
    );
    let (base, base_events) = head_of_line_run(&s, steps, false)?;
    println!(
        "  fault-free:       median step {} (max {})",
        ms(median(&base)),
        ms(max(&base))
    );
    let (cut, _) = head_of_line_run(&s, steps, true)?;
    println!(
        "  backup cut (0-1): median step {} (max {})",
        ms(median(&cut)),
        ms(max(&cut))
    );
    let ratio = median(&cut) / median(&base);
    let ok = ratio <= 2.0;
    println!(
        "  ratio of medians {ratio:.2} (target <= 2.00): {}",
        verdict(ok)
    );
    // Nothing happens in a fault-free run: a server that dropped a backup there replicated
    // less than the cut run, and the ratio compares the wrong things.
    match base_events.first() {
        Some(first) => Err(BenchError::Check(format!(
            "the fault-free baseline was not: {} server events, the first: {first}",
            base_events.len()
        ))),
        None => Ok(ok),
    }
}

/// Failover in one fresh group: (baseline re-pull, re-pull after the kill) in seconds, and
/// whether the run's result was right (kept apart, so that the timings of a run that ends
/// wrong are still seen).
/// `show_events`: print the servers' events if the result is wrong.
fn failover_run(s: &Setup, seed: u64, show_events: bool) -> Result<((f64, f64), Result<()>)> {
    const STEPS: u64 = 4;
    let kill_at = rand::rngs::StdRng::seed_from_u64(seed).random_range(1..STEPS);
    let faults = FaultPlan::new();
    let faults_ref = &faults;
    let ran = run_group(
        s,
        &faults,
        || {},
        |w, _| {
            let bufs = key_buffers(w, s)?;
            let q = w.index();
            let mut timed = (0.0, 0.0);
            for step in 0..STEPS {
                if q == 0 && (step == kill_at - 1 || step == kill_at) {
                    // A pull of key 0 that succeeds, then (at kill_at) the primary's death and
                    // the same pull again: it can only succeed through the backup.
                    w.pull("k0", step, &bufs[0])
                        .map_err(ctx(format!("worker 0: pull of k0 at step {step}")))?;
                    let t = Instant::now();
                    if step == kill_at {
                        faults_ref.kill(0);
                    }
                    w.pull("k0", step, &bufs[0]).map_err(ctx(format!(
                        "worker 0: pull of k0 at step {step} after the kill"
                    )))?;
                    let d = t.elapsed().as_secs_f64();
                    if step == kill_at {
                        timed.1 = d;
                    } else {
                        timed.0 = d;
                    }
                }
                step_all_keys(w, s, step, &bufs)?;
            }
            if w.lost_updates() != 0 {
                return Err(BenchError::Check(format!(
                    "worker {q} lost {} updates under Strong",
                    w.lost_updates()
                )));
            }
            if q == 0 && w.failovers() == 0 {
                return Err(BenchError::Check("worker 0 never failed over".into()));
            }
            Ok(timed)
        },
    )?;
    let timed = all(ran.workers)?;
    let checked = check_servers(s, &ran.servers, Some(0), STEPS).map_err(|e| match e {
        BenchError::Check(m) => BenchError::Check(format!("primary killed at step {kill_at}: {m}")),
        other => other,
    });
    if checked.is_err() && show_events {
        print_events(&ran.servers);
    }
    Ok((timed[0], checked))
}

fn failover(kills: u64) -> Result<bool> {
    let s = Setup {
        servers: 3,
        workers: 2,
        replicas: 2,
        consistency: Consistency::Strong,
        mode: Mode::Sync,
        keys: 3,
        len: 33,
        timeout: Duration::from_millis(200),
    };
    println!(
        "failover: 3 servers, 2 replicas, Strong, Sync, 2 workers, deadline 200 ms, {kills} kills of key 0's primary"
    );
    let mut base = Vec::new();
    let mut after = Vec::new();
    let mut wrong = Vec::new();
    for i in 0..kills {
        match failover_run(&s, i, wrong.is_empty()) {
            Ok(((b, a), checked)) => {
                base.push(b);
                after.push(a);
                if let Err(e) = checked {
                    wrong.push(format!("kill {i}: {e}"));
                }
            }
            Err(e) => wrong.push(format!("kill {i}: {e}")),
        }
    }
    println!(
        "  {} of {kills} runs timed, {} wrong or failed",
        after.len(),
        wrong.len()
    );
    for w in wrong.iter().take(3) {
        println!("    {w}");
    }
    let (p50, p99) = (percentile(&after, 50.0), percentile(&after, 99.0));
    println!(
        "  re-pull, nobody killed: p50 {} p99 {}",
        ms(percentile(&base, 50.0)),
        ms(percentile(&base, 99.0))
    );
    println!(
        "  kill -> pull ok:        p50 {} p99 {} (max {}); p50 {:.1}x the baseline's",
        ms(p50),
        ms(p99),
        ms(max(&after)),
        p50 / percentile(&base, 50.0).max(1e-9)
    );
    let ok = p99 <= 0.5;
    println!(
        "  p99 {:.3} s (target <= 0.500 s; ps-lite: 0.8 s): {}",
        p99,
        verdict(ok)
    );
    match wrong.first() {
        Some(first) => Err(BenchError::Check(format!(
            "{} of {kills} failover runs wrong or failed; the first: {first}",
            wrong.len()
        ))),
        None => Ok(ok),
    }
}

/// Silent failover: the head of key 0 is cut off from everyone (a crash that closes no link),
/// `Eventual` (under `Strong` the backup refuses by design: it cannot tell a dead head from a
/// partitioned one). One worker pulls key 0, the head goes silent, and the same pull is timed
/// until it succeeds through the backup: the worker's ping finds the head silent after 1.5
/// deadlines, the backup's probe after half a deadline more.
fn silent_failover_run(s: &Setup, seed: u64) -> Result<f64> {
    const STEPS: u64 = 4;
    let cut_at = rand::rngs::StdRng::seed_from_u64(seed).random_range(1..STEPS);
    let faults = FaultPlan::new();
    let faults_ref = &faults;
    let everyone_else: Vec<usize> = (1..s.servers + s.workers).collect();
    let ran = run_group(
        s,
        &faults,
        || {},
        |w, _| {
            let bufs = key_buffers(w, s)?;
            let mut took = 0.0;
            for step in 0..STEPS {
                if step == cut_at {
                    w.pull("k0", step, &bufs[0])
                        .map_err(ctx(format!("pull of k0 at step {step}")))?;
                    let t = Instant::now();
                    faults_ref.partition(&[&[0], &everyone_else]);
                    let info = w
                        .pull("k0", step, &bufs[0])
                        .map_err(ctx(format!("pull of k0 at step {step} after the cut")))?;
                    took = t.elapsed().as_secs_f64();
                    if info.staleness.is_none() {
                        return Err(BenchError::Check(
                            "the answer after the cut is not marked stale".into(),
                        ));
                    }
                }
                step_all_keys(w, s, step, &bufs)?;
            }
            Ok(took)
        },
    )?;
    let took = all(ran.workers)?;
    Ok(took[0])
}

fn silent_failover(runs: u64) -> Result<bool> {
    let s = Setup {
        servers: 3,
        workers: 1,
        replicas: 2,
        consistency: Consistency::Eventual,
        mode: Mode::Sync,
        keys: 3,
        len: 33,
        timeout: Duration::from_millis(200),
    };
    println!(
        "silent failover: 3 servers, 2 replicas, Eventual, Sync, 1 worker, deadline 200 ms, {runs} heads of key 0 cut off from everyone"
    );
    let mut took = Vec::new();
    let mut failed = Vec::new();
    for i in 0..runs {
        match silent_failover_run(&s, i) {
            Ok(t) => took.push(t),
            Err(e) => failed.push(format!("run {i}: {e}")),
        }
    }
    println!(
        "  {} of {runs} runs timed, {} failed",
        took.len(),
        failed.len()
    );
    for f in failed.iter().take(3) {
        println!("    {f}");
    }
    let (p50, p99) = (percentile(&took, 50.0), percentile(&took, 99.0));
    println!(
        "  cut -> pull ok: p50 {} p99 {} (max {}); 1.5 deadlines + half a deadline = 400 ms is the design",
        ms(p50),
        ms(p99),
        ms(max(&took))
    );
    let ok = p99 <= 0.5;
    println!("  p99 {p99:.3} s (target <= 0.500 s): {}", verdict(ok));
    match failed.first() {
        Some(first) => Err(BenchError::Check(format!(
            "{} of {runs} silent failover runs failed; the first: {first}",
            failed.len()
        ))),
        None => Ok(ok),
    }
}

/// Straggler: steps/s of the whole job and of the median worker.
fn straggler_run(s: &Setup, steps: u64, slow: &[(u64, usize)]) -> Result<(f64, f64)> {
    let faults = FaultPlan::new();
    let ran = run_group(
        s,
        &faults,
        || {},
        |w, started| {
            let q = w.index();
            let buf = w.comm().buffer::<f32>(s.len).map_err(ctx("buffer"))?;
            for step in 0..steps {
                w.pull("k0", step, &buf)
                    .map_err(ctx(format!("worker {q}: pull at step {step}")))?;
                // The emulated compute: 2 ms, ten times that on this worker's slow steps.
                let slow_now = slow.contains(&(step, q));
                std::thread::sleep(Duration::from_millis(if slow_now { 20 } else { 2 }));
                let g = w
                    .comm()
                    .upload(&grads(q, 0, step, s.len))
                    .map_err(ctx("upload"))?;
                w.push("k0", &g, step)
                    .map_err(ctx(format!("worker {q}: push at step {step}")))?;
            }
            Ok(started.elapsed().as_secs_f64())
        },
    )?;
    let finished = all(ran.workers)?;
    check_servers(s, &ran.servers, None, steps)?;
    Ok((
        steps as f64 / max(&finished),
        steps as f64 / median(&finished),
    ))
}

fn straggler(steps: u64) -> Result<bool> {
    let mut s = Setup {
        servers: 1,
        workers: 4,
        replicas: 1,
        consistency: Consistency::Strong,
        mode: Mode::Sync,
        keys: 1,
        len: 15,
        timeout: Duration::from_secs(2),
    };
    // Each worker is slow on one random step of every block of ten (a straggler that comes
    // and goes, on every worker in turn), the same schedule in both runs. (With one slow
    // worker per block in all, BoundedStaleness(s) absorbs only s steps of each 9-step delay:
    // 1.1-1.2x measured, below 1.5x whatever the server does.)
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    let slow: Vec<(u64, usize)> = (0..steps.div_ceil(10))
        .flat_map(|b| {
            (0..s.workers)
                .map(|q| (b * 10 + rng.random_range(0..10), q))
                .collect::<Vec<_>>()
        })
        .filter(|(t, _)| *t < steps)
        .collect();
    println!(
        "straggler: 1 server, 4 workers, {steps} steps, 2 ms compute, 20 ms on {} (step, worker) pairs",
        slow.len()
    );
    // No mode beats the slowest worker's own compute; Sync waits for each step's slowest.
    let compute = |t: u64, q: usize| if slow.contains(&(t, q)) { 20.0 } else { 2.0 };
    let sync_ideal: f64 = (0..steps)
        .map(|t| (0..s.workers).map(|q| compute(t, q)).fold(0.0, f64::max))
        .sum();
    let own_ideal = (0..s.workers)
        .map(|q| (0..steps).map(|t| compute(t, q)).sum::<f64>())
        .fold(0.0, f64::max);
    println!(
        "  compute alone (no overhead): Sync {sync_ideal:.0} ms, the slowest worker's own {own_ideal:.0} ms: the ratio cannot beat {:.2}",
        sync_ideal / own_ideal
    );
    let (sync_job, sync_med) = straggler_run(&s, steps, &slow)?;
    println!("  Sync:                 {sync_job:.1} steps/s (median worker {sync_med:.1})");
    s.mode = Mode::BoundedStaleness(3);
    let (bs_job, bs_med) = straggler_run(&s, steps, &slow)?;
    println!("  BoundedStaleness(3):  {bs_job:.1} steps/s (median worker {bs_med:.1})");
    let ratio = bs_job / sync_job;
    let ok = ratio >= 1.5;
    println!(
        "  ratio BS(3)/Sync {ratio:.2} (median workers {:.2}; target >= 1.50): {}",
        bs_med / sync_med,
        verdict(ok)
    );
    Ok(ok)
}

/// What to run, from the command line.
struct Args {
    steps: u64,
    straggler_steps: u64,
    kills: u64,
    only: Option<String>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        steps: 100,
        straggler_steps: 100,
        kills: 100,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    let number = |flag: &str, v: Option<String>| -> Result<u64> {
        v.as_deref()
            .and_then(|v| v.parse().ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| BenchError::Arg(format!("{flag} takes a positive number")))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => {
                a.steps = 20;
                a.straggler_steps = 30;
                a.kills = 10;
            }
            "--steps" => {
                a.steps = number("--steps", it.next())?;
                a.straggler_steps = a.steps;
            }
            "--kills" => a.kills = number("--kills", it.next())?,
            "--only" => {
                let v = it.next().unwrap_or_default();
                if !["head-of-line", "failover", "silent-failover", "straggler"]
                    .contains(&v.as_str())
                {
                    return Err(BenchError::Arg(format!(
                        "--only head-of-line|failover|silent-failover|straggler, not {v:?}"
                    )));
                }
                a.only = Some(v);
            }
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            other => return Err(BenchError::Arg(format!("unknown argument {other}"))),
        }
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let wanted = |name: &str| args.only.as_deref().is_none_or(|o| o == name);
    let mut failed = false;
    let mut verdicts = Vec::new();
    type Measure = Box<dyn Fn() -> Result<bool>>;
    let (steps, kills, ssteps) = (args.steps, args.kills, args.straggler_steps);
    let measures: [(&str, Measure); 4] = [
        ("head-of-line", Box::new(move || head_of_line(steps))),
        ("failover", Box::new(move || failover(kills))),
        (
            "silent-failover",
            Box::new(move || silent_failover(kills.min(30))),
        ),
        ("straggler", Box::new(move || straggler(ssteps))),
    ];
    for (name, m) in measures {
        if !wanted(name) {
            continue;
        }
        let t = Instant::now();
        match m() {
            Ok(ok) => verdicts.push(format!("{name}: {}", verdict(ok))),
            Err(e) => {
                println!("  {name} FAILED: {e}");
                verdicts.push(format!("{name}: FAILED"));
                failed = true;
            }
        }
        println!("  ({name} took {:.1} s)", t.elapsed().as_secs_f64());
    }
    println!("summary: {}", verdicts.join(", "));
    if failed {
        std::process::exit(1);
    }
}
