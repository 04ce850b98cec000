//! Binomial-tree broadcast (MPICH's for short messages): the root sends to ranks root+2^k,
//! each of which passes the data on to its own subtree, so every rank has it after
//! ceil(log2 n) steps, against the chain's n-1. Each link on a path carries the buffer once,
//! but the root sends it once per child (log2 n times): for short messages, where steps cost
//! more than bytes; the chain stays the choice for long ones.
//!
//! Then the outcome goes up and down the tree: each rank, once it has checked its data and
//! heard an empty acknowledgement from each of its children, acknowledges to its parent; the
//! root, once every child acknowledged (every rank accepted the call), sends an empty "done"
//! down the tree. A rank returns only with "done", so no rank returns success while another
//! refused the call (3·ceil(log2 n) steps in all; the chain's outcome round takes n).

use super::chain_broadcast::ack;
use super::plan::{Buf, Fold, Plan, Recv, Region, Source, Transfer, slices};
use super::slices_per_chunk;
use crate::types::Combine;

/// A rank's place in the binomial tree of `n` ranks rooted at `root`: its parent (none for
/// the root) and its children, largest subtree first. In relative numbering (`v = rank -
/// root`), the parent of `v` clears its lowest set bit, and its children add each lower power
/// of two that stays below `n`.
pub(crate) fn binomial(n: usize, rank: usize, root: usize) -> (Option<usize>, Vec<usize>) {
    let n = n.max(1);
    let v = (rank % n + n - root % n) % n;
    let abs = |x: usize| (x + root % n) % n;
    let mut mask = 1usize;
    let mut parent = None;
    while mask < n {
        if v & mask != 0 {
            parent = Some(abs(v - mask));
            break;
        }
        match mask.checked_mul(2) {
            Some(m) => mask = m,
            None => break,
        }
    }
    let mut children = Vec::new();
    let mut m = mask / 2;
    while m > 0 {
        if v.checked_add(m).is_some_and(|c| c < n) {
            children.push(abs(v + m));
        }
        m /= 2;
    }
    (parent, children)
}

const EMPTY: Region = Region::new(Buf::Output, 0, 0);

/// The plan of rank `rank` of `n` for a broadcast of `count` elements from `root`.
///
/// ```
/// use wccl::algo::tree_broadcast;
/// // 8 ranks from rank 0: the root sends to 4, 2 and 1 (3 data frames, 3 "done"s); rank 6
/// // receives from 4 and sends to 7, then acknowledges to 4.
/// assert_eq!(tree_broadcast(8, 0, 0, 100, 1 << 20).sends(), 6);
/// assert_eq!(tree_broadcast(8, 6, 0, 100, 1 << 20).sends(), 3);
/// ```
pub fn tree_broadcast(
    n: usize,
    rank: usize,
    root: usize,
    count: usize,
    slice_elems: usize,
) -> Plan {
    let mut plan = Plan::default();
    let input = Region::new(Buf::Input, 0, count);
    let output = Region::new(Buf::Output, 0, count);
    let k = slices_per_chunk(count, slice_elems);
    let (parent, children) = binomial(n, rank, root);
    // The data, slice by slice: each slice read back once, then sent again to the other
    // children (`Previous`).
    match parent {
        None => {
            plan.copy(input, output);
            for s in slices(input, k) {
                for (i, &c) in children.iter().enumerate() {
                    let src = if i == 0 {
                        Source::Device(s)
                    } else {
                        Source::Previous
                    };
                    plan.transfer(Some((c, src)), None);
                }
            }
        }
        Some(p) => {
            for s in slices(output, k) {
                plan.push(super::Action::Transfer(Transfer {
                    send: children.first().map(|&c| (c, Source::Forward)),
                    recv: Some(Recv {
                        from: p,
                        dst: s,
                        combine: Combine::Copy,
                        fold: Fold::Dst,
                    }),
                    recv_first: true,
                }));
                for &c in children.iter().skip(1) {
                    plan.transfer(Some((c, Source::Previous)), None);
                }
            }
        }
    }
    // The outcome: acknowledgements up (smallest subtree first: it is done first), "done"
    // down.
    for &c in children.iter().rev() {
        plan.transfer(None, Some(ack(c)));
    }
    if let Some(p) = parent {
        plan.transfer(Some((p, Source::Device(EMPTY))), None);
        plan.transfer(None, Some(ack(p)));
    }
    for &c in &children {
        plan.transfer(Some((c, Source::Device(EMPTY))), None);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::binomial;

    /// Every rank but the root has one parent, which lists it as a child; depth is at most
    /// ceil(log2 n).
    #[test]
    fn the_tree_spans_every_rank() {
        for n in 1..=70 {
            for root in [0, n / 2, n - 1] {
                let mut depth = vec![usize::MAX; n];
                depth[root] = 0;
                for r in 0..n {
                    let (parent, _) = binomial(n, r, root);
                    assert_eq!(parent.is_none(), r == root, "n={n} root={root} r={r}");
                    if let Some(p) = parent {
                        assert!(binomial(n, p, root).1.contains(&r), "n={n} r={r} p={p}");
                    }
                }
                // Breadth-first from the root.
                let mut frontier = vec![root];
                while let Some(r) = frontier.pop() {
                    for c in binomial(n, r, root).1 {
                        assert_eq!(depth[c], usize::MAX, "n={n}: {c} reached twice");
                        depth[c] = depth[r] + 1;
                        frontier.push(c);
                    }
                }
                let log = usize::BITS - (n - 1).leading_zeros();
                assert!(depth.iter().all(|&d| d <= log as usize), "n={n}: {depth:?}");
            }
        }
    }
}
