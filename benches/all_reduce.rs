//! all_reduce (f32 sum, in place) on 4 ranks at 1 MiB and 16 MiB, with each algorithm, as one
//! group call. Criterion reports the per-rank buffer as throughput (algbw).
//!
//! `cargo bench --bench all_reduce`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wccl::{Algorithm, CallOptions, Collective, CommGroup, ReduceOp};

fn all_reduce(c: &mut Criterion) {
    let ranks = 4;
    let mut group = match CommGroup::builder().ranks(ranks).build() {
        Ok(g) => g,
        Err(e) => panic!("no adapter for the bench: {e}"),
    };
    let mut bench = c.benchmark_group("all_reduce_4_ranks");
    bench.sample_size(10);
    for mib in [1usize, 16] {
        let count = (mib << 20) / 4;
        let bufs: Vec<_> = (0..ranks)
            .map(|r| group.comm(r).upload(&vec![1.0f32; count]).expect("upload"))
            .collect();
        let calls: Vec<_> = bufs
            .iter()
            .map(|b| Collective::AllReduce {
                input: b.view(),
                output: b.view(),
                op: ReduceOp::Sum,
            })
            .collect();
        bench.throughput(Throughput::Bytes((count * 4) as u64));
        for algo in Algorithm::ALL {
            let opts = CallOptions {
                algorithm: Some(algo),
                ..CallOptions::default()
            };
            bench.bench_function(format!("{algo} {mib}MiB"), |b| {
                b.iter(|| group.run(&calls, opts).expect("all_reduce"))
            });
        }
    }
    bench.finish();
}

criterion_group!(benches, all_reduce);
criterion_main!(benches);
