//! Tensor parallelism: Megatron-LM's MLP block (column-parallel, GELU, row-parallel) split over
//! several ranks, forward and backward, checked against the same block on one device.
//!
//! `cargo run --release --example tensor_parallel -- [--ranks 4] [--batch 64 --d-model 256 --d-ffn 1024]`
//! (by default one rank per adapter, at least two).
//!
//! Prints the time of one forward + backward step, its GFLOP/s, the bytes each collective moved
//! (measured by the communicators), and the relative error of every output and gradient.

use std::time::{Duration, Instant};

use clap::Parser;
use rand::{Rng, SeedableRng};
use wccl::tp::{self, Kernels, ParallelMlp};
use wccl::{CommGroup, Communicator};

#[derive(Parser)]
#[command(about = "A tensor-parallel MLP block, checked against one device")]
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

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let err: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (f64::from(g) - f64::from(w)).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|&w| f64::from(w).powi(2)).sum();
    (err / norm.max(f64::MIN_POSITIVE)).sqrt()
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

    let mut worst = 0.0f64;
    for (r, run) in split.iter().enumerate() {
        let errs = [
            ("y", rel_err(&run.y, &single.y)),
            ("dx", rel_err(&run.dx, &single.dx)),
            (
                "dW1",
                rel_err(
                    &run.dw1,
                    &tp::columns_of(&single.dw1, f, run.columns.clone()),
                ),
            ),
            (
                "dW2",
                rel_err(&run.dw2, tp::rows_of(&single.dw2, d, run.columns.clone())),
            ),
        ];
        let text: Vec<String> = errs.iter().map(|(n, e)| format!("{n} {e:.1e}")).collect();
        println!(
            "  rank {r} (hidden columns {:?}) against one device: {}",
            run.columns,
            text.join(", ")
        );
        worst = errs.iter().map(|e| e.1).fold(worst, f64::max);
    }
    if worst > 1e-5 {
        return Err(format!("the split block differs from one device: {worst:e}").into());
    }
    println!("split block matches one device (worst relative error {worst:.1e})");
    Ok(())
}
