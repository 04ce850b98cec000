//! Every collective x every op x every element type x in/out of place, on 1 to 4 ranks, at the
//! sizes that break chunking (0, 1, 3, N-1, N+1, 1000), against a CPU reference in f64; on 5
//! to 8 ranks every type at every size, in and out of place, with the ops in turn (every op
//! meets every type; see `common::ops_for`).

mod common;

use common::{Case, KINDS, check, group};
use wccl::model::{CostModel, Figures, Probe};
use wccl::{CollectiveKind, DType, ReduceOp};

fn reduces(kind: CollectiveKind) -> bool {
    matches!(
        kind,
        CollectiveKind::AllReduce | CollectiveKind::ReduceScatter | CollectiveKind::Reduce
    )
}

fn full_matrix(n: usize) {
    let mut g = group(n);
    let mut rng = rand::rng();
    let mut sizes = vec![0, 1, 3, n.saturating_sub(1), n + 1, 1000];
    sizes.dedup();
    // The whole product up to 4 ranks; the rank counts above it add chunk layouts, not kernels.
    let full = n <= 4;
    let mut cases = 0;
    for kind in KINDS {
        let ops: &[ReduceOp] = if reduces(kind) {
            &ReduceOp::ALL
        } else {
            &[ReduceOp::Sum]
        };
        for (d, dtype) in DType::ALL.into_iter().enumerate() {
            for (i, &count) in sizes.iter().enumerate() {
                for &op in common::ops_for(ops, d + i + 2 * n, full) {
                    for in_place in [false, true] {
                        let case = Case {
                            kind,
                            op,
                            dtype,
                            count,
                            in_place,
                            root: (i + cases) % n,
                            pad: i % 3,
                        };
                        check(&mut g, case, &mut rng);
                        cases += 1;
                    }
                }
            }
        }
    }
    g.barrier().expect("barrier after the matrix");
}

/// Broadcast, reduce and barrier on 17 ranks, where short ones run on the binomial trees and
/// the dissemination barrier (a rank count that is not a power of two: partial subtrees), every
/// type at the chunking sizes and the sizes either side of the tree's 64 KiB with the ops in
/// turn (at least 5 counts: every op meets every type), against the reference; then, where
/// `which_path` asks, that every op was reduced on both sides of 64 KiB and that the tree ran:
/// a tree root sends the buffer once per child (5 here), a chain's once. (Integer products
/// are left out: 17 factors of the test's values can pass 2^32.)
fn trees_on_17_ranks_with(slice_bytes: usize, counts: &[usize], which_path: bool) {
    let n = 17;
    assert!(
        counts.len() >= ReduceOp::ALL.len(),
        "every op must meet every type"
    );
    let mut g = common::group_with(n, wccl::CommConfig::default().slice_bytes(slice_bytes));
    let mut rng = rand::rng();
    let mut cases = 0;
    // The reduce's (op, on the tree) pairs that ran.
    let mut reduced = std::collections::HashSet::new();
    for kind in [CollectiveKind::Broadcast, CollectiveKind::Reduce] {
        let ops: &[ReduceOp] = if reduces(kind) {
            &ReduceOp::ALL
        } else {
            &[ReduceOp::Sum]
        };
        for (d, dtype) in DType::ALL.into_iter().enumerate() {
            let ops: Vec<ReduceOp> = ops
                .iter()
                .copied()
                .filter(|&op| !(op == ReduceOp::Prod && matches!(dtype, DType::I32 | DType::U32)))
                .collect();
            for (i, &count) in counts.iter().enumerate() {
                // One op per (type, count) in turn: 17 ranks are slow on 2 cores, and the
                // tree's path and slices follow the bytes, not the op. 2d + i puts every op
                // on both sides of 64 KiB (checked below).
                for &op in common::ops_for(&ops, 2 * d + i, false) {
                    if kind == CollectiveKind::Reduce {
                        let tree = count * dtype.size() <= 64 << 10;
                        reduced.insert((op, tree));
                    }
                    for in_place in [false, true] {
                        let case = Case {
                            kind,
                            op,
                            dtype,
                            count,
                            in_place,
                            root: (i * 5 + cases) % n,
                            pad: i % 3,
                        };
                        check(&mut g, case, &mut rng);
                        cases += 1;
                    }
                }
            }
        }
    }
    g.barrier().expect("a dissemination barrier");
    if !which_path {
        return;
    }
    // Every op reduced on the tree and on the chain (avg's scaling differs between them).
    for op in ReduceOp::ALL {
        for tree in [true, false] {
            assert!(
                reduced.contains(&(op, tree)),
                "{op:?} never reduced on the {}",
                if tree { "tree" } else { "chain" }
            );
        }
    }
    // 1,000 f32 on the tree, 16,385 (64 KiB and 4 bytes) on the chain.
    for (count, children) in [(1000usize, 5u64), (16_385, 1)] {
        let root = 3;
        let before = g.comm(root).bytes_sent();
        let case = Case {
            kind: CollectiveKind::Broadcast,
            op: ReduceOp::Sum,
            dtype: DType::F32,
            count,
            in_place: false,
            root,
            pad: 0,
        };
        check(&mut g, case, &mut rng);
        let sent = g.comm(root).bytes_sent() - before;
        let data = 4 * count as u64 * children;
        assert!(
            sent >= data && sent < data + 4 * count as u64,
            "{count} f32 from rank {root} of {n}: {sent} bytes sent, {children} copies expected"
        );
    }
}

#[test]
fn trees_on_17_ranks() {
    // 16,384 f32 and 32,768 f16 are the tree's last sizes, one more the chain's.
    trees_on_17_ranks_with(
        4 << 20,
        &[0, 1, 3, 16, 18, 1000, 16_384, 16_385, 32_769],
        true,
    );
}

#[test]
fn trees_on_17_ranks_in_odd_slices() {
    // 6-byte slices: three f16 (a slice edge inside a 32-bit word), one and a half f32. The
    // path check's 64 KiB chain broadcast would be 11,000 frames a hop here: left to the
    // test above, whose slices do not change which path runs.
    trees_on_17_ranks_with(6, &[1, 5, 18, 37, 101], false);
}

#[test]
fn matrix_1_rank() {
    full_matrix(1);
}
#[test]
fn matrix_2_ranks() {
    full_matrix(2);
}
#[test]
fn matrix_3_ranks() {
    full_matrix(3);
}
#[test]
fn matrix_4_ranks() {
    full_matrix(4);
}
#[test]
fn matrix_5_ranks() {
    full_matrix(5);
}
#[test]
fn matrix_6_ranks() {
    full_matrix(6);
}
#[test]
fn matrix_7_ranks() {
    full_matrix(7);
}
#[test]
fn matrix_8_ranks() {
    full_matrix(8);
}

/// The central (parameter-server pattern), naive (host round-trip), host-staged ring and
/// halving-doubling (on the devices and host-staged) all-reduces, over every op, type and
/// awkward size, on 1 to 5 ranks (3 and 5 fold a rank into halving-doubling's exchanges; from
/// 4 ranks on, every type and size with the ops in turn, see `common::ops_for`). The
/// host-staged ring runs both of its paths: in tensors mapped in place (where the device's
/// memory is the host's, as on the CI's lavapipe) and staged through host memory (tensors
/// that cannot be mapped).
#[test]
fn central_naive_and_staged_all_reduce() {
    let mut rng = rand::rng();
    let runs = [
        (wccl::Algorithm::Central, true),
        (wccl::Algorithm::Naive, true),
        (wccl::Algorithm::Staged, true),
        (wccl::Algorithm::Staged, false),
        (wccl::Algorithm::HalvingDoubling, true),
        (wccl::Algorithm::StagedHalvingDoubling, true),
    ];
    for (algorithm, mappable) in runs {
        // Halving-doubling up to 8 ranks: 6 and 7 fold two and three pairs into p = 4; the
        // host-staged one up to 6 (its schedule is the same, checked to 64 ranks by the
        // simulator).
        let most = match algorithm {
            wccl::Algorithm::HalvingDoubling => 8,
            wccl::Algorithm::StagedHalvingDoubling => 6,
            _ => 5,
        };
        for n in 1..=most {
            let config = wccl::CommConfig::default()
                .algorithm(algorithm)
                .slice_bytes(512);
            let mut g = common::group_with(n, config);
            for (d, dtype) in DType::ALL.into_iter().enumerate() {
                // 1000 in place and 1001 out of place: many slices each way.
                for (i, count) in [0, 1, 3, n + 1, 1000, 1001].into_iter().enumerate() {
                    // Every op at every cell up to 3 ranks; from 4 on, the ops in turn.
                    for &op in common::ops_for(&ReduceOp::ALL, d + i + 2 * n, n <= 3) {
                        // Pads 0, 1 and 2 both in and out of place: f16 views that start and
                        // end mid-word, mapped in place too.
                        let case = Case {
                            kind: CollectiveKind::AllReduce,
                            op,
                            dtype,
                            count,
                            in_place: i % 2 == 0,
                            root: 0,
                            pad: i % 3,
                        };
                        let before: Vec<u64> = (0..n).map(|r| g.comm(r).mapped_calls()).collect();
                        common::check_with(&mut g, case, &mut rng, mappable);
                        // Which path ran: in the tensors exactly where the ring stages on the
                        // host (n > 1, data to move), the device maps in place, and the
                        // tensors can be mapped; every such call, not just some.
                        for (r, &b) in before.iter().enumerate() {
                            let c = g.comm(r);
                            let expected = algorithm == wccl::Algorithm::Staged
                                && mappable
                                && n > 1
                                && count > 0
                                && c.device().unified_memory();
                            assert_eq!(
                                c.mapped_calls() - b,
                                u64::from(expected),
                                "{case:?}, {algorithm:?} on {n} ranks, rank {r}, mappable {mappable}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Reduce-scatter and all-gather on host memory (`Algorithm::Staged`), every op, type and
/// awkward size, in and out of place, on 1 to 5 ranks, in 512-byte slices (many per chunk),
/// against the f64 reference; then, on 4 ranks, the device traffic the executor counts: a
/// reduce-scatter of an N-byte input reads N back and uploads N/n, an all-gather into an
/// N-byte output reads back N/n and uploads (n-1)/n·N, against the device rings' (n-1)/n·N
/// each way (each step reads back what it sends); and the cost model's entries for the four
/// move the same.
#[test]
fn staged_reduce_scatter_and_all_gather() {
    let mut rng = rand::rng();
    for n in 1..=5 {
        let config = wccl::CommConfig::default()
            .algorithm(wccl::Algorithm::Staged)
            .slice_bytes(512);
        let mut g = common::group_with(n, config);
        for kind in [CollectiveKind::ReduceScatter, CollectiveKind::AllGather] {
            let ops: &[ReduceOp] = if kind == CollectiveKind::ReduceScatter {
                &ReduceOp::ALL
            } else {
                &[ReduceOp::Sum]
            };
            for &op in ops {
                for dtype in DType::ALL {
                    for (i, count) in [0, 1, 3, n + 1, 1000, 1001].into_iter().enumerate() {
                        let case = Case {
                            kind,
                            op,
                            dtype,
                            count,
                            in_place: i % 2 == 0,
                            root: 0,
                            pad: i % 3,
                        };
                        common::check_with(&mut g, case, &mut rng, true);
                    }
                }
            }
        }
    }
    let n = 4;
    let per = (1 << 14) + 3;
    let bytes = (n * per * 4) as f64;
    let unit = Figures {
        upload: 1.0,
        readback: 1.0,
        copy: 1.0,
        reduce: 1.0,
        host_reduce: 1.0,
        step: 0.0,
        native_copy: 1.0,
        frame: 0.0,
        call: 0.0,
        submit: 0.0,
        launch: 0.0,
        wait: 0.0,
        host_cached: 0.0,
    };
    let probe = Probe {
        alone: vec![unit; n],
        together: unit,
        shared: false,
        bytes: 0,
    };
    let unit_model = CostModel::new(probe, 16 << 10);
    for algorithm in [wccl::Algorithm::Ring, wccl::Algorithm::Staged] {
        let config = wccl::CommConfig::default()
            .algorithm(algorithm)
            .slice_bytes(16 << 10);
        let mut g = common::group_with(n, config);
        for kind in [CollectiveKind::ReduceScatter, CollectiveKind::AllGather] {
            for in_place in [false, true] {
                let before: Vec<u64> = (0..n).map(|r| g.comm(r).device_bytes()).collect();
                let case = Case {
                    kind,
                    op: ReduceOp::Sum,
                    dtype: DType::F32,
                    count: per,
                    in_place,
                    root: 0,
                    pad: 1,
                };
                common::check_with(&mut g, case, &mut rng, true);
                let nf = n as f64;
                let want = match (algorithm, kind) {
                    (wccl::Algorithm::Staged, CollectiveKind::ReduceScatter) => bytes + bytes / nf,
                    (wccl::Algorithm::Staged, _) => bytes / nf + (nf - 1.0) / nf * bytes,
                    _ => 2.0 * (nf - 1.0) / nf * bytes,
                };
                // The cost model's entry moves what the executor counted: at a byte a second
                // its read-back and upload terms are the bytes.
                let p = unit_model
                    .predict_call(kind, algorithm, bytes as usize, in_place)
                    .expect("the model has reduce-scatter and all-gather");
                let modelled: f64 = p
                    .terms
                    .iter()
                    .filter(|t| matches!(t.0, "readback" | "upload"))
                    .map(|t| t.1)
                    .sum();
                for (r, &b) in before.iter().enumerate() {
                    let moved = (g.comm(r).device_bytes() - b) as f64;
                    assert!(
                        (moved - want).abs() <= 0.01 * want,
                        "{algorithm:?} {kind:?} in place {in_place}, rank {r}: {moved} bytes, want {want}"
                    );
                    assert!(
                        (modelled - moved).abs() <= 0.01 * moved,
                        "{algorithm:?} {kind:?} in place {in_place}, rank {r}: the model moves {modelled} bytes, the executor counted {moved}"
                    );
                }
            }
        }
    }
}

/// A Vulkan CPU adapter (the CI's lavapipe) maps tensors in place: the test above checks the
/// mapped path there, not only the staging one. In CI (`CI` set: a machine with lavapipe and no
/// GPU) a Vulkan run must be on such an adapter, so that the mapped path cannot quietly turn
/// into the staging one.
#[test]
fn a_vulkan_cpu_adapter_maps_tensors_in_place() {
    let g = group(1);
    let dev = g.comm(0).device();
    let info = dev.info();
    let cpu_vulkan =
        info.device_type == wgpu::DeviceType::Cpu && info.backend == wgpu::Backend::Vulkan;
    // CI's second run asks for OpenGL (`WGPU_BACKEND=gl`); its first must be on Vulkan.
    let gl = std::env::var("WGPU_BACKEND").is_ok_and(|b| b.eq_ignore_ascii_case("gl"));
    if std::env::var_os("CI").is_some() && !gl {
        assert!(
            cpu_vulkan && dev.unified_memory(),
            "CI's Vulkan adapter: {info:?}"
        );
    }
    // MAPPABLE_PRIMARY_BUFFERS was asked for and granted wherever the adapter is one.
    assert_eq!(dev.unified_memory(), cpu_vulkan, "{info:?}");
    if cpu_vulkan {
        let usages = dev.tensor_usages();
        assert!(usages.contains(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::MAP_WRITE));
    }
}

/// Caller buffers need only `STORAGE | COPY_SRC`: without `COPY_DST` wccl writes through its
/// kernels instead of copies.
#[test]
fn buffers_without_copy_dst() {
    use wgpu::util::DeviceExt;
    let n = 3;
    let count = 1001;
    let mut g = group(n);
    let make = |g: &mut wccl::CommGroup, r: usize, v: &[f32]| {
        g.comm(r)
            .device()
            .device()
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(v),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            })
    };
    let inputs: Vec<Vec<f32>> = (0..n)
        .map(|r| (0..count).map(|i| (i % 7 + r) as f32).collect())
        .collect();
    let ins: Vec<_> = (0..n).map(|r| make(&mut g, r, &inputs[r])).collect();
    let outs: Vec<_> = (0..n)
        .map(|r| make(&mut g, r, &vec![f32::NAN; n * count]))
        .collect();
    fn t(b: &wgpu::Buffer, c: usize) -> wccl::TensorRef<'_> {
        wccl::TensorRef::new(b, 0, c, DType::F32)
    }
    let iv: Vec<_> = ins.iter().map(|b| t(b, count)).collect();
    let ov: Vec<_> = outs.iter().map(|b| t(b, count)).collect();
    g.all_reduce_into(&iv, &ov, ReduceOp::Sum)
        .expect("all_reduce");
    for (r, &o) in ov.iter().enumerate() {
        let got = g.comm(r).read::<f32>(o).unwrap();
        for (i, x) in got.iter().enumerate() {
            let e: f32 = (0..n).map(|q| inputs[q][i]).sum();
            assert_eq!(*x, e, "rank {r} element {i}");
        }
    }
    let ov: Vec<_> = outs.iter().map(|b| t(b, n * count)).collect();
    g.all_gather(&iv, &ov).expect("all_gather");
    for (r, &o) in ov.iter().enumerate() {
        assert_eq!(g.comm(r).read::<f32>(o).unwrap(), inputs.concat());
    }
}

/// Device traffic, counted by the executor (`Communicator::device_bytes`): per rank and N-byte
/// all-reduce on 4 ranks, the device ring reads back and uploads 2·2(n-1)/n·N = 3N, the
/// host-staged ring and halving-doubling N each way (at most 1.1·2N) through staging buffers,
/// and the staged ring nothing in tensors mapped in place. Every result is checked against the f64 reference too.
#[test]
fn device_traffic_of_the_ring_and_the_staged_ring() {
    let mut rng = rand::rng();
    let n = 4;
    let count = (1 << 16) + 3;
    let bytes = (count * 4) as f64;
    let runs = [
        (wccl::Algorithm::Ring, true, "device ring"),
        (
            wccl::Algorithm::Staged,
            false,
            "staged ring, staging buffers",
        ),
        (wccl::Algorithm::Staged, true, "staged ring, mapped tensors"),
        // Folds into host memory after reading it: never in the tensors, even mappable ones.
        (
            wccl::Algorithm::StagedHalvingDoubling,
            true,
            "staged halving-doubling",
        ),
    ];
    for (algorithm, mappable, what) in runs {
        let config = wccl::CommConfig::default()
            .algorithm(algorithm)
            .slice_bytes(64 << 10);
        let mut g = common::group_with(n, config);
        for in_place in [false, true] {
            let before: Vec<u64> = (0..n).map(|r| g.comm(r).device_bytes()).collect();
            let case = Case {
                kind: CollectiveKind::AllReduce,
                op: ReduceOp::Sum,
                dtype: DType::F32,
                count,
                in_place,
                root: 0,
                pad: 1,
            };
            common::check_with(&mut g, case, &mut rng, mappable);
            for (r, &b) in before.iter().enumerate() {
                let c = g.comm(r);
                // The check's own read-backs go through `DeviceBuffer`/`read`, not a call.
                let moved = (c.device_bytes() - b) as f64;
                let what = format!("{what}, in place {in_place}, rank {r}: {moved} bytes");
                let mapped =
                    algorithm == wccl::Algorithm::Staged && mappable && c.device().unified_memory();
                match (algorithm, mapped) {
                    (wccl::Algorithm::Ring, _) => {
                        let want = 2.0 * 2.0 * (n - 1) as f64 / n as f64 * bytes;
                        assert!((moved - want).abs() <= 0.01 * want, "{what}, want {want}");
                    }
                    (_, false) => assert!(
                        moved >= 2.0 * bytes && moved <= 1.1 * 2.0 * bytes,
                        "{what}, want 2N = {}",
                        2.0 * bytes
                    ),
                    (_, true) => assert_eq!(moved, 0.0, "{what}"),
                }
            }
        }
    }
}
