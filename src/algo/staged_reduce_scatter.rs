//! The host-staged ring reduce-scatter: read the input back once, chunk by chunk as the ring
//! first needs each, run the ring's n-1 steps on host memory, folding on the CPU, and upload
//! only this rank's reduced chunk. Per rank that is N bytes read back and N/n uploaded for an
//! N-byte input, against (n-1)/n·N each way (and a device copy of the whole input into
//! scratch) for the device ring: (n+1)/n·N against 2(n-1)/n·N, more on 2 ranks, as much on 3,
//! less from 4. What it saves at any rank count is the device round trip and the kernel of
//! every step: where the host folds about as fast as the device (a CPU adapter), or where each
//! step's round trip costs more than its bytes (small calls), it is the faster one. The link
//! traffic is the ring's (n-1)/n·N.

use super::plan::{Buf, Plan, Region, slices};
use super::slices_per_chunk;
use crate::types::ReduceOp;

/// The plan of rank `rank` of `n` for a host-staged reduce-scatter of `n * count` elements
/// into `count`: the input read back into host memory, the ring's steps there (rank r ends with
/// the reduction of chunk r, as the device ring), then chunk r uploaded into the output.
///
/// ```
/// use wccl::{ReduceOp, algo::staged_reduce_scatter};
/// let plan = staged_reduce_scatter(4, 1, 250, ReduceOp::Sum, 1 << 20);
/// assert_eq!(plan.sends(), 4 - 1);
/// assert_eq!((plan.host, plan.scratch), (1000, 0));
/// ```
pub fn staged_reduce_scatter(
    n: usize,
    rank: usize,
    count: usize,
    op: ReduceOp,
    slice_elems: usize,
) -> Plan {
    let mut plan = Plan::default();
    let out = Region::new(Buf::Output, 0, count);
    if n == 1 {
        plan.copy(Region::new(Buf::Input, 0, count), out);
        return plan;
    }
    plan.host = n * count;
    let k = slices_per_chunk(count, slice_elems);
    // The device ring's steps, between host memories. Each chunk is read back just before the
    // step that first needs it, slice by slice (a read-back fits a staging slot), so that the
    // executor's read-ahead overlaps the later chunks' read-backs with the early steps. The
    // input is only read, and the output written only at the end: in-place calls (the output
    // inside the input) work the same way.
    let read_back = |plan: &mut Plan, chunk: Region| {
        let from = Region::new(Buf::Input, chunk.offset, chunk.len);
        for (i, h) in slices(from, k).zip(slices(chunk, k)) {
            plan.copy(i, h);
        }
    };
    super::ring_reduce_scatter::steps(
        &mut plan,
        Buf::Host,
        n,
        rank,
        count,
        op,
        slice_elems,
        read_back,
    );
    let mine = Region::new(Buf::Host, rank * count, count);
    // Avg divides on the host too: no kernel at all.
    if op == ReduceOp::Avg {
        plan.scale(mine, n as u32);
    }
    for (h, o) in slices(mine, k).zip(slices(out, k)) {
        plan.copy(h, o);
    }
    plan
}
