//! Which action last wrote a byte range of a buffer, for the executor's read-backs: a read may
//! only begin once the last earlier write to the memory it covers is submitted.
//!
//! Asked of every read-back of a plan, a scan back through the earlier actions costs
//! O(actions) each, O(k²) a call for k slices a chunk: with small slices and large buffers
//! (a 1 GiB call in 64 KiB slices, or slices of a few bytes) that was seconds of CPU, or far
//! past the call's deadline, before the first frame. Here each buffer's bytes are kept as
//! disjoint ranges painted with their last writer, so a write costs O(log n) amortised and a
//! query O(log n) plus the writers it finds.

use std::collections::BTreeMap;

use crate::algo::{Action, Region};

/// A plan's writes, painted in action order as its read-backs ask for their last writer.
/// `K` names a device buffer (regions of the input and the output may be one buffer).
pub(crate) struct Painter<K> {
    bufs: Vec<(K, LastWrites)>,
    /// The writes of the actions before this one are painted.
    painted: usize,
}

impl<K: PartialEq> Painter<K> {
    pub(crate) fn new() -> Self {
        Painter {
            bufs: Vec::new(),
            painted: 0,
        }
    }

    /// The last action before `upto` that writes any byte of `read` (a buffer and a byte
    /// range, as `bytes_of` gives; none for memory no device read waits on). `upto` may not
    /// go down from one ask to the next (the executor asks in action order).
    pub(crate) fn after(
        &mut self,
        actions: &[Action],
        upto: usize,
        read: Option<(K, u64, u64)>,
        bytes_of: impl Fn(Region) -> Option<(K, u64, u64)>,
    ) -> Option<usize> {
        let upto = upto.min(actions.len());
        for (v, a) in actions.iter().enumerate().take(upto).skip(self.painted) {
            if let Some((buf, start, end)) = a.writes().and_then(&bytes_of) {
                match self.bufs.iter_mut().find(|(b, _)| *b == buf) {
                    Some((_, l)) => l.write(start, end, v),
                    None => {
                        let mut l = LastWrites::default();
                        l.write(start, end, v);
                        self.bufs.push((buf, l));
                    }
                }
            }
        }
        self.painted = self.painted.max(upto);
        let (buf, start, end) = read?;
        self.bufs
            .iter()
            .find(|(b, _)| *b == buf)
            .and_then(|(_, l)| l.last(start, end))
    }
}

/// One buffer's bytes as disjoint ranges, each with the last action that wrote it.
#[derive(Debug, Default)]
pub(crate) struct LastWrites {
    /// Start -> (end, action).
    ranges: BTreeMap<u64, (u64, usize)>,
}

impl LastWrites {
    /// Action `action` wrote `[start, end)` (later than every action recorded so far).
    pub(crate) fn write(&mut self, start: u64, end: u64, action: usize) {
        if start >= end {
            return;
        }
        // A range that begins before `start` and reaches into it keeps its head, and its
        // tail past `end` if it covers the whole write.
        if let Some((&s, &(e, a))) = self.ranges.range(..start).next_back()
            && e > start
        {
            self.ranges.insert(s, (start, a));
            if e > end {
                self.ranges.insert(end, (e, a));
            }
        }
        // Ranges that begin inside the write: gone, but for a tail past `end`.
        let inside: Vec<u64> = self.ranges.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            if let Some((e, a)) = self.ranges.remove(&s)
                && e > end
            {
                self.ranges.insert(end, (e, a));
            }
        }
        self.ranges.insert(start, (end, action));
    }

    /// The last action that wrote any byte of `[start, end)`.
    pub(crate) fn last(&self, start: u64, end: u64) -> Option<usize> {
        if start >= end {
            return None;
        }
        let before = self
            .ranges
            .range(..start)
            .next_back()
            .filter(|(_, (e, _))| *e > start)
            .map(|(_, &(_, a))| a);
        self.ranges
            .range(start..end)
            .map(|(_, &(_, a))| a)
            .chain(before)
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::{LastWrites, Painter};
    use crate::algo::{Action, Buf, Region};
    use proptest::prelude::*;

    /// The executor's mapping in small: input and output one buffer (key 0) at different
    /// offsets, scratch another (key 1), 4-byte elements; host and empty regions none.
    fn bytes_of(r: Region) -> Option<(u8, u64, u64)> {
        let (key, base) = match r.buf {
            Buf::Input => (0, 40),
            Buf::Output => (0, 0),
            Buf::Scratch => (1, 0),
            Buf::Host => return None,
        };
        (r.len > 0).then(|| {
            let start = base + 4 * r.offset as u64;
            (key, start, start + 4 * r.len as u64)
        })
    }

    fn region() -> impl Strategy<Value = Region> {
        (0usize..4, 0usize..30, 0usize..12).prop_map(|(b, off, len)| {
            let buf = [Buf::Input, Buf::Output, Buf::Scratch, Buf::Host][b];
            Region::new(buf, off, len)
        })
    }

    /// The scan it replaces: the last of the writes so far that overlaps the range.
    fn scan(writes: &[(u64, u64)], start: u64, end: u64) -> Option<usize> {
        (0..writes.len()).rev().find(|&i| {
            start < end && writes[i].0 < writes[i].1 && writes[i].0 < end && start < writes[i].1
        })
    }

    #[test]
    fn by_hand() {
        let mut w = LastWrites::default();
        w.write(0, 100, 0);
        w.write(20, 30, 1);
        assert_eq!(w.last(0, 20), Some(0));
        assert_eq!(w.last(25, 26), Some(1));
        assert_eq!(w.last(29, 31), Some(1));
        assert_eq!(w.last(30, 100), Some(0));
        assert_eq!(w.last(100, 200), None);
        assert_eq!(w.last(50, 50), None);
        w.write(10, 60, 2);
        assert_eq!(w.last(0, 10), Some(0));
        assert_eq!(w.last(0, 11), Some(2));
        assert_eq!(w.last(60, 61), Some(0));
        assert_eq!(w.last(25, 26), Some(2));
    }

    proptest! {
        /// After every write, every range asked gets the scan's answer.
        #[test]
        fn the_last_writer_is_the_scans(
            writes in prop::collection::vec((0u64..64, 0u64..24), 1..40),
            asks in prop::collection::vec((0u64..80, 0u64..30), 1..20),
        ) {
            let mut w = LastWrites::default();
            let mut done = Vec::new();
            for (i, &(s, len)) in writes.iter().enumerate() {
                w.write(s, s + len, i);
                done.push((s, s + len));
                for &(a, alen) in &asks {
                    prop_assert_eq!(w.last(a, a + alen), scan(&done, a, a + alen));
                }
            }
        }
    }

    proptest! {
        /// Asked in action order (some asks at the action, some just past it, as a transfer
        /// that receives first), the painter gives the executor's old scan's answer: the last
        /// earlier action whose write shares a byte with the read in the same buffer.
        #[test]
        fn the_painter_answers_as_the_scan_did(
            writes in prop::collection::vec((region(), any::<bool>()), 1..40),
            asks in prop::collection::vec((0usize..42, region()), 1..30),
        ) {
            let actions: Vec<Action> = writes
                .iter()
                .map(|&(dst, scale)| {
                    if scale {
                        Action::Scale { dst, divisor: 2 }
                    } else {
                        Action::Copy { src: Region::new(Buf::Host, 0, dst.len), dst }
                    }
                })
                .collect();
            let mut asks = asks;
            asks.sort_by_key(|a| a.0);
            let mut p = Painter::new();
            for (upto, read) in asks {
                let want = (0..upto.min(actions.len())).rev().find(|&v| {
                    match (actions[v].writes().and_then(bytes_of), bytes_of(read)) {
                        (Some((a, s, e)), Some((b, rs, re))) => a == b && s < re && rs < e,
                        _ => false,
                    }
                });
                prop_assert_eq!(p.after(&actions, upto, bytes_of(read), bytes_of), want);
            }
        }
    }
}
