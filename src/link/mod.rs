//! Links: how frames move between ranks. A link knows peers and bytes, never which collective
//! runs over it. [`InProcLink`] is a mesh of crossbeam channels between threads of one process;
//! [`TcpLink`] connects one process per rank over TCP; [`EmulatedLink`] and [`FaultyLink`] wrap
//! any link (`FaultyLink<TcpLink>`) to emulate a network or inject faults.
//!
//! # The contract every link keeps
//! - **FIFO per ordered pair of ranks.** Frames from rank a to rank b arrive in the order a
//!   sent them, each whole, or not at all after the link to a ended (never a frame twice, but for
//!   `FaultPlan::duplicate_next`, which breaks this on purpose).
//! - **`send` does not wait for the receiver.** It queues the frame (in the receiver's channel,
//!   or a writer thread's queue) and returns; a slow or stopped peer is found by the receiver's
//!   deadline, not by a blocked sender.
//! - **Every receive has a deadline.** `recv` waits for the next frame from one peer, and
//!   `recv_any` for the next from any of several (biased to the earliest listed when several
//!   are ready), until the deadline at most: then [`LinkError::Timeout`].
//! - **Aborts come first and wake waiters.** [`Link::abort`] reaches every peer, and a peer
//!   blocked in `recv`/`recv_any` returns [`LinkError::Aborted`] at once, before frames that are
//!   still queued. [`Link::remote_abort`] does the same from another thread and also wakes the
//!   rank's own receive.
//! - **Ends are reported, after the frames sent before them.** A peer whose end went away is
//!   [`LinkError::Closed`] from `recv` and [`LinkError::Gone`] from `recv_any`; a link that can
//!   tell also reports a clean goodbye ([`LinkError::Exited`]) and a frame that failed its checks
//!   ([`LinkError::Corrupt`]).

mod checksum;
mod emulated;
mod faulty;
mod inproc;
mod stack;
mod sub;
pub mod tcp;

use std::sync::Arc;
use std::time::Instant;

pub use checksum::Checksummed;
pub use emulated::{EmulatedLink, LinkEmulation};
pub use faulty::{FaultPlan, FaultyLink};
pub use inproc::{InProcLink, in_process_mesh};
pub use stack::LinkStack;
pub(crate) use sub::AbortStash;
pub use sub::SubLink;
pub use tcp::{TcpLink, TcpOptions};

/// One message between two ranks: a small header the communicator defines, and a payload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frame {
    /// The sender's header bytes (opaque to the link).
    pub header: Vec<u8>,
    /// The payload bytes.
    pub payload: Vec<u8>,
}

/// Why a link operation failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkError {
    /// Nothing came from the peer before the deadline.
    Timeout,
    /// The peer's end is gone.
    Closed,
    /// The peer's end is gone (from [`Link::recv_any`], which says which peer).
    Gone(usize),
    /// The peer closed its end cleanly (its link was dropped: the process finished or left)
    /// while this rank still expected frames from it.
    Exited(usize),
    /// This rank's frame cannot be sent (over the limits the link agreed with the peer); nothing
    /// was sent, and the link is intact.
    Unsendable(String),
    /// A frame from the peer failed its checks (length, checksum, framing), or the peer refused
    /// one of this rank's: the link to the peer is closed, since nothing after it can be
    /// trusted (TCP closes the connection; [`Checksummed`] closes the pair on both sides).
    Corrupt {
        /// The peer.
        peer: usize,
        /// What was wrong.
        reason: String,
    },
    /// A rank called [`Link::abort`] with a reason.
    Aborted {
        /// The rank that aborted.
        from: usize,
        /// Its reason.
        reason: String,
    },
}

/// An abort as a link's control channel carries it: who gave up, and why.
pub(crate) struct Abort {
    pub(crate) from: usize,
    pub(crate) reason: String,
}

/// `recv_any` over channels, for the links built on them (in-process, TCP): the next frame
/// from any of `receivers`, aborts on `control` first, until `deadline`. A receiver whose
/// sender is gone is reported by `gone(peer)`.
pub(crate) fn select_any(
    control: &crossbeam::channel::Receiver<Abort>,
    receivers: &[(usize, &crossbeam::channel::Receiver<Frame>)],
    deadline: Instant,
    gone: impl Fn(usize) -> LinkError,
) -> Result<(usize, Frame), LinkError> {
    let mut sel = crossbeam::channel::Select::new_biased();
    let control_index = sel.recv(control);
    for (_, r) in receivers {
        sel.recv(r);
    }
    let op = match sel.select_deadline(deadline) {
        Ok(op) => op,
        Err(_) => return Err(LinkError::Timeout),
    };
    let index = op.index();
    if index == control_index {
        return match op.recv(control) {
            Ok(a) => Err(LinkError::Aborted {
                from: a.from,
                reason: a.reason,
            }),
            Err(_) => Err(LinkError::Closed),
        };
    }
    let Some(&(peer, r)) = index.checked_sub(1).and_then(|i| receivers.get(i)) else {
        return Err(LinkError::Closed);
    };
    op.recv(r).map(|f| (peer, f)).map_err(|_| gone(peer))
}

/// Aborts on a rank's behalf from any thread; see [`Link::remote_abort`].
pub type RemoteAbort = Arc<dyn Fn(&str) + Send + Sync>;

/// A rank's connections to every other rank of its group.
///
/// `Send + Sync`: a communicator that owns a link is shared across threads by reference.
///
/// `send` never blocks for long (frames queue at the receiver); `recv` waits for the next frame
/// from one peer until the deadline, but returns early with [`LinkError::Aborted`] when any rank
/// aborts.
pub trait Link: Send + Sync {
    /// This rank.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// Sends a frame to `to`.
    fn send(&self, to: usize, frame: Frame) -> Result<(), LinkError>;
    /// Receives the next frame from `from`, waiting until `deadline` at most.
    fn recv(&self, from: usize, deadline: Instant) -> Result<Frame, LinkError>;
    /// Receives the next frame from any of `peers`, waiting until `deadline` at most; returns
    /// the sender with the frame. A peer whose end is gone is reported as [`LinkError::Gone`].
    fn recv_any(&self, peers: &[usize], deadline: Instant) -> Result<(usize, Frame), LinkError>;
    /// The peers not heard from (no frame, not even a heartbeat) for longer than
    /// `longer_than`: a stopped or hung process. Empty (the default) for a link that cannot
    /// tell. A rank whose deadline passed names these as the cause, rather than the peer it
    /// happened to wait on (which may itself be waiting on a silent one).
    fn silent_peers(&self, longer_than: std::time::Duration) -> Vec<usize> {
        let _ = longer_than;
        Vec::new()
    }
    /// Tells every other rank that this rank gave up, and why (best effort).
    fn abort(&self, reason: &str);
    /// A function that aborts for this rank from another thread while this rank may be blocked
    /// in [`recv`](Self::recv): it tells every other rank, as [`abort`](Self::abort) does, and
    /// also wakes this rank's own `recv`/`recv_any` with [`LinkError::Aborted`] whose `from` is
    /// this rank. `None` (the default) when the link cannot; an abort handle then takes effect
    /// at the rank's next call or its deadline.
    fn remote_abort(&self) -> Option<RemoteAbort> {
        None
    }
}

/// `Link` for references and boxes of links, by delegation.
macro_rules! delegate_link {
    ($($t:ty),*) => {$(
        impl<L: Link + ?Sized> Link for $t {
            fn rank(&self) -> usize {
                (**self).rank()
            }
            fn size(&self) -> usize {
                (**self).size()
            }
            fn send(&self, to: usize, frame: Frame) -> Result<(), LinkError> {
                (**self).send(to, frame)
            }
            fn recv(&self, from: usize, deadline: Instant) -> Result<Frame, LinkError> {
                (**self).recv(from, deadline)
            }
            fn recv_any(
                &self,
                peers: &[usize],
                deadline: Instant,
            ) -> Result<(usize, Frame), LinkError> {
                (**self).recv_any(peers, deadline)
            }
            fn silent_peers(&self, longer_than: std::time::Duration) -> Vec<usize> {
                (**self).silent_peers(longer_than)
            }
            fn abort(&self, reason: &str) {
                (**self).abort(reason)
            }
            fn remote_abort(&self) -> Option<RemoteAbort> {
                (**self).remote_abort()
            }
        }
    )*};
}

delegate_link!(&L, Box<L>, std::sync::Arc<L>);
