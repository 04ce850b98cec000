//! The plan an algorithm hands to the executor.

use crate::types::Combine;

/// Which buffer a region lies in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Buf {
    /// The caller's input tensor.
    Input,
    /// The caller's output tensor (the same tensor as the input for in-place calls).
    Output,
    /// The communicator's scratch buffer on this rank's device.
    Scratch,
    /// Host memory of the executor, for algorithms that reduce on the host: copies into it read
    /// back, copies out of it upload, and frames fold into it on the CPU.
    Host,
}

/// `len` elements starting `offset` elements into a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// The buffer.
    pub buf: Buf,
    /// First element.
    pub offset: usize,
    /// Number of elements.
    pub len: usize,
}

impl Region {
    /// A region of `buf`.
    pub const fn new(buf: Buf, offset: usize, len: usize) -> Self {
        Region { buf, offset, len }
    }
}

/// Where the payload of a send comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Read back from the device.
    Device(Region),
    /// The bytes this same transfer just received (pipelined chain forwarding).
    Forward,
    /// The payload of this rank's previous send again (one read-back, many receivers).
    Previous,
}

/// Receiving a frame from a peer and folding it into a region (on the device, or in host
/// memory for the algorithms that reduce there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recv {
    /// The sending rank.
    pub from: usize,
    /// Where the payload goes; its length is the payload's expected length.
    pub dst: Region,
    /// How the payload combines with what is there (`Copy` overwrites).
    pub(crate) combine: Combine,
    /// Which side the fold lands in.
    pub(crate) fold: Fold,
}

/// Which side of a receive a fold lands in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fold {
    /// The payload folds into the destination.
    Dst,
    /// The destination (host memory) folds into the payload and is left as it is; the payload
    /// is then divided by `divide` (when over 1), copied into the destination when `write`, and
    /// is what a `Source::Forward` of the same transfer sends on. The ring that forwards its
    /// partial sums this way reads each host element before it writes it (see
    /// [`Plan::host_split`]).
    Payload {
        /// Divisor of the folded payload (avg's last step); 1 for none.
        divide: u32,
        /// Whether the folded payload is also written into the destination.
        write: bool,
    },
}

/// One exchange step: an optional send and an optional receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// Destination rank and payload source.
    pub send: Option<(usize, Source)>,
    /// What to receive.
    pub recv: Option<Recv>,
    /// Receive (and fold in) before sending; otherwise send first.
    pub recv_first: bool,
}

/// One step of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Device copy from `src` to `dst` (skipped when they are the same memory).
    Copy {
        /// Source.
        src: Region,
        /// Destination, of the same length.
        dst: Region,
    },
    /// Divide every element of `dst` by `divisor` (avg's last step).
    Scale {
        /// The region.
        dst: Region,
        /// The divisor (the rank count).
        divisor: u32,
    },
    /// A send and/or receive.
    Transfer(Transfer),
}

impl Action {
    /// The region this action writes on the device, if any.
    pub fn writes(&self) -> Option<Region> {
        match self {
            Action::Copy { dst, .. } | Action::Scale { dst, .. } => Some(*dst),
            Action::Transfer(t) => t.recv.and_then(|r| match r.fold {
                // Folded into the frame, the destination only read.
                Fold::Payload { write: false, .. } => None,
                _ => Some(r.dst),
            }),
        }
    }
}

/// Everything one rank does for one collective call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The steps, in order.
    pub actions: Vec<Action>,
    /// Elements of scratch space the plan needs.
    pub scratch: usize,
    /// Elements of host memory the plan needs.
    pub host: usize,
    /// Host memory mirrors the tensors: `Buf::Host` element i is input element i until the
    /// plan first writes it and output element i from then on. The plan reads no host element
    /// after writing it, writes every host element before copying it out, and its only copies
    /// between host memory and a tensor are the input into host memory and host memory into
    /// the output, each at the same offsets and lengths. An executor may then read host memory
    /// from the input and write it into the output, both mapped in place (a unified-memory
    /// device), and skip those copies. The simulator checks all of this.
    pub host_split: bool,
}

impl Plan {
    pub(crate) fn push(&mut self, a: Action) {
        self.actions.push(a);
    }

    pub(crate) fn copy(&mut self, src: Region, dst: Region) {
        if src.len > 0 {
            self.push(Action::Copy { src, dst });
        }
    }

    pub(crate) fn scale(&mut self, dst: Region, divisor: u32) {
        if divisor > 1 && dst.len > 0 {
            self.push(Action::Scale { dst, divisor });
        }
    }

    pub(crate) fn transfer(&mut self, send: Option<(usize, Source)>, recv: Option<Recv>) {
        self.push(Action::Transfer(Transfer {
            send,
            recv,
            recv_first: false,
        }));
    }

    /// Number of frames this plan sends.
    pub fn sends(&self) -> usize {
        self.actions
            .iter()
            .filter(|a| matches!(a, Action::Transfer(Transfer { send: Some(_), .. })))
            .count()
    }
}

/// Splits `count` elements into `parts` contiguous pieces `(start, len)`; the first
/// `count % parts` pieces are one element longer, so lengths that are not multiples of `parts`
/// (and counts smaller than `parts`) split cleanly.
///
/// ```
/// assert_eq!(wccl::algo::partition(5, 4), vec![(0, 2), (2, 1), (3, 1), (4, 1)]);
/// assert_eq!(wccl::algo::partition(2, 3), vec![(0, 1), (1, 1), (2, 0)]);
/// ```
pub fn partition(count: usize, parts: usize) -> Vec<(usize, usize)> {
    let parts = parts.max(1);
    let (base, extra) = (count / parts, count % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let piece = (start, len);
            start += len;
            piece
        })
        .collect()
}

/// The `k` slices of a region, by [`partition`].
pub(crate) fn slices(r: Region, k: usize) -> impl Iterator<Item = Region> {
    partition(r.len, k)
        .into_iter()
        .map(move |(s, l)| Region::new(r.buf, r.offset + s, l))
}
