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

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::deadline::deadline_after;
use crate::error::{At, Error, Result};
use crate::link::{Frame, Link, LinkError, SubLink};

const MAGIC: [u8; 4] = *b"wAGR";
const PROPOSE: u8 = 1;
const DECIDE: u8 = 2;

/// Epochs of agreement sub-links: above any communicator's (see `Communicator::shrink`).
pub(crate) const AGREE_EPOCH: u32 = 1 << 31;

enum Msg {
    Propose(BTreeSet<usize>),
    Decide(BTreeSet<usize>),
}

fn encode(kind: u8, set: &BTreeSet<usize>) -> Frame {
    let mut header = MAGIC.to_vec();
    header.push(kind);
    let payload = set.iter().flat_map(|&r| (r as u32).to_le_bytes()).collect();
    Frame { header, payload }
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
    if !frame.payload.len().is_multiple_of(4) || frame.payload.len() / 4 > n {
        return Err(format!(
            "a set of {} bytes for a group of {n}",
            frame.payload.len()
        ));
    }
    let mut set = BTreeSet::new();
    for c in frame.payload.chunks_exact(4) {
        let r = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize;
        if r >= n {
            return Err(format!("rank {r} in a group of {n}"));
        }
        set.insert(r);
    }
    match kind {
        PROPOSE => Ok(Msg::Propose(set)),
        DECIDE => Ok(Msg::Decide(set)),
        k => Err(format!("an agreement message of kind {k}")),
    }
}

/// The ranks of a group of `n` that failed, as the survivors agree (see the module docs).
/// `suspects` are ranks this rank already holds failed; `epoch` tells this agreement's frames
/// from every other's; each wait lasts at most `timeout`.
pub(crate) fn agree(
    link: &dyn Link,
    suspects: &[usize],
    epoch: u32,
    timeout: Duration,
    at: At,
) -> Result<Vec<usize>> {
    let n = link.size();
    let me = link.rank();
    if let Some(&r) = suspects.iter().find(|&&r| r >= n || r == me) {
        return Err(Error::InvalidArgument {
            at,
            message: format!("suspect {r} is this rank or not a rank of this group of {n}"),
        });
    }
    let link = SubLink::new(link, (0..n).collect(), AGREE_EPOCH | epoch).map_err(|message| {
        Error::InvalidArgument {
            at,
            message: format!("internal: {message}"),
        }
    })?;
    let mut failed: BTreeSet<usize> = suspects.iter().copied().collect();
    // The coordinator proposed to, and the set proposed.
    let mut proposed: Option<(usize, BTreeSet<usize>)> = None;
    let mut deadline = deadline_after(timeout.saturating_mul(2));
    // When to propose again (see below), in slices of a quarter of the wait.
    let slice = (timeout / 4).max(Duration::from_millis(10));
    let mut resend = deadline;
    let decided = loop {
        let Some(coord) = (0..n).find(|r| !failed.contains(r)) else {
            break failed;
        };
        if coord == me {
            break coordinate(&link, &mut failed, timeout)?;
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
            if link.send(coord, encode(PROPOSE, &failed)).is_err() {
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
                Ok(Msg::Decide(set)) => {
                    relay(&link, &set, coord);
                    break set;
                }
                // A rank below this one does not take it for its coordinator: not a message
                // of this protocol as this rank follows it.
                Ok(Msg::Propose(_)) | Err(_) => {
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
fn relay(link: &SubLink<&dyn Link>, set: &BTreeSet<usize>, from: usize) {
    let me = link.rank();
    let decision = encode(DECIDE, set);
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
    timeout: Duration,
) -> Result<BTreeSet<usize>> {
    let (n, me) = (link.size(), link.rank());
    let deadline = deadline_after(timeout);
    let mut heard = BTreeSet::new();
    loop {
        let pending: Vec<usize> = (0..n)
            .filter(|r| *r != me && !failed.contains(r) && !heard.contains(r))
            .collect();
        if pending.is_empty() {
            break;
        }
        // From every rank not held failed: one already heard may propose again, having learnt
        // of more failures since. (None of them can have decided: each waits for this rank.)
        let listen: Vec<usize> = (0..n).filter(|r| *r != me && !failed.contains(r)).collect();
        match link.recv_any(&listen, deadline) {
            Ok((from, frame)) => match decode(&frame, n) {
                Ok(Msg::Propose(set)) => {
                    heard.insert(from);
                    failed.extend(set.into_iter().filter(|&r| r != me));
                }
                Ok(Msg::Decide(set)) => {
                    relay(link, &set, from);
                    return Ok(set);
                }
                Err(_) => {
                    failed.insert(from);
                }
            },
            Err(LinkError::Timeout) => failed.extend(pending),
            Err(e) => match culprit(&e) {
                Some(p) => {
                    failed.insert(p);
                }
                None => return Err(link_failure(At::rank(me), e)),
            },
        }
    }
    // Whatever else is queued already: a late coordinator finds here the decision the others
    // made without it, should it sit behind proposals it has not read (the links here read the
    // lowest ready rank first, so a lower coordinator's decision is usually read above), and
    // adopts it rather than decide again. (No rank sends frames of a shrunk communicator to it: a rank that
    // decided without it holds it failed.)
    loop {
        let listen: Vec<usize> = (0..n).filter(|r| *r != me && !failed.contains(r)).collect();
        match link.recv_any(&listen, Instant::now()) {
            Ok((from, frame)) => match decode(&frame, n) {
                Ok(Msg::Propose(set)) => failed.extend(set.into_iter().filter(|&r| r != me)),
                Ok(Msg::Decide(set)) => {
                    relay(link, &set, from);
                    return Ok(set);
                }
                Err(_) => {
                    failed.insert(from);
                }
            },
            Err(LinkError::Timeout) => break,
            Err(e) => match culprit(&e) {
                Some(p) => {
                    failed.insert(p);
                }
                None => return Err(link_failure(At::rank(me), e)),
            },
        }
    }
    let decision = encode(DECIDE, failed);
    // To every other rank, the failed included: one held failed on another's word may be
    // alive, and must hear that it is out rather than wait for its deadline. (Frames to a dead
    // rank go nowhere; one that cannot be sent is its deadline's to report.)
    for r in (0..n).filter(|r| *r != me) {
        let _ = link.send(r, decision.clone());
    }
    Ok(failed.clone())
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
fn finish(decided: BTreeSet<usize>, me: usize, n: usize, at: At) -> Result<Vec<usize>> {
    let failed: Vec<usize> = decided.into_iter().collect();
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
    Ok(failed)
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
            (b"wAGR\x01".to_vec(), vec![0; 4 * 6]),
        ] {
            assert!(decode(&Frame { header, payload }, 5).is_err());
        }
    }
}
