//! Central all-reduce, the parameter-server pattern: every rank sends its buffer to the root,
//! the root reduces on its device with the WGSL kernel and sends the result back. The root's
//! link carries 2(n-1) buffers, so it scales poorly; it is here to be measured against the ring.

use super::plan::{Buf, Fold, Plan, Recv, Region, Source, slices};
use super::slices_per_chunk;
use crate::types::{Combine, ReduceOp};

/// The plan of rank `rank` of `n` for a central all-reduce of `count` elements at `root`.
pub fn central_all_reduce(
    n: usize,
    rank: usize,
    root: usize,
    count: usize,
    op: ReduceOp,
    in_place: bool,
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
    if !in_place {
        plan.copy(input, output);
    }
    let peers: Vec<usize> = (0..n).filter(|&p| p != root).collect();
    for s in slices(output, k) {
        for &p in &peers {
            plan.transfer(
                None,
                Some(Recv {
                    from: p,
                    dst: s,
                    combine: op.combine(),
                    fold: Fold::Dst,
                }),
            );
        }
    }
    if op == ReduceOp::Avg {
        plan.scale(output, n as u32);
    }
    send_to_all(&mut plan, &peers, slices(output, k));
    plan
}

/// A non-root rank of a star: send the input to the root slice by slice, then receive the
/// result into the output.
pub(crate) fn worker_side(plan: &mut Plan, root: usize, input: Region, output: Region, k: usize) {
    for s in slices(input, k) {
        plan.transfer(Some((root, Source::Device(s))), None);
    }
    for s in slices(output, k) {
        plan.transfer(
            None,
            Some(Recv {
                from: root,
                dst: s,
                combine: Combine::Copy,
                fold: Fold::Dst,
            }),
        );
    }
}

/// Sends each region to every peer, reading it back once.
pub(crate) fn send_to_all(plan: &mut Plan, peers: &[usize], regions: impl Iterator<Item = Region>) {
    for s in regions {
        for (i, &p) in peers.iter().enumerate() {
            let source = if i == 0 {
                Source::Device(s)
            } else {
                Source::Previous
            };
            plan.transfer(Some((p, source)), None);
        }
    }
}
