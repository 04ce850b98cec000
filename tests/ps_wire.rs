//! Malicious and buggy frames sent straight to parameter servers, through the doc-hidden
//! `PsWorker::send_frame`/`recv_frame`, past every check a well-behaved worker makes first.
//!
//! In each run a "bad" worker sends frames with a wrong field (step, rank, key, kind, dtype,
//! shape, request number) while two good workers train on their own threads. Every bad frame
//! must get exactly one reply, a `Refused` with the expected `Refusal` code, echoing its request
//! number and with a reason naming the problem; the good workers' pulls must equal an
//! independent f64 reference of the good pushes alone; the servers' reports must show nothing
//! applied beyond the legitimate pushes and count every refusal.
//!
//! In `Sync` the bad worker is counted among the workers but never pushes a gradient that
//! could be folded in (`backups(1)`: each step applies after the two good workers' pushes), and
//! it says `done` only after the good workers finished, so the step never waits for it and the
//! required count never drops. Every wait has a deadline (the builder's timeout, channels with
//! `recv_timeout`), and threads return their failures as text instead of panicking.
//!
//! Not covered: a truncated header (shorter than `PsHeader`). `send_frame` always encodes a
//! whole header and the communicator's link is not public, so no test outside the crate can
//! send one.

use std::sync::mpsc;
use std::time::Duration;

use wccl::ps::wire::{F32, Kind, NO_RANK, PsHeader, PushStatus, Refusal};
use wccl::ps::{Mode, ParameterServer, PsWorker, ServerReport, Sgd};

/// The builder's deadline: how long a server waits for pushes, and a worker for an answer.
const TIMEOUT: Duration = Duration::from_secs(3);
/// How long a reply to one frame may take (a server busy applying a step answers late).
const REPLY: Duration = Duration::from_secs(10);
/// How long the bad worker listens, after its last frame, for a reply it must not get.
const QUIET: Duration = Duration::from_millis(500);
/// How long the bad worker waits for the good workers' progress.
const PROGRESS: Duration = Duration::from_secs(60);

const NAMES: [&str; 2] = ["a", "b"];
const SIZES: [usize; 2] = [7, 5];
/// Good workers (indices 0 and 1); the bad worker is index 2.
const GOOD: usize = 2;
const BAD: usize = 2;
const WORKERS: usize = 3;

/// Initial value of element `i` of key `k`: distinct per element over a period of 29.
fn init(k: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 13 + k * 5) % 29) as f32 / 16.0 - 0.875)
        .collect()
}

/// Worker `q`'s gradient of key `k` at step `t`: distinct per (worker, key, element) over a
/// period of 97 (not a power of two); multiples of 1/64, exact in f32.
fn grad(q: usize, k: usize, t: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 31 + q * 17 + k * 11 + t * 7) % 97) as f32 / 64.0 - 0.75)
        .collect()
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// SGD with momentum on the host in f64, written here independently of the library:
/// `m = momentum * m + g; w -= lr * m`.
fn sgd(lr: f64, momentum: f64, w: &mut [f64], m: &mut [f64], g: &[f64]) {
    for i in 0..w.len() {
        m[i] = momentum * m[i] + g[i];
        w[i] -= lr * m[i];
    }
}

/// `Sync` reference: `[t][k]`, key k after the updates of steps `0..t`, each the mean of the
/// good workers' gradients.
fn sync_reference(lr: f64, momentum: f64, steps: usize) -> Vec<Vec<Vec<f64>>> {
    let mut w: Vec<Vec<f64>> = (0..NAMES.len())
        .map(|k| init(k, SIZES[k]).into_iter().map(f64::from).collect())
        .collect();
    let mut m: Vec<Vec<f64>> = SIZES.iter().map(|&n| vec![0.0; n]).collect();
    let mut out = vec![w.clone()];
    for t in 0..steps {
        for (k, &n) in SIZES.iter().enumerate() {
            let g: Vec<f64> = (0..n)
                .map(|i| {
                    (0..GOOD)
                        .map(|q| f64::from(grad(q, k, t, n)[i]))
                        .sum::<f64>()
                        / GOOD as f64
                })
                .collect();
            sgd(lr, momentum, &mut w[k], &mut m[k], &g);
        }
        out.push(w.clone());
    }
    out
}

/// `got` against `want` within 1e-5 relative (NaN, the poison, never matches).
fn compare(what: &str, got: &[f32], want: &[f64]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} values, expected {}",
            got.len(),
            want.len()
        ));
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let diff = (f64::from(*g) - w).abs();
        if diff.is_nan() || diff > 1e-5 * (1.0 + w.abs()) {
            return Err(format!("{what}: element {i} is {g}, expected {w}"));
        }
    }
    Ok(())
}

fn join<T>(r: std::thread::Result<Result<T, String>>, who: &str) -> Result<T, String> {
    r.unwrap_or_else(|_| Err(format!("{who} thread panicked")))
}

/// What the good workers tell the bad one.
enum Progress {
    /// Step 0's update of every key applied (the sender's push of step 0 returned).
    Stepped,
    /// The sender is finished with its pushes and pulls.
    Finished,
}

/// One good worker in `Sync`: per step t, pull every key at t into a NaN-poisoned buffer and
/// check version t and the values against `refs[t]`, then push its gradient of step t.
fn good_sync(
    w: &mut PsWorker,
    refs: &[Vec<Vec<f64>>],
    steps: usize,
    tx: &mpsc::Sender<Progress>,
) -> Result<(), String> {
    let q = w.index();
    let err = |what: String| move |e: wccl::Error| format!("good worker {q}: {what}: {e}");
    let mut bufs = Vec::new();
    for &n in &SIZES {
        bufs.push(w.comm().buffer::<f32>(n).map_err(err("buffer".into()))?);
    }
    for (t, want) in refs.iter().enumerate().take(steps + 1) {
        for (k, name) in NAMES.iter().enumerate() {
            w.comm()
                .write(&bufs[k], &vec![f32::NAN; SIZES[k]])
                .map_err(err("poison".into()))?;
            let info = w
                .pull(name, t as u64, &bufs[k])
                .map_err(err(format!("pull '{name}' at step {t}")))?;
            if info.version != t as u64 {
                return Err(format!(
                    "good worker {q}: pull '{name}' at step {t} answered version {}",
                    info.version
                ));
            }
            let got = w
                .comm()
                .download(&bufs[k])
                .map_err(err("download".into()))?;
            compare(
                &format!("good worker {q}: pull '{name}' at step {t}"),
                &got,
                &want[k],
            )?;
        }
        if t < steps {
            for (k, name) in NAMES.iter().enumerate() {
                let g = w
                    .comm()
                    .upload(&grad(q, k, t, SIZES[k]))
                    .map_err(err("upload".into()))?;
                w.push(name, &g, t as u64)
                    .map_err(err(format!("push '{name}' at step {t}")))?;
            }
            if t == 0 {
                let _ = tx.send(Progress::Stepped);
            }
        }
    }
    Ok(())
}

/// The bad worker's side: sends frames and checks each reply.
struct Bad<'a> {
    w: &'a mut PsWorker,
    /// Its rank (servers + its index).
    rank: usize,
    /// Refusals received, per server rank.
    refused: Vec<u64>,
    /// What was sent, for failure messages.
    log: Vec<String>,
    /// What went wrong.
    failures: Vec<String>,
}

impl Bad<'_> {
    fn rank(&self) -> usize {
        self.rank
    }

    /// A header from this worker with a fresh request number.
    fn header(&mut self, kind: Kind, key: usize, step: u64, count: usize) -> PsHeader {
        let mut h = PsHeader::new(kind, self.rank(), key, step, count);
        h.req = self.w.next_req();
        h
    }

    /// Sends `h` with `payload` to `server` and returns its one reply.
    fn exchange(
        &mut self,
        server: usize,
        h: PsHeader,
        payload: Vec<u8>,
        what: &str,
    ) -> Result<(PsHeader, Vec<u8>), String> {
        self.log.push(format!("{what} -> server {server}"));
        self.w
            .send_frame(server, h, payload)
            .map_err(|e| format!("{what}: send: {e}"))?;
        let (r, p) = self
            .w
            .recv_frame(server, REPLY)
            .map_err(|e| format!("{what}: no reply from server {server}: {e}"))?;
        if r.req != h.req || r.rank as usize != server {
            return Err(format!(
                "{what}: the reply names request {} from rank {}, not {} from {server}",
                r.req, r.rank, h.req
            ));
        }
        Ok((r, p))
    }

    /// Sends a bad frame and checks that it is refused with `code`, echoing its number, with
    /// a reason containing every one of `needles`. A failure is recorded and the next frame
    /// goes on (each reply names its request, so one wrong answer does not hide the others).
    fn refused(
        &mut self,
        server: usize,
        h: PsHeader,
        payload: Vec<u8>,
        code: Refusal,
        needles: &[&str],
        what: &str,
    ) {
        let r = self.exchange(server, h, payload, what).and_then(|(r, p)| {
            let reason = String::from_utf8_lossy(&p).into_owned();
            if r.kind() != Some(Kind::Refused) {
                return Err(format!(
                    "{what}: answered {:?} (status {}), not refused",
                    r.kind(),
                    r.status
                ));
            }
            self.refused[server] += 1;
            if r.status != code as u32 {
                return Err(format!(
                    "{what}: refused with code {} ({:?}: '{reason}'), expected {code:?}",
                    r.status,
                    Refusal::from_code(r.status)
                ));
            }
            match needles.iter().find(|n| !reason.contains(*n)) {
                Some(n) => Err(format!("{what}: the reason '{reason}' does not name '{n}'")),
                None => Ok(()),
            }
        });
        if let Err(e) = r {
            self.failures.push(e);
        }
    }

    /// Sends a valid push and checks that it is acknowledged with `status`; a failure is
    /// recorded.
    fn acked(
        &mut self,
        server: usize,
        h: PsHeader,
        payload: Vec<u8>,
        status: PushStatus,
        what: &str,
    ) {
        let r = self.exchange(server, h, payload, what).and_then(|(r, p)| {
            if r.kind() != Some(Kind::PushAck) || r.status != status as u32 {
                return Err(format!(
                    "{what}: answered {:?} status {} ('{}'), expected a push ack {status:?}",
                    r.kind(),
                    r.status,
                    String::from_utf8_lossy(&p)
                ));
            }
            Ok(())
        });
        if let Err(e) = r {
            self.failures.push(e);
        }
    }

    /// Every failure recorded, or `Ok`.
    fn finish(&mut self) -> Result<(), String> {
        self.quiet_all();
        if self.failures.is_empty() {
            Ok(())
        } else {
            Err(format!("bad worker: {}", self.failures.join("; ")))
        }
    }

    fn quiet_all(&mut self) {
        for s in 0..self.refused.len() {
            if let Err(e) = self.quiet(s) {
                self.failures.push(e);
            }
        }
    }

    /// No reply beyond the ones taken: nothing more arrives from `server`.
    fn quiet(&mut self, server: usize) -> Result<(), String> {
        match self.w.recv_frame(server, QUIET) {
            Ok((h, p)) => Err(format!(
                "an extra reply from server {server}: {:?} for request {} ({}); sent: {:?}",
                h.kind(),
                h.req,
                String::from_utf8_lossy(&p),
                self.log
            )),
            Err(_) => Ok(()),
        }
    }
}

/// The bad worker's view of the good workers' progress.
struct Watch {
    rx: mpsc::Receiver<Progress>,
    stepped: usize,
    finished: usize,
}

impl Watch {
    /// Waits (each message within `PROGRESS`) until `cond` holds.
    fn until(&mut self, cond: fn(&Watch) -> bool) -> Result<(), String> {
        while !cond(self) {
            match self.rx.recv_timeout(PROGRESS) {
                Ok(Progress::Stepped) => self.stepped += 1,
                Ok(Progress::Finished) => self.finished += 1,
                Err(e) => return Err(format!("bad worker: waiting for the good workers: {e}")),
            }
        }
        Ok(())
    }
}

/// The malicious frames of the `Sync` run, to the one server (rank 0). Returns the number of
/// pushes acknowledged late (not folded).
fn bad_sync(bad: &mut Bad<'_>, watch: &mut Watch, refs: &[Vec<Vec<f64>>]) -> Result<u64, String> {
    let me = bad.rank();
    let (a, na) = (0usize, SIZES[0]);
    let g = bytes(&vec![1000.0f32; na]);
    // Steps no worker can be at: a push and a pull each.
    for step in [12345u64, u64::MAX, u64::MAX - 1] {
        let h = bad.header(Kind::Push, a, step, na);
        let s = step.to_string();
        bad.refused(
            0,
            h,
            g.clone(),
            Refusal::BadRequest,
            &[&s],
            &format!("push at step {step}"),
        );
        let h = bad.header(Kind::Pull, a, step, na);
        bad.refused(
            0,
            h,
            Vec::new(),
            Refusal::BadRequest,
            &[&s],
            &format!("pull at step {step}"),
        );
    }
    // Impersonation of a good worker, a rank beyond the group, no rank at all.
    for claimed in [0usize, 1, WORKERS + 5, NO_RANK as usize] {
        let mut h = bad.header(Kind::Push, a, 0, na);
        h.rank = claimed as u32;
        let c = claimed.to_string();
        bad.refused(
            0,
            h,
            g.clone(),
            Refusal::BadRequest,
            &["rank", &c],
            &format!("push claiming rank {claimed}"),
        );
    }
    // Not f32.
    for dtype in [F32 + 1, 0xdead] {
        let mut h = bad.header(Kind::Push, a, 0, na);
        h.dtype = dtype;
        bad.refused(
            0,
            h,
            g.clone(),
            Refusal::BadRequest,
            &["dtype", &dtype.to_string()],
            &format!("push of dtype {dtype}"),
        );
    }
    // Wrong shapes, through the server's own decoding: a count that is not the key's (with a
    // payload of that count), and a payload that is not the count's.
    let h = bad.header(Kind::Push, a, 0, na - 1);
    bad.refused(
        0,
        h,
        bytes(&vec![1000.0; na - 1]),
        Refusal::BadRequest,
        &["6", "7"],
        "push of 6 values for 7",
    );
    let h = bad.header(Kind::Push, a, 0, na + 1);
    bad.refused(
        0,
        h,
        bytes(&vec![1000.0; na + 1]),
        Refusal::BadRequest,
        &["8", "7"],
        "push of 8 values for 7",
    );
    let h = bad.header(Kind::Push, a, 0, na);
    bad.refused(
        0,
        h,
        bytes(&[1000.0; 5]),
        Refusal::BadRequest,
        &["5", "7"],
        "push of 7 values with 5 in the payload",
    );
    let h = bad.header(Kind::Push, a, 0, na);
    bad.refused(
        0,
        h,
        Vec::new(),
        Refusal::BadRequest,
        &["0", "7"],
        "push of 7 values with an empty payload",
    );
    let h = bad.header(Kind::Pull, a, 0, na + 3);
    bad.refused(
        0,
        h,
        Vec::new(),
        Refusal::BadRequest,
        &["10", "7"],
        "pull of 10 values for 7",
    );
    // Keys that do not exist.
    for key in [NAMES.len(), u32::MAX as usize] {
        let h = bad.header(Kind::Push, key, 0, na);
        bad.refused(
            0,
            h,
            g.clone(),
            Refusal::BadRequest,
            &["key", &key.to_string()],
            &format!("push for key {key}"),
        );
    }
    // Kinds that are no worker's request: unknown codes and server-to-server kinds.
    for code in [0u32, 99, u32::MAX] {
        let mut h = bad.header(Kind::Push, a, 0, na);
        h.kind = code;
        bad.refused(
            0,
            h,
            g.clone(),
            Refusal::BadRequest,
            &[&code.to_string()],
            &format!("kind code {code}"),
        );
    }
    for kind in [
        Kind::Replicate,
        Kind::ReplicaAck,
        Kind::Pong,
        Kind::Bye,
        Kind::Params,
        Kind::PushAck,
    ] {
        let mut h = bad.header(kind, a, 0, na);
        h.version = 1_000_000;
        h.hint = 2;
        let mut payload = bytes(&vec![1000.0; 2 * na]);
        payload.extend_from_slice(&0u32.to_le_bytes());
        payload.extend_from_slice(&(me as u32).to_le_bytes());
        let k = format!("{kind:?}");
        bad.refused(
            0,
            h,
            payload,
            Refusal::BadRequest,
            &[&k],
            &format!("a worker's {kind:?}"),
        );
    }
    // A worker's ping (a worker waiting for an answer checks that its server is alive) gets a
    // pong echoing its number, and changes nothing.
    let h = bad.header(Kind::Ping, a, 0, 0);
    let (r, _) = bad.exchange(0, h, Vec::new(), "a worker's ping")?;
    if r.kind() != Some(Kind::Pong) || r.req != h.req {
        return Err(format!("a worker's ping answered with {r:?}"));
    }
    // A request number of 0.
    let mut h = bad.header(Kind::Push, a, 0, na);
    h.req = 0;
    bad.refused(
        0,
        h,
        g.clone(),
        Refusal::BadRequest,
        &["number"],
        "push numbered 0",
    );

    // Replays. Once step 0 applied, a valid pull of step 1 (checked against the reference) and
    // a valid push of step 0, which comes late and is dropped; then the same number again and
    // an older one.
    // (A good worker that finished, failing, before that ends the wait too.)
    watch.until(|w| w.stepped > 0 || w.finished > 0)?;
    let h = bad.header(Kind::Pull, a, 1, na);
    let (r, p) = bad.exchange(0, h, Vec::new(), "valid pull at step 1")?;
    if r.kind() != Some(Kind::Params) || r.version < 1 || p.len() != 4 * na {
        return Err(format!(
            "valid pull at step 1: answered {:?} version {} with {} bytes",
            r.kind(),
            r.version,
            p.len()
        ));
    }
    let got: Vec<f32> = p
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let v = r.version as usize;
    let want = refs
        .get(v)
        .ok_or_else(|| format!("valid pull at step 1: version {v}"))?;
    compare(
        &format!("bad worker's valid pull (version {v})"),
        &got,
        &want[a],
    )?;
    let late = bad.header(Kind::Push, a, 0, na);
    bad.acked(
        0,
        late,
        g.clone(),
        PushStatus::Late,
        "valid push of step 0, late",
    );
    bad.refused(
        0,
        late,
        g.clone(),
        Refusal::Replayed,
        &["replay", &late.req.to_string()],
        "the late push again, same number",
    );
    let mut older = late;
    older.req = late.req - 1;
    bad.refused(
        0,
        older,
        g.clone(),
        Refusal::Replayed,
        &["replay"],
        "the late push again, an older number",
    );
    let mut pull = h;
    pull.req = late.req;
    bad.refused(
        0,
        pull,
        Vec::new(),
        Refusal::Replayed,
        &["replay"],
        "the valid pull again, the push's number",
    );
    // A fresh number after the replays is served again.
    let h = bad.header(Kind::Push, a, u64::MAX, na);
    bad.refused(
        0,
        h,
        g.clone(),
        Refusal::BadRequest,
        &["step"],
        "push at step u64::MAX after the replays",
    );
    bad.finish()?;
    Ok(1)
}

/// What a bad worker sends in a `Sync` run; returns the number of its pushes acknowledged late.
type BadFrames = fn(&mut Bad<'_>, &mut Watch, &[Vec<Vec<f64>>]) -> Result<u64, String>;

/// Runs `Sync` training with two good workers and a bad one sending `bad_frames`.
/// Returns the server reports and the bad worker's refusals per server.
#[allow(clippy::type_complexity)]
fn run_sync(
    nservers: usize,
    replicas: usize,
    steps: usize,
    refs: &[Vec<Vec<f64>>],
    rule: Sgd,
    bad_frames: BadFrames,
) -> Result<(Vec<ServerReport>, Vec<u64>, u64), String> {
    let mut b = ParameterServer::builder()
        .servers(nservers)
        .replicas(replicas)
        .workers(WORKERS)
        .backups(1)
        .mode(Mode::Sync)
        .rule(rule)
        .timeout(TIMEOUT);
    for (k, name) in NAMES.iter().enumerate() {
        b = b.param(*name, init(k, SIZES[k]));
    }
    let (servers, workers) = b.build().map_err(|e| format!("build: {e}"))?;
    let (tx, rx) = mpsc::channel();
    let mut rx = Some(rx);
    std::thread::scope(|s| {
        let hs: Vec<_> = servers
            .into_iter()
            .map(|sv| s.spawn(move || sv.serve().map_err(|e| e.to_string())))
            .collect();
        let mut good = Vec::new();
        let mut bad_thread = None;
        for mut w in workers {
            if w.index() == BAD {
                let rx = rx.take().ok_or("two bad workers")?;
                bad_thread = Some(s.spawn(move || -> Result<(Vec<u64>, u64), String> {
                    let rank = w.comm().rank();
                    let mut bad = Bad {
                        w: &mut w,
                        rank,
                        refused: vec![0; nservers],
                        log: Vec::new(),
                        failures: Vec::new(),
                    };
                    let mut watch = Watch {
                        rx,
                        stepped: 0,
                        finished: 0,
                    };
                    let late = bad_frames(&mut bad, &mut watch, refs);
                    let refused = bad.refused.clone();
                    // Only once the good workers are finished, even after a failure: done (or
                    // a link gone) earlier would lower the pushes a step needs.
                    watch.until(|w| w.finished >= GOOD)?;
                    w.done().map_err(|e| format!("bad worker: done: {e}"))?;
                    Ok((refused, late?))
                }));
            } else {
                let tx = tx.clone();
                good.push(s.spawn(move || -> Result<(), String> {
                    let r = good_sync(&mut w, refs, steps, &tx);
                    let _ = tx.send(Progress::Finished);
                    r?;
                    let q = w.index();
                    w.done().map_err(|e| format!("good worker {q}: done: {e}"))
                }));
            }
        }
        drop(tx);
        let good: Vec<Result<(), String>> = good
            .into_iter()
            .map(|h| join(h.join(), "good worker"))
            .collect();
        let bad = bad_thread.map(|h| join(h.join(), "bad worker"));
        let reports: Vec<Result<ServerReport, String>> =
            hs.into_iter().map(|h| join(h.join(), "server")).collect();
        let events: String = reports
            .iter()
            .enumerate()
            .map(|(r, x)| match x {
                Ok(rep) => format!("server {r} events {:?}; ", rep.events),
                Err(e) => format!("server {r} failed: {e}; "),
            })
            .collect();
        for g in good {
            g.map_err(|e| format!("{e}; {events}"))?;
        }
        let (refused, late) = bad
            .ok_or("no bad worker")?
            .map_err(|e| format!("{e}; {events}"))?;
        let reports = reports.into_iter().collect::<Result<Vec<_>, _>>()?;
        Ok((reports, refused, late))
    })
}

/// The malicious frames of the replicated run (2 servers, `replicas(2)`): each goes to the
/// server that only backs the key up (key k's chain is `[k % 2, (k + 1) % 2]`). Returns 0 (no
/// late pushes).
fn bad_backup(
    bad: &mut Bad<'_>,
    _watch: &mut Watch,
    _refs: &[Vec<Vec<f64>>],
) -> Result<u64, String> {
    let me = bad.rank();
    for (k, &n) in SIZES.iter().enumerate() {
        let (head, backup) = (k % 2, (k + 1) % 2);
        let g = bytes(&vec![1000.0f32; n]);
        let at = |what: &str| format!("{what} of key {k} to its backup {backup}");
        let ns = n.to_string();
        for dtype in [F32 + 2, u32::MAX] {
            let mut h = bad.header(Kind::Push, k, 0, n);
            h.dtype = dtype;
            bad.refused(
                backup,
                h,
                g.clone(),
                Refusal::BadRequest,
                &["dtype"],
                &at(&format!("push of dtype {dtype}")),
            );
        }
        let h = bad.header(Kind::Push, k, 0, n + 4);
        bad.refused(
            backup,
            h,
            bytes(&vec![1000.0; n + 4]),
            Refusal::BadRequest,
            &[&ns, &(n + 4).to_string()],
            &at("push of the wrong count"),
        );
        let h = bad.header(Kind::Push, k, 0, n);
        bad.refused(
            backup,
            h,
            bytes(&vec![1000.0; n - 2]),
            Refusal::BadRequest,
            &[&ns, &(n - 2).to_string()],
            &at("push with a short payload"),
        );
        let h = bad.header(Kind::Pull, k, 0, n - 1);
        bad.refused(
            backup,
            h,
            Vec::new(),
            Refusal::BadRequest,
            &[&ns, &(n - 1).to_string()],
            &at("pull of the wrong count"),
        );
        // Claiming to be the head server, or another worker.
        // (good worker 0 is rank 2: after the 2 servers)
        for claimed in [head, 2] {
            let mut h = bad.header(Kind::Push, k, 0, n);
            h.rank = claimed as u32;
            bad.refused(
                backup,
                h,
                g.clone(),
                Refusal::BadRequest,
                &["rank"],
                &at(&format!("push claiming rank {claimed}")),
            );
        }
        // A worker's replica: new parameters for the key, a chain naming the head and the
        // backup, a version far ahead; from its own rank and claiming the head's.
        for claimed in [me, head] {
            let mut h = bad.header(Kind::Replicate, k, 0, n);
            h.rank = claimed as u32;
            h.version = 1_000_000;
            h.hint = 2;
            let mut payload = bytes(&vec![1000.0; 2 * n]);
            payload.extend_from_slice(&(head as u32).to_le_bytes());
            payload.extend_from_slice(&(backup as u32).to_le_bytes());
            bad.refused(
                backup,
                h,
                payload,
                Refusal::BadRequest,
                &[],
                &at(&format!("a Replicate claiming rank {claimed}")),
            );
        }
        for step in [u64::MAX, u64::MAX - 1, 12345] {
            let s = step.to_string();
            let h = bad.header(Kind::Pull, k, step, n);
            bad.refused(
                backup,
                h,
                Vec::new(),
                Refusal::BadRequest,
                &[&s],
                &at(&format!("pull at step {step}")),
            );
        }
    }
    let h = bad.header(Kind::Push, NAMES.len(), 0, SIZES[0]);
    bad.refused(
        1,
        h,
        bytes(&vec![1000.0; SIZES[0]]),
        Refusal::BadRequest,
        &["key"],
        "push of an unknown key to server 1",
    );
    bad.finish()?;
    Ok(0)
}

/// Checks the reports of a `Sync` run: one update per key and step, nothing else applied,
/// every refusal counted where it happened, and every copy of every key equal to the
/// reference.
fn check_sync(
    reports: &[ServerReport],
    refused: &[u64],
    late: u64,
    refs: &[Vec<Vec<f64>>],
    steps: usize,
) -> Result<(), String> {
    let applied: u64 = reports.iter().map(|r| r.applied).sum();
    if applied != (NAMES.len() * steps) as u64 {
        return Err(format!(
            "{applied} updates applied, expected {} (keys x steps)",
            NAMES.len() * steps
        ));
    }
    for (s, r) in reports.iter().enumerate() {
        if r.refused != refused[s] {
            return Err(format!(
                "server {s} counts {} refusals; the bad worker got {}",
                r.refused, refused[s]
            ));
        }
        if r.duplicates != 0 || !r.gone.is_empty() {
            return Err(format!(
                "server {s}: {} duplicates, gone {:?}",
                r.duplicates, r.gone
            ));
        }
        for (name, values) in &r.params {
            let k = NAMES
                .iter()
                .position(|n| n == name)
                .ok_or(format!("server {s}: key '{name}'"))?;
            compare(
                &format!("server {s}: final '{name}'"),
                values,
                &refs[steps][k],
            )?;
        }
        for (name, v) in &r.versions {
            if *v != steps as u64 {
                return Err(format!(
                    "server {s}: '{name}' at version {v}, expected {steps}"
                ));
            }
        }
    }
    let l: u64 = reports.iter().map(|r| r.late).sum();
    if l != late {
        return Err(format!("{l} late pushes, expected {late}"));
    }
    Ok(())
}

/// In `Sync` on one server, every malicious frame (steps 12345, u64::MAX, u64::MAX-1 in a push
/// and a pull; a rank impersonating a good worker, beyond the group, or none; a dtype other
/// than f32; a count or a payload that is not the key's; an unknown key; unknown kind codes
/// and server-to-server kinds; request number 0; a replayed and an older request number) is
/// refused with the right code, its number echoed and a reason naming the problem, and with
/// no other reply; the good workers' every pull equals the f64 reference of their pushes
/// alone; the server applied one update per key and step, counted every refusal and only the
/// bad worker's one late push.
#[test]
fn sync_refuses_every_bad_frame_and_good_workers_stay_exact() {
    let steps = 6;
    let rule = Sgd {
        lr: 0.1,
        momentum: 0.5,
    };
    let refs = sync_reference(0.1, 0.5, steps);
    let (reports, refused, late) =
        run_sync(1, 1, steps, &refs, rule, bad_sync).unwrap_or_else(|e| panic!("{e}"));
    check_sync(&reports, &refused, late, &refs, steps).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(refused, [33], "refusals the bad worker got");
}

/// With `replicas(2)` over 2 servers, a server that only backs a key up validates a worker's
/// frame for that key itself: a wrong dtype, count, payload, claimed rank (the head's or a
/// good worker's), a worker's `Replicate` (even one claiming the head's rank), a pull at a
/// step no worker can be at, and an unknown key are refused as bad requests there, without
/// probing the head or parking them. Both copies of each key stay equal to the reference (and
/// their digests agree) and only the heads apply updates.
#[test]
fn backup_refuses_bad_frames_for_keys_it_only_backs_up() {
    let steps = 5;
    let rule = Sgd {
        lr: 0.1,
        momentum: 0.5,
    };
    let refs = sync_reference(0.1, 0.5, steps);
    let (reports, refused, late) =
        run_sync(2, 2, steps, &refs, rule, bad_backup).unwrap_or_else(|e| panic!("{e}"));
    check_sync(&reports, &refused, late, &refs, steps).unwrap_or_else(|e| panic!("{e}"));
    for name in NAMES {
        let d: Vec<u64> = reports
            .iter()
            .flat_map(|r| r.digests.iter().filter(|(n, _)| n == name).map(|(_, d)| *d))
            .collect();
        assert!(d.len() == 2 && d[0] == d[1], "'{name}' digests {d:?}");
    }
}

/// In `Async`: bad steps (12345, u64::MAX, u64::MAX-1; push and pull), a replayed and an
/// older request number, and a server-to-server kind are refused; a second push of the same
/// step with a fresh number is acknowledged as a duplicate and applied once; after steps
/// 0..200 a push of step 5, older than the 64-step dedupe window, is refused with a reason
/// saying so (not applied), while step 150, inside it, is a duplicate. The final parameters
/// equal the f64 reference of exactly the accepted pushes (SGD without momentum, so the
/// arrival order does not matter) and `applied`, `duplicates`, `refused` count them. (The
/// good workers' pulls in between depend on the order of arrival: they are checked for being
/// finite, over a poison, with a version that never goes back.)
#[test]
fn async_dedupes_in_a_bounded_window_and_refuses_replays() {
    const STEPS: usize = 12;
    const BAD_STEPS: usize = 200;
    let lr = 0.05f32;
    let (servers, workers) = NAMES
        .iter()
        .enumerate()
        .fold(ParameterServer::builder(), |b, (k, name)| {
            b.param(*name, init(k, SIZES[k]))
        })
        .workers(WORKERS)
        .mode(Mode::Async)
        .rule(Sgd { lr, momentum: 0.0 })
        .timeout(TIMEOUT)
        .build()
        .unwrap_or_else(|e| panic!("build: {e}"));
    let bad_grad = |t: usize| grad(BAD, 0, t, SIZES[0]);
    let out = std::thread::scope(|s| {
        let server = servers
            .into_iter()
            .map(|sv| s.spawn(move || sv.serve().map_err(|e| e.to_string())))
            .next()
            .expect("one server");
        let mut hs = Vec::new();
        for mut w in workers {
            hs.push(s.spawn(move || -> Result<u64, String> {
                let q = w.index();
                if q == BAD {
                    let rank = w.comm().rank();
                    let mut bad = Bad {
                        w: &mut w,
                        rank,
                        refused: vec![0],
                        log: Vec::new(),
                        failures: Vec::new(),
                    };
                    async_bad(&mut bad, &bad_grad);
                    let r = bad.finish();
                    let n = bad.refused[0];
                    w.done().map_err(|e| format!("bad worker: done: {e}"))?;
                    return r.map(|()| n);
                }
                let err =
                    |what: String| move |e: wccl::Error| format!("good worker {q}: {what}: {e}");
                let mut last = 0;
                for t in 0..STEPS {
                    for (k, name) in NAMES.iter().enumerate() {
                        let g = w
                            .comm()
                            .upload(&grad(q, k, t, SIZES[k]))
                            .map_err(err("upload".into()))?;
                        w.push(name, &g, t as u64)
                            .map_err(err(format!("push '{name}' at {t}")))?;
                        let buf = w
                            .comm()
                            .buffer::<f32>(SIZES[k])
                            .map_err(err("buffer".into()))?;
                        w.comm()
                            .write(&buf, &vec![f32::NAN; SIZES[k]])
                            .map_err(err("poison".into()))?;
                        let info = w
                            .pull(name, t as u64 + 1, &buf)
                            .map_err(err(format!("pull '{name}' at {t}")))?;
                        let got = w.comm().download(&buf).map_err(err("download".into()))?;
                        if got.iter().any(|x| !x.is_finite()) || (k == 0 && info.version < last) {
                            return Err(format!(
                                "good worker {q}: pull '{name}' at {t}: version {} {got:?}",
                                info.version
                            ));
                        }
                        if k == 0 {
                            last = info.version;
                        }
                    }
                }
                w.done()
                    .map_err(|e| format!("good worker {q}: done: {e}"))?;
                Ok(0)
            }));
        }
        let ws: Vec<Result<u64, String>> =
            hs.into_iter().map(|h| join(h.join(), "worker")).collect();
        (ws, join(server.join(), "server"))
    });
    let (ws, report) = out;
    let events = match &report {
        Ok(r) => format!("{:?}", r.events),
        Err(e) => e.clone(),
    };
    let ws: Vec<u64> = ws
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{e}; {events}"));
    let report = report.unwrap_or_else(|e| panic!("server: {e}"));
    // Reference: every accepted push applied once, scaled by 1/workers.
    let n = WORKERS as f64;
    for (k, &len) in SIZES.iter().enumerate() {
        let mut w: Vec<f64> = init(k, len).into_iter().map(f64::from).collect();
        let mut m = vec![0.0; len];
        let mut gs: Vec<Vec<f32>> = (0..GOOD)
            .flat_map(|q| (0..STEPS).map(move |t| grad(q, k, t, len)))
            .collect();
        if k == 0 {
            gs.extend((0..BAD_STEPS).map(bad_grad));
        }
        for g in gs {
            let g: Vec<f64> = g.iter().map(|&x| f64::from(x) / n).collect();
            sgd(f64::from(lr), 0.0, &mut w, &mut m, &g);
        }
        let got = &report
            .params
            .iter()
            .find(|(x, _)| x == NAMES[k])
            .expect("key in report")
            .1;
        compare(&format!("final '{}'", NAMES[k]), got, &w)
            .unwrap_or_else(|e| panic!("{e}; {events}"));
    }
    assert_eq!(
        report.applied,
        (GOOD * STEPS * NAMES.len() + BAD_STEPS) as u64,
        "applied; {events}"
    );
    assert_eq!(
        report.duplicates, 2,
        "duplicates (step 0 again, step 150 again)"
    );
    assert_eq!(report.refused, ws[BAD], "refusals counted vs received");
    assert_eq!(report.late, 0);
}

/// The bad worker of the `Async` run (to server 0, key 0).
fn async_bad(bad: &mut Bad<'_>, bad_grad: &dyn Fn(usize) -> Vec<f32>) {
    let (a, n) = (0usize, SIZES[0]);
    let junk = bytes(&vec![1000.0f32; n]);
    for step in [12345u64, u64::MAX, u64::MAX - 1] {
        let s = step.to_string();
        let h = bad.header(Kind::Push, a, step, n);
        bad.refused(
            0,
            h,
            junk.clone(),
            Refusal::BadRequest,
            &[&s],
            &format!("push at step {step}"),
        );
        let h = bad.header(Kind::Pull, a, step, n);
        bad.refused(
            0,
            h,
            Vec::new(),
            Refusal::BadRequest,
            &[&s],
            &format!("pull at step {step}"),
        );
    }
    // A valid push, the same number again, an older one.
    let first = bad.header(Kind::Push, a, 0, n);
    bad.acked(
        0,
        first,
        bytes(&bad_grad(0)),
        PushStatus::Applied,
        "push of step 0",
    );
    bad.refused(
        0,
        first,
        junk.clone(),
        Refusal::Replayed,
        &["replay", &first.req.to_string()],
        "push of step 0 again, same number",
    );
    let mut older = first;
    older.req -= 1;
    bad.refused(
        0,
        older,
        junk.clone(),
        Refusal::Replayed,
        &["replay"],
        "push of step 0 again, an older number",
    );
    // The same step with a fresh number: a duplicate, dropped.
    let h = bad.header(Kind::Push, a, 0, n);
    bad.acked(
        0,
        h,
        junk.clone(),
        PushStatus::Duplicate,
        "push of step 0 again, a fresh number",
    );
    for t in 1..200 {
        let h = bad.header(Kind::Push, a, t as u64, n);
        bad.acked(
            0,
            h,
            bytes(&bad_grad(t)),
            PushStatus::Applied,
            &format!("push of step {t}"),
        );
    }
    // Older than the window: refused, not applied; inside it: a duplicate.
    let h = bad.header(Kind::Push, a, 5, n);
    bad.refused(
        0,
        h,
        junk.clone(),
        Refusal::BadRequest,
        &["step 5", "64"],
        "push of step 5 after step 199",
    );
    let h = bad.header(Kind::Push, a, 150, n);
    bad.acked(
        0,
        h,
        junk.clone(),
        PushStatus::Duplicate,
        "push of step 150 after step 199",
    );
    // A server-to-server kind, and an impersonation.
    let mut h = bad.header(Kind::Replicate, a, 0, n);
    h.version = 1_000_000;
    h.hint = 1;
    let mut payload = bytes(&vec![1000.0; 2 * n]);
    payload.extend_from_slice(&0u32.to_le_bytes());
    bad.refused(
        0,
        h,
        payload,
        Refusal::BadRequest,
        &["Replicate"],
        "a worker's Replicate",
    );
    let mut h = bad.header(Kind::Push, a, 200, n);
    h.rank = 1;
    bad.refused(
        0,
        h,
        junk,
        Refusal::BadRequest,
        &["rank"],
        "push of step 200 claiming rank 1",
    );
}

/// Pushes at steps no worker can be at (u64::MAX, u64::MAX-1, 12345) sent to the server that
/// only backs the key up. Returns 0 (no late pushes).
fn bad_backup_steps(
    bad: &mut Bad<'_>,
    _watch: &mut Watch,
    _refs: &[Vec<Vec<f64>>],
) -> Result<u64, String> {
    for (k, &n) in SIZES.iter().enumerate() {
        let backup = (k + 1) % 2;
        for step in [u64::MAX, u64::MAX - 1, 12345] {
            let h = bad.header(Kind::Push, k, step, n);
            bad.refused(
                backup,
                h,
                bytes(&vec![1000.0; n]),
                Refusal::BadRequest,
                &[&step.to_string()],
                &format!("push at step {step} of key {k} to its backup {backup}"),
            );
        }
    }
    bad.finish()?;
    Ok(0)
}

/// A push at a step no worker can be at, sent to a server that only backs the key up, is
/// refused there as a bad request naming the step, like a pull at such a step is: it is
/// validated before it changes state (it is not parked, and does not start a probe of the
/// head, or a take-over were the head gone, only to be bounced to the head with `AskOther`).
/// The good workers stay exact.
#[test]
fn backup_refuses_a_push_at_an_impossible_step() {
    let steps = 3;
    let rule = Sgd {
        lr: 0.1,
        momentum: 0.5,
    };
    let refs = sync_reference(0.1, 0.5, steps);
    let (reports, refused, late) =
        run_sync(2, 2, steps, &refs, rule, bad_backup_steps).unwrap_or_else(|e| panic!("{e}"));
    check_sync(&reports, &refused, late, &refs, steps).unwrap_or_else(|e| panic!("{e}"));
}

/// Shapes that are wrong in ways the count check does not describe: a payload whose length
/// is not a whole number of f32 values, and pulls with a wrong count or carrying a payload.
fn bad_reasons(
    bad: &mut Bad<'_>,
    _watch: &mut Watch,
    _refs: &[Vec<Vec<f64>>],
) -> Result<u64, String> {
    let n = SIZES[0];
    let mut odd = bytes(&vec![1000.0; n]);
    odd.extend_from_slice(&[1, 2, 3]);
    let h = bad.header(Kind::Push, 0, 0, n);
    bad.refused(
        0,
        h,
        odd,
        Refusal::BadRequest,
        &["31"],
        "push of 7 values in 31 bytes",
    );
    let h = bad.header(Kind::Pull, 0, 0, n + 3);
    bad.refused(
        0,
        h,
        Vec::new(),
        Refusal::BadRequest,
        &["pull", "10"],
        "pull of 10 values for 7",
    );
    let h = bad.header(Kind::Pull, 0, 0, n);
    bad.refused(
        0,
        h,
        bytes(&vec![1000.0; n]),
        Refusal::BadRequest,
        &["pull", "28"],
        "pull carrying a 28-byte payload",
    );
    bad.finish()?;
    Ok(0)
}

/// A shape refusal's reason names what is wrong: the byte length of a payload that is not a
/// whole number of f32 values, and the kind of a pull (not "push of N values for 'a', which
/// has 7", which for 31 bytes or a pull's payload names no difference at all).
#[test]
fn shape_refusals_name_what_is_wrong() {
    let steps = 2;
    let rule = Sgd {
        lr: 0.1,
        momentum: 0.5,
    };
    let refs = sync_reference(0.1, 0.5, steps);
    let (reports, refused, late) =
        run_sync(1, 1, steps, &refs, rule, bad_reasons).unwrap_or_else(|e| panic!("{e}"));
    check_sync(&reports, &refused, late, &refs, steps).unwrap_or_else(|e| panic!("{e}"));
}

/// A frame whose header is 3 bytes (no header can be read from it, so no request number can be
/// echoed) gets a `BadRequest` refusal numbered 0, changes nothing, and the server goes on
/// serving the same worker: its next push and pull are exact.
#[test]
fn a_truncated_header_is_refused_and_the_server_keeps_serving() {
    let (servers, mut workers) = ParameterServer::builder()
        .servers(1)
        .workers(1)
        .mode(Mode::Sync)
        .rule(Sgd {
            lr: 0.5,
            momentum: 0.0,
        })
        .param("w", vec![1.0, 2.0, 3.0])
        .timeout(Duration::from_secs(3))
        .build()
        .expect("build");
    let mut w = workers.remove(0);
    let got = std::thread::scope(|s| {
        let hs: Vec<_> = servers
            .into_iter()
            .map(|sv| s.spawn(move || sv.serve()))
            .collect();
        let run = (|| -> wccl::Result<(Vec<u8>, Vec<f32>, u64)> {
            w.send_raw(0, vec![1, 2, 3], Vec::new())?;
            let (h, reason) = w.recv_frame(0, Duration::from_secs(3))?;
            assert_eq!(h.kind(), Some(Kind::Refused));
            assert_eq!(h.req, 0);
            assert_eq!(Refusal::from_code(h.status), Refusal::BadRequest);
            let g = w.comm().upload(&[2.0f32, 4.0, 6.0])?;
            w.push("w", &g, 0)?;
            let p = w.comm().upload(&[f32::NAN; 3])?;
            let info = w.pull("w", 1, &p)?;
            Ok((reason, w.comm().download(&p)?, info.version))
        })();
        let _ = w.done();
        let reports: Vec<_> = hs.into_iter().map(|h| h.join()).collect();
        (run, reports)
    });
    let (run, reports) = got;
    let (reason, params, version) = run.expect("the worker's calls");
    assert!(
        String::from_utf8_lossy(&reason).contains("malformed header"),
        "{}",
        String::from_utf8_lossy(&reason)
    );
    assert_eq!(version, 1);
    // w - 0.5 * g, g = the one worker's gradient.
    assert_eq!(params, vec![0.0, 0.0, 0.0]);
    let report = reports
        .into_iter()
        .next()
        .expect("one server")
        .expect("server thread")
        .expect("server");
    assert_eq!(report.applied, 1);
}
