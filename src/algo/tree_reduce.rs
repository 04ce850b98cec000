//! Binomial-tree reduce (MPICH's for short messages): each rank folds what its children send
//! into its own contribution and sends the partial result to its parent, so the root has the
//! reduction after ceil(log2 n) steps, against the chain's n-1. For short messages: the root
//! receives the buffer once per child.
//!
//! Then the root, which has heard from every rank through its subtrees (every rank accepted
//! the call), sends an empty "done" down the tree; a rank returns only with it, so no rank
//! returns success while another refused the call.

use super::chain_broadcast::ack;
use super::plan::{Buf, Fold, Plan, Recv, Region, Source, slices};
use super::slices_per_chunk;
use super::tree_broadcast::binomial;
use crate::types::ReduceOp;

/// The plan of rank `rank` of `n` for a reduce of `count` elements to `root`. Ranks other
/// than the root fold into scratch memory (their output is not theirs to write).
///
/// ```
/// use wccl::{ReduceOp, algo::tree_reduce};
/// // 8 ranks to rank 0: rank 0 receives from 1, 2 and 4 and sends 3 "done"s; rank 6 receives
/// // from 7, sends to 4, and passes "done" to 7.
/// assert_eq!(tree_reduce(8, 0, 0, 100, ReduceOp::Sum, 1 << 20).sends(), 3);
/// assert_eq!(tree_reduce(8, 6, 0, 100, ReduceOp::Sum, 1 << 20).sends(), 2);
/// ```
pub fn tree_reduce(
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
    let (parent, children) = binomial(n, rank, root);
    if let (Some(p), true) = (parent, children.is_empty()) {
        // A leaf (half of the ranks) sends its input as it is.
        for s in slices(input, k) {
            plan.transfer(Some((p, Source::Device(s))), None);
        }
        plan.transfer(None, Some(ack(p)));
        return plan;
    }
    let acc = if parent.is_none() {
        output
    } else {
        plan.scratch = count;
        Region::new(Buf::Scratch, 0, count)
    };
    plan.copy(input, acc);
    // Slice by slice: the smallest subtree's partial result is ready first.
    for s in slices(acc, k) {
        for &c in children.iter().rev() {
            plan.transfer(
                None,
                Some(Recv {
                    from: c,
                    dst: s,
                    combine: op.combine(),
                    fold: Fold::Dst,
                }),
            );
        }
        if let Some(p) = parent {
            plan.transfer(Some((p, Source::Device(s))), None);
        }
    }
    match parent {
        None => {
            if op == ReduceOp::Avg {
                plan.scale(output, n.max(1) as u32);
            }
        }
        Some(p) => {
            plan.transfer(None, Some(ack(p)));
        }
    }
    for &c in &children {
        plan.transfer(
            Some((c, Source::Device(Region::new(Buf::Output, 0, 0)))),
            None,
        );
    }
    plan
}
