//! The host-staged halving-doubling all-reduce (Gloo's `CudaAllreduceHalvingDoubling` stages
//! through host memory the same way): read the buffer back once, run recursive halving and
//! doubling on host memory, folding on the CPU, and upload the result once. Small messages at
//! scale pay per step; here a step is a frame between hosts and a fold on the CPU, with no
//! device round trip, so the 2·log2(p) exchanges cost what the link and the host charge, and
//! the device sees one read-back and one upload per rank whatever the rank count.
//!
//! Unlike the host-staged ring, it folds into host memory in place (a window is folded, then
//! half of it sent on), so host memory is read after it is written: the plan is not
//! [`host_split`](super::Plan::host_split), and on a unified-memory device it still copies the
//! tensors in and out of host memory.

use super::halving_doubling_all_reduce::exchanges;
use super::plan::{Buf, Plan, Region, slices};
use super::slices_per_chunk;
use crate::types::ReduceOp;

/// The plan of rank `rank` of `n` for a host-staged halving-doubling all-reduce of `count`
/// elements: the input read back into host memory slice by slice, halving-doubling's
/// exchanges there (see [`halving_doubling_all_reduce`](super::halving_doubling_all_reduce)),
/// the result uploaded into the output.
///
/// ```
/// use wccl::{ReduceOp, algo::staged_halving_doubling_all_reduce};
/// // 32 ranks: 5 halving and 5 doubling exchanges, all between host memories.
/// let plan = staged_halving_doubling_all_reduce(32, 7, 1000, ReduceOp::Sum, 1 << 20);
/// assert_eq!(plan.sends(), 10);
/// assert_eq!(plan.host, 1000);
/// ```
pub fn staged_halving_doubling_all_reduce(
    n: usize,
    rank: usize,
    count: usize,
    op: ReduceOp,
    slice_elems: usize,
) -> Plan {
    let mut plan = Plan::default();
    let input = Region::new(Buf::Input, 0, count);
    let output = Region::new(Buf::Output, 0, count);
    if n < 2 {
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
    exchanges(&mut plan, Buf::Host, n, rank, count, op, slice_elems);
    for (h, o) in slices(host, whole).zip(slices(output, whole)) {
        plan.copy(h, o);
    }
    plan
}
