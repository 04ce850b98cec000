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
    for (sd, rv) in step_slices(Buf::Output, n, rank, count, slice_elems) {
        plan.transfer(
            Some(((rank + 1) % n, Source::Device(sd))),
            Some(take(n, rank, rv)),
        );
    }
    plan
}

/// The ring's n-1 steps over `n` pieces of `count` elements laid out in `buf` (the output on
/// the device, or host memory), in order, slice by slice: (the slice rank `rank` sends, the
/// slice it receives). At step t it sends piece r-t and receives piece r-t-1.
pub(super) fn step_slices(
    buf: Buf,
    n: usize,
    rank: usize,
    count: usize,
    slice_elems: usize,
) -> Vec<(Region, Region)> {
    let piece = |r: usize| Region::new(buf, (r % n) * count, count);
    let k = slices_per_chunk(count, slice_elems);
    (0..n.saturating_sub(1))
        .flat_map(|t| {
            let send = piece(rank + n - t);
            let recv = piece(rank + 2 * n - t - 1);
            slices(send, k).zip(slices(recv, k))
        })
        .collect()
}

/// Receiving slice `dst` of a piece from the previous rank, copied into place.
pub(super) fn take(n: usize, rank: usize, dst: Region) -> Recv {
    Recv {
        from: (rank + n - 1) % n,
        dst,
        combine: Combine::Copy,
        fold: Fold::Dst,
    }
}
