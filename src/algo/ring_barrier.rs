//! Barrier: n-1 empty frames around the ring; after step t a rank knows that the t+1 ranks
//! before it have arrived, so after n-1 steps every rank knows all have.

use super::plan::{Buf, Fold, Plan, Recv, Region, Source};
use crate::types::Combine;

/// The plan of rank `rank` of `n` for a barrier.
pub fn ring_barrier(n: usize, rank: usize) -> Plan {
    let mut plan = Plan::default();
    let empty = Region::new(Buf::Output, 0, 0);
    for _ in 1..n {
        plan.transfer(
            Some(((rank + 1) % n, Source::Device(empty))),
            Some(Recv {
                from: (rank + n - 1) % n,
                dst: empty,
                combine: Combine::Copy,
                fold: Fold::Dst,
            }),
        );
    }
    plan
}
