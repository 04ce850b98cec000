//! `wccl-bench reliability`: the lecture's table of the parameter server against ring
//! all-reduce, with a measured number in every cell, all from one run on one machine.
//!
//! The lecture puts it in words: the parameter server scales poorly (its link carries every
//! gradient) but tolerates dead and slow workers, and its server is a single point of failure;
//! ring all-reduce is bandwidth-optimal and decentralised, but one dead rank breaks it and it is
//! as slow as its slowest rank. Each row here runs both, with the same ranks, gradient and
//! compute per step:
//!
//! - **scalability**: all-reduce busbw at 4 and 8 ranks of 16 MiB (the ring, and the same
//!   reduction through one server), and the alpha-beta model at 1024 ranks, where one machine's
//!   ranks cannot go;
//! - **a dead worker** (killed halfway through the run): the parameter server's steps/s before
//!   and after; the fail-stop ring's error (how soon, naming whom) and the time to build a group
//!   of the survivors; the surviving ring's recovery and its steps/s after;
//! - **a 10x straggler** (one rank's compute ten times the others' on every step): each one's
//!   steps/s against its fault-free pace, waited for, then skipped (a backup worker for the
//!   parameter server, `skip_after` for the ring);
//! - **a dead server**: one server (every worker fails), replicated under `Strong` (the
//!   failover, nothing acknowledged lost) and under `Eventual` (the updates it loses);
//! - **a partition**: the parameter server's CAP choice (`Strong` refuses, `Eventual` answers
//!   stale and converges after healing), and the surviving ring's (the majority finishes, the
//!   cut-off rank is told `NoQuorum`).
//!
//! Every step's result is checked: the ring's on every rank against the f64 sum of exactly the
//! ranks its outcome names, the parameter server's final parameters against an f64 reference of
//! the pushes that count. A wrong result, or a run that does not behave as the design says (a
//! worker failing where a replica should take over, a refusal under `Eventual`), is listed
//! under the table and fails the command.

mod ps_train;
mod train;

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::BenchError;
use super::chaos::blame::blamed;
use crate::model::LinkModel;
use crate::ps::Consistency;
use crate::{Algorithm, CommConfig, CommGroup, Error, OnFailure};
use ps_train::{PsRan, PsTrain, WorkerLog};
use train::{Ran, RankLog, Train};

/// What one run of the table measures.
#[derive(Clone, Debug)]
pub struct ReliabilitySettings {
    /// Ring ranks, and parameter-server workers (the server is one more rank).
    pub ranks: usize,
    /// Training steps of each run; the faults come halfway.
    pub steps: u64,
    /// f32 elements of the gradient (of each key, for the parameter server).
    pub len: usize,
    /// A healthy rank's compute per step.
    pub compute: Duration,
    /// The straggler's compute is this many times the others'.
    pub slow_factor: u32,
    /// The ring skips ranks this late (`CallOptions::skip_after`).
    pub skip_after: Duration,
    /// Every call's and every server's deadline.
    pub deadline: Duration,
    /// The scalability row's all-reduce size, bytes.
    pub scale_bytes: u64,
    /// The scalability row's rank counts (measured).
    pub scale_ranks: Vec<usize>,
    /// Timed iterations per scalability measurement.
    pub scale_iters: usize,
    /// The scalability row's modelled rank count.
    pub model_ranks: usize,
    /// The links of the model.
    pub link: LinkModel,
    /// The rows to run (all when empty).
    pub only: Vec<Aspect>,
    /// Plant a wrong element in every result checked, to show that the checks fail the run.
    pub plant: bool,
}

/// The lecture's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aspect {
    /// Busbw at a few ranks, and the model at many.
    Scalability,
    /// A worker killed halfway.
    DeadWorker,
    /// One rank 10x slow on every step.
    Straggler,
    /// A server killed halfway.
    DeadServer,
    /// A server, or a ring rank, cut off.
    Partition,
}

impl Aspect {
    /// Every row, in the table's order.
    pub const ALL: [Aspect; 5] = [
        Aspect::Scalability,
        Aspect::DeadWorker,
        Aspect::Straggler,
        Aspect::DeadServer,
        Aspect::Partition,
    ];

    /// The row's name on the command line (`--only`).
    pub fn name(self) -> &'static str {
        match self {
            Aspect::Scalability => "scalability",
            Aspect::DeadWorker => "dead-worker",
            Aspect::Straggler => "straggler",
            Aspect::DeadServer => "dead-server",
            Aspect::Partition => "partition",
        }
    }

    /// The row named `name`.
    pub fn parse(name: &str) -> Option<Aspect> {
        Aspect::ALL.into_iter().find(|a| a.name() == name)
    }
}

impl Default for ReliabilitySettings {
    fn default() -> Self {
        ReliabilitySettings {
            ranks: 4,
            steps: 20,
            len: 1 << 16,
            compute: Duration::from_millis(20),
            slow_factor: 10,
            skip_after: Duration::from_millis(10),
            deadline: Duration::from_secs(1),
            scale_bytes: 16 << 20,
            scale_ranks: vec![4, 8],
            scale_iters: 3,
            model_ranks: 1024,
            link: LinkModel {
                gbps: 25.0,
                latency_us: 5.0,
                message_us: 0.0,
                reduce_gbps: None,
            },
            only: Vec::new(),
            plant: false,
        }
    }
}

/// Results checked, and what was wrong; shared by every run of the table.
#[derive(Default)]
pub(crate) struct Check {
    checked: AtomicU64,
    problems: Mutex<Vec<String>>,
    /// Every checked result gets a wrong element first (`--plant`).
    plant: bool,
    /// Results that could not be checked (a timing the check relies on did not hold).
    unchecked: Mutex<Vec<String>>,
}

impl Check {
    /// `n` more values checked.
    fn count(&self, n: u64) {
        self.checked.fetch_add(n, Ordering::Relaxed);
    }

    /// A result that could not be checked, and why.
    fn skipped(&self, what: String) {
        self.unchecked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(what);
    }

    /// A wrong result, or a run that did not behave as the design says.
    fn wrong(&self, what: String) {
        self.problems
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(what);
    }
}

/// The largest gradient, f32 elements (64 MiB: one process holds every rank's copies).
const MAX_GRAD_ELEMENTS: usize = 16 << 20;
/// The largest scalability size, bytes.
const MAX_SCALE_BYTES: u64 = 1 << 30;
/// The most ranks of one process.
const MAX_RANKS: usize = 64;

/// A size for people: in MiB or KiB when whole, else in bytes.
fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

/// Problems listed under the table; the rest are counted.
const SHOWN_PROBLEMS: usize = 20;

/// One cell of the table: an aspect, an architecture, what the lecture says, what was measured.
#[derive(Clone, Debug)]
pub struct Line {
    /// The lecture's row.
    pub aspect: &'static str,
    /// The lecture's column (and wccl's variant of it).
    pub arch: &'static str,
    /// What the lecture says.
    pub lecture: &'static str,
    /// What this run measured, one clause per entry.
    pub measured: Vec<String>,
}

/// The whole table.
#[derive(Debug)]
pub struct ReliabilityReport {
    /// What the run was: ranks, sizes, adapter.
    pub header: Vec<String>,
    /// The cells, row by row.
    pub lines: Vec<Line>,
    /// Values checked against a reference.
    pub checked: u64,
    /// Wrong results and runs that did not behave as designed.
    pub problems: Vec<String>,
    /// Results that could not be checked, and why (shown, not failed: a timing that a loaded
    /// machine can miss).
    pub unchecked: Vec<String>,
}

impl ReliabilityReport {
    /// Whether anything was wrong.
    pub fn failed(&self) -> bool {
        !self.problems.is_empty()
    }

    /// The table as text: the header, one block per cell, then the verdict.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for h in &self.header {
            let _ = writeln!(s, "# {h}");
        }
        let _ = writeln!(
            s,
            "{:<15} {:<24} {:<40} measured",
            "aspect", "architecture", "lecture"
        );
        let mut last = "";
        for l in &self.lines {
            let aspect = if l.aspect == last { "" } else { l.aspect };
            last = l.aspect;
            let mut clauses = l.measured.iter();
            let first = clauses.next().map_or("", String::as_str);
            let _ = writeln!(s, "{:<15} {:<24} {:<40} {first}", aspect, l.arch, l.lecture);
            for c in clauses {
                let _ = writeln!(s, "{:<81} {c}", "");
            }
        }
        let _ = writeln!(s);
        for p in self.problems.iter().take(SHOWN_PROBLEMS) {
            let _ = writeln!(s, "WRONG: {p}");
        }
        if let Some(more) = self
            .problems
            .len()
            .checked_sub(SHOWN_PROBLEMS)
            .filter(|&m| m > 0)
        {
            let _ = writeln!(s, "WRONG: ... and {more} more");
        }
        for u in &self.unchecked {
            let _ = writeln!(s, "unchecked: {u}");
        }
        let _ = writeln!(
            s,
            "checked {} values ({} results unchecked); {} problems: {}",
            self.checked,
            self.unchecked.len(),
            self.problems.len(),
            if self.failed() { "FAILED" } else { "passed" }
        );
        s
    }
}

/// Runs the whole table; `progress` gets a line as each row starts.
pub fn run(
    s: &ReliabilitySettings,
    progress: &mut dyn std::io::Write,
) -> Result<ReliabilityReport, BenchError> {
    if s.ranks < 3 {
        return Err(
            "reliability: --ranks must be at least 3 (a majority must survive a death)".into(),
        );
    }
    if s.steps < 4 {
        return Err("reliability: --steps must be at least 4 (a fault comes halfway)".into());
    }
    let slow = s.compute.saturating_mul(s.slow_factor);
    if slow.saturating_mul(2) >= s.deadline {
        return Err(format!(
            "reliability: the deadline ({} ms) must exceed twice the straggler's compute ({} ms): a straggler is slow, not dead",
            s.deadline.as_millis(),
            slow.as_millis()
        )
        .into());
    }
    if s.len == 0 || s.scale_bytes < 4 || s.scale_iters == 0 || s.scale_ranks.is_empty() {
        return Err("reliability: sizes, iterations and rank counts must be positive".into());
    }
    if s.len > MAX_GRAD_ELEMENTS || s.scale_bytes > MAX_SCALE_BYTES {
        return Err(format!(
            "reliability: the gradient is at most {} MiB and the scalability size {} MiB",
            (MAX_GRAD_ELEMENTS * 4) >> 20,
            MAX_SCALE_BYTES >> 20
        )
        .into());
    }
    if s.scale_ranks
        .iter()
        .chain([&s.ranks])
        .any(|&n| n > MAX_RANKS)
        || s.scale_ranks.contains(&0)
    {
        return Err(format!("reliability: rank counts are 1 to {MAX_RANKS} (one process)").into());
    }
    let link_ok = s.link.gbps.is_finite()
        && s.link.gbps > 0.0
        && s.link.latency_us.is_finite()
        && s.link.latency_us >= 0.0;
    if !link_ok {
        return Err(
            "reliability: the model's link needs a positive bandwidth and a latency of 0 or more"
                .into(),
        );
    }
    let check = Check {
        plant: s.plant,
        ..Check::default()
    };
    let mut lines = Vec::new();
    let mut adapter = String::from("the default adapter");
    for a in Aspect::ALL {
        if !s.only.is_empty() && !s.only.contains(&a) {
            continue;
        }
        let _ = writeln!(progress, "{} ...", a.name());
        match a {
            Aspect::Scalability => adapter = scalability(s, &check, &mut lines)?,
            Aspect::DeadWorker => dead_worker(s, &check, &mut lines)?,
            Aspect::Straggler => straggler(s, &check, &mut lines)?,
            Aspect::DeadServer => dead_server(s, &check, &mut lines)?,
            Aspect::Partition => partition(s, &check, &mut lines)?,
        }
    }
    let header = vec![
        "wccl-bench reliability: the lecture's parameter server against ring all-reduce, measured in one run".to_string(),
        format!(
            "{} ranks (ring) / {} workers + servers (ps), in one process on {adapter}; each run {} steps of {} ms compute and a {} f32 gradient; deadline {} ms; faults at step {}",
            s.ranks,
            s.ranks,
            s.steps,
            s.compute.as_millis(),
            size((s.len as u64).saturating_mul(4)),
            s.deadline.as_millis(),
            s.steps / 2
        ),
        "in-process ranks share this machine's cores: measured busbw falls with ranks for both; the model row is the links' argument".to_string(),
    ];
    let problems = check
        .problems
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    let unchecked = check
        .unchecked
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    Ok(ReliabilityReport {
        header,
        lines,
        checked: check.checked.load(Ordering::Relaxed),
        problems,
        unchecked,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn rate(x: Option<f64>) -> String {
    x.map_or("-".to_string(), |x| format!("{x:.1} steps/s"))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.3}x", a / b),
        _ => "-".to_string(),
    }
}

/// The first line of an error, shortened for a table cell.
fn brief(e: &Error) -> String {
    let t = e.to_string();
    let t = t.lines().next().unwrap_or("");
    if t.chars().count() > 110 {
        let cut: String = t.chars().take(107).collect();
        format!("{cut}...")
    } else {
        t.to_string()
    }
}

/// Busbw of all-reduce at each measured rank count (ring, and through one server), and the
/// model's at `model_ranks`. Returns the adapter's name.
fn scalability(
    s: &ReliabilitySettings,
    check: &Check,
    lines: &mut Vec<Line>,
) -> Result<String, BenchError> {
    let mut adapter = String::from("an unknown adapter");
    let (mut ring, mut ps) = (Vec::new(), Vec::new());
    let settings = super::Settings {
        sizes: vec![s.scale_bytes],
        iters: s.scale_iters,
        warmup: 1,
        timeout: Duration::from_secs(120),
        algos: vec![Algorithm::Ring],
        ..super::Settings::default()
    };
    for &n in &s.scale_ranks {
        let mut group = CommGroup::builder()
            .ranks(n)
            .config(CommConfig::default().timeout(settings.timeout))
            .build()?;
        if let Some(a) = group.adapters().first() {
            adapter = format!("{} ({:?})", a.name, a.backend);
        }
        let rows = super::run(&mut group, &settings, &mut std::io::sink())?;
        drop(group);
        for r in &rows {
            let wrong = r.out_of_place.wrong.saturating_add(r.in_place.wrong);
            check.count(r.count.saturating_mul(2).saturating_mul(n as u64));
            if wrong > 0 {
                check.wrong(format!(
                    "ring all-reduce at {n} ranks: {wrong} wrong elements"
                ));
            }
            ring.push(format!("{:.3} GB/s at {n}", r.out_of_place.busbw));
        }
        let rows = super::ps_rows(
            n,
            &[s.scale_bytes],
            s.scale_iters,
            1,
            true,
            settings.timeout,
        )?;
        for r in &rows {
            check.count(r.count.saturating_mul(n as u64));
            if r.out_of_place.wrong > 0 {
                check.wrong(format!(
                    "parameter server at {n} workers: {} wrong elements",
                    r.out_of_place.wrong
                ));
            }
            ps.push(format!("{:.3} GB/s at {n}", r.out_of_place.busbw));
        }
    }
    let n = s.model_ranks.max(2);
    let bytes = s.scale_bytes as f64;
    let t = s.link.all_reduce_seconds(n, bytes);
    let (ring_s, central_s) = (t.ring, t.central);
    let busbw = |sec: f64| bytes / sec / 1e9 * 2.0 * (n as f64 - 1.0) / n as f64;
    let link = format!("{} GB/s, {} us links", s.link.gbps, s.link.latency_us);
    let size = size(s.scale_bytes);
    lines.push(Line {
        aspect: "scalability",
        arch: "parameter server",
        lecture: "poor: the server's link carries all",
        measured: vec![
            format!("busbw {} ranks ({size}, measured)", ps.join(", ")),
            format!(
                "model at {n} ranks over {link}: {:.3} GB/s ({} the ring's)",
                busbw(central_s),
                ratio(Some(busbw(central_s)), Some(busbw(ring_s)))
            ),
        ],
    });
    lines.push(Line {
        aspect: "scalability",
        arch: "ring all-reduce",
        lecture: "excellent: bandwidth-optimal",
        measured: vec![
            format!("busbw {} ranks ({size}, measured)", ring.join(", ")),
            format!("model at {n} ranks over {link}: {:.3} GB/s", busbw(ring_s)),
        ],
    });
    Ok(adapter)
}

/// The ring's fault-free run, shared by the rows that compare with it.
fn train(s: &ReliabilitySettings) -> Train {
    Train::new(s.ranks, s.len, s.steps, s.compute, s.deadline)
}

fn ps_train(s: &ReliabilitySettings) -> PsTrain {
    PsTrain::new(s.ranks, s.len, s.steps, s.compute, s.deadline)
}

/// Worker `q`'s steps/s over steps `from..to`.
fn ps_pace(w: Option<&WorkerLog>, from: usize, to: usize) -> Option<f64> {
    let w = w?;
    let to = to.min(w.ends.len());
    if to <= from {
        return None;
    }
    let start = match from.checked_sub(1) {
        None => w.start,
        Some(p) => *w.ends.get(p)?,
    };
    let secs = w
        .ends
        .get(to - 1)?
        .saturating_duration_since(start)
        .as_secs_f64();
    (secs > 0.0).then(|| (to - from) as f64 / secs)
}

/// Ring rank `id`'s steps/s over steps `from..to`.
fn ring_pace(ran: &Ran, id: usize, from: usize, to: usize) -> Option<f64> {
    train::pace(ran.log(id)?, from, to)
}

/// The survivors' errors of a fail-stop run: the slowest detection (from the fault, or from the
/// start of the failing call if later), how many
/// named `victim`, how many failed at step `k`, and the first error.
fn detections(
    ran: &Ran,
    victim: usize,
    k: u64,
) -> (Option<Duration>, usize, usize, Option<&Error>) {
    let (mut slowest, mut named, mut failed) = (None::<Duration>, 0, 0);
    let mut first = None;
    for l in ran.logs.iter().filter(|l| l.id != victim) {
        if let Some((step, e, at, began)) = &l.error {
            failed += usize::from(*step == k);
            if blamed(e).contains(&victim) {
                named += 1;
            }
            if let Some(f) = ran.fault_at {
                // From the fault, or from the start of the call if it began later (the
                // survivors compute before they call).
                let d = at.saturating_duration_since(f.max(*began));
                slowest = Some(slowest.map_or(d, |x: Duration| x.max(d)));
            }
            first = first.or(Some(e));
        }
    }
    (slowest, named, failed, first)
}

/// The longest recovery the survivors report for step `k`; a survivor whose step `k` did not
/// recover is a problem (the fault landed elsewhere).
fn recovery_at(ran: &Ran, victim: usize, k: u64, what: &str, check: &Check) -> Option<Duration> {
    let mut recovered = None::<Duration>;
    for l in ran.logs.iter().filter(|l| l.id != victim) {
        match l.steps.get(k as usize).and_then(|x| x.1.recovered_in) {
            Some(r) => recovered = Some(recovered.map_or(r, |x: Duration| x.max(r))),
            None => check.wrong(format!(
                "{what}: rank {}'s step {k} did not recover (the fault came at step {k})",
                l.id
            )),
        }
    }
    recovered
}

/// Runs `t` (a fault on `victim` at step `k`) finishing among survivors: every survivor must
/// finish every step and recover in step `k`; returns the run and the longest recovery.
fn survivors_run(
    mut t: Train,
    victim: usize,
    k: u64,
    what: &str,
    check: &Check,
) -> Result<(Ran, Option<Duration>), BenchError> {
    t.on_failure = OnFailure::FinishAmongSurvivors;
    let ran = train::run(&t, check)?;
    for l in ran.logs.iter().filter(|l| l.id != victim) {
        survived(l, t.steps, what, check);
    }
    let recovered = recovery_at(&ran, victim, k, what, check);
    Ok((ran, recovered))
}

/// Step `k`'s duration on ring rank `id` (from the end of the step before).
fn ring_step(ran: &Ran, id: usize, k: usize) -> Option<Duration> {
    let l = ran.log(id)?;
    let end = l.steps.get(k)?.0;
    let before = match k.checked_sub(1) {
        None => l.start,
        Some(p) => l.steps.get(p)?.0,
    };
    Some(end.saturating_duration_since(before))
}

fn dead_worker(
    s: &ReliabilitySettings,
    check: &Check,
    lines: &mut Vec<Line>,
) -> Result<(), BenchError> {
    let victim = s.ranks - 1;
    let k = s.steps / 2;
    let ki = k as usize;
    let steps = s.steps as usize;

    // The parameter server: the worker dies, the server drops it, the rest go on.
    let mut t = ps_train(s);
    t.kill_worker = Some((victim, k));
    let ran = ps_train::run(&t)?;
    let w0 = ran.worker(0);
    let stall = w0.and_then(|w| ps_step(w, ki));
    ps_survivors_ok(&ran, victim, "ps, a dead worker", check);
    if ran.declared_failed() {
        // A healthy worker that missed the deadline on a loaded machine: the steps after it
        // applied without it, which this reference does not know.
        check.skipped("ps, a dead worker: a server declared a live worker failed".into());
    } else {
        check_without(&t, &ran, victim, k, "ps, a dead worker", check);
    }
    // Step 0 is the first use of every buffer: the paces start after it.
    let (before, after) = (ps_pace(w0, 1, ki), ps_pace(w0, ki + 1, steps));

    // A silent worker (cut off, links open): the server waits the deadline, then declares it
    // failed and goes on without it.
    let mut t = ps_train(s);
    t.cut_worker = Some((victim, k));
    let cut = ps_train::run(&t)?;
    ps_survivors_ok(&cut, victim, "ps, a silent worker", check);
    let declared = cut.declared_failed_workers(t.servers);
    if !declared.contains(&victim) {
        check.wrong(format!(
            "ps, a silent worker: the servers did not declare worker {victim} failed"
        ));
    }
    if declared.iter().any(|&q| q != victim) {
        check.skipped(format!(
            "ps, a silent worker: live workers declared failed too ({declared:?})"
        ));
    } else {
        check_without(&t, &cut, victim, k, "ps, a silent worker", check);
    }
    let c0 = cut.worker(0);
    let silent_stall = c0.and_then(|w| ps_step(w, ki));
    lines.push(Line {
        aspect: "dead worker",
        arch: "parameter server",
        lecture: "tolerated",
        measured: vec![
            format!(
                "killed: {} before, {} after with {} workers ({}); the step it died in took {} (its link closed: the server drops it at once)",
                rate(before),
                rate(after),
                s.ranks - 1,
                ratio(after, before),
                stall.map_or("-".into(), ms)
            ),
            format!(
                "silent (cut off): the step took {} (the server waits the {} deadline, then declares it failed), then {}",
                silent_stall.map_or("-".into(), ms),
                ms(s.deadline),
                rate(ps_pace(c0, ki + 1, steps))
            ),
        ],
    });

    // The fail-stop ring: every survivor fails, naming the dead rank; the job rebuilds.
    let mut t = train(s);
    t.kill = Some((victim, k));
    let ran = train::run(&t, check)?;
    let (slowest, named, failed, first) = detections(&ran, victim, k);
    if failed != s.ranks - 1 {
        check.wrong(format!(
            "ring fail-stop, a dead rank: {failed} of {} survivors failed at step {k}",
            s.ranks - 1
        ));
    }
    let rebuilt = Train::new(s.ranks - 1, s.len, s.steps - k, s.compute, s.deadline);
    let again = train::run(&rebuilt, check)?;
    for l in &again.logs {
        survived(l, rebuilt.steps, "ring fail-stop, the rebuilt group", check);
    }
    lines.push(Line {
        aspect: "dead worker",
        arch: "ring, fail-stop",
        lecture: "zero tolerance",
        measured: vec![
            format!(
                "{failed} of {} survivors fail at step {k}, within {} of the kill (or of their call's start, if later), {named} naming rank {victim}",
                s.ranks - 1,
                slowest.map_or("-".into(), ms)
            ),
            format!("  \"{}\"", first.map_or("-".into(), brief)),
            format!(
                "a fresh group of the {} survivors (devices and links) built in {}, then {} (before: {}); a real job also restarts from its checkpoint",
                s.ranks - 1,
                ms(again.built_in),
                rate(ring_pace(&again, 0, 0, steps)),
                rate(ring_pace(&ran, 0, 0, ki))
            ),
        ],
    });

    // The surviving ring: the call finishes among the survivors, training goes on.
    let mut t = train(s);
    t.kill = Some((victim, k));
    let (ran, recovered) = survivors_run(t, victim, k, "ring survivors, a dead rank", check)?;
    let (before, after) = (ring_pace(&ran, 0, 0, ki), ring_pace(&ran, 0, ki + 1, steps));
    lines.push(Line {
        aspect: "dead worker",
        arch: "ring, survivors (wccl)",
        lecture: "(zero tolerance)",
        measured: vec![
            format!(
                "the call it died in finished among {} in {} after the failure (revoke, agree, shrink, finish); the step took {}",
                s.ranks - 1,
                recovered.map_or("-".into(), ms),
                ring_step(&ran, 0, ki).map_or("-".into(), ms)
            ),
            format!(
                "{} before, {} after ({})",
                rate(before),
                rate(after),
                ratio(after, before)
            ),
        ],
    });
    Ok(())
}

/// Every key equals the reference of every worker's pushes, `victim`'s only before step `k`.
fn check_without(t: &PsTrain, ran: &PsRan, victim: usize, k: u64, what: &str, check: &Check) {
    let counted = |step: u64| {
        (0..t.workers)
            .filter(|&q| q != victim || step < k)
            .collect()
    };
    let off = ps_train::keys_off(t, ran, counted, check);
    if !off.is_empty() {
        check.wrong(format!(
            "{what}: {off:?} differ from the reference of the others' pushes"
        ));
    }
}

/// Every worker but `victim` finished without an error.
fn ps_survivors_ok(ran: &PsRan, victim: usize, what: &str, check: &Check) {
    for w in ran.workers.iter().filter(|w| w.q != victim) {
        if let Some((step, e, ..)) = &w.error {
            check.wrong(format!("{what}: worker {} failed at step {step}: {e}", w.q));
        }
    }
}

/// A ring rank that must finish every step did.
fn survived(l: &RankLog, steps: u64, what: &str, check: &Check) {
    if let Some((step, e, ..)) = &l.error {
        check.wrong(format!("{what}: rank {} failed at step {step}: {e}", l.id));
    } else if (l.steps.len() as u64) < steps {
        check.wrong(format!(
            "{what}: rank {} finished {} of {steps} steps",
            l.id,
            l.steps.len()
        ));
    }
}

fn straggler(
    s: &ReliabilitySettings,
    check: &Check,
    lines: &mut Vec<Line>,
) -> Result<(), BenchError> {
    let slow_rank = s.ranks - 1;
    let slow = s.compute.saturating_mul(s.slow_factor);
    let steps = s.steps as usize;
    let everyone = |_: u64| (0..s.ranks).collect::<Vec<usize>>();

    // The parameter server: waited for, then dropped as a backup worker's late push.
    let clean_t = ps_train(s);
    let clean = ps_train::run(&clean_t)?;
    ps_survivors_ok(&clean, usize::MAX, "ps, fault-free", check);
    ps_check_all(&clean_t, &clean, "ps, fault-free", &everyone, check);
    let mut waited_t = ps_train(s);
    waited_t.slow = Some((slow_rank, slow));
    let waited = ps_train::run(&waited_t)?;
    ps_survivors_ok(&waited, usize::MAX, "ps, a straggler", check);
    ps_check_all(&waited_t, &waited, "ps, a straggler", &everyone, check);
    let mut backup_t = waited_t;
    backup_t.backups = 1;
    let backup = ps_train::run(&backup_t)?;
    ps_survivors_ok(&backup, usize::MAX, "ps, a straggler, one backup", check);
    // The straggler is 9 compute times behind on every step: its pushes are the ones dropped,
    // all of them and nobody else's.
    let slow_pushes = backup
        .worker(slow_rank)
        .map_or(0, |w| w.ends.len() as u64 * backup_t.keys as u64);
    let backup_note = if backup.late() == slow_pushes && slow_pushes > 0 {
        let fast = |_: u64| (0..s.ranks).filter(|&q| q != slow_rank).collect::<Vec<_>>();
        let off = ps_train::keys_off(&backup_t, &backup, fast, check);
        if !off.is_empty() {
            check.wrong(format!(
                "ps, one backup worker: {off:?} differ from the reference of the fast workers' pushes"
            ));
        }
        format!("all {slow_pushes} of the straggler's pushes dropped as late")
    } else {
        // Which pushes counted is not known: the result cannot be checked.
        check.skipped(format!(
            "ps, one backup worker: {} pushes late, the straggler made {slow_pushes}",
            backup.late()
        ));
        format!(
            "{} pushes dropped as late, the straggler made {slow_pushes}: unchecked",
            backup.late()
        )
    };
    let (c, w, b) = (
        ps_pace(clean.worker(0), 1, steps),
        ps_pace(waited.worker(0), 1, steps),
        ps_pace(backup.worker(0), 1, steps),
    );
    lines.push(Line {
        aspect: "10x straggler",
        arch: "parameter server",
        lecture: "tolerated (backup workers)",
        measured: vec![
            waited_for(c, w),
            format!(
                "one backup worker: {} ({}); {backup_note}",
                rate(b),
                ratio(b, c)
            ),
        ],
    });

    // The ring: waited for, then skipped after `skip_after`.
    let clean = train::run(&train(s), check)?;
    for l in &clean.logs {
        survived(l, s.steps, "ring, fault-free", check);
    }
    let mut t = train(s);
    t.slow = Some((slow_rank, slow));
    let waited = train::run(&t, check)?;
    for l in &waited.logs {
        survived(l, s.steps, "ring, a straggler", check);
    }
    t.skip_after = Some(s.skip_after);
    let skipped = train::run(&t, check)?;
    // The straggler stops once rank 0 is done; the others must finish every step.
    for l in skipped.logs.iter().filter(|l| l.id != slow_rank) {
        survived(l, s.steps, "ring, a straggler skipped", check);
    }
    let skips = skipped.log(0).map_or(0, |l| {
        l.steps.iter().filter(|x| !x.1.skipped.is_empty()).count()
    });
    if skips == 0 {
        check.wrong("ring, a straggler skipped: no step skipped it".into());
    }
    let (c, w, k) = (
        ring_pace(&clean, 0, 0, steps),
        ring_pace(&waited, 0, 0, steps),
        ring_pace(&skipped, 0, 0, steps),
    );
    lines.push(Line {
        aspect: "10x straggler",
        arch: "ring all-reduce",
        lecture: "as slow as the slowest rank",
        measured: vec![
            waited_for(c, w),
            format!(
                "skip_after {}: {} ({}); skipped in {skips} of {} steps",
                ms(s.skip_after),
                rate(k),
                ratio(k, c),
                s.steps
            ),
        ],
    });
    Ok(())
}

/// The fault-free pace and the pace with the straggler waited for.
fn waited_for(clean: Option<f64>, waited: Option<f64>) -> String {
    format!(
        "fault-free {}; waited for {} ({} of fault-free)",
        rate(clean),
        rate(waited),
        ratio(waited, clean)
    )
}

/// Every key of a run in which every worker finished equals the reference of `counted`.
fn ps_check_all(
    t: &PsTrain,
    ran: &PsRan,
    what: &str,
    counted: &dyn Fn(u64) -> Vec<usize>,
    check: &Check,
) {
    if ran.declared_failed() {
        // A live worker that missed a deadline on a loaded machine: the steps after applied
        // without it. (A push counted late, a step already applied, is one sent again to a
        // replica taking over.)
        check.skipped(format!("{what}: a server declared a live worker failed"));
        return;
    }
    let off = ps_train::keys_off(t, ran, counted, check);
    if !off.is_empty() {
        check.wrong(format!(
            "{what}: {off:?} differ from the reference of every push"
        ));
    }
}

fn dead_server(
    s: &ReliabilitySettings,
    check: &Check,
    lines: &mut Vec<Line>,
) -> Result<(), BenchError> {
    let k = s.steps / 2;
    let ki = k as usize;
    let everyone = |_: u64| (0..s.ranks).collect::<Vec<usize>>();

    // One server: every worker fails.
    let mut t = ps_train(s);
    t.kill_server = Some((0, k));
    let ran = ps_train::run(&t)?;
    let (mut slowest, mut failed, mut named) = (None::<Duration>, 0, 0);
    let mut first = None;
    for w in &ran.workers {
        if let Some((_, e, at, began)) = &w.error {
            failed += 1;
            named += usize::from(blamed(e).contains(&0));
            if let Some(f) = ran.fault_at {
                let d = at.saturating_duration_since(f.max(*began));
                slowest = Some(slowest.map_or(d, |x: Duration| x.max(d)));
            }
            first = first.or(Some(e));
        }
    }
    if failed != s.ranks {
        check.wrong(format!(
            "ps, one server killed: {failed} of {} workers failed",
            s.ranks
        ));
    }
    lines.push(Line {
        aspect: "dead server",
        arch: "ps, one server",
        lecture: "single point of failure",
        measured: vec![
            format!(
                "fails: {failed} of {} workers fail within {} of the kill (or of their step's requests, if later), {named} naming the server",
                s.ranks,
                slowest.map_or("-".into(), ms)
            ),
            format!("  \"{}\"", first.map_or("-".into(), brief)),
        ],
    });

    // Replicated: 3 servers, key j headed by server j with server j+1 behind it; the head of
    // k0 (server 0) dies. Only k0 can lose updates: k1's chain does not hold server 0, and
    // k2's head (server 2) outlives its backup.
    for consistency in [Consistency::Strong, Consistency::Eventual] {
        let mut t = ps_train(s).replicated(3, 2, consistency);
        t.kill_server = Some((0, k));
        let ran = ps_train::run(&t)?;
        let name = match consistency {
            Consistency::Strong => "ps, 3 servers, Strong",
            Consistency::Eventual => "ps, 3 servers, Eventual",
        };
        ps_survivors_ok(&ran, usize::MAX, name, check);
        // The failover's cost: the step of the kill less a median step (signed), the worst
        // worker's.
        let mut cost = None::<f64>;
        for w in &ran.workers {
            let (Some(step), Some(median)) = (ps_step(w, ki), median_step(w)) else {
                continue;
            };
            let c = (step.as_secs_f64() - median.as_secs_f64()) * 1e3;
            cost = Some(cost.map_or(c, |x: f64| x.max(c)));
        }
        let failovers: u64 = ran.workers.iter().map(|w| w.failovers).sum();
        let all_ok = ran.workers.iter().all(|w| w.error.is_none());
        let checked = all_ok && !ran.declared_failed();
        let off = if checked {
            ps_train::keys_off(&t, &ran, everyone, check)
        } else {
            check.skipped(format!(
                "{name}: a worker failed or a live one was declared failed"
            ));
            Vec::new()
        };
        if let Some(other) = off.iter().find(|k| *k != "k0") {
            check.wrong(format!(
                "{name}: '{other}', whose head lived, differs from the reference of every push"
            ));
        }
        let mut measured = vec![format!(
            "failover: the step of the kill against a median step, {} (worst worker); {failovers} failovers",
            cost.map_or("-".into(), |c| format!("{c:+.1} ms")),
        )];
        match consistency {
            Consistency::Strong => {
                // Under Strong a worker is told of a loss (Error::Lost) instead of counting it.
                let told = ran
                    .workers
                    .iter()
                    .filter(|w| matches!(w.error, Some((_, Error::Lost { .. }, ..))))
                    .count();
                if !off.is_empty() {
                    check.wrong(format!(
                        "{name}: acknowledged updates lost silently: {off:?} off the reference of every push"
                    ));
                }
                measured.push(if checked {
                    "acknowledged updates lost: 0, every key equal to the reference of every push"
                        .to_string()
                } else {
                    format!("workers told of a loss: {told}; final parameters unchecked")
                });
            }
            Consistency::Eventual => {
                let told: u64 = ran.workers.iter().map(|w| w.lost).sum();
                measured.push(format!(
                    "updates lost: {told} seen by the workers; k0 {} the reference of every push{}",
                    if off.is_empty() { "equals" } else { "is off" },
                    if checked { "" } else { " (unchecked)" }
                ));
            }
        }
        lines.push(Line {
            aspect: "dead server",
            arch: match consistency {
                Consistency::Strong => "ps, 2 replicas, Strong",
                Consistency::Eventual => "ps, 2 replicas, Eventual",
            },
            lecture: "(not in the lecture)",
            measured,
        });
    }
    lines.push(Line {
        aspect: "dead server",
        arch: "ring all-reduce",
        lecture: "no server",
        measured: vec!["-".to_string()],
    });
    Ok(())
}

/// Step `k`'s duration on a worker (from the end of the step before).
fn ps_step(w: &WorkerLog, k: usize) -> Option<Duration> {
    let end = *w.ends.get(k)?;
    let before = match k.checked_sub(1) {
        None => w.start,
        Some(p) => *w.ends.get(p)?,
    };
    Some(end.saturating_duration_since(before))
}

/// The median of a worker's step times.
fn median_step(w: &WorkerLog) -> Option<Duration> {
    let mut d: Vec<Duration> = (0..w.ends.len()).filter_map(|k| ps_step(w, k)).collect();
    d.sort();
    d.get(d.len() / 2).copied()
}

fn partition(
    s: &ReliabilitySettings,
    check: &Check,
    lines: &mut Vec<Line>,
) -> Result<(), BenchError> {
    // The parameter server, Strong: the backup cannot prove it is current and refuses.
    let p = ps_train::partition_run(Consistency::Strong, s.len, s.deadline)?;
    for (i, r) in p.pulls.iter().enumerate() {
        // Steps 0-2 before the cut and 5 after it heal are answered; 3 and 4 refused.
        match (i, r) {
            (3 | 4, Ok(_)) => check.wrong(format!(
                "ps Strong, a partition: step {i}, cut off, was answered"
            )),
            (3 | 4, Err(Error::Unavailable { .. })) => {}
            (3 | 4, Err(e)) => check.wrong(format!(
                "ps Strong, a partition: step {i} refused with {e}, not Unavailable"
            )),
            (_, Err(e)) => check.wrong(format!("ps Strong, a partition: step {i} failed: {e}")),
            (_, Ok(_)) => {}
        }
    }
    let refused = p.pulls.get(3).and_then(|r| r.as_ref().err());
    let took = p.ends.get(3).map(|e| e.saturating_duration_since(p.cut_at));
    let back = p.pulls.get(5).is_some_and(Result::is_ok);
    lines.push(Line {
        aspect: "partition",
        arch: "ps, 2 replicas, Strong",
        lecture: "CAP: consistent",
        measured: vec![
            format!(
                "refuses after {} (the primary cut off; the backup cannot prove its copy current); after healing: {}",
                took.map_or("-".into(), ms),
                if back { "answers again" } else { "still refused" }
            ),
            format!("  \"{}\"", refused.map_or("-".into(), brief)),
        ],
    });

    // Eventual: the backup answers stale, and the replicas converge once the cut heals.
    let p = ps_train::partition_run(Consistency::Eventual, s.len, s.deadline)?;
    let mut stale = None::<Duration>;
    for (i, r) in p.pulls.iter().enumerate() {
        match r {
            Ok(info) => {
                if let Some(st) = info.staleness {
                    stale = Some(stale.map_or(st, |x: Duration| x.max(st)));
                } else if (3..5).contains(&i) {
                    check.wrong(format!(
                        "ps Eventual, a partition: step {i}, cut off, was not marked stale"
                    ));
                }
            }
            Err(e) => check.wrong(format!("ps Eventual, a partition: step {i} failed: {e}")),
        }
    }
    let digests: Vec<_> = p
        .servers
        .iter()
        .map(|r| r.as_ref().ok().map(|r| r.digests.clone()))
        .collect();
    let converged = digests.len() == 2 && digests[0].is_some() && digests[0] == digests[1];
    if !converged {
        check.wrong("ps Eventual, a partition: the replicas differ after healing".into());
    }
    let first_stale = p.ends.get(3).map(|e| e.saturating_duration_since(p.cut_at));
    let fresh = p
        .pulls
        .get(5)
        .is_some_and(|r| r.as_ref().is_ok_and(|i| i.staleness.is_none()));
    lines.push(Line {
        aspect: "partition",
        arch: "ps, 2 replicas, Eventual",
        lecture: "CAP: available",
        measured: vec![
            format!(
                "answers stale after {} (up to {} stale)",
                first_stale.map_or("-".into(), ms),
                stale.map_or("-".into(), ms)
            ),
            format!(
                "after healing: the next answer is {}; at the end {}",
                if fresh { "fresh" } else { "still stale" },
                if converged {
                    "the replicas are equal (converged)"
                } else {
                    "the replicas DIFFER"
                }
            ),
        ],
    });

    // The surviving ring: the majority finishes, the cut-off rank is told.
    let victim = s.ranks - 1;
    let k = s.steps / 2;
    let mut t = train(s);
    t.cut = Some((victim, k));
    let (ran, recovered) = survivors_run(t, victim, k, "ring survivors, a partition", check)?;
    let minority = ran.log(victim).and_then(|l| l.error.as_ref());
    match minority {
        Some((_, Error::NoQuorum { .. } | Error::Excluded { .. }, ..)) => {}
        Some((_, e, ..)) => check.wrong(format!(
            "ring survivors, a partition: the cut-off rank failed with {e}, not NoQuorum"
        )),
        None => check.wrong("ring survivors, a partition: the cut-off rank did not fail".into()),
    }
    let told = minority.map(|m| m.2.saturating_duration_since(ran.fault_at.unwrap_or(m.2)));
    lines.push(Line {
        aspect: "partition",
        arch: "ring, survivors (wccl)",
        lecture: "(not in the lecture)",
        measured: vec![
            format!(
                "{} of {} finish the call among themselves: the step took {} (a cut-off rank is found by its silence: the deadline, then {} of recovery)",
                s.ranks - 1,
                s.ranks,
                ring_step(&ran, 0, k as usize).map_or("-".into(), ms),
                recovered.map_or("-".into(), ms)
            ),
            format!(
                "the cut-off rank is told in {}: \"{}\"",
                told.map_or("-".into(), ms),
                minority.map_or("-".into(), |m| brief(&m.1))
            ),
        ],
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_a_few_problems_and_fails() {
        let r = ReliabilityReport {
            header: vec!["h".into()],
            lines: vec![Line {
                aspect: "dead worker",
                arch: "ring",
                lecture: "zero tolerance",
                measured: vec!["a".into(), "b".into()],
            }],
            checked: 7,
            problems: (0..25).map(|i| format!("p{i}")).collect(),
            unchecked: vec!["u".into()],
        };
        let t = r.render();
        assert!(r.failed());
        assert!(t.contains("WRONG: p19\n") && !t.contains("p20"), "{t}");
        assert!(t.contains("... and 5 more"), "{t}");
        assert!(t.contains("unchecked: u\n"), "{t}");
        assert!(
            t.contains("checked 7 values (1 results unchecked); 25 problems: FAILED"),
            "{t}"
        );
        let ok = ReliabilityReport {
            problems: Vec::new(),
            ..r
        };
        assert!(!ok.failed());
        assert!(ok.render().ends_with("0 problems: passed\n"));
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(size(16 << 20), "16 MiB");
        assert_eq!(size(256 << 10), "256 KiB");
        assert_eq!(
            (size(1000), size(0)),
            ("1000 B".to_string(), "0 B".to_string())
        );
        assert_eq!(size((1 << 20) + 1024), "1025 KiB");
    }

    #[test]
    fn aspects_parse_by_name() {
        for a in Aspect::ALL {
            assert_eq!(Aspect::parse(a.name()), Some(a));
        }
        assert_eq!(Aspect::parse("dead worker"), None);
    }
}
