//! Large and awkward sizes: 2^20+7 elements with many pipeline slices in flight, tensors past the
//! storage-binding limit (real and lowered), and more workgroups than one dispatch dimension
//! holds.

mod common;

use common::{Case, KINDS, check, group, group_with};

use wccl::{CollectiveKind, CommConfig, DType, ReduceOp};

const BIG: usize = (1 << 20) + 7;

fn case(kind: CollectiveKind, op: ReduceOp, dtype: DType, count: usize, in_place: bool) -> Case {
    Case {
        kind,
        op,
        dtype,
        count,
        in_place,
        root: 1,
        pad: 1,
    }
}

#[test]
fn two_to_the_20_plus_7_on_3_ranks_in_many_slices() {
    // 64 KiB slices: each ring step is cut into several slices, so read-backs run ahead.
    let config = CommConfig::default().slice_bytes(64 << 10);
    let mut g = group_with(3, config);
    let mut rng = rand::rng();
    for kind in KINDS {
        for (dtype, op) in [(DType::F32, ReduceOp::Sum), (DType::F16, ReduceOp::Max)] {
            check(&mut g, case(kind, op, dtype, BIG, false), &mut rng);
        }
    }
    check(
        &mut g,
        case(
            CollectiveKind::AllReduce,
            ReduceOp::Avg,
            DType::I32,
            BIG,
            true,
        ),
        &mut rng,
    );
}

#[test]
fn two_to_the_20_plus_7_on_8_ranks() {
    let mut g = group(8);
    let mut rng = rand::rng();
    for kind in KINDS {
        check(
            &mut g,
            case(kind, ReduceOp::Sum, DType::F32, BIG, true),
            &mut rng,
        );
    }
    check(
        &mut g,
        case(
            CollectiveKind::AllReduce,
            ReduceOp::Prod,
            DType::U32,
            BIG,
            false,
        ),
        &mut rng,
    );
}

#[test]
fn lowered_binding_limit_forces_chunked_kernels() {
    // A 4 KiB binding limit turns every copy, scale and reduce into many dispatches.
    let config = CommConfig::default().max_binding_bytes(4096);
    let mut g = group_with(3, config);
    let mut rng = rand::rng();
    for kind in KINDS {
        for dtype in [DType::F32, DType::F16] {
            for in_place in [false, true] {
                check(
                    &mut g,
                    case(kind, ReduceOp::Avg, dtype, 10_001, in_place),
                    &mut rng,
                );
            }
        }
    }
}

#[test]
fn over_the_storage_binding_limit() {
    // 130 MiB of f32 per rank, past lavapipe's 128 MiB binding limit (and held to that limit on
    // adapters that allow more): the out-of-place copy is chunked, and its dispatch needs more
    // than 65,535 workgroups in one dimension.
    let config = CommConfig::default().max_binding_bytes(128 << 20);
    let mut g = group_with(2, config);
    let count = (130usize << 20) / 4;
    let mut rng = rand::rng();
    check(
        &mut g,
        case(
            CollectiveKind::AllReduce,
            ReduceOp::Sum,
            DType::F32,
            count,
            false,
        ),
        &mut rng,
    );
}

#[test]
fn two_to_the_20_plus_7_on_every_rank_count() {
    let mut rng = rand::rng();
    for n in 1..=8 {
        let mut g = group(n);
        check(
            &mut g,
            case(
                CollectiveKind::AllReduce,
                ReduceOp::Sum,
                DType::F32,
                BIG,
                n % 2 == 0,
            ),
            &mut rng,
        );
    }
}
