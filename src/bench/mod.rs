//! The engine of `wccl-bench`: nccl-tests' sweep (sizes, ops, out-of-place and in-place,
//! `#wrong`), over any collective and all-reduce algorithm, printing nccl-tests' table.
//!
//! The binary (`src/bin/wccl-bench.rs`) only parses flags into [`Settings`] and calls [`run`].

pub mod chaos;
mod matmul;
// The SVG plot and the progress bar need the CLI-only dependencies (the `cli` feature, on by
// default): training code that links the library without it compiles neither.
#[cfg(feature = "cli")]
mod plot;
mod ps_row;
pub mod reliability;
mod report;
mod sizes;
pub mod tcp;
mod verify;

use std::io::Write;
use std::time::{Duration, Instant};

#[cfg(feature = "cli")]
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub use matmul::{MatmulRow, matmul_rows, parse_shape};
#[cfg(feature = "cli")]
pub use plot::{plot_busbw, plot_progress};
pub use ps_row::ps_rows;
pub use report::{
    CSV_HEADER, Measure, Row, busbw_factor, csv_row, footer, format_row, header, model_error,
};
pub use sizes::{parse_size, size_steps};
pub use verify::{
    Expected, Pattern, count_wrong, count_wrong_by, decode, encode, is_right, is_right_for,
    reduce_values,
};

use crate::link::LinkEmulation;
use crate::{
    Algorithm, CallOptions, Collective, CollectiveKind, CommGroup, Communicator, DType, ReduceOp,
    TensorRef,
};

/// The ranks a sweep drives from this process: every rank of an in-process [`CommGroup`], or
/// the one rank of a process launched by mpirun, torchrun or srun ([`OneRank`]), as
/// nccl-tests runs one thread per GPU or one process per GPU (`MPI=1`).
pub trait Ranks {
    /// The number of ranks of the job.
    fn size(&self) -> usize;
    /// The ranks this process drives, in order.
    fn local(&self) -> Vec<usize>;
    /// The communicator of `r`, one of [`local`](Self::local).
    fn comm(&self, r: usize) -> &Communicator;
    /// Runs one call per local rank (in the order of [`local`](Self::local)).
    fn run(&mut self, calls: &[Collective<'_>], opts: CallOptions) -> crate::Result<()>;
    /// The largest `x` of all processes (every process gets it).
    fn max_across(&mut self, x: f64) -> crate::Result<f64>;
    /// The sum of `x` over all processes (every process gets it; saturates at `u32::MAX`).
    fn sum_across(&mut self, x: u64) -> crate::Result<u64>;
}

impl Ranks for CommGroup {
    fn size(&self) -> usize {
        CommGroup::size(self)
    }
    fn local(&self) -> Vec<usize> {
        (0..CommGroup::size(self)).collect()
    }
    fn comm(&self, r: usize) -> &Communicator {
        CommGroup::comm(self, r)
    }
    fn run(&mut self, calls: &[Collective<'_>], opts: CallOptions) -> crate::Result<()> {
        CommGroup::run(self, calls, opts)
    }
    fn max_across(&mut self, x: f64) -> crate::Result<f64> {
        Ok(x)
    }
    fn sum_across(&mut self, x: u64) -> crate::Result<u64> {
        Ok(x)
    }
}

/// The one rank of this process, in a job of one process per rank.
#[derive(Debug)]
pub struct OneRank(pub Communicator);

impl Ranks for OneRank {
    fn size(&self) -> usize {
        self.0.size()
    }
    fn local(&self) -> Vec<usize> {
        vec![self.0.rank()]
    }
    fn comm(&self, _r: usize) -> &Communicator {
        &self.0
    }
    fn run(&mut self, calls: &[Collective<'_>], opts: CallOptions) -> crate::Result<()> {
        match calls {
            [call] => self.0.run(*call, opts).map(drop),
            _ => Err(crate::Error::InvalidArgument {
                at: crate::At {
                    rank: self.0.rank(),
                    op: None,
                    seq: self.0.seq(),
                },
                message: format!("one rank runs one call, not {}", calls.len()),
            }),
        }
    }
    fn max_across(&mut self, x: f64) -> crate::Result<f64> {
        // Through the communicator itself: one f32 max (times of a sweep fit f32 well).
        let b = self.0.upload(&[x as f32])?;
        self.0.all_reduce(&b, ReduceOp::Max)?;
        Ok(self.0.download(&b)?.first().map_or(x, |&v| f64::from(v)))
    }
    fn sum_across(&mut self, x: u64) -> crate::Result<u64> {
        let b = self.0.upload(&[u32::try_from(x).unwrap_or(u32::MAX)])?;
        self.0.all_reduce(&b, ReduceOp::Sum)?;
        Ok(self.0.download(&b)?.first().map_or(x, |&v| u64::from(v)))
    }
}

/// The sweep's progress bar on a terminal (hidden otherwise).
#[cfg(feature = "cli")]
fn progress_bar(total_steps: u64) -> ProgressBar {
    use std::io::IsTerminal;
    let progress = if std::io::stderr().is_terminal() && total_steps > 1 {
        ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    progress
}

/// Without the `cli` feature (no indicatif), a progress bar that shows nothing.
#[cfg(not(feature = "cli"))]
fn progress_bar(_total_steps: u64) -> NoProgress {
    NoProgress
}

/// The part of indicatif's `ProgressBar` the sweep uses, doing nothing.
#[cfg(not(feature = "cli"))]
struct NoProgress;

#[cfg(not(feature = "cli"))]
impl NoProgress {
    fn set_message(&self, _message: String) {}
    fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        f()
    }
    fn inc(&self, _delta: u64) {}
    fn finish_and_clear(&self) {}
}

/// Elements each iteration shifts the buffers by (cycling through 4 positions), as nccl-tests
/// does, to keep caches honest and catch offset bugs. 64 elements keep 256-byte alignment.
const SHIFT: usize = 64;
const SHIFTS: usize = 4;

/// What one sweep measures.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The collective.
    pub kind: CollectiveKind,
    /// Sizes in bytes, smallest first.
    pub sizes: Vec<u64>,
    /// Timed iterations per size (`-n`).
    pub iters: usize,
    /// Warm-up iterations per size (`-w`).
    pub warmup: usize,
    /// Check results (`-c 1`).
    pub check: bool,
    /// Operators (`-o`); ignored by collectives that do not reduce.
    pub ops: Vec<ReduceOp>,
    /// Element type (`-d`).
    pub dtype: DType,
    /// Root (`-r`) of broadcast and reduce.
    pub root: usize,
    /// Deadline of each call (`-T`).
    pub timeout: Duration,
    /// All-reduce algorithms to compare (`--algo`); other collectives run their own.
    pub algos: Vec<Algorithm>,
    /// Damage rank 0's result before checking it (tests `#wrong` itself).
    pub corrupt: Option<Corrupt>,
    /// The emulated links the group was built with, if any (for the bottleneck note).
    pub link: Option<LinkEmulation>,
    /// Tensors without map usages (`--no-map`), as a framework that allocates its own would
    /// make them: the host-staged ring then goes through staging buffers even where the
    /// device could map its tensors in place.
    pub no_map: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            kind: CollectiveKind::AllReduce,
            sizes: size_steps(32 << 20, 32 << 20, 2, 0),
            iters: 20,
            warmup: 5,
            check: true,
            ops: vec![ReduceOp::Sum],
            dtype: DType::F32,
            root: 0,
            timeout: Duration::from_secs(30),
            algos: vec![Algorithm::Ring],
            corrupt: None,
            link: None,
            no_map: false,
        }
    }
}

/// A deliberate error in rank 0's result, applied after reading it back and before checking it,
/// to show that the checker sees each kind of bug it is there for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corrupt {
    /// One element off by one.
    One,
    /// A chunk of 1024 elements holding the elements `by` places further on (a chunk written at
    /// the wrong offset).
    Misplace {
        /// How far off the chunk is, in elements.
        by: usize,
    },
    /// The first and the last of the result's `ranks` equal parts swapped (another rank's chunk).
    Swap,
}

impl Corrupt {
    fn apply(self, got: &mut [f64], ranks: usize) {
        match self {
            Corrupt::One => {
                if let Some(g) = got.first_mut() {
                    *g += 1.0;
                }
            }
            Corrupt::Misplace { by } => {
                let chunk = 1024.min(got.len());
                if let Some(end) = by.checked_add(chunk).filter(|&e| e <= got.len()) {
                    got.copy_within(by..end, 0);
                }
            }
            Corrupt::Swap => {
                let part = got.len() / ranks.max(2);
                let last = got.len() - part;
                if part > 0 && last >= part {
                    for i in 0..part {
                        got.swap(i, last + i);
                    }
                }
            }
        }
    }
}

/// Any failure of a sweep.
pub type BenchError = Box<dyn std::error::Error + Send + Sync>;

/// Runs the sweep on `group`, printing the table to `out` as rows complete; returns the rows.
pub fn run(
    group: &mut dyn Ranks,
    s: &Settings,
    out: &mut dyn Write,
) -> Result<Vec<Row>, BenchError> {
    let n = group.size();
    if s.root >= n {
        return Err(format!("root {} is not a rank of {n}", s.root).into());
    }
    let es = s.dtype.size();
    let shapes: Vec<(u64, Shape)> = s
        .sizes
        .iter()
        .map(|&b| (b, Shape::new(s.kind, n, b, es)))
        .collect();
    let capacity = shapes.iter().map(|(_, sh)| sh.total).max().unwrap_or(0) + SHIFT * SHIFTS;
    let local = group.local();
    let bufs: Vec<(wgpu::Buffer, wgpu::Buffer)> = local
        .iter()
        .map(|&r| {
            let dev = group.comm(r).device().device().clone();
            // What training code on this device should make: mappable in place where the
            // device's memory is the host's (unless the run asks for plain tensors).
            let usage = if s.no_map {
                wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST
            } else {
                group.comm(r).device().tensor_usages()
            };
            let make = |label| {
                dev.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size: ((capacity * es) as u64).next_multiple_of(4).max(4),
                    usage,
                    mapped_at_creation: false,
                })
            };
            (make("bench input"), make("bench output"))
        })
        .collect();
    let reduces = matches!(
        s.kind,
        CollectiveKind::AllReduce | CollectiveKind::ReduceScatter | CollectiveKind::Reduce
    );
    let ops: Vec<Option<ReduceOp>> = if reduces {
        s.ops.iter().copied().map(Some).collect()
    } else {
        vec![None]
    };
    let algos: Vec<Algorithm> = match s.kind {
        CollectiveKind::AllReduce => s.algos.clone(),
        // Staged on host memory, auto as the model chooses, every other algorithm as the
        // device ring: a row for each that runs.
        CollectiveKind::ReduceScatter | CollectiveKind::AllGather => {
            let mut v: Vec<Algorithm> = Vec::new();
            for a in &s.algos {
                let runs = match a {
                    Algorithm::Staged | Algorithm::Auto => *a,
                    _ => Algorithm::Ring,
                };
                if !v.contains(&runs) {
                    v.push(runs);
                }
            }
            v
        }
        _ => vec![Algorithm::Ring],
    };
    let total_steps = (shapes.len() * ops.len() * algos.len()) as u64;
    let progress = progress_bar(total_steps);
    writeln!(out, "{}", header())?;
    let mut rows = Vec::new();
    for &algo in &algos {
        for op in &ops {
            for (bytes, shape) in &shapes {
                progress.set_message(format!("{algo} {} B", bytes));
                let mut measures = [Measure::default(); 2];
                for (slot, in_place) in [false, true].into_iter().enumerate() {
                    let case = Case {
                        kind: s.kind,
                        op: op.unwrap_or(ReduceOp::Sum),
                        dtype: s.dtype,
                        root: s.root,
                        algo,
                        in_place,
                        shape: *shape,
                        timeout: s.timeout,
                    };
                    // The slowest process's time, and every process's wrong elements, as
                    // nccl-tests reports them under MPI (one process: as measured).
                    let seconds = case.time(group, &bufs, s.warmup, s.iters)?;
                    let seconds = group.max_across(seconds)?;
                    let wrong = if s.check {
                        case.check(group, &bufs, s.corrupt)?
                    } else {
                        0
                    };
                    let wrong = group.sum_across(wrong)?;
                    let factor = busbw_factor(s.kind, n);
                    measures[slot] =
                        Measure::new((shape.total * es) as u64, seconds, factor, wrong);
                }
                let bytes = shape.total * es;
                let model = local
                    .first()
                    .and_then(|&r| group.comm(r).cost_model().cloned());
                // The bench's tensors are mappable in place where the device allows it.
                let mapped = !s.no_map
                    && local
                        .first()
                        .is_some_and(|&r| group.comm(r).device().unified_memory());
                let floor = match (s.kind, &model) {
                    (CollectiveKind::AllReduce, Some(m)) => Some(m.floor(bytes) * 1e6),
                    _ => None,
                };
                let (label, predicted) = match (s.kind, model) {
                    (CollectiveKind::AllReduce, Some(m)) => {
                        let chosen = match algo {
                            // What the communicator's `resolve` runs for it.
                            Algorithm::Auto => m
                                .choose_call(CollectiveKind::AllReduce, bytes, false)
                                .unwrap_or(Algorithm::Ring),
                            a => a,
                        };
                        let p = m.predict_for(chosen, bytes, false, mapped);
                        let label = if algo == Algorithm::Auto {
                            format!("auto:{chosen}")
                        } else {
                            algo.to_string()
                        };
                        (label, Some((p.seconds * 1e6, p.bound.to_string())))
                    }
                    (CollectiveKind::AllReduce, None) => (algo.to_string(), None),
                    (
                        kind @ (CollectiveKind::ReduceScatter | CollectiveKind::AllGather),
                        Some(m),
                    ) => {
                        // What the last call ran (`Auto` resolved), not what the model says.
                        let chosen = local
                            .first()
                            .and_then(|&r| group.comm(r).last_algorithm())
                            .unwrap_or(algo);
                        let ran = path(kind, chosen, n, shape.total, s.dtype);
                        let label = if algo == Algorithm::Auto {
                            format!("auto:{ran}")
                        } else {
                            ran.to_string()
                        };
                        let p = m.predict_call(kind, chosen, bytes, false);
                        (label, p.map(|p| (p.seconds * 1e6, p.bound.to_string())))
                    }
                    (kind, _) => {
                        // Without a model, `Auto` runs the device ring.
                        let ran = if algo == Algorithm::Auto {
                            Algorithm::Ring
                        } else {
                            algo
                        };
                        (path(kind, ran, n, shape.total, s.dtype).to_string(), None)
                    }
                };
                let row = Row {
                    size: (shape.total * es) as u64,
                    count: shape.total as u64,
                    dtype: s.dtype,
                    op: *op,
                    root: if matches!(s.kind, CollectiveKind::Broadcast | CollectiveKind::Reduce) {
                        s.root as i64
                    } else {
                        -1
                    },
                    algo: label,
                    out_of_place: measures[0],
                    in_place: measures[1],
                    predicted,
                    floor,
                };
                progress.suspend(|| writeln!(out, "{}", format_row(&row)))?;
                if let Some(link) = s.link {
                    let wire = link_seconds(&link, s.kind, algo_of(&row), n, bytes);
                    let measured = row.out_of_place.time_us * 1e-6;
                    if wire < 0.5 * measured {
                        progress.suspend(|| {
                            writeln!(
                                out,
                                "# note: the emulated link is not the bottleneck here: it needs {:.1} us of the {:.1} us measured",
                                wire * 1e6,
                                measured * 1e6
                            )
                        })?;
                    }
                }
                rows.push(row);
                progress.inc(1);
            }
        }
    }
    progress.finish_and_clear();
    writeln!(out, "{}", footer(&rows))?;
    if let Some(e) = model_error(&rows) {
        writeln!(out, "{e}")?;
    }
    Ok(rows)
}

/// The algorithm a call of the other collectives runs, as the communicator picks it (not
/// finishing among survivors): binomial trees for short broadcasts and reduces on many ranks,
/// else chains; the dissemination barrier on many ranks, else the ring; reduce-scatter and
/// all-gather on host memory where `algo` is `Staged`, else the device ring.
fn path(
    kind: CollectiveKind,
    algo: Algorithm,
    n: usize,
    count: usize,
    dtype: DType,
) -> &'static str {
    match kind {
        CollectiveKind::ReduceScatter | CollectiveKind::AllGather if algo == Algorithm::Staged => {
            "staged"
        }
        CollectiveKind::Broadcast | CollectiveKind::Reduce => {
            if crate::comm::on_tree(n, count, dtype) {
                "tree"
            } else {
                "chain"
            }
        }
        CollectiveKind::Barrier if n >= crate::comm::TREE_MIN_RANKS => "dissemination",
        _ => "ring",
    }
}

/// The algorithm a row ran (`auto:X` rows ran X).
fn algo_of(row: &Row) -> Algorithm {
    row.algo
        .rsplit(':')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(Algorithm::Ring)
}

/// Seconds the busiest rank's emulated egress needs for one call: bytes over bandwidth plus one
/// latency per dependent step.
pub fn link_seconds(
    link: &LinkEmulation,
    kind: CollectiveKind,
    algo: Algorithm,
    n: usize,
    bytes: usize,
) -> f64 {
    let (s, nf) = (bytes as f64, n as f64);
    if n < 2 {
        return 0.0;
    }
    let (egress, steps) = match (kind, algo) {
        (CollectiveKind::AllReduce, Algorithm::Central | Algorithm::Naive) => ((nf - 1.0) * s, 2.0),
        (
            CollectiveKind::AllReduce,
            Algorithm::HalvingDoubling | Algorithm::StagedHalvingDoubling,
        ) => {
            // The busiest rank: an odd one of the folded pairs when n is not a power of two (it
            // also sends the whole result back), with one step each way more.
            let p = 1usize << n.ilog2();
            let pf = p as f64;
            let fold = if p < n { 1.0 } else { 0.0 };
            let exchanges = 2.0 * f64::from(p.ilog2());
            (2.0 * (pf - 1.0) / pf * s + fold * s, exchanges + 2.0 * fold)
        }
        (CollectiveKind::AllReduce, _) => (2.0 * (nf - 1.0) / nf * s, 2.0 * (nf - 1.0)),
        (CollectiveKind::ReduceScatter | CollectiveKind::AllGather, _) => {
            ((nf - 1.0) / nf * s, nf - 1.0)
        }
        _ => (s, nf - 1.0),
    };
    link.wire_seconds(egress) + steps * link.latency_us * 1e-6
}

/// Element counts of one size: `total` is the whole array, `per` one rank's share of it for
/// reduce_scatter and all_gather (the whole for the others).
#[derive(Clone, Copy, Debug)]
struct Shape {
    total: usize,
    per: usize,
}

impl Shape {
    fn new(kind: CollectiveKind, n: usize, bytes: u64, es: usize) -> Shape {
        let elems = bytes as usize / es;
        match kind {
            CollectiveKind::ReduceScatter | CollectiveKind::AllGather => {
                let per = elems / n;
                Shape {
                    total: per * n,
                    per,
                }
            }
            _ => Shape {
                total: elems,
                per: elems,
            },
        }
    }
}

struct Case {
    kind: CollectiveKind,
    op: ReduceOp,
    dtype: DType,
    root: usize,
    algo: Algorithm,
    in_place: bool,
    shape: Shape,
    timeout: Duration,
}

impl Case {
    /// This rank's (input, output) views at a shift.
    fn views<'a>(
        &self,
        r: usize,
        bufs: &'a (wgpu::Buffer, wgpu::Buffer),
        shift: usize,
    ) -> (TensorRef<'a>, TensorRef<'a>) {
        let (inb, outb) = bufs;
        let off = (shift * self.dtype.size()) as u64;
        let Shape { total, per } = self.shape;
        let t = |b, count| TensorRef::new(b, off, count, self.dtype);
        match (self.kind, self.in_place) {
            (CollectiveKind::ReduceScatter, false) => (t(inb, total), t(outb, per)),
            (CollectiveKind::ReduceScatter, true) => {
                (t(outb, total), t(outb, total).slice(r * per, per))
            }
            (CollectiveKind::AllGather, false) => (t(inb, per), t(outb, total)),
            (CollectiveKind::AllGather, true) => {
                (t(outb, total).slice(r * per, per), t(outb, total))
            }
            (_, false) => (t(inb, total), t(outb, total)),
            (_, true) => (t(outb, total), t(outb, total)),
        }
    }

    fn call<'a>(&self, input: TensorRef<'a>, output: TensorRef<'a>) -> Collective<'a> {
        let (op, root) = (self.op, self.root);
        match self.kind {
            CollectiveKind::AllReduce => Collective::AllReduce { input, output, op },
            CollectiveKind::ReduceScatter => Collective::ReduceScatter { input, output, op },
            CollectiveKind::AllGather => Collective::AllGather { input, output },
            CollectiveKind::Broadcast => Collective::Broadcast {
                input,
                output,
                root,
            },
            CollectiveKind::Reduce => Collective::Reduce {
                input,
                output,
                op,
                root,
            },
            CollectiveKind::Barrier => Collective::Barrier,
        }
    }

    fn run_once(
        &self,
        group: &mut dyn Ranks,
        bufs: &[(wgpu::Buffer, wgpu::Buffer)],
        shift: usize,
    ) -> crate::Result<()> {
        let calls: Vec<Collective<'_>> = group
            .local()
            .into_iter()
            .zip(bufs)
            .map(|(r, b)| {
                let (i, o) = self.views(r, b, shift);
                self.call(i, o)
            })
            .collect();
        let opts = CallOptions {
            timeout: Some(self.timeout),
            algorithm: Some(self.algo),
            ..CallOptions::default()
        };
        group.run(&calls, opts)
    }

    /// Mean seconds of one call after the warm-up, shifting the buffers each iteration.
    fn time(
        &self,
        group: &mut dyn Ranks,
        bufs: &[(wgpu::Buffer, wgpu::Buffer)],
        warmup: usize,
        iters: usize,
    ) -> crate::Result<f64> {
        for k in 0..warmup {
            self.run_once(group, bufs, (k % SHIFTS) * SHIFT)?;
        }
        let t = Instant::now();
        for k in 0..iters.max(1) {
            self.run_once(group, bufs, (k % SHIFTS) * SHIFT)?;
        }
        Ok(t.elapsed().as_secs_f64() / iters.max(1) as f64)
    }

    /// At every shift: writes known inputs, poisons the whole output buffer, runs once, and
    /// counts the wrong elements on all ranks, inside the output view against the f64 reference
    /// and outside it against the poison (a write past either end of the view is wrong too).
    fn check(
        &self,
        group: &mut dyn Ranks,
        bufs: &[(wgpu::Buffer, wgpu::Buffer)],
        corrupt: Option<Corrupt>,
    ) -> crate::Result<u64> {
        let n = group.size();
        let local = group.local();
        let Shape { total, per } = self.shape;
        let es = self.dtype.size();
        let in_len = match self.kind {
            CollectiveKind::AllGather => per,
            _ => total,
        };
        // Where rank r's result lies in its output buffer, from the view's start.
        let result_at = |r: usize| match (self.kind, self.in_place) {
            (CollectiveKind::ReduceScatter, false) => (0, per),
            (CollectiveKind::ReduceScatter, true) => (r * per, per),
            _ => (0, total),
        };
        let expect = Expected::new(self.kind, self.dtype, self.op, n, self.root, per);
        // Every rank's results, once for all shifts (they do not depend on where the views lie).
        let results = expect.results();
        // Inputs are never negative, so -1 (or, for u32, 4e9) is no possible result.
        let poison = if self.dtype == DType::U32 {
            4.0e9
        } else {
            -1.0
        };
        // Elements of the output buffer, whole, so that every write is 4-byte aligned whatever
        // the type.
        let cap = (bufs.first().map_or(0, |(_, o)| o.size()) as usize) / es;
        // What rank r's output buffer holds before the call at `shift`: poison, and the input
        // where it lives in place.
        let before = |r: usize, shift: usize| {
            let mut img = vec![poison; cap];
            if self.in_place {
                let at = shift
                    + if self.kind == CollectiveKind::AllGather {
                        r * per
                    } else {
                        0
                    };
                expect.pattern.fill(r, 0, &mut img[at..at + in_len]);
            }
            img
        };
        let mut wrong = 0;
        for k in 0..SHIFTS {
            let shift = k * SHIFT;
            for (&r, (inb, outb)) in local.iter().zip(bufs) {
                let q = group.comm(r).device().queue().clone();
                if !self.in_place {
                    let mut input = vec![poison; cap];
                    expect.pattern.fill(r, 0, &mut input[shift..shift + in_len]);
                    write(&q, inb, &encode(self.dtype, &input));
                }
                write(&q, outb, &encode(self.dtype, &before(r, shift)));
            }
            self.run_once(group, bufs, shift)?;
            for (&r, (_, outb)) in local.iter().zip(bufs) {
                let whole = TensorRef::new(outb, 0, cap, self.dtype);
                let mut got = decode(self.dtype, &read_bytes(group, r, whole, self.dtype)?);
                let (from, len) = result_at(r);
                let view = shift + from..shift + from + len;
                if let (Some(c), 0) = (corrupt, r) {
                    c.apply(&mut got[view.clone()], n);
                }
                // The whole buffer as it must be: as before the call outside the result (a
                // write past either end of the view is wrong too), the reference inside it;
                // ranks without a defined result (non-root reduce) keep what they had.
                let mut want = before(r, shift);
                let defined = !(self.kind == CollectiveKind::Reduce && r != self.root);
                if defined {
                    let at = if self.kind == CollectiveKind::ReduceScatter {
                        r * per
                    } else {
                        0
                    };
                    want[view.clone()].copy_from_slice(&results[at..at + len]);
                }
                let (dtype, op) = (self.dtype, self.op);
                wrong += count_wrong_by(&got, |i| want[i], |g, w| is_right_for(dtype, op, g, w));
            }
        }
        Ok(wrong)
    }
}

/// Rank `r`'s tensor `t` read back as bytes.
fn read_bytes(
    group: &mut dyn Ranks,
    r: usize,
    t: TensorRef<'_>,
    dtype: DType,
) -> crate::Result<Vec<u8>> {
    let comm = group.comm(r);
    match dtype {
        DType::F32 => comm
            .read::<f32>(t)
            .map(|v| bytemuck::cast_slice(&v).to_vec()),
        DType::F16 => comm
            .read::<half::f16>(t)
            .map(|v| bytemuck::cast_slice(&v).to_vec()),
        DType::BF16 => comm
            .read::<half::bf16>(t)
            .map(|v| bytemuck::cast_slice(&v).to_vec()),
        DType::I32 => comm
            .read::<i32>(t)
            .map(|v| bytemuck::cast_slice(&v).to_vec()),
        DType::U32 => comm
            .read::<u32>(t)
            .map(|v| bytemuck::cast_slice(&v).to_vec()),
    }
}

fn write(q: &wgpu::Queue, buf: &wgpu::Buffer, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    let mut b = bytes.to_vec();
    b.resize(b.len().next_multiple_of(4), 0);
    q.write_buffer(buf, 0, &b);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The algo column follows the communicator's own rule: the tree up to 64 KiB from 16
    /// ranks on, the chain otherwise; the dissemination barrier from 16 ranks.
    #[test]
    fn the_path_label_follows_the_communicator() {
        let (b, r) = (CollectiveKind::Broadcast, CollectiveKind::Reduce);
        assert_eq!(path(b, Algorithm::Ring, 17, 16_384, DType::F32), "tree");
        assert_eq!(path(r, Algorithm::Ring, 17, 16_385, DType::F32), "chain");
        assert_eq!(path(r, Algorithm::Ring, 15, 1, DType::F32), "chain");
        assert_eq!(path(b, Algorithm::Ring, 16, 32_768, DType::F16), "tree");
        assert_eq!(
            path(CollectiveKind::Barrier, Algorithm::Ring, 16, 0, DType::F32),
            "dissemination"
        );
        assert_eq!(
            path(CollectiveKind::Barrier, Algorithm::Ring, 15, 0, DType::F32),
            "ring"
        );
        assert_eq!(
            path(
                CollectiveKind::AllGather,
                Algorithm::Ring,
                64,
                1,
                DType::F32
            ),
            "ring"
        );
        for kind in [CollectiveKind::AllGather, CollectiveKind::ReduceScatter] {
            assert_eq!(path(kind, Algorithm::Staged, 4, 1, DType::F32), "staged");
            assert_eq!(path(kind, Algorithm::Auto, 4, 1, DType::F32), "ring");
        }
        // Broadcast has no staged path: what it runs, whatever was asked.
        assert_eq!(path(b, Algorithm::Staged, 17, 16_384, DType::F32), "tree");
    }
}
