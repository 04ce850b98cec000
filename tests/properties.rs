//! Property tests: random rank counts, sizes, roots, offsets, slice sizes, collectives, ops and
//! element types, each checked against the f64 reference.

mod common;

use std::cell::RefCell;
use std::collections::HashMap;

use common::{Case, check, group_with};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use wccl::{CollectiveKind, CommConfig, CommGroup, DType, ReduceOp};

fn kind() -> impl Strategy<Value = CollectiveKind> {
    prop_oneof![
        Just(CollectiveKind::AllReduce),
        Just(CollectiveKind::ReduceScatter),
        Just(CollectiveKind::AllGather),
        Just(CollectiveKind::Broadcast),
        Just(CollectiveKind::Reduce),
    ]
}

#[test]
fn any_collective_matches_the_reference() {
    // Opening devices is the slow part: one group per (ranks, slice size), reused across cases.
    let groups: RefCell<HashMap<(usize, usize), CommGroup>> = RefCell::new(HashMap::new());
    let strategy = (
        1usize..=6,
        kind(),
        prop::sample::select(ReduceOp::ALL.to_vec()),
        prop::sample::select(DType::ALL.to_vec()),
        prop_oneof![0usize..16, 0usize..3000],
        any::<bool>(),
        any::<usize>(),
        0usize..5,
        prop::sample::select(vec![64usize, 1000, 4 << 20]),
    );
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 64,
        ..ProptestConfig::default()
    });
    let result = runner.run(
        &strategy,
        |(n, kind, op, dtype, count, in_place, root_seed, pad, slice_bytes)| {
            let mut groups = groups.borrow_mut();
            let g = groups
                .entry((n, slice_bytes))
                .or_insert_with(|| group_with(n, CommConfig::default().slice_bytes(slice_bytes)));
            let case = Case {
                kind,
                op,
                dtype,
                count,
                in_place,
                root: root_seed % n,
                pad,
            };
            check(g, case, &mut rand::rng());
            Ok(())
        },
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}
