//! A worker rank: pushes gradients from its device to the servers and pulls parameters back.
//!
//! Every request is numbered (strictly increasing per worker) and waits for the one answer
//! that carries its number: an answer to an earlier request still on its way is never taken
//! for this one's, and a refusal is the error of the request it refuses.

use std::time::{Duration, Instant};

use super::Consistency;
use super::protocol::{Kind, NO_RANK, NOT_STALE, PsHeader, PushStatus, Refusal};
use crate::comm::Communicator;
use crate::deadline::deadline_after;
use crate::device::TensorRef;
use crate::error::{At, Error, Result};
use crate::link::{Frame, LinkError};
use crate::types::{Combine, DType};

/// How current a pulled parameter is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PullInfo {
    /// Updates applied to the key when it was read.
    pub version: u64,
    /// The slowest worker's clock then: every step below it had been pushed by every worker.
    pub clock: u64,
    /// Set when a replica cut off from its primary answered (`Consistency::Eventual`): how long
    /// since it last heard from the primary. The parameters may be that stale.
    pub staleness: Option<Duration>,
    /// Servers known to hold the answered parameters: under `Strong` every member of the
    /// key's chain as it stands (fewer than `replicas` while a member is dropped, after it
    /// missed a deadline or went, until it rejoins); under `Eventual` 1 (the one that answered).
    pub replicas: usize,
}

/// What a server said to one request.
enum Answer {
    Ok(PsHeader, Vec<u8>),
    /// The refusal, a server to ask instead, the reason, the server's version of the key.
    Refused(Refusal, Option<usize>, String, u64),
}

/// One worker rank.
pub struct PsWorker {
    comm: Communicator,
    index: usize,
    keys: Vec<(String, usize)>,
    /// Per key: the servers holding it, head first, and which one this worker asks now.
    chains: Vec<Vec<usize>>,
    current: Vec<usize>,
    /// Per key: the last push (step, bytes), sent again to a replica that takes over.
    last_push: Vec<Option<(u64, Vec<u8>)>>,
    /// Per key: the highest version this worker has been answered with.
    seen: Vec<u64>,
    /// Per key: the epoch of the line of versions `seen` came from (a server that took over
    /// since, from a lower version, has other updates under the same numbers).
    seen_epoch: Vec<u64>,
    lost: u64,
    /// The number of the last request sent (see `PsHeader::req`).
    req: u64,
    failovers: u64,
    servers: usize,
    consistency: Consistency,
}

impl std::fmt::Debug for PsWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PsWorker")
            .field("comm", &self.comm)
            .field("index", &self.index)
            .field("keys", &self.keys)
            .field("servers", &self.servers)
            .field("lost", &self.lost)
            .field("failovers", &self.failovers)
            .finish_non_exhaustive()
    }
}

impl PsWorker {
    pub(crate) fn new(
        comm: Communicator,
        index: usize,
        keys: Vec<(String, usize)>,
        chains: Vec<Vec<usize>>,
        servers: usize,
        consistency: Consistency,
    ) -> Self {
        let n = keys.len();
        PsWorker {
            comm,
            index,
            keys,
            current: vec![0; chains.len()],
            chains,
            last_push: vec![None; n],
            seen: vec![0; n],
            seen_epoch: vec![0; n],
            lost: 0,
            req: 0,
            failovers: 0,
            servers,
            consistency,
        }
    }

    /// Updates this worker saw that a server taking over no longer had (`Eventual` only:
    /// under `Strong` such an answer is an error, [`Error::Lost`]).
    pub fn lost_updates(&self) -> u64 {
        self.lost
    }

    /// Times this worker moved to another replica because the one it asked stopped answering
    /// or pointed it elsewhere.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    fn owner(&self, k: usize) -> usize {
        let chain = &self.chains[k];
        chain[self.current[k] % chain.len().max(1)]
    }

    /// Records an answer's version (and the epoch of its line of versions) for key `k`.
    fn saw(&mut self, k: usize, version: u64, epoch: u64) {
        if version > self.seen[k] {
            (self.seen[k], self.seen_epoch[k]) = (version, epoch);
        }
    }

    /// This worker's index among the workers (0-based).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The worker's communicator (its device: upload gradients, allocate buffers).
    pub fn comm(&mut self) -> &mut Communicator {
        &mut self.comm
    }

    fn at(&self) -> At {
        At::rank(self.comm.rank())
    }

    fn key_index(&self, name: &str) -> Result<usize> {
        self.keys
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| Error::InvalidArgument {
                at: self.at(),
                message: format!("unknown parameter '{name}'"),
            })
    }

    fn key(&self, name: &str, t: &TensorRef<'_>) -> Result<usize> {
        let k = self.key_index(name)?;
        if t.dtype != DType::F32 || t.count != self.keys[k].1 {
            return Err(Error::InvalidArgument {
                at: self.at(),
                message: format!(
                    "'{name}' is {} f32 values; got {} {} values",
                    self.keys[k].1, t.count, t.dtype
                ),
            });
        }
        Ok(k)
    }

    /// How long a request may wait for its answer: the server may first wait a deadline for a
    /// worker it then declares failed, and another for a replica it then drops from the chain.
    fn reply_deadline(&self) -> Instant {
        deadline_after(
            self.comm
                .config()
                .timeout
                .saturating_mul(3)
                .saturating_add(Duration::from_millis(200)),
        )
    }

    /// Pushes this worker's gradient of `key` for `step` (read back from the device) and
    /// waits for the server's answer: in `Sync`, until the step's update that includes it is
    /// applied (and, under `Strong`, held by every live replica); otherwise until it is applied
    /// (and held). A push the server refuses is an error carrying its reason; a late push (a
    /// backup worker's) or a duplicate is `Ok` and counted in the server's report.
    pub fn push<'a>(&mut self, key: &str, grad: impl Into<TensorRef<'a>>, step: u64) -> Result<()> {
        let grad = grad.into();
        let k = self.key(key, &grad)?;
        let deadline = deadline_after(self.comm.config().timeout);
        let bytes = self.comm.read_now(grad, deadline)?;
        self.last_push[k] = Some((step, bytes.clone()));
        let count = grad.count;
        let (ack, _) = self.call(k, |w| {
            let mut h = PsHeader::new(Kind::Push, w.comm.rank(), k, step, count);
            h.dtype = DType::F32.code();
            (h, bytes.clone())
        })?;
        if ack.status == PushStatus::Applied as u32 {
            // The version that holds this push: a replica answering with less later lost it.
            self.saw(k, ack.version, ack.epoch);
        }
        Ok(())
    }

    /// Sends a push of `values` for `key` whose header claims `count` values, without this
    /// worker's own checks of the size, and waits for the answer: tests reach the server's
    /// own check through it. Not part of the API.
    #[doc(hidden)]
    pub fn push_unchecked(
        &mut self,
        key: &str,
        step: u64,
        count: usize,
        values: &[f32],
    ) -> Result<()> {
        let k = self.key_index(key)?;
        let bytes: Vec<u8> = bytemuck::cast_slice(values).to_vec();
        self.call(k, |w| {
            (
                PsHeader::new(Kind::Push, w.comm.rank(), k, step, count),
                bytes.clone(),
            )
        })
        .map(|_| ())
    }

    /// Pulls `key` as of `step` into `into` (on this worker's device): waits until the mode
    /// allows (in `Sync`, until step-1's update applied and, under `Strong`, is held by every
    /// live replica).
    pub fn pull<'a>(
        &mut self,
        key: &str,
        step: u64,
        into: impl Into<TensorRef<'a>>,
    ) -> Result<PullInfo> {
        let into = into.into();
        let k = self.key(key, &into)?;
        let count = into.count;
        let (h, payload) = self.call(k, |w| {
            (
                PsHeader::new(Kind::Pull, w.comm.rank(), k, step, count),
                Vec::new(),
            )
        })?;
        let at = self.at();
        let server = self.owner(k);
        if h.count as usize != count || payload.len() != count.saturating_mul(4) {
            return Err(Error::Device {
                at,
                message: format!(
                    "server rank {server} answered '{key}' with {} bytes, not {count} values",
                    payload.len()
                ),
            });
        }
        if h.version < self.seen[k] {
            if self.consistency == Consistency::Strong {
                return Err(Error::Lost {
                    at,
                    server,
                    key: key.to_string(),
                    got: h.version,
                    seen: self.seen[k],
                });
            }
            // A replica that took over without updates this worker had seen lost them: counted
            // once, and from here on this worker follows the new head's versions (kept, the
            // old high mark would count the same loss again at every pull below it).
            self.lost = self.lost.saturating_add(self.seen[k] - h.version);
            (self.seen[k], self.seen_epoch[k]) = (h.version, h.epoch);
        }
        self.saw(k, h.version, h.epoch);
        let deadline = deadline_after(self.comm.config().timeout);
        self.comm
            .fold_now(&payload, into, Combine::Copy, deadline)?;
        Ok(PullInfo {
            version: h.version,
            clock: h.clock,
            staleness: (h.stale_ms != NOT_STALE).then(|| Duration::from_millis(h.stale_ms as u64)),
            replicas: if h.hint == NO_RANK {
                1
            } else {
                h.hint as usize
            },
        })
    }

    /// Sends the request `make` builds to key `k`'s server and returns its answer; moves to
    /// another replica when the server is unreachable or points elsewhere (a pull first gives
    /// the new one this worker's last push again; it drops it if it has it).
    fn call(
        &mut self,
        k: usize,
        make: impl Fn(&Self) -> (PsHeader, Vec<u8>),
    ) -> Result<(PsHeader, Vec<u8>)> {
        let at = self.at();
        let n = self.chains[k].len();
        let mut tries = 0usize;
        loop {
            let server = self.owner(k);
            let (mut h, payload) = make(self);
            // What this worker has seen, so that a replica holding less says so (Strong).
            (h.version, h.epoch) = (self.seen[k], self.seen_epoch[k]);
            let is_pull = h.kind == Kind::Pull as u32;
            let outcome = self.request(server, h, payload);
            let hint = match outcome {
                Ok(Answer::Ok(h, p)) => return Ok((h, p)),
                Ok(Answer::Refused(Refusal::AskOther, hint, reason, _)) => {
                    tracing::info!(server, %reason, "parameter server redirect");
                    hint
                }
                Ok(Answer::Refused(Refusal::Behind, _, reason, got)) => {
                    tracing::warn!(server, %reason, "parameter server behind");
                    return Err(Error::Lost {
                        at,
                        server,
                        key: self.keys[k].0.clone(),
                        got,
                        seen: self.seen[k],
                    });
                }
                Ok(Answer::Refused(Refusal::CannotProve, _, reason, _)) => {
                    return Err(Error::Unavailable {
                        at,
                        key: self.keys[k].0.clone(),
                        reason: format!("server rank {server}: {reason}"),
                    });
                }
                Ok(Answer::Refused(_, _, reason, _)) => {
                    return Err(Error::InvalidArgument {
                        at,
                        message: format!(
                            "server rank {server} refused a request for '{}': {reason}",
                            self.keys[k].0
                        ),
                    });
                }
                Err(e @ (Error::Timeout { .. } | Error::LinkClosed { .. })) => {
                    if tries >= 2 * n {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, "parameter server failover");
                    None
                }
                Err(e) => return Err(e),
            };
            tries += 1;
            if tries > 2 * n {
                return Err(Error::Timeout {
                    at,
                    waiting_on: self.chains[k].clone(),
                    waited: self.comm.config().timeout,
                });
            }
            let next = hint
                .and_then(|r| self.chains[k].iter().position(|&x| x == r))
                .unwrap_or(self.current[k] + 1);
            self.current[k] = next % n.max(1);
            self.failovers += 1;
            if is_pull && let Some((s, bytes)) = self.last_push[k].clone() {
                let server = self.owner(k);
                let count = self.keys[k].1;
                let mut h = PsHeader::new(Kind::Push, self.comm.rank(), k, s, count);
                (h.version, h.epoch) = (self.seen[k], self.seen_epoch[k]);
                // Its answer does not matter: a replica that cannot take it is asked again by
                // the pull that follows.
                let _ = self.request(server, h, bytes);
            }
        }
    }

    /// Sends one numbered request to `server` and waits for the answer with its number.
    fn request(&mut self, server: usize, mut h: PsHeader, payload: Vec<u8>) -> Result<Answer> {
        let at = self.at();
        self.req = self.req.saturating_add(1);
        h.req = self.req;
        self.send(server, h, payload)?;
        let deadline = self.reply_deadline();
        // A server may keep a request waiting (for other workers, for its chain), but it
        // answers a ping at once: after half a deadline of silence the worker pings it, and a
        // server silent for a whole deadline more is taken for dead (one that crashed without
        // closing its link), so the worker fails over in 1.5 deadlines instead of waiting for
        // the reply's own deadline.
        let timeout = self.comm.config().timeout;
        let quiet = || deadline_after(timeout / 2).min(deadline);
        let mut until = quiet();
        let mut pinged = false;
        let timed_out = || Error::Timeout {
            at,
            waiting_on: vec![server],
            waited: timeout,
        };
        loop {
            let frame = match self.comm.link().recv(server, until) {
                Ok(frame) => frame,
                Err(LinkError::Timeout) => {
                    if pinged || Instant::now() >= deadline {
                        return Err(timed_out());
                    }
                    let ping = PsHeader::new(Kind::Ping, self.comm.rank(), 0, 0, 0);
                    self.send(server, ping, Vec::new())?;
                    pinged = true;
                    until = deadline_after(timeout).min(deadline);
                    continue;
                }
                Err(LinkError::Aborted { from, reason }) => {
                    return Err(Error::PeerAborted {
                        at,
                        peer: from,
                        reason,
                    });
                }
                Err(_) => return Err(Error::LinkClosed { at, peer: server }),
            };
            // Any frame says the server is alive.
            pinged = false;
            until = quiet();
            let Some(a) = PsHeader::decode(&frame.header) else {
                continue;
            };
            // An answer to an earlier request (one that came back refused or timed out), or
            // one that does not fit this request: dropped.
            if a.req != h.req || a.rank as usize != server {
                continue;
            }
            let fits = a.key == h.key && a.step == h.step;
            match (h.kind(), a.kind()) {
                (Some(Kind::Pull), Some(Kind::Params))
                | (Some(Kind::Push), Some(Kind::PushAck))
                | (Some(Kind::Checkpoint), Some(Kind::CheckpointDone))
                    if fits =>
                {
                    return Ok(Answer::Ok(a, frame.payload));
                }
                (_, Some(Kind::Refused)) => {
                    let hint = (a.hint != NO_RANK).then_some(a.hint as usize);
                    return Ok(Answer::Refused(
                        Refusal::from_code(a.status),
                        hint,
                        String::from_utf8_lossy(&frame.payload).into_owned(),
                        a.version,
                    ));
                }
                _ => continue,
            }
        }
    }

    /// Asks every server to write its shard's checkpoint (to the directory the builder's
    /// [`checkpoint`](super::ParameterServer::checkpoint) gave) and waits until each has.
    /// Call it where every worker agrees the model is consistent (after a step's pulls in
    /// `Sync`).
    pub fn checkpoint(&mut self) -> Result<()> {
        let at = self.at();
        for s in 0..self.servers {
            let h = PsHeader::new(Kind::Checkpoint, self.comm.rank(), 0, 0, 0);
            match self.request(s, h, Vec::new())? {
                Answer::Ok(..) => {}
                Answer::Refused(_, _, reason, _) => {
                    return Err(Error::Checkpoint {
                        at,
                        message: format!("server rank {s}: {reason}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Tells every server this worker is done.
    pub fn done(mut self) -> Result<()> {
        for s in 0..self.servers {
            self.req = self.req.saturating_add(1);
            let mut h = PsHeader::new(Kind::Done, self.comm.rank(), 0, 0, 0);
            h.req = self.req;
            match self.send(s, h, Vec::new()) {
                // A server that is gone does not need to be told.
                Ok(()) | Err(Error::LinkClosed { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn send(&self, to: usize, h: PsHeader, payload: Vec<u8>) -> Result<()> {
        self.comm
            .link()
            .send(
                to,
                Frame {
                    header: h.encode(),
                    payload,
                },
            )
            .map_err(|_| Error::LinkClosed {
                at: self.at(),
                peer: to,
            })
    }

    /// Sends a raw frame to `to`: tests reach the server's validation of each field through
    /// it. Not part of the API.
    #[doc(hidden)]
    pub fn send_frame(&self, to: usize, h: PsHeader, payload: Vec<u8>) -> Result<()> {
        self.send(to, h, payload)
    }

    /// Sends a frame with raw header bytes (a truncated header, say). Not part of the API.
    #[doc(hidden)]
    pub fn send_raw(&self, to: usize, header: Vec<u8>, payload: Vec<u8>) -> Result<()> {
        self.comm
            .link()
            .send(to, Frame { header, payload })
            .map_err(|_| Error::LinkClosed {
                at: self.at(),
                peer: to,
            })
    }

    /// Receives the next raw frame from `from` (waiting at most `wait`). Not part of the API.
    #[doc(hidden)]
    pub fn recv_frame(&self, from: usize, wait: Duration) -> Result<(PsHeader, Vec<u8>)> {
        let at = self.at();
        let frame = self
            .comm
            .link()
            .recv(from, deadline_after(wait))
            .map_err(|_| Error::Timeout {
                at,
                waiting_on: vec![from],
                waited: wait,
            })?;
        let h = PsHeader::decode(&frame.header).ok_or_else(|| Error::InvalidArgument {
            at,
            message: "a malformed header".into(),
        })?;
        Ok((h, frame.payload))
    }

    /// A fresh request number, as the next request would use. Not part of the API.
    #[doc(hidden)]
    pub fn next_req(&mut self) -> u64 {
        self.req = self.req.saturating_add(1);
        self.req
    }
}
