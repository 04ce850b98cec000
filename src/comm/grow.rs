//! Letting ranks back in: a communicator grows onto the link of a larger group, in which its
//! members keep their numbers and the newcomers take the numbers after them
//! ([`Communicator::grow`], [`Communicator::join`]).
//!
//! The members and the newcomers check each other before anyone changes: every rank sends rank
//! 0 (a member) a hello saying whether it is a member and of which size, rank 0 checks that
//! the members are exactly ranks `0..size` and the newcomers the rest, and answers everyone
//! with a welcome (the epoch to go on in) or a refusal (why). A rank that gets no answer by
//! the deadline, or a refusal, returns an error and keeps its communicator as it was.
//!
//! The new link is a fresh one (a new in-process mesh): nothing of the old group's traffic is
//! on it, and sequence numbers start again on every rank.

use std::sync::{Arc, OnceLock};

use super::communicator::{CommConfig, Communicator};
use crate::deadline::deadline_after;
use crate::device::RankDevice;
use crate::error::{At, Error, Result};
use crate::link::{Frame, Link, LinkError};

const MAGIC: [u8; 4] = *b"wGRW";
const HELLO: u8 = 1;
const WELCOME: u8 = 2;
const REFUSE: u8 = 3;

fn frame(kind: u8, payload: Vec<u8>) -> Frame {
    let mut header = MAGIC.to_vec();
    header.push(kind);
    Frame { header, payload }
}

/// A hello: `[size the sender is a member of, 0 for a newcomer: u32][its epoch: u32]`.
fn hello(member_of: usize, epoch: u32) -> Frame {
    let mut payload = (member_of as u32).to_le_bytes().to_vec();
    payload.extend(epoch.to_le_bytes());
    frame(HELLO, payload)
}

/// A frame of this protocol from a peer, checked before use: its kind and payload.
fn decode(f: &Frame) -> std::result::Result<(u8, &[u8]), String> {
    match f.header[..] {
        [m0, m1, m2, m3, kind] if [m0, m1, m2, m3] == MAGIC => Ok((kind, &f.payload)),
        _ => Err("a frame that is not part of the grow handshake".into()),
    }
}

fn word(b: &[u8], i: usize) -> Option<u32> {
    let at = i.checked_mul(4)?;
    b.get(at..at.checked_add(4)?)
        .and_then(|x| x.try_into().ok())
        .map(u32::from_le_bytes)
}

/// The handshake over `link` for a rank that is a member of a group of `member_of` (0 for a
/// newcomer) in `epoch`; returns the epoch to go on in. Waits at most `timeout` for each peer.
fn handshake(
    link: &dyn Link,
    member_of: usize,
    epoch: u32,
    timeout: std::time::Duration,
    at: At,
) -> Result<u32> {
    let (n, me) = (link.size(), link.rank());
    let deadline = deadline_after(timeout);
    let fail = |message: String| Error::Connect { at, message };
    let link_err = |peer: usize, e: LinkError| {
        fail(format!(
            "growing to {n} ranks: no answer from rank {peer}: {e:?}"
        ))
    };
    if me != 0 {
        link.send(0, hello(member_of, epoch))
            .map_err(|e| link_err(0, e))?;
        let f = link.recv(0, deadline).map_err(|e| link_err(0, e))?;
        return match decode(&f).map_err(&fail)? {
            (WELCOME, p) => word(p, 0).ok_or_else(|| fail("a welcome without its epoch".into())),
            (REFUSE, p) => Err(fail(format!(
                "rank 0 refused the grow: {}",
                String::from_utf8_lossy(p)
            ))),
            (k, _) => Err(fail(format!("a grow message of kind {k} from rank 0"))),
        };
    }
    // Rank 0: every other rank's hello, checked.
    let mut problems = Vec::new();
    let mut next = epoch;
    for r in 1..n {
        let f = match link.recv(r, deadline) {
            Ok(f) => f,
            Err(e) => {
                problems.push(format!("rank {r} did not say hello ({e:?})"));
                continue;
            }
        };
        let (kind, p) = match decode(&f) {
            Ok(x) => x,
            Err(e) => {
                problems.push(format!("rank {r}: {e}"));
                continue;
            }
        };
        match (kind, word(p, 0), word(p, 1), p.len()) {
            (HELLO, Some(of), Some(their_epoch), 8) => {
                let of = of as usize;
                let member = r < member_of;
                if member && of != member_of {
                    problems.push(format!(
                        "rank {r} is a member of a group of {of}, rank 0 of one of {member_of}"
                    ));
                } else if member && their_epoch != epoch {
                    problems.push(format!(
                        "rank {r} is in epoch {their_epoch} of its group, rank 0 in {epoch}"
                    ));
                } else if !member && of != 0 {
                    problems.push(format!(
                        "rank {r} is a member (of {of}), but members are ranks 0..{member_of}"
                    ));
                }
            }
            _ => problems.push(format!("rank {r} sent a malformed hello")),
        }
    }
    let reply = if problems.is_empty() {
        next = next.saturating_add(1);
        frame(WELCOME, next.to_le_bytes().to_vec())
    } else {
        frame(REFUSE, problems.join("; ").into_bytes())
    };
    // Best effort: a rank that cannot be told finds out at its deadline.
    for r in 1..n {
        let _ = link.send(r, reply.clone());
    }
    if problems.is_empty() {
        Ok(next)
    } else {
        Err(fail(format!("refused the grow: {}", problems.join("; "))))
    }
}

impl Communicator {
    /// Grows this communicator onto `link`, the link of a larger group in which this rank
    /// keeps its number: the members (every rank of this communicator) are its ranks
    /// `0..size`, and the newcomers, which call [`join`](Self::join), the ranks after them. Every
    /// member and every newcomer calls it at a call boundary; they check each other (rank 0
    /// collects and answers), waiting at most the communicator's timeout. Afterwards every
    /// rank's sequence numbers start again, and the newcomers hold nothing yet: broadcast them
    /// the parameters.
    ///
    /// Rank 0's answer is the commit: a member whose wait ends before it comes keeps its
    /// old communicator while the others grow, and the next call fails (never silently).
    /// Abort handles taken before a grow do not reach the grown communicator: take new ones.
    ///
    /// The new link must be a fresh one: in one process, a new mesh
    /// ([`LinkStack::mesh`](crate::link::LinkStack::mesh)); across processes, a fresh
    /// rendezvous ([`grow_at`](Self::grow_at) and [`join_grown`](Self::join_grown)).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a link that is not larger or does not give this rank its
    /// number, or a communicator that is broken or between an agreement and its shrink;
    /// [`Error::Connect`] when the handshake fails (a rank that does not answer, or disagrees
    /// on who the members are). Either way the communicator is unchanged.
    pub fn grow(&mut self, link: Box<dyn Link>) -> Result<()> {
        let at = At::rank(self.rank);
        let invalid = |message: String| Err(Error::InvalidArgument { at, message });
        if link.rank() != self.rank || link.size() <= self.size {
            return invalid(format!(
                "a link of rank {} of {} cannot grow rank {} of {}",
                link.rank(),
                link.size(),
                self.rank,
                self.size
            ));
        }
        if self.agreed {
            return invalid("shrink to the agreed ranks before growing".into());
        }
        if let Some(e) = &self.broken {
            return invalid(format!(
                "this communicator is broken ({e}); recover before growing"
            ));
        }
        let epoch = handshake(
            link.as_ref(),
            self.size,
            self.epoch,
            self.config.timeout,
            at,
        )?;
        self.rank = link.rank();
        self.size = link.size();
        self.link = Arc::from(link);
        // Aborts kept for sub-links of the old link have no reader on the new one.
        self.stash = Arc::default();
        self.reset_after_membership_change(epoch);
        Ok(())
    }

    /// Joins a group that is growing onto `link` (see [`grow`](Self::grow)) as a newcomer: a
    /// rank numbered after every member, on its own device `dev`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for rank 0 (always a member); [`Error::Connect`] when the
    /// handshake fails.
    pub fn join(dev: RankDevice, link: Box<dyn Link>, config: CommConfig) -> Result<Self> {
        let at = At::rank(link.rank());
        if link.rank() == 0 {
            return Err(Error::InvalidArgument {
                at,
                message: "rank 0 is a member of the group; a newcomer takes a rank after the \
                          members"
                    .into(),
            });
        }
        let epoch = handshake(link.as_ref(), 0, 0, config.timeout, at)?;
        let mut c = Communicator::new(dev, link, config);
        c.reset_after_membership_change(epoch);
        Ok(c)
    }

    /// The state a new membership starts from (a fresh link or epoch, nothing in flight).
    pub(super) fn reset_after_membership_change(&mut self, epoch: u32) {
        self.engine.stray.clear();
        self.epoch = epoch;
        self.agreements = 0;
        self.agreed = false;
        self.seq = 0;
        self.broken = None;
        self.cost_model = None;
        self.last_algorithm = None;
        self.aborted = Arc::new(OnceLock::new());
    }
}
