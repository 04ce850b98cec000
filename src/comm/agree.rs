//! Agreement among the survivors of a failure on which ranks failed, as ULFM's
//! `MPIX_Comm_agree` before `MPIX_Comm_shrink`: the input of
//! [`Communicator::shrink`](crate::Communicator::shrink).
//!
//! A coordinator collects and decides, so that every survivor adopts one decision:
//! - The coordinator is the lowest rank this rank does not hold failed. Every other rank sends
//!   its coordinator a proposal (its progress, the coordinator it follows, the ranks it has
//!   proof failed), again every quarter of a wait (a rank still inside the call that failed
//!   may take one for a frame of that call), and sends the same to every other rank it does
//!   not hold failed whenever it changes: to them it says that its sender is alive and
//!   reachable. A coordinator tells every rank so the same way, every quarter of a wait.
//! - The coordinator waits for a proposal from every rank it does not hold failed, merging what
//!   they hold failed into its own set: for one wait, or, for a rank that has spoken but
//!   follows another, until a slice after that rank's own silence check (below). A rank whose
//!   link ends, whose frame is corrupt, or that has not proposed by then is failed too. It
//!   then sends the decision (the failed set, and itself as the decider) to every other rank,
//!   and returns.
//! - A follower reads from its coordinator, and from every rank it has not heard from yet
//!   (until the silence check): never from a rank that has spoken, since one that decided may
//!   already be sending frames of the shrunk communicator, which must stay queued for it.
//! - A decision that leaves a majority is adopted by a coordinator whoever made it (it came
//!   late, after the others decided without it), and by a follower only if it is its
//!   coordinator's (sent by it, or passed on by another): two coordinators can decide at once
//!   when one holds the other failed on its own word, and each follower must take the one it
//!   follows. Another's is kept for when that rank becomes its coordinator.
//! - A decision without a majority means its decider stopped (`NoQuorum`): every rank that
//!   gets it holds the decider failed, and stops with it only if it is its coordinator's (or
//!   it coordinates), holds it a survivor, and names failed no rank it has heard from in this
//!   agreement.
//! - A coordinator counts a proposal only from a rank that says it has heard from the
//!   coordinator in this agreement (a flag in the proposal; a rank resends when it first
//!   hears): a rank that has not may yet give up on the coordinator for its silence, and must
//!   not be counted as going on with it. A proposal to another coordinator withdraws an
//!   earlier one.
//! - One wait after a rank began (checked only when nothing is queued from the ranks it waits
//!   on), every rank it has not heard from is held failed: a live, reachable rank begins
//!   within a wait of the others (a failed call tells its peers at once; a rank that had
//!   returned from the call must make its next one within the wait) and tells every rank as
//!   it begins. So every side of a partition made before the agreement ends after about one
//!   wait: the minority holds the majority failed and gets [`Error::NoQuorum`], the majority
//!   decides under its lowest rank, wherever the coordinators were. (A cut during the
//!   agreement, after ranks have spoken across it, still costs two waits for each coordinator
//!   across it.)
//! - Silence is this rank's own judgement, not proof: it decides whom this rank follows and
//!   waits for (and what it decides, if it coordinates), but its proposals do not pass it on.
//! - A rank whose link has heard nothing, not even a heartbeat, for half a wait and at least
//!   a second (TCP's heartbeats tell a cut this way, after four of them at least) from so
//!   many ranks that, with those it already holds failed (its suspects), no more than half of
//!   the ranks could go on with it, stops at once with `NoQuorum`, telling nobody; the others hold it failed for its silence. It asks the link
//!   twice, a moment apart, and a frame from a rank in that moment proves it alive: a rank
//!   that was itself stopped may find its peers silent when it resumes, until its link's
//!   readers catch up. With a long enough wait, a cut-off rank so returns right after its
//!   call's deadline.
//! - A rank that loses its coordinator (link ended, silent, no decision within two waits of
//!   turning to it) holds it failed and follows the next.
//! - A rank that adopts a decision passes it on to every other rank before it returns, so
//!   that if the coordinator died while telling the others, the next coordinator they turn
//!   to has it from this rank. A decision goes to the failed too: one held failed on another's
//!   word may be alive, and must hear that it is out (or that the decider stopped).
//!
//! A coordinator collects for `timeout`; a rank waits twice that for its coordinator's
//! decision, since the coordinator may begin late, and there are at most as many coordinators
//! as ranks: the agreement ends even when ranks die during it, after at most about `2 n`
//! timeouts when every coordinator in turn hangs after speaking (a silent one is dropped with
//! every other silent rank after one wait).
//!
//! Not a uniform consensus: a second failure at the wrong moment (a coordinator that dies
//! after telling some ranks, before the relays reach the others), a copy of a decision lost
//! on the way, or links that disagree about who is reachable, can still leave two groups with
//! different members, or a coordinator reading a peer's first frames of the shrunk
//! communicator here and dropping them. Neither computes a
//! silently wrong result: each group's frames carry a checksum of its members, so the other's
//! are dropped and the calls that would mix them fail at their deadline, and the next
//! agreement settles it.
//!
//! The split-brain guard: a decision that leaves no more than half of the ranks is
//! [`Error::NoQuorum`] on every rank that reaches it. A partitioned minority can never go on
//! by itself, as torchft's quorum requires. A rank the decision names failed although it is
//! alive gets [`Error::Excluded`] when the decision reaches it (or, cut off from every
//! coordinator, `NoQuorum` at the end of its waits).
//!
//! The agreement runs over its own epoch of the link (a [`SubLink`] over every rank), so
//! frames the failed call left on the link do not disturb it, and its own stragglers do not
//! disturb what follows.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::deadline::{deadline_after, deadline_from};
use crate::error::{At, Error, Result};
use crate::link::{Frame, Link, LinkError, SubLink};

const MAGIC: [u8; 4] = *b"wAGR";
const PROPOSE: u8 = 1;
const DECIDE: u8 = 2;

/// Epochs of agreement sub-links: above any communicator's (see `Communicator::shrink`).
pub(crate) const AGREE_EPOCH: u32 = 1 << 31;

/// What a decision carries: the failed ranks, and the progress each survivor reported (see
/// [`agree_progress`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Decided {
    pub failed: BTreeSet<usize>,
    pub progress: BTreeMap<usize, u64>,
}

enum Msg {
    /// The proposer's progress, the coordinator it proposes to (the lowest rank it does not
    /// hold failed: itself when it coordinates), and the ranks it holds failed.
    Propose {
        progress: u64,
        to: usize,
        /// Whether the proposer has heard from `to` in this agreement: a coordinator counts
        /// only such proposals, so that it never counts a rank that may give up on it for its
        /// silence (the proposer's silence check spares only ranks it heard from).
        heard: bool,
        failed: BTreeSet<usize>,
    },
    /// A decision, and the coordinator that made it.
    Decide { by: usize, d: Decided },
}

fn ranks_bytes(set: &BTreeSet<usize>) -> impl Iterator<Item = u8> + '_ {
    set.iter().flat_map(|&r| (r as u32).to_le_bytes())
}

fn frame(kind: u8, payload: Vec<u8>) -> Frame {
    let mut header = MAGIC.to_vec();
    header.push(kind);
    Frame { header, payload }
}

/// A proposal: `[progress u64][coordinator u32][heard from it u32: 0 or 1][failed ranks
/// u32...]`.
fn propose(progress: u64, to: usize, heard: bool, set: &BTreeSet<usize>) -> Frame {
    let mut payload = progress.to_le_bytes().to_vec();
    payload.extend((to as u32).to_le_bytes());
    payload.extend(u32::from(heard).to_le_bytes());
    payload.extend(ranks_bytes(set));
    frame(PROPOSE, payload)
}

/// A decision: `[decider u32][k u32][k x (rank u32, progress u64)][failed ranks u32...]`.
fn decide(by: usize, d: &Decided) -> Frame {
    let mut payload = (by as u32).to_le_bytes().to_vec();
    payload.extend((d.progress.len() as u32).to_le_bytes());
    for (&r, &p) in &d.progress {
        payload.extend((r as u32).to_le_bytes());
        payload.extend(p.to_le_bytes());
    }
    payload.extend(ranks_bytes(&d.failed));
    frame(DECIDE, payload)
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at.checked_add(4)?)
        .and_then(|x| x.try_into().ok())
        .map(u32::from_le_bytes)
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at.checked_add(8)?)
        .and_then(|x| x.try_into().ok())
        .map(u64::from_le_bytes)
}

/// A set of ranks of a group of `n`, as 4-byte words.
fn decode_ranks(b: &[u8], n: usize) -> std::result::Result<BTreeSet<usize>, String> {
    if !b.len().is_multiple_of(4) || b.len() / 4 > n {
        return Err(format!("a set of {} bytes for a group of {n}", b.len()));
    }
    let mut set = BTreeSet::new();
    for c in b.chunks_exact(4) {
        let r = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize;
        if r >= n {
            return Err(format!("rank {r} in a group of {n}"));
        }
        set.insert(r);
    }
    Ok(set)
}

/// A frame from a peer: checked before anything in it is used.
fn decode(frame: &Frame, n: usize) -> std::result::Result<Msg, String> {
    let [m0, m1, m2, m3, kind] = frame.header[..] else {
        return Err(format!(
            "an agreement header of {} bytes",
            frame.header.len()
        ));
    };
    if [m0, m1, m2, m3] != MAGIC {
        return Err("not an agreement frame".into());
    }
    let b = &frame.payload;
    match kind {
        PROPOSE => {
            let progress = u64_at(b, 0).ok_or("a proposal without its progress")?;
            let to = u32_at(b, 8).ok_or("a proposal without its coordinator")? as usize;
            if to >= n {
                return Err(format!("a proposal to rank {to} in a group of {n}"));
            }
            let heard = match u32_at(b, 12).ok_or("a proposal without its heard flag")? {
                0 => false,
                1 => true,
                x => return Err(format!("a heard flag of {x}")),
            };
            Ok(Msg::Propose {
                progress,
                to,
                heard,
                failed: decode_ranks(&b[16..], n)?,
            })
        }
        DECIDE => {
            let by = u32_at(b, 0).ok_or("a decision without its decider")? as usize;
            let k = u32_at(b, 4).ok_or("a decision without its count")? as usize;
            if k > n {
                return Err(format!("a decision of {k} survivors in a group of {n}"));
            }
            // k <= n: no overflow.
            let rest = 8 + 12 * k;
            if b.len() < rest {
                return Err(format!("a decision of {} bytes for {k} survivors", b.len()));
            }
            let mut progress = BTreeMap::new();
            for i in 0..k {
                let at = 8 + 12 * i;
                let (Some(r), Some(p)) = (u32_at(b, at), u64_at(b, at + 4)) else {
                    return Err("a truncated decision".into());
                };
                let r = r as usize;
                if r >= n || progress.insert(r, p).is_some() {
                    return Err(format!("survivor {r} (again, or not of a group of {n})"));
                }
            }
            let failed = decode_ranks(&b[rest..], n)?;
            if progress.keys().any(|r| failed.contains(r)) {
                return Err("a decision that holds a survivor failed".into());
            }
            // Every rank is either failed or reports its progress: a survivor left out would
            // make the others decide without it.
            if progress.len() + failed.len() != n {
                return Err(format!(
                    "a decision that covers {} of {n} ranks",
                    progress.len() + failed.len()
                ));
            }
            // A coordinator never holds itself failed.
            if !progress.contains_key(&by) {
                return Err(format!("a decision by rank {by}, not one of its survivors"));
            }
            Ok(Msg::Decide {
                by,
                d: Decided { failed, progress },
            })
        }
        k => Err(format!("an agreement message of kind {k}")),
    }
}

/// The ranks of a group of `n` that failed, as the survivors agree (see the module docs).
/// `suspects` are ranks this rank already holds failed; `epoch` tells this agreement's frames
/// from every other's; each wait lasts at most `timeout`. (The communicator calls
/// [`agree_progress`]; this is its plain form, for the tests.)
#[cfg(test)]
pub(crate) fn agree(
    link: &dyn Link,
    suspects: &[usize],
    epoch: u32,
    timeout: Duration,
    at: At,
) -> Result<Vec<usize>> {
    agree_progress(link, None, suspects, 0, Vec::new(), epoch, timeout, at)
        .map(|d| d.failed.into_iter().collect())
}

/// [`agree`], where each rank also reports a number (its progress in the call that failed),
/// and the decision carries every survivor's: every survivor that reaches the same decision
/// sees the same numbers, and so acts the same on them.
///
/// `stray` are frames this rank's last call read from the link that were not the call's (a
/// rank still in the call when its peers began the agreement takes their proposals or
/// decisions for frames of the call): those of this agreement count as received.
#[allow(clippy::too_many_arguments)]
pub(crate) fn agree_progress(
    link: &dyn Link,
    stash: Option<crate::link::AbortStash>,
    suspects: &[usize],
    progress: u64,
    stray: Vec<(usize, Frame)>,
    epoch: u32,
    timeout: Duration,
    at: At,
) -> Result<Decided> {
    let n = link.size();
    let me = link.rank();
    if let Some(&r) = suspects.iter().find(|&&r| r >= n || r == me) {
        return Err(Error::InvalidArgument {
            at,
            message: format!("suspect {r} is this rank or not a rank of this group of {n}"),
        });
    }
    let mut link =
        SubLink::new(link, (0..n).collect(), AGREE_EPOCH | epoch).map_err(|message| {
            Error::InvalidArgument {
                at,
                message: format!("internal: {message}"),
            }
        })?;
    if let Some(stash) = stash {
        link = link.with_stash(stash);
    }
    let slice = (timeout / 4).max(Duration::from_millis(10));
    let confirmed: BTreeSet<usize> = suspects.iter().copied().collect();
    let mut round = Round {
        link: &link,
        n,
        me,
        progress,
        timeout,
        at,
        failed: confirmed.clone(),
        confirmed,
        spoke: BTreeMap::new(),
        to_me: BTreeMap::new(),
        others: Vec::new(),
        speak_by: Some(deadline_after(timeout)),
        slice,
    };
    // What the last call took of this agreement: heard as if it came now.
    for (from, frame) in stray {
        if from >= n || from == me {
            continue;
        }
        if let Some(frame) = link.open(frame)
            && let Some(d) = round.hear(from, &frame, false)
        {
            relay(&link, &d.1, d.0, from);
            return finish(d.1, me, n, at);
        }
    }
    // A rank that can tell, as the agreement begins, that no more than half of the ranks could
    // go on with it stops at once with `NoQuorum`, and tells nobody: the link has heard
    // nothing from the others, not even a heartbeat, for half a wait (TCP's heartbeats tell a
    // cut this way), so it is cut off, and the others hold it failed for its silence. Only
    // this rank stops on its own judgement, never another: a rank that was itself stopped
    // may find its peers silent when it resumes, until its link's readers catch up, so the
    // link is asked twice, a moment apart (frames that come meanwhile prove their senders
    // alive).
    let threshold = (timeout / 2).max(super::executor::MIN_SILENCE);
    let mut silent: Vec<usize> = link
        .silent_peers(threshold)
        .into_iter()
        .filter(|&p| p < n && p != me && !round.spoke.contains_key(&p))
        .collect();
    let cut_off = |silent: &[usize], round: &Round<'_>| {
        let with: Vec<usize> = (0..n)
            .filter(|r| !silent.contains(r) && !round.failed.contains(r))
            .collect();
        (with.len().saturating_mul(2) <= n).then_some(with)
    };
    if cut_off(&silent, &round).is_some() {
        // A fiftieth of the wait, 5 to 50 ms: long enough for a resumed process's readers,
        // short against the deadline the cut-off rank's error is due by.
        let moment = deadline_after(
            (timeout / 50).clamp(Duration::from_millis(5), Duration::from_millis(50)),
        );
        loop {
            let listen: Vec<usize> = silent
                .iter()
                .copied()
                .filter(|p| !round.spoke.contains_key(p))
                .collect();
            if listen.is_empty() {
                break;
            }
            let Ok((from, frame)) = link.recv_any(&listen, moment) else {
                break;
            };
            if let Some((by, d)) = round.hear(from, &frame, false) {
                relay(&link, &d, by, from);
                return finish(d, me, n, at);
            }
        }
        let again = link.silent_peers(threshold);
        silent.retain(|p| again.contains(p) && !round.spoke.contains_key(p));
        if let Some(survivors) = cut_off(&silent, &round) {
            return Err(Error::NoQuorum {
                at,
                survivors,
                size: n,
            });
        }
    }
    let (_, decided) = round.follow()?;
    finish(decided, me, n, at)
}

/// One rank's state in one agreement.
struct Round<'a> {
    link: &'a SubLink<&'a dyn Link>,
    n: usize,
    me: usize,
    progress: u64,
    timeout: Duration,
    at: At,
    /// The ranks this rank holds failed, which it neither follows nor waits for: only ever
    /// grows.
    failed: BTreeSet<usize>,
    /// Those of them it has proof of (the caller's suspects, a link that ended, garbage, a
    /// rank that stopped without a quorum, a coordinator that never decided), which its
    /// proposals carry. A rank held failed for its silence alone is not passed on: a rank
    /// that was itself stopped may find peers silent when it resumes, and must not talk the
    /// others into excluding one another.
    confirmed: BTreeSet<usize>,
    /// The ranks that sent this rank a frame of this agreement, and when it first read one.
    spoke: BTreeMap<usize, Instant>,
    /// Proposals made to this rank as coordinator: the proposer's progress and failed set.
    to_me: BTreeMap<usize, (u64, BTreeSet<usize>)>,
    /// Decisions with a majority by coordinators this rank does not follow (yet):
    /// `(from, decider, decision)`.
    others: Vec<(usize, usize, Decided)>,
    /// When every rank that has not spoken yet is held failed; `None` once that is done.
    speak_by: Option<Instant>,
    /// How often a rank proposes again.
    slice: Duration,
}

impl Round<'_> {
    /// A frame of this agreement from `from`: a proposal is noted; a decision this rank
    /// adopts is returned, with its decider (see [`weigh`](Self::weigh)).
    fn hear(&mut self, from: usize, frame: &Frame, coordinating: bool) -> Option<(usize, Decided)> {
        self.spoke.entry(from).or_insert_with(Instant::now);
        match decode(frame, self.n) {
            // This rank's own decision, back from a peer: nothing a correct peer sends.
            Ok(Msg::Decide { by, .. }) if by == self.me => self.fail(from),
            Ok(Msg::Decide { by, d }) => return self.weigh(from, by, d, coordinating),
            Ok(Msg::Propose {
                progress,
                to,
                heard,
                failed,
            }) => {
                if to == self.me && heard {
                    self.to_me.insert(from, (progress, failed));
                } else {
                    // Not (or no longer) a proposal this rank may count.
                    self.to_me.remove(&from);
                }
            }
            // Garbage on a link that carried this agreement's tag: a broken peer.
            Err(_) => self.fail(from),
        }
        None
    }

    /// Whether this rank adopts a decision by `by` that came from `from`:
    /// - One that leaves a majority: a coordinator adopts any (the others decided without
    ///   it), a follower only its coordinator's (sent by it, or passed on by another): two
    ///   coordinators may decide at once when one holds the other failed on its own word, and
    ///   each follower must take the one it follows. Another's is kept for when its decider
    ///   becomes this rank's coordinator.
    /// - One without a majority: its decider has stopped (it returned `NoQuorum`), which is
    ///   proof that it failed. This rank stops with it only if it is its coordinator's (or
    ///   this rank coordinates), holds it a survivor, and names failed no rank this rank has
    ///   heard from in this agreement: the
    ///   decider may have judged on stale silence (it was stopped itself), and the ranks it
    ///   names may be a majority going on.
    fn weigh(
        &mut self,
        from: usize,
        by: usize,
        d: Decided,
        coordinating: bool,
    ) -> Option<(usize, Decided)> {
        let follows = coordinating || self.adopts(from, by);
        if d.progress.len().saturating_mul(2) > self.n {
            if follows {
                return Some((by, d));
            }
            self.others.push((from, by, d));
            return None;
        }
        let heard_named = d.failed.iter().any(|r| self.spoke.contains_key(r));
        if follows && d.progress.contains_key(&self.me) && !heard_named {
            return Some((by, d));
        }
        self.fail(by);
        None
    }

    /// Holds `r` failed, with proof (never this rank itself).
    fn fail(&mut self, r: usize) {
        if r == self.me {
            return;
        }
        self.failed.insert(r);
        self.confirmed.insert(r);
    }

    /// Whether a follower takes a decision by `by` that came from `from` for its
    /// coordinator's.
    fn adopts(&self, from: usize, by: usize) -> bool {
        self.coordinator()
            .is_some_and(|c| c != self.me && (c == from || c == by))
    }

    /// The lowest rank this rank does not hold failed, which it follows.
    fn coordinator(&self) -> Option<usize> {
        (0..self.n).find(|r| !self.failed.contains(r))
    }

    /// Once one wait has passed since this rank began, every rank that said nothing is held
    /// failed (by this rank: see `confirmed`): a live, reachable rank begins within a wait of
    /// this one (the contract) and tells every rank at once, so silence by then is death or a
    /// partition. Called only when a wait found nothing queued from those ranks: a rank that
    /// was late itself reads what they sent before it judges them.
    fn check_silence(&mut self) {
        if self.speak_by.is_some_and(|t| Instant::now() >= t) {
            self.speak_by = None;
            let silent: Vec<usize> = (0..self.n)
                .filter(|r| *r != self.me && !self.spoke.contains_key(r))
                .collect();
            self.failed.extend(silent);
        }
    }

    /// Every other rank this rank does not hold failed.
    fn alive(&self) -> Vec<usize> {
        (0..self.n)
            .filter(|r| *r != self.me && !self.failed.contains(r))
            .collect()
    }

    /// Sends a proposal to `to` (this rank's coordinator, or itself when it coordinates) to
    /// each of `ranks`: the coordinator collects it, the others learn that this rank is alive
    /// and reachable. A rank it cannot send to is held failed.
    fn propose_to(&mut self, to: usize, ranks: &[usize]) {
        let heard = to == self.me || self.spoke.contains_key(&to);
        let frame = propose(self.progress, to, heard, &self.confirmed);
        for &r in ranks {
            if self.link.send(r, frame.clone()).is_err() {
                self.fail(r);
            }
        }
    }

    /// The time the next wait ends at: `until`, or earlier for the silence check.
    fn wake(&self, until: Instant) -> Instant {
        self.speak_by.map_or(until, |t| t.min(until))
    }

    /// A link error while waiting: the peer it names is held failed, else this rank's own
    /// link failed.
    fn link_error(&mut self, e: LinkError) -> Result<()> {
        match culprit(&e) {
            Some(p) => {
                self.fail(p);
                Ok(())
            }
            None => Err(link_failure(self.at, e)),
        }
    }

    /// Follows the lowest rank not held failed until it decides (or this rank coordinates).
    fn follow(&mut self) -> Result<(usize, Decided)> {
        // The coordinator proposed to, and the set proposed.
        let mut proposed: Option<(usize, bool, BTreeSet<usize>)> = None;
        let mut deadline = deadline_after(self.timeout.saturating_mul(2));
        let mut resend = deadline;
        loop {
            let Some(coord) = self.coordinator() else {
                let d = Decided {
                    failed: self.failed.clone(),
                    progress: BTreeMap::new(),
                };
                return Ok((self.me, d));
            };
            if coord == self.me {
                return self.coordinate();
            }
            // A decision of the new coordinator that came while this rank followed another.
            if let Some(i) = self
                .others
                .iter()
                .position(|&(f, by, _)| self.adopts(f, by))
            {
                let (from, by, d) = self.others.swap_remove(i);
                relay(self.link, &d, by, from);
                return Ok((by, d));
            }
            let now = Instant::now();
            // Whether the proposal would differ: another coordinator, more failed ranks, or
            // the coordinator heard from since (which makes the proposal count).
            let heard = self.spoke.contains_key(&coord);
            let changed = proposed.as_ref() != Some(&(coord, heard, self.confirmed.clone()));
            if changed || now >= resend {
                if proposed.as_ref().is_none_or(|(c, _, _)| *c != coord) {
                    // A new coordinator gets two whole waits: its own collection may take
                    // one, begun up to one later than this rank's (it may still have been in
                    // the call that failed).
                    deadline = deadline_after(self.timeout.saturating_mul(2));
                }
                // To the coordinator again every slice: a rank still inside the call that
                // failed may have taken the last one for a frame of that call. To every other
                // rank when it changes: they only need to hear that this rank is alive.
                let to = if changed { self.alive() } else { vec![coord] };
                self.propose_to(coord, &to);
                proposed = Some((coord, heard, self.confirmed.clone()));
                resend = deadline_after(self.slice);
                continue;
            }
            // From the coordinator, and, until the silence check, from the ranks not heard
            // from yet. Not from a rank once it has spoken: one that decided may already be
            // sending frames of the shrunk communicator, which must stay queued for it, not
            // be read (and dropped) here. (It sent its decision, then those frames, after
            // the proposal this rank heard.)
            let mut listen = vec![coord];
            if self.speak_by.is_some() {
                listen.extend(
                    self.alive()
                        .into_iter()
                        .filter(|r| *r != coord && !self.spoke.contains_key(r)),
                );
            }
            match self.link.recv_any(&listen, self.wake(deadline.min(resend))) {
                Ok((from, frame)) => {
                    if let Some((by, d)) = self.hear(from, &frame, false) {
                        relay(self.link, &d, by, from);
                        return Ok((by, d));
                    }
                }
                Err(LinkError::Timeout) => {
                    self.check_silence();
                    if Instant::now() >= deadline {
                        self.fail(coord);
                    }
                }
                Err(e) => self.link_error(e)?,
            }
        }
    }

    /// This rank coordinates: it waits for a proposal from every rank it does not hold failed
    /// (each new failure ends that rank's wait), then sends its decision to every other rank.
    /// A decision that reaches it meanwhile (another coordinator decided while this rank was
    /// late, or before it died) is adopted instead, and passed on.
    fn coordinate(&mut self) -> Result<(usize, Decided)> {
        let (n, me) = (self.n, self.me);
        let deadline = deadline_after(self.timeout);
        // Decisions with a majority that came while this rank followed another: the lowest
        // decider's.
        if let Some(i) = (0..self.others.len()).min_by_key(|&i| self.others[i].1) {
            let (from, by, d) = self.others.swap_remove(i);
            relay(self.link, &d, by, from);
            return Ok((by, d));
        }
        // What was proposed here before this rank knew it coordinates.
        let known: Vec<usize> = self
            .to_me
            .values()
            .flat_map(|(_, set)| set.iter().copied())
            .filter(|&r| r != me)
            .collect();
        self.failed.extend(known.iter().copied());
        self.confirmed.extend(known);
        let mut resend = Instant::now();
        loop {
            if Instant::now() >= resend {
                // Tells every rank this rank coordinates: those not proposing to it yet learn
                // that it is alive, and stay with it.
                let alive = self.alive();
                self.propose_to(me, &alive);
                resend = deadline_after(self.slice);
            }
            // A rank not proposing here yet: one that said nothing is waited for until this
            // rank's deadline; one that spoke (alive, following a rank this one holds failed)
            // until its own silence check has had a slice to bring it here, since it may
            // have begun later than this rank, or seen that rank's silence later.
            let wait = self.timeout.saturating_add(self.slice);
            let pending: Vec<(usize, Instant)> = (0..n)
                .filter(|r| *r != me && !self.failed.contains(r) && !self.to_me.contains_key(r))
                .map(|r| {
                    let due = self
                        .spoke
                        .get(&r)
                        .map_or(deadline, |t| deadline.max(deadline_from(*t, wait)));
                    (r, due)
                })
                .collect();
            // Once every rank not held failed has proposed, whatever else is queued already: a
            // late coordinator finds there the decision the others made without it, should it
            // sit behind proposals it has not read (the links here read the lowest ready rank
            // first, so a lower coordinator's decision is usually read earlier), and adopts it
            // rather than decide again. (No rank sends frames of a shrunk communicator to it: a
            // rank that decided without it holds it failed.)
            let draining = pending.is_empty();
            let listen = self.alive();
            let until = if draining {
                Instant::now()
            } else {
                let first_due = pending.iter().map(|x| x.1).min().unwrap_or(deadline);
                self.wake(first_due.min(resend))
            };
            match self.link.recv_any(&listen, until) {
                Ok((from, frame)) => {
                    if let Some((by, d)) = self.hear(from, &frame, true) {
                        relay(self.link, &d, by, from);
                        return Ok((by, d));
                    }
                    if let Some((_, set)) = self.to_me.get(&from) {
                        let more: Vec<usize> = set.iter().copied().filter(|&r| r != me).collect();
                        self.failed.extend(more.iter().copied());
                        self.confirmed.extend(more);
                    }
                }
                Err(LinkError::Timeout) if draining => break,
                Err(LinkError::Timeout) => {
                    self.check_silence();
                    let now = Instant::now();
                    let over = pending.iter().filter(|x| now >= x.1).map(|x| x.0);
                    self.failed.extend(over);
                }
                Err(e) => self.link_error(e)?,
            }
        }
        let mut progress: BTreeMap<usize, u64> =
            self.to_me.iter().map(|(&r, &(p, _))| (r, p)).collect();
        progress.insert(me, self.progress);
        progress.retain(|r, _| !self.failed.contains(r));
        let d = Decided {
            failed: self.failed.clone(),
            progress,
        };
        relay(self.link, &d, me, me);
        Ok((me, d))
    }
}

/// Sends a decision by `by` to every other rank but `from` (who has it), before this rank
/// acts on it: should its coordinator die while telling the others, the next coordinator they
/// turn to has it from this rank (sends to ranks that have moved on go unread: later epochs
/// drop them). To the failed too: one held failed on another's word may be alive, and must
/// hear that it is out rather than wait for its deadline (or, for a decision without a
/// majority, that its decider stopped; see `Round::weigh`). (A frame to a dead rank goes
/// nowhere; one that cannot be sent is that rank's deadline's to report.)
fn relay(link: &SubLink<&dyn Link>, d: &Decided, by: usize, from: usize) {
    let me = link.rank();
    let decision = decide(by, d);
    for r in (0..link.size()).filter(|r| *r != me && *r != from) {
        let _ = link.send(r, decision.clone());
    }
}

/// The peer an error names, if it names one (its link ended, it sent garbage, it gave up).
fn culprit(e: &LinkError) -> Option<usize> {
    match e {
        LinkError::Gone(p) | LinkError::Exited(p) => Some(*p),
        LinkError::Corrupt { peer, .. } => Some(*peer),
        LinkError::Aborted { from, .. } => Some(*from),
        _ => None,
    }
}

fn link_failure(at: At, e: LinkError) -> Error {
    Error::Connect {
        at,
        message: format!("this rank's link failed during the agreement: {e:?}"),
    }
}

/// The decision as this rank returns it: the failed ranks, or why this rank cannot go on.
fn finish(decided: Decided, me: usize, n: usize, at: At) -> Result<Decided> {
    let failed: Vec<usize> = decided.failed.iter().copied().collect();
    let survivors: Vec<usize> = (0..n).filter(|r| !failed.contains(r)).collect();
    if failed.contains(&me) {
        return Err(Error::Excluded { at, failed });
    }
    if survivors.len() * 2 <= n {
        return Err(Error::NoQuorum {
            at,
            survivors,
            size: n,
        });
    }
    Ok(decided)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::{FaultPlan, in_process_mesh};

    fn run(
        links: Vec<impl Link>,
        suspects: &[&[usize]],
        timeout: Duration,
    ) -> Vec<Result<Vec<usize>>> {
        let all: Vec<usize> = (0..links.len()).collect();
        run_some(links, &all, suspects, timeout)
    }

    /// Runs the agreement on the ranks `ranks` only (the others are dead: their threads do
    /// not run); results in the order of `ranks`.
    fn run_some(
        links: Vec<impl Link>,
        ranks: &[usize],
        suspects: &[&[usize]],
        timeout: Duration,
    ) -> Vec<Result<Vec<usize>>> {
        std::thread::scope(|s| {
            let hs: Vec<_> = links
                .iter()
                .enumerate()
                .filter(|(r, _)| ranks.contains(r))
                .map(|(r, l)| {
                    let sus = suspects.get(r).copied().unwrap_or(&[]);
                    s.spawn(move || agree(l, sus, 1, timeout, At::rank(r)))
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|_| panic!("agree panicked")))
                .collect()
        })
    }

    /// Runs the agreement on every rank, rank `r` beginning `late(r)` after the others (as a
    /// rank whose failed call ended later); results in rank order.
    fn run_late(
        links: &[impl Link],
        late: impl Fn(usize) -> Duration + Sync,
        timeout: Duration,
    ) -> Vec<Result<Vec<usize>>> {
        run_timed(links, late, timeout)
            .into_iter()
            .map(|(x, _)| x)
            .collect()
    }

    /// [`run_late`], with the time each rank took from its own start.
    fn run_timed(
        links: &[impl Link],
        late: impl Fn(usize) -> Duration + Sync,
        timeout: Duration,
    ) -> Vec<(Result<Vec<usize>>, Duration)> {
        std::thread::scope(|s| {
            let hs: Vec<_> = links
                .iter()
                .enumerate()
                .map(|(r, l)| {
                    let late = &late;
                    s.spawn(move || {
                        let wait = late(r);
                        if !wait.is_zero() {
                            // The fault injected: this rank is still in its call.
                            std::thread::sleep(wait);
                        }
                        let t = Instant::now();
                        (agree(l, &[], 1, timeout, At::rank(r)), t.elapsed())
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|_| panic!("agree panicked")))
                .collect()
        })
    }

    #[test]
    fn everyone_alive_agrees_on_nothing() {
        for n in 1..=5 {
            let res = run(in_process_mesh(n), &[], Duration::from_secs(10));
            for (r, x) in res.into_iter().enumerate() {
                assert_eq!(x.ok(), Some(vec![]), "{n} ranks, rank {r}");
            }
        }
    }

    /// Suspicions held by one rank only reach everyone: the decision is their union, on every
    /// rank, and the alive rank the union names is told it is out.
    #[test]
    fn different_suspicions_end_in_one_decision() {
        // Ranks 2 and 4 are alive but held failed by one rank each.
        let res = run(
            in_process_mesh(5),
            &[&[], &[4], &[], &[2]],
            Duration::from_secs(10),
        );
        for r in [0, 1, 3] {
            assert_eq!(
                res[r].as_ref().ok(),
                Some(&vec![2, 4]),
                "rank {r}: {:?}",
                res[r]
            );
        }
        for r in [2, 4] {
            assert!(
                matches!(&res[r], Err(Error::Excluded { failed, .. }) if *failed == [2, 4]),
                "rank {r}: {:?}",
                res[r]
            );
        }
    }

    /// The coordinator (rank 0) is dead from the start: the others find out and agree under
    /// rank 1.
    #[test]
    fn a_dead_coordinator_is_replaced() {
        let plan = FaultPlan::new();
        let links = plan.wrap(in_process_mesh(4));
        plan.kill(0);
        let res = run_some(links, &[1, 2, 3], &[], Duration::from_secs(10));
        for (r, x) in res.iter().enumerate() {
            assert_eq!(x.as_ref().ok(), Some(&vec![0]), "rank {}: {x:?}", r + 1);
        }
    }

    /// A partition into 2 and 3 of 5: the three agree the two failed; the two get NoQuorum.
    #[test]
    fn a_minority_partition_gets_no_quorum() {
        let plan = FaultPlan::new();
        let links = plan.wrap(in_process_mesh(5));
        plan.partition(&[&[0, 1], &[2, 3, 4]]);
        let res = run(links, &[], Duration::from_secs(1));
        for r in [2, 3, 4] {
            assert_eq!(
                res[r].as_ref().ok(),
                Some(&vec![0, 1]),
                "rank {r}: {:?}",
                res[r]
            );
        }
        for r in [0, 1] {
            assert!(
                matches!(&res[r], Err(Error::NoQuorum { survivors, size: 5, .. }) if *survivors == [0, 1]),
                "rank {r}: {:?}",
                res[r]
            );
        }
    }

    /// Every side of a partition ends within about one wait of its start, whichever side
    /// the coordinators are on: the majority decides the others failed, the minority (or a
    /// tie) gets `NoQuorum`. Following each unreachable coordinator in turn took two waits
    /// for each (seven waits for the last rank of five cut off alone).
    #[test]
    fn every_side_of_a_partition_ends_within_one_wait() {
        let timeout = Duration::from_secs(2);
        let cases: Vec<(usize, Vec<usize>)> = vec![
            (4, vec![0]),
            (4, vec![3]),
            (4, vec![2, 3]),
            (4, vec![0, 1]),
            (5, vec![0]),
            (5, vec![4]),
            (5, vec![3, 4]),
            (5, vec![1, 2]),
            (5, vec![0, 1]),
        ];
        // All cases at once: each waits out its timeout, mostly asleep.
        let results: Vec<Vec<(Result<Vec<usize>>, Duration)>> = std::thread::scope(|s| {
            let hs: Vec<_> = cases
                .iter()
                .map(|(n, cut)| {
                    s.spawn(move || {
                        let plan = FaultPlan::new();
                        let links = plan.wrap(in_process_mesh(*n));
                        let rest: Vec<usize> = (0..*n).filter(|r| !cut.contains(r)).collect();
                        plan.partition(&[cut, &rest]);
                        run_timed(&links, |_| Duration::ZERO, timeout)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|_| panic!("a case panicked")))
                .collect()
        });
        for ((n, cut), res) in cases.iter().zip(results) {
            let rest: Vec<usize> = (0..*n).filter(|r| !cut.contains(r)).collect();
            let majority = rest.len() * 2 > *n;
            for (r, (x, took)) in res.iter().enumerate() {
                let mine = if cut.contains(&r) { cut } else { &rest };
                let theirs = if cut.contains(&r) { &rest } else { cut };
                if majority && !cut.contains(&r) {
                    assert_eq!(
                        x.as_ref().ok(),
                        Some(theirs),
                        "{n} ranks, cut {cut:?}, rank {r}"
                    );
                } else {
                    assert!(
                        matches!(x, Err(Error::NoQuorum { survivors, .. }) if survivors == mine),
                        "{n} ranks, cut {cut:?}, rank {r}: {x:?}"
                    );
                }
                // One wait, and the new coordinator's round (the old protocol: two waits per
                // coordinator tried, at least).
                assert!(
                    *took < timeout.mul_f64(1.6),
                    "{n} ranks, cut {cut:?}, rank {r}: {took:?} for a wait of {timeout:?}"
                );
            }
        }
    }

    /// A partition the link has seen silent for longer than half a wait (its heartbeats stopped;
    /// here the fault plan's emulation of them) stops the cut-off side at once, without a wait
    /// (as after a call that waited out its deadline across the cut); the other side decides
    /// after its one wait for their word.
    #[test]
    fn a_partition_the_link_saw_silent_ends_without_a_wait() {
        let timeout = Duration::from_secs(2);
        let plan = FaultPlan::new();
        let links = plan.wrap(in_process_mesh(5));
        plan.partition(&[&[1, 3], &[0, 2, 4]]);
        // The call that failed waited this long across the cut.
        std::thread::sleep(timeout.mul_f64(0.6));
        let res = run_timed(&links, |_| Duration::ZERO, timeout);
        for (r, (x, took)) in res.iter().enumerate() {
            if [1, 3].contains(&r) {
                assert!(
                    matches!(x, Err(Error::NoQuorum { survivors, .. }) if *survivors == [1, 3]),
                    "rank {r}: {x:?}"
                );
                // Without the link's word, one wait at least.
                assert!(*took < timeout / 2, "rank {r}: {took:?}");
            } else {
                assert_eq!(x.as_ref().ok(), Some(&vec![1, 3]), "rank {r}: {x:?}");
            }
        }
    }

    /// A rank that holds every other failed (its links to them ended, say) stops at once with
    /// no quorum, sending nothing; the others hold it failed for its silence after one wait,
    /// and agree without it.
    #[test]
    fn a_rank_that_holds_everyone_failed_stops_alone() {
        let res = run(
            in_process_mesh(4),
            &[&[], &[], &[], &[0, 1, 2]],
            Duration::from_secs(1),
        );
        for (r, x) in res.iter().enumerate().take(3) {
            assert_eq!(x.as_ref().ok(), Some(&vec![3]), "rank {r}: {x:?}");
        }
        assert!(
            matches!(&res[3], Err(Error::NoQuorum { survivors, .. }) if *survivors == [3]),
            "rank 3: {:?}",
            res[3]
        );
    }

    /// A link that reports some peers silent, whatever they do.
    struct Silent<L> {
        inner: L,
        silent: Vec<usize>,
    }

    impl<L: Link> Link for Silent<L> {
        fn rank(&self) -> usize {
            self.inner.rank()
        }
        fn size(&self) -> usize {
            self.inner.size()
        }
        fn send(&self, to: usize, frame: Frame) -> std::result::Result<(), LinkError> {
            self.inner.send(to, frame)
        }
        fn recv(&self, from: usize, deadline: Instant) -> std::result::Result<Frame, LinkError> {
            self.inner.recv(from, deadline)
        }
        fn recv_any(
            &self,
            peers: &[usize],
            deadline: Instant,
        ) -> std::result::Result<(usize, Frame), LinkError> {
            self.inner.recv_any(peers, deadline)
        }
        fn silent_peers(&self, _: Duration) -> Vec<usize> {
            self.silent.clone()
        }
        fn abort(&self, reason: &str) {
            self.inner.abort(reason)
        }
    }

    fn silent_links(n: usize, silent: &[(usize, &[usize])]) -> Vec<Silent<impl Link>> {
        in_process_mesh(n)
            .into_iter()
            .enumerate()
            .map(|(r, inner)| Silent {
                inner,
                silent: silent
                    .iter()
                    .find(|(x, _)| *x == r)
                    .map_or(Vec::new(), |(_, s)| s.to_vec()),
            })
            .collect()
    }

    /// Rank 0 finds ranks 2 and 3 silent though they are not (it was stopped itself, say, and
    /// its link has not read their heartbeats yet): their proposals, read in the moment it
    /// looks again, prove them alive, and nobody is held failed.
    #[test]
    fn peers_found_silent_that_speak_are_kept() {
        let links = silent_links(4, &[(0, &[2, 3]), (2, &[3])]);
        let res = run(links, &[], Duration::from_secs(1));
        for (r, x) in res.iter().enumerate() {
            assert_eq!(x.as_ref().ok(), Some(&vec![]), "rank {r}: {x:?}");
        }
    }

    /// The same, but ranks 2 and 3 begin later (within the wait): rank 0, which with rank 1
    /// alone would have no majority, stops, alone, on its own judgement. The others, all
    /// alive, agree without it, never on its word (rank 1 turns to coordinate before ranks 2
    /// and 3 have given up on rank 0, and waits for them).
    #[test]
    fn a_rank_that_finds_peers_silent_stops_only_itself() {
        let links = silent_links(4, &[(0, &[2, 3])]);
        let timeout = Duration::from_secs(2);
        // Still in the call that failed.
        let res = run_late(
            &links,
            |r| {
                if r >= 2 {
                    timeout.mul_f64(0.3)
                } else {
                    Duration::ZERO
                }
            },
            timeout,
        );
        assert!(
            matches!(&res[0], Err(Error::NoQuorum { survivors, .. }) if *survivors == [0, 1]),
            "rank 0: {:?}",
            res[0]
        );
        for (r, x) in res.iter().enumerate().skip(1) {
            assert_eq!(x.as_ref().ok(), Some(&vec![0]), "rank {r}: {x:?}");
        }
    }

    /// Rank 0, the first coordinator, begins after the others gave up on it for its silence:
    /// their first proposals to it wait in its queue, but it learns that it is out (it never
    /// goes on alone with all five), and the others agree without it.
    #[test]
    fn a_coordinator_late_past_the_wait_is_told_it_is_out() {
        let links = in_process_mesh(5);
        let timeout = Duration::from_secs(1);
        let res = run_late(
            &links,
            |r| {
                if r == 0 {
                    timeout.mul_f64(1.2)
                } else {
                    Duration::ZERO
                }
            },
            timeout,
        );
        for (r, x) in res.iter().enumerate().skip(1) {
            assert_eq!(x.as_ref().ok(), Some(&vec![0]), "rank {r}: {x:?}");
        }
        assert!(
            matches!(
                &res[0],
                Err(Error::Excluded { .. } | Error::NoQuorum { .. })
            ),
            "rank 0: {:?}",
            res[0]
        );
    }

    /// What a coordinator counts: a proposal to it from a rank that has heard from it; not one
    /// made before (that rank may still give up on it for its silence), and not once the rank
    /// proposes to another.
    #[test]
    fn a_coordinator_counts_only_proposals_that_heard_from_it() {
        let links = in_process_mesh(3);
        let sub = SubLink::new(&links[0] as &dyn Link, vec![0, 1, 2], 7).unwrap_or_else(|e| {
            panic!("{e}");
        });
        let mut round = Round {
            link: &sub,
            n: 3,
            me: 0,
            progress: 0,
            timeout: Duration::from_secs(1),
            at: At::rank(0),
            failed: BTreeSet::new(),
            confirmed: BTreeSet::new(),
            spoke: BTreeMap::new(),
            to_me: BTreeMap::new(),
            others: Vec::new(),
            speak_by: None,
            slice: Duration::from_millis(10),
        };
        let none = BTreeSet::new();
        assert!(round.hear(1, &propose(5, 0, false, &none), true).is_none());
        assert!(round.to_me.is_empty(), "counted before it heard");
        round.hear(1, &propose(5, 0, true, &none), true);
        round.hear(2, &propose(6, 0, true, &none), true);
        assert_eq!(round.to_me.keys().copied().collect::<Vec<_>>(), [1, 2]);
        // Rank 2 gave up on rank 0 (it proposes to rank 1 now).
        round.hear(2, &propose(6, 1, true, &[0].into()), true);
        assert_eq!(round.to_me.keys().copied().collect::<Vec<_>>(), [1]);
        // Its own decision coming back is a broken peer, never this rank failing itself.
        let d = Decided {
            failed: BTreeSet::new(),
            progress: [(0, 0), (1, 0), (2, 0)].into(),
        };
        assert!(round.hear(1, &decide(0, &d), true).is_none());
        assert!(round.failed.contains(&1) && !round.failed.contains(&0));
    }

    /// A decision survives its frame: decider, survivors' progress, failed ranks.
    #[test]
    fn a_decision_round_trips() {
        let d = Decided {
            failed: [1, 3].into(),
            progress: [(0, 7), (2, u64::MAX), (4, 0)].into(),
        };
        match decode(&decide(2, &d), 5) {
            Ok(Msg::Decide { by: 2, d: back }) => assert_eq!(back, d),
            Ok(_) => panic!("not a decision"),
            Err(e) => panic!("{e}"),
        }
        // Decided by a rank it holds failed.
        assert!(decode(&decide(3, &d), 5).is_err());
        // Decided by a rank not of the group.
        assert!(decode(&decide(5, &d), 5).is_err());
    }

    /// A coordinator that begins well within a wait of the others is alive, not silent: it is
    /// kept, and decides.
    #[test]
    fn a_coordinator_late_within_the_wait_is_kept() {
        let links = in_process_mesh(4);
        let timeout = Duration::from_secs(2);
        // Still in its call, as a rank whose call failed later.
        let res = run_late(
            &links,
            |r| {
                if r == 0 {
                    timeout.mul_f64(0.6)
                } else {
                    Duration::ZERO
                }
            },
            timeout,
        );
        for (r, x) in res.iter().enumerate() {
            assert_eq!(x.as_ref().ok(), Some(&vec![]), "rank {r}: {x:?}");
        }
    }

    /// Rank 0, the first coordinator, comes only after the others decided without it (its call
    /// ran long): it finds their decision behind their proposals and is told it is out,
    /// instead of deciding again (which would have kept everyone).
    #[test]
    fn a_late_coordinator_adopts_the_decision_made_without_it() {
        let links = in_process_mesh(5);
        let (done_tx, done_rx) = crossbeam::channel::bounded(1);
        let timeout = Duration::from_secs(1);
        let res: Vec<Result<Vec<usize>>> = std::thread::scope(|s| {
            let hs: Vec<_> = links
                .iter()
                .enumerate()
                .map(|(r, l)| {
                    let (done_tx, done_rx) = (done_tx.clone(), &done_rx);
                    s.spawn(move || {
                        if r == 0 {
                            // Waits for the others' decision (bounded), then agrees.
                            let _ = done_rx.recv_timeout(Duration::from_secs(60));
                        }
                        let x = agree(l, &[], 1, timeout, At::rank(r));
                        if r == 1 {
                            let _ = done_tx.send(());
                        }
                        x
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|_| panic!("agree panicked")))
                .collect()
        });
        for (r, x) in res.iter().enumerate().skip(1) {
            assert_eq!(x.as_ref().ok(), Some(&vec![0]), "rank {r}: {x:?}");
        }
        assert!(
            matches!(&res[0], Err(Error::Excluded { failed, .. }) if *failed == [0]),
            "rank 0: {:?}",
            res[0]
        );
    }

    #[test]
    fn malformed_frames_are_refused() {
        for (header, payload) in [
            (vec![], vec![]),
            (b"wAGR".to_vec(), vec![]),
            (b"xAGR\x01".to_vec(), vec![]),
            (b"wAGR\x09".to_vec(), vec![]),
            (b"wAGR\x01".to_vec(), vec![1, 2, 3]),
            (b"wAGR\x01".to_vec(), 9u32.to_le_bytes().to_vec()),
            // Six ranks failed of five.
            (b"wAGR\x01".to_vec(), vec![0; 8 + 4 + 4 + 4 * 6]),
            // No heard flag.
            (b"wAGR\x01".to_vec(), vec![0; 8 + 4]),
            // A heard flag of 2.
            (
                b"wAGR\x01".to_vec(),
                [&[0; 8][..], &0u32.to_le_bytes(), &2u32.to_le_bytes()].concat(),
            ),
            // No coordinator.
            (b"wAGR\x01".to_vec(), vec![0; 8]),
            // A coordinator not of the group.
            (
                b"wAGR\x01".to_vec(),
                [&[0; 8][..], &5u32.to_le_bytes()].concat(),
            ),
            (b"wAGR\x02".to_vec(), vec![]),
            // A decider, no count.
            (b"wAGR\x02".to_vec(), 0u32.to_le_bytes().to_vec()),
            // Six survivors of five.
            (
                b"wAGR\x02".to_vec(),
                [0u32.to_le_bytes(), 6u32.to_le_bytes()].concat(),
            ),
            // No survivor, nobody failed: covers none of the five.
            (
                b"wAGR\x02".to_vec(),
                [1u32.to_le_bytes(), 0u32.to_le_bytes()].concat(),
            ),
            // Survivor 1 twice.
            (
                b"wAGR\x02".to_vec(),
                [
                    &1u32.to_le_bytes()[..],
                    &2u32.to_le_bytes(),
                    &1u32.to_le_bytes(),
                    &[0; 8],
                    &1u32.to_le_bytes(),
                    &[0; 8],
                ]
                .concat(),
            ),
            // Survivor 1 also failed.
            (
                b"wAGR\x02".to_vec(),
                [
                    &1u32.to_le_bytes()[..],
                    &1u32.to_le_bytes(),
                    &1u32.to_le_bytes(),
                    &[0; 8],
                    &1u32.to_le_bytes(),
                ]
                .concat(),
            ),
        ] {
            assert!(decode(&Frame { header, payload }, 5).is_err());
        }
    }
}
