//! wccl and the caller's own work on a shared device: wccl catches its own errors with error
//! scopes and leaves the caller's uncaptured-error handler alone, also with two ranks on one
//! device.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

mod common;

use wccl::{CommConfig, CommGroup, Error, ReduceOp};

/// The caller's own device on the first primary adapter (the software adapter in CI).
fn user_device() -> (wgpu::Device, wgpu::Queue) {
    common::user_devices(1).remove(0)
}

/// Installs the caller's uncaptured-error handler: it counts what reaches it.
fn counting_handler(device: &wgpu::Device) -> Arc<AtomicUsize> {
    let caught = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&caught);
    device.on_uncaptured_error(Arc::new(move |_e: wgpu::Error| {
        c.fetch_add(1, Ordering::SeqCst);
    }));
    caught
}

/// A validation error in the caller's own work: a copy past the end of a buffer.
fn user_mistake(device: &wgpu::Device, queue: &wgpu::Queue) {
    let make = || {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("user buffer"),
            size: 16,
            usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    };
    let (a, b) = (make(), make());
    let mut enc = device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(&a, 0, &b, 0, 64);
    queue.submit([enc.finish()]);
}

/// Inputs distinct per (rank, element), period 1009.
fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + rank * 131) % 1009) as f32)
        .collect()
}

/// Two ranks on the caller's one device.
fn two_ranks_on(device: &wgpu::Device, queue: &wgpu::Queue) -> CommGroup {
    CommGroup::from_devices(
        vec![
            (device.clone(), queue.clone()),
            (device.clone(), queue.clone()),
        ],
        CommConfig::default(),
    )
    .expect("a group on the caller's device")
}

#[test]
fn the_callers_errors_stay_the_callers_and_collectives_still_work() {
    let (device, queue) = user_device();
    let caught = counting_handler(&device);
    // Two ranks on the one device.
    let mut g = two_ranks_on(&device, &queue);
    let len = 3001;
    let bufs: Vec<_> = (0..2)
        .map(|r| g.comm(r).upload(&input(r, len)).expect("upload"))
        .collect();

    user_mistake(&device, &queue);
    // wgpu reports a bad copy at finish and again at submit: count what one mistake gives.
    let per_mistake = caught.load(Ordering::SeqCst);
    assert!(
        per_mistake >= 1,
        "the caller's handler sees the caller's error"
    );

    let views: Vec<_> = bufs.iter().map(|b| b.view()).collect();
    g.all_reduce(&views, ReduceOp::Sum)
        .expect("the caller's error does not fail a collective");
    user_mistake(&device, &queue);
    g.all_reduce(&views, ReduceOp::Sum)
        .expect("nor the next one");
    for (r, buf) in bufs.iter().enumerate() {
        let got = g.comm(r).download(buf).expect("download");
        for (i, &v) in got.iter().enumerate() {
            // Two all-reduces of two ranks: 2 * (a + b).
            let want = 2.0 * (input(0, len)[i] as f64 + input(1, len)[i] as f64);
            assert_eq!(v as f64, want, "rank {r} element {i}");
        }
    }
    assert_eq!(
        caught.load(Ordering::SeqCst),
        2 * per_mistake,
        "the caller's handler saw its two mistakes and nothing of wccl's"
    );
}

#[test]
fn wccls_own_errors_are_still_values_on_a_callers_device() {
    let (device, queue) = user_device();
    let caught = counting_handler(&device);
    let mut g = CommGroup::from_devices(vec![(device.clone(), queue)], CommConfig::default())
        .expect("a group");
    let input = g.comm(0).upload(&[1.0f32; 64]).expect("upload");
    let output = g.comm(0).buffer::<f32>(64).expect("buffer");
    device.destroy();
    let e = g
        .comm_mut(0)
        .all_reduce_into(&input, &output, ReduceOp::Sum)
        .expect_err("a destroyed device cannot run a collective");
    assert!(matches!(e, Error::Device { .. }), "{e}");
    assert_eq!(e.rank(), Some(0));
    assert_eq!(
        caught.load(Ordering::SeqCst),
        0,
        "wccl's errors on the destroyed device went to the caller's handler"
    );
}

#[test]
fn a_validation_error_in_wccls_work_is_every_ranks_error_not_the_callers() {
    let (device, queue) = user_device();
    let caught = counting_handler(&device);
    let mut g = two_ranks_on(&device, &queue);
    let len = 5000;
    let bufs: Vec<wgpu::Buffer> = (0..2)
        .map(|r| {
            let b = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("caller's tensor"),
                size: (len * 4) as u64,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            queue.write_buffer(&b, 0, bytemuck::cast_slice(&input(r, len)));
            b
        })
        .collect();
    // Rank 1's tensor is destroyed behind wccl's back: using it is a validation error in
    // wccl's own device work.
    bufs[1].destroy();
    let views: Vec<_> = bufs
        .iter()
        .map(|b| wccl::TensorRef::new(b, 0, len, wccl::DType::F32))
        .collect();
    let results = g.run_each(|c| c.all_reduce(views[c.rank()], ReduceOp::Sum));
    for (r, res) in results.iter().enumerate() {
        assert!(
            res.is_err(),
            "rank {r} returned Ok from a call that failed on rank 1"
        );
    }
    assert!(
        results
            .iter()
            .any(|e| matches!(e, Err(Error::Device { .. }))),
        "the failing rank reports a device error: {results:?}"
    );
    assert_eq!(
        caught.load(Ordering::SeqCst),
        0,
        "wccl's error went to the caller's handler"
    );
}

#[test]
fn reading_a_destroyed_buffer_is_this_calls_error_not_the_next_ones() {
    let (device, queue) = user_device();
    let g = CommGroup::from_devices(vec![(device.clone(), queue.clone())], CommConfig::default())
        .expect("a group");
    let buf = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("caller's tensor"),
        size: 4096,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    buf.destroy();
    let view = wccl::TensorRef::new(&buf, 0, 1024, wccl::DType::F32);
    let e = g
        .comm(0)
        .read::<f32>(view)
        .expect_err("a read of a destroyed buffer cannot succeed");
    assert!(matches!(e, Error::Device { .. }), "{e}");
    // The error was this call's: the next call on the rank is not blamed for it.
    let ok = g
        .comm(0)
        .upload(&[1.0f32; 8])
        .expect("the next call is clean");
    assert_eq!(g.comm(0).download(&ok).expect("download"), vec![1.0f32; 8]);
}

#[test]
fn a_rank_that_panics_in_a_group_call_releases_its_peers_at_once() {
    let config = CommConfig::default().timeout(std::time::Duration::from_secs(120));
    let mut g = CommGroup::builder()
        .ranks(3)
        .config(config)
        .build()
        .expect("a group");
    let bufs: Vec<_> = (0..3)
        .map(|r| g.comm(r).upload(&input(r, 1000)).expect("upload"))
        .collect();
    let results = g.run_each(|c| {
        if c.rank() == 1 {
            panic!("rank 1 fails before the call");
        }
        c.all_reduce(&bufs[c.rank()], ReduceOp::Sum)
    });
    assert!(
        matches!(results[1], Err(Error::Panicked { .. })),
        "{:?}",
        results[1]
    );
    for r in [0, 2] {
        // Told by rank 1's abort, not released by the 120 s deadline.
        assert!(
            matches!(&results[r], Err(Error::PeerAborted { peer: 1, .. })),
            "rank {r}: {:?}",
            results[r]
        );
    }
}
