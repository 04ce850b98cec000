//! A server rank: owns a shard of the parameters on its device, aggregates pushes with the
//! reduce kernel, applies the update rule, and answers pulls when the mode allows.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use wgpu::Buffer;

use super::protocol::{Kind, PsHeader};
use super::{Consistency, Mode, Policy, ShardKey, UpdateRule};
use crate::comm::Communicator;
use crate::deadline::{deadline_after, deadline_from};
use crate::device::TensorRef;
use crate::error::{At, Error, Result};
use crate::kernels::UpdateKernel;
use crate::link::{Frame, LinkError};
use crate::types::{Combine, DType};

/// What a server did, returned when every worker is done.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServerReport {
    /// Updates applied (one per step in `Sync`, one per push otherwise), all keys together.
    pub applied: u64,
    /// Pushes that came after their step's update (backup workers' late gradients), dropped.
    pub late: u64,
    /// Pushes of a (worker, step) already received, refused.
    pub duplicates: u64,
    /// Workers whose link closed before they said they were done.
    pub gone: Vec<usize>,
    /// What happened to the workers, in order (declared failed, rejoined, gone).
    pub events: Vec<String>,
    /// The final parameters of this server's keys.
    pub params: Vec<(String, Vec<f32>)>,
    /// A digest (FNV-1a of the f32 bits) of each final parameter tensor, to check that
    /// replicas agree.
    pub digests: Vec<(String, u64)>,
}

/// FNV-1a over the bytes of `values`.
fn digest(values: &[f32]) -> u64 {
    bytemuck::cast_slice::<f32, u8>(values)
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

struct KeyState {
    /// The key's id among all keys.
    id: u32,
    name: String,
    count: usize,
    w: Buffer,
    m: Buffer,
    acc: Buffer,
    version: u64,
    /// Sync: which workers pushed the step being aggregated (`version`).
    pushed: Vec<bool>,
    /// Per worker: one more than the last step it pushed.
    clocks: Vec<u64>,
    seen: HashSet<(usize, u64)>,
    /// The servers holding the key, primary first.
    chain: Vec<usize>,
    /// Whether this server answers for the key (the first in its chain, or a backup that took
    /// over).
    primary: bool,
    /// Whether it became primary by taking over from a failed one.
    took_over: bool,
    /// When a replica last heard from its primary (a replica, or creation).
    last_heard: Instant,
    /// Set while this server answers for the key cut off from a primary that may be alive
    /// (`Eventual` only).
    cut_off: bool,
    /// The backups this server replicates to, while it is primary.
    backups: Vec<usize>,
}

/// One server rank; run it with [`serve`](Self::serve) on its own thread.
pub struct PsServer {
    comm: Communicator,
    keys: Vec<KeyState>,
    local: HashMap<u32, usize>,
    workers: Vec<usize>,
    mode: Mode,
    backups: usize,
    rule: Arc<dyn UpdateRule>,
    kernel: UpdateKernel,
    report: ServerReport,
    quorum: usize,
    failed: HashSet<usize>,
    /// Workers that said they are done or whose link closed.
    finished: HashSet<usize>,
    consistency: Consistency,
    /// The other servers still reachable.
    servers: Vec<usize>,
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
        } = policy;
        let kernel = UpdateKernel::new(comm.device(), &rule.wgsl());
        let mut keys = Vec::new();
        let mut local = HashMap::new();
        let me = comm.rank();
        for ShardKey {
            key,
            name,
            init,
            chain,
        } in shard
        {
            if init.len() > kernel.max_elements() {
                return Err(Error::InvalidArgument {
                    at: At::rank(comm.rank()),
                    message: format!(
                        "parameter '{name}' has {} elements; a server updates at most {} at once",
                        init.len(),
                        kernel.max_elements()
                    ),
                });
            }
            let w = comm.upload(&init)?.raw().clone();
            let zero = vec![0.0f32; init.len()];
            let m = comm.upload(&zero)?.raw().clone();
            let acc = comm.upload(&zero)?.raw().clone();
            local.insert(key as u32, keys.len());
            keys.push(KeyState {
                id: key as u32,
                name,
                count: init.len(),
                w,
                m,
                acc,
                version: 0,
                pushed: vec![false; workers.len()],
                clocks: vec![0; workers.len()],
                seen: HashSet::new(),
                primary: chain.first() == Some(&me),
                took_over: false,
                last_heard: Instant::now(),
                cut_off: false,
                backups: chain.iter().copied().skip(1).collect(),
                chain,
            });
        }
        Ok(PsServer {
            comm,
            keys,
            local,
            workers,
            mode,
            backups,
            rule,
            kernel,
            report: ServerReport::default(),
            quorum,
            failed: HashSet::new(),
            finished: HashSet::new(),
            consistency,
            servers: (0..server_count).filter(|&r| r != me).collect(),
        })
    }

    /// This server's rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Serves until every worker is done (or gone); returns what happened and the final
    /// parameters.
    ///
    /// A worker whose push a waiting pull needs and that misses the deadline is declared failed
    /// (an event in the report); the others carry on while at least the quorum remains, and
    /// the call fails, naming the workers, below it. A failed worker that sends anything again
    /// rejoins at the current step. Without pulls waiting, a server waits for its workers as
    /// long as their links are open: serving is its job.
    pub fn serve(mut self) -> Result<ServerReport> {
        let at = At::rank(self.comm.rank());
        let timeout = self.comm.config().timeout;
        let mut connected = self.workers.clone();
        let mut pending: Vec<(usize, PsHeader, Instant)> = Vec::new();
        while !connected.is_empty() {
            let now = Instant::now();
            let deadline = pending
                .iter()
                .map(|p| deadline_from(p.2, timeout))
                .min()
                .unwrap_or_else(|| deadline_from(now, timeout))
                .max(now);
            let mut listen = connected.clone();
            listen.extend(&self.servers);
            match self.comm.link().recv_any(&listen, deadline) {
                Ok((from, frame)) if self.servers.contains(&from) => {
                    self.on_server_frame(from, &frame)?;
                }
                Err(LinkError::Gone(p)) if self.servers.contains(&p) => self.server_gone(p),
                Ok((from, frame)) => {
                    if self.failed.remove(&from) {
                        let v = self.keys.iter().map(|k| k.version).max().unwrap_or(0);
                        self.report.events.push(format!(
                            "worker rank {from} came back and rejoined at version {v}"
                        ));
                    }
                    let Some(h) = PsHeader::decode(&frame.header) else {
                        self.refuse(from, None, 0, "malformed frame")?;
                        continue;
                    };
                    match h.kind() {
                        Some(Kind::Push) => self.push(from, &h, &frame.payload)?,
                        Some(Kind::Pull) => pending.push((from, h, Instant::now())),
                        Some(Kind::Done) => {
                            connected.retain(|&w| w != from);
                            self.failed.remove(&from);
                            self.finished.insert(from);
                            self.settle()?;
                        }
                        _ => self.refuse(from, Some(&h), h.key, "unexpected frame")?,
                    }
                }
                Err(LinkError::Gone(p)) => {
                    connected.retain(|&w| w != p);
                    self.failed.remove(&p);
                    self.finished.insert(p);
                    self.settle()?;
                    self.report.gone.push(p);
                    self.report
                        .events
                        .push(format!("worker rank {p} is gone (link closed)"));
                }
                Err(LinkError::Timeout) => {
                    if pending.is_empty() {
                        // Idle: a server serves until its workers are done; waiting is its job.
                        continue;
                    }
                    let counted = self.counted();
                    let blockers = self.blocking(&pending, &counted);
                    if blockers.is_empty() {
                        return Err(Error::Timeout {
                            at,
                            waiting_on: counted,
                            waited: timeout,
                        });
                    }
                    for &b in &blockers {
                        self.failed.insert(b);
                        self.report.events.push(format!(
                            "worker rank {b} missed the {timeout:?} deadline: declared failed"
                        ));
                    }
                    let alive = self.counted().len();
                    if alive < self.quorum {
                        self.report.events.push(format!(
                            "{alive} workers left, below the quorum of {}: giving up",
                            self.quorum
                        ));
                        return Err(Error::Timeout {
                            at,
                            waiting_on: blockers,
                            waited: timeout,
                        });
                    }
                    self.settle()?;
                    // The pulls that waited start a fresh deadline.
                    let now = Instant::now();
                    pending.iter_mut().for_each(|p| p.2 = now);
                }
                Err(LinkError::Aborted { from, reason }) => {
                    return Err(Error::PeerAborted {
                        at,
                        peer: from,
                        reason,
                    });
                }
                Err(LinkError::Closed) => return Err(Error::LinkClosed { at, peer: at.rank }),
            }
            self.answer(&mut pending, &connected)?;
        }
        self.answer(&mut pending, &connected)?;
        for k in 0..self.keys.len() {
            let t = TensorRef::new(&self.keys[k].w, 0, self.keys[k].count, DType::F32);
            let values = self.comm.read::<f32>(t)?;
            let name = self.keys[k].name.clone();
            self.report.digests.push((name.clone(), digest(&values)));
            self.report.params.push((name, values));
        }
        Ok(self.report)
    }

    /// The workers whose pushes count: connected and not declared failed.
    fn counted(&self) -> Vec<usize> {
        self.workers
            .iter()
            .copied()
            .filter(|w| !self.failed.contains(w) && !self.finished.contains(w))
            .collect()
    }

    /// Sync: applies every key whose step now has all the pushes it needs (after workers were
    /// declared failed or left).
    fn settle(&mut self) -> Result<()> {
        if self.mode != Mode::Sync {
            return Ok(());
        }
        let deadline = deadline_after(self.comm.config().timeout);
        for k in 0..self.keys.len() {
            self.try_apply_sync(k, deadline)?;
        }
        Ok(())
    }

    /// Sync: applies key `k`'s step once the workers still counted (not failed, not finished)
    /// have pushed it, less the backups; the gradient is the mean of every push folded in.
    fn try_apply_sync(&mut self, k: usize, deadline: Instant) -> Result<()> {
        let counted = self.counted();
        let required = counted.len().saturating_sub(self.backups).max(1);
        let key = &self.keys[k];
        let folded = key.pushed.iter().filter(|p| **p).count();
        let got = counted
            .iter()
            .filter(|&&r| key.pushed[self.worker_index(r)])
            .count();
        if folded > 0 && (got >= required || counted.is_empty()) {
            self.apply(k, 1.0 / folded as f32, deadline)?;
            self.keys[k].pushed.iter_mut().for_each(|p| *p = false);
        }
        Ok(())
    }

    fn worker_index(&self, rank: usize) -> usize {
        self.workers.iter().position(|&w| w == rank).unwrap_or(0)
    }

    /// Refuses `request` (when it could be decoded), echoing its number so that the worker
    /// knows which of its requests the answer is for.
    fn refuse(
        &mut self,
        to: usize,
        request: Option<&PsHeader>,
        key: u32,
        reason: &str,
    ) -> Result<()> {
        let mut h = PsHeader::new(Kind::Refused, key as usize, 0, 0);
        if let Some(r) = request {
            (h.step, h.req) = (r.step, r.req);
        }
        self.send(to, h, reason.as_bytes().to_vec())
    }

    fn send(&mut self, to: usize, h: PsHeader, payload: Vec<u8>) -> Result<()> {
        let at = At::rank(self.comm.rank());
        // A worker that is gone cannot be answered; that is its loss, not the server's.
        match self.comm.link().send(
            to,
            Frame {
                header: h.encode(),
                payload,
            },
        ) {
            Ok(()) | Err(LinkError::Closed) | Err(LinkError::Gone(_)) => Ok(()),
            Err(e) => Err(Error::Device {
                at,
                message: format!("sending to rank {to}: {e:?}"),
            }),
        }
    }

    fn push(&mut self, from: usize, h: &PsHeader, payload: &[u8]) -> Result<()> {
        let Some(&k) = self.local.get(&h.key) else {
            return self.refuse(from, Some(h), h.key, "this server does not hold that key");
        };
        if let Some(reason) = self.take_over(k)? {
            return self.refuse(from, Some(h), h.key, &reason);
        }
        if payload.len() != self.keys[k].count * 4 || h.count as usize != self.keys[k].count {
            let reason = format!(
                "push of {} values for '{}', which has {}",
                payload.len() / 4,
                self.keys[k].name,
                self.keys[k].count
            );
            return self.refuse(from, Some(h), h.key, &reason);
        }
        let w = self.worker_index(from);
        if !self.keys[k].seen.insert((w, h.step)) {
            self.report.duplicates += 1;
            return Ok(());
        }
        let deadline = deadline_after(self.comm.config().timeout);
        let (acc_buf, count) = (self.keys[k].acc.clone(), self.keys[k].count);
        let acc = TensorRef::new(&acc_buf, 0, count, DType::F32);
        let key = &self.keys[k];
        match self.mode {
            Mode::Sync => {
                if h.step < key.version {
                    self.report.late += 1;
                    return Ok(());
                }
                if h.step > key.version && key.took_over {
                    // Under Eventual the old primary applied steps this replica never got: the
                    // workers are past them. Skip ahead; the workers count what was lost.
                    let from_version = key.version;
                    self.report.events.push(format!(
                        "'{}' skipped from version {from_version} to {} after the take-over (lost)",
                        key.name, h.step
                    ));
                    let key = &mut self.keys[k];
                    key.version = h.step;
                    key.pushed.iter_mut().for_each(|p| *p = false);
                    // Pushes of the skipped step folded so far go too.
                    self.comm
                        .fold_now(&vec![0u8; 4 * count], acc, Combine::Copy, deadline)?;
                }
                let key = &self.keys[k];
                if h.step > key.version {
                    let reason = format!(
                        "push for step {} while step {} is being aggregated (pull first)",
                        h.step, key.version
                    );
                    return self.refuse(from, Some(h), h.key, &reason);
                }
                self.comm.fold_now(payload, acc, Combine::Sum, deadline)?;
                let key = &mut self.keys[k];
                key.pushed[w] = true;
                key.clocks[w] = key.clocks[w].max(h.step + 1);
                self.try_apply_sync(k, deadline)?;
            }
            Mode::BoundedStaleness(_) | Mode::Async => {
                self.comm.fold_now(payload, acc, Combine::Sum, deadline)?;
                let n = self.workers.len() as f32;
                self.apply(k, 1.0 / n, deadline)?;
                let key = &mut self.keys[k];
                key.clocks[w] = key.clocks[w].max(h.step + 1);
            }
        }
        Ok(())
    }

    fn apply(&mut self, k: usize, scale: f32, deadline: Instant) -> Result<()> {
        let at = At::rank(self.comm.rank());
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
        self.keys[k].version += 1;
        self.report.applied += 1;
        self.replicate(k, deadline)
    }

    /// A worker asks this server for a key it only backed up, so the worker could not reach
    /// the primary. If the servers before this one in the key's chain are known dead (their
    /// links closed), or prove dead when pinged, this server answers for the key from now on.
    /// If one answers the ping, the worker is refused (ask that one). If none answers but none
    /// is known dead, this server may be partitioned from a live primary: under `Strong` it
    /// refuses, since it cannot prove its data is current; under `Eventual` it answers with
    /// what it has, marked stale. Returns the reason for a refusal.
    fn take_over(&mut self, k: usize) -> Result<Option<String>> {
        if self.keys[k].primary {
            return Ok(None);
        }
        let me = self.comm.rank();
        let pos = self.keys[k]
            .chain
            .iter()
            .position(|&r| r == me)
            .unwrap_or(0);
        let before: Vec<usize> = self.keys[k].chain[..pos].to_vec();
        let timeout = self.comm.config().timeout;
        for &p in &before {
            if self.servers.contains(&p) && self.ping(p, deadline_after(timeout / 2))? {
                return Ok(Some(format!(
                    "server rank {p}, which holds '{}' before this one, is alive: ask it",
                    self.keys[k].name
                )));
            }
        }
        let unreachable: Vec<usize> = before
            .iter()
            .copied()
            .filter(|p| self.servers.contains(p))
            .collect();
        if !unreachable.is_empty() && self.consistency == Consistency::Strong {
            return Ok(Some(format!(
                "server rank {me} cannot prove its copy of '{}' (version {}) is current: rank(s) \
                 {unreachable:?} before it are unreachable but not known to be dead",
                self.keys[k].name, self.keys[k].version
            )));
        }
        let cut_off = !unreachable.is_empty();
        let others: Vec<usize> = self.keys[k]
            .chain
            .iter()
            .copied()
            .filter(|&r| r != me && self.servers.contains(&r))
            .collect();
        let key = &mut self.keys[k];
        key.primary = true;
        key.took_over = true;
        key.cut_off = cut_off;
        // Every other replica, the old primary too: after a partition heals it must converge.
        key.backups = others;
        self.report.events.push(format!(
            "server rank {me} took over '{}' at version {}{}",
            key.name,
            key.version,
            if cut_off {
                " (cut off from a primary that may be alive: answering stale)"
            } else {
                ""
            }
        ));
        Ok(None)
    }

    /// Whether `peer` answers a ping before `deadline` (replicas it sends meanwhile are applied).
    fn ping(&mut self, peer: usize, deadline: Instant) -> Result<bool> {
        self.send(peer, PsHeader::new(Kind::Ping, 0, 0, 0), Vec::new())?;
        loop {
            match self.comm.link().recv(peer, deadline) {
                Ok(frame) => {
                    if PsHeader::decode(&frame.header).and_then(|h| h.kind()) == Some(Kind::Pong) {
                        return Ok(true);
                    }
                    self.on_server_frame(peer, &frame)?;
                }
                Err(LinkError::Gone(_)) | Err(LinkError::Closed) => {
                    self.server_gone(peer);
                    return Ok(false);
                }
                Err(_) => return Ok(false),
            }
        }
    }

    /// Sends key `k`'s new state to its backups; under `Strong`, waits until each applied it
    /// (a backup that does not answer by the deadline is dropped from the chain).
    fn replicate(&mut self, k: usize, deadline: Instant) -> Result<()> {
        if !self.keys[k].primary || self.keys[k].backups.is_empty() {
            return Ok(());
        }
        let key = &self.keys[k];
        let (count, version) = (key.count, key.version);
        let w = TensorRef::new(&key.w, 0, count, DType::F32);
        let m = TensorRef::new(&key.m, 0, count, DType::F32);
        let (w, m) = (w.buffer.clone(), m.buffer.clone());
        let mut payload = self
            .comm
            .read_now(TensorRef::new(&w, 0, count, DType::F32), deadline)?;
        payload.extend(
            self.comm
                .read_now(TensorRef::new(&m, 0, count, DType::F32), deadline)?,
        );
        let mut h = PsHeader::new(Kind::Replicate, self.keys[k].id as usize, 0, count);
        h.version = version;
        for b in self.keys[k].backups.clone() {
            self.send(b, h, payload.clone())?;
        }
        if self.consistency == Consistency::Eventual {
            return Ok(());
        }
        for b in self.keys[k].backups.clone() {
            loop {
                match self.comm.link().recv(b, deadline) {
                    Ok(frame) => {
                        let ack = PsHeader::decode(&frame.header);
                        if ack.is_some_and(|a| {
                            a.kind() == Some(Kind::ReplicaAck)
                                && a.key == h.key
                                && a.version == version
                        }) {
                            break;
                        }
                        // The backup may be replicating its own keys to this server meanwhile.
                        self.on_server_frame(b, &frame)?;
                    }
                    Err(_) => {
                        self.server_gone(b);
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// A frame from another server: a replica to apply (and acknowledge), or a late ack.
    fn on_server_frame(&mut self, from: usize, frame: &Frame) -> Result<()> {
        let Some(h) = PsHeader::decode(&frame.header) else {
            return Ok(());
        };
        match h.kind() {
            Some(Kind::Ping) => {
                return self.send(from, PsHeader::new(Kind::Pong, 0, 0, 0), Vec::new());
            }
            Some(Kind::Replicate) => {}
            _ => return Ok(()), // pongs and acks that come after their wait ended
        }
        let Some(&k) = self.local.get(&h.key) else {
            return Ok(());
        };
        let count = self.keys[k].count;
        if frame.payload.len() != 8 * count {
            return Ok(());
        }
        if self.keys[k].primary {
            // Two servers answered for the key (a partition under Eventual): the higher
            // version wins, on a tie the one earlier in the chain; the loser yields.
            let me = self.comm.rank();
            let pos = |r: usize| {
                self.keys[k]
                    .chain
                    .iter()
                    .position(|&x| x == r)
                    .unwrap_or(usize::MAX)
            };
            let theirs_wins = h.version > self.keys[k].version
                || (h.version == self.keys[k].version && pos(from) < pos(me));
            if !theirs_wins {
                return Ok(());
            }
            let key = &mut self.keys[k];
            key.primary = false;
            key.took_over = false;
            key.cut_off = false;
            key.backups.clear();
            self.report.events.push(format!(
                "server rank {me} yielded '{}' to rank {from} at version {}",
                key.name, h.version
            ));
        }
        let deadline = deadline_after(self.comm.config().timeout);
        let (w, m) = (self.keys[k].w.clone(), self.keys[k].m.clone());
        let (wb, mb) = frame.payload.split_at(4 * count);
        self.comm.fold_now(
            wb,
            TensorRef::new(&w, 0, count, DType::F32),
            Combine::Copy,
            deadline,
        )?;
        self.comm.fold_now(
            mb,
            TensorRef::new(&m, 0, count, DType::F32),
            Combine::Copy,
            deadline,
        )?;
        self.keys[k].version = h.version;
        self.keys[k].last_heard = Instant::now();
        let mut ack = PsHeader::new(Kind::ReplicaAck, h.key as usize, 0, 0);
        ack.version = h.version;
        self.send(from, ack, Vec::new())
    }

    /// Another server is unreachable: stop listening to it and replicating to it.
    fn server_gone(&mut self, rank: usize) {
        if !self.servers.contains(&rank) {
            return;
        }
        self.servers.retain(|&r| r != rank);
        for key in &mut self.keys {
            key.backups.retain(|&r| r != rank);
        }
        self.report.events.push(format!(
            "server rank {rank} is unreachable: no longer replicated to"
        ));
    }

    /// The slowest live worker's clock for key `k` (every step below it has been pushed).
    fn min_clock(&self, k: usize, live: &[usize]) -> u64 {
        live.iter()
            .filter(|w| !self.failed.contains(w))
            .map(|&r| self.keys[k].clocks[self.worker_index(r)])
            .min()
            .unwrap_or(u64::MAX)
    }

    fn ready(&self, k: usize, step: u64, live: &[usize]) -> bool {
        match self.mode {
            Mode::Sync => self.keys[k].version >= step || live.is_empty(),
            Mode::BoundedStaleness(s) => self.min_clock(k, live) >= step.saturating_sub(s),
            Mode::Async => true,
        }
    }

    /// Answers every pending pull the mode now allows.
    fn answer(
        &mut self,
        pending: &mut Vec<(usize, PsHeader, Instant)>,
        live: &[usize],
    ) -> Result<()> {
        let mut i = 0;
        while i < pending.len() {
            let (from, h, _) = pending[i];
            let Some(&k) = self.local.get(&h.key) else {
                pending.swap_remove(i);
                self.refuse(from, Some(&h), h.key, "this server does not hold that key")?;
                continue;
            };
            if let Some(reason) = self.take_over(k)? {
                pending.swap_remove(i);
                self.refuse(from, Some(&h), h.key, &reason)?;
                continue;
            }
            if !self.ready(k, h.step, live) {
                i += 1;
                continue;
            }
            pending.swap_remove(i);
            let key = &self.keys[k];
            let t = TensorRef::new(&key.w, 0, key.count, DType::F32);
            let deadline = deadline_after(self.comm.config().timeout);
            let bytes = self.comm.read_now(t, deadline)?;
            let mut reply = PsHeader::new(Kind::Params, h.key as usize, h.step, self.keys[k].count);
            reply.version = self.keys[k].version;
            reply.clock = self.min_clock(k, live);
            reply.req = h.req;
            if self.keys[k].cut_off {
                let ms = self.keys[k].last_heard.elapsed().as_millis();
                reply.stale_ms = ms.min(u32::MAX as u128 - 1) as u32;
            }
            self.send(from, reply, bytes)?;
        }
        Ok(())
    }

    /// The workers whose pushes the pending pulls wait for.
    fn blocking(&self, pending: &[(usize, PsHeader, Instant)], live: &[usize]) -> Vec<usize> {
        let mut out = Vec::new();
        for (_, h, _) in pending {
            let Some(&k) = self.local.get(&h.key) else {
                continue;
            };
            for &r in live {
                let w = self.worker_index(r);
                let key = &self.keys[k];
                let missing = match self.mode {
                    Mode::Sync => !key.pushed[w],
                    Mode::BoundedStaleness(s) => key.clocks[w] < h.step.saturating_sub(s),
                    Mode::Async => false,
                };
                if missing && !out.contains(&r) {
                    out.push(r);
                }
            }
        }
        out
    }
}
