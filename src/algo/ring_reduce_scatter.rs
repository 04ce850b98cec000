//! Ring reduce-scatter: n-1 steps around the ring, in scratch space, so that rank r ends with
//! the reduction of chunk r.

use super::plan::{Buf, Fold, Plan, Recv, Region, Source, slices};
use super::slices_per_chunk;
use crate::types::ReduceOp;

/// The plan of rank `rank` of `n` for a reduce-scatter of `n * count` elements into `count`.
///
/// The input is copied into scratch first, so the input is never modified, and in-place calls
/// (output inside the input) work the same way.
pub fn ring_reduce_scatter(
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
    plan.scratch = n * count;
    plan.copy(
        Region::new(Buf::Input, 0, n * count),
        Region::new(Buf::Scratch, 0, n * count),
    );
    let chunk = |c: usize| Region::new(Buf::Scratch, (c % n) * count, count);
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
    plan.copy(chunk(rank), out);
    if op == ReduceOp::Avg {
        plan.scale(out, n as u32);
    }
    plan
}
