//! The crate's error type. Every variant says where it happened: the rank, and for errors inside
//! a collective, the collective and its sequence number on that communicator.

use std::fmt;
use std::time::Duration;

use crate::types::CollectiveKind;

/// Where an error happened: a rank, and the collective call (with its sequence number) if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct At {
    /// The rank that reports the error.
    pub rank: usize,
    /// The collective that was running, if any.
    pub op: Option<CollectiveKind>,
    /// The collective's sequence number on this communicator (1 for the first call).
    pub seq: u64,
}

impl At {
    pub(crate) fn rank(rank: usize) -> Self {
        At {
            rank,
            op: None,
            seq: 0,
        }
    }
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.op {
            Some(op) => write!(f, "rank {}, {} #{}", self.rank, op, self.seq),
            None => write!(f, "rank {}", self.rank),
        }
    }
}

/// Everything that can go wrong in wccl.
///
/// Non-exhaustive: new failure kinds are not breaking changes, so a `match` needs a `_` arm.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No adapter matched the selection.
    #[error("no adapter matches {wanted}; adapters found: {found}")]
    NoAdapter {
        /// What was asked for.
        wanted: String,
        /// The adapters that exist, for the message.
        found: String,
    },

    /// The launcher's variables are missing or inconsistent (before any rank is known).
    #[error("cannot join the job: {message}")]
    Launch {
        /// What is wrong, naming the variables.
        message: String,
    },

    /// `request_device` failed for a rank.
    #[error("{at}: could not open a device on adapter '{adapter}': {message}")]
    DeviceRequest {
        /// The rank.
        at: At,
        /// The adapter's name.
        adapter: String,
        /// wgpu's message.
        message: String,
    },

    /// The element type needs a device feature that this rank's device lacks.
    #[error("{at}: {dtype} needs the SHADER_F16 feature, which the device on '{adapter}' lacks")]
    UnsupportedDType {
        /// Where.
        at: At,
        /// The element type asked for.
        dtype: crate::DType,
        /// The adapter's name.
        adapter: String,
    },

    /// The arguments of a call are wrong; nothing was written.
    #[error("{at}: invalid argument: {message}")]
    InvalidArgument {
        /// Where.
        at: At,
        /// What is wrong.
        message: String,
    },

    /// The deadline passed while this rank waited for a peer.
    #[error("{at}: timed out after {waited:?} waiting for rank(s) {waiting_on:?}")]
    Timeout {
        /// Where.
        at: At,
        /// The ranks holding this rank up: the peers that fell silent (no frame, not even a
        /// heartbeat, for half the call; a link that can tell, as TCP's), else the peer this
        /// rank was receiving from.
        waiting_on: Vec<usize>,
        /// How long the call had run.
        waited: Duration,
    },

    /// A peer called a different collective, or the same one with other arguments.
    #[error(
        "{at}: rank {peer} disagrees on {field}: this rank has {ours}, rank {peer} has {theirs}"
    )]
    Mismatch {
        /// Where.
        at: At,
        /// The peer whose message disagreed.
        peer: usize,
        /// Which field of the call disagreed (collective, sequence, dtype, op, count, root, ...).
        field: &'static str,
        /// This rank's value.
        ours: String,
        /// The peer's value.
        theirs: String,
    },

    /// A peer hit an error during this collective and told everyone.
    #[error("{at}: rank {peer} aborted the collective: {reason}")]
    PeerAborted {
        /// Where.
        at: At,
        /// The rank that aborted.
        peer: usize,
        /// Its error, as text.
        reason: String,
    },

    /// The link to a peer is gone (its communicator was dropped or its process died).
    #[error("{at}: the link to rank {peer} is closed (rank gone)")]
    LinkClosed {
        /// Where.
        at: At,
        /// The peer.
        peer: usize,
    },

    /// A peer closed its link cleanly (it finished, or dropped its communicator) while this
    /// rank still waited for it: a rank that left at the wrong time, not a crash.
    #[error(
        "{at}: rank {peer} exited (closed its link cleanly) while this rank still expected frames from it"
    )]
    PeerExited {
        /// Where.
        at: At,
        /// The peer.
        peer: usize,
    },

    /// A frame from a peer failed its checks (checksum, length, framing), or the peer refused
    /// one of this rank's: it was not used, and the link to the peer is closed.
    #[error("{at}: the link to rank {peer} failed its checks: {reason}")]
    Corrupt {
        /// Where.
        at: At,
        /// The peer.
        peer: usize,
        /// What was wrong.
        reason: String,
    },

    /// A rank revoked the communicator ([`Communicator::revoke`](crate::Communicator::revoke),
    /// or [`AbortHandle::revoke`](crate::AbortHandle::revoke)): this call and every later one
    /// fail so, until the ranks [`recover`](crate::Communicator::recover) (a communicator an
    /// earlier failure broke keeps reporting that one).
    #[error("{at}: rank {by} revoked the communicator: {reason}")]
    Revoked {
        /// Where.
        at: At,
        /// The rank that revoked it.
        by: usize,
        /// Why.
        reason: String,
    },

    /// The survivors' agreement left no more than half of the group: this side may not go on by
    /// itself (the split-brain guard; the other side may hold the majority).
    #[error(
        "{at}: no quorum: only ranks {survivors:?} of {size} would go on, not more than half; \
         this side stops"
    )]
    NoQuorum {
        /// Where.
        at: At,
        /// The ranks the agreement left.
        survivors: Vec<usize>,
        /// The size of the group that agreed.
        size: usize,
    },

    /// The survivors agreed that this rank failed (it was cut off, or too slow to answer): it
    /// is not among those who go on.
    #[error("{at}: the survivors agreed that ranks {failed:?} failed, this rank among them")]
    Excluded {
        /// Where.
        at: At,
        /// The failed ranks as agreed.
        failed: Vec<usize>,
    },

    /// The root of a broadcast or reduce died during a call the survivors finished among
    /// themselves ([`OnFailure::FinishAmongSurvivors`](crate::OnFailure)), and its data went
    /// with it: no survivor held the whole broadcast, or the reduction had no rank to go to.
    /// The survivors' communicator is shrunk and usable; only this call's result is lost.
    #[error("{at}: root rank {root} died and its data with it: {message}")]
    RootLost {
        /// Where.
        at: At,
        /// The root, numbered as when the call began.
        root: usize,
        /// What was lost.
        message: String,
    },

    /// Ranks could not find or connect to each other (rendezvous, handshake, mesh), or the
    /// launcher's environment is inconsistent.
    #[error("{at}: could not connect: {message}")]
    Connect {
        /// Where.
        at: At,
        /// What went wrong, naming the ranks, addresses and variables involved.
        message: String,
    },

    /// The device reported an error, was lost, or did not finish in time.
    #[error("{at}: device error: {message}")]
    Device {
        /// Where.
        at: At,
        /// What the device said.
        message: String,
    },

    /// An earlier collective failed on this communicator; build a new one.
    #[error("{at}: communicator is broken by an earlier error; rebuild it (cause: {cause})")]
    Broken {
        /// Where.
        at: At,
        /// The error that broke it.
        #[source]
        cause: Box<Error>,
    },

    /// This rank was aborted through an [`AbortHandle`](crate::AbortHandle) (by a watchdog,
    /// say); its peers see [`Error::PeerAborted`] naming it.
    #[error("{at}: aborted through its abort handle: {reason}")]
    Aborted {
        /// Where.
        at: At,
        /// The reason given to [`AbortHandle::abort`](crate::AbortHandle::abort).
        reason: String,
    },

    /// A replica answered with less than a worker had already been answered with, under
    /// `Consistency::Strong` (which promises that never happens): the updates in between are
    /// lost, and the worker stops instead of training on from older parameters.
    #[error(
        "{at}: server rank {server} answered '{key}' at version {got}, but this worker was already answered with version {seen}: updates lost"
    )]
    Lost {
        /// Where.
        at: At,
        /// The server that answered.
        server: usize,
        /// The parameter.
        key: String,
        /// The version it answered with.
        got: u64,
        /// The highest version this worker had seen.
        seen: u64,
    },

    /// Under `Consistency::Strong` no server can answer for a key now: the replica asked is cut
    /// off from its head and cannot prove its copy is current (a partition, not the caller's
    /// mistake; a later call may succeed once it heals).
    #[error("{at}: '{key}' is unavailable: {reason}")]
    Unavailable {
        /// Where.
        at: At,
        /// The parameter.
        key: String,
        /// The server's reason.
        reason: String,
    },

    /// A checkpoint could not be written or restored; nothing was overwritten.
    #[error("{at}: checkpoint: {message}")]
    Checkpoint {
        /// Where.
        at: At,
        /// What went wrong, with the path.
        message: String,
    },

    /// A rank's thread panicked during a group call.
    #[error("{at}: the rank's thread panicked: {message}")]
    Panicked {
        /// Where.
        at: At,
        /// The panic message.
        message: String,
    },
}

impl Error {
    /// Where the error happened, if it is tied to a rank.
    pub fn at(&self) -> Option<At> {
        match self {
            Error::NoAdapter { .. } | Error::Launch { .. } => None,
            Error::DeviceRequest { at, .. }
            | Error::UnsupportedDType { at, .. }
            | Error::InvalidArgument { at, .. }
            | Error::Timeout { at, .. }
            | Error::Mismatch { at, .. }
            | Error::PeerAborted { at, .. }
            | Error::LinkClosed { at, .. }
            | Error::PeerExited { at, .. }
            | Error::Corrupt { at, .. }
            | Error::NoQuorum { at, .. }
            | Error::Revoked { at, .. }
            | Error::Excluded { at, .. }
            | Error::RootLost { at, .. }
            | Error::Connect { at, .. }
            | Error::Device { at, .. }
            | Error::Broken { at, .. }
            | Error::Aborted { at, .. }
            | Error::Lost { at, .. }
            | Error::Unavailable { at, .. }
            | Error::Checkpoint { at, .. }
            | Error::Panicked { at, .. } => Some(*at),
        }
    }

    /// The rank that reports the error, if any.
    pub fn rank(&self) -> Option<usize> {
        self.at().map(|a| a.rank)
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
