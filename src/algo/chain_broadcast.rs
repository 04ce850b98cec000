//! Pipelined chain broadcast: root -> root+1 -> ... -> root-1, slice by slice; each rank
//! forwards a slice's bytes as soon as they arrive, so every link carries the buffer once.
//!
//! Then the outcome goes round the ring: the last rank sends an empty acknowledgement to the
//! root, and the root relays an empty "done" down the chain to root-2. Every frame's header is
//! checked against the receiver's view of the call, and the acknowledgement leaves the last
//! rank only once every rank before it has checked its data, so a rank that receives "done"
//! knows that every rank agreed; a rank that disagreed aborts the ranks still waiting for it.
//! So no rank returns success while another refused the call, for one empty frame per rank.
//!
//! Like the ring plans, this one only ever sends to rank+1 and receives from rank-1, so ranks
//! that disagree about the collective or its root still meet on the same links: as long as one
//! rank starts by sending, a disagreement is found rather than waited out.

use super::plan::{Buf, Fold, Plan, Recv, Region, Source, Transfer, slices};
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
    let mut plan = chain_broadcast_data(n, rank, root, count, slice_elems);
    if n < 2 {
        return plan;
    }
    let pos = (rank + n - root) % n;
    let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
    if rank == root {
        // The last rank's acknowledgement, then "done" for the ranks between (none when the
        // next rank is the last).
        plan.push(super::Action::Transfer(relay(
            prev,
            (n > 2).then_some(next),
        )));
    } else if pos == n - 1 {
        // Every rank before this one has checked its data: tell the root.
        plan.transfer(Some((next, Source::Device(EMPTY))), None);
    } else {
        // Wait for "done" and pass it on, except to the last rank, which started it.
        let to_last = pos + 2 == n;
        plan.push(super::Action::Transfer(relay(
            prev,
            (!to_last).then_some(next),
        )));
    }
    plan
}

/// [`chain_broadcast`] without its acknowledgements: once a rank's plan ends, it holds the
/// root's whole data (a call finishing among survivors ends with its own commit round instead,
/// and needs to know which ranks hold the data when the root dies).
pub(crate) fn chain_broadcast_data(
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
                fold: Fold::Dst,
            }),
            recv_first: true,
        }));
    }
    plan
}

const EMPTY: Region = Region::new(Buf::Output, 0, 0);

/// An empty frame that tells the receiver how the call went: it is sent only once every rank
/// the sender has heard from, directly or through others, accepted the call.
pub(crate) fn ack(from: usize) -> Recv {
    Recv {
        from,
        dst: EMPTY,
        combine: Combine::Copy,
        fold: Fold::Dst,
    }
}

/// Receives the empty acknowledgement from `from`, then passes it on to `to`, if any.
pub(crate) fn relay(from: usize, to: Option<usize>) -> Transfer {
    Transfer {
        send: to.map(|t| (t, Source::Forward)),
        recv: Some(ack(from)),
        recv_first: true,
    }
}
