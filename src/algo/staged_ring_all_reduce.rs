//! The host-staged ring all-reduce (Gloo's "CUDA staged" ring, for wgpu): read the buffer back
//! once, run the ring's reduce-scatter and all-gather on host memory, folding on the CPU, and
//! upload the result once. Per rank that is N bytes each way between device and host for an
//! N-byte buffer, against 2(n-1)/n·N each way for the device ring (every ring step reads back
//! the chunk it sends and uploads the chunk it receives): 2/3 of it at 4 ranks, the same at 2.
//! The link traffic is the ring's 2(n-1)/n·N. Where the host folds faster than the device's
//! kernel plus its copies (a CPU adapter; over TCP), it is the faster ring.
//!
//! The partial sums travel forwarded: each rank folds its own chunk into the frame it received
//! and sends that frame on, so no partial sum is stored, and host memory is read (the input)
//! before it is written (the result). On a unified-memory device the executor therefore reads
//! the input and writes the output mapped in place ([`Plan::host_split`]): no staging copies,
//! and per rank no copy of a partial sum either.
//!
//! The three stages overlap slice by slice: host memory is mirrored in windows of at most a
//! slice, each read back the first time the ring needs any of it (this rank's own chunk before
//! it sends it, a partial sum's chunk before the frame it folds into is taken) and uploaded as
//! soon as all of it is final, so read-backs and uploads happen while frames are on the link,
//! not before and after the whole ring (the executor begins read-backs ahead, as slots allow).
//! A call of at most a slice reads back once and uploads once, as before.

use super::plan::{Action, Buf, Fold, Plan, Recv, Region, Source, Transfer, slices};
use super::{partition, slices_per_chunk};
use crate::types::{Combine, ReduceOp};

/// The plan of rank `rank` of `n` for a host-staged ring all-reduce of `count` elements: one
/// read-back of the input into host memory and one upload of the result into the output,
/// slice by slice, interleaved with the ring on host memory.
///
/// ```
/// use wccl::{ReduceOp, algo::staged_ring_all_reduce};
/// let plan = staged_ring_all_reduce(4, 0, 1000, ReduceOp::Sum, 1 << 20);
/// assert_eq!(plan.sends(), 2 * (4 - 1));
/// assert_eq!(plan.host, 1000);
/// ```
pub fn staged_ring_all_reduce(
    n: usize,
    rank: usize,
    count: usize,
    op: ReduceOp,
    slice_elems: usize,
) -> Plan {
    let mut plan = Plan::default();
    let input = Region::new(Buf::Input, 0, count);
    let output = Region::new(Buf::Output, 0, count);
    if n == 1 {
        // Nothing to exchange: an out-of-place call is a copy (in place, the same memory).
        plan.copy(input, output);
        return plan;
    }
    plan.host = count;
    plan.host_split = true;
    let chunks: Vec<Region> = partition(count, n)
        .into_iter()
        .map(|(s, l)| Region::new(Buf::Host, s, l))
        .collect();
    forwarding_ring(&mut plan, &chunks, rank, op, slice_elems);
    plan
}

/// The ring over host chunks with the partial sums forwarded, slice by slice: rank r sends its
/// own values of chunk r; at reduce-scatter step s it receives the partial sum of chunk r-s,
/// folds its own values into the frame, and sends the frame on. The last step's sum (chunk r+1,
/// divided for avg) is the result: written into host memory and sent on as the all-gather's
/// first frame. Each all-gather frame is copied into host memory and sent on unchanged.
fn forwarding_ring(
    plan: &mut Plan,
    chunks: &[Region],
    rank: usize,
    op: ReduceOp,
    slice_elems: usize,
) {
    let n = chunks.len();
    if n < 2 {
        return;
    }
    let count = chunks.iter().map(|c| c.len).sum();
    let mut mirror = Mirror::new(count, slice_elems);
    let k = slices_per_chunk(chunks[0].len, slice_elems);
    let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
    let chunk = |shift: usize| chunks[(rank + n - shift % n) % n];
    let forward = |plan: &mut Plan, dst: Region, combine: Combine, fold: Fold, on: bool| {
        plan.push(Action::Transfer(Transfer {
            send: on.then_some((next, Source::Forward)),
            recv: Some(Recv {
                from: prev,
                dst,
                combine,
                fold,
            }),
            recv_first: true,
        }));
    };
    for s in slices(chunk(0), k) {
        mirror.need(plan, s);
        plan.transfer(Some((next, Source::Device(s))), None);
    }
    for s in 1..n {
        let last = s == n - 1;
        let fold = Fold::Payload {
            divide: if last && op == ReduceOp::Avg {
                n as u32
            } else {
                1
            },
            write: last,
        };
        for r in slices(chunk(s), k) {
            // Read back before the frame it folds into is taken; the last step's sum is
            // final.
            mirror.need(plan, r);
            forward(plan, r, op.combine(), fold, true);
            if last {
                mirror.done(plan, r);
            }
        }
    }
    for t in 0..n - 1 {
        for r in slices(chunk(t), k) {
            forward(plan, r, Combine::Copy, Fold::Dst, t < n - 2);
            mirror.done(plan, r);
        }
    }
}

/// Host memory's mirror copies in windows of at most a slice (the whole buffer cut as
/// [`slices_per_chunk`] cuts it): a window is read back from the input the first time the plan
/// needs any element of it, and uploaded into the output once every element of it is final.
/// The ring needs every chunk before it writes any (its only writes before the all-gather are
/// the last chunk it needs), so no window is read back over elements already final.
struct Mirror {
    windows: Vec<Region>,
    read: Vec<bool>,
    /// Elements of each window not yet final.
    left: Vec<usize>,
}

impl Mirror {
    fn new(count: usize, slice_elems: usize) -> Self {
        let whole = slices_per_chunk(count, slice_elems);
        let windows: Vec<Region> = slices(Region::new(Buf::Host, 0, count), whole).collect();
        Mirror {
            read: vec![false; windows.len()],
            left: windows.iter().map(|w| w.len).collect(),
            windows,
        }
    }

    /// The windows `r` overlaps, with the length of each overlap.
    fn overlaps(&self, r: Region) -> Vec<(usize, usize)> {
        let end = r.offset + r.len;
        // The windows are in order and contiguous: from the first that ends past `r`'s start
        // (a binary search, not a scan: the plan is built on every call), while they start
        // before its end.
        let first = self
            .windows
            .partition_point(|w| w.offset + w.len <= r.offset);
        self.windows
            .iter()
            .enumerate()
            .skip(first)
            .take_while(|(_, w)| w.offset < end)
            .filter_map(|(i, w)| {
                let lo = w.offset.max(r.offset);
                let hi = (w.offset + w.len).min(end);
                (hi > lo).then(|| (i, hi - lo))
            })
            .collect()
    }

    /// Reads back every window of `r` not read back yet.
    fn need(&mut self, plan: &mut Plan, r: Region) {
        for (i, _) in self.overlaps(r) {
            if !self.read[i] {
                self.read[i] = true;
                let w = self.windows[i];
                plan.copy(
                    Region {
                        buf: Buf::Input,
                        ..w
                    },
                    w,
                );
            }
        }
    }

    /// `r` is final: uploads every window that is now final throughout.
    fn done(&mut self, plan: &mut Plan, r: Region) {
        for (i, len) in self.overlaps(r) {
            let before = self.left[i];
            self.left[i] = before.saturating_sub(len);
            if before > 0 && self.left[i] == 0 {
                let w = self.windows[i];
                plan.copy(
                    w,
                    Region {
                        buf: Buf::Output,
                        ..w
                    },
                );
            }
        }
    }
}
