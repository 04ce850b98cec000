//! Ring all-reduce: a reduce-scatter then an all-gather around the ring, 2(n-1) steps of S/n,
//! each step cut into slices so read-back, transfer and reduction of successive slices overlap.

use super::plan::{Buf, Fold, Plan, Recv, Region, Source, slices};
use super::{partition, slices_per_chunk};
use crate::types::{Combine, ReduceOp};

/// The plan of rank `rank` of `n` for an all-reduce of `count` elements. Out-of-place calls copy
/// the input into the output first; the ring then works in the output.
///
/// ```
/// use wccl::{ReduceOp, algo::ring_all_reduce};
/// let plan = ring_all_reduce(4, 0, 1000, ReduceOp::Sum, true, 1 << 20);
/// assert_eq!(plan.sends(), 2 * (4 - 1)); // one slice per step at this size
/// ```
pub fn ring_all_reduce(
    n: usize,
    rank: usize,
    count: usize,
    op: ReduceOp,
    in_place: bool,
    slice_elems: usize,
) -> Plan {
    let mut plan = Plan::default();
    if !in_place {
        plan.copy(
            Region::new(Buf::Input, 0, count),
            Region::new(Buf::Output, 0, count),
        );
    }
    if n == 1 {
        return plan;
    }
    let chunks: Vec<Region> = partition(count, n)
        .into_iter()
        .map(|(s, l)| Region::new(Buf::Output, s, l))
        .collect();
    ring_steps(&mut plan, &chunks, n, rank, op, slice_elems);
    plan
}

/// The ring's 2(n-1) steps over `chunks` (one per rank, in whichever buffer: the device's output
/// for the ring, host memory for the staged ring): a reduce-scatter, avg's one division by the
/// chunk's owner, then an all-gather; each step cut into slices of at most `slice_elems`.
pub(crate) fn ring_steps(
    plan: &mut Plan,
    chunks: &[Region],
    n: usize,
    rank: usize,
    op: ReduceOp,
    slice_elems: usize,
) {
    if n < 2 || chunks.len() != n {
        return;
    }
    let k = slices_per_chunk(chunks[0].len, slice_elems);
    let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
    let chunk = |shift: usize| chunks[(rank + n - shift % n) % n];
    let step = |plan: &mut Plan, send: Region, recv: Region, combine: Combine| {
        for (s, r) in slices(send, k).zip(slices(recv, k)) {
            plan.transfer(
                Some((next, Source::Device(s))),
                Some(Recv {
                    from: prev,
                    dst: r,
                    combine,
                    fold: Fold::Dst,
                }),
            );
        }
    };
    // Reduce-scatter: at step s send chunk r-s, fold the incoming chunk r-s-1 into ours.
    for s in 0..n - 1 {
        step(plan, chunk(s), chunk(s + 1), op.combine());
    }
    // Rank r now owns the whole reduction of chunk r+1; avg divides it once, before sharing.
    if op == ReduceOp::Avg {
        plan.scale(chunks[(rank + 1) % n], n as u32);
    }
    // All-gather: at step t send chunk r+1-t, overwrite chunk r-t with the incoming one.
    for t in 0..n - 1 {
        let send = chunks[(rank + 1 + n - t % n) % n];
        step(plan, send, chunk(t), Combine::Copy);
    }
}
