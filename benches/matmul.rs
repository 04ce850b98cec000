//! The matmul kernels (plain, tiled and tiled-large, f32) at 256^3 and 512^3, and the tensor-parallel MLP
//! block (forward + backward) split over 1, 2 and 4 ranks. Throughput is in floating-point
//! operations: criterion's "Gelem/s" reads as GFLOP/s.
//!
//! `cargo bench --bench matmul`

use std::sync::Mutex;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wccl::tp::{Kernels, Matmul, MatmulKernel, ParallelMlp};
use wccl::{CommGroup, DeviceBuffer};

fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919 + seed * 104_729) % 2000) as f32 / 1000.0 - 1.0)
        .collect()
}

fn kernels(c: &mut Criterion) {
    let group = CommGroup::builder().ranks(1).build().expect("an adapter");
    let comm = group.comm(0);
    let dev = comm.device();
    let mut ks = Kernels::new(dev);
    let mut bench = c.benchmark_group("matmul_f32");
    bench.sample_size(10);
    bench.warm_up_time(Duration::from_millis(500));
    for size in [256usize, 512] {
        let a = comm.upload(&values(size * size, 1)).expect("upload");
        let b = comm.upload(&values(size * size, 2)).expect("upload");
        let out = comm.buffer::<f32>(size * size).expect("buffer");
        for kernel in [
            MatmulKernel::Plain,
            MatmulKernel::Tiled,
            MatmulKernel::TiledLarge,
        ] {
            let spec = Matmul::new(size, size, size).kernel(kernel);
            bench.throughput(Throughput::Elements(spec.flops() as u64));
            bench.bench_function(format!("{kernel:?} {size}^3"), |bch| {
                bch.iter(|| {
                    ks.matmul(dev, &spec, a.view(), b.view(), out.view())
                        .expect("matmul");
                    ks.finish(dev, Duration::from_secs(600)).expect("finish");
                })
            });
        }
    }
    bench.finish();
}

/// One rank's block, weights and activations, kept across iterations.
struct Rank {
    kernels: Kernels,
    mlp: ParallelMlp,
    x: DeviceBuffer<f32>,
    y: DeviceBuffer<f32>,
    dx: DeviceBuffer<f32>,
}

fn mlp(c: &mut Criterion) {
    let (batch, d, ffn) = (64usize, 256usize, 1024usize);
    let w1 = values(d * ffn, 3);
    let w2 = values(ffn * d, 4);
    let mut bench = c.benchmark_group("tp_mlp_f32_b64_d256_f1024");
    bench.sample_size(10);
    bench.warm_up_time(Duration::from_millis(500));
    bench.throughput(Throughput::Elements(12 * (batch * d * ffn) as u64));
    for ranks in [1usize, 2, 4] {
        let mut group = CommGroup::builder().ranks(ranks).build().expect("adapters");
        let states: Vec<Mutex<Option<Rank>>> = (0..ranks).map(|_| Mutex::new(None)).collect();
        let setup = group.run_each(|comm| {
            let rank = Rank {
                kernels: Kernels::new(comm.device()),
                mlp: ParallelMlp::new(comm, (d, ffn, d), &w1, &w2)?,
                x: comm.upload(&values(batch * d, 5))?,
                y: comm.buffer(batch * d)?,
                dx: comm.buffer(batch * d)?,
            };
            *states[comm.rank()].lock().expect("state") = Some(rank);
            Ok(())
        });
        assert!(setup.iter().all(|r| r.is_ok()), "setup failed");
        bench.bench_function(format!("{ranks} ranks"), |bch| {
            bch.iter(|| {
                let results = group.run_each(|comm| {
                    let mut guard = states[comm.rank()].lock().expect("state");
                    let Some(s) = guard.as_mut() else {
                        panic!("rank state missing")
                    };
                    s.mlp
                        .forward(comm, &mut s.kernels, s.x.view(), s.y.view())?;
                    // dy = y: any gradient does for timing.
                    s.mlp
                        .backward(comm, &mut s.kernels, s.x.view(), s.y.view(), s.dx.view())?;
                    s.kernels.finish(comm.device(), Duration::from_secs(600))
                });
                assert!(results.iter().all(|r| r.is_ok()), "step failed");
            })
        });
    }
    bench.finish();
}

criterion_group!(benches, kernels, mlp);
criterion_main!(benches);
