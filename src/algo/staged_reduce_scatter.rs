//! The host-staged ring reduce-scatter: read the input back once, run the ring's n-1 steps on
//! host memory, folding on the CPU, and upload only this rank's reduced chunk. Per rank that is
//! N bytes read back and N/n uploaded for an N-byte input, against (n-1)/n·N each way (and a
//! device copy of the whole input into scratch) for the device ring, and no device round trip
//! or kernel per step: where the host folds about as fast as the device (a CPU adapter), or
//! where each step's round trip costs more than its bytes (small calls), it is the faster one.
//! The link traffic is the ring's (n-1)/n·N.

use super::plan::{Buf, Fold, Plan, Recv, Region, Source, slices};
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
    let total = n * count;
    plan.host = total;
    // The input is only read: in-place calls (the output inside the input) work the same way.
    // Read back slice by slice (a read-back fits a staging slot).
    let whole = slices_per_chunk(total, slice_elems);
    let (input, host) = (
        Region::new(Buf::Input, 0, total),
        Region::new(Buf::Host, 0, total),
    );
    for (i, h) in slices(input, whole).zip(slices(host, whole)) {
        plan.copy(i, h);
    }
    let chunk = |c: usize| Region::new(Buf::Host, (c % n) * count, count);
    let k = slices_per_chunk(count, slice_elems);
    let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
    // At step s send chunk r-s-1 and fold in chunk r-s-2: after n-1 steps chunk r is complete.
    for s in 0..n - 1 {
        let send = chunk(rank + 2 * n - s - 1);
        let recv = chunk(rank + 2 * n - s - 2);
        for (sd, rv) in slices(send, k).zip(slices(recv, k)) {
            plan.transfer(
                Some((next, Source::Device(sd))),
                Some(Recv {
                    from: prev,
                    dst: rv,
                    combine: op.combine(),
                    fold: Fold::Dst,
                }),
            );
        }
    }
    // Avg divides on the host too: no kernel at all.
    if op == ReduceOp::Avg {
        plan.scale(chunk(rank), n as u32);
    }
    for (h, o) in slices(chunk(rank), k).zip(slices(out, k)) {
        plan.copy(h, o);
    }
    plan
}
