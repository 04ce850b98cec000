//! Trials on real processes: 3 or 4 copies of a program (`wccl-bench` itself), one rank each,
//! joined over loopback TCP by wccl's rendezvous (a file rendezvous: rank 0 listens on a port
//! of its own choosing and publishes it, so no port is raced for), make a few all-reduces and
//! a closing barrier; the campaign kills one with SIGKILL, or stops it with SIGSTOP (a process
//! that hangs without closing its sockets), once it has reported a random call done. Every
//! result a child reports is checked by the child against an f64 reference of exactly the
//! ranks its outcome names; the parent judges the rest ([`judge`]): every survivor must print
//! its last line and exit (no hang, in the call or in teardown), with the status its line
//! implies; the survivors of one call must name one set; the errors must name the process it
//! hit.
//!
//! The child side is [`child`], which a program runs when [`CHILD_VAR`] is set (`wccl-bench`
//! does). It prints one line per event:
//!
//! - `READY` once joined;
//! - `OK <call> <contributors> <recovered_us> <size>` per call that succeeded and checked
//!   right (contributors by their numbers at the start, comma-separated; recovered_us `-` when
//!   it did not recover; size, the communicator's when the call began);
//! - as its last line, `DONE` (exit 0), `ERR <call> <blamed> <in_call_us> <error>` or
//!   `WRONG <call> <index> <got> <want>` (exit 1).

use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::Rng;

use super::blame::blamed;
use super::trial::{Setup, TrialResult, Verdict};
use super::{Fault, Plant};
use crate::link::TcpOptions;
use crate::{
    CallOptions, Collective, CommConfig, Communicator, ConnectOptions, OnFailure, Outcome, ReduceOp,
};

/// Set in a child's environment: `LEN;CALLS;DEADLINE_MS;SURVIVE;PLANT` (SURVIVE 0 or 1; PLANT
/// 0 none, 1 a wrong element, 2 errors swallowed).
pub const CHILD_VAR: &str = "WCCL_CHAOS_CHILD";

/// All-reduces per trial (then a barrier).
const CALLS: usize = 8;
/// The longest a child may take to join (start, open a device, rendezvous).
const JOIN_WITHIN: Duration = Duration::from_secs(60);
/// What a survivor's teardown may take beyond its calls: a TCP link lingers up to 10 s for
/// a peer to read what it sent (`TcpOptions::linger`), twice for margin.
const TEARDOWN: Duration = Duration::from_secs(20);
/// Tries of a trial whose processes could not start or join (a busy machine, a port taken):
/// the trial is not run rather than the campaign lost.
const LAUNCH_TRIES: usize = 3;

/// Rank `rank`'s input of call `call`, element `i`: distinct per (rank, element) for
/// `i < 142_857`, below 4,000,037 so that sums over 4 ranks stay exact in f32.
fn input(rank: usize, call: usize, i: usize) -> f32 {
    let v = (rank as u64)
        .wrapping_mul(1_000_003)
        .wrapping_add((i as u64).wrapping_mul(7))
        .wrapping_add((call as u64).wrapping_mul(13))
        % 4_000_037;
    (v + 1) as f32
}

/// The child: joins the job its launcher variables describe, runs the calls `spec` says,
/// checks each, prints its lines; returns the exit code (0 after `DONE`).
pub fn child(spec: &str) -> u8 {
    let f: Vec<&str> = spec.split(';').collect();
    let parsed = match f.as_slice() {
        [len, calls, ms, survive, plant] => (|| {
            Some((
                len.parse::<usize>().ok()?,
                calls.parse::<usize>().ok()?,
                ms.parse::<u64>().ok()?,
                *survive == "1",
                plant.parse::<u8>().ok()?,
            ))
        })(),
        _ => None,
    };
    let Some((len, calls, ms, survive, plant)) = parsed else {
        say(&format!(
            "ERR 0 - 0 {CHILD_VAR}={spec:?} is not LEN;CALLS;DEADLINE_MS;SURVIVE;PLANT"
        ));
        return 2;
    };
    let options = ConnectOptions {
        tcp: TcpOptions {
            timeout: JOIN_WITHIN,
            ..TcpOptions::default()
        },
        config: CommConfig::default()
            .timeout(Duration::from_millis(ms))
            .on_failure(if survive {
                OnFailure::FinishAmongSurvivors
            } else {
                OnFailure::Error
            }),
        ..ConnectOptions::default()
    };
    let mut comm = match Communicator::from_env_with(options) {
        Ok(c) => c,
        Err(e) => {
            say(&format!(
                "ERR 0 - 0 could not join: {}",
                one_line(&e.to_string())
            ));
            return 2;
        }
    };
    say("READY");
    match calls_of(&mut comm, len, calls, plant) {
        Ok(()) => {
            say("DONE");
            0
        }
        Err(line) => {
            say(&line);
            1
        }
    }
}

/// The calls, then a barrier (so that no survivor leaves while another still needs it in a
/// recovery); `Err` holds the last line (`WRONG` or `ERR`).
fn calls_of(comm: &mut Communicator, len: usize, calls: usize, plant: u8) -> Result<(), String> {
    let me = comm.rank();
    let n = comm.size();
    let err = |call: usize, e: &crate::Error, started: Instant| {
        let b: Vec<String> = blamed(e).iter().map(usize::to_string).collect();
        format!(
            "ERR {call} {} {} {}",
            if b.is_empty() {
                "-".into()
            } else {
                b.join(",")
            },
            started.elapsed().as_micros(),
            one_line(&e.to_string())
        )
    };
    let now = Instant::now();
    let buf = comm.buffer::<f32>(len).map_err(|e| err(0, &e, now))?;
    // The ranks of the current communicator, by their numbers at the start.
    let mut members: Vec<usize> = (0..n).collect();
    for call in 0..calls {
        let data: Vec<f32> = (0..len).map(|i| input(me, call, i)).collect();
        let size = comm.size();
        let now = Instant::now();
        comm.write(&buf, &data).map_err(|e| err(call, &e, now))?;
        let started = Instant::now();
        let ran = comm.run(
            Collective::AllReduce {
                input: buf.view(),
                output: buf.view(),
                op: ReduceOp::Sum,
            },
            CallOptions::default(),
        );
        let o = match ran {
            Ok(o) => o,
            // The planted bug (`--plant unreported`): an error swallowed, every rank claimed.
            Err(_) if plant == 2 => Outcome {
                contributors: (0..members.len()).collect(),
                excluded: Vec::new(),
                skipped: Vec::new(),
                recovered_in: None,
            },
            Err(e) => return Err(err(call, &e, started)),
        };
        let ids: Vec<usize> = o
            .contributors
            .iter()
            .map(|&c| members.get(c).copied().unwrap_or(usize::MAX))
            .collect();
        if ids.contains(&usize::MAX) {
            return Err(format!(
                "WRONG {call} 0 NaN NaN (contributors {:?} are not all members {members:?})",
                o.contributors
            ));
        }
        let mut got = comm.download(&buf).map_err(|e| err(call, &e, now))?;
        if plant == 1
            && let Some(x) = got.first_mut()
        {
            *x += 1.0;
        }
        for (i, g) in got.iter().enumerate() {
            let want: f64 = ids.iter().map(|&m| f64::from(input(m, call, i))).sum();
            if f64::from(*g) != want {
                return Err(format!("WRONG {call} {i} {g} {want}"));
            }
        }
        if !o.excluded.is_empty() {
            members = (0..members.len())
                .filter(|r| !o.excluded.contains(r))
                .filter_map(|r| members.get(r).copied())
                .collect();
        }
        let c: Vec<String> = ids.iter().map(usize::to_string).collect();
        say(&format!(
            "OK {call} {} {} {size}",
            c.join(","),
            o.recovered_in
                .map_or("-".into(), |d| d.as_micros().to_string())
        ));
    }
    let started = Instant::now();
    comm.barrier().map_err(|e| err(calls, &e, started))
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

/// Prints a line and flushes it (the parent reads lines as they come).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A trial's children and its rendezvous file; dropping it kills and reaps every child still
/// running (a stopped one too: SIGKILL ends a stopped process) and removes the file.
struct Children {
    procs: Vec<Child>,
    file: PathBuf,
}

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

/// A line a child printed (`None`: its output ended), and when the parent read it.
#[derive(Debug, Clone)]
pub(super) struct Said {
    pub rank: usize,
    pub line: Option<String>,
    pub at: Instant,
}

/// Whether `line` is a child's last.
fn is_last(line: &str) -> bool {
    line == "DONE" || line.starts_with("ERR ") || line.starts_with("WRONG ")
}

/// A started trial: the children, the lines they printed so far, the channel of the rest.
struct Started {
    children: Children,
    rx: mpsc::Receiver<Said>,
    early: Vec<Said>,
}

/// Starts `n` children and waits until every one has joined; `Err` says why one did not.
fn start(
    program: &Path,
    n: usize,
    spec: &str,
    index: usize,
    attempt: usize,
) -> Result<Started, String> {
    let file = std::env::temp_dir().join(format!(
        "wccl-chaos-{}-{index}-{attempt}.addr",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&file);
    let job = format!("chaos-{}-{index}-{attempt}", std::process::id());
    let (tx, rx) = mpsc::channel::<Said>();
    let mut children = Children {
        procs: Vec::new(),
        file: file.clone(),
    };
    for rank in 0..n {
        let mut c = Command::new(program)
            .env(CHILD_VAR, spec)
            // This job's own variables, whatever launched the parent.
            .env("WCCL_LAUNCHER", "wccl")
            .env("WCCL_RANK", rank.to_string())
            .env("WCCL_WORLD_SIZE", n.to_string())
            .env("WCCL_LOCAL_RANK", rank.to_string())
            .env("WCCL_LOCAL_WORLD_SIZE", n.to_string())
            .env("WCCL_RENDEZVOUS_FILE", &file)
            .env("WCCL_JOB_ID", &job)
            .env_remove("WCCL_MASTER_ADDR")
            .env_remove("WCCL_MASTER_PORT")
            // torchrun's master wins over a rendezvous file (`rendezvous::env`).
            .env_remove("MASTER_ADDR")
            .env_remove("MASTER_PORT")
            .env_remove("WCCL_JOB_TOKEN")
            .env_remove("WCCL_JOB_TOKEN_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let out = c.stdout.take();
        children.procs.push(c);
        let tx = tx.clone();
        std::thread::Builder::new()
            .name(format!("chaos child {rank}"))
            .spawn(move || {
                if let Some(out) = out {
                    let mut out = BufReader::new(out);
                    let mut bytes = Vec::new();
                    // Until the output ends (a read error ends it too); a line that is not
                    // UTF-8 is read as well as it can be, not taken for the end.
                    while matches!(out.read_until(b'\n', &mut bytes), Ok(k) if k > 0) {
                        let line = String::from_utf8_lossy(&bytes)
                            .trim_end_matches(['\n', '\r'])
                            .to_string();
                        bytes.clear();
                        let said = Said {
                            rank,
                            line: Some(line),
                            at: Instant::now(),
                        };
                        if tx.send(said).is_err() {
                            return;
                        }
                    }
                }
                // The output ended: the child exited (or was killed).
                let _ = tx.send(Said {
                    rank,
                    line: None,
                    at: Instant::now(),
                });
            })
            .map_err(|e| format!("cannot start a reader thread: {e}"))?;
    }
    drop(tx);
    let mut ready = vec![false; n];
    let joined_by = crate::deadline::deadline_after(JOIN_WITHIN);
    let mut early = Vec::new();
    while ready.iter().any(|r| !r) {
        let left = joined_by.saturating_duration_since(Instant::now());
        let said = rx
            .recv_timeout(left)
            .map_err(|_| format!("not every child joined within {JOIN_WITHIN:?}"))?;
        match said.line.as_deref() {
            Some("READY") => {
                if let Some(r) = ready.get_mut(said.rank) {
                    *r = true;
                }
            }
            Some(l) if l.starts_with("ERR ") && !ready.get(said.rank).copied().unwrap_or(true) => {
                return Err(format!("rank {} could not join: {l}", said.rank));
            }
            Some(_) => early.push(said),
            None if !ready.get(said.rank).copied().unwrap_or(true) => {
                return Err(format!("rank {} exited before it joined", said.rank));
            }
            None => early.push(said),
        }
    }
    Ok(Started {
        children,
        rx,
        early,
    })
}

/// Runs one trial on real processes of `program`; `Err` when its processes could not be
/// started or could not join, [`LAUNCH_TRIES`] times.
pub(super) fn run(
    setup: &Setup,
    rng: &mut impl Rng,
    program: &Path,
) -> Result<TrialResult, crate::Error> {
    let n = rng.random_range(3..=4usize);
    let len = rng.random_range(1..=120_000usize);
    let survive = rng.random_bool(0.5);
    let victim = rng.random_range(0..n);
    // The fault comes once the victim reported call `at - 1` (at once for 0), and up to 5 ms
    // later: before, inside or between the calls.
    let at = rng.random_range(0..CALLS);
    let after = Duration::from_micros(rng.random_range(0..=5_000));
    let plant = match setup.plant {
        None => 0,
        Some(Plant::WrongElement) => 1,
        Some(Plant::Unreported) => 2,
    };
    let spec = format!(
        "{len};{CALLS};{};{};{plant}",
        setup.deadline.as_millis(),
        u8::from(survive)
    );
    let mut why = Vec::new();
    let mut started = None;
    for attempt in 0..LAUNCH_TRIES {
        match start(program, n, &spec, setup.index, attempt) {
            Ok(s) => {
                started = Some(s);
                break;
            }
            Err(e) => why.push(e),
        }
    }
    let Some(Started {
        mut children,
        rx,
        mut early,
    }) = started
    else {
        return Err(crate::Error::Launch {
            message: format!(
                "chaos over processes: {LAUNCH_TRIES} tries failed: {}",
                why.join("; ")
            ),
        });
    };

    let mut trial = TrialResult::new(setup, n, victim);
    // The fault: after the victim's report of call `at - 1` (perhaps read already).
    let victim_said = |s: &Said, want: &str| {
        s.rank == victim
            && s.line
                .as_deref()
                .is_none_or(|l| l.starts_with(want) || is_last(l))
    };
    if let Some(before) = at.checked_sub(1) {
        let want = format!("OK {before} ");
        if !early.iter().any(|s| victim_said(s, &want)) {
            let until = crate::deadline::deadline_after(JOIN_WITHIN);
            while let Ok(said) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                let seen = victim_said(&said, &want);
                early.push(said);
                if seen {
                    break;
                }
            }
        }
    }
    // The injected fault's timing itself, not a wait for anything.
    std::thread::sleep(after);
    if let Some(c) = children.procs.get_mut(victim) {
        let pid = c.id();
        let signalled = if setup.fault == Fault::Stall {
            // The shell's own `kill`: no procps needed.
            Command::new("sh")
                .args(["-c", &format!("kill -STOP {pid}")])
                .status()
                .map(|s| s.success())
        } else {
            c.kill().map(|()| true)
        };
        if !matches!(signalled, Ok(true)) {
            return Err(crate::Error::Launch {
                message: format!(
                    "chaos over processes: cannot signal rank {victim}: {signalled:?}"
                ),
            });
        }
    }
    let fault_at = Instant::now();
    // A victim that had already ended (its last line, or its output closed) was not hit.
    while let Ok(said) = rx.try_recv() {
        early.push(said);
    }
    trial.fired = !early
        .iter()
        .any(|s| s.rank == victim && s.line.as_deref().is_none_or(is_last) && s.at <= fault_at);

    // Every survivor prints its last line and its output closes (it exited), within the
    // watchdog: every call and the barrier end within a few deadlines each, then the teardown.
    let watchdog = setup
        .deadline
        .saturating_mul(
            u32::try_from(CALLS)
                .unwrap_or(u32::MAX)
                .saturating_add(1)
                .saturating_mul(4),
        )
        .saturating_add(TEARDOWN);
    let give_up = crate::deadline::deadline_after(watchdog);
    let closed = |lines: &[Said], r: usize| lines.iter().any(|s| s.rank == r && s.line.is_none());
    let mut lines = early;
    loop {
        let open: Vec<usize> = (0..n)
            .filter(|&r| r != victim && !closed(&lines, r))
            .collect();
        if open.is_empty() {
            break;
        }
        let left = give_up.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(said) => lines.push(said),
            Err(_) => {
                trial.verdict = Verdict::Hang {
                    call: 1,
                    ranks: open,
                };
                return Ok(trial);
            }
        }
    }
    // How each survivor exited (its output closed: it has, or is about to).
    let mut exits = Vec::new();
    for (r, c) in children.procs.iter_mut().enumerate() {
        if r != victim {
            exits.push((r, c.wait().ok().and_then(|s| s.code())));
        }
    }
    drop(children);
    judge(&mut trial, &lines, &exits, victim, n, survive, fault_at);
    Ok(trial)
}

/// The ranks a contributors field names, if it is a well-formed set of ranks of `n`: sorted,
/// unique, each below `n`.
fn ranks_of(field: &str, n: usize) -> Option<Vec<usize>> {
    let c: Vec<usize> = field
        .split(',')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let ok = c.windows(2).all(|w| w[0] < w[1]) && c.iter().all(|&r| r < n);
    ok.then_some(c)
}

/// The verdict from what the children printed (`exits`: each survivor's exit code).
pub(super) fn judge(
    trial: &mut TrialResult,
    lines: &[Said],
    exits: &[(usize, Option<i32>)],
    victim: usize,
    n: usize,
    survive: bool,
    fault_at: Instant,
) {
    let inconsistent = |why: String| Verdict::Inconsistent { call: 1, why };
    let mut errors = false;
    // Per call, the contributors the first rank that succeeded named.
    let mut sets: std::collections::HashMap<&str, (usize, Vec<usize>)> = Default::default();
    for s in lines {
        let Some(line) = s.line.as_deref() else {
            continue;
        };
        let words: Vec<&str> = line.splitn(5, ' ').collect();
        match words.as_slice() {
            // Wrong is wrong, the victim's too (printed before it was hit).
            ["WRONG", call, index, rest @ ..] => {
                let mut nums = rest.iter().flat_map(|x| x.split(' '));
                let got = nums.next().and_then(|x| x.parse().ok()).unwrap_or(f64::NAN);
                let want = nums.next().and_then(|x| x.parse().ok()).unwrap_or(f64::NAN);
                trial.verdict = Verdict::SilentlyWrong {
                    rank: s.rank,
                    call: call.parse::<u8>().map_or(1, |c| c.saturating_add(1)),
                    index: index.parse().unwrap_or(0),
                    got,
                    want,
                };
                return;
            }
            ["OK", call, contributors, recovered, size] => {
                let (Some(c), Ok(size)) = (ranks_of(contributors, n), size.parse::<usize>()) else {
                    trial.verdict = inconsistent(format!(
                        "rank {}: '{line}' is not a call's contributors and size",
                        s.rank
                    ));
                    return;
                };
                // Every rank that returned a call names one set, the victim before it was hit
                // too: the whole result or the same survivors', never a mix.
                let first = sets.entry(call).or_insert_with(|| (s.rank, c.clone()));
                if first.1 != c {
                    trial.verdict = inconsistent(format!(
                        "call {call}: rank {} holds {:?}, rank {} holds {c:?}",
                        first.0, first.1, s.rank
                    ));
                    return;
                }
                if s.rank == victim {
                    continue;
                }
                if !c.contains(&s.rank) {
                    trial.verdict = inconsistent(format!(
                        "rank {}, call {call}: succeeded without being a contributor ({c:?})",
                        s.rank
                    ));
                    return;
                }
                if !survive && c.len() != n {
                    trial.verdict = inconsistent(format!(
                        "rank {}, call {call}: a fail-stop call left ranks out: {c:?}",
                        s.rank
                    ));
                    return;
                }
                // The whole communicator the call ran on, or a strict majority of it.
                if c.len() != size && c.len().saturating_mul(2) <= size {
                    trial.verdict = inconsistent(format!(
                        "rank {}, call {call}: a minority went on: {c:?} of {size}",
                        s.rank
                    ));
                    return;
                }
                if let Ok(us) = recovered.parse::<u64>() {
                    trial.recoveries.push(Duration::from_micros(us));
                }
            }
            ["OK", ..] => {
                trial.verdict = inconsistent(format!("rank {}: a malformed '{line}'", s.rank));
                return;
            }
            _ if s.rank == victim => {}
            ["ERR", _call, named, in_call, ..] => {
                errors = true;
                let named: Vec<usize> = named.split(',').filter_map(|x| x.parse().ok()).collect();
                trial.named.push(named.contains(&victim));
                // From the fault, or from the start of the call if it began later.
                let since_fault = s.at.saturating_duration_since(fault_at);
                let in_call = in_call
                    .parse::<u64>()
                    .map_or(since_fault, Duration::from_micros);
                trial.detection.push(since_fault.min(in_call));
            }
            _ => {}
        }
    }
    // Every survivor ended with a last line, and exited with the status it implies.
    for r in (0..n).filter(|&r| r != victim) {
        let last = lines
            .iter()
            .filter(|s| s.rank == r)
            .filter_map(|s| s.line.as_deref())
            .find(|l| is_last(l));
        let code = exits.iter().find(|e| e.0 == r).and_then(|e| e.1);
        if code == Some(101) {
            // Rust's exit status for a panic.
            trial.verdict = Verdict::Panicked { rank: r };
            return;
        }
        let expected = match last {
            Some("DONE") => Some(0),
            Some(_) => Some(1),
            None => None,
        };
        if expected.is_none() || code != expected {
            trial.verdict = inconsistent(format!(
                "rank {r} ended with {last:?} and exit status {code:?}"
            ));
            return;
        }
    }
    if errors {
        trial.verdict = Verdict::Detected;
    }
}

#[cfg(test)]
mod tests {
    use super::super::trial::Setup;
    use super::super::{Fault, Target};
    use super::*;

    fn trial() -> TrialResult {
        let setup = Setup {
            index: 0,
            target: Target::Processes,
            fault: Fault::Kill,
            deadline: Duration::from_millis(200),
            plant: None,
        };
        TrialResult::new(&setup, 4, 3)
    }

    fn said(rank: usize, line: &str, at: Instant) -> Said {
        Said {
            rank,
            line: Some(line.to_string()),
            at,
        }
    }

    fn ended(rank: usize, at: Instant) -> Said {
        Said {
            rank,
            line: None,
            at,
        }
    }

    /// Judges the survivors 0..3 of 4 (victim 3) printing `lines` then exiting as they say.
    fn verdict(lines: &[(usize, &str)], survive: bool) -> Verdict {
        let t0 = Instant::now();
        let mut all: Vec<Said> = lines.iter().map(|&(r, l)| said(r, l, t0)).collect();
        let mut exits = Vec::new();
        for r in 0..3 {
            let code = all
                .iter()
                .filter(|s| s.rank == r)
                .filter_map(|s| s.line.as_deref())
                .find(|l| is_last(l))
                .map(|l| if l == "DONE" { 0 } else { 1 });
            all.push(ended(r, t0));
            exits.push((r, code));
        }
        let mut t = trial();
        judge(&mut t, &all, &exits, 3, 4, survive, t0);
        t.verdict
    }

    fn is_inconsistent(v: &Verdict) -> bool {
        matches!(v, Verdict::Inconsistent { .. })
    }

    #[test]
    fn a_recovery_that_all_survivors_agree_on_is_correct() {
        let mut lines = vec![(3, "OK 0 0,1,2,3 - 4")];
        for r in 0..3 {
            lines.push((r, "OK 0 0,1,2,3 - 4"));
            lines.push((r, "OK 1 0,1,2 1500 4"));
            lines.push((r, "DONE"));
        }
        assert_eq!(verdict(&lines, true), Verdict::Correct);
        // Two of three after a whole result kept: a majority of the communicator it ran on.
        let mut lines = Vec::new();
        for r in 0..2 {
            lines.push((r, "OK 0 0,1,2,3 - 4"));
            lines.push((r, "OK 1 0,1 900 3"));
            lines.push((r, "DONE"));
        }
        lines.push((2, "ERR 1 - 5 excluded"));
        assert_eq!(verdict(&lines, true), Verdict::Detected);
    }

    #[test]
    fn errors_naming_the_victim_are_detected() {
        let mut t = trial();
        let t0 = Instant::now();
        let later = crate::deadline::deadline_from(t0, Duration::from_millis(300));
        let lines = vec![
            said(
                0,
                "ERR 2 3 400000 rank 0: the link to rank 3 is closed",
                later,
            ),
            said(1, "ERR 2 0 190000 rank 1: rank 0 aborted", later),
            said(2, "ERR 2 3 10 timed out", later),
            ended(0, t0),
            ended(1, t0),
            ended(2, t0),
        ];
        judge(
            &mut t,
            &lines,
            &[(0, Some(1)), (1, Some(1)), (2, Some(1))],
            3,
            4,
            false,
            t0,
        );
        assert_eq!(t.verdict, Verdict::Detected);
        assert_eq!(t.named, vec![true, false, true]);
        // Detection from the fault, or from the start of a call that began later.
        assert_eq!(t.detection[0], Duration::from_millis(300));
        assert_eq!(t.detection[1], Duration::from_millis(190));
        assert_eq!(t.detection[2], Duration::from_micros(10));
    }

    #[test]
    fn outcomes_that_cannot_all_be_true_are_caught() {
        // Survivors disagreeing on one call's contributors.
        let v = verdict(
            &[
                (0, "OK 1 0,1,2 - 4"),
                (1, "OK 1 0,1,2,3 - 4"),
                (0, "DONE"),
                (1, "DONE"),
                (2, "DONE"),
            ],
            true,
        );
        assert!(is_inconsistent(&v), "{v:?}");
        // The victim, before it was hit, holding a result the survivors did not.
        let v = verdict(
            &[
                (3, "OK 1 0,1,2,3 - 4"),
                (0, "OK 1 0,1,2 - 4"),
                (0, "DONE"),
                (1, "DONE"),
                (2, "DONE"),
            ],
            true,
        );
        assert!(is_inconsistent(&v), "{v:?}");
        // A fail-stop call leaving a rank out.
        let v = verdict(
            &[(0, "OK 0 0,1,2 - 4"), (0, "DONE"), (1, "DONE"), (2, "DONE")],
            false,
        );
        assert!(is_inconsistent(&v), "{v:?}");
        // A minority going on.
        let v = verdict(
            &[(0, "OK 0 0,1 - 4"), (0, "DONE"), (1, "DONE"), (2, "DONE")],
            true,
        );
        assert!(is_inconsistent(&v), "{v:?}");
        // A contributor named twice, a rank out of range, a reporter not among them.
        for c in [
            "OK 0 0,0,1,2 - 4",
            "OK 0 0,1,2,9 - 4",
            "OK 0 1,2,3 - 4",
            // No size.
            "OK 0 0,1,2 -",
        ] {
            let v = verdict(&[(0, c), (0, "DONE"), (1, "DONE"), (2, "DONE")], true);
            assert!(is_inconsistent(&v), "{c}: {v:?}");
        }
        // A survivor that exits without a last line, or with the wrong status.
        let v = verdict(&[(0, "DONE"), (1, "DONE")], true);
        assert!(is_inconsistent(&v), "{v:?}");
        let t0 = Instant::now();
        let mut t = trial();
        let lines: Vec<Said> = (0..3)
            .flat_map(|r| [said(r, "DONE", t0), ended(r, t0)])
            .collect();
        judge(
            &mut t,
            &lines,
            &[(0, Some(0)), (1, Some(0)), (2, None)],
            3,
            4,
            true,
            t0,
        );
        assert!(is_inconsistent(&t.verdict), "{:?}", t.verdict);
        // A panic (Rust's exit status 101) is a verdict of its own.
        let mut t = trial();
        let exits = [(0, Some(0)), (1, Some(101)), (2, Some(0))];
        judge(&mut t, &lines, &exits, 3, 4, true, t0);
        assert_eq!(t.verdict, Verdict::Panicked { rank: 1 });
    }

    #[test]
    fn a_wrong_element_is_caught_even_from_the_victim() {
        let v = verdict(
            &[(3, "WRONG 0 7 5 4"), (0, "DONE"), (1, "DONE"), (2, "DONE")],
            true,
        );
        assert!(
            matches!(
                v,
                Verdict::SilentlyWrong {
                    rank: 3,
                    call: 1,
                    index: 7,
                    ..
                }
            ),
            "{v:?}"
        );
    }

    #[test]
    fn inputs_are_distinct_and_their_sums_exact() {
        let mut seen = std::collections::HashSet::new();
        for r in 0..4 {
            for i in (0..120_000).step_by(997) {
                assert!(
                    seen.insert(input(r, 0, i).to_bits()),
                    "rank {r}, element {i}"
                );
            }
        }
        let big: f64 = (0..4).map(|r| f64::from(input(r, 7, 119_999))).sum();
        assert!(big < f64::from(1u32 << 24));
    }
}
