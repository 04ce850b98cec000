//! Training code's side of a launched job: one process per GPU, started by mpirun, torchrun or
//! srun (or by hand with `WCCL_RANK`/`WCCL_WORLD_SIZE`), each joining with `from_env`, then an
//! all-reduce of a gradient, checked against the sum every rank can compute on the host.
//!
//! ```sh
//! cargo build --release --example launcher
//! mpirun -np 4 target/release/examples/launcher
//! torchrun --nproc-per-node 4 --no-python target/release/examples/launcher
//! srun -n 4 target/release/examples/launcher
//! # by hand, on one host:
//! for r in 0 1 2 3; do WCCL_RANK=$r WCCL_WORLD_SIZE=4 target/release/examples/launcher & done; wait
//! ```
//! Across hosts, set the same `WCCL_JOB_TOKEN` on every rank (and, outside torchrun,
//! `WCCL_MASTER_ADDR`/`WCCL_MASTER_PORT` to rank 0's host and a free port).

use std::process::ExitCode;

use wccl::{Communicator, ReduceOp};

/// Rank r's gradient: distinct per (rank, element), period 1009 (not a power of two), small
/// integers so that the f32 sum is exact and the check can be exact.
fn gradient(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((rank * 7919 + i * 31) % 1009) as f32 - 504.0)
        .collect()
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("launcher: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut comm = Communicator::from_env()?;
    let (rank, size) = (comm.rank(), comm.size());
    let len = (1 << 20) + 7;
    let grad = comm.upload(&gradient(rank, len))?;
    comm.all_reduce(&grad, ReduceOp::Sum)?;
    let got = comm.download(&grad)?;
    // The f64 reference: every rank's gradient is known to every rank.
    let all: Vec<Vec<f32>> = (0..size).map(|r| gradient(r, len)).collect();
    let wrong = (0..len)
        .filter(|&i| {
            let want: f64 = all.iter().map(|g| f64::from(g[i])).sum();
            f64::from(got[i]) != want
        })
        .count();
    println!(
        "rank {rank} of {size} on {}: all_reduce of {len} f32, {wrong} wrong",
        comm.device().info().name
    );
    if wrong > 0 {
        return Err(format!("rank {rank}: {wrong} elements wrong").into());
    }
    Ok(())
}
