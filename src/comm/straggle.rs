//! Stragglers: `CallOptions::skip_after(d)` runs an all-reduce among the ranks that arrived
//! within `d` of the first, as backup workers do for a parameter server, instead of waiting for
//! the slowest.
//!
//! Rank 0 coordinates each such call:
//! - Every other rank sends it an arrival (the call's sequence number) as it enters the call.
//! - Rank 0 waits from its own arrival until every rank has arrived or `d` has passed. Arrivals
//!   of older calls (a rank that was skipped and is still behind) are dropped.
//! - It then tells every rank who takes part.
//! - The participants run the all-reduce among themselves, over a view of the link that
//!   numbers them `0..m`. The skipped ranks return at once: their output is left as it was,
//!   and they take part again in the first call they reach in time.
//!
//! Frames between two ranks arrive in order, so a rank reads the decision of its own call: the
//! ones of the calls it was skipped in are queued for it in turn. Rank 0 cannot be skipped:
//! it is the one that waits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::communicator::{CallOptions, Collective, Communicator};
use super::executor::call_link_error;
use super::survive::Outcome;
use crate::deadline::{deadline_after, deadline_from};
use crate::error::{At, Error, Result};
use crate::link::{Frame, Link, LinkError, RemoteAbort};

const MAGIC: [u8; 4] = *b"wSKP";
const ARRIVE: u8 = 1;
const DECIDE: u8 = 2;

fn frame(kind: u8, seq: u64, ranks: &[usize]) -> Frame {
    let mut header = MAGIC.to_vec();
    header.push(kind);
    header.extend(seq.to_le_bytes());
    Frame {
        header,
        payload: ranks
            .iter()
            .flat_map(|&r| (r as u32).to_le_bytes())
            .collect(),
    }
}

/// The call `f` announces an arrival for, if it is an arrival: a call's reader skips those of
/// earlier calls, left by a rank that was late for a call already decided without it.
pub(crate) fn arrival_seq(f: &Frame) -> Option<u64> {
    if f.header.len() != 13 || f.header[..4] != MAGIC || f.header[4] != ARRIVE {
        return None;
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&f.header[5..13]);
    Some(u64::from_le_bytes(seq))
}

/// A frame of this protocol from a peer, checked before use: its kind, sequence number and
/// ranks (each below `n`, ascending).
fn decode(f: &Frame, n: usize) -> std::result::Result<(u8, u64, Vec<usize>), String> {
    let h = &f.header;
    if h.len() != 13 || h[..4] != MAGIC {
        return Err("a frame of another call where an arrival or a decision belongs".into());
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&h[5..13]);
    let p = &f.payload;
    if !p.len().is_multiple_of(4) || p.len() / 4 > n {
        return Err(format!("{} bytes of ranks for a group of {n}", p.len()));
    }
    let ranks: Vec<usize> = p
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    if ranks.iter().any(|&r| r >= n) || ranks.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!("ranks {ranks:?} for a group of {n}"));
    }
    Ok((h[4], u64::from_le_bytes(seq), ranks))
}

/// Some ranks of a link, numbered `0..m` in their order (no tags: the participants of a call
/// read only that call's frames from each other, in order).
struct Members {
    inner: Arc<dyn Link>,
    members: Vec<usize>,
    me: usize,
}

impl Members {
    fn global(&self, r: usize) -> usize {
        global(&self.members, r)
    }

    /// A peer's number among the members; a rank outside them is numbered after them
    /// (`members.len() + its number`), so that it is never taken for a member.
    fn local(&self, r: usize) -> usize {
        self.members
            .iter()
            .position(|&m| m == r)
            .unwrap_or_else(|| self.members.len().saturating_add(r))
    }

    fn error(&self, e: LinkError) -> LinkError {
        match e {
            LinkError::Gone(p) => LinkError::Gone(self.local(p)),
            LinkError::Exited(p) => LinkError::Exited(self.local(p)),
            LinkError::Corrupt { peer, reason } => LinkError::Corrupt {
                peer: self.local(peer),
                reason,
            },
            LinkError::Aborted { from, reason } => LinkError::Aborted {
                from: self.local(from),
                reason,
            },
            e => e,
        }
    }
}

impl Link for Members {
    fn rank(&self) -> usize {
        self.me
    }
    fn size(&self) -> usize {
        self.members.len()
    }
    fn send(&self, to: usize, frame: Frame) -> std::result::Result<(), LinkError> {
        self.inner
            .send(self.global(to), frame)
            .map_err(|e| self.error(e))
    }
    fn recv(&self, from: usize, deadline: Instant) -> std::result::Result<Frame, LinkError> {
        self.inner
            .recv(self.global(from), deadline)
            .map_err(|e| self.error(e))
    }
    fn recv_any(
        &self,
        peers: &[usize],
        deadline: Instant,
    ) -> std::result::Result<(usize, Frame), LinkError> {
        let global: Vec<usize> = peers.iter().map(|&p| self.global(p)).collect();
        self.inner
            .recv_any(&global, deadline)
            .map(|(p, f)| (self.local(p), f))
            .map_err(|e| self.error(e))
    }
    fn silent_peers(&self, longer_than: Duration) -> Vec<usize> {
        self.inner
            .silent_peers(longer_than)
            .into_iter()
            .filter(|p| self.members.contains(p))
            .map(|p| self.local(p))
            .collect()
    }
    fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
    fn remote_abort(&self) -> Option<RemoteAbort> {
        self.inner.remote_abort()
    }
}

/// The group's number of rank `r` of a view over `members` (see `Members::local`).
fn global(members: &[usize], r: usize) -> usize {
    members
        .get(r)
        .copied()
        .unwrap_or_else(|| r.saturating_sub(members.len()))
}

/// An error from a call among `members`, numbered as the whole group is.
fn renumbered(e: Error, members: &[usize]) -> Error {
    let g = |r: usize| global(members, r);
    let at = |a: At| At {
        rank: g(a.rank),
        ..a
    };
    match e {
        Error::Timeout {
            at: a,
            waiting_on,
            waited,
        } => Error::Timeout {
            at: at(a),
            waiting_on: waiting_on.into_iter().map(g).collect(),
            waited,
        },
        Error::Mismatch {
            at: a,
            peer,
            field,
            ours,
            theirs,
        } => Error::Mismatch {
            at: at(a),
            peer: g(peer),
            field,
            ours,
            theirs,
        },
        Error::PeerAborted {
            at: a,
            peer,
            reason,
        } => Error::PeerAborted {
            at: at(a),
            peer: g(peer),
            reason,
        },
        Error::LinkClosed { at: a, peer } => Error::LinkClosed {
            at: at(a),
            peer: g(peer),
        },
        Error::PeerExited { at: a, peer } => Error::PeerExited {
            at: at(a),
            peer: g(peer),
        },
        Error::Corrupt {
            at: a,
            peer,
            reason,
        } => Error::Corrupt {
            at: at(a),
            peer: g(peer),
            reason,
        },
        Error::Revoked { at: a, by, reason } => Error::Revoked {
            at: at(a),
            by: g(by),
            reason,
        },
        Error::Aborted { at: a, reason } => Error::Aborted { at: at(a), reason },
        e => e,
    }
}

impl Communicator {
    /// An all-reduce among the ranks that arrive within `after` of rank 0 (see the module
    /// docs).
    pub(super) fn run_skipping(
        &mut self,
        call: Collective<'_>,
        opts: CallOptions,
        after: Duration,
    ) -> Result<Outcome> {
        let seq = self.seq.saturating_add(1);
        let at = At {
            rank: self.rank,
            op: Some(call.kind()),
            seq,
        };
        let unsupported = if !matches!(call, Collective::AllReduce { .. }) {
            Some("skip_after applies to all-reduce only")
        } else if opts.on_failure.unwrap_or(self.config.on_failure)
            != super::survive::OnFailure::Error
        {
            Some("skip_after cannot be combined with finishing among survivors yet")
        } else {
            None
        };
        if let Some(message) = unsupported {
            // As any refused call: the peers are told, so that none waits for this rank.
            return self
                .refuse(call.kind(), message.into())
                .map(|()| Outcome::everyone(&call, self.size));
        }
        if self.agreed || self.broken.is_some() || self.size < 2 {
            // The plain path reports these (and runs a group of one).
            return self.run(
                call,
                CallOptions {
                    skip_after: None,
                    ..opts
                },
            );
        }
        let started = Instant::now();
        let deadline = deadline_from(started, opts.timeout.unwrap_or(self.config.timeout));
        let participants = match self.arrivals(at, seq, after, started, deadline) {
            Ok(p) => p,
            Err(e) => {
                self.seq = seq;
                match &e {
                    // Ranks that disagree on the call: peers finishing among survivors must not
                    // go on without this one (see `attempt`).
                    Error::Mismatch { .. } => self
                        .link
                        .abort(&format!("{}{e}", super::communicator::NOT_RECOVERABLE)),
                    Error::PeerAborted { .. } | Error::Revoked { .. } | Error::Aborted { .. } => {}
                    _ => self.link.abort(&e.to_string()),
                }
                self.broken = Some(e.clone());
                return Err(e);
            }
        };
        let n = self.size;
        let skipped: Vec<usize> = (0..n).filter(|r| !participants.contains(r)).collect();
        let Some(me) = participants.iter().position(|&r| r == self.rank) else {
            // Skipped: this call is over for this rank.
            self.seq = seq;
            return Ok(Outcome {
                contributors: participants,
                excluded: Vec::new(),
                skipped,
                recovered_in: None,
            });
        };
        let (rank, full) = (self.rank, Arc::clone(&self.link));
        self.link = Arc::new(Members {
            inner: Arc::clone(&full),
            members: participants.clone(),
            me,
        });
        self.rank = me;
        self.size = participants.len();
        let result = self
            .attempt(
                &call,
                CallOptions {
                    skip_after: None,
                    ..opts
                },
                None,
            )
            .result;
        self.link = full;
        self.rank = rank;
        self.size = n;
        // Numbered among the participants: of no use to an agreement of the whole group.
        self.engine.stray.clear();
        if let Err(e) = &result {
            self.broken = Some(renumbered(e.clone(), &participants));
        }
        result
            .map(|()| Outcome {
                contributors: participants.clone(),
                excluded: Vec::new(),
                skipped,
                recovered_in: None,
            })
            .map_err(|e| renumbered(e, &participants))
    }

    /// Who takes part in call `seq`: rank 0 waits for arrivals and decides; the others arrive
    /// and read its decision.
    fn arrivals(
        &self,
        at: At,
        seq: u64,
        after: Duration,
        started: Instant,
        deadline: Instant,
    ) -> Result<Vec<usize>> {
        let n = self.size;
        let link = self.link.as_ref();
        let broken = |peer: usize, message: String| Error::Mismatch {
            at,
            peer,
            field: "straggler protocol",
            ours: format!("call #{seq}"),
            theirs: message,
        };
        let link_error = |peer: usize, e: LinkError| call_link_error(link, at, started, e, peer);
        if self.rank != 0 {
            link.send(0, frame(ARRIVE, seq, &[]))
                .map_err(|e| link_error(0, e))?;
            let f = link.recv(0, deadline).map_err(|e| link_error(0, e))?;
            return match decode(&f, n) {
                Ok((DECIDE, s, ranks)) if s == seq && ranks.first() == Some(&0) => Ok(ranks),
                Ok((k, s, _)) => Err(broken(0, format!("message {k} of call #{s}"))),
                Err(m) => Err(broken(0, m)),
            };
        }
        let mut arrived = vec![false; n];
        arrived[0] = true;
        let window = deadline_after(after).min(deadline);
        loop {
            let pending: Vec<usize> = (1..n).filter(|&r| !arrived[r]).collect();
            if pending.is_empty() {
                break;
            }
            match link.recv_any(&pending, window) {
                Ok((p, f)) => match decode(&f, n) {
                    Ok((ARRIVE, s, _)) if s == seq => arrived[p] = true,
                    // A rank still behind, arriving at a call already decided without it.
                    Ok((ARRIVE, s, _)) if s < seq => {}
                    Ok((k, s, _)) => return Err(broken(p, format!("message {k} of call #{s}"))),
                    Err(m) => return Err(broken(p, m)),
                },
                Err(LinkError::Timeout) => break,
                Err(e) => return Err(link_error(pending[0], e)),
            }
        }
        let participants: Vec<usize> = (0..n).filter(|&r| arrived[r]).collect();
        let decision = frame(DECIDE, seq, &participants);
        for r in 1..n {
            // A skipped rank that cannot be told finds out at its deadline; a participant that
            // cannot be told fails the ring.
            let _ = link.send(r, decision.clone());
        }
        Ok(participants)
    }
}
