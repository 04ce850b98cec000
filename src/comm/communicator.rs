//! The per-rank communicator: validates a call, asks the algorithm for a plan, runs it.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::executor::{Call, Engine, execute};
use super::protocol::{Header, NONE};
use super::survive::{Attempt, Kept};
pub use super::survive::{OnFailure, Outcome};
use crate::algo::{self, Algorithm, Plan};
use crate::deadline::{deadline_after, deadline_from};
use crate::device::{DeviceBuffer, RankDevice, TensorRef};
use crate::error::{At, Error, Result};
use crate::link::{Link, LinkStack, RemoteAbort, SubLink};
use crate::model::CostModel;
use crate::types::{CollectiveKind, DType, Element, ReduceOp};

/// The deepest pipeline a communicator builds: a deeper one only allocates staging buffers (a
/// wild setting must not allocate without bound).
pub const MAX_PIPELINE_DEPTH: usize = 64;

/// Settings shared by every rank of a communicator group.
///
/// Non-exhaustive, so that new settings are not breaking changes: start from
/// [`CommConfig::default`] and chain the setters.
///
/// ```
/// use std::time::Duration;
/// use wccl::{Algorithm, CommConfig};
/// let config = CommConfig::default()
///     .timeout(Duration::from_secs(5))
///     .slice_bytes(1 << 20)
///     .algorithm(Algorithm::Central);
/// assert_eq!(config.timeout, Duration::from_secs(5));
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CommConfig {
    /// Deadline of each collective unless the call sets its own (default 30 s, as Gloo).
    pub timeout: Duration,
    /// Pipeline slice: the largest piece read back, sent and reduced at once (default 4 MiB).
    pub slice_bytes: usize,
    /// Read-backs and uploads in flight per rank (default 3; at least 1, at most
    /// [`MAX_PIPELINE_DEPTH`]: each one is a pair of staging buffers).
    pub pipeline_depth: usize,
    /// Caps the storage-binding size the kernels use below the device's own limit, to exercise
    /// chunking on small buffers; `None` uses the device limit.
    pub max_binding_bytes: Option<u64>,
    /// How all-reduces run unless the call says otherwise (default `Ring`); `Staged` also runs
    /// reduce-scatter and all-gather on host memory, and `Auto` runs them as the cost model
    /// predicts faster, on host memory or on the device ring (every other value leaves them on
    /// the device ring). Every rank must use the same: ranks that differ fail the call with a
    /// mismatch.
    pub algorithm: Algorithm,
    /// What a call does when a rank fails during it, unless the call says otherwise (default
    /// [`OnFailure::Error`]). Set [`OnFailure::FinishAmongSurvivors`] here rather than per
    /// call: every rank's every call then takes part in the recovery (see [`OnFailure`]).
    pub on_failure: OnFailure,
}

impl Default for CommConfig {
    fn default() -> Self {
        CommConfig {
            timeout: Duration::from_secs(30),
            slice_bytes: 4 << 20,
            pipeline_depth: 3,
            max_binding_bytes: None,
            algorithm: Algorithm::Ring,
            on_failure: OnFailure::Error,
        }
    }
}

impl CommConfig {
    /// Sets [`timeout`](Self::timeout), the default deadline of each collective.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets [`slice_bytes`](Self::slice_bytes), the pipeline slice.
    pub fn slice_bytes(mut self, bytes: usize) -> Self {
        self.slice_bytes = bytes;
        self
    }

    /// Sets [`pipeline_depth`](Self::pipeline_depth), the read-backs in flight per rank.
    pub fn pipeline_depth(mut self, depth: usize) -> Self {
        self.pipeline_depth = depth;
        self
    }

    /// Sets [`max_binding_bytes`](Self::max_binding_bytes) (a value or `None`).
    pub fn max_binding_bytes(mut self, bytes: impl Into<Option<u64>>) -> Self {
        self.max_binding_bytes = bytes.into();
        self
    }

    /// Sets [`algorithm`](Self::algorithm), how all-reduces (and, `Staged` or `Auto`,
    /// reduce-scatters and all-gathers) run by default.
    pub fn algorithm(mut self, algorithm: Algorithm) -> Self {
        self.algorithm = algorithm;
        self
    }

    /// Sets [`on_failure`](Self::on_failure), what calls do when a rank fails during them.
    pub fn on_failure(mut self, on_failure: OnFailure) -> Self {
        self.on_failure = on_failure;
        self
    }
}

/// Per-call settings.
#[derive(Clone, Copy, Debug, Default)]
pub struct CallOptions {
    /// This call's deadline, instead of the communicator's.
    pub timeout: Option<Duration>,
    /// This call's algorithm, instead of the communicator's: an all-reduce's; a reduce-scatter's
    /// or an all-gather's where it is `Staged` or `Auto` (see
    /// [`CommConfig::algorithm`](crate::CommConfig::algorithm); any other runs them as the
    /// device ring); other collectives ignore it.
    pub algorithm: Option<Algorithm>,
    /// What this call does when a rank fails during it, instead of the communicator's.
    pub on_failure: Option<OnFailure>,
    /// Skip stragglers: see [`skip_after`](Self::skip_after).
    pub skip_after: Option<Duration>,
}

impl CallOptions {
    /// Options with this call's deadline.
    pub fn timeout(timeout: Duration) -> Self {
        CallOptions {
            timeout: Some(timeout),
            ..Self::default()
        }
    }

    /// These options, with what the call does when a rank fails during it.
    ///
    /// ```
    /// use wccl::{CallOptions, OnFailure};
    /// let opts = CallOptions::default().on_failure(OnFailure::FinishAmongSurvivors);
    /// assert_eq!(opts.on_failure, Some(OnFailure::FinishAmongSurvivors));
    /// ```
    pub fn on_failure(mut self, on_failure: OnFailure) -> Self {
        self.on_failure = Some(on_failure);
        self
    }

    /// These options, skipping stragglers: an all-reduce runs among the ranks that entered it
    /// within `after` of rank 0, instead of waiting for the slowest, as backup workers do for
    /// a parameter server. The [`Outcome`] names the ranks it skipped; their inputs are not in
    /// the result, their outputs are left as they were, and they take part again in the first
    /// call they reach in time (a rank that is always late is always skipped). Every rank must
    /// pass it. Rank 0 decides, and is never skipped. For all-reduce only, and not yet with
    /// [`OnFailure::FinishAmongSurvivors`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use wccl::CallOptions;
    /// let opts = CallOptions::default().skip_after(Duration::from_millis(20));
    /// assert_eq!(opts.skip_after, Some(Duration::from_millis(20)));
    /// ```
    pub fn skip_after(mut self, after: Duration) -> Self {
        self.skip_after = Some(after);
        self
    }
}

/// One collective call, with its tensors (which live on this rank's device).
///
/// Non-exhaustive: new collectives are not breaking changes, so a `match` needs a `_` arm.
///
/// In-place calls pass the same tensor as input and output; for `ReduceScatter` in place means
/// the output is this rank's chunk of the input, for `AllGather` that the input is this rank's
/// piece of the output (NCCL's conventions).
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum Collective<'a> {
    /// Every rank's output becomes the reduction of all inputs.
    AllReduce {
        /// This rank's contribution.
        input: TensorRef<'a>,
        /// Where the result goes (same length).
        output: TensorRef<'a>,
        /// The operator.
        op: ReduceOp,
    },
    /// Rank r's output becomes chunk r of the reduction of all inputs (`input.count ==
    /// ranks * output.count`).
    ReduceScatter {
        /// This rank's contribution, `ranks * output.count` elements.
        input: TensorRef<'a>,
        /// This rank's chunk of the result.
        output: TensorRef<'a>,
        /// The operator.
        op: ReduceOp,
    },
    /// Every rank's output becomes all inputs concatenated in rank order (`output.count ==
    /// ranks * input.count`).
    AllGather {
        /// This rank's piece.
        input: TensorRef<'a>,
        /// All pieces.
        output: TensorRef<'a>,
    },
    /// Every rank's output becomes the root's input (non-root inputs are not read).
    Broadcast {
        /// The data, read on the root only.
        input: TensorRef<'a>,
        /// Where it goes (same length).
        output: TensorRef<'a>,
        /// The sending rank.
        root: usize,
    },
    /// The root's output becomes the reduction of all inputs (non-root outputs are not written).
    Reduce {
        /// This rank's contribution.
        input: TensorRef<'a>,
        /// The result, written on the root only.
        output: TensorRef<'a>,
        /// The operator.
        op: ReduceOp,
        /// The receiving rank.
        root: usize,
    },
    /// Returns once every rank has entered the barrier.
    Barrier,
}

impl Collective<'_> {
    /// Which collective this is.
    pub fn kind(&self) -> CollectiveKind {
        match self {
            Collective::AllReduce { .. } => CollectiveKind::AllReduce,
            Collective::ReduceScatter { .. } => CollectiveKind::ReduceScatter,
            Collective::AllGather { .. } => CollectiveKind::AllGather,
            Collective::Broadcast { .. } => CollectiveKind::Broadcast,
            Collective::Reduce { .. } => CollectiveKind::Reduce,
            Collective::Barrier => CollectiveKind::Barrier,
        }
    }
}

/// One rank's handle on a group: its device, its links to the other ranks, and the collectives.
///
/// Build a group with [`CommGroup`](crate::CommGroup); then either call collectives on every
/// rank from that rank's own thread (take the communicators with
/// [`CommGroup::into_communicators`](crate::CommGroup::into_communicators)), or make group calls
/// from one thread.
///
/// Every call has a deadline. When a call fails (a timeout, a peer that disagrees about the
/// call, a peer that aborted, a device error), the other ranks are told, every rank returns an
/// error naming the operation, its sequence number and the rank at fault, and the communicator
/// stays broken until the group is rebuilt with
/// [`CommGroup::rebuild`](crate::CommGroup::rebuild).
///
/// `Communicator` is `Sync`, so that a reference can be shared with threads that read its state.
/// Device errors are recorded per rank, not per call: two `&self` calls running at once on one
/// communicator (two `read`s, say) may see each other's device error. Make such calls from one
/// thread at a time.
pub struct Communicator {
    pub(super) rank: usize,
    pub(super) size: usize,
    pub(crate) engine: Engine,
    /// Shared, so that a call among some ranks (see `straggle.rs`) can run over a view of it.
    pub(super) link: Arc<dyn Link>,
    pub(super) config: CommConfig,
    pub(super) seq: u64,
    /// Shrinks so far; the link's frames carry it once non-zero (see [`shrink`](Self::shrink)).
    pub(super) epoch: u32,
    /// Agreements since the last shrink (each runs in an epoch of its own).
    pub(super) agreements: u32,
    /// Whether an agreement ran since the last shrink: its frames may still be on the links,
    /// and only a shrink's new epoch drops them, so no call runs until then.
    pub(super) agreed: bool,
    pub(super) broken: Option<Error>,
    pub(super) cost_model: Option<CostModel>,
    pub(super) last_algorithm: Option<Algorithm>,
    /// Aborts of other epochs, kept for the sub-link of theirs (see `link::sub`).
    pub(super) stash: crate::link::AbortStash,
    /// The reason an [`AbortHandle`] gave, once one fired (shared with every handle).
    pub(super) aborted: Arc<OnceLock<String>>,
    /// The wrappers [`CommGroup`](crate::CommGroup) put around `link`, so that a group rebuilt
    /// from its communicators alone wraps its fresh links the same way (none when built with
    /// [`new`](Self::new)).
    links: LinkStack,
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("seq", &self.seq)
            .field("config", &self.config)
            .field("broken", &self.broken)
            .field("last_algorithm", &self.last_algorithm)
            .finish_non_exhaustive()
    }
}

impl Communicator {
    /// A communicator over `dev` that reaches its peers through `link`.
    pub fn new(dev: RankDevice, link: Box<dyn Link>, config: CommConfig) -> Self {
        let limit_bytes = config.max_binding_bytes.unwrap_or(u64::MAX).min(
            dev.limits()
                .max_storage_buffer_binding_size
                .min(u32::MAX as u64),
        );
        let slice = (config.slice_bytes.max(4) as u64)
            .min(limit_bytes / 2)
            .max(4);
        let engine = Engine::new(
            dev,
            slice,
            config.pipeline_depth.clamp(1, MAX_PIPELINE_DEPTH),
            config.max_binding_bytes,
        );
        let config = CommConfig {
            slice_bytes: slice as usize,
            ..config
        };
        Communicator {
            rank: link.rank(),
            size: link.size(),
            engine,
            link: Arc::from(link),
            config,
            seq: 0,
            epoch: 0,
            agreements: 0,
            agreed: false,
            broken: None,
            cost_model: None,
            last_algorithm: None,
            aborted: Arc::new(OnceLock::new()),
            stash: Arc::default(),
            links: LinkStack::default(),
        }
    }

    /// Continues among the survivors of a failure: this communicator becomes one over the
    /// ranks not in `failed`, renumbered in their old order (rank 3 of 4 is rank 2 of 3 once
    /// rank 1 is out), over the same links and device, with no error and the sequence numbers
    /// starting again. Each survivor calls it for itself, with the same `failed` set; there is
    /// no group-level object to rebuild.
    ///
    /// Whatever the failed call left on the links (frames the survivors sent each other, their
    /// aborts) never reaches the shrunk communicator: its frames carry a new epoch (see
    /// [`SubLink`]). Abort handles of the old communicator no longer affect it.
    ///
    /// The survivors must agree on `failed` (a rank that passes another set is in another
    /// group, and its calls fail on the header checks or the deadline), and none may call the
    /// shrunk communicator before every survivor has returned from the failed call:
    /// [`agree`](Self::agree) (or [`recover`](Self::recover)) gives both. A
    /// [`FaultPlan`](crate::link::FaultPlan) keeps naming ranks as they were numbered when the
    /// group was built.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `failed` names this rank or a rank outside the group; the
    /// communicator is then unchanged.
    ///
    /// ```
    /// # fn main() -> wccl::Result<()> {
    /// use wccl::{CommGroup, ReduceOp};
    /// use wccl::link::{FaultPlan, LinkStack};
    /// let faults = FaultPlan::new();
    /// let g = CommGroup::builder().ranks(3).links(LinkStack::new().faults(faults.clone())).build()?;
    /// let mut comms = g.into_communicators();
    /// faults.kill(1);
    /// drop(comms.remove(1)); // rank 1 is gone
    /// for c in &mut comms {
    ///     c.shrink(&[1])?;
    /// }
    /// assert_eq!((comms[1].rank(), comms[1].size()), (1, 2));
    /// # Ok(()) }
    /// ```
    pub fn shrink(&mut self, failed: &[usize]) -> Result<()> {
        let at = At::rank(self.rank);
        let invalid = |message: String| Err(Error::InvalidArgument { at, message });
        if let Some(&r) = failed.iter().find(|&&r| r >= self.size) {
            return invalid(format!(
                "rank {r} is not a rank of this group of {}",
                self.size
            ));
        }
        if failed.contains(&self.rank) {
            return invalid(format!(
                "this rank ({}) is among the failed ranks {failed:?}",
                self.rank
            ));
        }
        let members: Vec<usize> = (0..self.size).filter(|r| !failed.contains(r)).collect();
        // Checked before the link is taken apart: the error path below is unreachable.
        if let Err(message) = SubLink::<&dyn Link>::check(&members, self.link.size(), self.rank) {
            return invalid(message);
        }
        let epoch = self.epoch.saturating_add(1);
        let placeholder: Arc<dyn Link> = match crate::link::in_process_mesh(1).pop() {
            Some(l) => Arc::new(l),
            None => return invalid("internal: no placeholder link".into()),
        };
        let old = std::mem::replace(&mut self.link, placeholder);
        // `members` is sorted, holds this rank and only ranks of the link: `new` cannot fail.
        match SubLink::new(old, members, epoch) {
            Ok(sub) => {
                let sub = sub.with_stash(Arc::clone(&self.stash));
                self.rank = sub.rank();
                self.size = sub.size();
                self.link = Arc::new(sub);
            }
            Err(message) => {
                let e = Error::InvalidArgument {
                    at,
                    message: format!("internal: {message}"),
                };
                self.broken = Some(e.clone());
                return Err(e);
            }
        }
        self.reset_after_membership_change(epoch);
        Ok(())
    }

    /// Revokes the communicator, as ULFM's `MPIX_Comm_revoke`: every peer's pending and later
    /// calls fail with [`Error::Revoked`] naming this rank and `reason`, and so do this rank's
    /// own. Call it from the rank's thread between calls; from another thread (the rank blocked
    /// in a call), use [`AbortHandle::revoke`]. Afterwards the ranks
    /// [`recover`](Self::recover) (`recover(&[])` when no rank failed) to go on.
    ///
    /// Except where an earlier failure got there first: a peer whose communicator was already
    /// broken keeps reporting that error ([`Error::Broken`]), and a peer whose current call
    /// failed otherwise before the revoke arrived (another rank's abort, a deadline) reports
    /// that. Either way the peer's calls fail until the ranks recover.
    pub fn revoke(&mut self, reason: &str) {
        self.link.abort(&format!("{REVOKE}{reason}"));
        self.broken = Some(Error::Revoked {
            at: At::rank(self.rank),
            by: self.rank,
            reason: reason.to_string(),
        });
    }

    /// Agrees with the other survivors of a failure on which ranks failed, as ULFM's
    /// `MPIX_Comm_agree`: every survivor gets the same sorted list, to pass to
    /// [`shrink`](Self::shrink) (or call [`recover`](Self::recover) for both). `suspects` are
    /// ranks this rank already holds failed (the rank its error named, say; empty is fine: a
    /// dead rank is found by the agreement itself). It ends even when more ranks die during it:
    /// a coordinator collects for at most the communicator's timeout, a rank waits at most
    /// twice that for each coordinator, and there are at most as many coordinators as ranks.
    /// A rank silent for the communicator's timeout from this rank's start is held failed:
    /// every side of a partition ends after about one timeout, the minority with
    /// [`Error::NoQuorum`].
    /// The protocol, and what it does not guarantee under a second failure at the wrong
    /// moment, is in `comm/agree.rs`.
    ///
    /// Every survivor must call it, within the communicator's timeout of the others (or be
    /// held failed), the same number of times between shrinks, and then
    /// [`shrink`](Self::shrink) to the agreed set (`shrink(&[])` if it is empty) before its
    /// next call: until then calls are refused, since the agreement's messages may still be on
    /// the links.
    ///
    /// # Errors
    /// - [`Error::NoQuorum`]: the agreement left no more than half of the ranks (a partitioned
    ///   minority, say); this side must not go on by itself.
    /// - [`Error::Excluded`]: the others agreed that this rank failed.
    /// - [`Error::InvalidArgument`]: a suspect that is this rank or not a rank of the group.
    pub fn agree(&mut self, suspects: &[usize]) -> Result<Vec<usize>> {
        // Checked before the count moves: a refused call must not put this rank's agreements
        // out of step with its peers'.
        if let Some(&r) = suspects.iter().find(|&&r| r >= self.size || r == self.rank) {
            return Err(Error::InvalidArgument {
                at: At::rank(self.rank),
                message: format!(
                    "suspect {r} is this rank or not a rank of this group of {}",
                    self.size
                ),
            });
        }
        self.agree_with_progress(suspects, 0)
            .map(|d| d.failed.into_iter().collect())
    }

    /// [`agree`](Self::agree), each rank also reporting its `progress` (see
    /// `agree::agree_progress`); `suspects` are checked by the caller.
    pub(super) fn agree_with_progress(
        &mut self,
        suspects: &[usize],
        progress: u64,
    ) -> Result<super::agree::Decided> {
        self.agreements = self.agreements.wrapping_add(1);
        self.agreed = true;
        // Unique per (shrink, agreement), and never a communicator's epoch (the top bit).
        let epoch = ((self.epoch & 0x7fff) << 16) | (self.agreements & 0xffff);
        let stray = std::mem::take(&mut self.engine.stray);
        super::agree::agree_progress(
            &*self.link,
            Some(Arc::clone(&self.stash)),
            suspects,
            progress,
            stray,
            epoch,
            self.config.timeout,
            At::rank(self.rank),
        )
    }

    /// [`agree`](Self::agree), then [`shrink`](Self::shrink) to the survivors; returns the
    /// failed ranks (in the old numbering).
    pub fn recover(&mut self, suspects: &[usize]) -> Result<Vec<usize>> {
        let failed = self.agree(suspects)?;
        self.shrink(&failed)?;
        Ok(failed)
    }

    /// How many times this communicator was shrunk (0 for a fresh one).
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Records the stack `link` was wrapped with, for a rebuild (see the `links` field).
    /// Marks the communicator broken from the start (its links could not be made).
    pub(crate) fn set_broken(&mut self, e: Error) {
        self.broken = Some(e);
    }

    pub(crate) fn with_links(mut self, links: LinkStack) -> Self {
        self.links = links;
        self
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }

    /// This rank's device.
    pub fn device(&self) -> &RankDevice {
        &self.engine.dev
    }

    /// The settings in force.
    pub fn config(&self) -> &CommConfig {
        &self.config
    }

    /// Sets the default deadline of later calls.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.config.timeout = timeout;
    }

    /// The error that broke this communicator, if one did.
    pub fn broken(&self) -> Option<&Error> {
        self.broken.as_ref()
    }

    /// Sequence number of the last call (0 before the first).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// A zeroed buffer of `len` elements on this rank's device.
    pub fn buffer<T: Element>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        DeviceBuffer::zeroed(&self.engine.dev, len)
    }

    /// A buffer on this rank's device holding `data`.
    pub fn upload<T: Element>(&self, data: &[T]) -> Result<DeviceBuffer<T>> {
        DeviceBuffer::from_slice_until(&self.engine.dev, data, deadline_after(self.config.timeout))
    }

    /// Reads a buffer of this rank's device back to the host.
    pub fn download<T: Element>(&self, buf: &DeviceBuffer<T>) -> Result<Vec<T>> {
        buf.read_until(&self.engine.dev, deadline_after(self.config.timeout))
    }

    /// Overwrites `buf` (on this rank's device) with `data`, which must have its length; waits
    /// at most the communicator's timeout for the copy.
    pub fn write<T: Element>(&self, buf: &DeviceBuffer<T>, data: &[T]) -> Result<()> {
        buf.write_until(&self.engine.dev, data, deadline_after(self.config.timeout))
    }

    /// Reads any tensor view on this rank's device back to the host, as elements of `T`.
    pub fn read<T: Element>(&self, t: TensorRef<'_>) -> Result<Vec<T>> {
        if t.dtype != T::DTYPE {
            return Err(Error::InvalidArgument {
                at: At::rank(self.rank),
                message: format!("reading a {} tensor as {}", t.dtype, T::DTYPE),
            });
        }
        crate::device::read_tensor(&self.engine.dev, &t, deadline_after(self.config.timeout))
            .map(|bytes| bytemuck::pod_collect_to_vec(&bytes))
    }

    /// `dst = op(dst, src)` element-wise on this rank's device with the reduce kernel, no
    /// communication (what a parameter server's aggregation and the kernel benchmark use).
    /// `Avg` is refused: it needs a count of contributions.
    pub fn reduce_local<'a>(
        &mut self,
        dst: impl Into<TensorRef<'a>>,
        src: impl Into<TensorRef<'a>>,
        op: ReduceOp,
    ) -> Result<()> {
        // Errors of this device work reach the rank's error store when the scope ends.
        let scope = self.engine.dev.error_scope();
        let (dst, src) = (dst.into(), src.into());
        let at = At::rank(self.rank);
        self.gate(at)?;
        let bad = |message: String| Err(Error::InvalidArgument { at, message });
        self.tensors(at, &src, &dst)?;
        if dst.count != src.count {
            return bad(format!("dst has {} elements, src {}", dst.count, src.count));
        }
        if dst.buffer == src.buffer {
            return bad("dst and src must be different buffers".into());
        }
        if op == ReduceOp::Avg {
            return bad("avg is not an element-wise operator; use sum and scale".into());
        }
        let e = &mut self.engine;
        let deadline = deadline_after(self.config.timeout);
        let per = e.kernels.max_elements_per_submit(dst.dtype);
        let es = dst.dtype.size() as u64;
        let mut last = None;
        let mut done = 0;
        while done < dst.count {
            let n = per.min(dst.count - done);
            let off = done as u64 * es;
            let mut enc = e.dev.device().create_command_encoder(&Default::default());
            e.kernels.encode(
                &e.dev,
                &mut enc,
                crate::kernels::KernelOp::Combine(op.combine()),
                dst.dtype,
                (dst.buffer, dst.offset + off),
                Some((src.buffer, src.offset + off)),
                n,
            );
            last = Some(e.kernels.submit(&e.dev, enc));
            done += n;
        }
        // End the scope before the wait, so that an error of this work is this call's.
        drop(scope);
        if let Some(idx) = last {
            e.dev
                .wait_submission(&idx, deadline)
                .map_err(|w| crate::device::wait_error(at, w))?;
        }
        e.dev.check(at)
    }

    /// In-place all-reduce.
    ///
    /// ```no_run
    /// # fn main() -> wccl::Result<()> {
    /// use wccl::{CommGroup, ReduceOp};
    /// let comms = CommGroup::builder().ranks(2).build()?.into_communicators();
    /// std::thread::scope(|s| {
    ///     for mut comm in comms {
    ///         s.spawn(move || -> wccl::Result<()> {
    ///             let buf = comm.upload(&[comm.rank() as f32; 4])?;
    ///             comm.all_reduce(&buf, ReduceOp::Sum)?;
    ///             assert_eq!(comm.download(&buf)?, vec![1.0; 4]);
    ///             Ok(())
    ///         });
    ///     }
    /// });
    /// # Ok(()) }
    /// ```
    pub fn all_reduce<'a>(&mut self, buf: impl Into<TensorRef<'a>>, op: ReduceOp) -> Result<()> {
        let t = buf.into();
        self.run(
            Collective::AllReduce {
                input: t,
                output: t,
                op,
            },
            CallOptions::default(),
        )
        .map(drop)
    }

    /// Out-of-place all-reduce.
    pub fn all_reduce_into<'a>(
        &mut self,
        input: impl Into<TensorRef<'a>>,
        output: impl Into<TensorRef<'a>>,
        op: ReduceOp,
    ) -> Result<()> {
        let (input, output) = (input.into(), output.into());
        self.run(
            Collective::AllReduce { input, output, op },
            CallOptions::default(),
        )
        .map(drop)
    }

    /// Reduce-scatter: `output` (n times shorter than `input`) gets this rank's chunk.
    pub fn reduce_scatter<'a>(
        &mut self,
        input: impl Into<TensorRef<'a>>,
        output: impl Into<TensorRef<'a>>,
        op: ReduceOp,
    ) -> Result<()> {
        let (input, output) = (input.into(), output.into());
        self.run(
            Collective::ReduceScatter { input, output, op },
            CallOptions::default(),
        )
        .map(drop)
    }

    /// All-gather: `output` (n times longer than `input`) gets every rank's input.
    pub fn all_gather<'a>(
        &mut self,
        input: impl Into<TensorRef<'a>>,
        output: impl Into<TensorRef<'a>>,
    ) -> Result<()> {
        let (input, output) = (input.into(), output.into());
        self.run(
            Collective::AllGather { input, output },
            CallOptions::default(),
        )
        .map(drop)
    }

    /// In-place broadcast from `root`.
    pub fn broadcast<'a>(&mut self, buf: impl Into<TensorRef<'a>>, root: usize) -> Result<()> {
        let t = buf.into();
        self.run(
            Collective::Broadcast {
                input: t,
                output: t,
                root,
            },
            CallOptions::default(),
        )
        .map(drop)
    }

    /// Out-of-place broadcast from `root`: every rank's `output` becomes the root's `input`.
    /// Only the root reads its `input`; other ranks may pass their `output` again.
    pub fn broadcast_into<'a>(
        &mut self,
        input: impl Into<TensorRef<'a>>,
        output: impl Into<TensorRef<'a>>,
        root: usize,
    ) -> Result<()> {
        let (input, output) = (input.into(), output.into());
        self.run(
            Collective::Broadcast {
                input,
                output,
                root,
            },
            CallOptions::default(),
        )
        .map(drop)
    }

    /// Out-of-place reduce to `root`: the root's `output` becomes the reduction of every rank's
    /// `input`. Only the root needs an output; other ranks pass `None` (an output they pass is
    /// not written). A root without an output fails the call on every rank.
    ///
    /// ```no_run
    /// # fn main() -> wccl::Result<()> {
    /// use wccl::{CommGroup, ReduceOp};
    /// let comms = CommGroup::builder().ranks(2).build()?.into_communicators();
    /// std::thread::scope(|s| {
    ///     for mut comm in comms {
    ///         s.spawn(move || -> wccl::Result<()> {
    ///             let input = comm.upload(&[comm.rank() as f32 + 1.0; 4])?;
    ///             if comm.rank() == 0 {
    ///                 let sum = comm.buffer::<f32>(4)?;
    ///                 comm.reduce_into(&input, Some(sum.view()), ReduceOp::Sum, 0)?;
    ///                 assert_eq!(comm.download(&sum)?, vec![3.0; 4]);
    ///             } else {
    ///                 comm.reduce_into(&input, None, ReduceOp::Sum, 0)?;
    ///             }
    ///             Ok(())
    ///         });
    ///     }
    /// });
    /// # Ok(()) }
    /// ```
    pub fn reduce_into<'a>(
        &mut self,
        input: impl Into<TensorRef<'a>>,
        output: Option<TensorRef<'a>>,
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        let input = input.into();
        let output = match output {
            Some(output) => output,
            // Non-root ranks never write their output (validation swaps in the input).
            None if self.rank != root => input,
            None => {
                return self.refuse(
                    CollectiveKind::Reduce,
                    format!("rank {root} is the root of this reduce and needs an output"),
                );
            }
        };
        self.run(
            Collective::Reduce {
                input,
                output,
                op,
                root,
            },
            CallOptions::default(),
        )
        .map(drop)
    }

    /// In-place reduce to `root`.
    pub fn reduce<'a>(
        &mut self,
        buf: impl Into<TensorRef<'a>>,
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        let t = buf.into();
        self.run(
            Collective::Reduce {
                input: t,
                output: t,
                op,
                root,
            },
            CallOptions::default(),
        )
        .map(drop)
    }

    /// Blocks until every rank has entered the barrier.
    pub fn barrier(&mut self) -> Result<()> {
        self.run(Collective::Barrier, CallOptions::default())
            .map(drop)
    }

    /// Runs any collective with per-call options; every other method ends here.
    ///
    /// Returns what the result holds: every rank's contribution, unless the call finished
    /// among the survivors of a failure ([`OnFailure::FinishAmongSurvivors`]), when the
    /// [`Outcome`] names the ranks whose contributions it holds and those it left out.
    pub fn run(&mut self, call: Collective<'_>, opts: CallOptions) -> Result<Outcome> {
        if let Some(after) = opts.skip_after {
            return self.run_skipping(call, opts, after);
        }
        match opts.on_failure.unwrap_or(self.config.on_failure) {
            OnFailure::Error => self
                .attempt(&call, opts, None)
                .result
                .map(|()| Outcome::everyone(&call, self.size)),
            OnFailure::FinishAmongSurvivors => self.run_surviving(call, opts),
        }
    }

    /// One try at a call. With `kept` (finishing among survivors), the input is first kept
    /// there if the call may overwrite it, and a commit round follows the call (see
    /// `survive.rs`).
    pub(super) fn attempt(
        &mut self,
        call: &Collective<'_>,
        opts: CallOptions,
        kept: Option<&mut Option<Kept>>,
    ) -> Attempt {
        let refused = |result| Attempt {
            result,
            complete: false,
            started: false,
        };
        if self.agreed {
            // Before the count moves: the call never started, on this rank or any.
            return refused(Err(Error::InvalidArgument {
                at: At::rank(self.rank),
                message: "this communicator ran an agreement: shrink it to the agreed failed \
                          ranks (`shrink(&[])` if none failed) before its next call; the \
                          agreement's messages are still on its links"
                    .into(),
            }));
        }
        self.seq += 1;
        let at = At {
            rank: self.rank,
            op: Some(call.kind()),
            seq: self.seq,
        };
        if let Some(e) = self.broken_error(at) {
            return refused(Err(e));
        }
        let started = Instant::now();
        // Aborted (or revoked) between calls: fail this call the same way, before anyone waits
        // on it.
        let aborted = self.handle_error(at);
        let deadline = deadline_from(started, opts.timeout.unwrap_or(self.config.timeout));
        let algorithm = opts.algorithm.unwrap_or(self.config.algorithm);
        let surviving =
            opts.on_failure.unwrap_or(self.config.on_failure) == OnFailure::FinishAmongSurvivors;
        let mut ran = false;
        let mut complete = false;
        let result = match aborted.map_or(Ok(()), Err).and_then(|()| {
            let planned = self.validate_and_plan(at, call, algorithm, surviving)?;
            if let Some(kept) = kept {
                self.keep_input(at, &planned, kept, deadline)?;
            }
            Ok(planned)
        }) {
            Err(e) => Err(e),
            Ok((plan, header, t)) => {
                ran = true;
                let c = Call {
                    at,
                    header,
                    dtype: t.map_or(DType::U32, |t| t.0.dtype),
                    tensors: t,
                    started,
                    deadline,
                };
                let done = execute(&mut self.engine, self.link.as_ref(), &c, &plan);
                complete = done.is_ok();
                match done {
                    Ok(()) if surviving => self.commit(&c),
                    other => other,
                }
            }
        };
        let result = result.map_err(|e| self.fail(at, e));
        Attempt {
            result,
            complete,
            started: ran,
        }
    }

    /// What a call (or the job's probe) that failed at `at` with `e` reports and leaves
    /// behind: the revoke instead, where this rank was revoked through a handle while the call
    /// failed otherwise (ended at its deadline, say, on a link that cannot wake it); the peers
    /// told, so that nobody waits for this rank until the deadline; the communicator broken.
    pub(super) fn fail(&mut self, at: At, e: Error) -> Error {
        let e = match self.aborted.get().and_then(|r| revoked(r)) {
            Some(reason) if !matches!(e, Error::Revoked { .. }) => {
                tracing::debug!(error = %e, "the call failed after this rank was revoked");
                Error::Revoked {
                    at,
                    by: self.rank,
                    reason: reason.to_string(),
                }
            }
            _ => e,
        };
        // An abort or a revoke that came from a peer has reached everyone already; this rank's
        // own revoke goes out as a revoke (again, if its handle could not send it).
        match &e {
            Error::Revoked { by, reason, .. } if *by == self.rank => {
                self.link.abort(&format!("{REVOKE}{reason}"));
            }
            Error::PeerAborted { .. } | Error::Revoked { .. } => {}
            // The call itself is wrong (bad arguments, ranks that disagree on it): peers
            // finishing among survivors must not run it again without this rank.
            // (A frame that is not a call's at all is a peer that left the call for an
            // agreement: not a disagreement about the call.)
            Error::InvalidArgument { .. } => self.link.abort(&format!("{NOT_RECOVERABLE}{e}")),
            Error::Mismatch { field, .. } if *field != super::protocol::NOT_A_CALL => {
                self.link.abort(&format!("{NOT_RECOVERABLE}{e}"))
            }
            _ => self.link.abort(&e.to_string()),
        }
        self.broken = Some(e.clone());
        tracing::warn!(error = %e, "collective failed");
        e
    }

    /// Fails a call of `kind` before it starts, as a failed call does (it takes a sequence
    /// number, breaks the communicator and tells the peers, so that none of them waits for
    /// this rank until its deadline): for arguments that no `Collective` can express.
    pub(super) fn refuse(&mut self, kind: CollectiveKind, message: String) -> Result<()> {
        self.seq += 1;
        let at = At {
            rank: self.rank,
            op: Some(kind),
            seq: self.seq,
        };
        if let Some(cause) = &self.broken {
            return Err(Error::Broken {
                at,
                cause: Box::new(cause.clone()),
            });
        }
        let e = Error::InvalidArgument { at, message };
        // The call itself is wrong: peers finishing among survivors must not go on without
        // this rank (see `attempt`).
        self.link.abort(&format!("{NOT_RECOVERABLE}{e}"));
        self.broken = Some(e.clone());
        Err(e)
    }

    /// Checks the call's arguments and builds this rank's plan and frame header.
    #[allow(clippy::type_complexity)]
    fn validate_and_plan<'a>(
        &mut self,
        at: At,
        call: &Collective<'a>,
        algorithm: Algorithm,
        surviving: bool,
    ) -> Result<(Plan, Header, Option<(TensorRef<'a>, TensorRef<'a>)>)> {
        let (n, r) = (self.size, self.rank);
        let slice = self.config.slice_bytes;
        // A device lost or broken since the last call fails this one before it starts.
        self.engine.dev.check(at)?;
        let bad = |message: String| Error::InvalidArgument { at, message };
        let check_root = |root: usize| {
            if root < n {
                Ok(())
            } else {
                Err(bad(format!("root {root} is not a rank of {n}")))
            }
        };
        let mut header = Header {
            seq: self.seq,
            count: 0,
            payload_bytes: 0,
            unit: 0,
            kind: call.kind().code(),
            dtype: NONE,
            op: NONE,
            root: NONE,
            ranks: n as u32,
            algo: NONE,
            _pad: 0,
        };
        let (plan, input, output, op) = match *call {
            Collective::AllReduce { input, output, op } => {
                self.tensors(at, &input, &output)?;
                if input.count != output.count {
                    return Err(bad(format!(
                        "input has {} elements, output {}",
                        input.count, output.count
                    )));
                }
                let in_place = disjoint_or_same(at, &input, &output)?;
                let se = slice / input.dtype.size();
                let count = input.count;
                let algorithm = self.resolve(call.kind(), algorithm, count, input.dtype);
                let plan = match algorithm {
                    Algorithm::Central => {
                        algo::central_all_reduce(n, r, 0, count, op, in_place, se)
                    }
                    Algorithm::Naive => algo::naive_all_reduce(n, r, 0, count, op, se),
                    Algorithm::Staged => algo::staged_ring_all_reduce(n, r, count, op, se),
                    Algorithm::HalvingDoubling => {
                        algo::halving_doubling_all_reduce(n, r, count, op, in_place, se)
                    }
                    Algorithm::StagedHalvingDoubling => {
                        algo::staged_halving_doubling_all_reduce(n, r, count, op, se)
                    }
                    Algorithm::Ring | Algorithm::Auto => {
                        algo::ring_all_reduce(n, r, count, op, in_place, se)
                    }
                };
                header.algo = algorithm.code();
                self.last_algorithm = Some(algorithm);
                header.count = count as u64;
                (plan, input, output, Some(op))
            }
            Collective::ReduceScatter { input, output, op } => {
                self.tensors(at, &input, &output)?;
                // Checked: the counts are the caller's, and a wrapped product could match.
                if n.checked_mul(output.count) != Some(input.count) {
                    return Err(bad(format!(
                        "input has {} elements; it must have ranks ({n}) x output ({})",
                        input.count, output.count,
                    )));
                }
                if !output.same_as(&input.slice(r * output.count, output.count)) {
                    disjoint_or_same(at, &input, &output)?;
                }
                let se = slice / input.dtype.size();
                // `Staged` on host memory, `Auto` as the model says, every other algorithm the
                // device ring (the header tells ranks that disagree apart).
                let algorithm = self.resolve(call.kind(), algorithm, input.count, input.dtype);
                let plan = if algorithm == Algorithm::Staged {
                    algo::staged_reduce_scatter(n, r, output.count, op, se)
                } else {
                    algo::ring_reduce_scatter(n, r, output.count, op, se)
                };
                header.algo = ring_or_staged(algorithm);
                self.last_algorithm = Some(algorithm);
                header.count = output.count as u64;
                (plan, input, output, Some(op))
            }
            Collective::AllGather { input, output } => {
                self.tensors(at, &input, &output)?;
                if n.checked_mul(input.count) != Some(output.count) {
                    return Err(bad(format!(
                        "output has {} elements; it must have ranks ({n}) x input ({})",
                        output.count, input.count,
                    )));
                }
                if !input.same_as(&output.slice(r * input.count, input.count)) {
                    disjoint_or_same(at, &input, &output)?;
                }
                let se = slice / input.dtype.size();
                // As reduce-scatter: `Staged` on host memory, `Auto` as the model says, else
                // the device ring.
                let algorithm = self.resolve(call.kind(), algorithm, output.count, input.dtype);
                let plan = if algorithm == Algorithm::Staged {
                    algo::staged_all_gather(n, r, input.count, se)
                } else {
                    algo::ring_all_gather(n, r, input.count, se)
                };
                header.algo = ring_or_staged(algorithm);
                self.last_algorithm = Some(algorithm);
                header.count = input.count as u64;
                (plan, input, output, None)
            }
            Collective::Broadcast {
                input,
                output,
                root,
            } => {
                check_root(root)?;
                // Non-root ranks never read their input: only the root's is checked.
                let input = if r == root { input } else { output };
                self.tensors(at, &input, &output)?;
                if input.count != output.count {
                    return Err(bad(format!(
                        "input has {} elements, output {}",
                        input.count, output.count
                    )));
                }
                disjoint_or_same(at, &input, &output)?;
                let se = slice / output.dtype.size();
                // Finishing among survivors, the commit round stands for the acknowledgements
                // (and the recovery knows which ranks of the chain hold the data).
                let plan = if surviving {
                    algo::chain_broadcast_data(n, r, root, output.count, se)
                } else if on_tree(n, output.count, output.dtype) {
                    header.algo = super::protocol::TREE;
                    algo::tree_broadcast(n, r, root, output.count, se)
                } else {
                    algo::chain_broadcast(n, r, root, output.count, se)
                };
                header.count = output.count as u64;
                header.root = root as u32;
                (plan, input, output, None)
            }
            Collective::Reduce {
                input,
                output,
                op,
                root,
            } => {
                check_root(root)?;
                // Non-root ranks never write their output: only the root's is checked.
                let output = if r == root { output } else { input };
                self.tensors(at, &input, &output)?;
                if input.count != output.count {
                    return Err(bad(format!(
                        "input has {} elements, output {}",
                        input.count, output.count
                    )));
                }
                disjoint_or_same(at, &input, &output)?;
                let se = slice / input.dtype.size();
                let plan = if !surviving && on_tree(n, input.count, input.dtype) {
                    header.algo = super::protocol::TREE;
                    algo::tree_reduce(n, r, root, input.count, op, se)
                } else {
                    algo::chain_reduce(n, r, root, input.count, op, se)
                };
                header.count = input.count as u64;
                header.root = root as u32;
                (plan, input, output, Some(op))
            }
            Collective::Barrier => {
                // Finishing among survivors, the ring barrier the recovery was built on.
                let plan = if surviving || n < TREE_MIN_RANKS {
                    algo::ring_barrier(n, r)
                } else {
                    header.algo = super::protocol::TREE;
                    algo::dissemination_barrier(n, r)
                };
                return Ok((plan, header, None));
            }
        };
        header.dtype = input.dtype.code();
        if let Some(op) = op {
            header.op = op.code();
        }
        Ok((plan, header, Some((input, output))))
    }

    /// What a call of `kind` whose larger tensor holds `count` elements runs. An all-reduce:
    /// `algorithm`, or for `Auto` what the cost model chooses (the ring without a model). A
    /// reduce-scatter or all-gather: `Staged` on host memory, `Auto` what the model predicts
    /// faster of that and the device ring (the ring without a model), every other algorithm
    /// the device ring.
    ///
    /// From the call's size and the model alone, which every rank holds alike, never from
    /// this rank's own tensors, device or placement (ranks may mix in-place and out-of-place
    /// calls, as in NCCL): ranks that chose differently would fail the call. The model says
    /// whether every rank's device maps tensors in place; a rank whose own tensors cannot be
    /// mapped then runs the staged ring through staging buffers.
    fn resolve(
        &self,
        kind: CollectiveKind,
        algorithm: Algorithm,
        count: usize,
        dtype: DType,
    ) -> Algorithm {
        debug_assert!(
            matches!(
                kind,
                CollectiveKind::AllReduce
                    | CollectiveKind::ReduceScatter
                    | CollectiveKind::AllGather
            ),
            "resolve is for the calls the model knows, not {kind}"
        );
        let all_reduce = kind == CollectiveKind::AllReduce;
        match (algorithm, &self.cost_model) {
            (Algorithm::Auto, Some(m)) => m
                .choose_call(kind, count.saturating_mul(dtype.size()), false)
                .unwrap_or(Algorithm::Ring),
            (Algorithm::Auto, None) => Algorithm::Ring,
            (a, _) if all_reduce => a,
            (Algorithm::Staged, _) => Algorithm::Staged,
            _ => Algorithm::Ring,
        }
    }

    /// Installs the cost model that `Algorithm::Auto` consults. Every rank must hold the same
    /// model; [`CommGroup::probe`](crate::CommGroup::probe) installs one on all ranks.
    pub fn set_cost_model(&mut self, model: CostModel) {
        self.cost_model = Some(model);
    }

    /// A handle that aborts this communicator from any thread (a watchdog's, typically): see
    /// [`AbortHandle`]. Every handle of a communicator shares one state; a group rebuilt with
    /// [`CommGroup::rebuild`](crate::CommGroup::rebuild) has fresh communicators, whose
    /// handles are new ones.
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle {
            rank: self.rank,
            aborted: Arc::clone(&self.aborted),
            remote: self.link.remote_abort(),
        }
    }

    /// Breaks this communicator with `error` and tells the peers, as a failed collective does:
    /// for work between collectives (a rank's own kernels) that fails on one rank, so that the
    /// others leave their next collective at once with [`Error::PeerAborted`] instead of waiting
    /// for the deadline. Rebuild the group afterwards (or, when ranks died, let the survivors
    /// [`recover`](Self::recover)).
    pub fn abort(&mut self, error: &Error) {
        if self.broken.is_none() {
            match error {
                Error::Revoked { by, reason, .. } if *by == self.rank => {
                    self.link.abort(&format!("{REVOKE}{reason}"));
                }
                Error::PeerAborted { .. } | Error::Revoked { .. } => {}
                _ => self.link.abort(&error.to_string()),
            }
            self.broken = Some(error.clone());
        }
    }

    /// Payload bytes this rank has sent to its peers through collectives since the communicator
    /// was made (frame headers not counted): what a collective moved, measured, not modelled.
    pub fn bytes_sent(&self) -> u64 {
        self.engine.bytes_sent
    }

    /// Bytes this rank's collective calls have begun to read back from its device and upload
    /// to it through staging buffers since the communicator was made (those of failed calls
    /// included; the parameter server's not): the device traffic of the algorithms, measured,
    /// as [`bytes_sent`](Self::bytes_sent) measures the link's. Per rank
    /// and N-byte all-reduce, about 2·2(n-1)/n·N for the device ring (every ring step reads
    /// back what it sends and uploads what it receives), 2N for the host-staged ring, and 0
    /// for the host-staged ring in tensors mapped in place.
    pub fn device_bytes(&self) -> u64 {
        self.engine.device_bytes
    }

    /// Calls that ran in their tensors mapped in place instead of through staging buffers: the
    /// host-staged ring on a unified-memory device ([`RankDevice::unified_memory`]), with
    /// tensors made with [`RankDevice::tensor_usages`]. Says which path a call took.
    ///
    /// [`RankDevice::unified_memory`]: crate::RankDevice::unified_memory
    /// [`RankDevice::tensor_usages`]: crate::RankDevice::tensor_usages
    pub fn mapped_calls(&self) -> u64 {
        self.engine.mapped_calls
    }

    /// The algorithm the last all-reduce, reduce-scatter or all-gather ran: what `Auto`
    /// resolved to, so `Ring` when `Auto` ran without a cost model; never `Auto` (a
    /// reduce-scatter or all-gather: `Staged` or `Ring`).
    pub fn last_algorithm(&self) -> Option<Algorithm> {
        self.last_algorithm
    }

    /// The cost model in use, if any.
    pub fn cost_model(&self) -> Option<&CostModel> {
        self.cost_model.as_ref()
    }

    /// Checks both tensors of a call: same element type, supported, valid views.
    fn tensors(&self, at: At, input: &TensorRef<'_>, output: &TensorRef<'_>) -> Result<()> {
        if input.dtype != output.dtype {
            return Err(Error::InvalidArgument {
                at,
                message: format!("input is {}, output is {}", input.dtype, output.dtype),
            });
        }
        self.engine.dev.check_dtype(at, input.dtype)?;
        input.validate(at, "input")?;
        output.validate(at, "output")
    }

    /// Refuses work on the engine once a call has failed: an error may have left the device or
    /// the peers half-way, and only [`CommGroup::rebuild`](crate::CommGroup::rebuild) or
    /// [`recover`](Self::recover) (its shrink) starts afresh.
    pub(crate) fn gate(&self, at: At) -> Result<()> {
        match self.broken_error(at).or_else(|| self.handle_error(at)) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// What a call on a broken communicator fails with: `Broken`, naming the cause, or, after
    /// a revoke, the revoke itself.
    fn broken_error(&self, at: At) -> Option<Error> {
        Some(match self.broken.as_ref()? {
            Error::Revoked { by, reason, .. } => Error::Revoked {
                at,
                by: *by,
                reason: reason.clone(),
            },
            cause => Error::Broken {
                at,
                cause: Box::new(cause.clone()),
            },
        })
    }

    /// What a call fails with once an abort handle fired: `Aborted`, or `Revoked` by this rank.
    fn handle_error(&self, at: At) -> Option<Error> {
        let reason = self.aborted.get()?;
        Some(match revoked(reason) {
            Some(reason) => Error::Revoked {
                at,
                by: self.rank,
                reason: reason.to_string(),
            },
            None => Error::Aborted {
                at,
                reason: reason.clone(),
            },
        })
    }

    /// Read-back staging slots busy, mapped or waiting for a map: zero between calls, whatever
    /// the last call returned. For tests of the clean-up after errors; not a stable API.
    #[doc(hidden)]
    pub fn staging_in_use(&self) -> usize {
        self.engine.reads.in_use()
    }

    pub(crate) fn link_ref(&self) -> &dyn Link {
        self.link.as_ref()
    }

    pub(crate) fn into_parts(self) -> (RankDevice, CommConfig, LinkStack) {
        // The engine is dropped (it has work of its own to do then), its device kept.
        (self.engine.dev.share(), self.config, self.links)
    }
}

/// Aborts one [`Communicator`] from any thread, as NCCL's `ncclCommAbort` from a watchdog:
/// `Clone + Send + Sync`, made by [`Communicator::abort_handle`].
///
/// [`abort`](Self::abort) makes the communicator's current call (if it is waiting for a peer)
/// and every later call fail with [`Error::Aborted`] naming the rank and the reason, and tells
/// the peers, whose current or next call fails with [`Error::PeerAborted`] naming this rank.
/// A call blocked in device work rather than on a peer ends at that work's end or its deadline.
/// Rebuild the group afterwards, as after any failed call (or let the survivors
/// [`recover`](Communicator::recover)).
///
/// ```no_run
/// # fn main() -> wccl::Result<()> {
/// use std::time::Duration;
/// use wccl::{CommGroup, ReduceOp};
/// let mut comms = CommGroup::builder().ranks(2).build()?.into_communicators();
/// let watchdog = comms[0].abort_handle();
/// std::thread::spawn(move || {
///     std::thread::sleep(Duration::from_secs(5));
///     watchdog.abort("no progress for 5 s");
/// });
/// // Rank 1 never calls: rank 0 fails with `Error::Aborted` after 5 s, not at its deadline.
/// let buf = comms[0].upload(&[1.0f32; 4])?;
/// assert!(matches!(comms[0].all_reduce(&buf, ReduceOp::Sum), Err(wccl::Error::Aborted { .. })));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AbortHandle {
    rank: usize,
    aborted: Arc<OnceLock<String>>,
    /// The link's way to wake this rank's waits and tell its peers; `None` when the link has
    /// none (the abort then takes effect at the next call, or the current call's deadline).
    remote: Option<RemoteAbort>,
}

/// Starts the reason of an abort for a call that is wrong in itself (see
/// [`OnFailure::FinishAmongSurvivors`], which does not recover from it).
pub(crate) const NOT_RECOVERABLE: &str = "(not recoverable) ";

/// Marks an abort's reason as a revoke (see [`Communicator::revoke`]).
const REVOKE: &str = "\u{2}revoked\u{2}";

/// The reason of a revoke, if `reason` is one.
pub(crate) fn revoked(reason: &str) -> Option<&str> {
    reason.strip_prefix(REVOKE)
}

impl AbortHandle {
    /// Revokes the communicator, as [`Communicator::revoke`], from any thread: the call it is
    /// blocked in (if it waits for a peer) and every later one fail with [`Error::Revoked`],
    /// and so do its peers'. Only the first abort or revoke on any of its handles counts.
    pub fn revoke(&self, reason: &str) {
        self.abort(&format!("{REVOKE}{reason}"));
    }

    /// Aborts the communicator with `reason`. Only the first call on any of its handles counts;
    /// later ones do nothing.
    pub fn abort(&self, reason: &str) {
        if self.aborted.set(reason.to_string()).is_ok()
            && let Some(remote) = &self.remote
        {
            remote(reason);
        }
    }

    /// Whether the communicator has been aborted through a handle.
    pub fn is_aborted(&self) -> bool {
        self.aborted.get().is_some()
    }

    /// The rank of the communicator this handle aborts.
    pub fn rank(&self) -> usize {
        self.rank
    }
}

impl std::fmt::Debug for AbortHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AbortHandle")
            .field("rank", &self.rank)
            .field("aborted", &self.aborted.get())
            .field("wakes_waits", &self.remote.is_some())
            .finish()
    }
}

/// `Ok(true)` when input and output are the same tensor, `Ok(false)` when they do not overlap;
/// an error when they partly overlap.
fn disjoint_or_same(at: At, input: &TensorRef<'_>, output: &TensorRef<'_>) -> Result<bool> {
    if input.same_as(output) {
        Ok(true)
    } else if input.overlaps(output) {
        Err(Error::InvalidArgument {
            at,
            message: "input and output overlap without being the same tensor".into(),
        })
    } else {
        Ok(false)
    }
}

// A communicator is shared by reference across threads (a watchdog reading its state while
// the owner calls): it must stay `Sync`, which a `Cell` or a non-`Sync` link would undo.
const _: () = {
    const fn assert_sync<T: Sync + Send>() {}
    assert_sync::<Communicator>();
    assert_sync::<AbortHandle>();
};

/// Broadcasts and reduces up to this size run on the binomial tree (ceil(log2 n) steps, the
/// root sending or receiving the buffer once per child), longer ones on the pipelined chain
/// (n-1 steps, the buffer once per link), as NCCL and MPICH switch: every rank decides from
/// the group's size and the call's count and type, which they agree on.
pub(crate) const TREE_MAX_BYTES: usize = 64 << 10;

/// From this many ranks on, short broadcasts and reduces run on the binomial tree and barriers
/// on the dissemination pattern (log2 n steps). Below it they keep the chain and the ring
/// (n-1 steps), whose every rank reads from its predecessor: a rank that calls another
/// collective is then found by the first frame, where on a tree it may wait out the deadline
/// (every rank still fails, none silently: a rank returns only once every rank accepted).
pub(crate) const TREE_MIN_RANKS: usize = 16;

/// The header's algorithm of a reduce-scatter or all-gather: `Staged`'s code on host memory,
/// none for the device ring, as builds before `Auto` chose between them sent it.
fn ring_or_staged(algorithm: Algorithm) -> u32 {
    if algorithm == Algorithm::Staged {
        algorithm.code()
    } else {
        NONE
    }
}

/// Whether a broadcast or reduce of `count` elements of `dtype` on `n` ranks runs on the tree.
pub(crate) fn on_tree(n: usize, count: usize, dtype: DType) -> bool {
    n >= TREE_MIN_RANKS && count.saturating_mul(dtype.size()) <= TREE_MAX_BYTES
}
