//! A link over some of another link's ranks, renumbered in their old order: what
//! [`Communicator::shrink`](crate::Communicator::shrink) gives the survivors of a failure.
//!
//! The old link still carries what the failed call left behind: frames the survivors sent each
//! other before they gave up, and their aborts. None of it may reach the new communicator. So
//! every frame and abort sent through a `SubLink` carries its epoch (a tag before the header,
//! with a checksum of the members; a mark before the abort's reason), and a `SubLink` drops
//! whatever arrives without its own tag: anything the old communicator, an older sub-link over
//! the same link, or a sub-link with other members sent.
//!
//! The filter protects the new epoch from the old, not the other way round: a rank still
//! inside the failed call takes a new-epoch frame for a frame of that call (and fails it). So
//! no member may send in the new epoch before every member has left the old call; agreeing on
//! the members first ([`Communicator::agree`](crate::Communicator::agree)) guarantees it, since
//! a rank agrees only once its call returned. Each level of shrinking adds its tag to every
//! frame (20 bytes).
//!
//! ```
//! use std::time::{Duration, Instant};
//! use wccl::link::{Frame, Link, SubLink, in_process_mesh};
//! let mut old = in_process_mesh(4).into_iter();
//! let (l0, _l1, l2, l3) = (old.next().unwrap(), old.next(), old.next().unwrap(), old.next().unwrap());
//! // Left over from the failed call: a frame from 2 to 3 in the old numbering.
//! l2.send(3, Frame { header: vec![9], payload: vec![] }).unwrap();
//! // Rank 1 is gone; 0, 2 and 3 become 0, 1 and 2.
//! let subs: Vec<_> = [l0, l2, l3]
//!     .into_iter()
//!     .map(|l| SubLink::new(l, vec![0, 2, 3], 1).unwrap())
//!     .collect();
//! subs[1].send(2, Frame { header: vec![1], payload: vec![5] }).unwrap();
//! let got = subs[2].recv(1, Instant::now() + Duration::from_secs(5)).unwrap();
//! assert_eq!(got, Frame { header: vec![1], payload: vec![5] }); // the stale frame was dropped
//! ```

use std::time::{Duration, Instant};

use super::{Frame, Link, LinkError, RemoteAbort};

/// Marks a sub-link's frames: magic, the epoch, then a CRC32C of the members (survivors that
/// passed different failed sets of one size do not take each other's frames).
const MAGIC: [u8; 8] = *b"wcclSUB\x01";
const TAG: usize = MAGIC.len() + 8;
/// Brackets the epoch before an abort's reason.
const MARK: char = '\u{1}';

/// Aborts of other epochs that sub-links over one inner link took from it, kept for the
/// sub-link of their epoch: a rank still in an agreement of the old epoch must not lose the
/// abort a peer already in the new one sent (the new epoch's call would wait for its
/// deadline instead). Bounded: the oldest go first.
pub(crate) type AbortStash =
    std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<(usize, String)>>>;

/// Aborts kept in a stash, at most.
const STASHED: usize = 64;

/// A [`Link`] among `members` of an inner link: new rank `i` is inner rank `members[i]`.
#[derive(Debug)]
pub struct SubLink<L: Link> {
    inner: L,
    members: Vec<usize>,
    rank: usize,
    epoch: u32,
    /// CRC32C of the members, in the tag.
    sum: u32,
    stash: Option<AbortStash>,
}

impl<L: Link> SubLink<L> {
    /// The ranks `members` of `inner` (in increasing order, this rank among them), renumbered
    /// `0..members.len()`, with frames of `epoch` only. Every member must build its sub-link
    /// with the same members and epoch, and the epoch must differ from every earlier
    /// sub-link's over the same link (the communicator counts them up from 1).
    pub fn new(inner: L, members: Vec<usize>, epoch: u32) -> Result<Self, String> {
        let rank = Self::check(&members, inner.size(), inner.rank())?;
        let sum = members.iter().fold(0, |c, &m| {
            crc32c::crc32c_append(c, &(m as u64).to_le_bytes())
        });
        Ok(SubLink {
            inner,
            members,
            rank,
            epoch,
            sum,
            stash: None,
        })
    }

    /// Whether `members` can make a sub-link of a link of `size` ranks held by rank `me`: its
    /// new rank, or why not.
    pub fn check(members: &[usize], size: usize, me: usize) -> Result<usize, String> {
        if members.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!(
                "the members {members:?} are not in increasing order without repeats"
            ));
        }
        if let Some(&m) = members.iter().find(|&&m| m >= size) {
            return Err(format!("member {m} is not a rank of a group of {size}"));
        }
        members
            .iter()
            .position(|&m| m == me)
            .ok_or_else(|| format!("this rank ({me}) is not among the members {members:?}"))
    }

    /// The inner ranks of the members, in new-rank order.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    /// The epoch this sub-link's frames carry.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The new rank of inner rank `r`, if a member.
    fn renumber(&self, r: usize) -> Option<usize> {
        self.members.binary_search(&r).ok()
    }

    fn tag(&self) -> [u8; TAG] {
        let mut t = [0u8; TAG];
        t[..MAGIC.len()].copy_from_slice(&MAGIC);
        t[MAGIC.len()..MAGIC.len() + 4].copy_from_slice(&self.epoch.to_le_bytes());
        t[MAGIC.len() + 4..].copy_from_slice(&self.sum.to_le_bytes());
        t
    }

    /// Shares `stash` with the other sub-links over the same inner link (see [`AbortStash`]).
    pub(crate) fn with_stash(mut self, stash: AbortStash) -> Self {
        self.stash = Some(stash);
        self
    }

    /// An abort of this epoch another sub-link kept, if any.
    fn stashed(&self) -> Option<LinkError> {
        let stash = self.stash.as_ref()?;
        let mut q = stash.lock().unwrap_or_else(|p| p.into_inner());
        let prefix = format!("{MARK}{}{MARK}", self.epoch);
        let i = q.iter().position(|(_, r)| r.starts_with(&prefix))?;
        let (from, reason) = q.remove(i)?;
        drop(q);
        self.error(LinkError::Aborted { from, reason })
    }

    /// Keeps an abort of another epoch for its sub-link.
    fn keep(&self, e: &LinkError) {
        if let (Some(stash), LinkError::Aborted { from, reason }) = (&self.stash, e)
            && reason.starts_with(MARK)
        {
            let mut q = stash.lock().unwrap_or_else(|p| p.into_inner());
            if q.len() >= STASHED {
                q.pop_front();
            }
            q.push_back((*from, reason.clone()));
        }
    }

    /// A frame of this sub-link that another reader took from the inner link (a rank still
    /// in a call reads an agreement's frame): without its tag, or `None` if it is not one.
    pub(crate) fn open(&self, frame: Frame) -> Option<Frame> {
        self.strip(frame)
    }

    /// The frame without its tag, or `None` for a frame of another epoch (or of no sub-link).
    fn strip(&self, mut frame: Frame) -> Option<Frame> {
        if frame.header.get(..TAG)? != self.tag() {
            return None;
        }
        frame.header.drain(..TAG);
        Some(frame)
    }

    fn mark(&self, reason: &str) -> String {
        format!("{MARK}{}{MARK}{reason}", self.epoch)
    }

    /// An inner error as this sub-link reports it: ranks renumbered; `None` for what belongs
    /// to another epoch or comes from a rank outside the members (an abort of the old call).
    fn error(&self, e: LinkError) -> Option<LinkError> {
        let map = |r: usize| self.renumber(r);
        Some(match e {
            LinkError::Aborted { from, reason } => {
                let rest = reason.strip_prefix(MARK)?;
                let (epoch, reason) = rest.split_once(MARK)?;
                if epoch.parse::<u32>().ok()? != self.epoch {
                    return None;
                }
                LinkError::Aborted {
                    from: map(from)?,
                    reason: reason.to_string(),
                }
            }
            LinkError::Gone(p) => LinkError::Gone(map(p)?),
            LinkError::Exited(p) => LinkError::Exited(map(p)?),
            LinkError::Corrupt { peer, reason } => LinkError::Corrupt {
                peer: map(peer)?,
                reason,
            },
            other => other,
        })
    }

    fn inner_rank(&self, r: usize) -> Result<usize, LinkError> {
        self.members.get(r).copied().ok_or_else(|| {
            LinkError::Unsendable(format!(
                "rank {r} is not a rank of this group of {}",
                self.members.len()
            ))
        })
    }
}

impl<L: Link> Link for SubLink<L> {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn send(&self, to: usize, mut frame: Frame) -> Result<(), LinkError> {
        let peer = self.inner_rank(to)?;
        frame.header.splice(0..0, self.tag());
        self.inner
            .send(peer, frame)
            .map_err(|e| self.error(e).unwrap_or(LinkError::Closed))
    }

    fn recv(&self, from: usize, deadline: Instant) -> Result<Frame, LinkError> {
        let peer = self.inner_rank(from)?;
        // Each pass consumes one stale frame or abort, or returns: no spinning.
        loop {
            if let Some(e) = self.stashed() {
                return Err(e);
            }
            match self.inner.recv(peer, deadline) {
                Ok(frame) => {
                    if let Some(f) = self.strip(frame) {
                        return Ok(f);
                    }
                }
                Err(e) => match self.error(e.clone()) {
                    Some(e) => return Err(e),
                    None => self.keep(&e),
                },
            }
        }
    }

    fn recv_any(&self, peers: &[usize], deadline: Instant) -> Result<(usize, Frame), LinkError> {
        let inner: Vec<usize> = peers
            .iter()
            .map(|&p| self.inner_rank(p))
            .collect::<Result<_, _>>()?;
        loop {
            if let Some(e) = self.stashed() {
                return Err(e);
            }
            match self.inner.recv_any(&inner, deadline) {
                Ok((p, frame)) => {
                    if let (Some(f), Some(from)) = (self.strip(frame), self.renumber(p)) {
                        return Ok((from, f));
                    }
                }
                Err(e) => match self.error(e.clone()) {
                    Some(e) => return Err(e),
                    None => self.keep(&e),
                },
            }
        }
    }

    fn silent_peers(&self, longer_than: Duration) -> Vec<usize> {
        self.inner
            .silent_peers(longer_than)
            .into_iter()
            .filter_map(|p| self.renumber(p))
            .collect()
    }

    fn abort(&self, reason: &str) {
        self.inner.abort(&self.mark(reason));
    }

    fn remote_abort(&self) -> Option<RemoteAbort> {
        let inner = self.inner.remote_abort()?;
        let epoch = self.epoch;
        Some(std::sync::Arc::new(move |reason: &str| {
            inner(&format!("{MARK}{epoch}{MARK}{reason}"))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::in_process_mesh;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    fn frame(tag: u8) -> Frame {
        Frame {
            header: vec![tag, 2, 3],
            payload: vec![tag; 5],
        }
    }

    /// Four ranks, rank 1 gone: the survivors renumbered 0, 1, 2; what the old links left
    /// queued (frames and aborts, from members and from the dead rank) and what an older
    /// sub-link sent never reaches the new one; ranks in errors and aborts are renumbered.
    #[test]
    fn an_abort_of_a_newer_epoch_read_by_an_older_reader_is_kept_for_it() {
        let mut links = in_process_mesh(2).into_iter();
        let (Some(l0), Some(l1)) = (links.next(), links.next()) else {
            panic!("two links")
        };
        let stash = AbortStash::default();
        // Rank 1 already in epoch 2 gives up while rank 0 still reads in epoch 7 (an
        // agreement of the old epoch).
        let new1 = SubLink::new(&l1, vec![0, 1], 2).expect("members");
        new1.abort("gave up");
        let old0 = SubLink::new(&l0, vec![0, 1], 7)
            .expect("members")
            .with_stash(stash.clone());
        let short = || Instant::now() + Duration::from_millis(30);
        assert_eq!(old0.recv(1, short()), Err(LinkError::Timeout));
        // The epoch-2 reader gets it, once.
        let new0 = SubLink::new(&l0, vec![0, 1], 2)
            .expect("members")
            .with_stash(stash);
        assert_eq!(
            new0.recv(1, soon()),
            Err(LinkError::Aborted {
                from: 1,
                reason: "gave up".into()
            })
        );
        assert_eq!(new0.recv(1, short()), Err(LinkError::Timeout));
    }

    #[test]
    fn stale_frames_and_aborts_never_reach_a_new_epoch() {
        let old = in_process_mesh(4);
        // Left behind by the failed call.
        old[2].send(3, frame(1)).expect("send");
        old[1].send(3, frame(2)).expect("send");
        old[0].abort("the old call failed");
        old[1].abort("so did rank 1");
        let mut it = old.into_iter();
        let (l0, l1, l2, l3) = (it.next(), it.next(), it.next(), it.next());
        let (Some(l0), Some(_l1), Some(l2), Some(l3)) = (l0, l1, l2, l3) else {
            panic!("four links")
        };
        // An older sub-link's frame: epoch 1 over the same links, then epoch 2.
        let e1 = SubLink::new(l2, vec![0, 2, 3], 1).expect("members");
        e1.send(2, frame(3)).expect("send");
        let l2 = e1.inner;
        let subs: Vec<_> = [l0, l2, l3]
            .into_iter()
            .map(|l| SubLink::new(l, vec![0, 2, 3], 2).expect("members"))
            .collect();
        assert_eq!(
            subs.iter()
                .map(|s| (s.rank(), s.size()))
                .collect::<Vec<_>>(),
            [(0, 3), (1, 3), (2, 3)]
        );
        subs[1].send(2, frame(4)).expect("send");
        assert_eq!(subs[2].recv(1, soon()), Ok(frame(4)));
        subs[0].send(2, frame(5)).expect("send");
        assert_eq!(subs[2].recv_any(&[0, 1], soon()), Ok((0, frame(5))));
        // An abort of this epoch arrives, renumbered, after the stale ones were dropped.
        subs[1].abort("now");
        assert_eq!(
            subs[2].recv(0, soon()),
            Err(LinkError::Aborted {
                from: 1,
                reason: "now".into()
            })
        );
        // Nothing else is pending: the wait ends at its deadline.
        assert_eq!(
            subs[2].recv(1, Instant::now() + Duration::from_millis(30)),
            Err(LinkError::Timeout)
        );
    }

    #[test]
    fn bad_members_are_refused_and_bad_ranks_are_errors() {
        let mut old = in_process_mesh(3).into_iter();
        let (Some(l0), Some(l1), Some(l2)) = (old.next(), old.next(), old.next()) else {
            panic!("three links")
        };
        assert!(SubLink::new(l0, vec![1, 2], 1).is_err(), "not a member");
        assert!(SubLink::new(l1, vec![1, 0], 1).is_err(), "order");
        assert!(SubLink::new(l2, vec![0, 2, 3], 1).is_err(), "out of range");
        let mut old = in_process_mesh(2).into_iter();
        let Some(l0) = old.next() else {
            panic!("a link")
        };
        let s = SubLink::new(l0, vec![0, 1], 1).expect("members");
        assert!(matches!(s.send(2, frame(1)), Err(LinkError::Unsendable(_))));
        assert!(s.recv(5, soon()).is_err());
        assert!(s.recv_any(&[0, 7], soon()).is_err());
    }
}
