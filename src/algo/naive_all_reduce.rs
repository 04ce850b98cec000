//! Naive all-reduce, what a wgpu user writes by hand: read every buffer back to the host, reduce
//! on the host (the root's CPU), write the result to every device. No kernel reduces anything.

use super::central_all_reduce::{send_to_all, worker_side};
use super::plan::{Buf, Fold, Plan, Recv, Region, slices};
use super::slices_per_chunk;
use crate::types::ReduceOp;

/// The plan of rank `rank` of `n` for a naive all-reduce of `count` elements through `root`'s
/// host memory.
pub fn naive_all_reduce(
    n: usize,
    rank: usize,
    root: usize,
    count: usize,
    op: ReduceOp,
    slice_elems: usize,
) -> Plan {
    let mut plan = Plan::default();
    let input = Region::new(Buf::Input, 0, count);
    let output = Region::new(Buf::Output, 0, count);
    let k = slices_per_chunk(count, slice_elems);
    if rank != root {
        worker_side(&mut plan, root, input, output, k);
        return plan;
    }
    plan.host = count;
    let host = Region::new(Buf::Host, 0, count);
    let peers: Vec<usize> = (0..n).filter(|&p| p != root).collect();
    for (mine, acc) in slices(input, k).zip(slices(host, k)) {
        plan.copy(mine, acc);
        for &p in &peers {
            plan.transfer(
                None,
                Some(Recv {
                    from: p,
                    dst: acc,
                    combine: op.combine(),
                    fold: Fold::Dst,
                }),
            );
        }
    }
    if op == ReduceOp::Avg {
        plan.scale(host, n as u32);
    }
    for (acc, out) in slices(host, k).zip(slices(output, k)) {
        plan.copy(acc, out);
    }
    send_to_all(&mut plan, &peers, slices(host, k));
    plan
}
