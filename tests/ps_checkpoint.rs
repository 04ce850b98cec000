//! Checkpoint and restore of a whole parameter server, end to end through the public API:
//! `ParameterServer::checkpoint(dir)` with `PsWorker::checkpoint()` to write every server's
//! shard, `ParameterServer::restore(dir)` to start a new parameter server from them.
//!
//! - A whole-PS restart from the checkpoint taken after step 3's pulls resumes at version 3
//!   and ends, after the same steps, bit for bit where the uninterrupted run ended and where an
//!   independent f64 reference of SGD with momentum ends (so the momentum was restored too).
//! - A restore from a shard file that is corrupt, truncated, of another shape, another rank,
//!   another rule or missing fails in `build()` with `Error::Checkpoint` naming the file and
//!   the problem, and leaves every file in the directory byte-identical.
//! - A checkpoint request without a checkpoint directory, or into a directory that does not
//!   exist or is a file, or over a shard path that cannot be replaced, is a clear error from
//!   `PsWorker::checkpoint()`; the servers keep serving, training continues exactly, and the
//!   previous checkpoint is left whole (and restores).
//!
//! The format's own unit tests (every corruption, a simulated kill mid-write) live in
//! `src/ps/checkpoint.rs`.
//!
//! Every value in these runs is a multiple of a small power of two (lr 1/8, momentum 1/2,
//! gradients and initial values multiples of 1/32), so the f32 arithmetic on the device is
//! exact and the f64 reference must match it to the last bit.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use wccl::Error;
use wccl::ps::{Mode, ParameterServer, PsServer, PsWorker, ServerReport, Sgd};

type R<T> = std::result::Result<T, String>;

/// Two keys of odd sizes.
const KEYS: [(&str, usize); 2] = [("a", 7), ("b", 13)];
const WORKERS: usize = 2;
const LR: f32 = 0.125;
const MOMENTUM: f32 = 0.5;
/// The servers' and workers' deadline (a hang becomes an error).
const TIMEOUT: Duration = Duration::from_secs(3);
/// How long a worker waits at a barrier for the others before it reports them stuck.
const BARRIER_WAIT: Duration = Duration::from_secs(120);

fn rule() -> Sgd {
    Sgd {
        lr: LR,
        momentum: MOMENTUM,
    }
}

/// Key `k`'s initial value at element `i`: multiples of 1/4 in [-1, 1], period 9.
fn init(k: usize, i: usize) -> f32 {
    ((i * 5 + k) % 9) as f32 * 0.25 - 1.0
}

/// Worker `q`'s gradient of key `k` at step `t`, element `i`: period 11 in `i`, distinct per
/// (worker, element): worker 0's are even multiples of 1/32, worker 1's odd ones.
fn grad(q: usize, t: u64, k: usize, i: usize) -> f32 {
    let base = ((i * 7 + k * 3 + t as usize * 5 + q * 4) % 11) as f32 * 0.0625 - 0.3125;
    base + q as f32 * 0.03125
}

/// The parameters after `steps` synchronous steps, computed on the host in f64 from scratch:
/// per step the mean gradient g of the workers, `m = momentum * m + g`, `w -= lr * m`.
fn reference(steps: u64) -> Vec<Vec<f64>> {
    let (lr, mu) = (LR as f64, MOMENTUM as f64);
    KEYS.iter()
        .enumerate()
        .map(|(k, &(_, n))| {
            (0..n)
                .map(|i| {
                    let (mut w, mut m) = (init(k, i) as f64, 0.0f64);
                    for t in 0..steps {
                        let g = (0..WORKERS).map(|q| grad(q, t, k, i) as f64).sum::<f64>()
                            / WORKERS as f64;
                        m = mu * m + g;
                        w -= lr * m;
                    }
                    w
                })
                .collect()
        })
        .collect()
}

/// `got` equals the f64 reference after `steps` steps exactly: every value in these runs is
/// exact in f32 (see the module docs), so any difference is a wrong state, not rounding.
fn assert_reference(got: &[Vec<f32>], steps: u64, what: &str) {
    let want = reference(steps);
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: '{}' length", KEYS[k].0);
        for (i, (g, w)) in g.iter().zip(w).enumerate() {
            assert!(
                *g as f64 == *w,
                "{what}: '{}'[{i}] is {g}, the f64 reference after {steps} steps says {w}",
                KEYS[k].0
            );
        }
    }
}

/// How the servers are laid out.
#[derive(Clone, Copy, Debug)]
struct Layout {
    servers: usize,
    replicas: usize,
}

const ONE: Layout = Layout {
    servers: 1,
    replicas: 1,
};
const TWO: Layout = Layout {
    servers: 2,
    replicas: 2,
};
/// Two servers, each key on one of them.
const SPLIT: Layout = Layout {
    servers: 2,
    replicas: 1,
};

/// A `Sync` parameter server of `layout` with the keys `sizes` (initial values from `init`,
/// scaled by `scale`), the given rule, and two workers.
fn builder_with(layout: Layout, sizes: &[(&str, usize)], rule: Sgd, scale: f32) -> ParameterServer {
    let mut b = ParameterServer::builder()
        .servers(layout.servers)
        .replicas(layout.replicas)
        .workers(WORKERS)
        .mode(Mode::Sync)
        .rule(rule)
        .timeout(TIMEOUT);
    for (k, &(name, n)) in sizes.iter().enumerate() {
        b = b.param(name, (0..n).map(|i| init(k, i) * scale).collect());
    }
    b
}

fn builder(layout: Layout) -> ParameterServer {
    builder_with(layout, &KEYS, rule(), 1.0)
}

/// A barrier with a deadline that a failing worker breaks, so that the others return an error
/// instead of waiting for it forever.
struct Barrier {
    state: Mutex<(usize, u64, bool)>,
    cv: Condvar,
    n: usize,
}

impl Barrier {
    fn new(n: usize) -> Self {
        Barrier {
            state: Mutex::new((0, 0, false)),
            cv: Condvar::new(),
            n,
        }
    }

    fn wait(&self) -> R<()> {
        let end = Instant::now() + BARRIER_WAIT;
        let mut s = self.state.lock().map_err(|_| "barrier poisoned")?;
        if s.2 {
            return Err("another worker failed".into());
        }
        let generation = s.1;
        s.0 += 1;
        if s.0 == self.n {
            s.0 = 0;
            s.1 += 1;
            self.cv.notify_all();
            return Ok(());
        }
        loop {
            let now = Instant::now();
            if now >= end {
                return Err(format!(
                    "the other workers did not arrive in {BARRIER_WAIT:?}"
                ));
            }
            s = self
                .cv
                .wait_timeout(s, end - now)
                .map_err(|_| "barrier poisoned")?
                .0;
            if s.1 != generation {
                return Ok(());
            }
            if s.2 {
                return Err("another worker failed".into());
            }
        }
    }

    fn fail(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.2 = true;
        }
        self.cv.notify_all();
    }
}

/// Runs every server and one call of `f` per worker, each on its own thread; a worker that
/// returns `Ok` says it is done. Returns the workers' results and the servers' reports, or
/// every error (a panic included) that any thread returned.
fn run<T: Send>(
    servers: Vec<PsServer>,
    workers: Vec<PsWorker>,
    f: impl Fn(&mut PsWorker, &Barrier) -> R<T> + Sync,
) -> R<(Vec<T>, Vec<ServerReport>)> {
    let barrier = Barrier::new(workers.len());
    let (f, barrier) = (&f, &barrier);
    std::thread::scope(|s| {
        let hs: Vec<_> = servers
            .into_iter()
            .map(|sv| s.spawn(move || sv.serve()))
            .collect();
        let ws: Vec<_> = workers
            .into_iter()
            .map(|mut w| {
                s.spawn(move || {
                    let q = w.index();
                    match f(&mut w, barrier) {
                        Ok(t) => w.done().map(|()| t).map_err(|e| format!("worker {q}: {e}")),
                        Err(e) => {
                            barrier.fail();
                            Err(format!("worker {q}: {e}"))
                        }
                    }
                })
            })
            .collect();
        let mut errors = Vec::new();
        let mut outs = Vec::new();
        for h in ws {
            match h.join() {
                Ok(Ok(t)) => outs.push(t),
                Ok(Err(e)) => errors.push(e),
                Err(_) => errors.push("a worker thread panicked".into()),
            }
        }
        let mut reports = Vec::new();
        for (r, h) in hs.into_iter().enumerate() {
            match h.join() {
                Ok(Ok(rep)) => reports.push(rep),
                Ok(Err(e)) => errors.push(format!("server {r}: {e}")),
                Err(_) => errors.push(format!("server {r}'s thread panicked")),
            }
        }
        if errors.is_empty() {
            Ok((outs, reports))
        } else {
            Err(errors.join("; "))
        }
    })
}

/// Pulls every key as of `step`: the values and the versions.
fn pull_all(w: &mut PsWorker, step: u64) -> R<(Vec<Vec<f32>>, Vec<u64>)> {
    let mut values = Vec::new();
    let mut versions = Vec::new();
    for &(name, n) in &KEYS {
        let buf = w.comm().buffer::<f32>(n).map_err(|e| e.to_string())?;
        let info = w
            .pull(name, step, &buf)
            .map_err(|e| format!("pull '{name}' step {step}: {e}"))?;
        versions.push(info.version);
        values.push(w.comm().download(&buf).map_err(|e| e.to_string())?);
    }
    Ok((values, versions))
}

/// Pushes this worker's gradient of every key for `step`.
fn push_all(w: &mut PsWorker, step: u64) -> R<()> {
    let q = w.index();
    for (k, &(name, n)) in KEYS.iter().enumerate() {
        let g: Vec<f32> = (0..n).map(|i| grad(q, step, k, i)).collect();
        let buf = w.comm().upload(&g).map_err(|e| e.to_string())?;
        w.push(name, &buf, step)
            .map_err(|e| format!("push '{name}' step {step}: {e}"))?;
    }
    Ok(())
}

/// One Sync step as every worker does it: pull as of `step` (checking the version is `step`),
/// then push.
fn step(w: &mut PsWorker, t: u64) -> R<Vec<Vec<f32>>> {
    let (values, versions) = pull_all(w, t)?;
    if versions.iter().any(|&v| v != t) {
        return Err(format!("pull of step {t} answered versions {versions:?}"));
    }
    push_all(w, t)?;
    Ok(values)
}

/// Final pull after `steps` steps, checking the versions.
fn final_pull(w: &mut PsWorker, steps: u64) -> R<Vec<Vec<f32>>> {
    let (values, versions) = pull_all(w, steps)?;
    if versions.iter().any(|&v| v != steps) {
        return Err(format!(
            "final pull of step {steps} answered versions {versions:?}"
        ));
    }
    Ok(values)
}

/// The f32 bits of every value, for comparisons to the last bit.
fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter()
        .map(|x| x.iter().map(|f| f.to_bits()).collect())
        .collect()
}

/// Every file in `dir` (name to bytes; a directory's bytes read `<not a file>`).
fn try_files(dir: &Path) -> R<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let list = fs::read_dir(dir).map_err(|e| format!("list {}: {e}", dir.display()))?;
    for e in list {
        let e = e.map_err(|e| format!("list {}: {e}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let bytes = if e.path().is_file() {
            fs::read(e.path()).map_err(|x| format!("read {}: {x}", e.path().display()))?
        } else {
            b"<not a file>".to_vec()
        };
        out.insert(name, bytes);
    }
    Ok(out)
}

/// [`try_files`] on the test's own thread.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    try_files(dir).unwrap_or_else(|e| panic!("{e}"))
}

fn shard(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("shard-{rank}.wccl-ckpt"))
}

/// The message of an `Error::Checkpoint`; anything else fails the test.
fn checkpoint_message<T>(r: wccl::Result<T>, what: &str) -> String {
    match r {
        Err(Error::Checkpoint { message, .. }) => message,
        Err(e) => panic!("{what}: expected Error::Checkpoint, got {e}"),
        Ok(_) => panic!("{what}: expected Error::Checkpoint, it succeeded"),
    }
}

/// What a training run returned: worker 0's actions' results, every worker's pulls (per
/// worker, per step) and final parameters, and the servers' reports.
struct Trained<M> {
    actions: Vec<M>,
    pulls: Vec<Vec<Vec<Vec<f32>>>>,
    finals: Vec<Vec<Vec<f32>>>,
    reports: Vec<ServerReport>,
}

/// Trains `steps` (each: pull, checking the version is the step, then push) and pulls the
/// result. After the pulls of each step in `at`, with every worker between two barriers
/// (so that nobody pushes that step before it returns), worker 0 runs `action`.
fn train<M: Send>(
    built: (Vec<PsServer>, Vec<PsWorker>),
    steps: std::ops::Range<u64>,
    at: &[u64],
    action: impl Fn(&mut PsWorker, u64) -> R<M> + Sync,
) -> R<Trained<M>> {
    let (servers, workers) = built;
    let (outs, reports) = run(servers, workers, |w, b| {
        let mut actions = Vec::new();
        let mut pulls = Vec::new();
        for t in steps.clone() {
            let (values, versions) = pull_all(w, t)?;
            if versions.iter().any(|&v| v != t) {
                return Err(format!("pull of step {t} answered versions {versions:?}"));
            }
            pulls.push(values);
            if at.contains(&t) {
                b.wait()?;
                if w.index() == 0 {
                    actions.push(action(w, t)?);
                }
                b.wait()?;
            }
            push_all(w, t)?;
        }
        Ok((actions, pulls, final_pull(w, steps.end)?))
    })?;
    let mut trained = Trained {
        actions: Vec::new(),
        pulls: Vec::new(),
        finals: Vec::new(),
        reports,
    };
    for (q, (actions, pulls, fin)) in outs.into_iter().enumerate() {
        if q == 0 {
            trained.actions = actions;
        }
        trained.pulls.push(pulls);
        trained.finals.push(fin);
    }
    Ok(trained)
}

/// Every pull of `run` (which trained `steps`) and its final parameters equal the f64
/// reference: training went on exactly.
fn assert_trained_exactly<M>(run: &Trained<M>, steps: std::ops::Range<u64>, what: &str) {
    for (q, pulls) in run.pulls.iter().enumerate() {
        for (t, values) in steps.clone().zip(pulls) {
            assert_reference(values, t, &format!("{what}: worker {q}, step {t}"));
        }
    }
    for (q, fin) in run.finals.iter().enumerate() {
        assert_reference(fin, steps.end, &format!("{what}: worker {q}, final"));
    }
    for r in &run.reports {
        assert!(
            r.versions.iter().all(|(_, v)| *v == steps.end),
            "{what}: {:?}",
            r.versions
        );
    }
}

/// Worker 0's checkpoint request, as a result (the message of an `Error::Checkpoint`, any other
/// error failing the run).
fn try_checkpoint(w: &mut PsWorker) -> R<std::result::Result<(), String>> {
    match w.checkpoint() {
        Ok(()) => Ok(Ok(())),
        Err(Error::Checkpoint { message, .. }) => Ok(Err(message)),
        Err(e) => Err(format!(
            "checkpoint failed with something else than Error::Checkpoint: {e}"
        )),
    }
}

// ----- 1. whole-PS restart -----

/// Trains steps 0..5 with a checkpoint after step 3's pulls, then restarts the whole parameter
/// server from that checkpoint (with other initial values, so only the file can supply the
/// state) and trains steps 3..5 again: the restored servers answer a pull of step 0 with
/// version 3 and step 3's parameters, and the final parameters equal the uninterrupted run's
/// bit for bit and the f64 reference, which they would not if the momentum had not been
/// restored.
fn whole_ps_restart(layout: Layout) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = dir.path().join("ckpt");
    fs::create_dir(&ckpt).expect("mkdir");

    let built = builder(layout).checkpoint(&ckpt).build().expect("build");
    let first = train(built, 0..5, &[3], |w, _| {
        w.checkpoint().map_err(|e| format!("checkpoint: {e}"))
    })
    .unwrap_or_else(|e| panic!("{layout:?}, uninterrupted run: {e}"));
    assert_trained_exactly(&first, 0..5, "uninterrupted run");
    let at3 = &first.pulls[0][3];
    let fin = &first.finals[0];

    // One shard file per server, nothing else (no temporary file left).
    let written = files(&ckpt);
    let names: Vec<String> = (0..layout.servers)
        .map(|r| format!("shard-{r}.wccl-ckpt"))
        .collect();
    assert_eq!(
        written.keys().cloned().collect::<Vec<_>>(),
        names,
        "{layout:?}"
    );

    // Everything above is dropped; a new parameter server starts from the files.
    let (servers, workers) = builder_with(layout, &KEYS, rule(), 0.5)
        .restore(&ckpt)
        .build()
        .unwrap_or_else(|e| panic!("{layout:?}: restore: {e}"));
    let (outs, reports) = run(servers, workers, |w, _| {
        let (values, versions) = pull_all(w, 0)?;
        if versions != [3, 3] {
            return Err(format!(
                "the restored servers answered a pull of step 0 with versions {versions:?}, \
                 not the checkpoint's 3"
            ));
        }
        for t in 3..5 {
            push_all(w, t)?;
            if t + 1 < 5 {
                let (_, v) = pull_all(w, t + 1)?;
                if v.iter().any(|&x| x != t + 1) {
                    return Err(format!("pull of step {} answered versions {v:?}", t + 1));
                }
            }
        }
        Ok((values, final_pull(w, 5)?))
    })
    .unwrap_or_else(|e| panic!("{layout:?}, restored run: {e}"));
    for (q, o) in outs.iter().enumerate() {
        assert_eq!(
            bits(&o.0),
            bits(at3),
            "{layout:?}: worker {q}: the restored parameters are not step 3's"
        );
        assert_eq!(
            bits(&o.1),
            bits(fin),
            "{layout:?}: worker {q}: the restored run ends elsewhere than the uninterrupted one"
        );
        assert_reference(&o.1, 5, "restored run, final");
    }
    for r in &reports {
        assert!(r.versions.iter().all(|(_, v)| *v == 5), "{:?}", r.versions);
        for (name, v) in &r.params {
            let k = KEYS
                .iter()
                .position(|(n, _)| n == name)
                .expect("a known key");
            assert_eq!(bits(std::slice::from_ref(v)), bits(&fin[k..=k]), "{name}");
        }
    }
    // Restoring read the files and wrote nothing.
    assert_eq!(
        files(&ckpt),
        written,
        "{layout:?}: the restore changed the files"
    );
}

/// Whole-PS restart with 2 servers, each key on both (`replicas(2)`): resumes at version 3 and
/// ends where the uninterrupted run and the f64 reference end (momentum restored).
#[test]
fn whole_ps_restart_two_servers_two_replicas_resumes_exactly() {
    whole_ps_restart(TWO);
}

/// The same with a single server holding both keys.
#[test]
fn whole_ps_restart_one_server_resumes_exactly() {
    whole_ps_restart(ONE);
}

// ----- 2. restore errors -----

/// Copies every file of `from` into a fresh directory under `root` named `name`.
fn copy_dir(from: &Path, root: &Path, name: &str) -> PathBuf {
    let to = root.join(name);
    fs::create_dir(&to).expect("mkdir");
    for (file, bytes) in files(from) {
        fs::write(to.join(file), bytes).expect("write");
    }
    to
}

/// Writes a checkpoint of a fresh (version 0) parameter server with keys `sizes` and `rule`
/// into `dir`.
fn fresh_checkpoint(layout: Layout, sizes: &[(&str, usize)], rule: Sgd, dir: &Path) {
    let (servers, workers) = builder_with(layout, sizes, rule, 1.0)
        .checkpoint(dir)
        .build()
        .expect("build");
    run(servers, workers, |w, _| {
        if w.index() == 0 {
            w.checkpoint().map_err(|e| format!("checkpoint: {e}"))?;
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("checkpoint of {sizes:?}: {e}"));
}

/// Restoring from a shard file that is corrupt (one byte flipped: in the magic, the format
/// version, a parameter, the checksum), truncated (by one byte, to half, to nothing), of
/// another shape (a key of 8 elements where the server has 7), of another rule (lr 0.25), of
/// another server rank, or missing, and restoring a good one into servers under another rule,
/// fails in `build()` with `Error::Checkpoint` whose message names the file and the problem;
/// every file in the directory is byte-identical afterwards and none is added. The untouched
/// checkpoint restores (at its version, 2) afterwards.
#[test]
fn restore_errors_name_the_file_and_overwrite_nothing() {
    let root = tempfile::tempdir().expect("tempdir");
    let base = root.path().join("base");
    fs::create_dir(&base).expect("mkdir");
    // A checkpoint at version 2: train steps 0 and 1, pull step 2, checkpoint, done.
    {
        let (servers, workers) = builder(TWO).checkpoint(&base).build().expect("build");
        run(servers, workers, |w, b| {
            for t in 0..2 {
                step(w, t)?;
            }
            pull_all(w, 2)?;
            b.wait()?;
            if w.index() == 0 {
                w.checkpoint().map_err(|e| format!("checkpoint: {e}"))?;
            }
            Ok(())
        })
        .expect("run to checkpoint");
    }
    let pristine = files(&base);
    let len = pristine["shard-1.wccl-ckpt"].len();
    // Layout (see src/ps/checkpoint.rs): magic 8, format version 4, rank 4, hyper 16, key
    // count 8; then key "a": id 4, name length 8, name 1, version 8, count 8, parameters.
    let first_param = 8 + 4 + 4 + 16 + 8 + 4 + 8 + 1 + 8 + 8;

    let other_shape = root.path().join("other-shape");
    fs::create_dir(&other_shape).expect("mkdir");
    fresh_checkpoint(TWO, &[("a", 8), ("b", 13)], rule(), &other_shape);
    let other_rule = root.path().join("other-rule");
    fs::create_dir(&other_rule).expect("mkdir");
    let lr4 = Sgd {
        lr: 0.25,
        momentum: MOMENTUM,
    };
    fresh_checkpoint(TWO, &KEYS, lr4, &other_rule);

    let flip = |at: usize| {
        move |dir: &Path| {
            let p = shard(dir, 1);
            let mut b = fs::read(&p).expect("read");
            b[at] ^= 0x10;
            fs::write(&p, b).expect("write");
        }
    };
    let cut = |to: usize| {
        move |dir: &Path| {
            let p = shard(dir, 1);
            let b = fs::read(&p).expect("read");
            fs::write(&p, &b[..to]).expect("write");
        }
    };
    type Case<'a> = (&'a str, Box<dyn Fn(&Path) + 'a>, Sgd, &'a [&'a str]);
    let cases: Vec<Case> = vec![
        (
            "flipped magic",
            Box::new(flip(0)),
            rule(),
            &["not a wccl checkpoint"],
        ),
        (
            "flipped format version",
            Box::new(flip(8)),
            rule(),
            &["format version"],
        ),
        (
            "flipped parameter byte",
            Box::new(flip(first_param + 2)),
            rule(),
            &["corrupt", "crc32c"],
        ),
        (
            "flipped checksum byte",
            Box::new(flip(len - 1)),
            rule(),
            &["corrupt", "crc32c"],
        ),
        (
            "truncated by one byte",
            Box::new(cut(len - 1)),
            rule(),
            &["truncated"],
        ),
        (
            "truncated to half",
            Box::new(cut(len / 2)),
            rule(),
            &["truncated"],
        ),
        (
            "truncated to nothing",
            Box::new(cut(0)),
            rule(),
            &["truncated"],
        ),
        (
            "another shape",
            Box::new(|dir: &Path| {
                fs::copy(shard(&other_shape, 1), shard(dir, 1)).expect("copy");
            }),
            rule(),
            &["'a'", "8 elements", "holds 7"],
        ),
        (
            "a shard written under another rule (lr 0.25)",
            Box::new(|dir: &Path| {
                fs::copy(shard(&other_rule, 1), shard(dir, 1)).expect("copy");
            }),
            rule(),
            &["hyper-parameters", "0.25"],
        ),
        (
            "another rank's shard",
            Box::new(|dir: &Path| {
                fs::copy(shard(dir, 0), shard(dir, 1)).expect("copy");
            }),
            rule(),
            &["belongs to server rank 0", "server rank 1"],
        ),
        (
            "missing",
            Box::new(|dir: &Path| fs::remove_file(shard(dir, 1)).expect("remove")),
            rule(),
            &["could not read"],
        ),
        (
            "a server under another rule (lr 0.25)",
            Box::new(|_: &Path| {}),
            lr4,
            &["hyper-parameters"],
        ),
    ];
    for (i, (what, damage, rule, words)) in cases.iter().enumerate() {
        let dir = copy_dir(&base, root.path(), &format!("case-{i}"));
        damage(&dir);
        let before = files(&dir);
        let message = checkpoint_message(
            builder_with(TWO, &KEYS, *rule, 1.0).restore(&dir).build(),
            what,
        );
        // The rule case fails on server 0's shard, the others on server 1's.
        let rank = if what.starts_with("a server under") {
            0
        } else {
            1
        };
        let path = shard(&dir, rank).display().to_string();
        assert!(
            message.contains(&path),
            "{what}: the message does not name {path}: {message}"
        );
        for w in *words {
            assert!(message.contains(w), "{what}: no '{w}' in: {message}");
        }
        assert_eq!(files(&dir), before, "{what}: the directory changed");
    }

    // The base checkpoint itself restores, at version 2, to the reference after 2 steps.
    let (servers, workers) = builder(TWO)
        .restore(&base)
        .build()
        .expect("restore the base");
    let (outs, _) = run(servers, workers, |w, _| pull_all(w, 0)).expect("pull");
    for (values, versions) in &outs {
        assert_eq!(versions, &[2, 2]);
        assert_reference(values, 2, "restored base");
    }
    assert_eq!(files(&base), pristine);
}

// ----- 3. no checkpoint directory -----

/// A checkpoint request to servers built without a checkpoint directory is an
/// `Error::Checkpoint` saying so; the servers keep serving and every pull after it, and the
/// final parameters, equal the f64 reference (training continued exactly).
#[test]
fn checkpoint_without_a_directory_is_a_clear_error_and_training_goes_on() {
    let built = builder(TWO).build().expect("build");
    let run = train(built, 0..5, &[2], |w, _| try_checkpoint(w)).expect("train");
    match &run.actions[..] {
        [Err(message)] => assert!(
            message.contains("no checkpoint directory"),
            "unclear: {message}"
        ),
        other => panic!("expected one refused checkpoint, got {other:?}"),
    }
    assert_trained_exactly(&run, 0..5, "after a refused checkpoint");
    assert!(run.reports.iter().map(|r| r.refused).sum::<u64>() >= 1);
}

// ----- 4. checkpoint into a bad place -----

/// A checkpoint into a directory that does not exist, or into a path that is a file, is an
/// `Error::Checkpoint` naming the path; the servers keep serving and training continues
/// exactly; nothing is created and the file is unchanged.
#[test]
fn checkpoint_into_a_missing_directory_or_a_file_is_a_clear_error() {
    let root = tempfile::tempdir().expect("tempdir");
    let missing = root.path().join("missing");
    let file = root.path().join("file");
    fs::write(&file, b"not a directory\n").expect("write");
    for (what, dir) in [("missing directory", &missing), ("a file", &file)] {
        let built = builder(TWO).checkpoint(dir).build().expect("build");
        let run = train(built, 0..4, &[1, 2], |w, _| try_checkpoint(w))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(run.actions.len(), 2, "{what}");
        for a in &run.actions {
            match a {
                Err(message) => assert!(
                    message.contains(&dir.display().to_string()) && message.contains("could not"),
                    "{what}: unclear: {message}"
                ),
                Ok(()) => panic!("{what}: a checkpoint into {} succeeded", dir.display()),
            }
        }
        assert_trained_exactly(&run, 0..4, what);
    }
    assert!(
        !missing.exists(),
        "a failed checkpoint created the directory"
    );
    assert_eq!(fs::read(&file).expect("read"), b"not a directory\n");
    assert_eq!(
        files(root.path()).keys().cloned().collect::<Vec<_>>(),
        ["file"],
        "something was left beside them"
    );
}

/// After a checkpoint at step 1, the checkpoint directory vanishes, then is a file, at step 2's
/// checkpoints: both fail with `Error::Checkpoint`, training continues exactly to the end, and
/// once the directory is back the step-1 checkpoint is byte-identical, has no temporary file
/// beside it, and restores: a new parameter server resumes at version 1 and trains to the
/// reference.
#[test]
fn a_failed_checkpoint_leaves_the_previous_one_whole() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("ckpt");
    let aside = root.path().join("aside");
    fs::create_dir(&dir).expect("mkdir");
    let built = builder(TWO).checkpoint(&dir).build().expect("build");
    let run = train(built, 0..4, &[1, 2], |w, t| {
        if t == 1 {
            let r = try_checkpoint(w)?;
            return Ok((r.clone(), r, try_files(&dir)?));
        }
        fs::rename(&dir, &aside).map_err(|e| format!("rename aside: {e}"))?;
        let gone = try_checkpoint(w)?;
        fs::write(&dir, b"a file\n").map_err(|e| format!("write: {e}"))?;
        let file = try_checkpoint(w)?;
        fs::remove_file(&dir).map_err(|e| format!("remove: {e}"))?;
        fs::rename(&aside, &dir).map_err(|e| format!("rename back: {e}"))?;
        Ok((gone, file, BTreeMap::new()))
    })
    .expect("train");
    let [(Ok(()), Ok(()), at1), (gone, file, _)] = &run.actions[..] else {
        panic!("the step-1 checkpoint failed: {:?}", run.actions[0]);
    };
    for (what, r) in [("directory gone", gone), ("directory a file", file)] {
        match r {
            Err(m) => assert!(
                m.contains(&dir.display().to_string()) && m.contains("could not"),
                "{what}: unclear: {m}"
            ),
            Ok(()) => panic!("{what}: the checkpoint succeeded"),
        }
    }
    assert_trained_exactly(&run, 0..4, "after failed checkpoints");
    assert_eq!(
        at1.keys().cloned().collect::<Vec<_>>(),
        ["shard-0.wccl-ckpt", "shard-1.wccl-ckpt"]
    );
    assert_eq!(&files(&dir), at1, "the step-1 checkpoint changed");
    assert!(!aside.exists());

    let built = builder(TWO).restore(&dir).build().expect("restore");
    let (servers, workers) = built;
    let outs = run_resumed(servers, workers, 1, 4);
    for (q, (versions, fin)) in outs.iter().enumerate() {
        assert_eq!(versions, &[1, 1], "worker {q}: resumed at another version");
        assert_reference(fin, 4, &format!("worker {q}: resumed from step 1"));
    }
}

/// Runs workers that pull step 0 (the restored version), then train `from..to`: each returns
/// the versions of its first pull and its final parameters (none if the versions are not
/// `from`).
fn run_resumed(
    servers: Vec<PsServer>,
    workers: Vec<PsWorker>,
    from: u64,
    to: u64,
) -> Vec<(Vec<u64>, Vec<Vec<f32>>)> {
    run(servers, workers, |w, _| {
        let (_, versions) = pull_all(w, 0)?;
        if versions.iter().any(|&v| v != from) {
            return Ok((versions, Vec::new()));
        }
        push_all(w, from)?;
        for t in from + 1..to {
            step(w, t)?;
        }
        Ok((versions, final_pull(w, to)?))
    })
    .map(|(outs, _)| outs)
    .unwrap_or_else(|e| panic!("resumed run: {e}"))
}

/// A shard path that cannot be replaced (a directory with a file in it stands there): the
/// server writes the temporary file, fails to rename it, removes it and reports it as an
/// `Error::Checkpoint` naming the path; the servers keep serving, training continues exactly,
/// and the directory holds exactly what it held.
#[test]
fn a_shard_path_that_cannot_be_replaced_is_a_clear_error_and_leaves_no_temporary_file() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("ckpt");
    fs::create_dir_all(shard(&dir, 0)).expect("mkdir");
    fs::write(shard(&dir, 0).join("keep"), b"keep\n").expect("write");
    let before = files(&dir);
    let built = builder(ONE).checkpoint(&dir).build().expect("build");
    let run = train(built, 0..3, &[1], |w, _| try_checkpoint(w)).expect("train");
    match &run.actions[..] {
        [Err(m)] => assert!(
            m.contains(&shard(&dir, 0).display().to_string()),
            "unclear: {m}"
        ),
        other => panic!("expected a failed checkpoint, got {other:?}"),
    }
    assert_trained_exactly(&run, 0..3, "after a failed rename");
    assert_eq!(files(&dir), before, "a temporary file was left behind");
    assert_eq!(
        fs::read(shard(&dir, 0).join("keep")).expect("read"),
        b"keep\n"
    );
}

// ----- a checkpoint torn between servers -----

/// A kill in the middle of a whole-PS checkpoint, after server 0 renamed its new shard into
/// place and before server 1 did (`PsWorker::checkpoint` asks the servers in rank order), with
/// every key on one server (`replicas(1)`): shard-0 ('a') at the new version (2), shard-1 ('b')
/// at the previous one (1). Each file alone is valid, but no copy of 'b' at version 2 exists:
/// restoring must fail in `build()` with an `Error::Checkpoint` naming the versions and files
/// (in Sync every key is at one step), and leave the files as they were.
#[test]
fn a_checkpoint_torn_between_unreplicated_servers_is_refused_at_restore() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("ckpt");
    fs::create_dir(&dir).expect("mkdir");
    let built = builder(SPLIT).checkpoint(&dir).build().expect("build");
    let run = train(built, 0..3, &[1, 2], |w, _| {
        w.checkpoint().map_err(|e| format!("checkpoint: {e}"))?;
        try_files(&dir)
    })
    .expect("train");
    assert_trained_exactly(&run, 0..3, "checkpointed run");
    let (at1, at2) = (&run.actions[0], &run.actions[1]);
    assert_ne!(at1, at2);

    // What the kill leaves: server 0's new shard, server 1's previous one.
    let torn = root.path().join("torn");
    fs::create_dir(&torn).expect("mkdir");
    fs::write(shard(&torn, 0), &at2["shard-0.wccl-ckpt"]).expect("write");
    fs::write(shard(&torn, 1), &at1["shard-1.wccl-ckpt"]).expect("write");
    let before = files(&torn);

    match builder(SPLIT).restore(&torn).build() {
        Err(Error::Checkpoint { message, .. }) => {
            assert!(message.contains("version"), "unclear: {message}");
            assert!(message.contains("shard-"), "names no file: {message}");
        }
        Err(e) => panic!("expected Error::Checkpoint, got {e}"),
        Ok((servers, workers)) => {
            // Show what the restored servers serve: each key's head answers its own version.
            let seen = run_pulls(servers, workers);
            panic!(
                "a torn checkpoint (shard-0 at version 2, shard-1 at version 1) was restored: \
                 the workers' pulls of step 0 answered versions {seen:?} for {:?}",
                KEYS.map(|(n, _)| n)
            );
        }
    }
    assert_eq!(files(&torn), before, "the restore changed the files");
}

/// The same kill with every key on both servers (`replicas(2)`): shard-0 at version 2 holds
/// both keys, so the newest copy of each is whole. Restoring resumes every key at version 2
/// from it (not 'a' at 2 on one server and 1 on the other), and leaves the files as they were.
#[test]
fn a_checkpoint_torn_between_replicas_resumes_from_the_newest_copies() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("ckpt");
    fs::create_dir(&dir).expect("mkdir");
    let built = builder(TWO).checkpoint(&dir).build().expect("build");
    let run = train(built, 0..3, &[1, 2], |w, _| {
        w.checkpoint().map_err(|e| format!("checkpoint: {e}"))?;
        try_files(&dir)
    })
    .expect("train");
    assert_trained_exactly(&run, 0..3, "checkpointed run");
    let (at1, at2) = (&run.actions[0], &run.actions[1]);
    let torn = root.path().join("torn");
    fs::create_dir(&torn).expect("mkdir");
    fs::write(shard(&torn, 0), &at2["shard-0.wccl-ckpt"]).expect("write");
    fs::write(shard(&torn, 1), &at1["shard-1.wccl-ckpt"]).expect("write");
    let before = files(&torn);
    let (servers, workers) = builder(TWO).restore(&torn).build().expect("restore");
    let seen = run_pulls(servers, workers).expect("pulls");
    for versions in &seen {
        assert_eq!(
            versions,
            &vec![2; KEYS.len()],
            "every key resumes at version 2"
        );
    }
    assert_eq!(files(&torn), before, "the restore changed the files");
}

/// Every worker's pull of step 0: the versions it was answered with (or the error).
fn run_pulls(servers: Vec<PsServer>, workers: Vec<PsWorker>) -> R<Vec<Vec<u64>>> {
    run(servers, workers, |w, _| Ok(pull_all(w, 0)?.1)).map(|(outs, _)| outs)
}
