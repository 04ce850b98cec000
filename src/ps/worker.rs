//! A worker rank: pushes gradients from its device to the servers and pulls parameters back.

use std::time::Duration;

use super::protocol::{Kind, NOT_STALE, PsHeader};
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
}

/// One worker rank.
pub struct PsWorker {
    comm: Communicator,
    index: usize,
    keys: Vec<(String, usize)>,
    /// Per key: the servers holding it, primary first, and which one this worker uses now.
    chains: Vec<Vec<usize>>,
    current: Vec<usize>,
    /// Per key: the last push (step, bytes), re-sent to a backup that takes over.
    last_push: Vec<Option<(u64, Vec<u8>)>>,
    /// Per key: the highest version this worker has been answered with.
    seen: Vec<u64>,
    lost: u64,
    /// The number of the last pull sent (see `PsHeader::req`).
    pulls: u64,
    failovers: u64,
    servers: usize,
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
            lost: 0,
            pulls: 0,
            failovers: 0,
            servers,
        }
    }

    /// Updates this worker saw that a server taking over no longer had (0 under `Strong`).
    pub fn lost_updates(&self) -> u64 {
        self.lost
    }

    /// Times this worker moved to a backup server because a primary stopped answering.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    fn owner(&self, k: usize) -> usize {
        self.chains[k][self.current[k].min(self.chains[k].len() - 1)]
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

    fn key(&self, name: &str, t: &TensorRef<'_>) -> Result<usize> {
        let at = self.at();
        let k = self
            .keys
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| Error::InvalidArgument {
                at,
                message: format!("unknown parameter '{name}'"),
            })?;
        if t.dtype != DType::F32 || t.count != self.keys[k].1 {
            return Err(Error::InvalidArgument {
                at,
                message: format!(
                    "'{name}' is {} f32 values; got {} {} values",
                    self.keys[k].1, t.count, t.dtype
                ),
            });
        }
        Ok(k)
    }

    /// Pushes this worker's gradient of `key` for `step` (read back from the device).
    pub fn push<'a>(&mut self, key: &str, grad: impl Into<TensorRef<'a>>, step: u64) -> Result<()> {
        let grad = grad.into();
        let k = self.key(key, &grad)?;
        let deadline = deadline_after(self.comm.config().timeout);
        let bytes = self.comm.read_now(grad, deadline)?;
        let h = PsHeader::new(Kind::Push, k, step, grad.count);
        self.last_push[k] = Some((step, bytes.clone()));
        self.send(self.owner(k), h, bytes)
    }

    /// Sends a push of `values` for `key` whose header claims `count` values, without this
    /// worker's own checks of the size: tests reach the server's own check through it. Not
    /// part of the API.
    #[doc(hidden)]
    pub fn push_unchecked(
        &mut self,
        key: &str,
        step: u64,
        count: usize,
        values: &[f32],
    ) -> Result<()> {
        let k = self
            .keys
            .iter()
            .position(|(n, _)| n == key)
            .ok_or_else(|| Error::InvalidArgument {
                at: self.at(),
                message: format!("unknown parameter '{key}'"),
            })?;
        let h = PsHeader::new(Kind::Push, k, step, count);
        self.send(self.owner(k), h, bytemuck::cast_slice(values).to_vec())
    }

    /// Pulls `key` as of `step` into `into` (on this worker's device): waits until the mode
    /// allows (in `Sync`, until step-1's update applied), at most twice the deadline (the
    /// server may first wait one deadline for a worker it then declares failed).
    pub fn pull<'a>(
        &mut self,
        key: &str,
        step: u64,
        into: impl Into<TensorRef<'a>>,
    ) -> Result<PullInfo> {
        let into = into.into();
        let k = self.key(key, &into)?;
        loop {
            let server = self.owner(k);
            match self.pull_from(server, k, step, into) {
                Ok(info) => return Ok(info),
                // The server stopped answering: move to the next replica, if there is one,
                // and give it this worker's last push again (it rejects it if it has it).
                Err(e @ (Error::Timeout { .. } | Error::LinkClosed { .. }))
                    if self.current[k] + 1 < self.chains[k].len() =>
                {
                    tracing::warn!(error = %e, "parameter server failover");
                    self.current[k] += 1;
                    self.failovers += 1;
                    if let Some((s, bytes)) = self.last_push[k].clone() {
                        let h = PsHeader::new(Kind::Push, k, s, into.count);
                        self.send(self.owner(k), h, bytes)?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn pull_from(
        &mut self,
        server: usize,
        k: usize,
        step: u64,
        into: TensorRef<'_>,
    ) -> Result<PullInfo> {
        // Numbered, so that an answer to an earlier pull still on its way (one whose refusal
        // came back first) is never taken for this one's.
        self.pulls = self.pulls.wrapping_add(1).max(1);
        let req = self.pulls;
        let mut request = PsHeader::new(Kind::Pull, k, step, into.count);
        request.req = req;
        self.send(server, request, Vec::new())?;
        // The server may first wait a whole deadline for a worker it then declares failed.
        let deadline = deadline_after(
            self.comm
                .config()
                .timeout
                .saturating_mul(2)
                .saturating_add(Duration::from_millis(200)),
        );
        let at = self.at();
        loop {
            let frame = self
                .comm
                .link()
                .recv(server, deadline)
                .map_err(|e| match e {
                    LinkError::Timeout => Error::Timeout {
                        at,
                        waiting_on: vec![server],
                        waited: self.comm.config().timeout,
                    },
                    LinkError::Aborted { from, reason } => Error::PeerAborted {
                        at,
                        peer: from,
                        reason,
                    },
                    _ => Error::LinkClosed { at, peer: server },
                })?;
            let Some(h) = PsHeader::decode(&frame.header) else {
                continue;
            };
            match h.kind() {
                // The answer to an earlier pull that returned with a refusal: dropped.
                Some(Kind::Params) if h.req != req => continue,
                Some(Kind::Params) if h.key as usize == k => {
                    self.comm
                        .fold_now(&frame.payload, into, Combine::Copy, deadline)?;
                    // A replica that took over without updates this worker had seen lost them.
                    self.lost += self.seen[k].saturating_sub(h.version);
                    self.seen[k] = self.seen[k].max(h.version);
                    return Ok(PullInfo {
                        version: h.version,
                        clock: h.clock,
                        staleness: (h.stale_ms != NOT_STALE)
                            .then(|| Duration::from_millis(h.stale_ms as u64)),
                    });
                }
                Some(Kind::Refused) => {
                    return Err(Error::InvalidArgument {
                        at,
                        message: format!(
                            "server rank {server} refused a request for '{}': {}",
                            self.keys.get(h.key as usize).map_or("?", |k| k.0.as_str()),
                            String::from_utf8_lossy(&frame.payload)
                        ),
                    });
                }
                _ => continue,
            }
        }
    }

    /// Tells every server this worker is done.
    pub fn done(self) -> Result<()> {
        for s in 0..self.servers {
            self.send(s, PsHeader::new(Kind::Done, 0, 0, 0), Vec::new())?;
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
}
