//! Fault injection: a link wrapper whose faults a test or bench turns on and off while the
//! ranks run. Kill a rank (its frames vanish and its peers see its end as gone), delay a rank's
//! frames, drop, corrupt or duplicate frames, or partition the ranks into groups that cannot
//! reach each other. Corruption is caught only by a checksum above this layer
//! ([`Checksummed`](super::Checksummed), which [`LinkStack`](super::LinkStack) adds).
//!
//! ```
//! use std::time::{Duration, Instant};
//! use wccl::link::{FaultPlan, Frame, Link, in_process_mesh};
//! let faults = FaultPlan::new();
//! let links = faults.wrap(in_process_mesh(3));
//! faults.partition(&[&[0], &[1, 2]]);
//! links[0].send(1, Frame::default()).unwrap(); // dropped on the wire
//! let r = links[1].recv(0, Instant::now() + Duration::from_millis(20));
//! assert!(r.is_err());
//! faults.heal();
//! links[0].send(1, Frame::default()).unwrap();
//! assert!(links[1].recv(0, Instant::now() + Duration::from_secs(1)).is_ok());
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Frame, Link, LinkError};

#[derive(Default)]
struct Faults {
    // Each field is one kind of fault; `dropped` counts the frames they cost.
    killed: Vec<usize>,
    /// Frames each rank still sends before it is killed (see `FaultPlan::kill_after`).
    kill_after: HashMap<usize, usize>,
    /// `(first, then, frames)`: once `first` is killed, `then` dies after `frames` more frames.
    chains: Vec<(usize, usize, usize)>,
    /// Killed ranks whose frames sent before they died are still delivered (those killed at a
    /// frame, by `kill_after`); the frames of those killed outright vanish, queued ones too.
    delivered: Vec<usize>,
    delays: HashMap<usize, Duration>,
    /// Frames still to drop on each (from, to) pair.
    drops: HashMap<(usize, usize), usize>,
    /// Frames still to corrupt (one bit flipped) on each (from, to) pair.
    corrupts: HashMap<(usize, usize), usize>,
    /// Frames still to deliver twice on each (from, to) pair.
    duplicates: HashMap<(usize, usize), usize>,
    /// Partition group of each rank; ranks in different groups cannot reach each other.
    groups: HashMap<usize, usize>,
    /// When the partition in force began.
    cut_at: Option<Instant>,
    dropped: u64,
    /// Frames corrupted and frames delivered twice so far.
    corrupted: u64,
    duplicated: u64,
    /// When each killed rank died.
    killed_at: HashMap<usize, Instant>,
}

/// Takes one from a pair's pending count: whether this frame is hit.
fn take_one(pending: &mut HashMap<(usize, usize), usize>, pair: (usize, usize)) -> bool {
    pending.get_mut(&pair).is_some_and(|n| {
        let hit = *n > 0;
        *n = n.saturating_sub(1);
        hit
    })
}

/// Flips one bit of a frame: in the middle of the payload, or of the header when the payload is
/// empty (a frame with neither is left as it is: there is nothing to corrupt).
fn flip_bit(frame: &mut Frame) {
    let bytes = if frame.payload.is_empty() {
        &mut frame.header
    } else {
        &mut frame.payload
    };
    let mid = bytes.len() / 2;
    if let Some(b) = bytes.get_mut(mid) {
        *b ^= 0x10;
    }
}

impl Faults {
    /// Kills `rank`, and arms the kills that wait for its death.
    fn kill(&mut self, rank: usize) {
        if self.killed.contains(&rank) {
            return;
        }
        self.killed.push(rank);
        self.killed_at.insert(rank, Instant::now());
        self.kill_after.remove(&rank);
        let armed: Vec<_> = self
            .chains
            .iter()
            .filter(|c| c.0 == rank)
            .map(|c| (c.1, c.2))
            .collect();
        self.chains.retain(|c| c.0 != rank);
        for (then, frames) in armed {
            self.kill_after_frames(then, frames);
        }
    }

    fn kill_after_frames(&mut self, rank: usize, frames: usize) {
        self.delivered.push(rank);
        if frames == 0 {
            self.kill(rank);
        } else {
            self.kill_after.insert(rank, frames);
        }
    }
}

/// How often a waiting receive looks again for a killed peer.
const KILL_CHECK: Duration = Duration::from_millis(20);

/// The faults in force for a set of wrapped links; clone it to control them from anywhere.
#[derive(Clone, Default)]
pub struct FaultPlan {
    faults: Arc<Mutex<Faults>>,
}

impl std::fmt::Debug for FaultPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let x = self.lock();
        f.debug_struct("FaultPlan")
            .field("killed", &x.killed)
            .field("delays", &x.delays)
            .field("corrupts", &x.corrupts)
            .field("duplicates", &x.duplicates)
            .field("groups", &x.groups)
            .field("dropped", &x.dropped)
            .finish()
    }
}

impl FaultPlan {
    /// No faults yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wraps every link of a mesh so that these faults apply to it.
    pub fn wrap<L: Link>(&self, links: Vec<L>) -> Vec<FaultyLink<L>> {
        links
            .into_iter()
            .map(|inner| self.wrap_one(inner))
            .collect()
    }

    /// Wraps one link so that these faults apply to it: a process that holds one rank's link
    /// (a network link, say) wraps just that one, and the plan reaches it through a clone.
    pub fn wrap_one<L: Link>(&self, link: L) -> FaultyLink<L> {
        FaultyLink {
            inner: link,
            plan: self.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Faults> {
        // A panic elsewhere while holding the lock leaves plain data; keep using it.
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Kills `rank`: frames from and to it vanish (those queued for its peers too), its peers'
    /// receives from it report it gone, and its own receives end at once (a dead process waits
    /// for nothing).
    pub fn kill(&self, rank: usize) {
        self.lock().kill(rank);
    }

    /// Kills `rank` once it has sent `frames` more frames (at once for 0): the way to kill a
    /// rank at a chosen point inside a call, every frame of the call being a point. Unlike
    /// [`kill`](Self::kill), what it sent before it died and had reached the peer's link is
    /// still read, as a socket's buffered bytes are before its reset (over channels, all of it;
    /// over TCP, what had crossed the socket: a frame still in flight is lost).
    pub fn kill_after(&self, rank: usize, frames: usize) {
        self.lock().kill_after_frames(rank, frames);
    }

    /// Once `first` is killed (by any of these methods), kills `then` after `frames` more of
    /// its frames: a second death at a point set by the first, with no thread racing to see
    /// the first (0 kills both at once).
    pub fn kill_after_death_of(&self, first: usize, then: usize, frames: usize) {
        let mut f = self.lock();
        if f.killed.contains(&first) {
            f.kill_after_frames(then, frames);
        } else {
            f.chains.push((first, then, frames));
        }
    }

    /// Whether `rank` has been killed (by [`kill`](Self::kill), or by
    /// [`kill_after`](Self::kill_after) once its frames ran out).
    pub fn is_killed(&self, rank: usize) -> bool {
        self.lock().killed.contains(&rank)
    }

    /// Delays every frame `rank` sends by `by`.
    pub fn delay(&self, rank: usize, by: Duration) {
        self.lock().delays.insert(rank, by);
    }

    /// Drops the next `count` frames from `from` to `to`.
    pub fn drop_next(&self, from: usize, to: usize, count: usize) {
        let mut f = self.lock();
        let n = f.drops.entry((from, to)).or_default();
        *n = n.saturating_add(count);
    }

    /// Flips one bit in each of the next `count` frames from `from` to `to` (in the payload's
    /// middle; in the header when the payload is empty). The frames arrive; only a checksum
    /// above this layer can tell.
    pub fn corrupt_next(&self, from: usize, to: usize, count: usize) {
        let mut f = self.lock();
        let n = f.corrupts.entry((from, to)).or_default();
        *n = n.saturating_add(count);
    }

    /// Delivers each of the next `count` frames from `from` to `to` twice.
    pub fn duplicate_next(&self, from: usize, to: usize, count: usize) {
        let mut f = self.lock();
        let n = f.duplicates.entry((from, to)).or_default();
        *n = n.saturating_add(count);
    }

    /// Splits the ranks into groups that cannot reach each other (ranks not listed form one
    /// more group together).
    pub fn partition(&self, groups: &[&[usize]]) {
        let mut f = self.lock();
        f.groups.clear();
        f.cut_at = Some(Instant::now());
        for (g, ranks) in groups.iter().enumerate() {
            for &r in *ranks {
                f.groups.insert(r, g + 1);
            }
        }
    }

    /// Ends every partition, delay and pending drop, corruption and duplicate (killed ranks stay
    /// dead).
    pub fn heal(&self) {
        let mut f = self.lock();
        f.groups.clear();
        f.cut_at = None;
        f.delays.clear();
        f.drops.clear();
        f.corrupts.clear();
        f.duplicates.clear();
    }

    /// Frames dropped so far (partitions, drops, killed senders).
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// Frames corrupted so far (one bit flipped by [`corrupt_next`](Self::corrupt_next)).
    pub fn corrupted(&self) -> u64 {
        self.lock().corrupted
    }

    /// Frames delivered twice so far (by [`duplicate_next`](Self::duplicate_next)).
    pub fn duplicated(&self) -> u64 {
        self.lock().duplicated
    }

    /// When `rank` was killed, if it was: the moment its death took effect (for
    /// [`kill_after`](Self::kill_after), after its last frame).
    pub fn killed_at(&self, rank: usize) -> Option<Instant> {
        self.lock().killed_at.get(&rank).copied()
    }
}

/// A [`Link`] subject to a [`FaultPlan`].
pub struct FaultyLink<L: Link> {
    inner: L,
    plan: FaultPlan,
}

impl<L: Link> std::fmt::Debug for FaultyLink<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyLink")
            .field("rank", &self.inner.rank())
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

impl<L: Link> FaultyLink<L> {
    /// A killed rank waits for nothing: its own receives end at once.
    fn check_self(&self) -> Result<(), LinkError> {
        if self.is_killed(self.inner.rank()) {
            Err(LinkError::Closed)
        } else {
            Ok(())
        }
    }

    fn is_killed(&self, rank: usize) -> bool {
        self.plan.lock().killed.contains(&rank)
    }

    /// Whether `rank` is killed, and whether what it sent before is still delivered.
    fn fate(&self, rank: usize) -> (bool, bool) {
        let f = self.plan.lock();
        (f.killed.contains(&rank), f.delivered.contains(&rank))
    }
}

impl<L: Link> Link for FaultyLink<L> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn size(&self) -> usize {
        self.inner.size()
    }

    fn send(&self, to: usize, mut frame: Frame) -> Result<(), LinkError> {
        let me = self.inner.rank();
        let (delay, twice, last) = {
            let mut f = self.plan.lock();
            let cut =
                f.groups.get(&me).copied().unwrap_or(0) != f.groups.get(&to).copied().unwrap_or(0);
            let dropping = take_one(&mut f.drops, (me, to));
            if f.killed.contains(&me) || f.killed.contains(&to) || cut || dropping {
                f.dropped += 1;
                return Ok(()); // lost on the wire: the sender cannot tell
            }
            if take_one(&mut f.corrupts, (me, to)) {
                flip_bit(&mut frame);
                f.corrupted = f.corrupted.saturating_add(1);
            }
            let twice = take_one(&mut f.duplicates, (me, to));
            if twice {
                f.duplicated = f.duplicated.saturating_add(1);
            }
            // This frame is the rank's last: it dies once the frame is on its way.
            let last = f.kill_after.get_mut(&me).is_some_and(|left| {
                *left = left.saturating_sub(1);
                *left == 0
            });
            (f.delays.get(&me).copied(), twice, last)
        };
        if let Some(d) = delay {
            // The emulated slow sender holds its frame back.
            std::thread::sleep(d);
        }
        if twice {
            self.inner.send(to, frame.clone())?;
        }
        let sent = self.inner.send(to, frame);
        if last {
            self.plan.lock().kill(me);
        }
        sent
    }

    fn recv(&self, from: usize, deadline: Instant) -> Result<Frame, LinkError> {
        // Wait in short slices, so that a peer killed while this rank waits is seen at once
        // (as a reset connection would be), not at the deadline.
        loop {
            self.check_self()?;
            let (dead, delivered) = self.fate(from);
            if dead && !delivered {
                return Err(LinkError::Gone(from));
            }
            let until = if dead {
                Instant::now()
            } else {
                deadline.min(crate::deadline::deadline_after(KILL_CHECK))
            };
            match self.inner.recv(from, until) {
                // Another rank's abort is news whoever this rank waits on.
                Err(e @ LinkError::Aborted { .. }) => return Err(e),
                // Whatever the link says about a killed peer's end (nothing queued, closed),
                // it is gone.
                Err(_) if dead => return Err(LinkError::Gone(from)),
                Err(LinkError::Timeout) if Instant::now() < deadline => continue,
                other => return other,
            }
        }
    }

    fn recv_any(&self, peers: &[usize], deadline: Instant) -> Result<(usize, Frame), LinkError> {
        loop {
            self.check_self()?;
            if let Some(p) = peers
                .iter()
                .copied()
                .find(|&p| self.fate(p) == (true, false))
            {
                return Err(LinkError::Gone(p));
            }
            let dead = peers.iter().copied().find(|&p| self.is_killed(p));
            let until = if dead.is_some() {
                Instant::now()
            } else {
                deadline.min(crate::deadline::deadline_after(KILL_CHECK))
            };
            match (self.inner.recv_any(peers, until), dead) {
                (Err(LinkError::Timeout | LinkError::Closed), Some(p)) => {
                    return Err(LinkError::Gone(p));
                }
                (Err(LinkError::Gone(q) | LinkError::Exited(q)), _) if self.is_killed(q) => {
                    return Err(LinkError::Gone(q));
                }
                (Err(LinkError::Timeout), None) if Instant::now() < deadline => continue,
                (other, _) => return other,
            }
        }
    }

    /// The inner link's, and the peers across a partition once it has lasted `longer_than`:
    /// a cut stops heartbeats too, as a link that sends them would tell.
    fn silent_peers(&self, longer_than: Duration) -> Vec<usize> {
        let mut silent = self.inner.silent_peers(longer_than);
        let me = self.inner.rank();
        let f = self.plan.lock();
        if f.cut_at.is_some_and(|t| t.elapsed() > longer_than) {
            let side = |r: usize| f.groups.get(&r).copied().unwrap_or(0);
            silent.extend((0..self.inner.size()).filter(|&p| p != me && side(p) != side(me)));
        }
        silent.sort_unstable();
        silent.dedup();
        silent
    }

    fn abort(&self, reason: &str) {
        if !self.plan.lock().killed.contains(&self.inner.rank()) {
            self.inner.abort(reason);
        }
    }

    fn remote_abort(&self) -> Option<super::RemoteAbort> {
        // A killed rank's aborts vanish like its frames, as in `abort`.
        let inner = self.inner.remote_abort()?;
        let (plan, rank) = (self.plan.clone(), self.inner.rank());
        Some(Arc::new(move |reason: &str| {
            if !plan.lock().killed.contains(&rank) {
                inner(reason);
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::in_process_mesh;

    #[test]
    fn drops_asked_for_add_up_without_overflow() {
        let plan = FaultPlan::new();
        let links = plan.wrap(in_process_mesh(2));
        plan.drop_next(0, 1, 1);
        plan.drop_next(0, 1, usize::MAX);
        plan.drop_next(0, 1, usize::MAX);
        links[0].send(1, Frame::default()).expect("send");
        links[0].send(1, Frame::default()).expect("send");
        assert_eq!(plan.dropped(), 2);
    }

    #[test]
    fn frames_to_and_from_a_killed_rank_vanish() {
        let plan = FaultPlan::new();
        let links = plan.wrap(in_process_mesh(3));
        plan.kill(1);
        let soon = || Instant::now() + Duration::from_millis(20);
        links[0].send(1, Frame::default()).expect("send");
        links[1].send(2, Frame::default()).expect("send");
        assert_eq!(plan.dropped(), 2);
        assert_eq!(links[2].recv(1, soon()).err(), Some(LinkError::Gone(1)));
        assert_eq!(
            links[2].recv_any(&[0, 1], soon()).err(),
            Some(LinkError::Gone(1))
        );
        // Other pairs are untouched.
        links[0]
            .send(
                2,
                Frame {
                    header: vec![9],
                    payload: vec![],
                },
            )
            .expect("send");
        assert_eq!(links[2].recv(0, soon()).expect("recv").header, vec![9]);
    }

    #[test]
    fn wrap_one_puts_a_single_link_under_the_plan() {
        // As one process of a network group would: only its own link is wrapped, yet the
        // plan's faults reach it, and the unwrapped peers see nothing of the plan.
        let plan = FaultPlan::new();
        let mut mesh = in_process_mesh(3);
        let two = mesh.pop().expect("rank 2");
        let one = mesh.pop().expect("rank 1");
        let zero = plan.wrap_one(mesh.pop().expect("rank 0"));
        assert_eq!((zero.rank(), zero.size()), (0, 3));
        let soon = || Instant::now() + Duration::from_millis(50);
        plan.drop_next(0, 1, 1);
        let tagged = |t: u8| Frame {
            header: vec![t],
            payload: vec![t; 3],
        };
        zero.send(1, tagged(4)).expect("send");
        zero.send(1, tagged(5)).expect("send");
        assert_eq!(one.recv(0, soon()).expect("recv").header, vec![5]);
        assert_eq!(plan.dropped(), 1);
        plan.kill(2);
        assert_eq!(zero.recv(2, soon()).err(), Some(LinkError::Gone(2)));
        two.send(1, tagged(6)).expect("send");
        assert_eq!(one.recv(2, soon()).expect("unwrapped").header, vec![6]);
    }

    #[test]
    fn drops_count_down_and_heal_clears_them() {
        let plan = FaultPlan::new();
        let links = plan.wrap(in_process_mesh(2));
        plan.drop_next(0, 1, 2);
        for i in 0..3u8 {
            links[0]
                .send(
                    1,
                    Frame {
                        header: vec![i],
                        payload: vec![],
                    },
                )
                .expect("send");
        }
        let got = links[1]
            .recv(0, Instant::now() + Duration::from_millis(50))
            .expect("third frame");
        assert_eq!(got.header, vec![2]);
        plan.drop_next(0, 1, 5);
        plan.heal();
        links[0].send(1, Frame::default()).expect("send");
        assert!(
            links[1]
                .recv(0, Instant::now() + Duration::from_millis(50))
                .is_ok()
        );
    }
}
