//! Pipelined chain reduce: root+1 -> root+2 -> ... -> root, slice by slice; each rank folds its
//! input into the partial result and passes it on, so every link carries the buffer once.
//!
//! Then the outcome goes round the ring: the root, which receives last and so is the last to
//! check, sends an empty "done" to the head, and each rank passes it on to its successor, up to
//! root-1. A rank returns only once it has "done", that is once every rank accepted the call; a
//! rank that refused aborts the ranks still waiting. One empty frame per rank, after the
//! pipeline, and every frame goes from a rank to rank+1 (see `chain_broadcast`).

use super::chain_broadcast::relay;
use super::plan::{Action, Buf, Fold, Plan, Recv, Region, Source, Transfer, slices};
use super::slices_per_chunk;
use crate::types::ReduceOp;

/// The plan of rank `rank` of `n` for a reduce of `count` elements to `root`.
pub fn chain_reduce(
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
    let pos = (rank + n - root - 1) % n; // the head is root+1, the root comes last
    let next = (rank + 1) % n;
    let prev = (rank + n - 1) % n;
    if n == 1 {
        plan.copy(input, output);
        return plan;
    }
    // "done" goes on to the next rank unless that is the root, which started it.
    let done = relay(prev, (next != root).then_some(next));
    if pos == 0 {
        for s in slices(input, k) {
            plan.transfer(Some((next, Source::Device(s))), None);
        }
        plan.push(Action::Transfer(done));
        return plan;
    }
    let acc = if rank == root {
        output
    } else {
        plan.scratch = count;
        Region::new(Buf::Scratch, 0, count)
    };
    plan.copy(input, acc);
    for s in slices(acc, k) {
        plan.push(Action::Transfer(Transfer {
            send: (rank != root).then_some((next, Source::Device(s))),
            recv: Some(Recv {
                from: prev,
                dst: s,
                combine: op.combine(),
                fold: Fold::Dst,
            }),
            recv_first: true,
        }));
    }
    if rank == root {
        if op == ReduceOp::Avg {
            plan.scale(output, n as u32);
        }
        plan.transfer(
            Some((next, Source::Device(Region::new(Buf::Output, 0, 0)))),
            None,
        );
    } else {
        plan.push(Action::Transfer(done));
    }
    plan
}
