//! The host-staged ring all-gather: read this rank's piece back once, pass the pieces around
//! the ring on host memory, and upload each piece received into its place as it arrives. Per
//! rank that is N/n bytes read back and (n-1)/n·N uploaded for an N-byte output, against
//! (n-1)/n·N each way for the device ring (every step reads back the piece it forwards), and no
//! device round trip per step. The link traffic is the ring's (n-1)/n·N.

use super::plan::{Buf, Plan, Region, Source, slices};
use super::ring_all_gather::{step_slices, take};
use super::slices_per_chunk;

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
    // The device ring's steps, between host memories; each slice received is uploaded into
    // its place in the output (host memory mirrors the output's layout).
    for (sd, rv) in step_slices(Buf::Host, n, rank, count, slice_elems) {
        plan.transfer(
            Some(((rank + 1) % n, Source::Device(sd))),
            Some(take(n, rank, rv)),
        );
        plan.copy(rv, Region::new(Buf::Output, rv.offset, rv.len));
    }
    plan
}
