//! Chain replication of parameter-server keys, chains of any length: key k lives on servers
//! k, k+1, ..., k+R-1 (mod S), head first, so with more keys than servers the chains wrap
//! around and every server is head of some keys and backup of others (a cycle).
//!
//! Every check compares against an f64 host reference of the whole run, inputs are distinct per
//! (worker, key, element) over a period of 97, and every pull lands in a buffer poisoned with
//! NaN first. Every run is bounded by the builder's deadline: a hang comes back as an error,
//! and threads return their errors to the test instead of panicking inside the scope.
//!
//! `PS_CHAINS_SEED=<n>` replays the random primary kills of a failed run.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wccl::link::FaultPlan;
use wccl::ps::{Consistency, Mode, ParameterServer, PsWorker, ServerReport, Sgd, UpdateRule};

/// SGD with momentum, so that a replica that missed the optimiser state shows too.
const RULE: Sgd = Sgd {
    lr: 0.1,
    momentum: 0.5,
};

/// Initial value of element `i` of key `k`: distinct per element over a period of 29.
fn init(k: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 13 + k * 5) % 29) as f32 / 16.0 - 0.875)
        .collect()
}

/// Worker `q`'s gradient of key `k` at step `t`: distinct per (worker, key, element) over a
/// period of 97 (not a power of two), shifted by `salt` per run. Multiples of 1/64, exact in
/// f32.
fn grad(salt: usize, q: usize, k: usize, t: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 31 + q * 17 + k * 11 + t * 7 + salt) % 97) as f32 / 64.0 - 0.75)
        .collect()
}

/// One parameter server run's shape.
#[derive(Clone, Debug)]
struct Spec {
    servers: usize,
    replicas: usize,
    workers: usize,
    consistency: Consistency,
    names: Vec<String>,
    sizes: Vec<usize>,
    steps: usize,
    salt: usize,
    timeout: Duration,
}

impl Spec {
    /// Key `k`'s chain, head first, computed here independently of the library.
    fn chain(&self, k: usize) -> Vec<usize> {
        (0..self.replicas).map(|j| (k + j) % self.servers).collect()
    }
}

/// The reference parameters: `[step][key][element]`.
type Refs = Vec<Vec<Vec<f64>>>;

/// `refs[t][k]`: key k's parameters after the updates of steps `0..t` (Sync: each step's
/// gradients averaged over the workers), in f64.
fn reference(spec: &Spec) -> Refs {
    let mut w: Vec<Vec<f64>> = spec
        .sizes
        .iter()
        .enumerate()
        .map(|(k, &n)| init(k, n).into_iter().map(f64::from).collect())
        .collect();
    let mut m: Vec<Vec<f64>> = spec.sizes.iter().map(|&n| vec![0.0; n]).collect();
    let mut out = vec![w.clone()];
    for t in 0..spec.steps {
        for (k, &n) in spec.sizes.iter().enumerate() {
            let gs: Vec<Vec<f32>> = (0..spec.workers)
                .map(|q| grad(spec.salt, q, k, t, n))
                .collect();
            for i in 0..n {
                let g = gs.iter().map(|g| f64::from(g[i])).sum::<f64>() / spec.workers as f64;
                (w[k][i], m[k][i]) = RULE.host(w[k][i], m[k][i], g);
            }
        }
        out.push(w.clone());
    }
    out
}

/// `got` against `want`, element by element (NaN, the poison, never matches).
fn compare(what: &str, got: &[f32], want: &[f64]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} values, expected {}",
            got.len(),
            want.len()
        ));
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        // A few f32 roundings per step on values of magnitude ~1; a missed or doubled update
        // moves an element by lr * |g|, orders of magnitude more.
        let tol = 1e-5 * (1.0 + w.abs());
        let diff = (f64::from(*g) - w).abs();
        if diff.is_nan() || diff > tol {
            return Err(format!("{what}: element {i} is {g}, expected {w}"));
        }
    }
    Ok(())
}

/// What one worker ends with.
#[derive(Debug)]
struct WorkerOut {
    /// Its final pull (step `steps`) of every key.
    finals: Vec<Vec<f32>>,
    /// `PullInfo::replicas` of the first key's pull at each step.
    replicas: Vec<usize>,
    lost: u64,
    failovers: u64,
}

/// What a whole run ends with; every thread's failure as text, none of them panicking.
struct Outcome {
    workers: Vec<Result<WorkerOut, String>>,
    servers: Vec<Result<ServerReport, String>>,
}

impl Outcome {
    /// Every worker's result, or the first error together with the servers' events.
    fn workers_ok(&self) -> Result<Vec<&WorkerOut>, String> {
        self.workers
            .iter()
            .map(|w| w.as_ref().map_err(|e| format!("{e}; {}", self.events())))
            .collect()
    }

    /// The servers' events and errors, for failure messages.
    fn events(&self) -> String {
        let mut s = String::new();
        for (r, rep) in self.servers.iter().enumerate() {
            match rep {
                Ok(rep) => s.push_str(&format!("server {r} events {:?}; ", rep.events)),
                Err(e) => s.push_str(&format!("server {r} failed: {e}; ")),
            }
        }
        s
    }
}

/// Called by each worker (its index, the step, a probe) just before it pulls that step: fault
/// injection. The probe pulls the first key again at the step before (a read: it applies no
/// update, though the worker counts it like any pull, failovers included) and returns how many
/// replicas the answer reported: a hook can wait on it for a state of the servers instead of
/// guessing how many steps that state takes to reach.
type Hook<'a> = &'a (dyn Fn(usize, usize, Probe<'_>) -> Result<(), String> + Sync);

/// See [`Hook`].
type Probe<'a> = &'a mut dyn FnMut() -> Result<usize, String>;

/// One worker's run: per step t, pull every key at t into a poisoned buffer and (for
/// `t < exact_before`) check the version and the values against `refs[t]`, then push its
/// gradient of every key; finally pull every key at `steps`.
fn work(
    w: &mut PsWorker,
    spec: &Spec,
    refs: &[Vec<Vec<f64>>],
    exact_before: usize,
    hook: Hook<'_>,
) -> Result<(Vec<Vec<f32>>, Vec<usize>), String> {
    let q = w.index();
    let mut replicas = Vec::new();
    let err = |what: String| move |e: wccl::Error| format!("worker {q}: {what}: {e}");
    let poison: Vec<Vec<f32>> = spec.sizes.iter().map(|&n| vec![f32::NAN; n]).collect();
    let mut bufs = Vec::new();
    for &n in &spec.sizes {
        bufs.push(w.comm().buffer::<f32>(n).map_err(err("buffer".into()))?);
    }
    let mut finals = Vec::new();
    for (t, want) in refs.iter().enumerate().take(spec.steps + 1) {
        let mut probe = || -> Result<usize, String> {
            let step = t.saturating_sub(1) as u64;
            let info = w
                .pull(&spec.names[0], step, &bufs[0])
                .map_err(err(format!("probe '{}' at step {step}", spec.names[0])))?;
            Ok(info.replicas)
        };
        hook(q, t, &mut probe)?;
        for (k, name) in spec.names.iter().enumerate() {
            w.comm()
                .write(&bufs[k], &poison[k])
                .map_err(err("poison".into()))?;
            let info = w
                .pull(name, t as u64, &bufs[k])
                .map_err(err(format!("pull '{name}' at step {t}")))?;
            if k == 0 {
                replicas.push(info.replicas);
            }
            let got = w
                .comm()
                .download(&bufs[k])
                .map_err(err("download".into()))?;
            if t < exact_before {
                if info.version != t as u64 {
                    return Err(format!(
                        "worker {q}: pull '{name}' at step {t} answered version {}",
                        info.version
                    ));
                }
                compare(
                    &format!("worker {q}: pull '{name}' at step {t}"),
                    &got,
                    &want[k],
                )?;
            }
            if t == spec.steps {
                finals.push(got);
            }
        }
        if t < spec.steps {
            for (k, name) in spec.names.iter().enumerate() {
                let g = grad(spec.salt, q, k, t, spec.sizes[k]);
                let g = w.comm().upload(&g).map_err(err("upload".into()))?;
                w.push(name, &g, t as u64)
                    .map_err(err(format!("push '{name}' at step {t}")))?;
            }
        }
    }
    Ok((finals, replicas))
}

/// Builds the group of `spec` with `faults`, serves on one thread per server and works on one
/// thread per worker (in Sync a push is a barrier across workers), and joins them all.
fn run_group(
    spec: &Spec,
    faults: &FaultPlan,
    refs: &[Vec<Vec<f64>>],
    exact_before: usize,
    hook: Hook<'_>,
) -> Result<Outcome, String> {
    let mut b = ParameterServer::builder()
        .servers(spec.servers)
        .workers(spec.workers)
        .replicas(spec.replicas)
        .consistency(spec.consistency)
        .mode(Mode::Sync)
        .rule(RULE)
        .timeout(spec.timeout)
        .faults(faults.clone());
    for (k, (name, &n)) in spec.names.iter().zip(&spec.sizes).enumerate() {
        b = b.param(name.clone(), init(k, n));
    }
    let (servers, workers) = b.build().map_err(|e| format!("build {spec:?}: {e}"))?;
    Ok(std::thread::scope(|s| {
        let hs: Vec<_> = servers
            .into_iter()
            .map(|sv| s.spawn(move || sv.serve().map_err(|e| e.to_string())))
            .collect();
        let ws: Vec<_> = workers
            .into_iter()
            .map(|mut w| {
                s.spawn(move || -> Result<WorkerOut, String> {
                    // On an error the worker is dropped without `done`: its links close and
                    // the servers see it gone instead of waiting for it.
                    let (finals, replicas) = work(&mut w, spec, refs, exact_before, hook)?;
                    let (lost, failovers) = (w.lost_updates(), w.failovers());
                    let q = w.index();
                    w.done().map_err(|e| format!("worker {q}: done: {e}"))?;
                    Ok(WorkerOut {
                        finals,
                        replicas,
                        lost,
                        failovers,
                    })
                })
            })
            .collect();
        Outcome {
            workers: ws.into_iter().map(|h| join(h.join(), "worker")).collect(),
            servers: hs.into_iter().map(|h| join(h.join(), "server")).collect(),
        }
    }))
}

/// A joined thread's result; a panic becomes an error naming the thread.
fn join<T>(r: std::thread::Result<Result<T, String>>, who: &str) -> Result<T, String> {
    match r {
        Ok(r) => r,
        Err(_) => Err(format!("{who} thread panicked")),
    }
}

/// Key `name`'s final copy in a server's report.
fn held<'a>(rep: &'a ServerReport, name: &str) -> Option<&'a [f32]> {
    rep.params
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
}

/// Key `name`'s digest in a server's report.
fn digest(rep: &ServerReport, name: &str) -> Option<u64> {
    rep.digests.iter().find(|(n, _)| n == name).map(|d| d.1)
}

/// Five keys of different odd sizes: with 3 to 5 servers every server heads a chain and the
/// chains of the last keys wrap around to server 0.
fn five_keys() -> (Vec<String>, Vec<usize>) {
    let sizes = vec![7, 33, 101, 255, 3];
    ((0..sizes.len()).map(|k| format!("k{k}")).collect(), sizes)
}

/// One fault-free run of `servers`, `replicas`, `consistency`; the first failed check as text.
fn chain_run(servers: usize, replicas: usize, consistency: Consistency) -> Result<(), String> {
    let (names, sizes) = five_keys();
    let spec = Spec {
        servers,
        replicas,
        workers: 3,
        consistency,
        names,
        sizes,
        steps: 4,
        salt: servers * 10 + replicas,
        timeout: Duration::from_secs(3),
    };
    let refs = reference(&spec);
    let out = run_group(&spec, &FaultPlan::new(), &refs, usize::MAX, &|_, _, _| {
        Ok(())
    })?;
    for w in out.workers_ok()? {
        for (k, name) in spec.names.iter().enumerate() {
            compare(
                &format!("final pull of '{name}'"),
                &w.finals[k],
                &refs[spec.steps][k],
            )?;
        }
        if w.lost != 0 || w.failovers != 0 {
            return Err(format!(
                "fault-free run: {} lost, {} failovers",
                w.lost, w.failovers
            ));
        }
    }
    let events = out.events();
    let reps: Vec<&ServerReport> = out
        .servers
        .iter()
        .enumerate()
        .map(|(r, rep)| {
            rep.as_ref()
                .map_err(|e| format!("server {r}: {e}; {events}"))
        })
        .collect::<Result<_, _>>()?;
    for (k, name) in spec.names.iter().enumerate() {
        let chain = spec.chain(k);
        // Head, middle and tail alike hold the final parameters once the workers are done.
        for &r in &chain {
            let got = held(reps[r], name)
                .ok_or_else(|| format!("server {r} (chain {chain:?}) reports no '{name}'"))?;
            compare(
                &format!("server {r}'s '{name}' (chain {chain:?})"),
                got,
                &refs[spec.steps][k],
            )
            .map_err(|e| format!("{e}; {events}"))?;
        }
        let digests: Vec<Option<u64>> = chain.iter().map(|&r| digest(reps[r], name)).collect();
        if digests[0].is_none() || digests.iter().any(|d| *d != digests[0]) {
            return Err(format!(
                "'{name}': digests {digests:?} along chain {chain:?}"
            ));
        }
    }
    Ok(())
}

/// Every (servers, replicas) in {3,4,5} x {2,3} under `consistency`: all failures, not just
/// the first.
fn chains_and_cycles(consistency: Consistency) {
    let start = Instant::now();
    let mut failures = Vec::new();
    for servers in 3..=5 {
        for replicas in [2, 3] {
            let t = Instant::now();
            let r = chain_run(servers, replicas, consistency);
            eprintln!(
                "{consistency:?} servers {servers} replicas {replicas}: {:?} in {:.1?}",
                r.as_ref().map(|_| "ok"),
                t.elapsed()
            );
            if let Err(e) = r {
                failures.push(format!("servers {servers}, replicas {replicas}: {e}"));
            }
        }
    }
    eprintln!("{consistency:?} chains: {:.1?}", start.elapsed());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Strong, fault-free, chains of 2 and 3 over 3 to 5 servers with wrap-around: every pull
/// answers exactly step t's version and values, and every replica of every key (head, middle
/// and tail) ends with the reference parameters and the same digest.
#[test]
fn strong_chains_and_cycles_apply_every_step_on_every_replica() {
    chains_and_cycles(Consistency::Strong);
}

/// Eventual, fault-free, the same shapes: the same exact answers, and once the workers are
/// done the update has propagated to the tail (every replica holds the reference, digests
/// agree).
#[test]
fn eventual_chains_and_cycles_converge_on_every_replica() {
    chains_and_cycles(Consistency::Eventual);
}

/// The seed of the random runs: `PS_CHAINS_SEED` if set, else the clock; printed.
fn seed() -> u64 {
    let seed = std::env::var("PS_CHAINS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
    eprintln!("PS_CHAINS_SEED={seed}");
    seed
}

/// 3 servers, every key on all three (`replicas(3)`), Strong, Sync, 2 workers; worker 0 kills
/// `victim` just before its pull of step `kill_at` (`steps` = the final pull).
fn kill_run(victim: usize, kill_at: usize, salt: usize) -> Result<(), String> {
    let spec = Spec {
        servers: 3,
        replicas: 3,
        workers: 2,
        consistency: Consistency::Strong,
        // One key headed by each server.
        names: vec!["a".into(), "b".into(), "c".into()],
        sizes: vec![7, 13, 3],
        steps: 4,
        salt,
        timeout: Duration::from_secs(3),
    };
    killed_run(spec, victim, kill_at)
}

/// `spec` (Strong) with worker 0 killing `victim` just before its pull of step `kill_at`:
/// nothing lost, every pull and every surviving replica exact.
fn killed_run(spec: Spec, victim: usize, kill_at: usize) -> Result<(), String> {
    let refs = reference(&spec);
    let faults = FaultPlan::new();
    let hook = |q: usize, t: usize, _: Probe<'_>| {
        if q == 0 && t == kill_at {
            faults.kill(victim);
        }
        Ok(())
    };
    let out = run_group(&spec, &faults, &refs, usize::MAX, &hook)?;
    let ws = out.workers_ok()?;
    for (q, w) in ws.iter().enumerate() {
        if w.lost != 0 {
            return Err(format!(
                "worker {q} lost {} updates; {}",
                w.lost,
                out.events()
            ));
        }
        for (k, name) in spec.names.iter().enumerate() {
            compare(
                &format!("worker {q}'s final pull of '{name}'"),
                &w.finals[k],
                &refs[spec.steps][k],
            )?;
        }
    }
    // Every key's head was among the three, and every worker pulls every key after the kill:
    // someone turned to a replica.
    if ws.iter().all(|w| w.failovers == 0) {
        return Err(format!("no worker failed over; {}", out.events()));
    }
    for (r, rep) in out.servers.iter().enumerate() {
        match (r == victim, rep) {
            // What the killed server's thread returns is the harness's, not wccl's: a killed
            // process returns nothing. Killed before the final pull, it may already have had
            // worker 1's `done` (Sync lets worker 1 finish while worker 0 is still to pull), and
            // then returns Ok. That the kill took effect is checked above: workers failed over.
            (true, _) => {}
            (false, Err(e)) => return Err(format!("surviving server {r}: {e}")),
            (false, Ok(rep)) => {
                for (k, name) in spec.names.iter().enumerate() {
                    if !spec.chain(k).contains(&r) {
                        continue;
                    }
                    let got =
                        held(rep, name).ok_or_else(|| format!("server {r} reports no '{name}'"))?;
                    compare(&format!("server {r}'s '{name}'"), got, &refs[spec.steps][k])?;
                }
            }
        }
    }
    Ok(())
}

/// 100 kills of a random server (head of one key, backup of the two others) at a random step,
/// Strong: no worker loses an update it was answered with, every step's pull is exact, the
/// final parameters on the workers and on both survivors equal the fault-free reference, and
/// only the killed server's `serve` fails.
#[test]
fn strong_survives_a_hundred_random_kills_in_three_way_chains() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let start = Instant::now();
    let runs = 100;
    for run in 0..runs {
        let victim = rng.random_range(0..3);
        let kill_at = rng.random_range(0..=4);
        let salt = rng.random_range(0..97);
        let t = Instant::now();
        if let Err(e) = kill_run(victim, kill_at, salt) {
            panic!(
                "PS_CHAINS_SEED={seed}, run {run}: kill server {victim} before step {kill_at} \
                 (after {:.1?}): {e}",
                t.elapsed()
            );
        }
    }
    eprintln!("{runs} kills in {:.1?}", start.elapsed());
}

/// Churn over every shape of `chains_and_cycles` (3 to 5 servers, chains of 2 and 3, cycles
/// included), Strong: one random server (head of some keys, middle or tail of others) killed at
/// a random step, two runs per shape; every pull exact, nothing lost, every surviving replica
/// of every key equal to the f64 reference.
#[test]
fn strong_chains_of_every_shape_survive_a_random_kill() {
    let mut rng = StdRng::seed_from_u64(seed());
    let mut failures = Vec::new();
    for servers in 3..=5 {
        for replicas in [2, 3] {
            for round in 0..2 {
                let (names, sizes) = five_keys();
                let spec = Spec {
                    servers,
                    replicas,
                    workers: 2,
                    consistency: Consistency::Strong,
                    names,
                    sizes,
                    steps: 4,
                    salt: 100 + servers * 10 + replicas + round,
                    timeout: Duration::from_secs(3),
                };
                let victim = rng.random_range(0..servers);
                let kill_at = rng.random_range(0..=spec.steps);
                if let Err(e) = killed_run(spec, victim, kill_at) {
                    failures.push(format!(
                        "servers {servers}, replicas {replicas}, kill {victim} before step {kill_at}: {e}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// 3 servers, one key 'w' with chain 0 -> 1 (-> 2), 2 workers, Sync. Before step 2 `backup`
/// is partitioned from everyone; before step 4 the partition heals; before step 9 the head
/// (server 0) is killed; 12 steps. Returns the outcome, the spec and the reference.
///
/// Under `Strong` the kill waits until the healed backup has rejoined: before step 9 both
/// workers stop, worker 0 pulls 'w' again until the answer reports every replica (the backup
/// acknowledged the state it was sent), then kills the head and lets worker 1 go on. How long
/// the rejoin takes is up to the machine (the head pings the backup with every update after
/// the heal, and every deadline when idle); the order is not. The price: the head dies while
/// both workers are idle, not with worker 1's requests in flight (`killed_run` covers kills
/// amid traffic). Under `Eventual` the kill comes before step 9 whatever the backup holds: what
/// that loses is counted, which is what that test checks.
fn heal_then_kill_run(
    replicas: usize,
    backup: usize,
    consistency: Consistency,
    exact_before: usize,
) -> Result<(Outcome, Spec, Refs), String> {
    let spec = Spec {
        servers: 3,
        replicas,
        workers: 2,
        consistency,
        names: vec!["w".into()],
        sizes: vec![37],
        steps: 12,
        salt: 5,
        timeout: Duration::from_secs(2),
    };
    let refs = reference(&spec);
    let faults = FaultPlan::new();
    let others: Vec<usize> = (0..spec.servers + spec.workers)
        .filter(|&r| r != backup)
        .collect();
    let strong = consistency == Consistency::Strong;
    // Set by worker 0 at the kill step: Some(true) once the head is killed, Some(false) if it
    // gave up waiting (its error is the one to report). Worker 1 waits for either.
    let killed = (Mutex::new(None::<bool>), Condvar::new());
    let hook = |q: usize, t: usize, probe: Probe<'_>| -> Result<(), String> {
        match (q, t) {
            (0, 2) => faults.partition(&[&[backup], &others]),
            (0, 4) => faults.heal(),
            (0, KILL_STEP) => {
                let ready = if strong {
                    wait_for_replicas(replicas, probe)
                } else {
                    Ok(())
                };
                if ready.is_ok() {
                    faults.kill(0);
                }
                let mut done = killed.0.lock().unwrap_or_else(|p| p.into_inner());
                *done = Some(ready.is_ok());
                killed.1.notify_all();
                ready?;
            }
            (_, KILL_STEP) if strong => {
                // Longer than worker 0's own wait: its verdict always comes first.
                let wait = REJOIN_WAIT.saturating_mul(2);
                let deadline = Instant::now() + wait;
                let mut done = killed.0.lock().unwrap_or_else(|p| p.into_inner());
                while done.is_none() {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(format!("worker {q}: no word from worker 0 within {wait:?}"));
                    }
                    done = killed
                        .1
                        .wait_timeout(done, left)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
            }
            _ => {}
        }
        Ok(())
    };
    let out = run_group(&spec, &faults, &refs, exact_before, &hook)?;
    Ok((out, spec, refs))
}

/// How long `heal_then_kill_run` waits for the healed backup to rejoin: far beyond the few
/// deadlines a rejoin takes, so that only a rejoin that never comes fails the test.
const REJOIN_WAIT: Duration = Duration::from_secs(60);

/// Pulls through `probe` until an answer reports `replicas` replicas (every member of the chain
/// acknowledged what was answered), for at most `REJOIN_WAIT`.
fn wait_for_replicas(replicas: usize, probe: Probe<'_>) -> Result<(), String> {
    let deadline = Instant::now() + REJOIN_WAIT;
    let mut seen = Vec::new();
    loop {
        let got = probe()?;
        if got == replicas {
            return Ok(());
        }
        if seen.last() != Some(&got) {
            seen.push(got);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the chain of 'w' did not get back to {replicas} replicas within {REJOIN_WAIT:?} \
                 (answers reported {seen:?})"
            ));
        }
        // Polling: each probe is answered at once, so pace them.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The step before whose pull the head of 'w' is killed in `heal_then_kill_run`.
const KILL_STEP: usize = 9;

/// Strong heal-then-kill with `replicas` and the partitioned `backup` (see
/// `heal_then_kill_run`): every step is exact (the head drops the cut-off backup and carries
/// on), the healed backup reports that it rejoined 'w', and after the head dies nothing is
/// lost.
fn strong_heal_then_kill(replicas: usize, backup: usize) {
    let start = Instant::now();
    let (out, spec, refs) = match heal_then_kill_run(replicas, backup, Consistency::Strong, 99) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    let ws = match out.workers_ok() {
        Ok(ws) => ws,
        Err(e) => panic!("{e}"),
    };
    for (q, w) in ws.iter().enumerate() {
        assert_eq!(w.lost, 0, "worker {q}: {}", out.events());
        // The shrunken chain is visible to the workers, not only in the servers' reports: one
        // replica fewer while the backup is cut off (step 3). (That every replica came back is
        // what the kill waited for: see `heal_then_kill_run`.)
        assert!(
            w.replicas[3] == replicas - 1,
            "worker {q}: replicas per step {:?}; {}",
            w.replicas,
            out.events()
        );
        if let Err(e) = compare("final pull of 'w'", &w.finals[0], &refs[spec.steps][0]) {
            panic!("worker {q}: {e}; {}", out.events());
        }
    }
    let reps: Vec<&ServerReport> = out
        .servers
        .iter()
        .enumerate()
        .filter(|&(r, _)| r != 0)
        .map(|(r, rep)| match rep {
            Ok(rep) => rep,
            Err(e) => panic!("surviving server {r}: {e}; {}", out.events()),
        })
        .collect();
    // reps[r - 1] is server r's report.
    let rejoined = &reps[backup - 1].events;
    assert!(
        rejoined
            .iter()
            .any(|e| e.contains("rejoined") && e.contains("'w'")),
        "server {backup} does not report rejoining 'w': {rejoined:?}"
    );
    let survivors: Vec<usize> = spec.chain(0).into_iter().filter(|&r| r != 0).collect();
    for &r in &survivors {
        let got = held(reps[r - 1], "w").unwrap_or_else(|| panic!("server {r} reports no 'w'"));
        if let Err(e) = compare(&format!("server {r}'s 'w'"), got, &refs[spec.steps][0]) {
            panic!("{e}; {}", out.events());
        }
    }
    // The kill took effect: the head's thread failed (no worker could have finished with it:
    // both were held at the kill step), a survivor took 'w' over, and the workers turned to it.
    assert!(out.servers[0].is_err(), "the killed head returned Ok");
    assert!(
        out.events().contains("took over 'w'"),
        "no survivor took 'w' over; {}",
        out.events()
    );
    assert!(
        ws.iter().any(|w| w.failovers > 0),
        "no worker failed over; {}",
        out.events()
    );
    eprintln!(
        "Strong heal then kill, replicas {replicas}, backup {backup}: {:.1?}",
        start.elapsed()
    );
}

/// Chain 0 -> 1, Strong: the only backup is cut off (steps still succeed), heals and rejoins
/// by state transfer, then becomes the head when server 0 dies, holding every step.
#[test]
fn strong_backup_rejoins_after_healing_and_takes_over_losing_nothing() {
    strong_heal_then_kill(2, 1);
}

/// Chain 0 -> 1 -> 2, Strong: the middle of the chain is cut off (the head bypasses it to the
/// tail), heals and rejoins, then the head dies: nothing lost.
#[test]
fn strong_middle_of_three_rejoins_after_healing_and_nothing_is_lost() {
    strong_heal_then_kill(3, 1);
}

/// Chain 0 -> 1 -> 2, Strong: the tail is cut off (the middle becomes the tail), heals and
/// rejoins, then the head dies: nothing lost.
#[test]
fn strong_tail_of_three_rejoins_after_healing_and_nothing_is_lost() {
    strong_heal_then_kill(3, 2);
}

/// The same schedule under Eventual, chains of 2 and 3: every step before the kill is exact
/// (only a backup was cut off), every operation succeeds, after the end every surviving replica
/// of 'w' has the same digest, the workers' final pulls equal the survivors' copy, and if no
/// worker counted a lost update the final parameters are the reference (no silent loss).
#[test]
fn eventual_survivors_agree_after_heal_then_kill() {
    let start = Instant::now();
    for replicas in [2, 3] {
        let (out, spec, refs) =
            match heal_then_kill_run(replicas, 1, Consistency::Eventual, KILL_STEP) {
                Ok(r) => r,
                Err(e) => panic!("replicas {replicas}: {e}"),
            };
        let ws = match out.workers_ok() {
            Ok(ws) => ws,
            Err(e) => panic!("replicas {replicas}: {e}"),
        };
        let survivors: Vec<usize> = spec.chain(0).into_iter().filter(|&r| r != 0).collect();
        let mut copies = Vec::new();
        for &r in &survivors {
            let rep = match &out.servers[r] {
                Ok(rep) => rep,
                Err(e) => panic!("replicas {replicas}: surviving server {r}: {e}"),
            };
            let d = digest(rep, "w");
            let p = held(rep, "w").map(<[f32]>::to_vec);
            assert!(
                d.is_some() && p.is_some(),
                "replicas {replicas}: server {r} reports no 'w'"
            );
            copies.push((r, d, p));
        }
        for (r, d, _) in &copies {
            assert_eq!(
                *d,
                copies[0].1,
                "replicas {replicas}: server {r}'s digest differs from server {}'s; {}",
                copies[0].0,
                out.events()
            );
        }
        let survivor = copies[0].2.clone().unwrap_or_default();
        for (q, w) in ws.iter().enumerate() {
            let same = w.finals[0]
                .iter()
                .zip(&survivor)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same && w.finals[0].len() == survivor.len(),
                "replicas {replicas}: worker {q}'s final pull differs from server {}'s copy",
                copies[0].0
            );
        }
        // Eventual loses exactly what it reports: a loss workers can see (an answer below what
        // they saw) is counted by them; a take-over from a copy that missed the head's last
        // update (it was in flight at the kill) is reported by the server that skipped ahead.
        // With neither, nothing may be lost.
        // The kill took effect: three steps remained after it, so no worker had finished with
        // the head, whose thread therefore failed.
        assert!(
            out.servers[0].is_err(),
            "replicas {replicas}: the killed head returned Ok"
        );
        let skipped = out.events().contains("skipped from version");
        if ws.iter().all(|w| w.lost == 0) && !skipped {
            if let Err(e) = compare(
                "final 'w' (no loss counted or reported)",
                &survivor,
                &refs[spec.steps][0],
            ) {
                panic!("replicas {replicas}: {e}; {}", out.events());
            }
        }
    }
    eprintln!("Eventual heal then kill: {:.1?}", start.elapsed());
}

/// Regression: a push the server refuses returns that refusal from `push` itself (not from a
/// later call), and leaves the worker in step with the server: 10 rounds of push(t) then
/// pull(t+1) each get version t+1 and the reference values, and the server applied 10 updates.
#[test]
fn a_refused_push_leaves_no_stale_reply_behind() {
    let start = Instant::now();
    let spec = Spec {
        servers: 1,
        replicas: 1,
        workers: 1,
        consistency: Consistency::Strong,
        names: vec!["w".into()],
        sizes: vec![13],
        steps: 10,
        salt: 3,
        timeout: Duration::from_secs(3),
    };
    let refs = reference(&spec);
    let (servers, mut workers) = ParameterServer::builder()
        .servers(1)
        .workers(1)
        .mode(Mode::Sync)
        .rule(RULE)
        .param("w", init(0, 13))
        .timeout(spec.timeout)
        .build()
        .unwrap_or_else(|e| panic!("build: {e}"));
    let (Some(server), Some(mut w)) = (servers.into_iter().next(), workers.pop()) else {
        panic!("one server and one worker");
    };
    let (report, result) = std::thread::scope(|s| {
        let h = s.spawn(move || server.serve());
        let result = (|| -> Result<(), String> {
            let e = |what: &'static str| move |e: wccl::Error| format!("{what}: {e}");
            let early = w
                .comm()
                .upload(&grad(0, 0, 0, 5, 13))
                .map_err(e("upload"))?;
            match w.push("w", &early, 5) {
                Ok(()) => return Err("a push for step 5 during step 0 was accepted".into()),
                Err(err @ wccl::Error::InvalidArgument { .. })
                    if err.to_string().contains("step 5") => {}
                Err(err) => return Err(format!("push for step 5: wrong error: {err}")),
            }
            let buf = w.comm().buffer::<f32>(13).map_err(e("buffer"))?;
            for t in 0..10 {
                let g = w
                    .comm()
                    .upload(&grad(spec.salt, 0, 0, t, 13))
                    .map_err(e("upload"))?;
                w.push("w", &g, t as u64)
                    .map_err(|err| format!("push step {t}: {err}"))?;
                w.comm().write(&buf, &[f32::NAN; 13]).map_err(e("poison"))?;
                let info = w
                    .pull("w", t as u64 + 1, &buf)
                    .map_err(|err| format!("pull step {}: {err}", t + 1))?;
                if info.version != t as u64 + 1 {
                    return Err(format!(
                        "pull step {}: answered version {}",
                        t + 1,
                        info.version
                    ));
                }
                let got = w.comm().download(&buf).map_err(e("download"))?;
                compare(&format!("pull step {}", t + 1), &got, &refs[t + 1][0])?;
            }
            Ok(())
        })();
        // Done (or dropped on an error) so the server ends either way.
        let done = match result {
            Ok(()) => w.done().map_err(|e| format!("done: {e}")),
            Err(e) => {
                drop(w);
                Err(e)
            }
        };
        let report = h.join();
        (report, done)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    match report {
        Ok(Ok(r)) => assert_eq!(r.applied, 10, "{:?}", r.events),
        Ok(Err(e)) => panic!("server: {e}"),
        Err(_) => panic!("server thread panicked"),
    }
    eprintln!("refused push then 10 rounds: {:.1?}", start.elapsed());
}
