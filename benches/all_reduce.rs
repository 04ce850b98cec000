//! all_reduce (ring, f32 sum) on 4 ranks at 1 MiB and 16 MiB, as one group call.
//!
//! `cargo bench --bench all_reduce`; criterion reports the per-rank buffer as throughput (algbw).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wccl::{CommGroup, ReduceOp};

fn all_reduce(c: &mut Criterion) {
    let ranks = 4;
    let mut group = match CommGroup::builder().ranks(ranks).build() {
        Ok(g) => g,
        Err(e) => panic!("no adapter for the bench: {e}"),
    };
    let mut bench = c.benchmark_group("all_reduce_ring_4_ranks");
    bench.sample_size(10);
    for mib in [1usize, 16] {
        let count = (mib << 20) / 4;
        let bufs: Vec<_> = (0..ranks)
            .map(|r| group.comm(r).upload(&vec![1.0f32; count]).expect("upload"))
            .collect();
        let views: Vec<_> = bufs.iter().map(|b| b.view()).collect();
        bench.throughput(Throughput::Bytes((count * 4) as u64));
        bench.bench_function(format!("{mib}MiB"), |b| {
            b.iter(|| group.all_reduce(&views, ReduceOp::Sum).expect("all_reduce"))
        });
    }
    bench.finish();
}

criterion_group!(benches, all_reduce);
criterion_main!(benches);
