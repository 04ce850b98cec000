//! Recursive halving-doubling all-reduce (Rabenseifner's; MPICH's for long messages, Gloo's
//! `AllreduceHalvingDoubling`): a reduce-scatter by recursive halving, then an all-gather by
//! recursive doubling, log2(p) exchanges each way among p, the largest power of two at most n.
//! The ring takes 2(n-1) steps; at 32 ranks that is 62 against 10, which is what small messages
//! pay for. The link traffic is the ring's, 2(p-1)/p of the buffer each way per rank.
//!
//! Rank counts that are not powers of two fold first, as MPICH does: of the first 2(n-p) ranks,
//! each even one sends its whole buffer to the odd one above it and takes no part in the
//! exchanges; the odd one, having folded it in, does, and sends the result back at the end.
//! Reductions happen on the devices, in the output, as in the ring.

use super::plan::{Buf, Fold, Plan, Recv, Region, Source};
use super::{partition, slices_per_chunk};
use crate::types::{Combine, ReduceOp};

/// The plan of rank `rank` of `n` for a halving-doubling all-reduce of `count` elements.
/// Out-of-place calls copy the input into the output first; the exchanges then work in the
/// output. Each exchange is cut into slices of at most `slice_elems`.
///
/// ```
/// use wccl::{ReduceOp, algo::halving_doubling_all_reduce};
/// // 8 ranks: 3 halving and 3 doubling exchanges, one slice each at this size.
/// let plan = halving_doubling_all_reduce(8, 5, 1000, ReduceOp::Sum, true, 1 << 20);
/// assert_eq!(plan.sends(), 2 * 3);
/// // 6 ranks: rank 0 folds into rank 1 and gets the result back; rank 1 exchanges with the
/// // other three of the four (2 + 2 exchanges) and sends the result back to rank 0.
/// assert_eq!(halving_doubling_all_reduce(6, 0, 1000, ReduceOp::Sum, true, 1 << 20).sends(), 1);
/// assert_eq!(halving_doubling_all_reduce(6, 1, 1000, ReduceOp::Sum, true, 1 << 20).sends(), 5);
/// ```
pub fn halving_doubling_all_reduce(
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
    exchanges(&mut plan, Buf::Output, n, rank, count, op, slice_elems);
    plan
}

/// The exchanges of halving-doubling among `n` ranks on `count` elements of `buf` (the output
/// on the devices, or host memory for the host-staged variant), folding in place there.
pub(super) fn exchanges(
    plan: &mut Plan,
    buf: Buf,
    n: usize,
    rank: usize,
    count: usize,
    op: ReduceOp,
    slice_elems: usize,
) {
    let whole = Region::new(buf, 0, count);
    if n < 2 || rank >= n {
        return;
    }
    // p: the largest power of two at most n; the first 2·extra ranks pair up to fold.
    let p = 1usize << n.ilog2();
    let extra = n - p;
    let folds = rank < 2 * extra;
    if folds && rank.is_multiple_of(2) {
        // Out of the exchanges: the whole buffer to the partner, the result back from it.
        exchange(
            plan,
            Some(rank + 1),
            None,
            whole,
            whole,
            op.combine(),
            slice_elems,
        );
        exchange(
            plan,
            None,
            Some(rank + 1),
            whole,
            whole,
            Combine::Copy,
            slice_elems,
        );
        return;
    }
    if folds {
        exchange(
            plan,
            None,
            Some(rank - 1),
            whole,
            whole,
            op.combine(),
            slice_elems,
        );
    }
    // The rank's number among the p that exchange, and back.
    let me = if folds { rank / 2 } else { rank - extra };
    let real = |v: usize| if v < extra { 2 * v + 1 } else { v + extra };
    let blocks = partition(count, p);
    let span = |lo: usize, hi: usize| {
        let start = blocks[lo].0;
        let end = blocks[hi - 1].0 + blocks[hi - 1].1;
        Region::new(buf, start, end - start)
    };
    // Reduce-scatter: at distance d (p/2 down to 1) keep the half of the window on this rank's
    // side of bit d, send the other half to the partner across it, and fold in the partner's
    // copy of the half kept. The window ends as block `me`.
    let (mut lo, mut hi) = (0, p);
    let mut d = p / 2;
    while d >= 1 {
        let partner = real(me ^ d);
        let mid = lo + (hi - lo) / 2;
        let (keep, give) = if me & d == 0 {
            ((lo, mid), (mid, hi))
        } else {
            ((mid, hi), (lo, mid))
        };
        let (send, recv) = (span(give.0, give.1), span(keep.0, keep.1));
        let both = Some(partner);
        exchange(plan, both, both, send, recv, op.combine(), slice_elems);
        (lo, hi) = keep;
        d /= 2;
    }
    // This rank owns the whole reduction of block `me`; avg divides it once, before sharing.
    if op == ReduceOp::Avg {
        plan.scale(span(lo, hi), n as u32);
    }
    // All-gather: at distance d (1 up to p/2) swap windows with the partner across bit d; the
    // window doubles each time.
    let mut d = 1;
    while d < p {
        let partner = real(me ^ d);
        let width = hi - lo;
        let theirs = if me & d == 0 {
            (hi, hi + width)
        } else {
            (lo - width, lo)
        };
        let (send, recv) = (span(lo, hi), span(theirs.0, theirs.1));
        let both = Some(partner);
        exchange(plan, both, both, send, recv, Combine::Copy, slice_elems);
        (lo, hi) = (lo.min(theirs.0), hi.max(theirs.1));
        d *= 2;
    }
    if folds {
        exchange(
            plan,
            Some(rank - 1),
            None,
            whole,
            whole,
            Combine::Copy,
            slice_elems,
        );
    }
}

/// One exchange: `send` to `to` and `recv` from `from` (either may be absent), each cut into
/// slices of at most `slice_elems`, slice i of each in one transfer (send first). Both sides
/// cut a region the same way, so the peer's slices of it match these.
fn exchange(
    plan: &mut Plan,
    to: Option<usize>,
    from: Option<usize>,
    send: Region,
    recv: Region,
    combine: Combine,
    slice_elems: usize,
) {
    let cut = |r: Region| {
        let k = slices_per_chunk(r.len, slice_elems);
        super::plan::slices(r, k).collect::<Vec<_>>()
    };
    let sends = if to.is_some() { cut(send) } else { Vec::new() };
    let recvs = if from.is_some() {
        cut(recv)
    } else {
        Vec::new()
    };
    for i in 0..sends.len().max(recvs.len()) {
        let s = to.zip(sends.get(i)).map(|(t, r)| (t, Source::Device(*r)));
        let r = from.zip(recvs.get(i)).map(|(f, r)| Recv {
            from: f,
            dst: *r,
            combine,
            fold: Fold::Dst,
        });
        plan.transfer(s, r);
    }
}
