//! Building a group of communicators, and group calls from one thread over all ranks.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use wgpu::{AdapterInfo, Device, Queue};

use super::communicator::{CallOptions, Collective, CommConfig, Communicator};
use crate::algo::Algorithm;
use crate::deadline::deadline_after;
use crate::device::{
    AdapterSelector, RankDevice, TensorRef, discover, next_adapter_token, same_physical,
};
use crate::error::{At, Error, Result};
use crate::link::{LinkStack, in_process_mesh};
use crate::model::{CostModel, Figures, Probe};
use crate::types::ReduceOp;

/// Timed rounds of each of the call probe's algorithms (see `CommGroup::probe_calls`).
pub(super) const CALL_SAMPLES: usize = 25;

/// The most ranks one process links: each rank opens a device, and the in-process mesh has a
/// channel per pair of ranks (a wild count must fail, not allocate until memory runs out).
pub const MAX_RANKS: usize = 1024;

/// Builds a [`CommGroup`]; see [`CommGroup::builder`].
#[derive(Clone, Debug)]
pub struct GroupBuilder {
    ranks: usize,
    selector: AdapterSelector,
    config: CommConfig,
    /// Set by [`timeout`](GroupBuilder::timeout): wins over `config`'s, whichever came first.
    timeout: Option<Duration>,
    /// Set by [`slice_bytes`](GroupBuilder::slice_bytes): wins over `config`'s likewise.
    slice_bytes: Option<usize>,
    links: LinkStack,
}

impl GroupBuilder {
    /// Number of ranks (default 2). With fewer adapters than ranks, ranks share adapters round
    /// robin, each with its own device.
    pub fn ranks(mut self, ranks: usize) -> Self {
        self.ranks = ranks;
        self
    }

    /// Which adapters to use.
    pub fn adapters(mut self, selector: AdapterSelector) -> Self {
        self.selector = selector;
        self
    }

    /// All settings at once. A [`timeout`](Self::timeout) or [`slice_bytes`](Self::slice_bytes)
    /// given to this builder, before or after, overrides `config`'s.
    pub fn config(mut self, config: CommConfig) -> Self {
        self.config = config;
        self
    }

    /// Default deadline of each collective (kept by a later [`config`](Self::config)).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Pipeline slice size in bytes (kept by a later [`config`](Self::config)).
    pub fn slice_bytes(mut self, bytes: usize) -> Self {
        self.slice_bytes = Some(bytes);
        self
    }

    /// Wrappers around every rank's link (an emulated network, injected faults) for tests and
    /// benches (default none). The group keeps them: its rebuilds wrap the fresh links alike.
    ///
    /// ```no_run
    /// # fn main() -> wccl::Result<()> {
    /// use wccl::CommGroup;
    /// use wccl::link::{FaultPlan, LinkStack};
    /// let faults = FaultPlan::new();
    /// let group = CommGroup::builder()
    ///     .ranks(3)
    ///     .links(LinkStack::new().faults(faults.clone()))
    ///     .build()?;
    /// faults.kill(2); // rank 2's frames vanish from now on
    /// # Ok(()) }
    /// ```
    pub fn links(mut self, links: LinkStack) -> Self {
        self.links = links;
        self
    }

    /// The settings the group will get: [`config`](Self::config)'s, with this builder's own
    /// [`timeout`](Self::timeout) and [`slice_bytes`](Self::slice_bytes) on top.
    pub fn settings(&self) -> CommConfig {
        let mut config = self.config.clone();
        if let Some(timeout) = self.timeout {
            config.timeout = timeout;
        }
        if let Some(bytes) = self.slice_bytes {
            config.slice_bytes = bytes;
        }
        config
    }

    /// Finds the adapters, opens one device per rank, and links the ranks in this process.
    pub fn build(self) -> Result<CommGroup> {
        if self.ranks == 0 || self.ranks > MAX_RANKS {
            return Err(Error::InvalidArgument {
                at: At::rank(0),
                message: format!(
                    "a group needs 1 to {MAX_RANKS} ranks in one process, not {}",
                    self.ranks
                ),
            });
        }
        // Instances of discovery's own, enabling only the backends it enumerates.
        let adapters = discover(&self.selector)?;
        let tokens: Vec<u64> = adapters.iter().map(|_| next_adapter_token()).collect();
        let devices = (0..self.ranks)
            .map(|r| {
                let a = r % adapters.len();
                let mut dev = RankDevice::open(r, &adapters[a])?;
                dev.set_adapter_token(tokens[a]);
                Ok(dev)
            })
            .collect::<Result<Vec<_>>>()?;
        let config = self.settings();
        Ok(CommGroup::link(devices, config, self.links))
    }
}

/// The ranks of one process, each with its device and its links to the others.
///
/// ```no_run
/// # fn main() -> wccl::Result<()> {
/// use wccl::{CommGroup, ReduceOp};
/// let mut group = CommGroup::builder().ranks(4).build()?;
/// let bufs = (0..4)
///     .map(|r| group.comm(r).upload(&vec![r as f32; 1000]))
///     .collect::<wccl::Result<Vec<_>>>()?;
/// group.all_reduce(&bufs.iter().map(|b| b.view()).collect::<Vec<_>>(), ReduceOp::Sum)?;
/// assert_eq!(group.comm(2).download(&bufs[2])?[0], 6.0);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct CommGroup {
    comms: Vec<Communicator>,
    /// What wraps each rank's link, kept for [`rebuild`](Self::rebuild).
    links: LinkStack,
}

impl CommGroup {
    /// A builder: 2 ranks over the default adapters, default settings.
    pub fn builder() -> GroupBuilder {
        GroupBuilder {
            ranks: 2,
            selector: AdapterSelector::default(),
            config: CommConfig::default(),
            timeout: None,
            slice_bytes: None,
            links: LinkStack::default(),
        }
    }

    /// A group over devices the caller already has, one rank per `(Device, Queue)` in order,
    /// with plain links. On Vulkan, devices of an instance made with `InstanceFlags::DEBUG`
    /// (wgpu's default in debug builds) can crash the process while other threads make or drop
    /// groups: see the crate's README, "`WGPU_DEBUG`".
    pub fn from_devices(devices: Vec<(Device, Queue)>, config: CommConfig) -> Result<CommGroup> {
        if devices.is_empty() {
            return Err(Error::InvalidArgument {
                at: At::rank(0),
                message: "a group needs at least one device".into(),
            });
        }
        let devices = devices
            .into_iter()
            .enumerate()
            .map(|(r, (d, q))| RankDevice::from_wgpu(r, d, q))
            .collect();
        Ok(CommGroup::link(devices, config, LinkStack::default()))
    }

    fn link(devices: Vec<RankDevice>, config: CommConfig, links: LinkStack) -> CommGroup {
        let n = devices.len();
        let (mesh, failed) = match links.mesh(n) {
            Ok(m) => (m, None),
            // Loopback sockets that cannot be made (no ports left): every rank gets channels it
            // cannot use and reports why at its first call, rather than a panic here.
            Err(e) => (
                in_process_mesh(n)
                    .into_iter()
                    .map(|l| Box::new(l) as Box<dyn crate::link::Link>)
                    .collect(),
                Some(e),
            ),
        };
        let comms = devices
            .into_iter()
            .zip(mesh)
            .map(|(dev, link)| {
                let mut c = Communicator::new(dev, link, config.clone()).with_links(links.clone());
                if let Some(e) = &failed {
                    c.set_broken(e.clone());
                }
                c
            })
            .collect();
        CommGroup { comms, links }
    }

    /// Rebuilds the group in place from the same devices, with fresh links (wrapped as the old
    /// ones were, by the same fault plan) and no error: what to do after a collective failed.
    /// Abort handles of the old communicators no longer affect the new ones.
    pub fn rebuild(&mut self) {
        let (devices, config, _) = Self::into_parts(std::mem::take(&mut self.comms));
        let links = std::mem::take(&mut self.links);
        *self = CommGroup::link(devices, config, links);
    }

    /// The group's survivors go on without the ranks that failed, as each rank of a
    /// multi-process job does for itself with [`Communicator::recover`]: a thin wrapper that runs
    /// every rank's `recover` at once (each holding failed the rank its own error named, if it
    /// names one), then keeps the communicators of the survivors, renumbered in their old order.
    /// Returns the failed ranks (in the old numbering). Unlike [`rebuild`](Self::rebuild), which
    /// makes every rank fresh links from one place and keeps them all, this drops the failed
    /// ones and keeps the links (see [`Communicator::shrink`]).
    ///
    /// # Errors
    /// The survivors' error when the agreement leaves no quorum ([`Error::NoQuorum`]), else the
    /// first rank's error, or survivors that reached different decisions; the group's
    /// communicators then refuse calls until a [`rebuild`](Self::rebuild).
    pub fn recover(&mut self) -> Result<Vec<usize>> {
        let results = self.run_each(|c| {
            let suspects: Vec<usize> = match c.broken() {
                Some(
                    Error::LinkClosed { peer, .. }
                    | Error::PeerExited { peer, .. }
                    | Error::Corrupt { peer, .. },
                ) if *peer != c.rank() => vec![*peer],
                _ => Vec::new(),
            };
            c.recover(&suspects)
        });
        // The decision, as every survivor reached it; the failed ranks' own results are errors.
        let mut agreed: Option<Vec<usize>> = None;
        let mut first_error = None;
        for (r, x) in results.iter().enumerate() {
            // (Checked whole below.)
            match x {
                Ok(failed) if !failed.contains(&r) => {
                    agreed.get_or_insert_with(|| failed.clone());
                }
                Ok(_) => {}
                Err(e) => {
                    if first_error.is_none() && !matches!(e, Error::Excluded { .. }) {
                        first_error = Some((r, e.clone()));
                    }
                }
            }
        }
        let Some(failed) = agreed else {
            // The survivors' verdict (no quorum) before a dead rank's own error.
            let no_quorum = results
                .iter()
                .enumerate()
                .find(|(_, x)| matches!(x, Err(Error::NoQuorum { .. })))
                .and_then(|(r, x)| x.as_ref().err().map(|e| (r, e.clone())));
            return Err(no_quorum.or(first_error).map_or_else(
                || Error::InvalidArgument {
                    at: At::rank(0),
                    message: "no rank of the group recovered".into(),
                },
                |(_, e)| e,
            ));
        };
        // Every survivor must have reached that decision: two groups are not one.
        if let Some((r, x)) = results
            .iter()
            .enumerate()
            .find(|(r, x)| !failed.contains(r) && x.as_ref().ok() != Some(&failed))
        {
            let e = match x {
                Err(e) => e.clone(),
                Ok(other) => Error::InvalidArgument {
                    at: At::rank(r),
                    message: format!(
                        "the survivors disagree: rank {r} holds {other:?} failed, others {failed:?}"
                    ),
                },
            };
            // Some may have shrunk already: none may run a call in a group that is not one.
            for c in &mut self.comms {
                c.set_broken(e.clone());
            }
            return Err(e);
        }
        let comms = std::mem::take(&mut self.comms);
        self.comms = comms
            .into_iter()
            .enumerate()
            .filter(|(r, _)| !failed.contains(r))
            .map(|(_, c)| c)
            .collect();
        Ok(failed)
    }

    /// Like [`rebuild`](Self::rebuild), from communicators taken out with
    /// [`into_communicators`](Self::into_communicators), in rank order. Each communicator
    /// remembers the [`LinkStack`] its group wrapped its link with, so the fresh links get the
    /// first one's, as [`rebuild`](Self::rebuild) would give them (communicators made with
    /// [`Communicator::new`] have none).
    pub fn rebuild_from(comms: Vec<Communicator>) -> CommGroup {
        let (devices, config, links) = Self::into_parts(comms);
        CommGroup::link(devices, config, links)
    }

    /// The devices in rank order, with the first communicator's settings and link stack.
    fn into_parts(comms: Vec<Communicator>) -> (Vec<RankDevice>, CommConfig, LinkStack) {
        let mut first = None;
        let devices = comms
            .into_iter()
            .map(|c| {
                let (dev, config, links) = c.into_parts();
                first.get_or_insert((config, links));
                dev
            })
            .collect();
        let (config, links) = first.unwrap_or_default();
        (devices, config, links)
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.comms.len()
    }

    /// Rank `r`'s communicator (for uploads, downloads and other `&self` calls).
    ///
    /// # Panics
    /// If `r` is not a rank of the group; [`get`](Self::get) does not panic.
    pub fn comm(&self, r: usize) -> &Communicator {
        &self.comms[r]
    }

    /// Rank `r`'s communicator, mutably (for its collectives and settings).
    ///
    /// # Panics
    /// If `r` is not a rank of the group; [`get_mut`](Self::get_mut) does not panic.
    pub fn comm_mut(&mut self, r: usize) -> &mut Communicator {
        &mut self.comms[r]
    }

    /// Rank `r`'s communicator, or `None` if `r` is not a rank of the group.
    pub fn get(&self, r: usize) -> Option<&Communicator> {
        self.comms.get(r)
    }

    /// Rank `r`'s communicator mutably, or `None` if `r` is not a rank of the group.
    pub fn get_mut(&mut self, r: usize) -> Option<&mut Communicator> {
        self.comms.get_mut(r)
    }

    /// The adapters of the ranks, in rank order.
    pub fn adapters(&self) -> Vec<AdapterInfo> {
        self.comms
            .iter()
            .map(|c| c.device().info().clone())
            .collect()
    }

    /// The communicators, for calling them from one thread per rank.
    pub fn into_communicators(self) -> Vec<Communicator> {
        self.comms
    }

    /// Runs `f` on every rank at once, each on its own thread; returns each rank's result.
    pub fn run_each<R: Send>(
        &mut self,
        f: impl Fn(&mut Communicator) -> Result<R> + Sync,
    ) -> Vec<Result<R>> {
        let f = &f;
        let results: Vec<Result<R>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .comms
                .iter_mut()
                .map(|c| {
                    let rank = c.rank();
                    (
                        rank,
                        s.spawn(move || {
                            // A panic is caught on the rank's own thread, so its peers, blocked
                            // in the same call, are told at once rather than at their deadline.
                            let caught =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    f(&mut *c)
                                }));
                            caught.unwrap_or_else(|p| {
                                let e = Error::Panicked {
                                    at: At::rank(rank),
                                    message: panic_message(&p),
                                };
                                c.abort(&e);
                                Err(e)
                            })
                        }),
                    )
                })
                .collect();
            handles
                .into_iter()
                .map(|(rank, h)| {
                    h.join().unwrap_or_else(|p| {
                        Err(Error::Panicked {
                            at: At::rank(rank),
                            message: panic_message(&p),
                        })
                    })
                })
                .collect()
        });
        results
    }

    /// Measures every device alone and all together (see
    /// [`Communicator::probe_device`]), and installs the resulting cost model on every rank, so
    /// that `Algorithm::Auto` picks what it predicts fastest. Returns the figures. Links
    /// emulating a network ([`LinkStack::emulate`](crate::link::LinkStack::emulate)) give
    /// the model its link terms from their settings.
    ///
    /// To time a call's fixed costs ([`Figures::call`], [`Figures::submit`]), a message's
    /// ([`Figures::frame`]) and what a device step waits for its peer's inside a call
    /// ([`Figures::wait`]) it runs 26 rounds each of barriers and tiny host-staged, naive and
    /// device-ring all-reduces on every rank through [`run`](Self::run) (so `call` is what a
    /// call made that way costs, its threads' start and join included): they advance the
    /// ranks' call sequence and their `bytes_sent`, `device_bytes` and `mapped_calls` counters, set
    /// `last_algorithm`, and, if one fails, leave the communicators broken as any failed call
    /// does.
    pub fn probe(&mut self, bytes: usize) -> Result<Probe> {
        let n = self.size();
        let alone = (0..n)
            .map(|r| self.comms[r].probe_device(bytes, &|| Ok(())))
            .collect::<Result<Vec<Figures>>>()?;
        let timeout = self.comms.first().map(|c| c.config().timeout);
        let barrier = ProbeBarrier::new(n, timeout.unwrap_or_default());
        let together = self
            .run_each(|c| {
                let at = At::rank(c.rank());
                // A rank that leaves early, by an error or a panic, releases the others.
                let leave = LeaveOnDrop(&barrier, at);
                let figures = c.probe_device_spans(bytes, &mut |_| barrier.wait(at))?;
                std::mem::forget(leave);
                Ok(figures)
            })
            .into_iter()
            .collect::<Result<Vec<(Figures, Figures)>>>()?;
        // Ranks that ran at once: the aggregate is n transfers in the span of the slowest rank
        // (summing rates would credit ranks that finished early with idle time, and medians
        // ranks whose repeats ran while others waited).
        let (together, spans): (Vec<Figures>, Vec<Figures>) = together.into_iter().unzip();
        let agg =
            |f: fn(&Figures) -> f64| n as f64 * spans.iter().map(f).fold(f64::INFINITY, f64::min);
        let together = Figures {
            upload: agg(|f| f.upload),
            readback: agg(|f| f.readback),
            copy: agg(|f| f.copy),
            reduce: agg(|f| f.reduce),
            host_reduce: agg(|f| f.host_reduce),
            host_cached: agg(|f| f.host_cached),
            // The ranks' mean: on shared cores each rank's median swings with the scheduler,
            // and the largest of them swings most.
            step: together.iter().map(|f| f.step).sum::<f64>() / n as f64,
            launch: together.iter().map(|f| f.launch).sum::<f64>() / n as f64,
            native_copy: agg(|f| f.native_copy),
            frame: 0.0,
            call: 0.0,
            submit: 0.0,
            wait: 0.0,
        };
        let devs: Vec<(&AdapterInfo, Option<u64>)> = self
            .comms
            .iter()
            .map(|c| (c.device().info(), c.device().adapter_token()))
            .collect();
        let shared = (0..n).any(|a| (0..a).any(|b| shares_adapter(devs[a], devs[b])));
        let unified = self.comms.iter().all(|c| c.device().unified_memory());
        let mut probe = Probe {
            alone,
            together,
            shared,
            bytes,
        };
        // An emulated network costs what its settings say (the model's link terms).
        let link = self.links.emulation().map(crate::model::LinkCost::from);
        self.probe_calls(&probe, unified, link)?.apply(&mut probe);
        for c in &mut self.comms {
            let slice = c.config().slice_bytes;
            c.set_cost_model(
                CostModel::new(probe.clone(), slice)
                    .with_unified_memory(unified)
                    .with_link(link),
            );
        }
        Ok(probe)
    }

    /// A call's fixed costs and a message's, timed as callers make calls, through
    /// [`run`](Self::run) round after round ([`CALL_SAMPLES`] of each after a warm-up, in
    /// turn, the medians): barriers and tiny host-staged, naive and device-ring all-reduces (one
    /// element per rank), solved by [`Rounds::solve`]: `call`, what any call made this way
    /// costs beyond its work (its threads started and joined, its plan); `submit`, what a call
    /// that submits to the device pays beyond it (its first submission, its last wait);
    /// `frame`, a message's (a frame sent and one taken, folded on the host, every rank busy);
    /// `wait`, what a device step that needs its peer's step first costs in a call beyond the
    /// probe's own step. All 0 on one rank.
    fn probe_calls(
        &mut self,
        probe: &Probe,
        unified: bool,
        link: Option<crate::model::LinkCost>,
    ) -> Result<Calls> {
        let n = self.size();
        if n < 2 {
            return Ok(Calls::default());
        }
        let bufs = self
            .comms
            .iter()
            .map(|c| c.upload(&vec![0f32; n]))
            .collect::<Result<Vec<_>>>()?;
        // `run` hands rank r the r-th call: the group's ranks must be 0..n in order, as the
        // buffers are.
        if let Some((i, c)) = self.comms.iter().enumerate().find(|(i, c)| c.rank() != *i) {
            return Err(Error::InvalidArgument {
                at: At::rank(c.rank()),
                message: format!("the group's rank {i} is rank {} of its link", c.rank()),
            });
        }
        let staged: Vec<Collective<'_>> = bufs
            .iter()
            .map(|b| Collective::AllReduce {
                input: b.view(),
                output: b.view(),
                op: ReduceOp::Sum,
            })
            .collect();
        let barriers = vec![Collective::Barrier; n];
        // A failure fails the probe: no recovery among survivors inside a measurement.
        let opts = |algo| CallOptions {
            algorithm: Some(algo),
            on_failure: Some(super::survive::OnFailure::Error),
            ..CallOptions::default()
        };
        let mut times = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for i in 0..=CALL_SAMPLES {
            let kinds = [
                (&barriers, Algorithm::Staged),
                (&staged, Algorithm::Staged),
                (&staged, Algorithm::Naive),
                (&staged, Algorithm::Ring),
            ];
            for (k, (calls, algo)) in kinds.into_iter().enumerate() {
                let t = Instant::now();
                self.run(calls, opts(algo))?;
                if i > 0 {
                    times[k].push(t.elapsed().as_secs_f64());
                }
            }
        }
        let [barrier, staged, naive, ring] = times.map(|mut v| {
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        });
        // What the figures alone predict of each round (no call, submission or frame cost yet),
        // for these tensors: mapped in place where every device has unified memory, as
        // `upload` makes them.
        let slice = self.comms.first().map_or(1, |c| c.config().slice_bytes);
        let bare = CostModel::new(probe.clone(), slice)
            .with_unified_memory(unified)
            .with_link(link);
        let bytes = n.saturating_mul(4);
        let rounds = Rounds {
            barrier,
            staged,
            naive,
            staged_rest: bare
                .predict_for(Algorithm::Staged, bytes, true, unified)
                .seconds,
            naive_rest: bare
                .predict_for(Algorithm::Naive, bytes, true, false)
                .seconds,
            ring,
            ring_rest: bare
                .predict_for(Algorithm::Ring, bytes, true, false)
                .seconds,
        };
        Ok(rounds.solve(n, unified, link.map_or(0.0, |l| l.alpha())))
    }

    /// Runs one call per rank (in rank order) at once; the first rank's error, if any.
    pub fn run(&mut self, calls: &[Collective<'_>], opts: CallOptions) -> Result<()> {
        if calls.len() != self.size() {
            return Err(Error::InvalidArgument {
                at: At::rank(0),
                message: format!("{} calls for {} ranks", calls.len(), self.size()),
            });
        }
        first_error(self.run_each(|c| c.run(calls[c.rank()], opts).map(drop)))
    }

    /// In-place all-reduce over every rank's tensor.
    pub fn all_reduce(&mut self, bufs: &[TensorRef<'_>], op: ReduceOp) -> Result<()> {
        let calls: Vec<_> = bufs
            .iter()
            .map(|&b| Collective::AllReduce {
                input: b,
                output: b,
                op,
            })
            .collect();
        self.run(&calls, CallOptions::default())
    }

    /// Out-of-place all-reduce.
    pub fn all_reduce_into(
        &mut self,
        inputs: &[TensorRef<'_>],
        outputs: &[TensorRef<'_>],
        op: ReduceOp,
    ) -> Result<()> {
        let calls = pairs(inputs, outputs, |input, output| Collective::AllReduce {
            input,
            output,
            op,
        });
        self.run(&calls, CallOptions::default())
    }

    /// Reduce-scatter over every rank.
    pub fn reduce_scatter(
        &mut self,
        inputs: &[TensorRef<'_>],
        outputs: &[TensorRef<'_>],
        op: ReduceOp,
    ) -> Result<()> {
        let calls = pairs(inputs, outputs, |input, output| Collective::ReduceScatter {
            input,
            output,
            op,
        });
        self.run(&calls, CallOptions::default())
    }

    /// All-gather over every rank.
    pub fn all_gather(
        &mut self,
        inputs: &[TensorRef<'_>],
        outputs: &[TensorRef<'_>],
    ) -> Result<()> {
        let calls = pairs(inputs, outputs, |input, output| Collective::AllGather {
            input,
            output,
        });
        self.run(&calls, CallOptions::default())
    }

    /// In-place broadcast from `root`.
    pub fn broadcast(&mut self, bufs: &[TensorRef<'_>], root: usize) -> Result<()> {
        let calls = pairs(bufs, bufs, |input, output| Collective::Broadcast {
            input,
            output,
            root,
        });
        self.run(&calls, CallOptions::default())
    }

    /// Out-of-place broadcast: every rank's `outputs[r]` becomes `input`, the root's tensor.
    pub fn broadcast_into<'a>(
        &mut self,
        input: TensorRef<'a>,
        outputs: &[TensorRef<'a>],
        root: usize,
    ) -> Result<()> {
        // Non-root ranks never read their input: they name their output there.
        let calls: Vec<_> = outputs
            .iter()
            .enumerate()
            .map(|(r, &output)| Collective::Broadcast {
                input: if r == root { input } else { output },
                output,
                root,
            })
            .collect();
        self.run(&calls, CallOptions::default())
    }

    /// Out-of-place reduce: `output`, on the root's device, becomes the reduction of every
    /// rank's `inputs[r]`; no other rank needs an output.
    pub fn reduce_into<'a>(
        &mut self,
        inputs: &[TensorRef<'a>],
        output: TensorRef<'a>,
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        // Non-root ranks never write their output: they name their input there.
        let calls: Vec<_> = inputs
            .iter()
            .enumerate()
            .map(|(r, &input)| Collective::Reduce {
                input,
                output: if r == root { output } else { input },
                op,
                root,
            })
            .collect();
        self.run(&calls, CallOptions::default())
    }

    /// In-place reduce to `root`.
    pub fn reduce(&mut self, bufs: &[TensorRef<'_>], op: ReduceOp, root: usize) -> Result<()> {
        let calls = pairs(bufs, bufs, |input, output| Collective::Reduce {
            input,
            output,
            op,
            root,
        });
        self.run(&calls, CallOptions::default())
    }

    /// Barrier over every rank.
    pub fn barrier(&mut self) -> Result<()> {
        let calls = vec![Collective::Barrier; self.size()];
        self.run(&calls, CallOptions::default())
    }
}

/// Whether two ranks' devices run on one physical adapter: by PCI bus id where both drivers
/// report one; else by the adapter object discovery opened them on; else (devices the caller
/// brought, no bus ids) when their adapters look the same, which errs towards "shared".
/// Each side is a device's adapter and its discovery token.
fn shares_adapter(a: (&AdapterInfo, Option<u64>), b: (&AdapterInfo, Option<u64>)) -> bool {
    let ((ia, ta), (ib, tb)) = (a, b);
    if !ia.device_pci_bus_id.is_empty() && !ib.device_pci_bus_id.is_empty() {
        return same_physical(ia, ib).unwrap_or(false);
    }
    match (ta, tb) {
        (Some(x), Some(y)) => x == y,
        _ => {
            let key = |i: &AdapterInfo| (i.name.clone(), i.backend, i.vendor, i.device);
            key(ia) == key(ib)
        }
    }
}

/// The rendezvous of [`CommGroup::probe`]'s ranks before each measurement: every wait has the
/// communicators' timeout as its deadline, and a rank that fails releases the others at once
/// with an error instead of leaving them blocked (as `std::sync::Barrier` would).
struct ProbeBarrier {
    state: Mutex<BarrierState>,
    cv: Condvar,
    n: usize,
    timeout: Duration,
}

struct BarrierState {
    arrived: usize,
    generation: u64,
    /// The first rank that left without finishing.
    failed: Option<usize>,
}

impl ProbeBarrier {
    fn new(n: usize, timeout: Duration) -> Self {
        ProbeBarrier {
            state: Mutex::new(BarrierState {
                arrived: 0,
                generation: 0,
                failed: None,
            }),
            cv: Condvar::new(),
            n,
            timeout,
        }
    }

    /// Blocks until every rank has arrived, a rank has failed, or the deadline passes.
    fn wait(&self, at: At) -> Result<()> {
        let started = Instant::now();
        let deadline = deadline_after(self.timeout);
        let poisoned = || Error::Panicked {
            at,
            message: "a probing rank panicked holding the probe barrier".into(),
        };
        let mut s = self.state.lock().map_err(|_| poisoned())?;
        let failed = |s: &BarrierState| {
            s.failed.map(|peer| Error::PeerAborted {
                at,
                peer,
                reason: "its probe failed".into(),
            })
        };
        if let Some(e) = failed(&s) {
            return Err(e);
        }
        let generation = s.generation;
        s.arrived += 1;
        if s.arrived == self.n {
            s.arrived = 0;
            s.generation = s.generation.wrapping_add(1);
            self.cv.notify_all();
            return Ok(());
        }
        while s.generation == generation {
            if let Some(e) = failed(&s) {
                return Err(e);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // This rank gives up too: the others must not wait for it either.
                s.failed.get_or_insert(at.rank);
                self.cv.notify_all();
                return Err(Error::Timeout {
                    at,
                    waiting_on: Vec::new(),
                    waited: started.elapsed(),
                });
            }
            s = self.cv.wait_timeout(s, left).map_err(|_| poisoned())?.0;
        }
        Ok(())
    }

    /// Marks `rank` as gone and wakes everyone waiting.
    fn leave(&self, rank: usize) {
        // A poisoned lock still holds a usable state: releasing the others matters more.
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.failed.get_or_insert(rank);
        self.cv.notify_all();
    }
}

/// Calls [`ProbeBarrier::leave`] when dropped (forgotten on success).
struct LeaveOnDrop<'a>(&'a ProbeBarrier, At);

impl Drop for LeaveOnDrop<'_> {
    fn drop(&mut self) {
        self.0.leave(self.1.rank);
    }
}

fn pairs<'a>(
    a: &[TensorRef<'a>],
    b: &[TensorRef<'a>],
    f: impl Fn(TensorRef<'a>, TensorRef<'a>) -> Collective<'a>,
) -> Vec<Collective<'a>> {
    a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
}

fn first_error(results: Vec<Result<()>>) -> Result<()> {
    results.into_iter().collect()
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// What [`CommGroup::probe`]'s rounds of calls measure (see [`Figures`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Calls {
    pub(super) call: f64,
    pub(super) frame: f64,
    pub(super) submit: f64,
    /// What a device step that needs a peer's step first costs beyond the probe's `step`, s.
    pub(super) wait: f64,
}

impl Calls {
    /// Gives every rank's figures and the together ones these costs.
    pub(super) fn apply(&self, probe: &mut Probe) {
        for f in probe.alone.iter_mut().chain([&mut probe.together]) {
            f.call = self.call;
            f.frame = self.frame;
            f.submit = self.submit;
            f.wait = self.wait;
        }
    }
}

/// The median rounds of the call probe, and what the other figures predict of the staged,
/// naive and ring ones (no call, submission, frame or wait cost), seconds.
#[derive(Clone, Copy, Debug)]
pub(super) struct Rounds {
    pub(super) barrier: f64,
    pub(super) staged: f64,
    pub(super) naive: f64,
    pub(super) staged_rest: f64,
    pub(super) naive_rest: f64,
    pub(super) ring: f64,
    pub(super) ring_rest: f64,
}

impl Rounds {
    /// Solves for a call's, a submission's, a frame's and a step's wait on `n` ranks, with
    /// `alpha` seconds of emulated latency a message. The barrier is frames only: n-1 around
    /// the ring, from [`TREE_MIN_RANKS`](super::communicator::TREE_MIN_RANKS) ranks ceil(log2
    /// n) rounds of dissemination; the staged ring's busiest rank handles 2(n-1), naive's root
    /// n-1; the device ring takes 2(n-1) steps and as many frames, naive one step.
    ///
    /// ```text
    /// barrier = call + b (frame + alpha)
    /// staged  = call + 2(n-1) frame + staged_rest  (+ submit off unified memory)
    /// naive   = call + submit + (n-1) frame + naive_rest
    /// ring    = call + submit + 2(n-1) (frame + wait) + ring_rest
    /// ```
    ///
    /// `wait` is what a device step in a chain through peers costs beyond the probe's `step`
    /// (see [`Figures::wait`]): the ring's 2(n-1) steps are such a chain, naive's and the
    /// staged ring's device steps are not (each rank reads its own buffer back, and uploads
    /// the result once it has it: one wait a call, in `submit`). The rests (the figures' own
    /// predictions) carry the link's latencies where the model has a link.
    ///
    /// In mapped tensors (`unified`) the staged ring submits nothing (its two map waits fall
    /// into `frame` and `call`), and the barrier and it set `frame` apart from the noisier
    /// device steps in `naive_rest`; elsewhere it submits as naive does, and the frame comes
    /// from the two of them. A cost that noise makes negative is 0. All 0 on one rank.
    pub(super) fn solve(&self, n: usize, unified: bool, alpha: f64) -> Calls {
        if n < 2 {
            return Calls::default();
        }
        let c = (n - 1) as f64;
        let b = if n < super::communicator::TREE_MIN_RANKS {
            c
        } else {
            f64::from(n.next_power_of_two().ilog2())
        };
        let staged = self.staged - self.staged_rest;
        let naive = self.naive - self.naive_rest;
        let frame = if unified {
            // 2(n-1) - b is at least n-1: b is n-1, or log2 of n >= 16.
            (staged - self.barrier + b * alpha) / (2.0 * c - b)
        } else {
            (staged - naive) / c
        }
        .max(0.0);
        let call = (self.barrier - b * (frame + alpha)).max(0.0);
        let submit = (naive - c * frame - call).max(0.0);
        // What the ring's round leaves after its call, frames and submission: a wait for each
        // of its 2(n-1) steps.
        let wait =
            ((self.ring - self.ring_rest - call - submit - 2.0 * c * frame) / (2.0 * c)).max(0.0);
        Calls {
            call,
            frame,
            submit,
            wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgpu::{Backend, DeviceType};

    fn h100(bus: &str) -> AdapterInfo {
        let mut i = AdapterInfo::new(DeviceType::DiscreteGpu, Backend::Vulkan);
        (i.name, i.vendor, i.device) = ("NVIDIA H100 80GB HBM3".into(), 0x10de, 0x2330);
        i.device_pci_bus_id = bus.into();
        i
    }

    /// Rounds made from known costs by the probe's own equations give those costs back, on
    /// and off unified memory, on the ring barrier's rank counts and the dissemination's, with
    /// and without link latency; rounds that noise makes too short give 0, not less.
    #[test]
    fn the_call_probe_solves_its_rounds() {
        let want = Calls {
            call: 100e-6,
            frame: 20e-6,
            submit: 50e-6,
            wait: 70e-6,
        };
        for n in [2, 3, 4, 8, 16, 20, 64] {
            let c = (n - 1) as f64;
            let b = if n < 16 { c } else { (n as f64).log2().ceil() };
            for unified in [true, false] {
                for alpha in [0.0, 30e-6] {
                    let (staged_rest, naive_rest) = (7e-6 + 2.0 * c * alpha, 300e-6 + 2.0 * alpha);
                    let ring_rest = 900e-6 + 2.0 * c * alpha;
                    let rounds = Rounds {
                        barrier: want.call + b * (want.frame + alpha),
                        staged: want.call
                            + 2.0 * c * want.frame
                            + staged_rest
                            + if unified { 0.0 } else { want.submit },
                        naive: want.call + want.submit + c * want.frame + naive_rest,
                        staged_rest,
                        naive_rest,
                        ring: want.call
                            + want.submit
                            + 2.0 * c * (want.frame + want.wait)
                            + ring_rest,
                        ring_rest,
                    };
                    let got = rounds.solve(n, unified, alpha);
                    assert_calls(got, want, &format!("n {n} unified {unified} alpha {alpha}"));
                }
            }
        }
        // Rounds that noise made too short: a staged round shorter than the barrier (mapped)
        // or than naive's (staged through host memory) gives no negative frame, and the
        // barrier is all call; a naive round shorter than its steps, no negative submission; a
        // ring round that leaves less than its submission, no negative wait.
        let noisy = Rounds {
            barrier: 100e-6,
            staged: 90e-6,
            naive: 500e-6,
            staged_rest: 0.0,
            naive_rest: 100e-6,
            ring: 350e-6,
            ring_rest: 0.0,
        };
        for unified in [true, false] {
            let got = noisy.solve(4, unified, 0.0);
            assert_eq!(got.frame, 0.0, "{got:?}");
            assert_eq!(got.wait, 0.0, "{got:?}");
            assert!((got.call - 100e-6).abs() < 1e-12, "{got:?}");
            assert!((got.submit - 300e-6).abs() < 1e-12, "{got:?}");
        }
        let noisy = Rounds {
            naive: 200e-6,
            naive_rest: 400e-6,
            ..noisy
        };
        assert_eq!(noisy.solve(4, true, 0.0).submit, 0.0);
        assert_eq!(noisy.solve(1, true, 0.0), Calls::default());
    }

    /// Every cost of `got` within a nanosecond of `want`'s.
    fn assert_calls(got: Calls, want: Calls, case: &str) {
        for (g, w) in [
            (got.call, want.call),
            (got.frame, want.frame),
            (got.submit, want.submit),
            (got.wait, want.wait),
        ] {
            assert!((g - w).abs() < 1e-9, "{case}: {got:?}");
        }
    }

    /// The solve's equations are the model's own arithmetic: rounds that a model with known
    /// call, frame, submission and wait costs predicts, with rests that the same model without
    /// them predicts, solve back to those costs, on one adapter and apart, on and off unified
    /// memory.
    #[test]
    fn the_call_probe_solves_what_the_model_predicts() {
        use crate::model::{CostModel, Figures, Probe};
        let alone = Figures {
            upload: 2e9,
            readback: 3e9,
            copy: 5e8,
            reduce: 3e8,
            host_reduce: 6e9,
            step: 150e-6,
            native_copy: 4e9,
            launch: 100e-6,
            ..Figures::default()
        };
        let costs = Calls {
            call: 200e-6,
            frame: 20e-6,
            submit: 80e-6,
            wait: 120e-6,
        };
        for n in [2, 3, 4, 8] {
            let c = (n - 1) as f64;
            for shared in [false, true] {
                for unified in [false, true] {
                    let bare = Probe {
                        alone: vec![alone; n],
                        together: Figures {
                            step: 250e-6,
                            ..alone
                        },
                        shared,
                        bytes: 1 << 20,
                    };
                    let mut full = bare.clone();
                    costs.apply(&mut full);
                    let time = |p: &Probe, algo, mapped| {
                        CostModel::new(p.clone(), 4 << 20)
                            .with_unified_memory(unified)
                            .predict_for(algo, 4 * n, true, mapped)
                            .seconds
                    };
                    let rounds = Rounds {
                        // Below 16 ranks the barrier goes round the ring: n-1 frames.
                        barrier: costs.call + c * costs.frame,
                        staged: time(&full, Algorithm::Staged, unified),
                        naive: time(&full, Algorithm::Naive, false),
                        staged_rest: time(&bare, Algorithm::Staged, unified),
                        naive_rest: time(&bare, Algorithm::Naive, false),
                        ring: time(&full, Algorithm::Ring, false),
                        ring_rest: time(&bare, Algorithm::Ring, false),
                    };
                    let got = rounds.solve(n, unified, 0.0);
                    assert_calls(
                        got,
                        costs,
                        &format!("n {n} shared {shared} unified {unified}"),
                    );
                }
            }
        }
    }

    #[test]
    fn shared_means_one_physical_adapter() {
        let (a, b) = (h100("0000:18:00.0"), h100("0000:2a:00.0"));
        // Identical GPUs with distinct bus ids: not shared, whatever else matches.
        assert!(!shares_adapter((&a, Some(0)), (&b, Some(0))));
        assert!(!shares_adapter((&a, None), (&b, None)));
        // The same bus id: shared, even through two adapter objects.
        assert!(shares_adapter((&a, Some(1)), (&a.clone(), Some(2))));
        // No bus ids: the adapter object discovery opened them on decides.
        let (c, d) = (h100(""), h100(""));
        assert!(!shares_adapter((&c, Some(3)), (&d, Some(4))));
        assert!(shares_adapter((&c, Some(3)), (&d, Some(3))));
        // Devices the caller brought, no bus ids: alike adapters count as shared.
        assert!(shares_adapter((&c, None), (&d, None)));
        let mut e = h100("");
        e.device = 0x2331;
        assert!(!shares_adapter((&c, None), (&e, None)));
    }

    /// Runs `n` threads through the barrier; `leaver` (if any) drops its guard instead of
    /// arriving. Returns each waiter's result, by rank.
    fn round(n: usize, leaver: Option<usize>, timeout: Duration) -> Vec<Result<()>> {
        let barrier = ProbeBarrier::new(n, timeout);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|r| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        let at = At::rank(r);
                        let guard = LeaveOnDrop(barrier, at);
                        if leaver == Some(r) {
                            drop(guard);
                            return Ok(());
                        }
                        let res = barrier.wait(at);
                        std::mem::forget(guard);
                        res
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| panic!("a barrier thread panicked"))
                })
                .collect()
        })
    }

    #[test]
    fn the_barrier_lets_everyone_through_together() {
        let res = round(3, None, Duration::from_secs(30));
        assert!(res.iter().all(|r| r.is_ok()), "{res:?}");
    }

    #[test]
    fn a_rank_that_fails_releases_the_others_at_once() {
        // Without the release the others would end at the deadline with `Timeout` instead.
        let res = round(3, Some(1), Duration::from_secs(20));
        for r in [0, 2] {
            assert!(
                matches!(&res[r], Err(Error::PeerAborted { peer: 1, .. })),
                "rank {r}: {:?}",
                res[r]
            );
        }
    }

    #[test]
    fn a_rank_that_never_comes_ends_the_wait_at_the_deadline() {
        let barrier = ProbeBarrier::new(2, Duration::from_millis(50));
        let e = barrier.wait(At::rank(0)).expect_err("rank 1 never arrives");
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
        // The rank that gave up is marked, so a late arrival does not wait in turn.
        let e = barrier.wait(At::rank(1)).expect_err("rank 0 gave up");
        assert!(matches!(e, Error::PeerAborted { peer: 0, .. }), "{e}");
    }
}
