//! The host-staged ring all-gather: read this rank's piece back once, pass the pieces around
//! the ring on host memory, and upload each piece received into its place as it arrives. Per
//! rank that is N/n bytes read back and (n-1)/n·N uploaded for an N-byte output, against
//! (n-1)/n·N each way for the device ring (every step reads back the piece it forwards), and no
//! device round trip per step. The link traffic is the ring's (n-1)/n·N.

use super::plan::{Buf, Fold, Plan, Recv, Region, Source, slices};
use super::slices_per_chunk;
use crate::types::Combine;

/// The plan of rank `rank` of `n` for a host-staged all-gather of `count` elements per rank
/// into an output of `n * count` (rank r's piece at `r * count`).
///
/// ```
/// use wccl::algo::staged_all_gather;
/// let plan = staged_all_gather(4, 2, 250, 1 << 20);
/// assert_eq!(plan.sends(), 4 - 1);
/// assert_eq!(plan.host, 1000);
/// ```
pub fn staged_all_gather(n: usize, rank: usize, count: usize, slice_elems: usize) -> Plan {
    let mut plan = Plan::default();
    let input = Region::new(Buf::Input, 0, count);
    let piece = |buf: Buf, r: usize| Region::new(buf, (r % n) * count, count);
    // Its own piece stays on the device (skipped in place, where it is already there).
    plan.copy(input, piece(Buf::Output, rank));
    if n == 1 {
        return plan;
    }
    plan.host = n * count;
    let k = slices_per_chunk(count, slice_elems);
    // Read back slice by slice (a read-back fits a staging slot).
    for (i, h) in slices(input, k).zip(slices(piece(Buf::Host, rank), k)) {
        plan.copy(i, h);
    }
    let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
    for t in 0..n - 1 {
        let send = piece(Buf::Host, rank + n - t);
        let recv = piece(Buf::Host, rank + 2 * n - t - 1);
        let place = piece(Buf::Output, rank + 2 * n - t - 1);
        for ((sd, rv), o) in slices(send, k).zip(slices(recv, k)).zip(slices(place, k)) {
            plan.transfer(
                Some((next, Source::Device(sd))),
                Some(Recv {
                    from: prev,
                    dst: rv,
                    combine: Combine::Copy,
                    fold: Fold::Dst,
                }),
            );
            plan.copy(rv, o);
        }
    }
    plan
}
