//! Real processes on localhost: each test re-executes this test binary as N children (the
//! `child` test, told its scenario by `WCCL_TEST_CHILD`), one rank per process over TCP, and
//! checks what every rank printed: correct collectives under wccl's, torchrun's, Slurm's and
//! Open MPI's variables, and a clear error on every survivor when a process is killed, stopped,
//! refused or leaves early. Nothing hangs: every wait of the parent has a deadline, and every
//! child is killed on every exit path.
//!
//! A child prints one line, `RESULT rank=R ok ...` or `RESULT rank=R err=Kind: <error>`, where
//! `Kind` is the `wccl::Error` variant, so that the parent asserts on the kind of error and not
//! on how long it took.
//!
//! Unix only: the tests signal processes (`kill -STOP`) and read how they died.
#![cfg(unix)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{make_buffer, poison, random_values, reference, tolerance};
use rand::SeedableRng;
use rand::rngs::StdRng;
use wccl::link::TcpOptions;
use wccl::rendezvous::Launch;
use wccl::{
    CallOptions, CollectiveKind, CommConfig, Communicator, ConnectOptions, DType, Error, ReduceOp,
    TensorRef, bf16, f16,
};

/// Names the scenario a child runs; unset, `child` is an empty test.
const CHILD_VAR: &str = "WCCL_TEST_CHILD";
/// The seed every child builds every rank's inputs from.
const SEED: u64 = 0x5eed_0011;
/// Inputs repeat with this period (a prime: no chunk or slice boundary lines up with it).
const PERIOD: usize = 1031;
/// A size that is not a multiple of anything the ring cuts at.
const BIG: usize = (1 << 20) + 7;
/// How long the parent waits for a job before it kills every child and names the ones that
/// were still running: far beyond any healthy run, so only a hang reaches it.
const JOB_DEADLINE: Duration = Duration::from_secs(240);

// ---------------------------------------------------------------------------------------------
// The child side.

/// What a scenario ended with.
enum Fail {
    /// wccl returned an error.
    Wccl(Error),
    /// A result was wrong, or the scenario's own setup failed.
    Check(String),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Wccl(e)
    }
}

/// The child: runs the scenario `WCCL_TEST_CHILD` names as one rank, prints its `RESULT` line
/// and exits (0 when the scenario succeeded). Without the variable (a normal test run) it
/// returns at once.
#[test]
fn child() {
    let Ok(scenario) = std::env::var(CHILD_VAR) else {
        return;
    };
    let mut rank = Launch::from_env()
        .map(|l| l.rank.to_string())
        .unwrap_or_else(|_| "?".into());
    // A panic is reported as a result line too: the parent must never wait on a silent child.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_scenario(&scenario, &mut rank)
    }))
    .unwrap_or_else(|p| {
        let m = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(Fail::Check(format!("panicked: {m}")))
    });
    let (line, code) = match outcome {
        Ok(detail) => (format!("RESULT rank={rank} ok {detail}"), 0),
        Err(Fail::Wccl(e)) => {
            let debug = format!("{e:?}");
            let kind: String = debug.chars().take_while(|c| c.is_alphanumeric()).collect();
            (format!("RESULT rank={rank} err={kind}: {e}"), 1)
        }
        Err(Fail::Check(m)) => (format!("RESULT rank={rank} err=Check: {m}"), 2),
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", line.replace('\n', " "));
    let _ = out.flush();
    drop(out);
    std::process::exit(code);
}

fn env_ms(name: &str, default: u64) -> Duration {
    let ms = std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(default);
    Duration::from_millis(ms)
}

/// Joins the job with the deadlines the parent chose.
fn join() -> Result<Communicator, Fail> {
    let mut config = CommConfig::default().timeout(env_ms("WCCL_TEST_CALL_MS", 60_000));
    if std::env::var("WCCL_TEST_MATRIX").as_deref() == Ok("staged") {
        config = config.algorithm(wccl::Algorithm::Staged);
    }
    let options = ConnectOptions {
        tcp: TcpOptions {
            timeout: env_ms("WCCL_TEST_CONNECT_MS", 60_000),
            ..TcpOptions::default()
        },
        config,
        ..ConnectOptions::default()
    };
    Ok(Communicator::from_env_with(options)?)
}

fn run_scenario(scenario: &str, rank: &mut String) -> Result<String, Fail> {
    if scenario == "newcomer" {
        // Not launched into the job: a new process that comes to the group's grow with the
        // job token.
        let (r, n) = grow_target()?;
        *rank = r.to_string();
        let options = ConnectOptions {
            tcp: TcpOptions {
                timeout: env_ms("WCCL_TEST_CONNECT_MS", 60_000),
                ..TcpOptions::default()
            },
            config: CommConfig::default().timeout(env_ms("WCCL_TEST_CALL_MS", 60_000)),
            ..ConnectOptions::default()
        };
        let master = std::env::var("WCCL_TEST_GROW_MASTER")
            .map_err(|_| Fail::Check("no WCCL_TEST_GROW_MASTER".into()))?;
        let mut comm = Communicator::join_grown(r, n, &master, options)?;
        return grown_all_reduce(&mut comm);
    }
    let mut comm = join()?;
    *rank = comm.rank().to_string();
    let detail = match scenario {
        "correct" => correct(&mut comm)?,
        "loop" => loop_all_reduce(&mut comm)?,
        "exit_early" => exit_early(comm)?,
        "connect" => {
            comm.barrier()?;
            "connected".into()
        }
        "grow" => grow(&mut comm)?,
        other => return Err(Fail::Check(format!("unknown scenario {other:?}"))),
    };
    Ok(detail)
}

/// The newcomer's rank and the grown size (`WCCL_TEST_GROW_RANK`, `WCCL_TEST_GROW_SIZE`).
fn grow_target() -> Result<(usize, usize), Fail> {
    let get = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or_else(|| Fail::Check(format!("no {k}")))
    };
    Ok((get("WCCL_TEST_GROW_RANK")?, get("WCCL_TEST_GROW_SIZE")?))
}

/// Every rank of the grown group adds `rank + 1` (its number there) in an all-reduce: checked
/// exactly against the sum over the grown group.
fn grown_all_reduce(comm: &mut Communicator) -> Result<String, Fail> {
    let (n, count) = (comm.size(), 1001usize);
    let buf = comm.upload(&vec![comm.rank() as f32 + 1.0; count])?;
    comm.all_reduce(&buf, ReduceOp::Sum)?;
    let want = (n * (n + 1) / 2) as f32;
    let got = comm.download(&buf)?;
    if let Some(i) = got.iter().position(|&v| v != want) {
        return Err(Fail::Check(format!(
            "element {i} is {} after the grow, not {want}",
            got[i]
        )));
    }
    Ok(format!(
        "grown to {n}: seq {} epoch {}",
        comm.seq(),
        comm.epoch()
    ))
}

/// A member: an exact all-reduce among the members, then grow at `WCCL_TEST_GROW_MASTER` to
/// `WCCL_TEST_GROW_SIZE` with the newcomers, and an exact all-reduce among everyone.
fn grow(comm: &mut Communicator) -> Result<String, Fail> {
    let n = comm.size();
    let buf = comm.upload(&[comm.rank() as f32 + 1.0; 7])?;
    comm.all_reduce(&buf, ReduceOp::Sum)?;
    if comm.download(&buf)? != vec![(n * (n + 1) / 2) as f32; 7] {
        return Err(Fail::Check("the members' all-reduce is wrong".into()));
    }
    let (_, size) = grow_target()?;
    let master = std::env::var("WCCL_TEST_GROW_MASTER")
        .map_err(|_| Fail::Check("no WCCL_TEST_GROW_MASTER".into()))?;
    let tcp = TcpOptions {
        timeout: env_ms("WCCL_TEST_GROW_MS", 60_000),
        ..TcpOptions::default()
    };
    comm.grow_at(size, &master, &tcp)
        .map_err(|e| Fail::Check(format!("grow_at: {e}")))?;
    grown_all_reduce(comm)
}

/// One collective to run and check.
#[derive(Clone, Copy, Debug)]
struct Case {
    kind: CollectiveKind,
    op: ReduceOp,
    dtype: DType,
    count: usize,
    in_place: bool,
    root: usize,
    pad: usize,
}

fn reduces(kind: CollectiveKind) -> bool {
    matches!(
        kind,
        CollectiveKind::AllReduce | CollectiveKind::ReduceScatter | CollectiveKind::Reduce
    )
}

/// The cases of a matrix on `n` ranks: `full` is every collective, op and type at odd sizes
/// plus two big f32 cases; `reduced` every op on f32 and every type with sum (and the big cases
/// from 8 ranks on); `tiny` one case of each collective; `staged` every op and type of
/// all-reduce, plus a big one (run with the host-staged ring: see `join`).
fn cases(matrix: &str, n: usize) -> Vec<Case> {
    let mut sizes = vec![0, 1, n.saturating_sub(1).max(1), 7, 1021];
    sizes.sort_unstable();
    sizes.dedup();
    let mut out = Vec::new();
    let mut push = |kind, op, dtype, count| {
        let i = out.len();
        out.push(Case {
            kind,
            op,
            dtype,
            count,
            in_place: i % 2 == 1,
            root: i % n,
            pad: i % 3,
        });
    };
    match matrix {
        "tiny" => {
            for (i, kind) in common::KINDS.into_iter().enumerate() {
                let dtype = DType::ALL[i % DType::ALL.len()];
                push(kind, ReduceOp::ALL[i % ReduceOp::ALL.len()], dtype, 7);
            }
            push(CollectiveKind::AllReduce, ReduceOp::Sum, DType::F32, 1021);
        }
        "staged" => {
            for op in ReduceOp::ALL {
                for dtype in DType::ALL {
                    for &count in &sizes {
                        push(CollectiveKind::AllReduce, op, dtype, count);
                    }
                }
            }
            push(CollectiveKind::AllReduce, ReduceOp::Sum, DType::F32, BIG);
        }
        "full" | "reduced" => {
            for kind in common::KINDS {
                let combos: Vec<(ReduceOp, DType)> = match (matrix, reduces(kind)) {
                    ("full", true) => ReduceOp::ALL
                        .iter()
                        .flat_map(|&op| DType::ALL.iter().map(move |&d| (op, d)))
                        .collect(),
                    (_, true) => ReduceOp::ALL
                        .iter()
                        .map(|&op| (op, DType::F32))
                        .chain(DType::ALL[1..].iter().map(|&d| (ReduceOp::Sum, d)))
                        .collect(),
                    (_, false) => DType::ALL.iter().map(|&d| (ReduceOp::Sum, d)).collect(),
                };
                for (op, dtype) in combos {
                    for &count in &sizes {
                        push(kind, op, dtype, count);
                    }
                }
            }
            if matrix == "full" || n >= 8 {
                push(CollectiveKind::AllReduce, ReduceOp::Sum, DType::F32, BIG);
                push(CollectiveKind::AllGather, ReduceOp::Sum, DType::F32, BIG);
            }
        }
        _ => {}
    }
    out
}

/// A case with every rank's inputs (the same in every child: one seed) and the reduction.
struct Prepared {
    case: Case,
    inputs: Vec<Vec<f64>>,
    reduced: Vec<f64>,
}

fn lens(kind: CollectiveKind, n: usize, count: usize) -> (usize, usize) {
    match kind {
        CollectiveKind::ReduceScatter => (n * count, count),
        CollectiveKind::AllGather => (count, n * count),
        _ => (count, count),
    }
}

/// Every rank's inputs: values of rank r repeat with period [`PERIOD`], and differ from the
/// other ranks' (each rank draws its own).
fn prepare(case: Case, n: usize, seed: u64) -> Prepared {
    let mut rng = StdRng::seed_from_u64(seed);
    let (in_len, _) = lens(case.kind, n, case.count);
    let inputs: Vec<Vec<f64>> = (0..n)
        .map(|_| {
            let pool = random_values(&mut rng, case.dtype, case.op, PERIOD);
            (0..in_len).map(|i| pool[i % PERIOD]).collect()
        })
        .collect();
    let reduced = if reduces(case.kind) {
        reference(case.dtype, case.op, &inputs)
    } else {
        Vec::new()
    };
    Prepared {
        case,
        inputs,
        reduced,
    }
}

fn read_f64(comm: &Communicator, t: TensorRef<'_>) -> Result<Vec<f64>, Fail> {
    Ok(match t.dtype {
        DType::F32 => comm.read::<f32>(t)?.into_iter().map(f64::from).collect(),
        DType::F16 => comm
            .read::<f16>(t)?
            .into_iter()
            .map(|x| x.to_f64())
            .collect(),
        DType::BF16 => comm
            .read::<bf16>(t)?
            .into_iter()
            .map(|x| x.to_f64())
            .collect(),
        DType::I32 => comm.read::<i32>(t)?.into_iter().map(f64::from).collect(),
        DType::U32 => comm.read::<u32>(t)?.into_iter().map(f64::from).collect(),
        d => return Err(Fail::Check(format!("no read-back for {d}"))),
    })
}

fn close(what: &str, got: &[f64], want: &[f64], tol: impl Fn(usize) -> f64) -> Result<(), Fail> {
    if got.len() != want.len() {
        return Err(Fail::Check(format!(
            "{what}: {} elements, expected {}",
            got.len(),
            want.len()
        )));
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        // NaN (the poison of floats) is within no tolerance.
        let within = (g - w).abs() <= tol(i);
        if !within {
            return Err(Fail::Check(format!(
                "{what}: element {i} is {g}, expected {w} (tolerance {})",
                tol(i)
            )));
        }
    }
    Ok(())
}

fn same(a: f64, b: f64) -> bool {
    a == b || (a.is_nan() && b.is_nan())
}

/// Runs one prepared case on this rank (poisoned outputs, poison around every tensor) and
/// checks its output against the f64 reference, that an out-of-place input is unchanged and
/// that nothing outside the tensors was written.
fn execute(comm: &mut Communicator, p: &Prepared, opts: CallOptions) -> Result<(), Fail> {
    let (r, n) = (comm.rank(), comm.size());
    let Case {
        kind,
        op,
        dtype,
        count,
        in_place,
        root,
        pad,
    } = p.case;
    let (in_len, out_len) = lens(kind, n, count);
    let mine = &p.inputs[r];
    let (a, b) = if in_place {
        let values = if kind == CollectiveKind::AllGather {
            let mut v = vec![poison(dtype); out_len];
            v[r * count..(r + 1) * count].copy_from_slice(mine);
            v
        } else {
            mine.clone()
        };
        (make_buffer(comm, dtype, &values, pad), None)
    } else {
        (
            make_buffer(comm, dtype, mine, pad),
            Some(make_buffer(comm, dtype, &vec![poison(dtype); out_len], pad)),
        )
    };
    let es = dtype.size() as u64;
    let base = pad as u64 * es;
    let (input, output) = match &b {
        Some(out) => (
            TensorRef::new(&a, base, in_len, dtype),
            TensorRef::new(out, base, out_len, dtype),
        ),
        None => {
            let whole = TensorRef::new(&a, base, in_len.max(out_len), dtype);
            match kind {
                CollectiveKind::ReduceScatter => (whole, whole.slice(r * count, count)),
                CollectiveKind::AllGather => (whole.slice(r * count, count), whole),
                _ => (whole, whole),
            }
        }
    };
    let call = common::collective(kind, input, output, op, root);
    comm.run(call, opts)?;

    let what = format!("{:?} on {n} ranks, rank {r}", p.case);
    let got = read_f64(comm, output)?;
    let tol =
        |lo: usize| move |i: usize| tolerance(dtype, op, &p.inputs, lo + i, p.reduced[lo + i]);
    match kind {
        CollectiveKind::AllReduce => close(&what, &got, &p.reduced, tol(0))?,
        CollectiveKind::ReduceScatter => {
            let lo = r * count;
            close(&what, &got, &p.reduced[lo..lo + count], tol(lo))?
        }
        CollectiveKind::AllGather => close(&what, &got, &p.inputs.concat(), |_| 0.0)?,
        CollectiveKind::Broadcast => close(&what, &got, &p.inputs[root], |_| 0.0)?,
        CollectiveKind::Reduce if r == root => close(&what, &got, &p.reduced, tol(0))?,
        _ => {
            if !in_place && !got.iter().all(|g| same(*g, poison(dtype))) {
                return Err(Fail::Check(format!(
                    "{what}: a non-root output was written"
                )));
            }
        }
    }
    if !in_place {
        close(
            &format!("{what} (input kept)"),
            &read_f64(comm, input)?,
            mine,
            |_| 0.0,
        )?;
    }
    if pad > 0 {
        let regions = [
            (Some(&a), in_len.max(if in_place { out_len } else { 0 })),
            (b.as_ref(), out_len),
        ];
        for (buf, len) in regions {
            let Some(buf) = buf else { continue };
            let before = read_f64(comm, TensorRef::new(buf, 0, pad, dtype))?;
            let after = read_f64(
                comm,
                TensorRef::new(buf, base + len as u64 * es, pad, dtype),
            )?;
            if !before.iter().chain(&after).all(|g| same(*g, poison(dtype))) {
                return Err(Fail::Check(format!("{what}: wrote outside the tensor")));
            }
        }
    }
    Ok(())
}

/// Runs the matrix `WCCL_TEST_MATRIX` names, then one barrier.
fn correct(comm: &mut Communicator) -> Result<String, Fail> {
    let matrix = std::env::var("WCCL_TEST_MATRIX").unwrap_or_else(|_| "tiny".into());
    let list = cases(&matrix, comm.size());
    if list.is_empty() {
        return Err(Fail::Check(format!("no cases in matrix {matrix:?}")));
    }
    // With `WCCL_TEST_PROBE`: the job's probe first, and every call `Auto` from its model.
    let probed = std::env::var_os("WCCL_TEST_PROBE").is_some();
    let opts = if probed {
        probe_job(comm)?;
        CallOptions {
            algorithm: Some(wccl::Algorithm::Auto),
            ..CallOptions::default()
        }
    } else {
        CallOptions::default()
    };
    for (i, &case) in list.iter().enumerate() {
        let p = prepare(case, comm.size(), SEED.wrapping_add(i as u64));
        let before = comm.mapped_calls();
        execute(comm, &p, opts)?;
        let modelled = matches!(
            case.kind,
            CollectiveKind::AllReduce | CollectiveKind::ReduceScatter | CollectiveKind::AllGather
        );
        if probed && modelled {
            // What the model chooses for the call's size (its larger tensor's bytes).
            let (input, output) = lens(case.kind, comm.size(), case.count);
            let bytes = input.max(output) * case.dtype.size();
            let want = comm
                .cost_model()
                .and_then(|m| m.choose_call(case.kind, bytes, false));
            if comm.last_algorithm() != want {
                return Err(Fail::Check(format!(
                    "{case:?}: auto ran {:?}, the model chooses {want:?}",
                    comm.last_algorithm()
                )));
            }
        }
        // The host-staged ring runs in the tensors, mapped in place, wherever the device allows
        // it: every call with data.
        let mapped = comm.mapped_calls() - before;
        let expected = matrix == "staged" && comm.device().unified_memory() && case.count > 0;
        // Auto's choices are the model's, not this check's.
        if probed {
            continue;
        }
        if mapped != u64::from(expected) {
            return Err(Fail::Check(format!(
                "{case:?}: {mapped} calls ran in mapped tensors, expected {}",
                u64::from(expected)
            )));
        }
    }
    comm.barrier()?;
    Ok(format!("cases={}", list.len()))
}

/// Probes the job (`Communicator::probe`) and checks what every rank made of it: a link
/// measured over TCP, every rank's device, and one model on every rank (the extremes of a
/// fingerprint of its text, over the ranks, are equal).
fn probe_job(comm: &mut Communicator) -> Result<(), Fail> {
    let p = comm.probe(64 << 10)?;
    let n = comm.size();
    if p.alone.len() != n {
        return Err(Fail::Check(format!(
            "{} ranks probed of {n}",
            p.alone.len()
        )));
    }
    let model = comm
        .cost_model()
        .cloned()
        .ok_or_else(|| Fail::Check("no model installed".into()))?;
    let link = model
        .link()
        .ok_or_else(|| Fail::Check("no link in the model".into()))?;
    if !(link.gbps > 0.0 && link.latency_us > 0.0) {
        return Err(Fail::Check(format!("a link of nothing: {link:?}")));
    }
    // FNV-1a of the model's text (every figure, bit for bit): 24 bits, exact in f32.
    let text = format!("{model:?}");
    let hash = text.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    }) & 0xff_ffff;
    let mut extremes = Vec::new();
    for op in [ReduceOp::Min, ReduceOp::Max] {
        let b = comm.upload(&[hash as f32])?;
        comm.all_reduce(&b, op)?;
        extremes.push(comm.download(&b)?.first().copied().unwrap_or(f32::NAN));
    }
    if extremes != [hash as f32, hash as f32] {
        return Err(Fail::Check(format!(
            "the ranks' models differ: fingerprints from {} to {}, this rank's {hash}",
            extremes[0], extremes[1]
        )));
    }
    Ok(())
}

/// All-reduces a few MiB (checked) again and again with the call deadline
/// `WCCL_TEST_CALL_MS`; prints `READY` after the first success, so that the parent strikes
/// mid-loop. The first call waits longer: the peers may still be opening their devices.
fn loop_all_reduce(comm: &mut Communicator) -> Result<String, Fail> {
    let count = std::env::var("WCCL_TEST_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(BIG);
    let case = Case {
        kind: CollectiveKind::AllReduce,
        op: ReduceOp::Sum,
        dtype: DType::F32,
        count,
        in_place: false,
        root: 0,
        pad: 1,
    };
    let p = prepare(case, comm.size(), SEED);
    execute(comm, &p, CallOptions::timeout(Duration::from_secs(120)))?;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "READY rank={}", comm.rank());
        let _ = out.flush();
    }
    // Bounded: a child whose parent never strikes (or died) still ends.
    let started = Instant::now();
    while started.elapsed() < JOB_DEADLINE {
        execute(comm, &p, CallOptions::default())?;
    }
    Ok("looped".into())
}

/// Both ranks all-reduce once; then rank 1 leaves (drops its communicator: a clean goodbye)
/// while rank 0 calls a second all-reduce, which must fail naming rank 1.
fn exit_early(mut comm: Communicator) -> Result<String, Fail> {
    let case = Case {
        kind: CollectiveKind::AllReduce,
        op: ReduceOp::Sum,
        dtype: DType::F32,
        count: 1021,
        in_place: false,
        root: 0,
        pad: 0,
    };
    let p = prepare(case, comm.size(), SEED);
    execute(&mut comm, &p, CallOptions::default())?;
    if comm.rank() != 0 {
        drop(comm);
        return Ok("left".into());
    }
    execute(&mut comm, &p, CallOptions::default())?;
    Ok("second call succeeded".into())
}

// ---------------------------------------------------------------------------------------------
// The parent side.

/// One rank's `RESULT` line.
#[derive(Debug)]
struct Outcome {
    /// The rank it printed (`?` when it could not tell).
    rank: String,
    /// `ok`, or the error's kind (`PeerExited`, `Timeout`, ..., `Check`).
    kind: String,
    /// The rest of the line (the error's text).
    text: String,
}

impl Outcome {
    fn parse(line: &str) -> Option<Outcome> {
        // The harness's "test child ... " may precede it on the same line.
        const TAG: &str = "RESULT rank=";
        let rest = line.get(line.find(TAG)? + TAG.len()..)?.trim_end();
        let (rank, rest) = rest.split_once(' ')?;
        let (kind, text) = match rest.strip_prefix("err=") {
            Some(e) => {
                let (k, t) = e.split_once(": ").unwrap_or((e, ""));
                (k.to_string(), t.to_string())
            }
            None => ("ok".to_string(), rest.trim_start_matches("ok").to_string()),
        };
        Some(Outcome {
            rank: rank.to_string(),
            kind,
            text,
        })
    }
    fn ok(&self) -> bool {
        self.kind == "ok"
    }
}

/// A finished child: how it exited and what it printed.
struct Finished {
    name: String,
    status: ExitStatus,
    stdout: Vec<String>,
    stderr: String,
}

impl Finished {
    /// Its `RESULT` line; the failure names the child and shows its output.
    fn outcome(&self) -> Outcome {
        match self.stdout.iter().rev().find_map(|l| Outcome::parse(l)) {
            Some(o) => o,
            None => panic!(
                "{} printed no RESULT line ({}):\n{}\n{}",
                self.name,
                self.status,
                self.stdout.join("\n"),
                tail(&self.stderr)
            ),
        }
    }

    /// Every `RESULT` line it printed (mpirun prints its ranks' lines).
    fn outcomes(&self) -> Vec<Outcome> {
        self.stdout
            .iter()
            .filter_map(|l| Outcome::parse(l))
            .collect()
    }

    /// Asserts the child succeeded as rank `rank`.
    fn assert_ok(&self, rank: usize) {
        let o = self.outcome();
        assert!(
            o.ok() && self.status.success() && o.rank == rank.to_string(),
            "{} ({}): {o:?}\n{}",
            self.name,
            self.status,
            tail(&self.stderr)
        );
    }
}

fn tail(s: &str) -> &str {
    let mut start = s.len().saturating_sub(4000);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

struct Proc {
    name: String,
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    /// Whether it is a launcher: SIGKILL would orphan the ranks it started (Open MPI puts
    /// each in a process group of its own), so it gets SIGTERM first, on which it kills them.
    launcher: bool,
}

/// The children of one test. Dropping it kills and reaps every child still running, so that no
/// exit path (a failed assertion included) leaves a process behind.
struct Procs {
    procs: Vec<Proc>,
    lines_tx: Sender<(usize, String)>,
    lines: Receiver<(usize, String)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The launchers' variables of the parent's own environment, which must not reach a child
/// unless its scenario sets them (a test run inside `srun` or `mpirun` has them).
fn launcher_variable(k: &str) -> bool {
    const EXACT: [&str; 8] = [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "WCCL_LAUNCHER",
    ];
    const PREFIX: [&str; 8] = [
        "WCCL_",
        "OMPI_",
        "PMI_",
        "PMIX_",
        "SLURM_",
        "MPI_LOCAL",
        "TORCHELASTIC_",
        "PRTE_",
    ];
    EXACT.contains(&k) || PREFIX.iter().any(|p| k.starts_with(p))
}

/// `program args` with the parent's environment less its launcher variables, plus `vars`.
fn command(program: &std::path::Path, args: &[&str], vars: &[(&str, String)]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(launcher_variable) {
            c.env_remove(&k);
        }
    }
    c.env("NODEVICE_SELECT", "1");
    for (k, v) in vars {
        c.env(k, v);
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// This test binary, re-executed to run only the `child` test, as `scenario`.
fn child_command(scenario: &str, vars: &[(&str, String)]) -> Command {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut all = vec![(CHILD_VAR, scenario.to_string())];
    all.extend(vars.iter().cloned());
    command(
        &exe,
        &["child", "--exact", "--nocapture", "--test-threads=1"],
        &all,
    )
}

impl Procs {
    fn new() -> Procs {
        let (lines_tx, lines) = channel();
        Procs {
            procs: Vec::new(),
            lines_tx,
            lines,
        }
    }

    /// Starts `cmd` as the child called `name`; its output lines are collected (and sent to
    /// [`wait_lines`](Self::wait_lines)) by two reader threads.
    fn spawn(&mut self, name: String, cmd: Command) -> usize {
        self.start(name, cmd, false)
    }

    /// [`spawn`](Self::spawn) for a launcher, which the guard stops with SIGTERM (it then
    /// kills its ranks) before SIGKILL.
    fn spawn_launcher(&mut self, name: String, cmd: Command) -> usize {
        self.start(name, cmd, true)
    }

    fn start(&mut self, name: String, mut cmd: Command, launcher: bool) -> usize {
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => panic!("cannot start {name}: {e}"),
        };
        let index = self.procs.len();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            let (lines, tx) = (stdout.clone(), self.lines_tx.clone());
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send((index, line.clone()));
                    lock(&lines).push(line);
                }
            }));
        }
        if let Some(mut err) = child.stderr.take() {
            let text = stderr.clone();
            readers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(k) = err.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    lock(&text).push_str(&String::from_utf8_lossy(&buf[..k]));
                }
            }));
        }
        self.procs.push(Proc {
            name,
            child,
            stdout,
            stderr,
            readers,
            launcher,
        });
        index
    }

    /// Starts `n` ranks of `scenario`, rank r with `vars(r)`.
    fn spawn_ranks(
        &mut self,
        n: usize,
        scenario: &str,
        vars: impl Fn(usize) -> Vec<(&'static str, String)>,
    ) {
        for r in 0..n {
            self.spawn(format!("rank {r}"), child_command(scenario, &vars(r)));
        }
    }

    fn pid(&self, i: usize) -> u32 {
        self.procs[i].child.id()
    }

    fn kill(&mut self, i: usize) {
        let _ = self.procs[i].child.kill();
    }

    fn signal(&self, i: usize, sig: &str) {
        let pid = self.pid(i).to_string();
        let status = Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {pid}: {status}");
    }

    /// Waits until every child in `which` printed a line containing `marker`; a child that
    /// exits first, or the deadline, fails the test (the guard then kills the rest).
    fn wait_lines(&mut self, which: &[usize], marker: &str, deadline: Duration) {
        let end = Instant::now() + deadline;
        let mut seen = vec![false; self.procs.len()];
        for (i, p) in self.procs.iter().enumerate() {
            seen[i] = lock(&p.stdout).iter().any(|l| l.contains(marker));
        }
        while which.iter().any(|&i| !seen[i]) {
            let left = end.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok((i, line)) => seen[i] |= line.contains(marker),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {}
            }
            for &i in which {
                if !seen[i]
                    && let Ok(Some(st)) = self.procs[i].child.try_wait()
                {
                    // Its last lines may still be on their way: its readers end at the end of
                    // its pipes (it exited), having sent every line.
                    for r in self.procs[i].readers.drain(..) {
                        let _ = r.join();
                    }
                    while let Ok((j, line)) = self.lines.try_recv() {
                        seen[j] |= line.contains(marker);
                    }
                    assert!(
                        seen[i],
                        "{} exited ({st}) before printing {marker}: {:?}\n{}",
                        self.procs[i].name,
                        lock(&self.procs[i].stdout),
                        tail(&lock(&self.procs[i].stderr))
                    );
                }
            }
            if Instant::now() >= end && which.iter().any(|&i| !seen[i]) {
                let missing: Vec<&str> = which
                    .iter()
                    .filter(|&&i| !seen[i])
                    .map(|&i| self.procs[i].name.as_str())
                    .collect();
                panic!("{missing:?} did not print {marker} within {deadline:?}");
            }
        }
    }

    /// Waits until the children in `which` exited; the deadline fails the test naming the ones
    /// still running (the guard then kills every child).
    fn wait_exit(&mut self, which: &[usize], deadline: Duration) {
        let end = Instant::now() + deadline;
        loop {
            let running: Vec<usize> = which
                .iter()
                .copied()
                .filter(|&i| matches!(self.procs[i].child.try_wait(), Ok(None)))
                .collect();
            if running.is_empty() {
                return;
            }
            if Instant::now() >= end {
                let names: Vec<&str> = running
                    .iter()
                    .map(|&i| self.procs[i].name.as_str())
                    .collect();
                panic!("{names:?} still running after {deadline:?}");
            }
            // Polling `try_wait`: std has no wait with a deadline.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether child `i` is still running.
    fn running(&mut self, i: usize) -> bool {
        matches!(self.procs[i].child.try_wait(), Ok(None))
    }

    /// Waits for every child to exit, until `deadline`; then kills all and fails naming the
    /// ones still running.
    fn wait_all(mut self, deadline: Duration) -> Vec<Finished> {
        let end = Instant::now() + deadline;
        loop {
            let running: Vec<usize> = (0..self.procs.len())
                .filter(|&i| matches!(self.procs[i].child.try_wait(), Ok(None)))
                .collect();
            if running.is_empty() {
                break;
            }
            if Instant::now() >= end {
                let names: Vec<String> = running
                    .iter()
                    .map(|&i| {
                        format!(
                            "{} (output: {:?})",
                            self.procs[i].name,
                            lock(&self.procs[i].stdout)
                        )
                    })
                    .collect();
                // Drop kills every child.
                panic!("still running after {deadline:?}: {}", names.join("; "));
            }
            // Polling `try_wait`: std has no wait with a deadline.
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut done = Vec::new();
        for mut p in std::mem::take(&mut self.procs) {
            let status = p.child.wait().expect("reap a child that exited");
            // The pipes close at exit: the readers end.
            for r in p.readers.drain(..) {
                let _ = r.join();
            }
            done.push(Finished {
                name: p.name,
                status,
                stdout: std::mem::take(&mut *lock(&p.stdout)),
                stderr: std::mem::take(&mut *lock(&p.stderr)),
            });
        }
        done
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for p in &mut self.procs {
            if p.launcher && matches!(p.child.try_wait(), Ok(None)) {
                let _ = Command::new("kill")
                    .args(["-TERM", &p.child.id().to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                let end = Instant::now() + Duration::from_secs(20);
                while Instant::now() < end && matches!(p.child.try_wait(), Ok(None)) {
                    // Polling `try_wait`: std has no wait with a deadline.
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

/// A loopback port nobody listens on now (bound, read, released).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local address").port()
}

/// A job id of its own for each test (and each run of the test binary).
fn job_id(test: &str) -> String {
    format!("procs-{test}-{}", std::process::id())
}

/// The multi-process tests run one at a time: each loads the 2 CPUs fully, and the call
/// deadlines of the fault tests are meant for one job at a time.
fn serial() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    lock(&ONE)
}

/// wccl's own variables for rank `r` of `n`.
fn wccl_vars(r: usize, n: usize, port: u16, job: &str) -> Vec<(&'static str, String)> {
    vec![
        ("WCCL_RANK", r.to_string()),
        ("WCCL_WORLD_SIZE", n.to_string()),
        ("WCCL_MASTER_ADDR", "127.0.0.1".into()),
        ("WCCL_MASTER_PORT", port.to_string()),
        ("WCCL_JOB_ID", job.to_string()),
    ]
}

/// Runs `matrix` on `n` processes and asserts every rank checked every case.
fn correct_on(n: usize, matrix: &'static str) {
    let _one = serial();
    let t = Instant::now();
    let (port, job) = (free_port(), job_id(&format!("correct-{n}-{matrix}")));
    let mut procs = Procs::new();
    procs.spawn_ranks(n, "correct", |r| {
        let mut v = wccl_vars(r, n, port, &job);
        v.push(("WCCL_TEST_MATRIX", matrix.into()));
        v
    });
    let want = format!("cases={}", cases(matrix, n).len());
    for (r, f) in procs.wait_all(JOB_DEADLINE).iter().enumerate() {
        f.assert_ok(r);
        assert_eq!(f.outcome().text.trim(), want, "{}", f.name);
    }
    eprintln!("{matrix} matrix on {n} processes: {:?}", t.elapsed());
}

#[test]
fn every_collective_op_and_type_on_3_processes() {
    correct_on(3, "full");
}

/// The host-staged ring over TCP, one rank per process: every op and type at odd sizes and a
/// big case, against the f64 reference (in the tensors mapped in place on the CI's lavapipe).
#[test]
fn staged_ring_on_4_processes() {
    correct_on(4, "staged");
}

#[test]
fn a_reduced_matrix_on_2_processes() {
    correct_on(2, "reduced");
}

#[test]
fn a_reduced_matrix_on_5_processes() {
    correct_on(5, "reduced");
}

#[test]
fn a_reduced_matrix_on_8_processes() {
    correct_on(8, "reduced");
}

/// The error of every survivor in `done` (all but `victim`).
fn survivors(done: &[Finished], victim: usize) -> Vec<(usize, Outcome)> {
    (0..done.len())
        .filter(|&r| r != victim)
        .map(|r| {
            let o = done[r].outcome();
            assert!(
                !o.ok() && !done[r].status.success(),
                "{} succeeded with rank {victim} gone: {o:?}",
                done[r].name
            );
            assert_eq!(o.rank, r.to_string(), "{}", done[r].name);
            eprintln!("{}: {} {}", done[r].name, o.kind, o.text);
            (r, o)
        })
        .collect()
}

#[test]
fn a_killed_process_is_named_by_every_survivor_at_once() {
    let _one = serial();
    let (n, victim) = (4, 2);
    let (port, job) = (free_port(), job_id("killed"));
    let mut procs = Procs::new();
    procs.spawn_ranks(n, "loop", |r| {
        let mut v = wccl_vars(r, n, port, &job);
        // A deadline no run reaches: an error must come from the closed socket.
        v.push(("WCCL_TEST_CALL_MS", "120000".into()));
        v.push(("WCCL_TEST_COUNT", BIG.to_string()));
        v
    });
    let all: Vec<usize> = (0..n).collect();
    procs.wait_lines(&all, "READY rank=", JOB_DEADLINE);
    procs.kill(victim);
    let done = procs.wait_all(JOB_DEADLINE);
    assert_eq!(
        done[victim].status.signal(),
        Some(9),
        "rank 2 was not killed"
    );
    for (r, o) in survivors(&done, victim) {
        assert!(
            o.kind != "Timeout" && !o.text.contains("timed out"),
            "rank {r} waited for its deadline instead of seeing the socket close: {o:?}"
        );
        // A closed socket, seen directly or through a peer's abort: not a corrupt frame (a
        // process killed mid-frame ends its stream inside one).
        assert!(
            (o.kind == "LinkClosed" || o.kind == "PeerAborted")
                && !o.text.contains("failed its checks"),
            "rank {r}: {o:?}"
        );
        assert!(
            o.text.contains("rank 2"),
            "rank {r} does not name rank 2: {o:?}"
        );
    }
}

/// Stops rank 2 of 4 (SIGSTOP) mid-loop under a 3 s call deadline, waits for the survivors to
/// fail, resumes it, and returns the survivors' errors once every process exited.
fn stop_one() -> Vec<(usize, Outcome)> {
    let (n, victim) = (4, 2);
    let (port, job) = (free_port(), job_id("stopped"));
    let mut procs = Procs::new();
    procs.spawn_ranks(n, "loop", |r| {
        let mut v = wccl_vars(r, n, port, &job);
        v.push(("WCCL_TEST_CALL_MS", "3000".into()));
        v.push(("WCCL_TEST_COUNT", "65543".into()));
        v
    });
    let all: Vec<usize> = (0..n).collect();
    procs.wait_lines(&all, "READY rank=", JOB_DEADLINE);
    procs.signal(victim, "-STOP");
    // A stopped process keeps its sockets open: only the survivors' deadlines end their calls.
    let others: Vec<usize> = (0..n).filter(|&r| r != victim).collect();
    procs.wait_exit(&others, JOB_DEADLINE);
    assert!(
        procs.running(victim),
        "the stopped rank exited while stopped"
    );
    procs.signal(victim, "-CONT");
    let done = procs.wait_all(JOB_DEADLINE);
    // Resumed, it finds its peers gone and fails too.
    let o = done[victim].outcome();
    assert!(!o.ok() && !done[victim].status.success(), "{o:?}");
    survivors(&done, victim)
}

#[test]
fn a_stopped_process_fails_every_survivor_by_its_deadline_and_nothing_hangs() {
    let _one = serial();
    for (r, o) in stop_one() {
        // Nothing closed: a deadline ended the call, here or at the rank that aborted it.
        assert!(
            (o.kind == "Timeout" || o.kind == "PeerAborted") && o.text.contains("timed out"),
            "rank {r}: {o:?}"
        );
    }
}

/// Whichever survivor's deadline passes first, it names the stopped rank, not the neighbour it
/// happened to wait on: the stopped process's heartbeats stopped (`Link::silent_peers`), and
/// the others repeat that survivor's reason.
#[test]
fn a_stopped_process_is_named_by_every_survivor() {
    let _one = serial();
    for (r, o) in stop_one() {
        // The silent ranks named: rank 2 among them (a healthy peer delayed on a loaded
        // machine may be named beside it, never instead of it).
        let named: Vec<usize> = o
            .text
            .split("rank(s) [")
            .nth(1)
            .and_then(|t| t.split(']').next())
            .map(|l| {
                l.split(", ")
                    .filter_map(|x| x.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        // Rank 2 among them, and not every survivor beside it: a list of all peers would
        // name nobody.
        assert!(
            named.contains(&2) && named.len() < 3,
            "rank {r} does not name the stopped rank 2 alone: {o:?}"
        );
    }
}

#[test]
fn a_wrong_job_token_is_refused_on_both_sides() {
    let _one = serial();
    let (port, job) = (free_port(), job_id("token"));
    let mut procs = Procs::new();
    procs.spawn_ranks(2, "connect", |r| {
        let mut v = wccl_vars(r, 2, port, &job);
        v.push(("WCCL_TEST_CONNECT_MS", "5000".into()));
        let token = if r == 1 {
            "not-the-secret"
        } else {
            "the-secret"
        };
        v.push(("WCCL_JOB_TOKEN", token.into()));
        v
    });
    let done = procs.wait_all(JOB_DEADLINE);
    let (o0, o1) = (done[0].outcome(), done[1].outcome());
    eprintln!("{o0:?}\n{o1:?}");
    assert!(
        o1.kind == "Connect" && o1.text.contains("job token"),
        "rank 1: {o1:?}"
    );
    assert!(
        o0.kind == "Connect"
            && o0.text.contains("rank 1 of 2 did not register")
            && o0.text.contains("job token"),
        "rank 0: {o0:?}"
    );
}

/// The same secret given as `WCCL_JOB_TOKEN` and as a file (with the newline an editor adds)
/// lets every rank in: the store and the mesh then listen on every interface and check proofs.
#[test]
fn a_shared_job_token_lets_every_rank_in() {
    let _one = serial();
    let n = 3;
    let (port, job) = (free_port(), job_id("shared-token"));
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("token");
    std::fs::write(&file, "s3cret\n").expect("write the token file");
    let mut procs = Procs::new();
    procs.spawn_ranks(n, "correct", |r| {
        let mut v = wccl_vars(r, n, port, &job);
        v.push(("WCCL_TEST_MATRIX", "tiny".into()));
        if r == 1 {
            v.push(("WCCL_JOB_TOKEN_FILE", file.display().to_string()));
        } else {
            v.push(("WCCL_JOB_TOKEN", "s3cret".into()));
        }
        v
    });
    for (r, f) in procs.wait_all(JOB_DEADLINE).iter().enumerate() {
        f.assert_ok(r);
    }
}

#[test]
fn a_second_job_on_the_same_port_is_refused_naming_both() {
    let _one = serial();
    let port = free_port();
    let (a, b) = (job_id("job-a"), job_id("job-b"));
    let mut procs = Procs::new();
    // Job A's rank 0 waits for its rank 1, which never comes.
    let mut va = wccl_vars(0, 2, port, &a);
    va.push(("WCCL_TEST_CONNECT_MS", "120000".into()));
    procs.spawn("job A rank 0".into(), child_command("connect", &va));
    let mut vb = wccl_vars(1, 2, port, &b);
    vb.push(("WCCL_TEST_CONNECT_MS", "60000".into()));
    let jb = procs.spawn("job B rank 1".into(), child_command("connect", &vb));
    procs.wait_exit(&[jb], JOB_DEADLINE);
    // Job A is not disturbed: its store still waits for its own rank 1.
    assert!(procs.running(0), "job A's rank 0 ended");
    procs.kill(0);
    let done = procs.wait_all(JOB_DEADLINE);
    let o = done[jb].outcome();
    eprintln!("{o:?}");
    assert!(
        o.kind == "Connect" && o.text.contains(&a) && o.text.contains(&b),
        "job B's rank 1: {o:?}"
    );
}

#[test]
fn a_port_in_use_is_named_with_its_variable() {
    let _one = serial();
    let held = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("address").port();
    let mut procs = Procs::new();
    procs.spawn_ranks(1, "connect", |r| {
        let mut v = wccl_vars(r, 2, port, &job_id("in-use"));
        v.push(("WCCL_TEST_CONNECT_MS", "5000".into()));
        v
    });
    let done = procs.wait_all(JOB_DEADLINE);
    drop(held);
    let o = done[0].outcome();
    eprintln!("{o:?}");
    assert!(
        o.kind == "Connect"
            && o.text.contains("in use")
            && o.text.contains("WCCL_MASTER_PORT")
            && o.text.contains(&port.to_string()),
        "rank 0: {o:?}"
    );
}

#[test]
fn a_peer_that_leaves_early_is_named_as_exited() {
    let _one = serial();
    let (port, job) = (free_port(), job_id("exits"));
    let mut procs = Procs::new();
    procs.spawn_ranks(2, "exit_early", |r| wccl_vars(r, 2, port, &job));
    let done = procs.wait_all(JOB_DEADLINE);
    done[1].assert_ok(1);
    let o = done[0].outcome();
    eprintln!("{o:?}");
    assert!(
        o.kind == "PeerExited" && o.text.contains("rank 1 exited"),
        "rank 0: {o:?}"
    );
}

/// A port `p` that is free while the parent holds `p - 1`, as torchrun's own store holds
/// `MASTER_PORT` while wccl's takes `MASTER_PORT + 1`.
fn port_pair() -> (TcpListener, u16) {
    for _ in 0..50 {
        let held = TcpListener::bind("127.0.0.1:0").expect("bind");
        let q = held.local_addr().expect("address").port();
        if let Some(p) = q.checked_add(1)
            && TcpListener::bind(("127.0.0.1", p)).is_ok()
        {
            return (held, p);
        }
    }
    panic!("no two adjacent free ports");
}

#[test]
fn torchrun_variables_alone_are_enough() {
    let _one = serial();
    let n = 3;
    let (torch_store, p) = port_pair();
    let job = job_id("torchrun");
    let mut procs = Procs::new();
    procs.spawn_ranks(n, "correct", |r| {
        vec![
            ("RANK", r.to_string()),
            ("WORLD_SIZE", n.to_string()),
            ("LOCAL_RANK", r.to_string()),
            ("LOCAL_WORLD_SIZE", n.to_string()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", (p - 1).to_string()),
            ("TORCHELASTIC_RUN_ID", job.clone()),
            ("WCCL_TEST_MATRIX", "tiny".into()),
            // The job's probe over TCP, and every call `Auto` from its model.
            ("WCCL_TEST_PROBE", "1".into()),
        ]
    });
    let done = procs.wait_all(JOB_DEADLINE);
    drop(torch_store);
    for (r, f) in done.iter().enumerate() {
        f.assert_ok(r);
    }
}

#[test]
fn slurm_variables_alone_are_enough() {
    let _one = serial();
    let n = 3;
    let (port, job) = (free_port(), job_id("slurm"));
    let mut procs = Procs::new();
    procs.spawn_ranks(n, "correct", |r| {
        vec![
            ("SLURM_PROCID", r.to_string()),
            ("SLURM_NTASKS", n.to_string()),
            ("SLURM_LOCALID", r.to_string()),
            ("SLURM_JOB_ID", job.clone()),
            ("WCCL_MASTER_PORT", port.to_string()),
            ("WCCL_TEST_MATRIX", "tiny".into()),
        ]
    });
    for (r, f) in procs.wait_all(JOB_DEADLINE).iter().enumerate() {
        f.assert_ok(r);
    }
}

/// `program` on `PATH`, if there.
fn on_path(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[test]
fn mpirun_starts_three_ranks() {
    let Some(mpirun) = on_path("mpirun") else {
        println!("skipped mpirun: not installed");
        return;
    };
    let _one = serial();
    let port = free_port();
    let exe = std::env::current_exe().expect("the test binary's path");
    let exe = exe.to_str().expect("a UTF-8 path");
    let child_env = format!("{CHILD_VAR}=correct");
    let port_env = format!("WCCL_MASTER_PORT={port}");
    let args = [
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        "3",
        "-x",
        &child_env,
        "-x",
        "WCCL_TEST_MATRIX=tiny",
        "-x",
        &port_env,
        "-x",
        "NODEVICE_SELECT=1",
        exe,
        "child",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ];
    let mut procs = Procs::new();
    procs.spawn_launcher("mpirun".into(), command(&mpirun, &args, &[]));
    let done = procs.wait_all(JOB_DEADLINE);
    let mut ranks: Vec<String> = done[0]
        .outcomes()
        .into_iter()
        .map(|o| {
            assert!(o.ok(), "{o:?}\n{}", tail(&done[0].stderr));
            o.rank
        })
        .collect();
    ranks.sort();
    assert_eq!(
        ranks,
        ["0", "1", "2"],
        "{}: {:?}\n{}",
        done[0].status,
        done[0].stdout,
        tail(&done[0].stderr)
    );
    assert!(done[0].status.success(), "{}", done[0].status);
}

/// The `grow` job: `n` member processes launched with wccl's variables, then one newcomer
/// process, not launched into the job, that comes to the grow at a second rendezvous with
/// `newcomer_token` (the members' is "s3cret"). The members' grow waits `grow_ms`; every other
/// wait is long (a slow machine must not turn a refusal into a timeout).
fn grow_job(test: &str, newcomer_token: &str, grow_ms: &str) -> Vec<Finished> {
    let n = 3;
    let (port, grow_port, job) = (free_port(), free_port(), job_id(test));
    let grow_vars = |r: usize| {
        vec![
            ("WCCL_TEST_GROW_MASTER", format!("127.0.0.1:{grow_port}")),
            ("WCCL_TEST_GROW_RANK", r.to_string()),
            ("WCCL_TEST_GROW_SIZE", (n + 1).to_string()),
            ("WCCL_TEST_GROW_MS", grow_ms.to_string()),
        ]
    };
    let mut procs = Procs::new();
    procs.spawn_ranks(n, "grow", |r| {
        let mut v = wccl_vars(r, n, port, &job);
        v.push(("WCCL_JOB_TOKEN", "s3cret".into()));
        v.extend(grow_vars(r));
        v
    });
    let mut v = grow_vars(n);
    v.push(("WCCL_JOB_TOKEN", newcomer_token.into()));
    procs.spawn("newcomer".into(), child_command("newcomer", &v));
    procs.wait_all(JOB_DEADLINE)
}

/// Three processes all-reduce, then grow to four: a new process comes with the job token, and
/// the four all-reduce exactly (every rank's sequence numbers start again).
#[test]
fn a_new_process_joins_a_running_job() {
    let _one = serial();
    let done = grow_job("grow", "s3cret", "60000");
    for (r, f) in done.iter().enumerate() {
        f.assert_ok(r);
        let o = f.outcome();
        assert!(o.text.contains("grown to 4: seq 1"), "{}: {o:?}", f.name);
    }
}

/// A newcomer with the wrong job token is refused, and so is the grow on every member: each
/// says why.
#[test]
fn a_newcomer_with_a_wrong_token_is_refused() {
    let _one = serial();
    let done = grow_job("grow-token", "not-the-secret", "5000");
    // The members fail in their grow (their first all-reduce succeeded), the newcomer at its
    // token.
    for f in &done[..3] {
        let o = f.outcome();
        assert!(
            o.kind == "Check" && o.text.contains("grow_at") && o.text.contains("could not connect"),
            "{}: {o:?}",
            f.name
        );
    }
    let newcomer = done[3].outcome();
    assert!(
        newcomer.kind == "Connect" && newcomer.text.contains("job token"),
        "{newcomer:?}"
    );
}
