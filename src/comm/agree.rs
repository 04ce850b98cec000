//! Agreement among the survivors of a failure on which ranks failed, as ULFM's
//! `MPIX_Comm_agree` before `MPIX_Comm_shrink`: the input of
//! [`Communicator::shrink`](crate::Communicator::shrink).
//!
//! A coordinator collects and decides, so that every survivor adopts one decision:
//! - The coordinator is the lowest rank this rank does not hold failed. Every other rank sends
//!   it a proposal (the ranks it holds failed), again every quarter of a wait (a coordinator
//!   still inside the call that failed may take one for a frame of that call and drop it), and
//!   waits for its decision, reading from it alone.
//! - The coordinator waits for a proposal from every rank it does not hold failed, merging what
//!   they hold failed into its own set. A rank whose link ends, whose frame is corrupt, or that
//!   has not proposed when the wait's deadline passes is failed too. It then sends the decision
//!   (the failed set) to every other rank, and returns.
//! - A rank that loses its coordinator (link ended, deadline) holds it failed and proposes to
//!   the next.
//! - A rank that gets a decision passes it on to every other rank before it returns, so that
//!   if the coordinator died while telling them, the next coordinator they turn to has it; a
//!   coordinator that gets a decision (it came late, after the others decided without it)
//!   adopts it too.
//!
//! A coordinator collects for `timeout`; a rank waits twice that for its coordinator's
//! decision, since the coordinator may begin late, and there are at most as many coordinators
//! as ranks: the agreement ends even when ranks die during it, after at most about `2 n`
//! timeouts when every coordinator in turn hangs.
//!
//! Not a uniform consensus: a second failure at the wrong moment (a coordinator that dies
//! after telling some ranks, before the relays reach the others) can still leave two groups
//! with different members. Neither computes a silently wrong result: each group's frames carry
//! a checksum of its members, so the other's are dropped and the calls that would mix them
//! fail at their deadline, and the next agreement settles it.
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

use crate::deadline::deadline_after;
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
    /// The proposer's progress, and the ranks it holds failed.
    Propose(u64, BTreeSet<usize>),
    Decide(Decided),
}

fn ranks_bytes(set: &BTreeSet<usize>) -> impl Iterator<Item = u8> + '_ {
    set.iter().flat_map(|&r| (r as u32).to_le_bytes())
}

fn frame(kind: u8, payload: Vec<u8>) -> Frame {
    let mut header = MAGIC.to_vec();
    header.push(kind);
    Frame { header, payload }
}

/// A proposal: `[progress u64][failed ranks u32...]`.
fn propose(progress: u64, set: &BTreeSet<usize>) -> Frame {
    let mut payload = progress.to_le_bytes().to_vec();
    payload.extend(ranks_bytes(set));
    frame(PROPOSE, payload)
}

/// A decision: `[k u32][k x (rank u32, progress u64)][failed ranks u32...]`.
fn decide(d: &Decided) -> Frame {
    let mut payload = (d.progress.len() as u32).to_le_bytes().to_vec();
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
            Ok(Msg::Propose(progress, decode_ranks(&b[8..], n)?))
        }
        DECIDE => {
            let k = u32_at(b, 0).ok_or("a decision without its count")? as usize;
            if k > n {
                return Err(format!("a decision of {k} survivors in a group of {n}"));
            }
            // k <= n: no overflow.
            let rest = 4 + 12 * k;
            if b.len() < rest {
                return Err(format!("a decision of {} bytes for {k} survivors", b.len()));
            }
            let mut progress = BTreeMap::new();
            for i in 0..k {
                let at = 4 + 12 * i;
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
            Ok(Msg::Decide(Decided { failed, progress }))
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
    let mut failed: BTreeSet<usize> = suspects.iter().copied().collect();
    // What the last call took of this agreement: a decision is adopted at once, proposals
    // count if this rank coordinates.
    let mut early = BTreeMap::new();
    for (from, frame) in stray {
        match link.open(frame).map(|f| decode(&f, n)) {
            Some(Ok(Msg::Decide(d))) if from < n && from != me => {
                relay(&link, &d, from);
                return finish(d, me, n, at);
            }
            Some(Ok(Msg::Propose(p, set))) if from < n && from != me => {
                early.insert(from, p);
                failed.extend(set.into_iter().filter(|&r| r != me));
            }
            _ => {}
        }
    }
    // The coordinator proposed to, and the set proposed.
    let mut proposed: Option<(usize, BTreeSet<usize>)> = None;
    let mut deadline = deadline_after(timeout.saturating_mul(2));
    // When to propose again (see below), in slices of a quarter of the wait.
    let slice = (timeout / 4).max(Duration::from_millis(10));
    let mut resend = deadline;
    let decided = loop {
        let Some(coord) = (0..n).find(|r| !failed.contains(r)) else {
            break Decided {
                failed,
                progress: BTreeMap::new(),
            };
        };
        if coord == me {
            break coordinate(&link, &mut failed, progress, early, timeout)?;
        }
        let now = Instant::now();
        if proposed.as_ref() != Some(&(coord, failed.clone())) || now >= resend {
            if proposed.as_ref().is_none_or(|(c, _)| *c != coord) {
                // A new coordinator gets two whole waits: its own collection may take one,
                // begun up to one later than this rank's (it may still have been in the call
                // that failed).
                deadline = deadline_after(timeout.saturating_mul(2));
            }
            // Proposed again every slice: a coordinator still inside the call that failed may
            // have taken the last one for a frame of that call (and thrown it away).
            if link.send(coord, propose(progress, &failed)).is_err() {
                failed.insert(coord);
                continue;
            }
            proposed = Some((coord, failed.clone()));
            resend = deadline_after(slice);
        }
        // From the coordinator only: a rank that has decided may already be sending frames of
        // the shrunk communicator, which must stay queued for it, not be read (and dropped) here.
        match link.recv(coord, deadline.min(resend)) {
            Ok(frame) => match decode(&frame, n) {
                Ok(Msg::Decide(d)) => {
                    relay(&link, &d, coord);
                    break d;
                }
                // A rank below this one does not take it for its coordinator: not a message
                // of this protocol as this rank follows it.
                Ok(Msg::Propose(..)) | Err(_) => {
                    failed.insert(coord);
                }
            },
            Err(LinkError::Timeout) => {
                if Instant::now() >= deadline {
                    failed.insert(coord);
                }
            }
            Err(e) => {
                if culprit(&e).is_some() {
                    failed.insert(coord);
                } else {
                    return Err(link_failure(at, e));
                }
            }
        }
    };
    finish(decided, me, n, at)
}

/// Passes a decision on to every other rank before this rank acts on it: should its
/// coordinator die while telling the others, they find the decision here when they turn to
/// this rank (sends to ranks that have moved on go unread: later epochs drop them).
fn relay(link: &SubLink<&dyn Link>, d: &Decided, from: usize) {
    let me = link.rank();
    let decision = decide(d);
    for r in (0..link.size()).filter(|r| *r != me && *r != from) {
        let _ = link.send(r, decision.clone());
    }
}

/// This rank coordinates: it waits for a proposal from every rank it does not hold failed
/// (each new failure ends that rank's wait), then sends its decision to every other rank. A
/// decision that reaches it meanwhile (another coordinator decided while this rank was late,
/// or before it died) is adopted instead, and passed on.
fn coordinate(
    link: &SubLink<&dyn Link>,
    failed: &mut BTreeSet<usize>,
    progress: u64,
    early: BTreeMap<usize, u64>,
    timeout: Duration,
) -> Result<Decided> {
    let (n, me) = (link.size(), link.rank());
    let deadline = deadline_after(timeout);
    // The progress each rank heard from reported (some already, through the last call).
    let mut heard = early;
    loop {
        let pending: Vec<usize> = (0..n)
            .filter(|r| *r != me && !failed.contains(r) && !heard.contains_key(r))
            .collect();
        // Once every rank not held failed has proposed, whatever else is queued already: a late
        // coordinator finds there the decision the others made without it, should it sit
        // behind proposals it has not read (the links here read the lowest ready rank first,
        // so a lower coordinator's decision is usually read earlier), and adopts it rather
        // than decide again. (No rank sends frames of a shrunk communicator to it: a rank that
        // decided without it holds it failed.)
        let draining = pending.is_empty();
        // From every rank not held failed: one already heard may propose again, having learnt
        // of more failures since. (None of them can have decided: each waits for this rank.)
        let listen: Vec<usize> = (0..n).filter(|r| *r != me && !failed.contains(r)).collect();
        let until = if draining { Instant::now() } else { deadline };
        match link.recv_any(&listen, until) {
            Ok((from, frame)) => match decode(&frame, n) {
                Ok(Msg::Propose(p, set)) => {
                    heard.insert(from, p);
                    failed.extend(set.into_iter().filter(|&r| r != me));
                }
                Ok(Msg::Decide(d)) => {
                    relay(link, &d, from);
                    return Ok(d);
                }
                Err(_) => {
                    failed.insert(from);
                }
            },
            Err(LinkError::Timeout) if draining => break,
            Err(LinkError::Timeout) => failed.extend(pending),
            Err(e) => match culprit(&e) {
                Some(p) => {
                    failed.insert(p);
                }
                None => return Err(link_failure(At::rank(me), e)),
            },
        }
    }
    heard.insert(me, progress);
    heard.retain(|r, _| !failed.contains(r));
    let d = Decided {
        failed: failed.clone(),
        progress: heard,
    };
    let decision = decide(&d);
    // To every other rank, the failed included: one held failed on another's word may be
    // alive, and must hear that it is out rather than wait for its deadline. (Frames to a dead
    // rank go nowhere; one that cannot be sent is its deadline's to report.)
    for r in (0..n).filter(|r| *r != me) {
        let _ = link.send(r, decision.clone());
    }
    Ok(d)
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
            (b"wAGR\x01".to_vec(), vec![0; 8 + 4 * 6]),
            (b"wAGR\x02".to_vec(), vec![]),
            (b"wAGR\x02".to_vec(), 6u32.to_le_bytes().to_vec()),
            (
                b"wAGR\x02".to_vec(),
                [1u32.to_le_bytes(), 0u32.to_le_bytes()].concat(),
            ),
            // Survivor 1 twice.
            (
                b"wAGR\x02".to_vec(),
                [
                    &2u32.to_le_bytes()[..],
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
