//! Pipelined chain broadcast: root -> root+1 -> ... -> root-1, slice by slice; each rank
//! forwards a slice's bytes as soon as they arrive, so every link carries the buffer once. The
//! last rank then sends an empty acknowledgement back to the root, so that no rank returns
//! success while another refused the call.

use super::plan::{Buf, Plan, Recv, Region, Source, Transfer, slices};
use super::slices_per_chunk;
use crate::types::Combine;

/// The plan of rank `rank` of `n` for a broadcast of `count` elements from `root`.
pub fn chain_broadcast(
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
    let pos = (rank + n - root) % n;
    let next = (rank + 1) % n;
    let prev = (rank + n - 1) % n;
    if rank == root {
        plan.copy(input, output);
        if n > 1 {
            for s in slices(input, k) {
                plan.transfer(Some((next, Source::Device(s))), None);
            }
            // The last rank's acknowledgement: without it the root could return success while
            // a rank down the chain refused the call.
            plan.transfer(None, Some(ack(prev)));
        }
        return plan;
    }
    let last = pos == n - 1;
    for s in slices(output, k) {
        plan.push(super::Action::Transfer(Transfer {
            send: (!last).then_some((next, Source::Forward)),
            recv: Some(Recv {
                from: prev,
                dst: s,
                combine: Combine::Copy,
            }),
            recv_first: true,
        }));
    }
    if last {
        plan.transfer(Some((next, Source::Device(EMPTY))), None);
    }
    plan
}

const EMPTY: Region = Region::new(Buf::Output, 0, 0);

/// An empty frame that closes a chain: it arrives only after every rank accepted the call.
pub(crate) fn ack(from: usize) -> Recv {
    Recv {
        from,
        dst: EMPTY,
        combine: Combine::Copy,
    }
}
