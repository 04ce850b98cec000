//! Parameter-server aggregation: workers push gradients and pull parameters; servers aggregate
//! the pushes with the WGSL reduce kernel and apply an update rule on their device.
//!
//! Roles are ranks of one communicator group: the first `servers` ranks serve, the rest work.
//! Parameters are named f32 tensors, each owned by one server (keys spread round robin).
//!
//! Consistency modes (Li et al., OSDI 2014; Ho et al., NeurIPS 2013):
//! - [`Mode::Sync`]: bulk synchronous. Step t's update applies once every worker pushed step t
//!   (their gradients summed on the device and scaled by 1/k); a pull for step t waits for it.
//!   With backup workers (`backups > 0`) the update applies after the first `workers - backups`
//!   pushes and later pushes of that step are dropped and counted.
//! - [`Mode::BoundedStaleness`]`(s)`: each push applies on arrival (scaled by 1/workers); a pull
//!   for step c waits until every worker has pushed every step up to c-s-1.
//! - [`Mode::Async`]: each push applies on arrival; pulls never wait.
//!
//! Replication (chain replication, van Renesse and Schneider, OSDI 2004): with `replicas(r)`
//! key k lives on the chain of servers k, k+1, ..., k+r-1 (mod servers), its head first; the
//! chains of different keys may form cycles over the servers. After every update the head sends
//! the new parameters and optimiser state to the next server, which applies them, passes them
//! on and acknowledges them to the head. Under [`Consistency::Strong`] a push is answered, and a
//! pull served, only from a version every member of the chain acked when it committed (a member
//! re-admitted after that holds it once its state transfer is acked;
//! [`PullInfo::replicas`] says how many servers hold each answer), so a member that takes over
//! (when a worker finds the head gone and turns to it) normally has everything any worker was
//! answered with. When it cannot (the only newer copy died with a head that had committed
//! alone), a worker that was answered with more gets [`Error::Lost`] instead of training on:
//! requests carry the version the worker saw and the epoch of its line of versions, and a
//! server that holds less, or took over below it since, refuses. Under
//! [`Consistency::Eventual`] the head answers at once and replication follows; a take-over may
//! lose the tail, and workers count the loss ([`PsWorker::lost_updates`]). A member that misses
//! an ack's deadline, or whose link closes, is dropped from the chain (a new epoch; the head
//! may then commit alone, and `replicas` shows it); one that answers again (after a partition
//! heals) rejoins as the tail by state transfer, so a later failure of the head loses nothing.
//!
//! Partitions, the CAP choice: a member asked for a key pings the servers before it in the
//! key's chain and asks the live ones after it to agree to its taking over (one refuses when its
//! chain has dropped the claimant or it holds a later version, and the worker is sent to it). A
//! server before it that answers is alive (the worker is told to ask it); one whose link is
//! closed is dead; when all are dead and all after it agreed, the member takes over. One that does not answer may be alive behind a
//! partition: under `Strong` the member refuses, saying it cannot prove its data is current;
//! under `Eventual` it answers with what it has, marked stale ([`PullInfo::staleness`]), and
//! once the partition heals the replicas converge (a newer epoch, then the higher version
//! wins; the report's `digests` show it).
//!
//! Every request is numbered and answered by number; every field of a frame is checked before
//! it changes anything, and a bad one gets a refusal naming the problem (the worker's call
//! returns it as its error). A second push of the same (worker, step) is dropped (remembered
//! over a window of the last 64 steps per worker). A server that waits longer than the deadline
//! for the pushes a request needs declares the workers failed (above the quorum) or returns an
//! error naming them, instead of hanging.
//!
//! Checkpoints: with [`ParameterServer::checkpoint`] a worker's [`PsWorker::checkpoint`] has
//! every server write its shard atomically; [`ParameterServer::restore`] starts from them.
//!
//! ```no_run
//! # fn main() -> wccl::Result<()> {
//! use wccl::ps::{Mode, ParameterServer, Sgd};
//! let (servers, workers) = ParameterServer::builder()
//!     .workers(2)
//!     .mode(Mode::Sync)
//!     .rule(Sgd { lr: 0.1, momentum: 0.0 })
//!     .param("w", vec![0.0; 4])
//!     .build()?;
//! std::thread::scope(|s| {
//!     for server in servers {
//!         s.spawn(move || server.serve());
//!     }
//!     for mut w in workers {
//!         s.spawn(move || -> wccl::Result<()> {
//!             let grad = w.comm().upload(&[1.0f32; 4])?;
//!             let params = w.comm().buffer::<f32>(4)?;
//!             w.push("w", &grad, 0)?;
//!             w.pull("w", 1, &params)?; // after step 0's update: 0 - 0.1 * 1
//!             w.done()
//!         });
//!     }
//! });
//! # Ok(()) }
//! ```

mod checkpoint;
mod protocol;
mod server;
mod worker;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The frames on the wire, for tests that send what a well-behaved worker never would. Not
/// part of the API.
#[doc(hidden)]
pub mod wire {
    pub use super::protocol::{F32, JOIN, Kind, NO_RANK, NOT_STALE, PsHeader, PushStatus, Refusal};
}

pub use server::{PsServer, ServerReport};
pub use worker::{PsWorker, PullInfo};

use crate::comm::{CommConfig, CommGroup};
use crate::error::{At, Error, Result};
use crate::link::{FaultPlan, LinkStack};

/// What a replicated shard promises when a server fails or a link partitions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// The primary answers a pull for an update only after every live backup applied it, so a
    /// backup that takes over has every update a worker has seen.
    Strong,
    /// The primary answers at once and replicates behind; a take-over may lose the tail that
    /// had not reached the backup, and workers count what they lost.
    Eventual,
}

/// When a server applies pushes and when pulls may proceed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Bulk synchronous: one aggregated update per step.
    Sync,
    /// Stale synchronous parallel: pushes apply on arrival; the fastest worker may be at most
    /// this many steps ahead of the slowest.
    BoundedStaleness(u64),
    /// Pushes apply on arrival; no bound.
    Async,
}

/// An update rule the server applies on its device.
///
/// It is a WGSL function `fn update(w: f32, m: f32, g: f32, h: vec4<f32>) -> vec2<f32>` that
/// returns the new parameter and the new optimiser state from the parameter `w`, the state `m`
/// (zero at first) and the scaled gradient `g`; `h` holds the rule's hyper-parameters.
pub trait UpdateRule: Send + Sync + 'static {
    /// The WGSL `update` function.
    fn wgsl(&self) -> String;
    /// The hyper-parameters, as `h` in the WGSL function.
    fn hyper(&self) -> [f32; 4];
    /// The same rule on the host, for checks: returns (new w, new m).
    fn host(&self, w: f64, m: f64, g: f64) -> (f64, f64);
}

/// SGD with momentum: `m = momentum * m + g; w = w - lr * m`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    /// Learning rate.
    pub lr: f32,
    /// Momentum (0 for plain SGD).
    pub momentum: f32,
}

impl UpdateRule for Sgd {
    fn wgsl(&self) -> String {
        "fn update(w: f32, m: f32, g: f32, h: vec4<f32>) -> vec2<f32> {\n    let v = h.y * m + g;\n    return vec2<f32>(w - h.x * v, v);\n}".into()
    }
    fn hyper(&self) -> [f32; 4] {
        [self.lr, self.momentum, 0.0, 0.0]
    }
    fn host(&self, w: f64, m: f64, g: f64) -> (f64, f64) {
        let v = self.momentum as f64 * m + g;
        (w - self.lr as f64 * v, v)
    }
}

/// How a server behaves, as the builder set it.
#[derive(Clone, Debug)]
pub(crate) struct Policy {
    pub mode: Mode,
    pub backups: usize,
    pub quorum: usize,
    /// Number of server ranks (ranks 0..servers).
    pub servers: usize,
    pub consistency: Consistency,
    /// Number of keys in all (ids `0..keys`).
    pub keys: usize,
    /// Where `PsWorker::checkpoint` writes each server's shard.
    pub checkpoint_dir: Option<PathBuf>,
    /// The restored copy of each key (by id), when restoring.
    pub restored: Option<Restored>,
}

/// A key as restored from a checkpoint.
#[derive(Debug)]
pub(crate) struct RestoredKey {
    pub version: u64,
    pub w: Vec<f32>,
    pub m: Vec<f32>,
}

/// Every key restored, by id.
pub(crate) type Restored = Arc<HashMap<u32, RestoredKey>>;

/// One key as a server holds it.
pub(crate) struct ShardKey {
    pub key: usize,
    pub name: String,
    pub init: Vec<f32>,
    /// The servers holding it: the primary first, then its backups.
    pub chain: Vec<usize>,
}

/// Builds the servers and workers of a parameter server in this process.
pub struct ParameterServer {
    servers: usize,
    workers: usize,
    backups: usize,
    mode: Mode,
    rule: Arc<dyn UpdateRule>,
    params: Vec<(String, Vec<f32>)>,
    config: CommConfig,
    /// The wrappers around the group's links (a fault plan, from [`faults`](Self::faults)).
    links: LinkStack,
    quorum: Option<usize>,
    replicas: usize,
    consistency: Consistency,
    checkpoint_dir: Option<PathBuf>,
    restore: Option<PathBuf>,
}

impl std::fmt::Debug for ParameterServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParameterServer")
            .field("servers", &self.servers)
            .field("workers", &self.workers)
            .field("backups", &self.backups)
            .field("mode", &self.mode)
            .field("params", &self.params.len())
            .field("config", &self.config)
            .field("links", &self.links)
            .field("quorum", &self.quorum)
            .field("replicas", &self.replicas)
            .field("consistency", &self.consistency)
            .field("checkpoint_dir", &self.checkpoint_dir)
            .field("restore", &self.restore)
            .finish_non_exhaustive()
    }
}

impl ParameterServer {
    /// One server, two workers, `Sync`, SGD with lr 0.01, no parameters yet.
    pub fn builder() -> ParameterServer {
        ParameterServer {
            servers: 1,
            workers: 2,
            backups: 0,
            mode: Mode::Sync,
            rule: Arc::new(Sgd {
                lr: 0.01,
                momentum: 0.0,
            }),
            params: Vec::new(),
            config: CommConfig::default(),
            links: LinkStack::default(),
            quorum: None,
            replicas: 1,
            consistency: Consistency::Strong,
            checkpoint_dir: None,
            restore: None,
        }
    }

    /// The directory each server writes its shard's checkpoint to (`shard-<rank>.wccl-ckpt`)
    /// when a worker calls [`PsWorker::checkpoint`]: the parameters, the optimiser state and
    /// the version of every key the server holds, with a checksum, written atomically (a
    /// temporary file, fsync, rename), so that a crash mid-write leaves the previous
    /// checkpoint whole.
    pub fn checkpoint(mut self, dir: impl Into<PathBuf>) -> Self {
        self.checkpoint_dir = Some(dir.into());
        self
    }

    /// Starts every server from its shard's checkpoint in `dir` instead of the initial
    /// values: the same servers, keys, shapes and update rule are required, and a checkpoint
    /// that is corrupt, truncated or of another shape is a clear error from
    /// [`build`](Self::build) (nothing is overwritten). Each key starts from its newest copy
    /// among the shards (a member may have lagged its head, or a crash cut the checkpoint
    /// between two servers' writes); in `Sync` every key must then be at one step, or the
    /// checkpoint is refused as torn. In `Sync` the workers resume at the restored version (a
    /// pull of step 0 says which); in `BoundedStaleness` and `Async` the workers' clocks are not
    /// in the checkpoint, so they restart their step count at 0.
    pub fn restore(mut self, dir: impl Into<PathBuf>) -> Self {
        self.restore = Some(dir.into());
        self
    }

    /// Number of server ranks.
    pub fn servers(mut self, n: usize) -> Self {
        self.servers = n;
        self
    }

    /// Number of worker ranks.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Backup workers in `Sync`: each step applies after the first `workers - backups` pushes.
    pub fn backups(mut self, n: usize) -> Self {
        self.backups = n;
        self
    }

    /// The fewest workers a server carries on with after declaring others failed (default: a
    /// majority of the workers).
    pub fn quorum(mut self, n: usize) -> Self {
        self.quorum = Some(n);
        self
    }

    /// Copies of each parameter, on as many servers: the primary (key k's is server k mod
    /// servers) and the backups that follow it (default 1: no replication).
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = n;
        self
    }

    /// What replication promises (default `Strong`).
    pub fn consistency(mut self, c: Consistency) -> Self {
        self.consistency = c;
        self
    }

    /// Faults to inject into the group's links (for tests and drills).
    pub fn faults(mut self, plan: FaultPlan) -> Self {
        self.links = self.links.faults(plan);
        self
    }

    /// The consistency mode.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// The update rule.
    pub fn rule(mut self, rule: impl UpdateRule) -> Self {
        self.rule = Arc::new(rule);
        self
    }

    /// Adds a parameter tensor with its initial values.
    pub fn param(mut self, name: impl Into<String>, init: Vec<f32>) -> Self {
        self.params.push((name.into(), init));
        self
    }

    /// The deadline a server waits for the pushes a pull needs, and a worker for a reply.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.config.timeout = t;
        self
    }

    /// Reads and checks every server's shard in `dir` (each against the keys, shapes and rule
    /// that server holds) and picks, for each key, the copy of the highest version: a
    /// checkpoint is written shard by shard, so a crash between two servers' writes, or a
    /// member that lagged its head, leaves copies of different versions, and the newest copy
    /// is the head's. In `Sync` every key must then be at one step (a version is a step):
    /// otherwise the checkpoint is torn, and refused naming the files.
    fn read_restore(
        &self,
        dir: &std::path::Path,
        shard_of: &dyn Fn(usize) -> Vec<(u32, String, usize)>,
    ) -> Result<Restored> {
        let mut best: HashMap<u32, (RestoredKey, PathBuf)> = HashMap::new();
        for r in 0..self.servers {
            let at = At::rank(r);
            let path = checkpoint::shard_path(dir, r);
            let snap = checkpoint::read(&path).map_err(|e| Error::Checkpoint {
                at,
                message: e.to_string(),
            })?;
            let expected = shard_of(r);
            let expected: Vec<(u32, &str, usize)> = expected
                .iter()
                .map(|(id, n, c)| (*id, n.as_str(), *c))
                .collect();
            snap.check_against(r as u32, self.rule.hyper(), &expected)
                .map_err(|e| Error::Checkpoint {
                    at,
                    message: e.with_path(&path).to_string(),
                })?;
            for k in snap.keys {
                let newer = best.get(&k.id).is_none_or(|(b, _)| k.version > b.version);
                if newer {
                    let key = RestoredKey {
                        version: k.version,
                        w: k.w,
                        m: k.m,
                    };
                    best.insert(k.id, (key, path.clone()));
                }
            }
        }
        if self.mode == Mode::Sync {
            let mut versions: Vec<(u32, u64, &PathBuf)> = best
                .iter()
                .map(|(id, (k, p))| (*id, k.version, p))
                .collect();
            versions.sort_by_key(|v| v.0);
            if let (Some(lo), Some(hi)) = (
                versions.iter().min_by_key(|v| v.1),
                versions.iter().max_by_key(|v| v.1),
            ) && lo.1 != hi.1
            {
                let name = |id: u32| {
                    self.params
                        .get(id as usize)
                        .map_or("?", |(n, _)| n.as_str())
                        .to_string()
                };
                return Err(Error::Checkpoint {
                    at: At::rank(0),
                    message: format!(
                        "the checkpoint in {} is torn (written while a server failed?): '{}' is at \
                         version {} at best (in {}) and '{}' at {} (in {}); in Sync every key is \
                         at one step",
                        dir.display(),
                        name(lo.0),
                        lo.1,
                        lo.2.display(),
                        name(hi.0),
                        hi.1,
                        hi.2.display()
                    ),
                });
            }
        }
        Ok(Arc::new(
            best.into_iter().map(|(id, (k, _))| (id, k)).collect(),
        ))
    }

    /// Opens the devices and returns the servers (ranks `0..servers`) and workers.
    pub fn build(self) -> Result<(Vec<PsServer>, Vec<PsWorker>)> {
        let bad = |message: String| Error::InvalidArgument {
            at: At::rank(0),
            message,
        };
        if self.servers == 0 || self.workers == 0 {
            return Err(bad(
                "a parameter server needs at least one server and one worker".into(),
            ));
        }
        if self.backups >= self.workers {
            return Err(bad(format!(
                "{} backups leave no required worker out of {}",
                self.backups, self.workers
            )));
        }
        if self.replicas == 0 || self.replicas > self.servers {
            return Err(bad(format!(
                "{} replicas need between 1 and {} servers",
                self.replicas, self.servers
            )));
        }
        let ranks = self
            .servers
            .checked_add(self.workers)
            .filter(|&r| u32::try_from(r).is_ok());
        let Some(ranks) = ranks.filter(|_| u32::try_from(self.params.len()).is_ok()) else {
            return Err(bad(
                "too many parameters or ranks for the wire's u32 fields".into(),
            ));
        };
        let mut seen = std::collections::HashSet::new();
        for (name, init) in &self.params {
            if !seen.insert(name.as_str()) {
                return Err(bad(format!("parameter '{name}' is given twice")));
            }
            if init.is_empty() {
                return Err(bad(format!("parameter '{name}' is empty")));
            }
            // The wire carries counts as u32.
            if u32::try_from(init.len()).is_err() {
                return Err(bad(format!(
                    "parameter '{name}' has {} elements; at most {} fit a frame",
                    init.len(),
                    u32::MAX
                )));
            }
        }
        let group = CommGroup::builder()
            .ranks(ranks)
            .config(self.config.clone())
            .links(self.links.clone())
            .build()?;
        let keys: Vec<(String, usize)> = self
            .params
            .iter()
            .map(|(n, v)| (n.clone(), v.len()))
            .collect();
        let chain = |k: usize| -> Vec<usize> {
            (0..self.replicas).map(|j| (k + j) % self.servers).collect()
        };
        // Every shard read and checked before any server starts from it.
        let restored = match &self.restore {
            Some(dir) => {
                let shard_of = |r: usize| -> Vec<(u32, String, usize)> {
                    self.params
                        .iter()
                        .enumerate()
                        .filter(|(k, _)| chain(*k).contains(&r))
                        .map(|(k, (n, v))| (k as u32, n.clone(), v.len()))
                        .collect()
                };
                Some(self.read_restore(dir, &shard_of)?)
            }
            None => None,
        };
        let worker_ranks: Vec<usize> = (self.servers..ranks).collect();
        let mut servers = Vec::new();
        let mut workers = Vec::new();
        for comm in group.into_communicators() {
            let r = comm.rank();
            if r < self.servers {
                let shard: Vec<ShardKey> = self
                    .params
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| chain(*k).contains(&r))
                    .map(|(k, (n, v))| ShardKey {
                        key: k,
                        name: n.clone(),
                        init: v.clone(),
                        chain: chain(k),
                    })
                    .collect();
                let policy = Policy {
                    mode: self.mode,
                    backups: self.backups,
                    quorum: self.quorum.unwrap_or(self.workers / 2 + 1).max(1),
                    servers: self.servers,
                    consistency: self.consistency,
                    keys: self.params.len(),
                    checkpoint_dir: self.checkpoint_dir.clone(),
                    restored: restored.clone(),
                };
                servers.push(PsServer::new(
                    comm,
                    shard,
                    worker_ranks.clone(),
                    policy,
                    Arc::clone(&self.rule),
                )?);
            } else {
                let owners = (0..keys.len()).map(chain).collect();
                workers.push(PsWorker::new(
                    comm,
                    r - self.servers,
                    keys.clone(),
                    owners,
                    self.servers,
                    self.consistency,
                ));
            }
        }
        Ok((servers, workers))
    }
}
