//! Quickstart: all-reduce a buffer across ranks on whatever adapters this machine has.
//!
//! `cargo run --release --example quickstart -- [ranks] [MiB]` (defaults: 4 ranks, 16 MiB).

use std::time::Instant;

use rand::Rng;
use wccl::{CommGroup, ReduceOp};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let ranks: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(4);
    let mib: f64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(16.0);
    run(ranks, mib)
}

/// The quickstart itself (tests/quickstart.rs runs it too, on a headless environment).
pub fn run(ranks: usize, mib: f64) -> Result<(), Box<dyn std::error::Error>> {
    let count = ((mib * (1 << 20) as f64) / 4.0) as usize;

    let mut group = CommGroup::builder().ranks(ranks).build()?;
    for (r, info) in group.adapters().iter().enumerate() {
        println!(
            "rank {r}: {} ({:?}, {:?})",
            info.name, info.backend, info.device_type
        );
    }

    // Random inputs per rank, and the host's sum (in f64) to check against.
    let mut rng = rand::rng();
    let inputs: Vec<Vec<f32>> = (0..ranks)
        .map(|_| (0..count).map(|_| rng.random_range(-1.0..1.0)).collect())
        .collect();
    let expected: Vec<f64> = (0..count)
        .map(|i| inputs.iter().map(|v| v[i] as f64).sum())
        .collect();
    let bufs = inputs
        .iter()
        .enumerate()
        .map(|(r, v)| group.comm(r).upload(v))
        .collect::<wccl::Result<Vec<_>>>()?;
    let views: Vec<_> = bufs.iter().map(|b| b.view()).collect();

    // One warm-up call (pipelines compile on first use), then the timed one.
    group.all_reduce(&views, ReduceOp::Sum)?;
    for (r, v) in inputs.iter().enumerate() {
        bufs[r].write(group.comm(r).device(), v)?;
    }
    let t = Instant::now();
    group.all_reduce(&views, ReduceOp::Sum)?;
    let secs = t.elapsed().as_secs_f64();

    let mut worst = 0.0f64;
    for (r, buf) in bufs.iter().enumerate() {
        let got = group.comm(r).download(buf)?;
        for (g, e) in got.iter().zip(&expected) {
            let err = (*g as f64 - e).abs() / (1.0 + e.abs());
            worst = worst.max(err);
        }
    }
    let bytes = (count * 4) as f64;
    let algbw = bytes / secs / 1e9;
    let busbw = algbw * 2.0 * (ranks as f64 - 1.0) / ranks as f64;
    println!(
        "all_reduce sum f32: {ranks} ranks x {:.1} MiB in {:.2} ms: algbw {algbw:.3} GB/s, busbw {busbw:.3} GB/s",
        bytes / (1 << 20) as f64,
        secs * 1e3
    );
    if worst > 1e-5 {
        return Err(
            format!("result differs from the host's sum (relative error {worst:e})").into(),
        );
    }
    println!("result matches the host's sum (max relative error {worst:.1e})");
    Ok(())
}
