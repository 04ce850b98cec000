//! Ring all-gather: each rank places its piece, then n-1 steps pass pieces around the ring.

use super::plan::{Buf, Fold, Plan, Recv, Region, Source, slices};
use super::slices_per_chunk;
use crate::types::Combine;

/// The plan of rank `rank` of `n` for an all-gather of `count` elements per rank into an output
/// of `n * count` (rank r's piece at `r * count`).
pub fn ring_all_gather(n: usize, rank: usize, count: usize, slice_elems: usize) -> Plan {
    let mut plan = Plan::default();
    let piece = |r: usize| Region::new(Buf::Output, (r % n) * count, count);
    plan.copy(Region::new(Buf::Input, 0, count), piece(rank));
    if n == 1 {
        return plan;
    }
    let k = slices_per_chunk(count, slice_elems);
    let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
    for t in 0..n - 1 {
        let send = piece(rank + n - t);
        let recv = piece(rank + 2 * n - t - 1);
        for (sd, rv) in slices(send, k).zip(slices(recv, k)) {
            plan.transfer(
                Some((next, Source::Device(sd))),
                Some(Recv {
                    from: prev,
                    dst: rv,
                    combine: Combine::Copy,
                    fold: Fold::Dst,
                }),
            );
        }
    }
    plan
}
