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
    steps(
        &mut plan,
        Buf::Scratch,
        n,
        rank,
        count,
        op,
        slice_elems,
        |_, _| {},
    );
    plan.copy(Region::new(Buf::Scratch, rank * count, count), out);
    if op == ReduceOp::Avg {
        plan.scale(out, n as u32);
    }
    plan
}

/// The ring's n-1 steps over `n` chunks of `count` elements laid out in `buf` (scratch on the
/// device, or host memory): at step s rank r sends chunk r-s-1 and folds in chunk r-s-2, so
/// that after n-1 steps chunk r is complete. `first` is called with each chunk before the
/// step that first touches it (chunk r-1 and r-2 before step 0, r-s-2 before step s): each
/// chunk once.
#[allow(clippy::too_many_arguments)]
pub(super) fn steps(
    plan: &mut Plan,
    buf: Buf,
    n: usize,
    rank: usize,
    count: usize,
    op: ReduceOp,
    slice_elems: usize,
    mut first: impl FnMut(&mut Plan, Region),
) {
    let chunk = |c: usize| Region::new(buf, (c % n) * count, count);
    let k = slices_per_chunk(count, slice_elems);
    let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
    for s in 0..n.saturating_sub(1) {
        let send = chunk(rank + 2 * n - s - 1);
        let recv = chunk(rank + 2 * n - s - 2);
        if s == 0 {
            first(plan, send);
        }
        first(plan, recv);
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
}
