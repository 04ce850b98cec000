//! A server rank: owns a shard of the parameters on its device, aggregates pushes with the
//! reduce kernel, applies the update rule, replicates along each key's chain and answers pulls
//! when the mode (and, under `Strong`, the chain) allows.
//!
//! It is one event loop ([`PsServer::serve`]): every frame from any peer, every peer that
//! goes, and every timer that fires is an event, and no handler waits for one peer. Requests
//! that cannot be answered yet are kept (`waiting`, `parked`) and looked at again after each
//! event; replication acks are counted per key (`acked`, `inflight`); time-outs come from a
//! deadline heap (`Timers`).
//!
//! | state of a key here | events that change it |
//! | --- | --- |
//! | head (`chain[0]` is this server) | push: fold, apply, replicate to `chain[1]`; ack from a member: commit; a member's ack late or its link gone: drop it from the chain (epoch + 1) and send the state to the new successor; a dropped member answers a ping: re-admit it as the tail (state transfer) |
//! | member | replica: check, apply, forward to its successor, ack to the head; a worker's request: ping the servers before it (take over if all are gone; refuse, or under `Eventual` take over cut off, if one is silent; point the worker to one that answers) |
//! | head that took over | as head; a replica from another head of a newer epoch, or of the same epoch with a higher version (the earlier server in the chain on a tie): yield and become its member |

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wgpu::Buffer;

use super::checkpoint;
use super::protocol::{F32, JOIN, Kind, NO_RANK, NOT_STALE, PsHeader, PushStatus, Refusal, digest};
use super::{Consistency, Mode, Policy, ShardKey, UpdateRule};
use crate::comm::Communicator;
use crate::deadline::{deadline_after, deadline_from};
use crate::device::TensorRef;
use crate::error::{At, Error, Result};
use crate::kernels::UpdateKernel;
use crate::link::{Frame, LinkError};
use crate::types::{Combine, DType};

/// Steps a worker's push may be ahead of its own clock (`BoundedStaleness`, `Async`), and the
/// most a replica that took over under `Eventual` skips ahead to meet the workers: a push past
/// that is refused as a bad step, whatever it claims.
const MAX_AHEAD: u64 = 1024;
/// Take-overs of one key remembered (see `KeyState::fences`).
const MAX_FENCES: usize = 32;
/// Events a report keeps.
const MAX_EVENTS: usize = 4096;
/// Requests one worker may have waiting on a server at once.
const MAX_HELD: usize = 64;
/// The most steps a member that took over under `Eventual` skips to meet a worker's push.
const MAX_SKIP: u64 = 16;
/// Steps below a worker's clock whose pushes are remembered, to refuse duplicates.
const WINDOW: u64 = 64;

/// What a server did, returned when every worker is done.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServerReport {
    /// Updates applied (one per step in `Sync`, one per push otherwise), all keys together.
    pub applied: u64,
    /// Pushes that came after their step's update (backup workers' late gradients), dropped.
    pub late: u64,
    /// Pushes of a (worker, step) already received, dropped.
    pub duplicates: u64,
    /// Requests refused (bad fields, replays, keys held elsewhere).
    pub refused: u64,
    /// Workers whose link closed before they said they were done.
    pub gone: Vec<usize>,
    /// What happened to workers, servers and chains, in order.
    pub events: Vec<String>,
    /// The final parameters of this server's keys (those it heads and those it backs up).
    pub params: Vec<(String, Vec<f32>)>,
    /// A digest (FNV-1a of the f32 bits) of each final parameter tensor, to check that
    /// replicas agree.
    pub digests: Vec<(String, u64)>,
    /// The final version of each key.
    pub versions: Vec<(String, u64)>,
    /// Events past the first 4096, counted instead of kept (see `events`).
    pub events_dropped: u64,
}

/// An update sent down the chain and not yet acknowledged by every member.
struct Inflight {
    version: u64,
    deadline: Instant,
    /// The parameters at `version` (answers come from them once committed).
    w: Vec<u8>,
    clock: u64,
}

struct KeyState {
    /// The key's id among all keys.
    id: u32,
    name: String,
    count: usize,
    w: Buffer,
    m: Buffer,
    acc: Buffer,
    /// Updates applied.
    version: u64,
    /// Sync: which workers folded a push into the step being aggregated (`version`).
    pushed: Vec<bool>,
    /// Per worker: one more than the highest step it pushed.
    clocks: Vec<u64>,
    /// Per worker: bit i set when step `clock - 1 - i` was pushed (BoundedStaleness, Async).
    window: Vec<u64>,
    /// The servers that hold the key by the builder, head first.
    statics: Vec<usize>,
    /// The chain as agreed now, head first; it changes with `epoch`.
    chain: Vec<usize>,
    epoch: u64,
    /// Whether this server became head by taking over.
    took_over: bool,
    /// Set while this server answers for the key cut off from a head that may be alive
    /// (`Eventual` only).
    cut_off: bool,
    /// When this replica last heard from its head.
    last_heard: Instant,
    /// The slowest worker's clock the last replica carried (a member's view).
    replica_clock: u64,
    /// Each worker's clock and dedupe window the last replica carried.
    replica_clocks: Vec<(u64, u64)>,
    /// (epoch, version) of every take-over of the key, oldest first: from that epoch on the
    /// versions above `version` hold other updates than the versions of that number before it.
    /// A worker that saw a version above a fence in an epoch before it lost updates. Replicated
    /// with the state; at most `MAX_FENCES` (the oldest two merged, keeping the lower version).
    fences: Vec<(u64, u64)>,
    /// Head: the highest version each member acknowledged in this epoch.
    acked: HashMap<usize, u64>,
    /// Head: updates not yet held by the whole chain, oldest first.
    inflight: VecDeque<Inflight>,
    /// Head: the highest version every member holds, and its slowest-worker clock.
    committed: u64,
    committed_clock: u64,
    /// The parameters at some version, kept on the host (`committed`'s, when it lags the
    /// device's).
    snapshot: Option<(u64, Vec<u8>)>,
    /// A member's probe of the servers before it (take-over): who has not answered yet, and
    /// until when.
    probe: Option<Probe>,
}

/// A member's take-over in progress: the servers before it must prove gone, and the live ones
/// after it must agree (a claim each accepts only if its chain still holds this member and it
/// has nothing newer), before the deadline.
struct Probe {
    /// Servers before this one, pinged, not yet gone.
    preds: BTreeSet<usize>,
    /// Servers after this one, asked to agree, not yet answered.
    succs: BTreeSet<usize>,
    until: Instant,
    /// The highest epoch the agreeing servers hold.
    epoch: u64,
}

/// Whether the worker behind request `h` saw a version this copy of `key` lacks: a higher one,
/// or one above a take-over's version seen before that take-over (same number, other updates).
/// `h.epoch` is the epoch of the answer that gave the worker `h.version`.
fn behind(key: &KeyState, h: &PsHeader) -> bool {
    lost_from(key.version, &key.fences, h.version, h.epoch).is_some()
}

/// When the worker behind `h` lost updates on this copy of `key`: the version this copy's line
/// restarted from (or its own version) below the worker's, and why. A worker whose line of
/// versions is one this copy never followed (a take-over on another branch, whose fence this
/// copy never got: epochs of different branches do not order) is checked against every fence.
/// `version` and `fences` are this copy's; `seen` and `line` the worker's.
fn lost_from(version: u64, fences: &[(u64, u64)], seen: u64, line: u64) -> Option<(u64, String)> {
    if seen > version {
        return Some((version, format!("this copy holds version {version}")));
    }
    let foreign = line != 0 && !fences.iter().any(|f| f.0 == line);
    fences
        .iter()
        .filter(|&&(epoch, v)| (foreign || epoch > line) && seen > v)
        .map(|&(epoch, v)| {
            (
                v,
                format!(
                    "this copy's line of versions restarted from version {v} at a take-over \
                     (epoch {epoch}) after the worker's"
                ),
            )
        })
        .min_by_key(|x| x.0)
}

/// The epoch of the key's current line of versions (its last take-over), carried in answers.
fn lineage(key: &KeyState) -> u64 {
    key.fences.last().map_or(0, |f| f.0)
}

impl KeyState {
    fn head(&self) -> Option<usize> {
        self.chain.first().copied()
    }
}

/// A worker's request that cannot be answered yet.
#[derive(Clone, Copy)]
struct Waiting {
    from: usize,
    h: PsHeader,
    k: usize,
    since: Instant,
    /// Pull: `None`; push: the version whose visibility answers it.
    need: Option<u64>,
    /// Push: what the answer will say.
    status: PushStatus,
}

/// What a timer is for; when it fires its handler looks at the state again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// A waiting request's deadline: find the workers it waits for.
    Requests,
    /// Key k's oldest update in flight: a member that has not acked it is dropped.
    Inflight(usize),
    /// Key k's take-over probe ends.
    Probe(usize),
    /// Ping the servers dropped from chains, to re-admit them.
    Rejoin,
    /// Give up waiting for the other servers' `Bye`.
    Bye,
}

/// A deadline heap; entries are hints (a handler checks whether its deadline really passed).
#[derive(Default)]
struct Timers {
    heap: BinaryHeap<Reverse<(Instant, Timer)>>,
}

impl Timers {
    fn at(&mut self, when: Instant, t: Timer) {
        self.heap.push(Reverse((when, t)));
    }
    fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((i, _))| *i)
    }
    fn due(&mut self, now: Instant) -> Vec<Timer> {
        let mut out = Vec::new();
        while let Some(Reverse((i, t))) = self.heap.peek().copied() {
            if i > now {
                break;
            }
            self.heap.pop();
            if !out.contains(&t) {
                out.push(t);
            }
        }
        out
    }
}

/// One server rank; run it with [`serve`](Self::serve) on its own thread.
pub struct PsServer {
    keys: Vec<KeyState>,
    local: HashMap<u32, usize>,
    /// Every key's chain by the builder (to tell a key held elsewhere from an unknown one).
    nkeys: usize,
    workers: Vec<usize>,
    mode: Mode,
    backups: usize,
    rule: Arc<dyn UpdateRule>,
    kernel: UpdateKernel,
    report: ServerReport,
    quorum: usize,
    consistency: Consistency,
    server_count: usize,
    timeout: Duration,
    /// Workers declared failed (they rejoin when they send again).
    failed: BTreeSet<usize>,
    /// Workers still connected (not done, link open).
    connected: Vec<usize>,
    /// Per worker: the highest request number seen.
    last_req: Vec<u64>,
    /// Servers whose link closed.
    dead: BTreeSet<usize>,
    /// Servers dropped from a chain while alive (maybe cut off): pinged to re-admit them.
    /// With the time before which each is not re-admitted: a member dropped again and again
    /// (acking just past the deadline, say) waits longer each time, so it cannot make the head
    /// transfer the whole state on every update.
    removed: BTreeMap<usize, Instant>,
    /// Times each server was dropped from a chain by this one.
    drops: BTreeMap<usize, u32>,
    waiting: Vec<Waiting>,
    /// Requests for keys this server backs up, kept while it probes the head.
    parked: Vec<(usize, PsHeader, Vec<u8>)>,
    timers: Timers,
    checkpoint_dir: Option<PathBuf>,
    /// Shutdown: when `Bye` went out, and who said it.
    bye_sent: Option<Instant>,
    byes: BTreeSet<usize>,
    drain_since: Option<Instant>,
    /// Workers that said they are done.
    dones: usize,
    /// Whether the timer that ends the wait for dropped servers at shutdown is set.
    drain_timer: bool,
    /// The earliest `Timer::Requests` set.
    requests_timer: Option<Instant>,
    /// Whether a `Timer::Rejoin` is set.
    rejoin_armed: bool,
    /// Declared last, so dropped last: the keys' buffers and the update kernel's pipelines go
    /// first, and the communicator, whose engine drops in its turn (`device::lifecycle`), lets
    /// go of the device last, inside that turn. Declared first, it left the device to the
    /// buffers after it, destroyed outside any turn, while another thread may be making one
    /// (the Vulkan loader's race: a SIGSEGV in `libvulkan.so`, seen once in
    /// `tests/ps_checkpoint.rs`).
    comm: Communicator,
}

impl std::fmt::Debug for PsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PsServer")
            .field("comm", &self.comm)
            .field("keys", &self.keys.len())
            .field("workers", &self.workers)
            .field("mode", &self.mode)
            .field("backups", &self.backups)
            .field("quorum", &self.quorum)
            .field("consistency", &self.consistency)
            .finish_non_exhaustive()
    }
}

/// A refusal: its code, a server to ask instead, the reason.
type Refuse = (Refusal, Option<usize>, String);

fn bad(reason: String) -> Refuse {
    (Refusal::BadRequest, None, reason)
}

impl PsServer {
    pub(crate) fn new(
        comm: Communicator,
        shard: Vec<ShardKey>,
        workers: Vec<usize>,
        policy: Policy,
        rule: Arc<dyn UpdateRule>,
    ) -> Result<Self> {
        let Policy {
            mode,
            backups,
            quorum,
            servers: server_count,
            consistency,
            keys: nkeys,
            checkpoint_dir,
            restored,
        } = policy;
        let at = At::rank(comm.rank());
        let kernel = UpdateKernel::new(comm.device(), &rule.wgsl());
        let mut keys = Vec::new();
        let mut local = HashMap::new();
        for s in shard {
            let ShardKey {
                key,
                name,
                init,
                chain,
            } = s;
            if init.len() > kernel.max_elements() {
                return Err(Error::InvalidArgument {
                    at,
                    message: format!(
                        "parameter '{name}' has {} elements; a server updates at most {} at once",
                        init.len(),
                        kernel.max_elements()
                    ),
                });
            }
            let zero = vec![0.0f32; init.len()];
            let (w0, m0, version) = match restored.as_ref().and_then(|r| r.get(&(key as u32))) {
                Some(k) => (k.w.clone(), k.m.clone(), k.version),
                None => (init.clone(), zero.clone(), 0),
            };
            let w = comm.upload(&w0)?.raw().clone();
            let m = comm.upload(&m0)?.raw().clone();
            let acc = comm.upload(&zero)?.raw().clone();
            local.insert(key as u32, keys.len());
            // Sync: a step is a version; a restored key resumes at its version.
            let clock0 = if mode == Mode::Sync { version } else { 0 };
            keys.push(KeyState {
                id: key as u32,
                name,
                count: init.len(),
                w,
                m,
                acc,
                version,
                pushed: vec![false; workers.len()],
                clocks: vec![clock0; workers.len()],
                window: vec![0; workers.len()],
                statics: chain.clone(),
                chain,
                epoch: 0,
                took_over: false,
                cut_off: false,
                last_heard: Instant::now(),
                replica_clock: 0,
                replica_clocks: Vec::new(),
                fences: Vec::new(),
                acked: HashMap::new(),
                inflight: VecDeque::new(),
                committed: version,
                committed_clock: clock0,
                snapshot: None,
                probe: None,
            });
        }
        let timeout = comm.config().timeout;
        Ok(PsServer {
            keys,
            local,
            nkeys,
            last_req: vec![0; workers.len()],
            connected: workers.clone(),
            workers,
            mode,
            backups,
            rule,
            kernel,
            report: ServerReport::default(),
            quorum,
            consistency,
            server_count,
            timeout,
            failed: BTreeSet::new(),
            dead: BTreeSet::new(),
            removed: BTreeMap::new(),
            drops: BTreeMap::new(),
            waiting: Vec::new(),
            parked: Vec::new(),
            timers: Timers::default(),
            checkpoint_dir,
            bye_sent: None,
            byes: BTreeSet::new(),
            drain_since: None,
            dones: 0,
            drain_timer: false,
            requests_timer: None,
            rejoin_armed: false,
            comm,
        })
    }

    /// This server's rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn at(&self) -> At {
        At::rank(self.comm.rank())
    }

    fn me(&self) -> usize {
        self.comm.rank()
    }

    fn event(&mut self, e: String) {
        tracing::info!(rank = self.me(), "{e}");
        // A member that flaps for hours must not grow the report without bound: the first
        // events are kept (they say how it started), the rest counted.
        if self.report.events.len() < MAX_EVENTS {
            self.report.events.push(e);
        } else {
            self.report.events_dropped = self.report.events_dropped.saturating_add(1);
        }
    }

    /// Serves until every worker is done (or gone) and the other servers said so too; returns
    /// what happened and the final parameters.
    ///
    /// A worker whose push a waiting request needs and that misses the deadline is declared
    /// failed (an event in the report); the others carry on while at least the quorum remains,
    /// and the call fails, naming the workers, below it. A failed worker that sends anything
    /// again rejoins at the current step. Without requests waiting, a server waits for its
    /// workers as long as their links are open: serving is its job.
    pub fn serve(mut self) -> Result<ServerReport> {
        let at = self.at();
        loop {
            if self.connected.is_empty() && self.shutdown_ready() {
                break;
            }
            let now = Instant::now();
            let deadline = self
                .timers
                .next()
                .unwrap_or_else(|| deadline_from(now, self.timeout))
                .max(now);
            let mut listen = self.connected.clone();
            listen.extend(self.live_servers());
            match self.comm.link().recv_any(&listen, deadline) {
                Ok((from, frame)) => self.on_frame(from, frame)?,
                // A peer that sent a corrupt frame is as gone as a dead one: the frame is not
                // used (its request may be anything), and nothing tells which call it was.
                Err(LinkError::Corrupt { peer, reason }) => {
                    self.event(format!(
                        "a frame from rank {peer} failed its checks ({reason}): not used, and \
                         rank {peer} is dropped as gone"
                    ));
                    self.on_gone(peer)?
                }
                // A peer that left cleanly is as gone as a dead one.
                Err(LinkError::Gone(p) | LinkError::Exited(p)) => self.on_gone(p)?,
                Err(LinkError::Timeout) => {}
                Err(LinkError::Aborted { from, reason }) => {
                    return Err(Error::PeerAborted {
                        at,
                        peer: from,
                        reason,
                    });
                }
                Err(LinkError::Closed) => return Err(Error::LinkClosed { at, peer: at.rank }),
                // Only sends are unsendable; a receive never says so.
                Err(LinkError::Unsendable(message)) => {
                    return Err(Error::InvalidArgument { at, message });
                }
            }
            self.on_timers()?;
            self.answer()?;
        }
        if self.dones == 0
            && let Some(&peer) = self.report.gone.first()
        {
            // No worker finished with this server: every one went away (or this server was
            // cut off from all of them). Serving failed.
            self.event("every worker's link closed without a word of being done".into());
            return Err(Error::LinkClosed { at, peer });
        }
        for k in 0..self.keys.len() {
            let t = TensorRef::new(&self.keys[k].w, 0, self.keys[k].count, DType::F32);
            let values = self.comm.read::<f32>(t)?;
            let name = self.keys[k].name.clone();
            let d = digest(bytemuck::cast_slice(&values));
            self.report.digests.push((name.clone(), d));
            self.report
                .versions
                .push((name.clone(), self.keys[k].version));
            self.report.params.push((name, values));
        }
        Ok(self.report)
    }

    fn live_servers(&self) -> Vec<usize> {
        let me = self.me();
        (0..self.server_count)
            .filter(|r| *r != me && !self.dead.contains(r))
            .collect()
    }

    /// Every worker is done: true once every key this server heads is held by its whole chain
    /// (and, for a while, once the servers dropped from chains had a chance to rejoin), this
    /// server said `Bye`, and every live server said it too (or stayed silent a deadline).
    fn shutdown_ready(&mut self) -> bool {
        let now = Instant::now();
        let since = *self.drain_since.get_or_insert_with(|| {
            self.timers.at(now, Timer::Rejoin);
            now
        });
        if self.bye_sent.is_none() {
            let me = self.me();
            let settled = self
                .keys
                .iter()
                .all(|k| k.head() != Some(me) || k.inflight.is_empty());
            let waited = now >= deadline_from(since, self.timeout);
            if !settled || (!self.removed.is_empty() && !waited) {
                // Timers drop members that never ack and re-admit those that answer; one more
                // wakes this check when the wait for the dropped ones ends.
                if !waited && !self.drain_timer {
                    self.drain_timer = true;
                    self.timers
                        .at(deadline_from(since, self.timeout), Timer::Rejoin);
                }
                return false;
            }
            for s in self.live_servers() {
                self.send(s, PsHeader::new(Kind::Bye, me, 0, 0, 0), Vec::new());
            }
            self.bye_sent = Some(now);
            self.timers.at(deadline_from(now, self.timeout), Timer::Bye);
        }
        let live = self.live_servers();
        if live.iter().all(|s| self.byes.contains(s)) {
            return true;
        }
        let sent = self.bye_sent.unwrap_or(now);
        if now >= deadline_from(sent, self.timeout) {
            let silent: Vec<usize> = live
                .into_iter()
                .filter(|s| !self.byes.contains(s))
                .collect();
            self.event(format!(
                "server rank(s) {silent:?} said nothing at shutdown within {:?}: leaving",
                self.timeout
            ));
            return true;
        }
        false
    }

    // ----- frames -----

    fn on_frame(&mut self, from: usize, frame: Frame) -> Result<()> {
        let Some(h) = PsHeader::decode(&frame.header) else {
            if self.worker_index(from).is_some() {
                self.refuse_raw(from, None, bad("malformed header".into()));
            }
            return Ok(());
        };
        if from < self.server_count {
            return self.on_server_frame(from, h, frame.payload);
        }
        let Some(widx) = self.worker_index(from) else {
            // Not a rank of this parameter server's group: nothing to serve.
            self.report.refused += 1;
            return Ok(());
        };
        if h.kind() == Some(Kind::Ping) {
            // A worker waiting for an answer checks that this server is alive: no state.
            let mut pong = PsHeader::new(Kind::Pong, self.me(), 0, 0, 0);
            pong.req = h.req;
            self.send(from, pong, Vec::new());
            return Ok(());
        }
        self.on_request(from, widx, h, frame.payload, true)
    }

    /// A worker's request; `fresh` is false for a parked one looked at again (its number was
    /// checked when it came).
    fn on_request(
        &mut self,
        from: usize,
        widx: usize,
        h: PsHeader,
        payload: Vec<u8>,
        fresh: bool,
    ) -> Result<()> {
        if let Err(r) = self.check_request(from, widx, &h, &payload, fresh) {
            self.refuse_raw(from, Some(&h), r);
            return Ok(());
        }
        let held = self.waiting.iter().filter(|w| w.from == from).count()
            + self.parked.iter().filter(|p| p.0 == from).count();
        if fresh && held >= MAX_HELD {
            // A worker waits for each answer; this many at once is a bug or an attack, and
            // holding them all would grow without bound.
            let reason = format!(
                "{held} requests from rank {from} are already waiting here (at most {MAX_HELD})"
            );
            self.refuse_raw(from, Some(&h), bad(reason));
            return Ok(());
        }
        if fresh {
            self.last_req[widx] = h.req;
            // A request that passed every check from a worker declared failed brings it back.
            if self.failed.remove(&from) {
                let v = self.keys.iter().map(|k| k.version).max().unwrap_or(0);
                self.event(format!(
                    "worker rank {from} came back and rejoined at version {v}"
                ));
            }
        }
        let Some(kind) = h.kind() else {
            return Ok(());
        };
        match kind {
            Kind::Done => {
                self.dones += 1;
                self.connected.retain(|&w| w != from);
                self.failed.remove(&from);
                self.settle()?;
                return Ok(());
            }
            Kind::Checkpoint => return self.checkpoint_request(from, &h),
            _ => {}
        }
        let k = self.local[&h.key];
        if self.keys[k].head() != Some(self.me()) {
            // Held while this member finds out whether it should answer for the key; served,
            // redirected or refused when it knows.
            self.parked.push((from, h, payload));
            return self.consider_take_over(k);
        }
        if self.is_behind(&h, k) {
            self.refuse_behind(from, &h, k);
            return Ok(());
        }
        match kind {
            Kind::Push => self.push(from, widx, k, &h, &payload),
            Kind::Pull => {
                self.wait(Waiting {
                    from,
                    h,
                    k,
                    since: Instant::now(),
                    need: None,
                    status: PushStatus::Applied,
                });
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Every field of a worker's request, before it changes anything.
    fn check_request(
        &self,
        from: usize,
        widx: usize,
        h: &PsHeader,
        payload: &[u8],
        fresh: bool,
    ) -> std::result::Result<(), Refuse> {
        if h.rank as usize != from {
            return Err(bad(format!(
                "the frame says it is from rank {}, but it came from rank {from}",
                h.rank
            )));
        }
        let kind = h
            .kind()
            .ok_or_else(|| bad(format!("unknown request kind {}", h.kind)))?;
        if !matches!(
            kind,
            Kind::Push | Kind::Pull | Kind::Done | Kind::Checkpoint
        ) {
            return Err(bad(format!("{kind:?} is not a worker's request")));
        }
        if h.req == 0 {
            return Err(bad("a request needs a number above 0".into()));
        }
        if fresh && h.req <= self.last_req[widx] {
            return Err((
                Refusal::Replayed,
                None,
                format!(
                    "request number {} is not above the last one from rank {from} ({}): a replay",
                    h.req, self.last_req[widx]
                ),
            ));
        }
        if matches!(kind, Kind::Done | Kind::Checkpoint) {
            return Ok(());
        }
        if h.key as usize >= self.nkeys {
            return Err(bad(format!(
                "key {} does not exist ({} keys)",
                h.key, self.nkeys
            )));
        }
        let Some(&k) = self.local.get(&h.key) else {
            return Err((
                Refusal::NotHere,
                None,
                format!("server rank {} does not hold key {}", self.me(), h.key),
            ));
        };
        let key = &self.keys[k];
        if h.dtype != F32 {
            return Err(bad(format!(
                "'{}' holds f32 values; the request's dtype code is {}",
                key.name, h.dtype
            )));
        }
        let what = if kind == Kind::Push { "push" } else { "pull" };
        if h.count as usize != key.count {
            return Err(bad(format!(
                "{what} of {} values for '{}', which has {}",
                h.count, key.name, key.count
            )));
        }
        if kind == Kind::Pull && !payload.is_empty() {
            return Err(bad(format!(
                "a pull carries no payload; this pull of '{}' carries {} bytes",
                key.name,
                payload.len()
            )));
        }
        if kind == Kind::Push && payload.len() != key.count.saturating_mul(4) {
            return Err(bad(if payload.len().is_multiple_of(4) {
                format!(
                    "push of {} values for '{}', which has {}",
                    payload.len() / 4,
                    key.name,
                    key.count
                )
            } else {
                format!(
                    "push of {} bytes for '{}', not a whole number of f32 values (it has {})",
                    payload.len(),
                    key.name,
                    key.count
                )
            }));
        }
        if kind == Kind::Push {
            // Bounded here, before a member would probe its head or take over for it; the head
            // checks the step against the mode in `push`.
            let base = match self.mode {
                Mode::Sync => key.version,
                _ => worker_clock(key, widx),
            };
            let limit = base.saturating_add(MAX_AHEAD);
            if h.step > limit {
                return Err(bad(format!(
                    "push of '{}' for step {}, past step {limit}, the furthest this worker can be at",
                    key.name, h.step
                )));
            }
        }
        if kind == Kind::Pull {
            // A pull waits for the pushes of the steps before it; one for a step no worker can
            // reach yet would wait on everyone and get them declared failed. An async pull
            // never waits (`ready`): a worker may pull a key it pushes only some steps (a
            // sparse one), or never (a frozen one), at the step its other keys reached. So it
            // is bounded as a push is, by the furthest this server knows the worker to be on
            // any key it holds; a step past that by more than `MAX_AHEAD` is still a bad
            // request.
            let head = key.head() == Some(self.me()) && !key.took_over;
            let (base, ahead) = match self.mode {
                Mode::Sync => (key.version, if head { 1 } else { MAX_AHEAD }),
                Mode::BoundedStaleness(_) => {
                    (worker_clock(key, widx), if head { 1 } else { MAX_AHEAD })
                }
                Mode::Async => (
                    self.keys
                        .iter()
                        .map(|k| worker_clock(k, widx))
                        .max()
                        .unwrap_or(0),
                    MAX_AHEAD,
                ),
            };
            let limit = base.saturating_add(ahead);
            if h.step > limit {
                return Err(bad(format!(
                    "pull of '{}' for step {}, past step {limit}, the furthest this worker can be at",
                    key.name, h.step
                )));
            }
        }
        Ok(())
    }

    /// Under `Strong`: whether the worker was answered with more than this copy of key `k`
    /// holds; whatever this server did with the request (answer it, take over for it) would
    /// hand the worker older parameters as current.
    fn is_behind(&self, h: &PsHeader, k: usize) -> bool {
        self.consistency == Consistency::Strong && behind(&self.keys[k], h)
    }

    fn refuse_behind(&mut self, to: usize, h: &PsHeader, k: usize) {
        let key = &self.keys[k];
        let (version, why) = lost_from(key.version, &key.fences, h.version, h.epoch)
            .unwrap_or((key.version, String::new()));
        let reason = format!(
            "server rank {}: '{}': this worker was answered with version {}, but {why}: updates \
             lost",
            self.me(),
            key.name,
            h.version
        );
        self.refuse_versioned(to, h, (Refusal::Behind, None, reason), version);
    }

    /// A refusal that carries this server's version of the key.
    fn refuse_versioned(&mut self, to: usize, request: &PsHeader, r: Refuse, version: u64) {
        let (code, hint, reason) = r;
        let mut h = PsHeader::new(Kind::Refused, self.me(), request.key as usize, 0, 0);
        (h.step, h.req, h.version) = (request.step, request.req, version);
        h.status = code as u32;
        h.hint = hint.map_or(NO_RANK, |x| x as u32);
        self.report.refused += 1;
        self.send(to, h, reason.into_bytes());
    }

    /// Sends a refusal for `request` (echoing its number) and counts it.
    fn refuse_raw(&mut self, to: usize, request: Option<&PsHeader>, r: Refuse) {
        let (code, hint, reason) = r;
        let key = request.map_or(0, |h| h.key as usize);
        let mut h = PsHeader::new(Kind::Refused, self.me(), key, 0, 0);
        if let Some(q) = request {
            (h.step, h.req) = (q.step, q.req);
        }
        h.status = code as u32;
        h.hint = hint.map_or(NO_RANK, |x| x as u32);
        self.report.refused += 1;
        self.send(to, h, reason.into_bytes());
    }

    /// Sends a frame; a peer that is gone cannot be answered (that is its loss, not this
    /// server's), and its going is seen by the receive loop.
    fn send(&self, to: usize, h: PsHeader, payload: Vec<u8>) {
        let _ = self.comm.link().send(
            to,
            Frame {
                header: h.encode(),
                payload,
            },
        );
    }

    fn worker_index(&self, rank: usize) -> Option<usize> {
        self.workers.iter().position(|&w| w == rank)
    }

    fn wait(&mut self, w: Waiting) {
        self.arm_requests(deadline_from(w.since, self.timeout));
        self.waiting.push(w);
    }

    /// Sets the requests' timer for `when` unless one fires earlier: one timer serves every
    /// waiting request.
    fn arm_requests(&mut self, when: Instant) {
        if self.requests_timer.is_none_or(|t| t > when) {
            self.requests_timer = Some(when);
            self.timers.at(when, Timer::Requests);
        }
    }

    // ----- pushes and updates -----

    fn push(
        &mut self,
        from: usize,
        widx: usize,
        k: usize,
        h: &PsHeader,
        payload: &[u8],
    ) -> Result<()> {
        let deadline = deadline_after(self.timeout);
        let count = self.keys[k].count;
        let acc_buf = self.keys[k].acc.clone();
        let acc = TensorRef::new(&acc_buf, 0, count, DType::F32);
        match self.mode {
            Mode::Sync => {
                let key = &self.keys[k];
                if h.step < key.version {
                    self.report.late += 1;
                    self.push_ack(from, h, PushStatus::Late);
                    return Ok(());
                }
                if h.step > key.version {
                    let skip = key.took_over
                        && self.consistency == Consistency::Eventual
                        && h.step - key.version <= MAX_SKIP;
                    if !skip {
                        let reason = format!(
                            "push for step {} while step {} is being aggregated (pull first)",
                            h.step, key.version
                        );
                        self.refuse_raw(from, Some(h), bad(reason));
                        return Ok(());
                    }
                    // Under Eventual the old head applied steps this replica never got: the
                    // workers are past them. Skip ahead; the workers count what was lost.
                    let from_version = key.version;
                    let name = key.name.clone();
                    self.event(format!(
                        "'{name}' skipped from version {from_version} to {} after the take-over (lost)",
                        h.step
                    ));
                    let key = &mut self.keys[k];
                    key.version = h.step;
                    key.pushed.iter_mut().for_each(|p| *p = false);
                    self.comm
                        .fold_now(&vec![0u8; 4 * count], acc, Combine::Copy, deadline)?;
                }
                if self.keys[k].pushed[widx] {
                    // Answered, like the first, once the step's update is held.
                    self.report.duplicates += 1;
                    self.wait(Waiting {
                        from,
                        h: *h,
                        k,
                        since: Instant::now(),
                        need: Some(h.step.saturating_add(1)),
                        status: PushStatus::Duplicate,
                    });
                    return Ok(());
                }
                self.comm.fold_now(payload, acc, Combine::Sum, deadline)?;
                let key = &mut self.keys[k];
                key.pushed[widx] = true;
                key.clocks[widx] = key.clocks[widx].max(h.step.saturating_add(1));
                let need = h.step.saturating_add(1);
                self.wait(Waiting {
                    from,
                    h: *h,
                    k,
                    since: Instant::now(),
                    need: Some(need),
                    status: PushStatus::Applied,
                });
                self.try_apply_sync(k)?;
            }
            Mode::BoundedStaleness(_) | Mode::Async => {
                let key = &self.keys[k];
                let clock = key.clocks[widx];
                if h.step >= clock.saturating_add(MAX_AHEAD) {
                    let reason = format!(
                        "push for step {} is more than {MAX_AHEAD} steps past this worker's last ({})",
                        h.step,
                        clock.saturating_sub(1)
                    );
                    self.refuse_raw(from, Some(h), bad(reason));
                    return Ok(());
                }
                if h.step < clock {
                    let back = clock - 1 - h.step;
                    if back >= WINDOW {
                        let reason = format!(
                            "push for step {} is more than {WINDOW} steps older than this worker's last ({})",
                            h.step,
                            clock - 1
                        );
                        self.refuse_raw(from, Some(h), bad(reason));
                        return Ok(());
                    }
                    if key.window[widx] & (1u64 << back) != 0 {
                        // Applied in some version up to the current one: answered once that is
                        // held.
                        self.report.duplicates += 1;
                        let need = key.version;
                        self.wait(Waiting {
                            from,
                            h: *h,
                            k,
                            since: Instant::now(),
                            need: Some(need),
                            status: PushStatus::Duplicate,
                        });
                        return Ok(());
                    }
                }
                self.comm.fold_now(payload, acc, Combine::Sum, deadline)?;
                let key = &mut self.keys[k];
                if h.step < clock {
                    key.window[widx] |= 1u64 << (clock - 1 - h.step);
                } else {
                    let shift = h.step - clock + 1;
                    key.window[widx] = if shift >= WINDOW {
                        0
                    } else {
                        key.window[widx] << shift
                    } | 1;
                    key.clocks[widx] = h.step.saturating_add(1);
                }
                let n = self.workers.len() as f32;
                self.apply(k, 1.0 / n)?;
                let need = self.keys[k].version;
                self.wait(Waiting {
                    from,
                    h: *h,
                    k,
                    since: Instant::now(),
                    need: Some(need),
                    status: PushStatus::Applied,
                });
            }
        }
        Ok(())
    }

    fn push_ack(&self, to: usize, request: &PsHeader, status: PushStatus) {
        let mut h = PsHeader::new(
            Kind::PushAck,
            self.me(),
            request.key as usize,
            request.step,
            0,
        );
        h.req = request.req;
        // The version that holds the push (held by the chain under `Strong`): the worker counts
        // it as seen, so a replica that later answers with less is caught.
        if let Some(&k) = self.local.get(&request.key) {
            h.version = self.readable(k).map_or(0, |(v, _)| v);
            h.epoch = lineage(&self.keys[k]);
        }
        h.status = status as u32;
        self.send(to, h, Vec::new());
    }

    /// The workers whose pushes count: connected and not declared failed.
    fn counted(&self) -> Vec<usize> {
        self.connected
            .iter()
            .copied()
            .filter(|w| !self.failed.contains(w))
            .collect()
    }

    /// Sync: applies every key whose step now has all the pushes it needs (after workers were
    /// declared failed or left).
    fn settle(&mut self) -> Result<()> {
        if self.mode != Mode::Sync {
            return Ok(());
        }
        for k in 0..self.keys.len() {
            if self.keys[k].head() == Some(self.me()) {
                self.try_apply_sync(k)?;
            }
        }
        Ok(())
    }

    /// Sync: applies key `k`'s step once the workers still counted have pushed it, less the
    /// backups; the gradient is the mean of every push folded in.
    fn try_apply_sync(&mut self, k: usize) -> Result<()> {
        let counted = self.counted();
        let required = counted.len().saturating_sub(self.backups).max(1);
        let key = &self.keys[k];
        let folded = key.pushed.iter().filter(|p| **p).count();
        let got = counted
            .iter()
            .filter(|&&r| self.worker_index(r).is_some_and(|i| key.pushed[i]))
            .count();
        if folded > 0 && (got >= required || counted.is_empty()) {
            self.apply(k, 1.0 / folded as f32)?;
            self.keys[k].pushed.iter_mut().for_each(|p| *p = false);
        }
        Ok(())
    }

    /// Applies the accumulated gradient to key `k` (the kernel zeroes the accumulator), then
    /// sends the new state down the chain.
    fn apply(&mut self, k: usize, scale: f32) -> Result<()> {
        let at = self.at();
        let deadline = deadline_after(self.timeout);
        let key = &self.keys[k];
        let idx = self.kernel.apply(
            self.comm.device(),
            (&key.w, &key.m, &key.acc),
            key.count,
            scale,
            self.rule.hyper(),
        );
        self.comm
            .device()
            .wait_submission(&idx, deadline)
            .map_err(|e| crate::device::wait_error(at, e))?;
        self.comm.device().check(at)?;
        self.keys[k].version = self.keys[k].version.saturating_add(1);
        self.report.applied += 1;
        // Servers dropped from chains are asked again with every update (and by the rejoin
        // timer when idle): one that answers after a partition heals rejoins at once.
        self.ping_removed();
        if self.keys[k].chain.len() > 1 {
            self.replicate(k, 0)
        } else {
            let key = &mut self.keys[k];
            key.committed = key.version;
            key.snapshot = None;
            Ok(())
        }
    }

    /// The slowest counted worker's clock for key `k` (every step below it has been pushed).
    fn min_clock(&self, k: usize) -> u64 {
        self.connected
            .iter()
            .filter(|w| !self.failed.contains(w))
            .filter_map(|&r| self.worker_index(r))
            .map(|i| self.keys[k].clocks[i])
            .min()
            .unwrap_or(u64::MAX)
    }

    // ----- replication -----

    /// Sends key `k`'s state to its successor in the chain, tracked until every member acks.
    fn replicate(&mut self, k: usize, flags: u32) -> Result<()> {
        let deadline = deadline_after(self.timeout);
        let me = self.me();
        let clock = self.min_clock(k);
        let key = &self.keys[k];
        let Some(&next) = key.chain.get(1) else {
            return Ok(());
        };
        let (wb, mb, count) = (key.w.clone(), key.m.clone(), key.count);
        let w = self
            .comm
            .read_now(TensorRef::new(&wb, 0, count, DType::F32), deadline)?;
        let m = self
            .comm
            .read_now(TensorRef::new(&mb, 0, count, DType::F32), deadline)?;
        let key = &mut self.keys[k];
        // `step` carries the number of fences at the payload's end.
        let mut h = PsHeader::new(
            Kind::Replicate,
            me,
            key.id as usize,
            key.fences.len() as u64,
            count,
        );
        h.version = key.version;
        h.epoch = key.epoch;
        h.clock = clock;
        h.digest = digest(&w);
        h.status = flags;
        h.hint = key.chain.len() as u32;
        let mut payload = Vec::with_capacity(w.len() + m.len() + 4 * key.chain.len());
        payload.extend_from_slice(&w);
        payload.extend_from_slice(&m);
        for &r in &key.chain {
            payload.extend_from_slice(&(r as u32).to_le_bytes());
        }
        // Each worker's clock and dedupe window, so that a member taking over drops a push it
        // already has (a worker re-sends its last one when it fails over).
        for (c, w) in key.clocks.iter().zip(&key.window) {
            payload.extend_from_slice(&c.to_le_bytes());
            payload.extend_from_slice(&w.to_le_bytes());
        }
        for (e, v) in &key.fences {
            payload.extend_from_slice(&e.to_le_bytes());
            payload.extend_from_slice(&v.to_le_bytes());
        }
        let sent = deadline_after(self.timeout);
        let strong = self.consistency == Consistency::Strong;
        // One timer per key, for its oldest update; its handler sets the next.
        let arm = key.inflight.is_empty();
        key.inflight.push_back(Inflight {
            version: key.version,
            deadline: sent,
            // Only `Strong` answers from a committed copy; `Eventual` keeps none (its head
            // answers at once, and a slow member would otherwise pile up copies).
            w: if strong { w } else { Vec::new() },
            clock,
        });
        if arm {
            self.timers.at(sent, Timer::Inflight(k));
        }
        self.send(next, h, payload);
        Ok(())
    }

    /// Moves key `k`'s commit point to the lowest version every member acknowledged.
    fn advance_commit(&mut self, k: usize) {
        let key = &mut self.keys[k];
        let low = key
            .chain
            .iter()
            .skip(1)
            .map(|m| key.acked.get(m).copied().unwrap_or(0))
            .min()
            .unwrap_or(key.version);
        while key.inflight.front().is_some_and(|f| f.version <= low) {
            if let Some(f) = key.inflight.pop_front()
                && f.version == low
                && f.version > key.committed
            {
                key.committed = f.version;
                key.committed_clock = f.clock;
                // `Eventual` keeps no copy (answers come from the device).
                key.snapshot = (!f.w.is_empty()).then_some((f.version, f.w));
            }
        }
    }

    fn on_server_frame(&mut self, from: usize, h: PsHeader, payload: Vec<u8>) -> Result<()> {
        if h.rank as usize != from || h.kind().is_none() {
            return Ok(());
        }
        match h.kind() {
            Some(Kind::Ping) => {
                self.send(
                    from,
                    PsHeader::new(Kind::Pong, self.me(), 0, 0, 0),
                    Vec::new(),
                );
                Ok(())
            }
            Some(Kind::Pong) => {
                // A dropped server that answers a ping is reachable again: re-admit it.
                if self
                    .removed
                    .get(&from)
                    .is_some_and(|&t| t <= Instant::now())
                {
                    self.removed.remove(&from);
                    self.readmit(from)?;
                }
                self.on_pong(from);
                Ok(())
            }
            Some(Kind::Bye) => {
                self.byes.insert(from);
                Ok(())
            }
            Some(Kind::Claim) => {
                self.on_claim(from, &h);
                Ok(())
            }
            Some(Kind::ClaimAck) => self.on_claim_ack(from, &h),
            Some(Kind::ReplicaAck) => {
                self.on_ack(from, &h);
                Ok(())
            }
            Some(Kind::Replicate) => self.on_replica(from, &h, &payload),
            _ => Ok(()),
        }
    }

    fn on_ack(&mut self, from: usize, h: &PsHeader) {
        let me = self.me();
        let Some(&k) = self.local.get(&h.key) else {
            return;
        };
        let key = &mut self.keys[k];
        if key.head() != Some(me)
            || h.epoch != key.epoch
            || h.version > key.version
            || !key.chain.contains(&from)
        {
            return; // an ack from before a change of chain, or not for this head
        }
        let e = key.acked.entry(from).or_insert(0);
        *e = (*e).max(h.version);
        self.advance_commit(k);
    }

    /// Every field of a replica, before it changes anything; returns the chain it carries.
    fn check_replica(
        &self,
        from: usize,
        h: &PsHeader,
        payload: &[u8],
    ) -> Option<(usize, Vec<usize>)> {
        let me = self.me();
        let &k = self.local.get(&h.key)?;
        let key = &self.keys[k];
        if h.count as usize != key.count || h.dtype != F32 {
            return None;
        }
        let members = h.hint as usize;
        if members == 0 || members > self.server_count {
            return None;
        }
        let state = key.count.checked_mul(8)?;
        if h.step > MAX_FENCES as u64 {
            return None;
        }
        let fences = usize::try_from(h.step).ok()?;
        let tail = self.workers.len().checked_add(fences)?.checked_mul(16)?;
        let chain_end = state.checked_add(members.checked_mul(4)?)?;
        if payload.len() != chain_end.checked_add(tail)? {
            return None;
        }
        let chain: Vec<usize> = payload[state..chain_end]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
            .collect();
        let distinct: BTreeSet<usize> = chain.iter().copied().collect();
        let pos = chain.iter().position(|&r| r == me)?;
        if distinct.len() != chain.len()
            || chain
                .iter()
                .any(|&r| r >= self.server_count || !key.statics.contains(&r))
            || pos == 0
            || (chain[pos - 1] != from)
        {
            return None;
        }
        Some((k, chain))
    }

    /// A replica from the member before this one: apply it, pass it on, ack it to the head.
    fn on_replica(&mut self, from: usize, h: &PsHeader, payload: &[u8]) -> Result<()> {
        let me = self.me();
        let Some((k, chain)) = self.check_replica(from, h, payload) else {
            self.event(format!(
                "dropped a malformed replica of key {} from server rank {from}",
                h.key
            ));
            return Ok(());
        };
        let head = chain[0];
        let key = &self.keys[k];
        if h.epoch < key.epoch {
            return Ok(()); // from a chain that has changed since
        }
        if key.head() == Some(me) {
            // Two servers answer for the key (after a take-over or a partition): a newer
            // epoch wins, then the higher version, then the server earlier in the chain.
            let pos = |r: usize| {
                key.statics
                    .iter()
                    .position(|&x| x == r)
                    .unwrap_or(usize::MAX)
            };
            let theirs = h.epoch > key.epoch
                || (h.epoch == key.epoch
                    && (h.version > key.version
                        || (h.version == key.version && pos(head) < pos(me))));
            if !theirs {
                return Ok(());
            }
            let name = key.name.clone();
            self.event(format!(
                "server rank {me} yielded '{name}' to rank {head} at version {}",
                h.version
            ));
            self.keys[k].took_over = false;
            self.keys[k].cut_off = false;
            // Requests this server held for the key go to the new head.
            self.redirect(k, head);
        }
        let deadline = deadline_after(self.timeout);
        let count = self.keys[k].count;
        let (wb, mb) = (self.keys[k].w.clone(), self.keys[k].m.clone());
        let pos = chain.iter().position(|&r| r == me).unwrap_or(0);
        // Only the tail is (re)admitted; the members before it pass the flag on.
        let joining = h.status & JOIN != 0 && pos + 1 == chain.len();
        // A member (re)admitted compares digests and says so; it copies the state either way
        // (the optimiser state is not in the digest).
        let current = if joining && h.version == self.keys[k].version {
            let mine = self
                .comm
                .read_now(TensorRef::new(&wb, 0, count, DType::F32), deadline)?;
            digest(&mine) == h.digest
        } else {
            h.version == self.keys[k].version && h.epoch == self.keys[k].epoch
        };
        if !current || joining {
            let (w, rest) = payload.split_at(4 * count);
            let m = &rest[..4 * count];
            self.comm.fold_now(
                w,
                TensorRef::new(&wb, 0, count, DType::F32),
                Combine::Copy,
                deadline,
            )?;
            self.comm.fold_now(
                m,
                TensorRef::new(&mb, 0, count, DType::F32),
                Combine::Copy,
                deadline,
            )?;
        }
        if joining {
            let name = self.keys[k].name.clone();
            self.event(format!(
                "server rank {me} rejoined '{name}' at version {} ({})",
                h.version,
                if current {
                    "digests matched"
                } else {
                    "state transferred"
                }
            ));
        }
        let key = &mut self.keys[k];
        key.version = h.version;
        key.epoch = h.epoch;
        key.chain = chain.clone();
        key.last_heard = Instant::now();
        key.replica_clock = h.clock;
        // Lengths were checked in `check_replica`: the clocks, then the fences, end the payload.
        let pairs = |bytes: &[u8]| -> Vec<(u64, u64)> {
            bytes
                .chunks_exact(16)
                .map(|c| {
                    let (a, b) = c.split_at(8);
                    (
                        u64::from_le_bytes(a.try_into().unwrap_or([0; 8])),
                        u64::from_le_bytes(b.try_into().unwrap_or([0; 8])),
                    )
                })
                .collect()
        };
        let fences_at = payload.len() - 16 * (h.step as usize);
        let clocks_at = fences_at - 16 * self.workers.len();
        key.replica_clocks = pairs(&payload[clocks_at..fences_at]);
        key.fences = pairs(&payload[fences_at..]);
        key.acked.clear();
        key.inflight.clear();
        key.snapshot = None;
        key.probe = None;
        key.committed = h.version;
        if let Some(&next) = chain.get(pos + 1) {
            let mut fwd = *h;
            fwd.rank = me as u32;
            self.send(next, fwd, payload.to_vec());
        }
        let mut ack = PsHeader::new(Kind::ReplicaAck, me, h.key as usize, 0, 0);
        ack.version = h.version;
        ack.epoch = h.epoch;
        self.send(head, ack, Vec::new());
        // Requests parked while this server probed the head: the head is alive.
        self.redirect(k, head);
        Ok(())
    }

    /// Takes out the requests parked for key `id`, in arrival order.
    fn take_parked(&mut self, id: u32) -> Vec<(usize, PsHeader, Vec<u8>)> {
        let (mine, rest) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|(_, h, _)| h.key == id);
        self.parked = rest;
        mine
    }

    /// Refuses every request held here for key `k`, pointing the workers to `head`.
    fn redirect(&mut self, k: usize, head: usize) {
        let id = self.keys[k].id;
        let reason = format!(
            "server rank {head} answers for '{}' now: ask it",
            self.keys[k].name
        );
        let mut held: Vec<(usize, PsHeader)> = Vec::new();
        self.waiting.retain(|w| {
            let keep = w.k != k;
            if !keep {
                held.push((w.from, w.h));
            }
            keep
        });
        held.extend(
            self.take_parked(id)
                .into_iter()
                .map(|(from, h, _)| (from, h)),
        );
        for (from, h) in held {
            self.refuse_raw(
                from,
                Some(&h),
                (Refusal::AskOther, Some(head), reason.clone()),
            );
        }
    }

    /// Drops `member` from key `k`'s chain (a new epoch) and sends the state to the new
    /// successor; `alive` members are pinged later to re-admit them.
    fn drop_member(&mut self, k: usize, member: usize, why: &str) -> Result<()> {
        let key = &mut self.keys[k];
        if !key.chain.contains(&member) {
            return Ok(());
        }
        key.chain.retain(|&r| r != member);
        key.epoch = key.epoch.saturating_add(1);
        // The members that stay still hold what they acked.
        key.acked.remove(&member);
        key.inflight.clear();
        let (name, chain, epoch) = (key.name.clone(), key.chain.clone(), key.epoch);
        if !self.dead.contains(&member) {
            self.remove_server(member);
        }
        self.event(format!(
            "server rank {member} {why}: dropped from the chain of '{name}' (now {chain:?}, epoch {epoch})"
        ));
        self.restart_chain(k)
    }

    /// After the chain changed: send the state down the new chain, or, alone, commit.
    fn restart_chain(&mut self, k: usize) -> Result<()> {
        if self.keys[k].chain.len() > 1 {
            self.replicate(k, 0)
        } else {
            let clock = self.min_clock(k);
            let key = &mut self.keys[k];
            key.committed = key.version;
            key.committed_clock = clock;
            key.snapshot = None;
            Ok(())
        }
    }

    /// A server dropped from chains answered: every key this server heads and it should hold
    /// takes it back as the tail, by state transfer.
    fn readmit(&mut self, r: usize) -> Result<()> {
        let me = self.me();
        for k in 0..self.keys.len() {
            let key = &mut self.keys[k];
            if key.head() != Some(me) || !key.statics.contains(&r) || key.chain.contains(&r) {
                continue;
            }
            key.chain.push(r);
            key.epoch = key.epoch.saturating_add(1);
            key.inflight.clear();
            let (name, version) = (key.name.clone(), key.version);
            self.event(format!(
                "server rank {r} is reachable again: '{name}' sends it version {version} to rejoin as the tail"
            ));
            self.replicate(k, JOIN)?;
        }
        Ok(())
    }

    /// One rejoin timer at a time, however many servers were dropped.
    fn arm_rejoin(&mut self) {
        if !self.rejoin_armed {
            self.rejoin_armed = true;
            self.timers.at(deadline_after(self.timeout), Timer::Rejoin);
        }
    }

    fn ping_removed(&self) {
        let me = self.me();
        let now = Instant::now();
        for (&r, &after) in &self.removed {
            if after <= now {
                self.send(r, PsHeader::new(Kind::Ping, me, 0, 0, 0), Vec::new());
            }
        }
    }

    /// `r` is out of a chain this server heads but alive: ping it to re-admit it, at once the
    /// first time and after a deadline more for each time it was dropped before (at most 8).
    fn remove_server(&mut self, r: usize) {
        let n = self.drops.entry(r).or_insert(0);
        let wait = self.timeout.saturating_mul((*n).min(8));
        *n = n.saturating_add(1);
        self.removed
            .entry(r)
            .or_insert_with(|| deadline_after(wait));
        self.arm_rejoin();
    }

    fn on_pong(&mut self, from: usize) {
        // A member probing the head: the server before it is alive, so the worker should ask
        // it.
        for k in 0..self.keys.len() {
            let waiting_on = self.keys[k]
                .probe
                .as_ref()
                .is_some_and(|p| p.preds.contains(&from));
            if waiting_on {
                self.keys[k].probe = None;
                self.redirect(k, from);
            }
        }
    }

    // ----- take-over -----

    /// A worker asks this server for a key it only backs up: it could not reach the head.
    /// `Ok(None)` with this server head: take over done; `Ok(None)` otherwise: probing, the
    /// request is parked; `Ok(Some(refusal))`: refuse it.
    fn consider_take_over(&mut self, k: usize) -> Result<()> {
        let me = self.me();
        if self.keys[k].probe.is_some() {
            return Ok(());
        }
        let key = &self.keys[k];
        let pos = key.chain.iter().position(|&r| r == me).unwrap_or(0);
        let live = |rs: &[usize]| -> BTreeSet<usize> {
            rs.iter()
                .copied()
                .filter(|p| !self.dead.contains(p))
                .collect()
        };
        let preds = live(&key.chain[..pos]);
        let succs = live(&key.chain[pos + 1..]);
        let (id, epoch, version) = (key.id as usize, key.epoch, key.version);
        let until = deadline_after(self.timeout / 2);
        for &p in &preds {
            self.send(p, PsHeader::new(Kind::Ping, me, 0, 0, 0), Vec::new());
        }
        for &s in &succs {
            let mut h = PsHeader::new(Kind::Claim, me, id, 0, 0);
            (h.epoch, h.version) = (epoch, version);
            self.send(s, h, Vec::new());
        }
        self.keys[k].probe = Some(Probe {
            preds,
            succs,
            until,
            epoch,
        });
        self.timers.at(until, Timer::Probe(k));
        self.probe_check(k, false)
    }

    /// Another server asks to take over a key: agree if this server's chain still holds it
    /// with nothing newer (no later epoch, no higher version), and this server is not the
    /// head itself.
    fn on_claim(&mut self, from: usize, h: &PsHeader) {
        let me = self.me();
        let Some(&k) = self.local.get(&h.key) else {
            return;
        };
        let key = &self.keys[k];
        let ok = key.chain.contains(&from)
            && key.head() != Some(me)
            && key.epoch <= h.epoch
            && key.version <= h.version;
        let mut a = PsHeader::new(Kind::ClaimAck, me, h.key as usize, 0, 0);
        (a.epoch, a.version, a.status) = (key.epoch, key.version, u32::from(ok));
        self.send(from, a, Vec::new());
    }

    fn on_claim_ack(&mut self, from: usize, h: &PsHeader) -> Result<()> {
        let Some(&k) = self.local.get(&h.key) else {
            return Ok(());
        };
        let Some(p) = self.keys[k].probe.as_mut() else {
            return Ok(());
        };
        if !p.succs.remove(&from) {
            return Ok(());
        }
        if h.status == 0 {
            // It holds a newer chain, or is the head: the worker should ask it.
            self.keys[k].probe = None;
            self.redirect(k, from);
            return Ok(());
        }
        p.epoch = p.epoch.max(h.epoch);
        self.probe_check(k, false)
    }

    /// Looks at key `k`'s take-over again: every server before this one gone and every live
    /// one after it agreed: take over. At the deadline with some silent: under `Strong`
    /// refuse (this replica cannot prove its copy is current), under `Eventual` take over cut
    /// off.
    fn probe_check(&mut self, k: usize, timed_out: bool) -> Result<()> {
        let Some(p) = self.keys[k].probe.as_mut() else {
            return Ok(());
        };
        let dead = &self.dead;
        p.preds.retain(|r| !dead.contains(r));
        p.succs.retain(|r| !dead.contains(r));
        let settled = p.preds.is_empty() && p.succs.is_empty();
        if !settled && !timed_out {
            return Ok(());
        }
        let Some(p) = self.keys[k].probe.take() else {
            return Ok(());
        };
        let id = self.keys[k].id;
        let seen = self
            .parked
            .iter()
            .filter(|(_, h, _)| h.key == id && self.is_behind(h, k))
            .map(|(_, h, _)| h.version)
            .max();
        if settled && let Some(seen) = seen {
            // Every server before this one is gone and the rest agree, but a worker was
            // answered with more than this copy holds: those updates died with the head. That
            // worker's requests are refused (`Lost`); a claim from one request cannot block the
            // key for the others (a bad frame could claim any version), who are served from
            // here on.
            let name = self.keys[k].name.clone();
            let version = self.keys[k].version;
            self.event(format!(
                "'{name}': the head is gone and a worker was answered with version {seen}, which \
                 this copy (version {version}) cannot hold: updates lost"
            ));
            let mut held = Vec::new();
            let strong = self.consistency == Consistency::Strong;
            let key = &self.keys[k];
            self.parked.retain(|(from, h, _)| {
                let lost = h.key == id && strong && behind(key, h);
                if lost {
                    held.push((*from, *h));
                }
                !lost
            });
            for (from, h) in held {
                self.refuse_behind(from, &h, k);
            }
        }
        if settled {
            self.take_over(k, false, p.epoch)?;
        } else if self.consistency == Consistency::Strong {
            let key = &self.keys[k];
            let reason = format!(
                "server rank {} cannot prove its copy of '{}' (version {}) is current: rank(s) \
                 {:?} before it are unreachable but not known to be dead, and rank(s) {:?} after \
                 it did not agree to its taking over",
                self.me(),
                key.name,
                key.version,
                p.preds,
                p.succs
            );
            let id = key.id;
            for (from, h, _) in self.take_parked(id) {
                self.refuse_raw(from, Some(&h), (Refusal::CannotProve, None, reason.clone()));
            }
            return Ok(());
        } else {
            self.take_over(k, !p.preds.is_empty(), p.epoch)?;
        }
        // The parked requests for the key are served now.
        let id = self.keys[k].id;
        for (from, h, p) in self.take_parked(id) {
            if let Some(widx) = self.worker_index(from) {
                self.on_request(from, widx, h, p, false)?;
            }
        }
        Ok(())
    }

    /// This server answers for key `k` from now on: the servers before it in the chain are
    /// gone (or, `cut_off`, silent under `Eventual`).
    fn take_over(&mut self, k: usize, cut_off: bool, agreed_epoch: u64) -> Result<()> {
        let me = self.me();
        let deadline = deadline_after(self.timeout);
        let key = &self.keys[k];
        let pos = key.chain.iter().position(|&r| r == me).unwrap_or(0);
        let after: Vec<usize> = key.chain[pos + 1..]
            .iter()
            .copied()
            .filter(|r| !self.dead.contains(r))
            .collect();
        // The servers before this one that may be alive (cut off), and those the old head had
        // dropped: all are re-admitted when they answer.
        let statics = key.statics.clone();
        for p in statics {
            if p != me && !self.dead.contains(&p) && !after.contains(&p) {
                self.remove_server(p);
            }
        }
        let replica_clock = self.keys[k].replica_clock;
        let key = &mut self.keys[k];
        key.chain = std::iter::once(me).chain(after).collect();
        key.epoch = key.epoch.max(agreed_epoch).saturating_add(1);
        key.took_over = true;
        // Versions above this one are new updates from here on.
        key.fences.push((key.epoch, key.version));
        if key.fences.len() > MAX_FENCES {
            // Merge the oldest two into the newer epoch with the lower version: a worker older
            // than both is still caught, one between them may be refused when it need not be.
            let second = key.fences.remove(1);
            key.fences[0] = (second.0, key.fences[0].1.min(second.1));
        }
        key.cut_off = cut_off;
        key.acked.clear();
        key.inflight.clear();
        key.snapshot = None;
        key.probe = None;
        // What the members hold is not known until they ack this epoch's state.
        key.committed = if key.chain.len() > 1 { 0 } else { key.version };
        key.pushed.iter_mut().for_each(|p| *p = false);
        // Before any replica carried each worker's own clock, the slowest one's is all there is.
        // After, the per-worker record below is exact; raising every worker to the slowest
        // counted one would also raise a worker declared failed (not counted) past steps it
        // never pushed, and leave its dedupe window behind.
        if key.replica_clocks.len() < key.clocks.len() {
            for c in key.clocks.iter_mut() {
                *c = (*c).max(replica_clock);
            }
        }
        // The head's record of who pushed what, as of the last replica: a push it applied is a
        // duplicate here too.
        for (i, &(c, w)) in key.replica_clocks.iter().enumerate() {
            if i >= key.clocks.len() {
                break;
            }
            if c > key.clocks[i] {
                (key.clocks[i], key.window[i]) = (c, w);
            } else if c == key.clocks[i] {
                key.window[i] |= w;
            }
        }
        let (name, version, chain, epoch) =
            (key.name.clone(), key.version, key.chain.clone(), key.epoch);
        let (acc, count) = (key.acc.clone(), key.count);
        self.comm.fold_now(
            &vec![0u8; 4 * count],
            TensorRef::new(&acc, 0, count, DType::F32),
            Combine::Copy,
            deadline,
        )?;
        self.event(format!(
            "server rank {me} took over '{name}' at version {version} (chain {chain:?}, epoch {epoch}){}",
            if cut_off {
                " (cut off from a head that may be alive: answering stale)"
            } else {
                ""
            }
        ));
        self.restart_chain(k)
    }

    fn on_gone(&mut self, p: usize) -> Result<()> {
        if p < self.server_count {
            if !self.dead.insert(p) {
                return Ok(());
            }
            self.removed.remove(&p);
            self.event(format!("server rank {p} is gone (link closed)"));
            let me = self.me();
            for k in 0..self.keys.len() {
                if self.keys[k].head() == Some(me) {
                    self.drop_member(k, p, "is gone")?;
                } else {
                    self.probe_check(k, false)?;
                }
            }
            return Ok(());
        }
        if self.connected.contains(&p) {
            self.connected.retain(|&w| w != p);
            self.failed.remove(&p);
            self.report.gone.push(p);
            self.event(format!("worker rank {p} is gone (link closed)"));
            self.waiting.retain(|w| w.from != p);
            self.parked.retain(|(from, _, _)| *from != p);
            self.settle()?;
        }
        Ok(())
    }

    // ----- timers -----

    fn on_timers(&mut self) -> Result<()> {
        let now = Instant::now();
        for t in self.timers.due(now) {
            match t {
                Timer::Requests => {
                    if self.requests_timer.is_some_and(|t| t <= now) {
                        self.requests_timer = None;
                    }
                    self.requests_due(now)?
                }
                Timer::Inflight(k) => {
                    let key = &self.keys[k];
                    let Some(f) = key.inflight.front() else {
                        continue;
                    };
                    if f.deadline > now {
                        let d = f.deadline;
                        self.timers.at(d, Timer::Inflight(k));
                        continue;
                    }
                    let v = f.version;
                    let late = key
                        .chain
                        .iter()
                        .skip(1)
                        .copied()
                        .find(|m| key.acked.get(m).copied().unwrap_or(0) < v);
                    match late {
                        Some(m) => {
                            let why = format!(
                                "did not acknowledge version {v} within {:?}",
                                self.timeout
                            );
                            self.drop_member(k, m, &why)?;
                        }
                        None => self.advance_commit(k),
                    }
                }
                Timer::Probe(k) => {
                    if self.keys[k].probe.as_ref().is_some_and(|p| p.until <= now) {
                        self.probe_check(k, true)?;
                    }
                }
                Timer::Rejoin => {
                    self.rejoin_armed = false;
                    self.ping_removed();
                    if !self.removed.is_empty() {
                        self.arm_rejoin();
                    }
                }
                Timer::Bye => {}
            }
        }
        Ok(())
    }

    /// Requests that waited a whole deadline: the workers they wait for are declared failed
    /// (above the quorum), and the requests get a fresh deadline.
    fn requests_due(&mut self, now: Instant) -> Result<()> {
        let at = self.at();
        let due: Vec<Waiting> = self
            .waiting
            .iter()
            .copied()
            .filter(|w| deadline_from(w.since, self.timeout) <= now)
            .collect();
        if due.is_empty() {
            if let Some(first) = self.waiting.iter().map(|w| w.since).min() {
                self.arm_requests(deadline_from(first, self.timeout));
            }
            return Ok(());
        }
        let blockers = self.blocking(&due);
        if !blockers.is_empty() {
            for &b in &blockers {
                self.failed.insert(b);
                self.event(format!(
                    "worker rank {b} missed the {:?} deadline: declared failed",
                    self.timeout
                ));
            }
            let alive = self.counted().len();
            if alive < self.quorum {
                let q = self.quorum;
                self.event(format!(
                    "{alive} workers left, below the quorum of {q}: giving up"
                ));
                return Err(Error::Timeout {
                    at,
                    waiting_on: blockers,
                    waited: self.timeout,
                });
            }
            self.settle()?;
        }
        // The requests that waited start a fresh deadline (what they wait for now is a
        // replication, which has deadlines of its own, or the workers just declared failed).
        for w in self.waiting.iter_mut() {
            if deadline_from(w.since, self.timeout) <= now {
                w.since = now;
            }
        }
        if let Some(first) = self.waiting.iter().map(|w| w.since).min() {
            self.arm_requests(deadline_from(first, self.timeout));
        }
        Ok(())
    }

    /// The workers whose pushes the waiting requests wait for.
    fn blocking(&self, due: &[Waiting]) -> Vec<usize> {
        let mut out = Vec::new();
        for w in due {
            let key = &self.keys[w.k];
            if key.head() != Some(self.me()) {
                continue;
            }
            let step = match w.need {
                Some(v) => v.saturating_sub(1),
                None => w.h.step,
            };
            for r in self.counted() {
                let Some(i) = self.worker_index(r) else {
                    continue;
                };
                let missing = match self.mode {
                    Mode::Sync => step >= key.version && !key.pushed[i],
                    Mode::BoundedStaleness(s) => {
                        w.need.is_none() && key.clocks[i] < step.saturating_sub(s)
                    }
                    Mode::Async => false,
                };
                if missing && !out.contains(&r) {
                    out.push(r);
                }
            }
        }
        out
    }

    // ----- answers -----

    /// The version and clock a request for key `k` may be answered from: the device's, or,
    /// under `Strong` with members, the highest every member holds.
    fn readable(&self, k: usize) -> Option<(u64, u64)> {
        let key = &self.keys[k];
        if self.consistency == Consistency::Strong && key.chain.len() > 1 {
            if key.committed == key.version {
                return Some((key.version, self.min_clock(k)));
            }
            return key
                .snapshot
                .as_ref()
                .filter(|(v, _)| *v == key.committed)
                .map(|_| (key.committed, key.committed_clock));
        }
        Some((key.version, self.min_clock(k)))
    }

    fn ready(&self, w: &Waiting) -> bool {
        let Some((version, clock)) = self.readable(w.k) else {
            return false;
        };
        if let Some(need) = w.need {
            return version >= need;
        }
        match self.mode {
            Mode::Sync => version >= w.h.step || self.counted().is_empty(),
            Mode::BoundedStaleness(s) => clock >= w.h.step.saturating_sub(s),
            Mode::Async => true,
        }
    }

    /// Answers every waiting request that can be answered now.
    fn answer(&mut self) -> Result<()> {
        let me = self.me();
        let mut i = 0;
        while i < self.waiting.len() {
            let w = self.waiting[i];
            if self.keys[w.k].head() != Some(me) {
                // Yielded meanwhile: `redirect` refused these.
                self.waiting.swap_remove(i);
                continue;
            }
            if !self.ready(&w) {
                i += 1;
                continue;
            }
            self.waiting.swap_remove(i);
            if w.need.is_some() {
                self.push_ack(w.from, &w.h, w.status);
            } else {
                self.answer_pull(&w)?;
            }
        }
        Ok(())
    }

    fn answer_pull(&mut self, w: &Waiting) -> Result<()> {
        let Some((version, clock)) = self.readable(w.k) else {
            return Ok(());
        };
        let key = &self.keys[w.k];
        let bytes = match &key.snapshot {
            Some((v, bytes)) if *v == version => bytes.clone(),
            _ => {
                let (wb, count) = (key.w.clone(), key.count);
                let deadline = deadline_after(self.timeout);
                self.comm
                    .read_now(TensorRef::new(&wb, 0, count, DType::F32), deadline)?
            }
        };
        let key = &self.keys[w.k];
        let mut reply = PsHeader::new(
            Kind::Params,
            self.me(),
            w.h.key as usize,
            w.h.step,
            key.count,
        );
        reply.version = version;
        reply.clock = clock;
        reply.req = w.h.req;
        reply.epoch = lineage(&self.keys[w.k]);
        // How many servers hold what is answered: under `Strong` the whole chain (it committed),
        // under `Eventual` only this one is sure. A chain that shrank shows here, not only in
        // the report.
        reply.hint = if self.consistency == Consistency::Strong {
            let key = &self.keys[w.k];
            let members = key
                .chain
                .iter()
                .skip(1)
                .filter(|m| key.acked.get(m).is_some_and(|&a| a >= version))
                .count();
            // At most the servers there are: fits the u32.
            (1 + members) as u32
        } else {
            1
        };
        if key.cut_off {
            let ms = key.last_heard.elapsed().as_millis();
            reply.stale_ms = ms.min(u32::MAX as u128 - 1) as u32;
        } else {
            reply.stale_ms = NOT_STALE;
        }
        self.send(w.from, reply, bytes);
        Ok(())
    }

    // ----- checkpoints -----

    /// Writes this server's shard (every key it holds) to its checkpoint file, atomically.
    fn checkpoint_request(&mut self, from: usize, h: &PsHeader) -> Result<()> {
        let Some(dir) = self.checkpoint_dir.clone() else {
            self.refuse_raw(
                from,
                Some(h),
                (
                    Refusal::Failed,
                    None,
                    "no checkpoint directory was given to the builder".into(),
                ),
            );
            return Ok(());
        };
        let deadline = deadline_after(self.timeout);
        let mut keys = Vec::new();
        for k in 0..self.keys.len() {
            let key = &self.keys[k];
            let (wb, mb, count) = (key.w.clone(), key.m.clone(), key.count);
            let w = self
                .comm
                .read_now(TensorRef::new(&wb, 0, count, DType::F32), deadline)?;
            let m = self
                .comm
                .read_now(TensorRef::new(&mb, 0, count, DType::F32), deadline)?;
            let key = &self.keys[k];
            keys.push(checkpoint::KeySnapshot {
                id: key.id,
                name: key.name.clone(),
                version: key.version,
                w: bytemuck::pod_collect_to_vec(&w),
                m: bytemuck::pod_collect_to_vec(&m),
            });
        }
        let snap = checkpoint::Snapshot {
            rank: self.me() as u32,
            hyper: self.rule.hyper(),
            keys,
        };
        let path = checkpoint::shard_path(&dir, self.me());
        match checkpoint::write_atomic(&path, &snap) {
            Ok(()) => {
                let mut done = PsHeader::new(Kind::CheckpointDone, self.me(), 0, 0, 0);
                done.req = h.req;
                self.send(from, done, Vec::new());
            }
            Err(e) => {
                self.event(format!("checkpoint failed: {e}"));
                self.refuse_raw(from, Some(h), (Refusal::Failed, None, e.to_string()));
            }
        }
        Ok(())
    }
}

/// Worker `widx`'s clock for `key` as this server knows it: its own record where it applied
/// the worker's pushes (the head, or a member that took over), and on a member the head's
/// record its last replica carried, which is where a member's clocks move (its own stay as
/// they were until it takes over: bounding by them alone refused every worker past step
/// `MAX_AHEAD` that failed over to it).
fn worker_clock(key: &KeyState, widx: usize) -> u64 {
    let own = key.clocks.get(widx).copied().unwrap_or(0);
    let replicated = key.replica_clocks.get(widx).map_or(0, |c| c.0);
    own.max(replicated)
}

#[cfg(test)]
mod tests {
    use super::lost_from;

    #[test]
    fn a_worker_ahead_of_the_copy_lost_updates() {
        assert!(lost_from(5, &[], 6, 0).is_some());
        assert!(lost_from(5, &[], 5, 0).is_none());
        assert!(lost_from(5, &[], 0, 0).is_none());
    }

    #[test]
    fn a_take_over_below_what_the_worker_saw_in_an_earlier_line_is_a_loss() {
        // Took over at version 10 in epoch 3, now at 40: a worker that saw 30 before it lost
        // 11..=30 even though 40 > 30.
        let fences = [(3, 10)];
        assert_eq!(lost_from(40, &fences, 30, 0).map(|l| l.0), Some(10));
        // One that saw at most 10 before, or anything in the new line, lost nothing.
        assert!(lost_from(40, &fences, 10, 0).is_none());
        assert!(lost_from(40, &fences, 35, 3).is_none());
    }

    #[test]
    fn a_line_this_copy_never_followed_is_checked_against_every_fence() {
        // The worker's line (epoch 2) was a take-over on another branch; this copy's own
        // take-over has the lower epoch 1: epochs do not order the branches.
        let fences = [(1, 10)];
        assert!(lost_from(31, &fences, 30, 2).is_some());
        assert!(lost_from(31, &fences, 10, 2).is_none());
    }

    #[test]
    fn merged_fences_still_catch_the_older_lines() {
        // (2, 20) and (5, 12) merged into (5, 12): a worker of line 0 or 2 that saw 15 is
        // caught (line 2 over-refused: it saw 15 <= 20 before the second take-over).
        let merged = [(5, 12)];
        assert!(lost_from(50, &merged, 15, 0).is_some());
        assert!(lost_from(50, &merged, 15, 5).is_none());
    }
}
