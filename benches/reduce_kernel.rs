//! The reduce kernel alone (`dst += src`, f32) at 1 MiB and 16 MiB, and the adapter's own
//! `copy_buffer_to_buffer` of the same bytes beside it. Throughput counts the traffic: 3 x bytes
//! for the reduce (two reads, one write), 2 x bytes for the copy.
//!
//! `cargo bench --bench reduce_kernel`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wccl::{CommGroup, ReduceOp};

fn reduce_kernel(c: &mut Criterion) {
    let mut group = match CommGroup::builder().ranks(1).build() {
        Ok(g) => g,
        Err(e) => panic!("no adapter for the bench: {e}"),
    };
    let mut bench = c.benchmark_group("reduce_kernel_f32");
    bench.sample_size(10);
    for mib in [1usize, 16] {
        let count = (mib << 20) / 4;
        let comm = group.comm_mut(0);
        let dst = comm.upload(&vec![1.0f32; count]).expect("upload");
        let src = comm.upload(&vec![0.0f32; count]).expect("upload");
        bench.throughput(Throughput::Bytes(3 * (count * 4) as u64));
        bench.bench_function(format!("sum {mib}MiB"), |b| {
            b.iter(|| {
                comm.reduce_local(&dst, &src, ReduceOp::Sum)
                    .expect("reduce")
            })
        });
        let dev = comm.device();
        bench.throughput(Throughput::Bytes(2 * (count * 4) as u64));
        bench.bench_function(format!("copy_buffer_to_buffer {mib}MiB"), |b| {
            b.iter(|| {
                let mut enc = dev.device().create_command_encoder(&Default::default());
                enc.copy_buffer_to_buffer(src.raw(), 0, dst.raw(), 0, (count * 4) as u64);
                dev.queue().submit([enc.finish()]);
                dev.device()
                    .poll(wgpu::PollType::wait_indefinitely())
                    .expect("poll");
            })
        });
    }
    bench.finish();
}

criterion_group!(benches, reduce_kernel);
criterion_main!(benches);
