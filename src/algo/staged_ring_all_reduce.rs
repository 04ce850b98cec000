//! The host-staged ring all-reduce (Gloo's "CUDA staged" ring, for wgpu): read the buffer back
//! once, run the ring's reduce-scatter and all-gather on host memory, folding on the CPU, and
//! upload the result once. Per rank that is N bytes each way between device and host for an
//! N-byte buffer, against 2(n-1)/n·N each way for the device ring (every ring step reads back
//! the chunk it sends and uploads the chunk it receives): 2/3 of it at 4 ranks, the same at 2.
//! The link traffic is the ring's 2(n-1)/n·N. Where the host folds faster than the device's
//! kernel plus its copies (a CPU adapter; over TCP), it is the faster ring.
//!
//! Not yet overlapped: the executor finishes a read-back into host memory before the next
//! action, so the call runs its read-back, its ring and its upload one after the other
//! (issue 14 overlaps them slice by slice).

use super::plan::{Buf, Plan, Region, slices};
use super::ring_all_reduce::ring_steps;
use super::{partition, slices_per_chunk};
use crate::types::ReduceOp;

/// The plan of rank `rank` of `n` for a host-staged ring all-reduce of `count` elements: one
/// read-back of the input into host memory (slice by slice), the ring on host memory, one
/// upload of the result into the output.
///
/// ```
/// use wccl::{ReduceOp, algo::staged_ring_all_reduce};
/// let plan = staged_ring_all_reduce(4, 0, 1000, ReduceOp::Sum, 1 << 20);
/// assert_eq!(plan.sends(), 2 * (4 - 1));
/// assert_eq!(plan.host, 1000);
/// ```
pub fn staged_ring_all_reduce(
    n: usize,
    rank: usize,
    count: usize,
    op: ReduceOp,
    slice_elems: usize,
) -> Plan {
    let mut plan = Plan::default();
    let input = Region::new(Buf::Input, 0, count);
    let output = Region::new(Buf::Output, 0, count);
    if n == 1 {
        // Nothing to exchange: an out-of-place call is a copy (in place, the same memory).
        plan.copy(input, output);
        return plan;
    }
    plan.host = count;
    let host = Region::new(Buf::Host, 0, count);
    let whole = slices_per_chunk(count, slice_elems);
    for (i, h) in slices(input, whole).zip(slices(host, whole)) {
        plan.copy(i, h);
    }
    let chunks: Vec<Region> = partition(count, n)
        .into_iter()
        .map(|(s, l)| Region::new(Buf::Host, s, l))
        .collect();
    ring_steps(&mut plan, &chunks, n, rank, op, slice_elems);
    for (h, o) in slices(host, whole).zip(slices(output, whole)) {
        plan.copy(h, o);
    }
    plan
}
