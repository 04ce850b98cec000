//! Trials on real processes: 3 or 4 copies of a program (`wccl-bench` itself), one rank each,
//! joined over loopback TCP by wccl's rendezvous, make a few all-reduces; the campaign kills
//! one with SIGKILL, or stops it with SIGSTOP (a process that hangs without closing its
//! sockets), at a random moment. Every result a child reports is checked by the child against
//! an f64 reference of exactly the ranks its outcome names; the parent judges the rest: every
//! survivor must end (no hang), and the errors must name the process it hit.
//!
//! The child side is [`child`], which a program runs when [`CHILD_VAR`] is set (`wccl-bench`
//! does). It prints one line per event:
//!
//! - `READY` once joined;
//! - `OK <call> <contributors> <recovered_us>` per call that succeeded and checked right
//!   (contributors in the numbering of the start, comma-separated; recovered_us `-` when it did
//!   not recover);
//! - `WRONG <call> <index> <got> <want>`, `ERR <call> <blamed> <error>` or `DONE`, its last.

use std::io::{BufRead, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::Rng;

use super::blame::blamed;
use super::trial::{Setup, TrialResult, Verdict};
use super::{Fault, Plant};
use crate::link::TcpOptions;
use crate::{
    CallOptions, Collective, CommConfig, Communicator, ConnectOptions, OnFailure, ReduceOp,
};

/// Set in a child's environment: `LEN;CALLS;DEADLINE_MS;SURVIVE;PLANT` (SURVIVE and PLANT 0 or
/// 1).
pub const CHILD_VAR: &str = "WCCL_CHAOS_CHILD";

/// All-reduces per trial.
const CALLS: usize = 8;
/// The longest a child may take to join (start, open a device, rendezvous).
const JOIN_WITHIN: Duration = Duration::from_secs(60);

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
pub fn child(spec: &str) -> i32 {
    let f: Vec<&str> = spec.split(';').collect();
    let parsed = match f.as_slice() {
        [len, calls, ms, survive, plant] => (|| {
            Some((
                len.parse::<usize>().ok()?,
                calls.parse::<usize>().ok()?,
                ms.parse::<u64>().ok()?,
                *survive == "1",
                *plant == "1",
            ))
        })(),
        _ => None,
    };
    let Some((len, calls, ms, survive, plant)) = parsed else {
        say(&format!(
            "ERR 0 - {CHILD_VAR}={spec:?} is not LEN;CALLS;DEADLINE_MS;SURVIVE;PLANT"
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
                "ERR 0 - could not join: {}",
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

/// The calls; `Err` holds the last line (`WRONG` or `ERR`).
fn calls_of(comm: &mut Communicator, len: usize, calls: usize, plant: bool) -> Result<(), String> {
    let me = comm.rank();
    let err = |call: usize, e: &crate::Error| {
        let b: Vec<String> = blamed(e).iter().map(usize::to_string).collect();
        format!(
            "ERR {call} {} {}",
            if b.is_empty() {
                "-".into()
            } else {
                b.join(",")
            },
            one_line(&e.to_string())
        )
    };
    let buf = comm.buffer::<f32>(len).map_err(|e| err(0, &e))?;
    // The ranks of the current communicator, by their numbers at the start.
    let mut members: Vec<usize> = (0..comm.size()).collect();
    for call in 0..calls {
        let data: Vec<f32> = (0..len).map(|i| input(me, call, i)).collect();
        comm.write(&buf, &data).map_err(|e| err(call, &e))?;
        let o = comm
            .run(
                Collective::AllReduce {
                    input: buf.view(),
                    output: buf.view(),
                    op: ReduceOp::Sum,
                },
                CallOptions::default(),
            )
            .map_err(|e| err(call, &e))?;
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
        let mut got = comm.download(&buf).map_err(|e| err(call, &e))?;
        if plant && let Some(x) = got.first_mut() {
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
            "OK {call} {} {}",
            c.join(","),
            o.recovered_in
                .map_or("-".into(), |d| d.as_micros().to_string())
        ));
    }
    Ok(())
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

/// A trial's children; dropping it kills and reaps every one still running.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // A stopped process dies of SIGKILL too.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A line a child printed, and when the parent read it.
struct Said {
    rank: usize,
    line: Option<String>,
    at: Instant,
}

/// A free loopback port (bound and released: rank 0 binds it again at once).
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs one trial on real processes of `program`.
pub(super) fn run(
    setup: &Setup,
    rng: &mut impl Rng,
    program: &Path,
) -> Result<TrialResult, crate::Error> {
    let io = |what: &str, e: std::io::Error| crate::Error::Launch {
        message: format!("chaos over processes: {what}: {e}"),
    };
    let n = rng.random_range(3..=4usize);
    let len = rng.random_range(1..=120_000usize);
    let survive = rng.random_bool(0.5);
    let victim = rng.random_range(0..n);
    // The fault comes once the victim reported call `at - 1` (at once for 0), and up to 5 ms
    // later: before, inside or between the calls.
    let at = rng.random_range(0..CALLS);
    let after = Duration::from_micros(rng.random_range(0..=5_000));
    let port = free_port().map_err(|e| io("no free port", e))?;
    let job = format!("chaos-{}-{}-{}", std::process::id(), setup.index, port);
    let plant = setup.plant == Some(Plant::WrongElement);
    let spec = format!(
        "{len};{CALLS};{};{};{}",
        setup.deadline.as_millis(),
        u8::from(survive),
        u8::from(plant)
    );
    let (tx, rx) = mpsc::channel::<Said>();
    let mut children = Children(Vec::new());
    for rank in 0..n {
        let mut c = Command::new(program)
            .env(CHILD_VAR, &spec)
            .env("WCCL_LAUNCHER", "wccl")
            .env("WCCL_RANK", rank.to_string())
            .env("WCCL_WORLD_SIZE", n.to_string())
            .env("WCCL_LOCAL_RANK", rank.to_string())
            .env("WCCL_LOCAL_WORLD_SIZE", n.to_string())
            .env("WCCL_MASTER_ADDR", "127.0.0.1")
            .env("WCCL_MASTER_PORT", port.to_string())
            .env("WCCL_JOB_ID", &job)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| io("cannot start a child", e))?;
        let out = c.stdout.take();
        children.0.push(c);
        let tx = tx.clone();
        std::thread::Builder::new()
            .name(format!("chaos child {rank}"))
            .spawn(move || {
                if let Some(out) = out {
                    for line in BufReader::new(out).lines() {
                        let Ok(line) = line else { break };
                        let at = Instant::now();
                        if tx
                            .send(Said {
                                rank,
                                line: Some(line),
                                at,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                }
                // The stream ended: the child exited (or was killed).
                let _ = tx.send(Said {
                    rank,
                    line: None,
                    at: Instant::now(),
                });
            })
            .map_err(|e| io("cannot start a reader thread", e))?;
    }
    drop(tx);

    let mut trial = TrialResult::new(setup, n, victim);
    // Every child joins, or the trial cannot run: an error of the machine, not a verdict.
    let mut ready = vec![false; n];
    let joined_by = crate::deadline::deadline_after(JOIN_WITHIN);
    let mut early: Vec<Said> = Vec::new();
    while ready.iter().any(|r| !r) {
        let left = joined_by.saturating_duration_since(Instant::now());
        let said = rx.recv_timeout(left).map_err(|_| crate::Error::Launch {
            message: format!("chaos over processes: not every child joined within {JOIN_WITHIN:?}"),
        })?;
        match said.line.as_deref() {
            Some("READY") => {
                if let Some(r) = ready.get_mut(said.rank) {
                    *r = true;
                }
            }
            Some(_) => early.push(said),
            None => {
                return Err(crate::Error::Launch {
                    message: format!(
                        "chaos over processes: rank {} exited before it joined ({:?})",
                        said.rank,
                        early.iter().map(|s| s.line.clone()).collect::<Vec<_>>()
                    ),
                });
            }
        }
    }

    // The fault: after the victim's report of call `at - 1`.
    if let Some(before) = at.checked_sub(1) {
        let want = format!("OK {before} ");
        loop {
            let left = joined_by.saturating_duration_since(Instant::now());
            let Ok(said) = rx.recv_timeout(left) else {
                break;
            };
            let seen = said.rank == victim
                && said
                    .line
                    .as_deref()
                    .is_none_or(|l| l.starts_with(&want) || !l.starts_with("OK "));
            early.push(said);
            if seen {
                break;
            }
        }
    }
    // The injected fault's timing itself, not a wait for anything.
    std::thread::sleep(after);
    let fault_at = Instant::now();
    let pid = children.0.get(victim).map(Child::id);
    match (setup.fault, pid) {
        (Fault::Stall, Some(pid)) => {
            let stopped = Command::new("kill")
                .args(["-STOP", &pid.to_string()])
                .status()
                .map_err(|e| io("cannot run kill -STOP", e))?;
            if !stopped.success() {
                return Err(io(
                    "kill -STOP failed",
                    std::io::Error::other(stopped.to_string()),
                ));
            }
        }
        (_, Some(_)) => {
            if let Some(c) = children.0.get_mut(victim) {
                c.kill().map_err(|e| io("cannot kill a child", e))?;
            }
        }
        (_, None) => {}
    }
    trial.fired = true;

    // Every survivor ends: a last line (DONE, ERR, WRONG) or its stream closing.
    let watchdog = setup
        .deadline
        .saturating_mul(u32::try_from(CALLS).unwrap_or(u32::MAX).saturating_mul(4))
        .saturating_add(Duration::from_secs(10));
    let give_up = crate::deadline::deadline_after(watchdog);
    let mut ended = vec![false; n];
    if let Some(e) = ended.get_mut(victim) {
        *e = true;
    }
    let mut lines: Vec<Said> = early;
    while ended.iter().any(|e| !e) {
        let left = give_up.saturating_duration_since(Instant::now());
        let Ok(said) = rx.recv_timeout(left) else {
            trial.verdict = Verdict::Hang {
                call: 1,
                ranks: (0..n).filter(|&r| !ended[r]).collect(),
            };
            return Ok(trial);
        };
        if said.rank == victim {
            continue;
        }
        let last = match said.line.as_deref() {
            None => true,
            Some(l) => l == "DONE" || l.starts_with("ERR ") || l.starts_with("WRONG "),
        };
        if last && let Some(e) = ended.get_mut(said.rank) {
            *e = true;
        }
        lines.push(said);
    }
    drop(children);

    judge(&mut trial, &lines, victim, n, survive, fault_at);
    Ok(trial)
}

/// The verdict from the survivors' lines.
fn judge(
    trial: &mut TrialResult,
    lines: &[Said],
    victim: usize,
    n: usize,
    survive: bool,
    fault_at: Instant,
) {
    let mut errors = false;
    // Per call, the contributors the first survivor that succeeded named.
    let mut sets: std::collections::HashMap<String, (usize, String)> = Default::default();
    for s in lines {
        let Some(line) = s.line.as_deref() else {
            continue;
        };
        let words: Vec<&str> = line.splitn(4, ' ').collect();
        match words.as_slice() {
            ["WRONG", call, index, rest] => {
                let mut nums = rest.split(' ');
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
            ["ERR", _call, named, _msg] => {
                errors = true;
                let named: Vec<usize> = named.split(',').filter_map(|x| x.parse().ok()).collect();
                trial.named.push(named.contains(&victim));
                trial
                    .detection
                    .push(s.at.saturating_duration_since(fault_at));
            }
            ["OK", call, contributors, recovered] => {
                // Survivors of one call name one set: the whole result or the same survivors'.
                let first = sets
                    .entry((*call).to_string())
                    .or_insert_with(|| (s.rank, (*contributors).to_string()));
                if first.1 != *contributors {
                    trial.verdict = Verdict::Inconsistent {
                        call: 1,
                        why: format!(
                            "call {call}: rank {} holds {}, rank {} holds {contributors}",
                            first.0, first.1, s.rank
                        ),
                    };
                    return;
                }
                let c: Vec<usize> = contributors
                    .split(',')
                    .filter_map(|x| x.parse().ok())
                    .collect();
                let everyone = c.len() == n;
                if !survive && !everyone {
                    trial.verdict = Verdict::Inconsistent {
                        call: 1,
                        why: format!("rank {}: a fail-stop call left ranks out: {c:?}", s.rank),
                    };
                    return;
                }
                if survive && !everyone && c.len().saturating_mul(2) <= n {
                    trial.verdict = Verdict::Inconsistent {
                        call: 1,
                        why: format!("rank {}: a minority went on: {c:?} of {n}", s.rank),
                    };
                    return;
                }
                if let Ok(us) = recovered.parse::<u64>() {
                    trial.recoveries.push(Duration::from_micros(us));
                }
            }
            _ => {}
        }
    }
    // A survivor whose stream closed without a last line (it died of something else) is an
    // error the parent cannot name.
    for r in (0..n).filter(|&r| r != victim) {
        let ended_well = lines.iter().any(|s| {
            s.rank == r
                && s.line
                    .as_deref()
                    .is_some_and(|l| l == "DONE" || l.starts_with("ERR "))
        });
        if !ended_well {
            trial.verdict = Verdict::Inconsistent {
                call: 1,
                why: format!("rank {r} exited without a result"),
            };
            return;
        }
    }
    if errors {
        trial.verdict = Verdict::Detected;
    }
}
