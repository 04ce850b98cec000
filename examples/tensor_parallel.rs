//! Tensor parallelism: Megatron-LM's MLP block (column-parallel, GELU, row-parallel) split over
//! several ranks, forward and backward, checked against an f64 reference computed on the host
//! from the same inputs (and against the same block on one device).
//!
//! `cargo run --release --example tensor_parallel -- [--ranks 4] [--batch 64 --d-model 256 --d-ffn 1024]`
//! (by default one rank per adapter, at least two).
//!
//! Prints the time of one forward + backward step, its GFLOP/s, the bytes each collective moved
//! (measured by the communicators), and the relative error of every output and gradient
//! against the f64 reference and against one device.

use std::time::{Duration, Instant};

use clap::Parser;
use rand::{Rng, SeedableRng};
use wccl::tp::{self, Kernels, ParallelMlp};
use wccl::{CommGroup, Communicator};

#[derive(Parser)]
#[command(about = "A tensor-parallel MLP block, checked against an f64 host reference")]
struct Args {
    /// Ranks to split over (they share adapters when there are fewer); 0: one per adapter,
    /// at least 2.
    #[arg(long, default_value_t = 0)]
    ranks: usize,
    /// Rows of the input.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Input and output width.
    #[arg(long = "d-model", default_value_t = 256)]
    d_model: usize,
    /// Hidden width (split over the ranks).
    #[arg(long = "d-ffn", default_value_t = 1024)]
    d_ffn: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    iters: usize,
}

/// What one rank saw: outputs, its gradient shards, its step time and the bytes it sent.
struct RankRun {
    y: Vec<f32>,
    dx: Vec<f32>,
    dw1: Vec<f32>,
    dw2: Vec<f32>,
    columns: std::ops::Range<usize>,
    seconds: f64,
    sent_forward: u64,
    sent_backward: u64,
}

struct Problem {
    dims: (usize, usize, usize),
    batch: usize,
    x: Vec<f32>,
    w1: Vec<f32>,
    w2: Vec<f32>,
    dy: Vec<f32>,
    iters: usize,
}

fn step(comm: &mut Communicator, p: &Problem) -> wccl::Result<RankRun> {
    let (d, _, _) = p.dims;
    let mut kernels = Kernels::new(comm.device());
    let mut mlp = ParallelMlp::new(comm, p.dims, &p.w1, &p.w2)?;
    let x = comm.upload(&p.x)?;
    let dy = comm.upload(&p.dy)?;
    let y = comm.buffer::<f32>(p.batch * d)?;
    let dx = comm.buffer::<f32>(p.batch * d)?;
    // Warm-up (pipelines compile on first use), then the timed steps.
    mlp.forward(comm, &mut kernels, x.view(), y.view())?;
    mlp.backward(comm, &mut kernels, x.view(), dy.view(), dx.view())?;
    comm.barrier()?;
    let (mut sent_forward, mut sent_backward) = (0, 0);
    let started = Instant::now();
    for _ in 0..p.iters {
        let before = comm.bytes_sent();
        mlp.forward(comm, &mut kernels, x.view(), y.view())?;
        let between = comm.bytes_sent();
        mlp.backward(comm, &mut kernels, x.view(), dy.view(), dx.view())?;
        sent_forward = between - before;
        sent_backward = comm.bytes_sent() - between;
    }
    kernels.finish(comm.device(), Duration::from_secs(600))?;
    let seconds = started.elapsed().as_secs_f64() / p.iters.max(1) as f64;
    Ok(RankRun {
        y: comm.download(&y)?,
        dx: comm.download(&dx)?,
        dw1: comm.download(mlp.fc1().weight_grad())?,
        dw2: comm.download(mlp.fc2().weight_grad())?,
        columns: mlp.fc1().columns(),
        seconds,
        sent_forward,
        sent_backward,
    })
}

fn run(ranks: usize, p: &Problem) -> Result<Vec<RankRun>, Box<dyn std::error::Error>> {
    let mut group = CommGroup::builder().ranks(ranks).build()?;
    if ranks > 1 {
        let info = &group.adapters()[0];
        println!(
            "{ranks} ranks on {} ({:?}, {:?})",
            info.name, info.backend, info.device_type
        );
    }
    Ok(group
        .run_each(|comm| step(comm, p))
        .into_iter()
        .collect::<wccl::Result<Vec<_>>>()?)
}

/// `||got - want|| / ||want||`, in f64; infinite when the lengths differ.
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let err: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (f64::from(g) - w).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|&w| w.powi(2)).sum();
    (err / norm.max(f64::MIN_POSITIVE)).sqrt()
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// GELU in the tanh form the kernels use, and its derivative.
fn gelu(v: f64) -> (f64, f64) {
    const S: f64 = 0.797_884_560_802_865_4; // sqrt(2 / pi)
    const C: f64 = 0.044715;
    let t = (S * (v + C * v * v * v)).tanh();
    let grad = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * S * (1.0 + 3.0 * C * v * v);
    (0.5 * v * (1.0 + t), grad)
}

/// Fills `out`, rows of `width`, with `row(index, row)` on every core: at the GPU check's sizes
/// the reference is some 50 GFLOP.
fn par_rows(out: &mut [f64], width: usize, row: impl Fn(usize, &mut [f64]) + Sync) {
    let width = width.max(1);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = (out.len() / width).div_ceil(threads).max(1);
    let row = &row;
    std::thread::scope(|s| {
        for (c, chunk) in out.chunks_mut(per * width).enumerate() {
            s.spawn(move || {
                for (i, o) in chunk.chunks_mut(width).enumerate() {
                    row(c * per + i, o);
                }
            });
        }
    });
}

/// The block in f64 on the host, written out loop by loop independently of the crate's
/// kernels: (y, dx, dW1, dW2) for y = gelu(x W1) W2, all row-major.
fn reference(p: &Problem) -> [Vec<f64>; 4] {
    let (d, f, o) = p.dims;
    let b = p.batch;
    let (x, w1, w2, dy) = (widen(&p.x), widen(&p.w1), widen(&p.w2), widen(&p.dy));
    // h = x W1 (b x f)
    let mut h = vec![0.0; b * f];
    par_rows(&mut h, f, |r, out| {
        for i in 0..d {
            let xv = x[r * d + i];
            for (hv, wv) in out.iter_mut().zip(&w1[i * f..(i + 1) * f]) {
                *hv += xv * wv;
            }
        }
    });
    let (z, gz): (Vec<f64>, Vec<f64>) = h.iter().map(|&v| gelu(v)).unzip();
    // y = z W2 (b x o)
    let mut y = vec![0.0; b * o];
    par_rows(&mut y, o, |r, out| {
        for j in 0..f {
            let zv = z[r * f + j];
            for (yv, wv) in out.iter_mut().zip(&w2[j * o..(j + 1) * o]) {
                *yv += zv * wv;
            }
        }
    });
    // dh = (dy W2^T) * gelu'(h) (b x f)
    let mut dh = vec![0.0; b * f];
    par_rows(&mut dh, f, |r, out| {
        let dyr = &dy[r * o..(r + 1) * o];
        for (j, v) in out.iter_mut().enumerate() {
            let dz: f64 = dyr
                .iter()
                .zip(&w2[j * o..(j + 1) * o])
                .map(|(a, c)| a * c)
                .sum();
            *v = dz * gz[r * f + j];
        }
    });
    // dW2 = z^T dy (f x o)
    let mut dw2 = vec![0.0; f * o];
    par_rows(&mut dw2, o, |j, out| {
        for r in 0..b {
            let zv = z[r * f + j];
            for (g, dv) in out.iter_mut().zip(&dy[r * o..(r + 1) * o]) {
                *g += zv * dv;
            }
        }
    });
    // dW1 = x^T dh (d x f)
    let mut dw1 = vec![0.0; d * f];
    par_rows(&mut dw1, f, |i, out| {
        for r in 0..b {
            let xv = x[r * d + i];
            for (g, hv) in out.iter_mut().zip(&dh[r * f..(r + 1) * f]) {
                *g += xv * hv;
            }
        }
    });
    // dx = dh W1^T (b x d)
    let mut dx = vec![0.0; b * d];
    par_rows(&mut dx, d, |r, out| {
        let dhr = &dh[r * f..(r + 1) * f];
        for (i, v) in out.iter_mut().enumerate() {
            *v = dhr
                .iter()
                .zip(&w1[i * f..(i + 1) * f])
                .map(|(a, c)| a * c)
                .sum();
        }
    });
    [y, dx, dw1, dw2]
}

/// Relative errors of one rank's outputs and gradient shards against full (y, dx, dW1, dW2).
fn errors(run: &RankRun, full: &[Vec<f64>; 4], f: usize, o: usize) -> [(&'static str, f64); 4] {
    let [y, dx, dw1, dw2] = full;
    [
        ("y", rel_err(&run.y, y)),
        ("dx", rel_err(&run.dx, dx)),
        (
            "dW1",
            rel_err(&run.dw1, &tp::columns_of(dw1, f, run.columns.clone())),
        ),
        (
            "dW2",
            rel_err(&run.dw2, tp::rows_of(dw2, o, run.columns.clone())),
        ),
    ]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = Args::parse();
    if args.ranks == 0 {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapters =
            wccl::device::discover_adapters(&instance, &wccl::AdapterSelector::default())?;
        args.ranks = adapters.len().max(2);
    }
    let (b, d, f) = (args.batch, args.d_model, args.d_ffn);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut random = |len: usize, scale: f32| -> Vec<f32> {
        (0..len)
            .map(|_| rng.random_range(-1.0f32..1.0) * scale)
            .collect()
    };
    let p = Problem {
        dims: (d, f, d),
        batch: b,
        x: random(b * d, 1.0),
        w1: random(d * f, 1.0 / (d as f32).sqrt()),
        w2: random(f * d, 1.0 / (f as f32).sqrt()),
        dy: random(b * d, 1.0),
        iters: args.iters,
    };
    // Forward: two products of 2 b d f flops; backward: four.
    let flops = 6.0 * 2.0 * (b * d * f) as f64;
    println!("MLP block: batch {b}, d_model {d}, d_ffn {f}, f32; one step = forward + backward");

    let single = run(1, &p)?.remove(0);
    let split = run(args.ranks, &p)?;
    let seconds = split.iter().map(|r| r.seconds).fold(0.0, f64::max);
    println!(
        "  1 rank : {:8.2} ms/step, {:7.2} GFLOP/s",
        single.seconds * 1e3,
        flops / single.seconds / 1e9
    );
    println!(
        "  {} ranks: {:8.2} ms/step, {:7.2} GFLOP/s ({:.2}x one rank)",
        args.ranks,
        seconds * 1e3,
        flops / seconds / 1e9,
        single.seconds / seconds
    );
    let mib = |x: u64| x as f64 / (1 << 20) as f64;
    println!(
        "  collectives per step, per rank: forward all_reduce of y ({:.3} MiB) sent {:.3} MiB; backward all_reduce of dx ({:.3} MiB) sent {:.3} MiB",
        mib((b * d * 4) as u64),
        mib(split.iter().map(|r| r.sent_forward).max().unwrap_or(0)),
        mib((b * d * 4) as u64),
        mib(split.iter().map(|r| r.sent_backward).max().unwrap_or(0)),
    );

    // The f64 reference is the yardstick; one device is a second opinion (same kernels).
    let started = Instant::now();
    let full = reference(&p);
    println!(
        "  f64 host reference: {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let one = [
        widen(&single.y),
        widen(&single.dx),
        widen(&single.dw1),
        widen(&single.dw2),
    ];
    let show = |e: &[(&str, f64)]| {
        e.iter()
            .map(|(n, e)| format!("{n} {e:.1e}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let single_err = errors(&single, &full, f, d);
    println!("  1 rank against f64: {}", show(&single_err));
    let mut worst = single_err.iter().map(|e| e.1).fold(0.0f64, nan_max);
    let mut worst_one = 0.0f64;
    for (r, run) in split.iter().enumerate() {
        let errs = errors(run, &full, f, d);
        let against_one = errors(run, &one, f, d);
        println!(
            "  rank {r} (hidden columns {:?}) against f64: {}; against one device: {}",
            run.columns,
            show(&errs),
            show(&against_one)
        );
        worst = errs.iter().map(|e| e.1).fold(worst, nan_max);
        worst_one = against_one.iter().map(|e| e.1).fold(worst_one, nan_max);
    }
    // f32 sums of up to d_ffn products: rounding stays far below 1e-5 (about 1e-7 here).
    if !(worst <= 1e-5 && worst_one <= 1e-5) {
        return Err(format!(
            "the split block differs: worst relative error {worst:e} against f64, \
             {worst_one:e} against one device"
        )
        .into());
    }
    println!(
        "split block matches the f64 reference (worst relative error {worst:.1e}; against one device {worst_one:.1e})"
    );
    Ok(())
}

/// The larger of two errors, NaN winning: a NaN anywhere in an output must fail the check
/// (`f64::max` would drop it).
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}
