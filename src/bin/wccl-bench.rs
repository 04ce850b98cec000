//! `wccl-bench`: nccl-tests' `*_perf` for wccl. One subcommand per collective, nccl-tests' flags.
//!
//! ```text
//! wccl-bench all_reduce -b 8 -e 128M -f 2 -g 4 --algo ring,central,naive --plot busbw.svg
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use wccl::bench::{self, Settings};
use wccl::link::{LinkEmulation, LinkStack};
use wccl::model::{Figures, LinkCost, LinkModel, Probe, scaling_table};
use wccl::tp::MatmulKernel;
use wccl::{Algorithm, CollectiveKind, CommConfig, CommGroup, DType, ReduceOp};

#[derive(Parser)]
#[command(
    name = "wccl-bench",
    version,
    about = "nccl-tests-style collective benchmarks for wccl"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// all_reduce_perf
    #[command(name = "all_reduce")]
    AllReduce(Sweep),
    /// reduce_scatter_perf
    #[command(name = "reduce_scatter")]
    ReduceScatter(Sweep),
    /// all_gather_perf
    #[command(name = "all_gather")]
    AllGather(Sweep),
    /// broadcast_perf
    Broadcast(Sweep),
    /// reduce_perf
    Reduce(Sweep),
    /// Measure each rank's device (upload, read-back, copy, reduce kernel, step cost) and the
    /// host's reduce, alone and all ranks at once.
    Probe {
        /// Number of ranks (devices).
        #[arg(short = 'g', long = "ngpus", default_value_t = 4)]
        ranks: usize,
        /// Bytes per measurement.
        #[arg(short = 'b', long = "bytes", default_value = "16M", value_parser = bench::parse_size)]
        bytes: u64,
    },
    /// The matmul kernels' GFLOP/s on one device, beside the plain kernel, checked against an
    /// f64 host reference.
    Matmul {
        /// Sizes: a cube (512) or m x n x k (256x512x128), comma separated.
        #[arg(long = "sizes", default_value = "512")]
        sizes: String,
        /// Kernels, comma separated: plain, tiled, tiled-large, auto (the default's choice).
        #[arg(long = "kernel", default_value = "plain,tiled")]
        kernel: String,
        /// Element type: float, half or bfloat16.
        #[arg(short = 'd', long = "datatype", default_value = "float")]
        dtype: String,
        /// Timed iterations per size (the median is reported).
        #[arg(short = 'n', long = "iters", default_value_t = 5)]
        iters: usize,
        /// Warm-up iterations per size.
        #[arg(short = 'w', long = "warmup_iters", default_value_t = 1)]
        warmup: usize,
        /// Check results (0/1).
        #[arg(short = 'c', long = "check", default_value_t = 1)]
        check: u8,
    },
    /// The TCP link between two processes (this one and a copy of itself) against a raw
    /// loopback socket: an echo of `-n` chunks of `-b` bytes, `--window` in flight, with the
    /// link's CRC32C on and off; medians of `--reps`.
    #[command(name = "tcp-probe")]
    TcpProbe {
        /// Bytes per chunk (the link's frame payload).
        #[arg(short = 'b', long = "bytes", default_value = "4M", value_parser = bench::parse_size)]
        bytes: u64,
        /// Chunks per measurement.
        #[arg(short = 'n', long = "iters", default_value_t = 256)]
        iters: usize,
        /// Chunks in flight.
        #[arg(long = "window", default_value_t = 4)]
        window: usize,
        /// Repetitions (the median is reported).
        #[arg(long = "reps", default_value_t = 5)]
        reps: usize,
    },
    /// Rendezvous plus mesh connection time of N processes on this host (copies of this
    /// program), for each N; medians of `--reps`.
    #[command(name = "tcp-init")]
    TcpInit {
        /// Process counts, comma separated.
        #[arg(short = 'g', long = "ngpus", default_value = "2,4,8,16")]
        ranks: String,
        /// Repetitions per count.
        #[arg(long = "reps", default_value_t = 5)]
        reps: usize,
    },
    /// Availability arithmetic: the downtime `--nines` allow, the replicas `--node` needs to
    /// reach `--target`, or (with neither) the lecture's table and a training job's progress
    /// under failures for the fail-stop ring with checkpoints, the surviving ring and the
    /// replicated parameter server.
    Availability(AvailabilityArgs),
    /// The lecture's table of the parameter server against ring all-reduce, measured in one
    /// run: scalability (busbw, and the model at 1024 ranks), a dead worker, a 10x straggler,
    /// a dead server and a partition, every result checked; exits non-zero on a wrong result.
    Reliability(ReliabilityArgs),
    /// A fault campaign: random faults (kill, stall, delay, drop, duplicate, corrupt,
    /// partition, slow rank) injected into collectives, every result checked against an f64
    /// reference; exits non-zero on any hang or silently wrong result.
    Chaos {
        /// Faults to inject (one per trial).
        #[arg(long = "faults", default_value_t = 1000)]
        faults: usize,
        /// Seed of every random choice.
        #[arg(long = "seed", default_value_t = 1)]
        seed: u64,
        /// Every call's deadline, milliseconds.
        #[arg(long = "deadline-ms", default_value_t = 200)]
        deadline_ms: u64,
        /// Plant a bug to see the checks fail: unreported (errors swallowed) or wrong-element.
        #[arg(long = "plant", hide = true)]
        plant: Option<String>,
        /// No trials on real processes over TCP (they start copies of this program).
        #[arg(long = "no-processes")]
        no_processes: bool,
        /// Only these faults, a comma-separated list of kill, stall, delay, drop, duplicate,
        /// corrupt, partition, slow (default: all).
        #[arg(long = "fault")]
        fault: Option<String>,
        /// Only these calls, a comma-separated list of fail-stop, survivors, reduce_scatter,
        /// all_gather, broadcast, reduce, ps-strong, ps-eventual, processes (default: all).
        #[arg(long = "call")]
        call: Option<String>,
    },
    /// Predicted all-reduce busbw of ring, central, tree and halving-doubling over independent
    /// links, at scale; then the sizes where `auto` changes its choice on this machine (its
    /// ranks probed), with in-process links and over the given link.
    Model {
        /// Rank counts: a list (2,4,8) or a range of powers of two (2..1024).
        #[arg(long = "ranks", default_value = "2..1024")]
        ranks: String,
        /// Link bandwidth, GB/s.
        #[arg(long = "link-gbps", default_value_t = 25.0)]
        link_gbps: f64,
        /// Link latency, microseconds.
        #[arg(long = "link-latency-us", default_value_t = 5.0)]
        link_latency_us: f64,
        /// What a rank spends handling one message, microseconds (LogP's overhead).
        #[arg(long = "message-us", default_value_t = 1.0)]
        message_us: f64,
        /// Reduction rate per rank, GB/s (0: ignore the reduction).
        #[arg(long = "reduce-gbps", default_value_t = 0.0)]
        reduce_gbps: f64,
        /// Ranks on this machine to probe for the crossover sizes (0: skip the probe).
        #[arg(long = "here", default_value_t = 4)]
        here: usize,
        /// Bytes per probe transfer.
        #[arg(long = "probe-bytes", default_value = "4M", value_parser = bench::parse_size)]
        probe_bytes: u64,
        /// Bytes per rank.
        #[arg(short = 'b', long = "bytes", default_value = "256M", value_parser = bench::parse_size)]
        bytes: u64,
    },
}

#[derive(Args)]
struct ReliabilityArgs {
    /// Ring ranks and parameter-server workers (at least 3).
    #[arg(long = "ranks", default_value_t = 4)]
    ranks: usize,
    /// Training steps of each run (the faults come halfway; at least 4).
    #[arg(long = "steps", default_value_t = 20)]
    steps: u64,
    /// The gradient's size.
    #[arg(long = "grad", default_value = "256K", value_parser = bench::parse_size)]
    grad: u64,
    /// A healthy rank's compute per step, milliseconds (the straggler's is 10x).
    #[arg(long = "compute-ms", default_value_t = 20)]
    compute_ms: u64,
    /// Every call's deadline, milliseconds.
    #[arg(long = "deadline-ms", default_value_t = 1000)]
    deadline_ms: u64,
    /// The scalability row's all-reduce size.
    #[arg(short = 'b', long = "bytes", default_value = "16M", value_parser = bench::parse_size)]
    bytes: u64,
    /// The scalability row's measured rank counts.
    #[arg(long = "scale-ranks", default_value = "4,8")]
    scale_ranks: String,
    /// Timed iterations per scalability measurement.
    #[arg(short = 'n', long = "iters", default_value_t = 3)]
    iters: usize,
    /// The scalability row's modelled rank count.
    #[arg(long = "model-ranks", default_value_t = 1024)]
    model_ranks: usize,
    /// The model's link bandwidth, GB/s.
    #[arg(long = "link-gbps", default_value_t = 25.0)]
    link_gbps: f64,
    /// The model's link latency, microseconds.
    #[arg(long = "link-latency-us", default_value_t = 5.0)]
    link_latency_us: f64,
    /// Rows to run, comma-separated: scalability, dead-worker, straggler, dead-server,
    /// partition (all by default).
    #[arg(long = "only")]
    only: Option<String>,
    /// Plant a bug to see the checks fail: wrong-element.
    #[arg(long = "plant", hide = true)]
    plant: Option<String>,
}

#[derive(Args)]
struct AvailabilityArgs {
    /// Print the downtime a year that this many nines allow (4: 52.56 minutes).
    #[arg(long)]
    nines: Option<f64>,
    /// Each replica's availability (with --target: the replicas needed).
    #[arg(long, requires = "target")]
    node: Option<f64>,
    /// The availability wanted from independent replicas of --node.
    #[arg(long, requires = "node")]
    target: Option<f64>,
    /// Job sizes for the job model: a list (64,1024) or a range of powers of two (8..65536).
    #[arg(long = "ranks", default_value = "8..131072")]
    ranks: String,
    /// Each rank's (and server's) mean time between failures, hours.
    #[arg(long = "mtbf-hours", default_value_t = 50_000.0)]
    mtbf_hours: f64,
    /// One training step, seconds.
    #[arg(long = "step-s", default_value_t = 1.0)]
    step_s: f64,
    /// Fail-stop ring: writing one checkpoint, seconds.
    #[arg(long = "checkpoint-s", default_value_t = 60.0)]
    checkpoint_s: f64,
    /// Fail-stop ring: seconds of work between checkpoints (default: Young's optimum).
    #[arg(long = "interval-s")]
    interval_s: Option<f64>,
    /// Fail-stop ring: relaunching the job and loading its checkpoint, seconds.
    #[arg(long = "restart-s", default_value_t = 600.0)]
    restart_s: f64,
    /// Surviving ring: a recovery, seconds (detection by the call's deadline plus the
    /// agreement and shrink; `wccl-bench chaos` and benches/survive.rs measure the latter).
    #[arg(long = "recovery-s", default_value_t = 1.051)]
    recovery_s: f64,
    /// Surviving ring: survive mode's own cost per step, as a fraction of the step.
    #[arg(long = "survive-overhead", default_value_t = 0.0)]
    survive_overhead: f64,
    /// Parameter server: one server per this many ranks.
    #[arg(long = "ranks-per-server", default_value_t = 8)]
    ranks_per_server: u32,
    /// Parameter server: how long the servers wait for a dead worker, seconds.
    #[arg(long = "deadline-s", default_value_t = 1.0)]
    deadline_s: f64,
    /// Parameter server: a dead server's failover, seconds.
    #[arg(long = "failover-s", default_value_t = 0.4)]
    failover_s: f64,
    /// Check every closed form by simulating this many failures (0: no check); exits non-zero
    /// when one differs by more than 1%.
    #[arg(long = "simulate", default_value_t = 0)]
    simulate: u64,
    /// The simulation's seed.
    #[arg(long = "seed", default_value_t = 1)]
    seed: u64,
    /// Draw the progress of each scheme against the ranks into this SVG.
    #[arg(long = "plot")]
    plot: Option<std::path::PathBuf>,
}

#[derive(Args)]
struct Sweep {
    /// Minimum size in bytes (K/M/G suffixes).
    #[arg(short = 'b', long = "minbytes", default_value = "32M", value_parser = bench::parse_size)]
    min_bytes: u64,
    /// Maximum size in bytes.
    #[arg(short = 'e', long = "maxbytes", default_value = "32M", value_parser = bench::parse_size)]
    max_bytes: u64,
    /// Multiplication factor between sizes.
    #[arg(short = 'f', long = "stepfactor", default_value_t = 2)]
    step_factor: u64,
    /// Fixed increment between sizes (overrides -f when not 0).
    #[arg(short = 'i', long = "stepbytes", default_value = "0", value_parser = bench::parse_size)]
    step_bytes: u64,
    /// Number of ranks (devices).
    #[arg(short = 'g', long = "ngpus", default_value_t = 4)]
    ranks: usize,
    /// Timed iterations per size.
    #[arg(short = 'n', long = "iters", default_value_t = 20)]
    iters: usize,
    /// Warm-up iterations per size.
    #[arg(short = 'w', long = "warmup_iters", default_value_t = 5)]
    warmup: usize,
    /// Check results (0/1).
    #[arg(short = 'c', long = "check", default_value_t = 1)]
    check: u8,
    /// Reduction operator: sum, prod, min, max, avg, all.
    #[arg(short = 'o', long = "op", default_value = "sum")]
    op: String,
    /// Element type: float, half, bfloat16, int32, uint32 (f32, f16, bf16, i32, u32 also
    /// accepted).
    #[arg(short = 'd', long = "datatype", default_value = "float")]
    dtype: String,
    /// Root rank of broadcast and reduce.
    #[arg(short = 'r', long = "root", default_value_t = 0)]
    root: usize,
    /// Deadline of each call, seconds.
    #[arg(short = 'T', long = "timeout", default_value_t = 30)]
    timeout: u64,
    /// All-reduce algorithms, comma separated: ring, central, naive, staged (the host-staged
    /// ring), hd (recursive halving-doubling), staged-hd (halving-doubling on host memory),
    /// auto, ps (through the parameter server, on one more rank), all. For reduce_scatter and
    /// all_gather, staged runs them on host memory, auto as the model chooses, and every other
    /// one the device ring.
    #[arg(long = "algo", default_value = "ring")]
    algo: String,
    /// Also write the rows as CSV to this file.
    #[arg(long = "csv")]
    csv: Option<PathBuf>,
    /// Draw busbw against size, one line per algorithm, into this SVG file.
    #[arg(long = "plot")]
    plot: Option<PathBuf>,
    /// Pipeline slice in bytes.
    #[arg(long = "slice", default_value = "4M", value_parser = bench::parse_size)]
    slice: u64,
    /// Emulate links between ranks: egress bandwidth per rank, GB/s (0: no emulation).
    #[arg(long = "link-gbps", default_value_t = 0.0)]
    link_gbps: f64,
    /// Emulated link latency, microseconds.
    #[arg(long = "link-latency-us", default_value_t = 0.0)]
    link_latency_us: f64,
    /// Emulated link jitter (uniform, up to), microseconds.
    #[arg(long = "link-jitter-us", default_value_t = 0.0)]
    link_jitter_us: f64,
    /// Bytes per probe measurement for the cost model (all_reduce, reduce_scatter and
    /// all_gather; 0 skips the probe, the model column and auto's choice, which is then the
    /// ring).
    #[arg(long = "probe-bytes", default_value = "16M", value_parser = bench::parse_size)]
    probe_bytes: u64,
    /// Corrupt one element of rank 0's result before checking (to test the checker).
    #[arg(long = "corrupt-one", hide = true)]
    corrupt_one: bool,
    /// Under a launcher (one rank per process over TCP): turn the frames' CRC32C off.
    #[arg(long = "no-crc")]
    no_crc: bool,
    /// Tensors without map usages, as a framework would allocate them: on a CPU adapter the
    /// host-staged ring then stages through staging buffers instead of working in the tensors.
    #[arg(long = "no-map")]
    no_map: bool,
    /// Damage rank 0's result before checking: `one`, `misplace:N` (a chunk N elements off) or
    /// `swap` (another rank's chunk); to test the checker.
    #[arg(long = "corrupt", hide = true, value_parser = parse_corrupt)]
    corrupt: Option<bench::Corrupt>,
}

fn parse_corrupt(s: &str) -> Result<bench::Corrupt, String> {
    match s.split_once(':') {
        None if s == "one" => Ok(bench::Corrupt::One),
        None if s == "swap" => Ok(bench::Corrupt::Swap),
        Some(("misplace", by)) => by
            .parse()
            .map(|by| bench::Corrupt::Misplace { by })
            .map_err(|e| format!("misplace:{by}: {e}")),
        _ => Err(format!("'{s}': expected one, swap or misplace:N")),
    }
}

fn parse_ops(s: &str) -> Result<Vec<ReduceOp>, String> {
    if s == "all" {
        return Ok(ReduceOp::ALL.to_vec());
    }
    ReduceOp::ALL
        .iter()
        .find(|o| o.to_string() == s)
        .map(|o| vec![*o])
        .ok_or_else(|| format!("unknown op '{s}' (sum, prod, min, max, avg, all)"))
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "float" | "f32" | "float32" => Ok(DType::F32),
        "half" | "f16" | "float16" => Ok(DType::F16),
        "bfloat16" | "bf16" => Ok(DType::BF16),
        "int32" | "i32" | "int" => Ok(DType::I32),
        "uint32" | "u32" => Ok(DType::U32),
        _ => Err(format!(
            "unknown type '{s}' (float, half, bfloat16, int32, uint32)"
        )),
    }
}

/// Probes `ranks` ranks on this machine and prints where `auto`'s all-reduce choice changes,
/// from 4 B to 1 GiB (powers of two, out of place), with in-process links and over `link`.
fn write_crossovers(
    ranks: usize,
    probe_bytes: usize,
    link: LinkCost,
) -> Result<(), bench::BenchError> {
    let mut group = CommGroup::builder().ranks(ranks).build()?;
    let probe = group.probe(probe_bytes)?;
    let model = group
        .comm(0)
        .cost_model()
        .cloned()
        .ok_or("the probe installed no cost model")?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "# auto on this machine: {ranks} ranks on {} (shared adapter: {}, unified memory: {})",
        group.adapters().first().map_or("?", |a| a.name.as_str()),
        probe.shared,
        model.unified_memory()
    )?;
    let sizes: Vec<usize> = (2..=30).map(|k| 1usize << k).collect();
    let over = model.clone().with_link(Some(link));
    let links = format!("{} GB/s, {} us links", link.gbps, link.latency_us);
    // Devices that keep tensors apart from the host (every discrete GPU) choose among the
    // device algorithms; the same figures show where those cross over.
    let plain = over.clone().with_unified_memory(false);
    let plain_links = format!("{links}, tensors apart from the host");
    for (name, m) in [
        ("in-process links", &model),
        (links.as_str(), &over),
        (plain_links.as_str(), &plain),
    ] {
        let line: Vec<String> = m
            .crossovers(&sizes, false)
            .iter()
            .map(|(b, a)| format!("{a} from {}", human(*b)))
            .collect();
        writeln!(out, "#  {name}: {}", line.join(", "))?;
    }
    Ok(())
}

/// A size in the largest binary unit that divides it.
fn human(b: usize) -> String {
    let units = [(30, "GiB"), (20, "MiB"), (10, "KiB")];
    units
        .iter()
        .find(|(k, _)| b >= 1 << k && b.is_multiple_of(1 << k))
        .map_or(format!("{b} B"), |(k, u)| format!("{} {u}", b >> k))
}

/// The collective algorithms asked for, and whether `ps` is among them.
fn parse_algos(s: &str) -> Result<(Vec<Algorithm>, bool), String> {
    if s == "all" {
        let all = vec![
            Algorithm::Ring,
            Algorithm::Central,
            Algorithm::Naive,
            Algorithm::Staged,
            Algorithm::HalvingDoubling,
            Algorithm::StagedHalvingDoubling,
            Algorithm::Auto,
        ];
        return Ok((all, true));
    }
    let ps = s.split(',').any(|a| a.trim() == "ps");
    let algos = s
        .split(',')
        .map(str::trim)
        .filter(|a| *a != "ps")
        .map(|a| {
            a.parse()
                .map_err(|e: wccl::ParseAlgorithmError| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((algos, ps))
}

fn parse_ranks(s: &str) -> Result<Vec<usize>, String> {
    let bad = || format!("'{s}' is not a rank list (2,4,8) or range (2..1024)");
    if let Some((lo, hi)) = s.split_once("..") {
        let (lo, hi): (usize, usize) = (
            lo.parse().map_err(|_| bad())?,
            hi.parse().map_err(|_| bad())?,
        );
        let mut v = Vec::new();
        let mut n = lo.max(2);
        while n <= hi {
            v.push(n);
            // Checked: a bound near usize::MAX must end the doubling, not wrap it to 0.
            match n.checked_mul(2) {
                Some(next) => n = next,
                None => break,
            }
        }
        return Ok(v);
    }
    s.split(',')
        .map(|x| x.trim().parse().map_err(|_| bad()))
        .collect()
}

fn chaos(
    faults: usize,
    seed: u64,
    deadline_ms: u64,
    plant: Option<&str>,
    no_processes: bool,
    fault: Option<&str>,
    call: Option<&str>,
) -> Result<ExitCode, bench::BenchError> {
    use wccl::bench::chaos::{ChaosSettings, Fault, Plant, Target};
    fn list<T>(
        flag: &str,
        s: Option<&str>,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Vec<T>, bench::BenchError> {
        s.map_or(Ok(Vec::new()), |s| {
            s.split(',')
                .map(|x| {
                    parse(x.trim())
                        .ok_or_else(|| format!("{flag} {x}: not one of its names").into())
                })
                .collect()
        })
    }
    let kinds = list("--fault", fault, Fault::from_key)?;
    let targets = list("--call", call, Target::from_key)?;
    let plant = match plant {
        None => None,
        Some("unreported") => Some(Plant::Unreported),
        Some("wrong-element") => Some(Plant::WrongElement),
        Some(other) => {
            return Err(format!("--plant {other}: expected unreported or wrong-element").into());
        }
    };
    if deadline_ms == 0 {
        return Err("--deadline-ms must be at least 1".into());
    }
    let settings = ChaosSettings {
        faults,
        seed,
        deadline: Duration::from_millis(deadline_ms),
        plant,
        targets,
        kinds,
        // This program is the child of the campaign's trials on processes.
        // (Unix only: the campaign stops processes with SIGSTOP.)
        program: if no_processes || !cfg!(unix) {
            None
        } else {
            Some(std::env::current_exe()?)
        },
    };
    let report = wccl::bench::chaos::run(&settings, &mut std::io::stdout())?;
    print!("{}", report.summary());
    Ok(if report.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn reliability(a: &ReliabilityArgs) -> Result<ExitCode, bench::BenchError> {
    use wccl::bench::reliability::{Aspect, ReliabilitySettings, run};
    let len = usize::try_from(a.grad / 4).map_err(|_| "--grad is too large")?;
    let only = match &a.only {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|x| {
                Aspect::parse(x.trim()).ok_or_else(|| {
                    format!("--only: '{x}' is not one of scalability, dead-worker, straggler, dead-server, partition")
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let plant = match a.plant.as_deref() {
        None => false,
        Some("wrong-element") => true,
        Some(other) => return Err(format!("--plant: '{other}' is not wrong-element").into()),
    };
    let s = ReliabilitySettings {
        ranks: a.ranks,
        steps: a.steps,
        len,
        compute: Duration::from_millis(a.compute_ms),
        deadline: Duration::from_millis(a.deadline_ms),
        scale_bytes: a.bytes,
        scale_ranks: parse_ranks(&a.scale_ranks)?,
        scale_iters: a.iters,
        model_ranks: a.model_ranks,
        link: LinkModel {
            gbps: a.link_gbps,
            latency_us: a.link_latency_us,
            message_us: 0.0,
            reduce_gbps: None,
        },
        only,
        plant,
        ..ReliabilitySettings::default()
    };
    let report = run(&s, &mut std::io::stderr())?;
    print!("{}", report.render());
    Ok(if report.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn availability(a: &AvailabilityArgs) -> Result<ExitCode, bench::BenchError> {
    use wccl::availability::job::JobModel;
    use wccl::availability::report;
    if let Some(n) = a.nines {
        println!("{}", report::nines_line(n)?);
    }
    if let (Some(node), Some(target)) = (a.node, a.target) {
        println!("{}", report::replicas_line(node, target)?);
    }
    if a.nines.is_some() || a.node.is_some() {
        return Ok(ExitCode::SUCCESS);
    }
    let ranks = parse_ranks(&a.ranks)?;
    if ranks.is_empty() {
        return Err(format!("--ranks {}: no job size in it", a.ranks).into());
    }
    let ranks = ranks
        .into_iter()
        .map(|r| u32::try_from(r).map_err(|_| format!("{r} ranks: at most {}", u32::MAX)))
        .collect::<Result<Vec<u32>, String>>()?;
    let model = JobModel {
        ranks: 1,
        mtbf: a.mtbf_hours * 3600.0,
        step: a.step_s,
        checkpoint: a.checkpoint_s,
        checkpoint_interval: a.interval_s,
        restart: a.restart_s,
        recovery: a.recovery_s,
        survive_overhead: a.survive_overhead,
        servers: 1,
        worker_deadline: a.deadline_s,
        failover: a.failover_s,
    };
    print!("{}", report::lecture_table()?);
    let rows = report::job_rows(&model, &ranks, a.ranks_per_server, a.simulate, a.seed)?;
    print!("{}", report::job_table(&model, a.ranks_per_server, &rows));
    if let Some(path) = &a.plot {
        bench::plot_progress(&rows, "progress of a training job under failures", path)?;
        println!("# plot: {}", path.display());
    }
    if a.simulate > 0 {
        let (progress, loss) = rows
            .iter()
            .map(|r| r.worst_difference())
            .fold((0.0, 0.0), |(p, l), (dp, dl)| {
                (f64::max(p, dp), f64::max(l, dl))
            });
        let ok = rows.iter().all(|r| r.agrees(a.simulate));
        println!(
            "# simulation ({} failures per cell, seed {}): worst difference {:.3}% in progress \
             (within 1%), {:.2}% in loss (within {:.2}%): {}",
            a.simulate,
            a.seed,
            progress * 100.0,
            loss * 100.0,
            report::loss_tolerance(a.simulate) * 100.0,
            if ok { "agrees" } else { "DISAGREES" }
        );
        if !ok {
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn write_probe(out: &mut dyn Write, p: &Probe) -> std::io::Result<()> {
    let gb = |x: f64| x / 1e9;
    writeln!(
        out,
        "# probe ({} B per measurement, {}; {}):",
        p.bytes,
        if p.cached_bytes() < p.bytes {
            format!("host_c on {} B in cache", p.cached_bytes())
        } else {
            "host_c not measured (the probe is in cache)".to_string()
        },
        if p.shared {
            "ranks share an adapter"
        } else {
            "one adapter per rank"
        }
    )?;
    writeln!(
        out,
        "#  {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "",
        "upload",
        "readback",
        "copy",
        "reduce",
        "host_red",
        "host_c",
        "step",
        "launch",
        "frame",
        "call",
        "submit",
        "wait"
    )?;
    writeln!(
        out,
        "#  {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "", "GB/s", "GB/s", "GB/s", "GB/s", "GB/s", "GB/s", "us", "us", "us", "us", "us", "us"
    )?;
    let mut line = |name: String, f: &Figures| {
        writeln!(
            out,
            "#  {:>10} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            name,
            gb(f.upload),
            gb(f.readback),
            gb(f.copy),
            gb(f.reduce),
            gb(f.host_reduce),
            gb(f.host_cached),
            f.step * 1e6,
            f.launch * 1e6,
            f.frame * 1e6,
            f.call * 1e6,
            f.submit * 1e6,
            f.wait * 1e6
        )
    };
    for (r, f) in p.alone.iter().enumerate() {
        line(format!("rank {r}"), f)?;
    }
    line("together".into(), &p.together)
}

fn probe(ranks: usize, bytes: usize) -> Result<ExitCode, bench::BenchError> {
    let mut group = CommGroup::builder().ranks(ranks).build()?;
    let mut out = std::io::stdout().lock();
    for (r, info) in group.adapters().iter().enumerate() {
        // The bus id tells two identical GPUs apart (and shows when ranks share one).
        let bus = if info.device_pci_bus_id.is_empty() {
            "unknown"
        } else {
            info.device_pci_bus_id.as_str()
        };
        writeln!(
            out,
            "#  rank {r}: {} ({:?}, {:?}, bus {bus})",
            info.name, info.backend, info.device_type
        )?;
    }
    let p = group.probe(bytes)?;
    write_probe(&mut out, &p)?;
    // The reduce kernel against the adapter's own buffer copy, counting bytes read and
    // written (reduce reads 2 and writes 1 per element; a copy reads 1 and writes 1).
    for (r, f) in p.alone.iter().enumerate() {
        writeln!(
            out,
            "# rank {r}: reduce kernel traffic {:.3} GB/s = {:.0}% of copy_buffer_to_buffer traffic {:.3} GB/s",
            3.0 * f.reduce / 1e9,
            100.0 * 1.5 * f.reduce / f.native_copy.max(1.0),
            2.0 * f.native_copy / 1e9
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn matmul(
    sizes: &str,
    kernels: &str,
    dtype: &str,
    iters: usize,
    warmup: usize,
    check: bool,
) -> Result<ExitCode, bench::BenchError> {
    let shapes = sizes
        .split(',')
        .map(bench::parse_shape)
        .collect::<Result<Vec<_>, _>>()?;
    let kernels = kernels
        .split(',')
        .map(|k| match k.trim() {
            "plain" => Ok(MatmulKernel::Plain),
            "tiled" => Ok(MatmulKernel::Tiled),
            "tiled-large" => Ok(MatmulKernel::TiledLarge),
            "auto" => Ok(MatmulKernel::Auto),
            other => Err(format!(
                "unknown kernel '{other}' (plain, tiled, tiled-large, auto)"
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let dtype = parse_dtype(dtype)?;
    if !dtype.is_float() {
        return Err(format!("matmul runs on float, half and bfloat16, not {dtype}").into());
    }
    let group = CommGroup::builder().ranks(1).build()?;
    let mut out = std::io::stdout().lock();
    let info = &group.adapters()[0];
    writeln!(
        out,
        "# wccl-bench matmul on {} ({:?}, {:?}, driver {}), {iters} iters, {warmup} warm-up",
        info.name, info.backend, info.device_type, info.driver_info
    )?;
    let rows = bench::matmul_rows(
        group.comm(0),
        &shapes,
        &kernels,
        dtype,
        iters,
        warmup,
        check,
        &mut out,
    )?;
    // The correctness targets: 1e-5 for f32, 1e-2 for f16 and bf16 (bf16 rounds each output
    // by up to 2^-8 relative).
    let limit = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
    let wrong = rows
        .iter()
        .filter(|r| r.rel_err.is_some_and(|e| e >= limit))
        .count();
    writeln!(out, "# rows over the {limit:e} error limit: {wrong}")?;
    Ok(if wrong == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn main() -> ExitCode {
    quiet_headless_vulkan();
    // A rank of a `chaos` trial on real processes.
    if let Ok(spec) = std::env::var(wccl::bench::chaos::procs::CHILD_VAR) {
        return ExitCode::from(wccl::bench::chaos::procs::child(&spec));
    }
    // A copy of this program started by `tcp-probe` or `tcp-init` as the other processes.
    if let Ok(spec) = std::env::var(TCP_CHILD) {
        return match tcp_child(&spec) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("wccl-bench (child): {e}");
                ExitCode::from(2)
            }
        };
    }
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wccl-bench: {e}");
            ExitCode::from(2)
        }
    }
}

/// On a machine without a desktop session (`XDG_RUNTIME_DIR` unset), turns off Mesa's Vulkan
/// device-select layer, unless the environment already decides: the layer looks for a Wayland
/// compositor in every adapter enumeration, and libwayland then prints
/// "error: XDG_RUNTIME_DIR is invalid or not set" into the benchmark's output. The layer only
/// reorders adapters, which wccl orders itself.
fn quiet_headless_vulkan() {
    let headless = std::env::var_os("XDG_RUNTIME_DIR").is_none_or(|d| d.is_empty());
    if headless && std::env::var_os("NODEVICE_SELECT").is_none() {
        // SAFETY: called first thing in `main`, before any thread exists, so nothing reads the
        // environment while it changes.
        unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
    }
}

fn run(cli: Cli) -> Result<ExitCode, bench::BenchError> {
    let (kind, a) = match cli.command {
        Command::AllReduce(a) => (CollectiveKind::AllReduce, a),
        Command::ReduceScatter(a) => (CollectiveKind::ReduceScatter, a),
        Command::AllGather(a) => (CollectiveKind::AllGather, a),
        Command::Broadcast(a) => (CollectiveKind::Broadcast, a),
        Command::Reduce(a) => (CollectiveKind::Reduce, a),
        Command::Probe { ranks, bytes } => return probe(ranks, bytes as usize),
        Command::TcpProbe {
            bytes,
            iters,
            window,
            reps,
        } => return tcp_probe(bytes as usize, iters, window, reps),
        Command::TcpInit { ranks, reps } => return tcp_init(&parse_ranks(&ranks)?, reps),
        Command::Matmul {
            sizes,
            kernel,
            dtype,
            iters,
            warmup,
            check,
        } => return matmul(&sizes, &kernel, &dtype, iters, warmup, check != 0),
        Command::Availability(a) => return availability(&a),
        Command::Reliability(a) => return reliability(&a),
        Command::Chaos {
            faults,
            seed,
            deadline_ms,
            plant,
            no_processes,
            fault,
            call,
        } => {
            return chaos(
                faults,
                seed,
                deadline_ms,
                plant.as_deref(),
                no_processes,
                fault.as_deref(),
                call.as_deref(),
            );
        }
        Command::Model {
            ranks,
            link_gbps,
            link_latency_us,
            message_us,
            reduce_gbps,
            here,
            probe_bytes,
            bytes,
        } => {
            let positive = |name: &str, v: f64| {
                if v.is_finite() && v > 0.0 {
                    Ok(())
                } else {
                    Err(format!("{name} must be a positive number, not {v}"))
                }
            };
            positive("--link-gbps", link_gbps)?;
            for (name, v) in [
                ("--link-latency-us", link_latency_us),
                ("--message-us", message_us),
                ("--reduce-gbps", reduce_gbps),
            ] {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(format!("{name} must be a number at least 0, not {v}").into());
                }
            }
            let link = LinkModel {
                gbps: link_gbps,
                latency_us: link_latency_us,
                message_us,
                reduce_gbps: (reduce_gbps > 0.0).then_some(reduce_gbps),
            };
            print!(
                "{}",
                scaling_table(&parse_ranks(&ranks)?, bytes as f64, &link)
            );
            if here > 0 {
                let cost = LinkCost {
                    gbps: link_gbps,
                    latency_us: link_latency_us,
                };
                // The table stands on its own: a machine with no adapter still gets it.
                if let Err(e) = write_crossovers(here, probe_bytes as usize, cost) {
                    println!("# auto on this machine: not probed ({e})");
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    let (algos, with_ps) = parse_algos(&a.algo)?;
    let settings = Settings {
        kind,
        sizes: bench::size_steps(a.min_bytes, a.max_bytes, a.step_factor, a.step_bytes),
        iters: a.iters,
        warmup: a.warmup,
        check: a.check != 0,
        ops: parse_ops(&a.op)?,
        dtype: parse_dtype(&a.dtype)?,
        root: a.root,
        timeout: Duration::from_secs(a.timeout),
        algos: algos.clone(),
        corrupt: a.corrupt.or(a.corrupt_one.then_some(bench::Corrupt::One)),
        link: (a.link_gbps > 0.0).then_some(LinkEmulation {
            gbps: a.link_gbps,
            latency_us: a.link_latency_us,
            jitter_us: a.link_jitter_us,
        }),
        no_map: a.no_map,
    };
    let config = CommConfig::default()
        .timeout(settings.timeout)
        .slice_bytes(a.slice as usize);
    // Under mpirun, torchrun or srun: one rank per process over TCP, as nccl-tests built with
    // MPI=1 runs.
    if wccl::rendezvous::env::launched(&wccl::rendezvous::env::environment()?) {
        if settings.link.is_some() {
            return Err("--link-gbps emulates links between the ranks of one process; under a launcher the links are real TCP".into());
        }
        return launched(kind, &a, &settings, config);
    }
    let links = match settings.link {
        Some(emu) => LinkStack::new().emulate(emu),
        None => LinkStack::new(),
    };
    let mut group = CommGroup::builder()
        .ranks(a.ranks)
        .config(config)
        .links(links)
        .build()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "# wccl-bench {kind}: {} ranks", a.ranks)?;
    for (r, info) in group.adapters().iter().enumerate() {
        writeln!(
            out,
            "#  rank {r}: {} ({:?}, {:?}, driver {})",
            info.name, info.backend, info.device_type, info.driver_info
        )?;
    }
    write_sweep_line(&mut out, &a, &settings)?;
    let modelled = matches!(
        kind,
        CollectiveKind::AllReduce | CollectiveKind::ReduceScatter | CollectiveKind::AllGather
    );
    if modelled && a.probe_bytes > 0 {
        let p = group.probe(a.probe_bytes as usize)?;
        write_probe(&mut out, &p)?;
    }
    if let Some(l) = settings.link {
        writeln!(
            out,
            "# emulated links: {} GB/s egress per rank, {} us latency, {} us jitter",
            l.gbps, l.latency_us, l.jitter_us
        )?;
    }
    writeln!(out, "#")?;
    let mut rows = if settings.algos.is_empty() {
        Vec::new()
    } else {
        bench::run(&mut group, &settings, &mut out)?
    };
    if with_ps && kind == CollectiveKind::AllReduce {
        writeln!(
            out,
            "# ps: {} workers and 1 server rank, Sync, push + aggregate + pull (avg), f32",
            a.ranks
        )?;
        let ps = bench::ps_rows(
            a.ranks,
            &settings.sizes,
            a.iters,
            a.warmup,
            settings.check,
            settings.timeout,
        )?;
        for r in &ps {
            writeln!(out, "{}", bench::format_row(r))?;
        }
        writeln!(out, "{}", bench::footer(&ps))?;
        rows.extend(ps);
    }
    if let Some(path) = &a.csv {
        let mut text = String::from(bench::CSV_HEADER);
        text.push('\n');
        for r in &rows {
            text.push_str(&bench::csv_row(r));
            text.push('\n');
        }
        std::fs::write(path, text)?;
    }
    if let Some(path) = &a.plot {
        let title = format!("{kind} busbw, {} ranks, {}", a.ranks, settings.dtype);
        bench::plot_busbw(&rows, &title, path)?;
    }
    let wrong: u64 = rows
        .iter()
        .map(|r| r.out_of_place.wrong + r.in_place.wrong)
        .sum();
    Ok(if wrong == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The sweep's settings line of the table's header.
fn write_sweep_line(out: &mut dyn Write, a: &Sweep, settings: &Settings) -> std::io::Result<()> {
    writeln!(
        out,
        "# sizes {}..{} B, iters {}, warmup {}, check {}, type {}, op {}, root {}, timeout {} s, algo {}, slice {} B",
        a.min_bytes,
        a.max_bytes,
        a.iters,
        a.warmup,
        a.check,
        settings.dtype,
        a.op,
        a.root,
        a.timeout,
        a.algo,
        a.slice
    )
}

/// The environment variable that makes this program a child of `tcp-probe` or `tcp-init`.
const TCP_CHILD: &str = "WCCL_BENCH_TCP_CHILD";

/// One rank per process: joins the job from the launcher's variables and runs the sweep on
/// this rank; rank 0 prints the table (times are the slowest rank's, `#wrong` is summed).
fn launched(
    kind: CollectiveKind,
    a: &Sweep,
    settings: &Settings,
    config: CommConfig,
) -> Result<ExitCode, bench::BenchError> {
    let mut options = wccl::ConnectOptions {
        config,
        ..Default::default()
    };
    options.tcp.checksums = !a.no_crc;
    let t = Instant::now();
    let comm = wccl::Communicator::from_env_with(options)?;
    let joined = t.elapsed();
    let (rank, size) = (comm.rank(), comm.size());
    let stdout = std::io::stdout();
    let mut out: Box<dyn Write> = if rank == 0 {
        Box::new(stdout.lock())
    } else {
        Box::new(std::io::sink())
    };
    let info = comm.device().info().clone();
    writeln!(
        out,
        "# wccl-bench {kind}: {size} ranks, one per process, over TCP (CRC32C {}); joined in {:.1} ms",
        if a.no_crc { "off" } else { "on" },
        joined.as_secs_f64() * 1e3
    )?;
    writeln!(
        out,
        "#  rank 0: {} ({:?}, {:?}, driver {})",
        info.name, info.backend, info.device_type, info.driver_info
    )?;
    write_sweep_line(&mut out, a, settings)?;
    let mut comm = comm;
    let modelled = matches!(
        kind,
        CollectiveKind::AllReduce | CollectiveKind::ReduceScatter | CollectiveKind::AllGather
    );
    if modelled && a.probe_bytes > 0 {
        // Every rank probes (a collective); the model's link terms come from the real links.
        let bytes = usize::try_from(a.probe_bytes).map_err(|_| "--probe-bytes is too large")?;
        let p = comm.probe(bytes)?;
        write_probe(&mut out, &p)?;
        if let Some(l) = comm.cost_model().and_then(|m| m.link()) {
            writeln!(
                out,
                "# links, measured: {:.3} GB/s egress per rank, {:.1} us a message",
                l.gbps, l.latency_us
            )?;
        }
    }
    writeln!(out, "#")?;
    let mut one = bench::OneRank(comm);
    let rows = bench::run(&mut one, settings, &mut out)?;
    let wrong: u64 = rows
        .iter()
        .map(|r| r.out_of_place.wrong + r.in_place.wrong)
        .sum();
    Ok(if wrong > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// What a child of `tcp-probe`/`tcp-init` does: `probe;RAW_ADDR;STORE_PORT;BYTES;ITERS;REPS` or
/// `init;RANK;SIZE;STORE_PORT;JOB`.
fn tcp_child(spec: &str) -> Result<(), bench::BenchError> {
    let f: Vec<&str> = spec.split(';').collect();
    match f.as_slice() {
        ["probe", raw, port, bytes, iters, reps] => {
            let (bytes, iters, reps): (usize, usize, usize) =
                (bytes.parse()?, iters.parse()?, reps.parse()?);
            let port: u16 = port.parse()?;
            for rep in 0..reps {
                let s = std::net::TcpStream::connect(raw)?;
                bench::tcp::raw_echo_serve(s, bytes)?;
                for crc in [true, false] {
                    let link = child_link(1, 2, port, &format!("probe-{rep}-{crc}"), crc)?;
                    bench::tcp::link_echo_serve(&link, 0, iters)
                        .map_err(|e| format!("link echo: {e:?}"))?;
                }
            }
            Ok(())
        }
        ["init", rank, size, port, job] => {
            let t = Instant::now();
            let link = child_link(rank.parse()?, size.parse()?, port.parse()?, job, true)?;
            // The parent reads each rank's own connect time from its output.
            println!("connected {:.3} ms", t.elapsed().as_secs_f64() * 1e3);
            drop(link);
            Ok(())
        }
        _ => Err(format!("{TCP_CHILD}={spec:?} is not a child's task").into()),
    }
}

fn child_link(
    rank: usize,
    size: usize,
    port: u16,
    job: &str,
    checksums: bool,
) -> wccl::Result<wccl::link::TcpLink> {
    let o = wccl::link::TcpOptions {
        job: job.to_string(),
        checksums,
        timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let master = wccl::rendezvous::Master::Tcp {
        host: "127.0.0.1".into(),
        port,
        from: "wccl-bench",
    };
    wccl::rendezvous::connect_link(rank, size, &master, &o)
}

/// A free loopback port (bound and released: the child binds it again at once).
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Kills a child on every exit path.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn tcp_probe(
    bytes: usize,
    iters: usize,
    window: usize,
    reps: usize,
) -> Result<ExitCode, bench::BenchError> {
    let (bytes, iters, reps) = (bytes.max(1), iters.max(1), reps.max(1));
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let raw = listener.local_addr()?;
    let port = free_port()?;
    let child = std::process::Command::new(std::env::current_exe()?)
        .env(
            TCP_CHILD,
            format!("probe;{raw};{port};{bytes};{iters};{reps}"),
        )
        .spawn()?;
    let _child = Reaped(child);
    let (mut raw_s, mut on_s, mut off_s) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps {
        let (s, _) = listener.accept()?;
        raw_s.push(bench::tcp::raw_echo_send(s, bytes, iters, window)?);
        for crc in [true, false] {
            let link = child_link(0, 2, port, &format!("probe-{rep}-{crc}"), crc)?;
            let secs = bench::tcp::link_echo_send(&link, 1, bytes, iters, window)
                .map_err(|e| format!("link echo: {e:?}"))?;
            if crc {
                on_s.push(secs);
            } else {
                off_s.push(secs);
            }
        }
    }
    let total = (bytes * iters) as f64;
    let gbps = |s: f64| total / s / 1e9;
    let (raw_t, on_t, off_t) = (median(raw_s), median(on_s), median(off_s));
    println!(
        "# tcp-probe: echo of {iters} x {bytes} B, {window} in flight, between two processes on loopback; medians of {reps}"
    );
    println!("{:<28} {:>10} {:>12}", "path", "GB/s", "vs raw");
    println!("{:<28} {:>10.3} {:>12}", "raw socket", gbps(raw_t), "1.00x");
    println!(
        "{:<28} {:>10.3} {:>11.2}x",
        "TcpLink, CRC32C on",
        gbps(on_t),
        raw_t / on_t
    );
    println!(
        "{:<28} {:>10.3} {:>11.2}x",
        "TcpLink, CRC32C off",
        gbps(off_t),
        raw_t / off_t
    );
    println!(
        "# CRC32C costs {:.1}% of the link's time here",
        (on_t / off_t - 1.0) * 100.0
    );
    Ok(ExitCode::SUCCESS)
}

fn tcp_init(counts: &[usize], reps: usize) -> Result<ExitCode, bench::BenchError> {
    println!(
        "# tcp-init: rendezvous + full mesh of N processes on this host (copies of wccl-bench); medians of {}",
        reps.max(1)
    );
    println!(
        "{:>6} {:>16} {:>16}",
        "procs", "slowest rank ms", "parent wall ms"
    );
    let exe = std::env::current_exe()?;
    for &n in counts {
        let (mut slowest, mut wall) = (Vec::new(), Vec::new());
        for rep in 0..reps.max(1) {
            let port = free_port()?;
            let job = format!("init-{n}-{rep}-{}", std::process::id());
            let t = Instant::now();
            let children = (0..n)
                .map(|r| {
                    std::process::Command::new(&exe)
                        .env(TCP_CHILD, format!("init;{r};{n};{port};{job}"))
                        .stdout(std::process::Stdio::piped())
                        .spawn()
                        .map(Reaped)
                })
                .collect::<std::io::Result<Vec<_>>>()?;
            let mut worst = 0.0f64;
            for mut c in children {
                let mut text = String::new();
                if let Some(mut o) = c.0.stdout.take() {
                    std::io::Read::read_to_string(&mut o, &mut text)?;
                }
                let ms = text
                    .trim()
                    .strip_prefix("connected ")
                    .and_then(|x| x.strip_suffix(" ms"))
                    .and_then(|x| x.parse::<f64>().ok())
                    .ok_or_else(|| format!("a child of {n} did not connect: {text:?}"))?;
                worst = worst.max(ms);
            }
            wall.push(t.elapsed().as_secs_f64() * 1e3);
            slowest.push(worst);
        }
        println!("{:>6} {:>16.2} {:>16.2}", n, median(slowest), median(wall));
    }
    Ok(ExitCode::SUCCESS)
}
