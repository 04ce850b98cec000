//! The cost model: what each all-reduce algorithm costs on these devices, and each form of
//! reduce-scatter and all-gather (the device ring, or host-staged), from measured figures (see
//! [`CommGroup::probe`](crate::CommGroup::probe)), and the choice `Algorithm::Auto` makes.
//!
//! Every rank's work is a list of bytes per resource (read-back, upload, on-device reduce, device
//! copy, host reduce) plus a number of pipeline steps, each with a fixed cost. Ranks with their
//! own adapters work in parallel: the slowest rank sets the time. Ranks that share an adapter
//! share its resources: their bytes add up, at the throughput measured with all ranks busy.
//! Within a rank the terms add up (on a software adapter every resource is the same CPU).
//!
//! Where the ranks talk over a network ([`LinkCost`]: each rank's egress bandwidth and a
//! latency per message, as [`EmulatedLink`](crate::link::EmulatedLink) emulates it), each
//! algorithm also has its link cost: the bytes on the critical path through a rank's egress
//! (β each; a star's root: the peers' buffers in over their egress, then its own n-1 out) and
//! the messages in sequence (α each). The link is taken to work beside the devices (a rank
//! sends while it computes), so a call takes the longer of the two, plus the latencies it
//! waits for one after another. That holds for the ring's pipeline; halving-doubling's
//! exchanges depend on each other (each sends what the last one folded), so on a link about
//! as slow as its device work the model underestimates it.

mod scaling;

pub use scaling::{AllReduceTimes, LinkModel, scaling_table};

use crate::algo::Algorithm;
use crate::types::CollectiveKind;

/// Throughputs (payload bytes per second) and fixed costs of one device, or of all ranks'
/// devices working at once.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Figures {
    /// Host -> device through the staging ring, bytes/s.
    pub upload: f64,
    /// Device -> host through the staging ring, bytes/s.
    pub readback: f64,
    /// On-device copy kernel, bytes copied/s (used where copies cannot be plain buffer copies).
    pub copy: f64,
    /// On-device reduce kernel (`dst += src`), bytes of `dst`/s.
    pub reduce: f64,
    /// The host's own reduce, bytes of `dst`/s, on buffers of [`Probe::bytes`]: at the rate of
    /// the host's memory where two such buffers outgrow its last-level cache (16 MiB, the
    /// bench's default, on a CPU with 32 MiB or less).
    pub host_reduce: f64,
    /// Fixed cost of one pipeline step (a small read-back, then a small upload, each waited
    /// for; no kernel: see `launch`), s.
    pub step: f64,
    /// The adapter's own buffer copy (`copy_buffer_to_buffer`), bytes copied/s: what device
    /// copies of 4-byte-aligned data cost, and the yardstick for the kernels.
    pub native_copy: f64,
    /// Fixed cost of one step of a host-staged call (a frame between ranks, taken and folded
    /// on the host), s: what the host-staged algorithms pay per step where the device ones pay
    /// `step`. Measured with every rank busy ([`CommGroup::probe`](crate::CommGroup::probe)
    /// times tiny host-staged rings, round after round, less the call's own cost); 0 where
    /// not measured.
    pub frame: f64,
    /// Fixed cost of one call, every rank at once, beyond its steps and frames, s: handing the
    /// call to the ranks and collecting their results, planning it. Every algorithm pays it
    /// once a call; with `submit`, it is what sets small calls' time where there are few
    /// steps. [`CommGroup::probe`](crate::CommGroup::probe) times barriers and tiny
    /// host-staged all-reduces round after round, as callers make them, and takes away what
    /// the other figures predict; 0 where not measured.
    pub call: f64,
    /// What a call that uses the device pays once beyond `call`, s: its first submission, its
    /// last wait, its error scopes. Every algorithm but the host-staged ring in mapped tensors
    /// pays it. [`CommGroup::probe`](crate::CommGroup::probe) takes it from tiny naive
    /// all-reduces, round after round; 0 where not measured.
    pub submit: f64,
    /// What a step that folds on the device (a received slice staged and reduced by a kernel
    /// in one submission) costs over a plain `step`, s: the kernel's launch.
    pub launch: f64,
    /// What a device step in a chain through peers (the device ring's and halving-doubling's:
    /// each uploads what a peer read back just before, and the next read-back follows that
    /// upload) costs inside a call over a plain `step`, s, per slice step as `step` is. A
    /// measured residual, not a derived cost: the probe times steps with each rank stepping on
    /// its own, while a chain's steps run in lockstep, each ending with the slower of two
    /// ranks, and where ranks share cores they contend in a way the probe's per-rank medians
    /// understate. [`CommGroup::probe`](crate::CommGroup::probe) times tiny device rings
    /// against tiny naive all-reduces (a fan-in: its one wait for a peer is in `submit`),
    /// round after round, less what the other figures predict; 0 where not measured.
    pub wait: f64,
    /// The host's own reduce, bytes of `dst`/s, on a buffer of [`Probe::cached_bytes`] folded
    /// over and over: at the rate of the CPU's caches, where the buffers stay (3-4x
    /// `host_reduce` on the 2-core EPYC VM of BENCHMARKS.md). The model charges calls of up to
    /// that size per rank at this rate ([`Figures::host_rate`]). 0 where not measured: a probe
    /// of [`CACHED_BYTES`] or less measures `host_reduce` in cache already, and the model then
    /// uses `host_reduce` at every size.
    pub host_cached: f64,
}

/// The size of the probe's cached host reduce ([`Figures::host_cached`]), where the probe's
/// own size is larger: 1 MiB, the operands of one fold (2 MiB) within the last-level cache of
/// common CPUs, and not so small that a fold's fixed costs show.
pub const CACHED_BYTES: usize = 1 << 20;

impl Figures {
    /// The host's reduce rate for a call of `bytes` per rank, on figures probed at `probed`
    /// bytes: `host_cached` up to [`Probe::cached_bytes`], where it was measured (as many
    /// bytes a rank, as many ranks at once), and `host_reduce` above. Not a blend in between:
    /// where the caches give out depends on what every rank of the machine holds at once and
    /// on who else shares the cache, and on this machine calls of 4 MiB a rank ran at either
    /// rate from run to run, so a size the probe did not measure gets the rate of memory.
    /// `host_reduce` where `host_cached` is not a finite rate above 0.
    ///
    /// Known limits: a call's host memory is more than the probe's two buffers (its input,
    /// output and frames), and with 8 ranks on 2 cores the host-staged ring's 512 KiB calls
    /// ran slower than the cached rate (BENCHMARKS.md); and ranks with adapters of their own
    /// that share one host are charged their rate alone, measured one rank at a time with the
    /// whole cache (as `host_reduce` is).
    pub fn host_rate(&self, bytes: usize, probed: usize) -> f64 {
        let cached = self.host_cached;
        let small = probed.min(CACHED_BYTES);
        if cached.is_finite() && cached > 0.0 && small < probed && bytes <= small {
            cached
        } else {
            self.host_reduce
        }
    }

    /// The figures with every fixed cost that is not a finite number of at least 0 taken as 0
    /// (its fields are public: a hand-built NaN or infinity must not win `choose`).
    fn cleaned(&self) -> Figures {
        let c = |x: f64| if x.is_finite() && x > 0.0 { x } else { 0.0 };
        Figures {
            step: c(self.step),
            frame: c(self.frame),
            call: c(self.call),
            submit: c(self.submit),
            launch: c(self.launch),
            wait: c(self.wait),
            ..*self
        }
    }
}

/// What a probe measured: each device alone, all at once, and whether devices share adapters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Probe {
    /// Each rank's device: probed alone by [`CommGroup::probe`](crate::CommGroup::probe)
    /// (ranks that share a process take turns); by
    /// [`Communicator::probe`](crate::Communicator::probe), one rank per process, while every
    /// rank probed its own.
    pub alone: Vec<Figures>,
    /// All ranks probed at the same time: aggregate throughputs, and the step cost per rank.
    pub together: Figures,
    /// Whether two or more ranks share an adapter (their resources add up).
    pub shared: bool,
    /// Bytes per probe transfer.
    pub bytes: usize,
}

impl Probe {
    /// The size of the cached host reduce ([`Figures::host_cached`]): [`CACHED_BYTES`] (1 MiB),
    /// or [`bytes`](Self::bytes) where that is smaller.
    pub fn cached_bytes(&self) -> usize {
        self.bytes.min(CACHED_BYTES)
    }

    /// The figures with the host's reduce at its rate for a call of `bytes` per rank
    /// ([`Figures::host_rate`]).
    fn at_size(&self, bytes: usize) -> (Vec<Figures>, Figures) {
        let at = |f: &Figures| Figures {
            host_reduce: f.host_rate(bytes, self.bytes),
            ..*f
        };
        (self.alone.iter().map(at).collect(), at(&self.together))
    }
}

/// A network between the ranks: each rank's egress bandwidth, and the latency of one message
/// (the α and β of Hockney's model). From the emulation settings
/// ([`LinkEmulation`](crate::link::LinkEmulation), which it mirrors), or measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkCost {
    /// Each rank's egress bandwidth, GB/s (β = 1 / this).
    pub gbps: f64,
    /// One message's latency, microseconds (α).
    pub latency_us: f64,
}

impl LinkCost {
    /// Seconds per byte on a rank's egress; a bandwidth that is zero, negative or NaN costs
    /// nothing (no network term) rather than infinity.
    fn beta(&self) -> f64 {
        if self.gbps.is_finite() && self.gbps > 0.0 {
            1.0 / (self.gbps * 1e9)
        } else {
            0.0
        }
    }

    /// Seconds per message in sequence.
    pub(crate) fn alpha(&self) -> f64 {
        if self.latency_us.is_finite() && self.latency_us > 0.0 {
            self.latency_us * 1e-6
        } else {
            0.0
        }
    }
}

impl From<crate::link::LinkEmulation> for LinkCost {
    /// The emulated network's figures; its random jitter adds half its span to the latency on
    /// average.
    fn from(e: crate::link::LinkEmulation) -> Self {
        LinkCost {
            gbps: e.gbps,
            latency_us: e.latency_us + e.jitter_us / 2.0,
        }
    }
}

/// A predicted time and what bounds it.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// Seconds.
    pub seconds: f64,
    /// The largest term: "readback", "upload", "reduce", "copy", "host", "steps", "frames",
    /// "call" (the call's fixed cost, where it outlasts all its work), or, with a network,
    /// "link" (egress bytes) or "latency".
    pub bound: &'static str,
    /// Every term, seconds. The device terms add up; with a network, `seconds` is the larger of
    /// their sum and "link", plus "latency"; then "call", once.
    pub terms: Vec<(&'static str, f64)>,
}

/// One rank's work for one call.
#[derive(Clone, Copy, Debug, Default)]
struct Work {
    readback: f64,
    upload: f64,
    reduce: f64,
    copy: f64,
    host: f64,
    /// Device round trips in sequence: a read-back waited for and an upload each (a lone
    /// read-back or upload counts half).
    steps: f64,
    /// Steps that fold on the device: a kernel's launch each, over the step's cost.
    launches: f64,
    /// Steps in a chain through peers (a received slice uploaded, then read back for the next
    /// peer, the length of the call: the device ring's and halving-doubling's), a `wait` each
    /// over the step's cost. A fan-in's are not (central's root and naive's ranks wait for one
    /// peer or for all side by side, once a call: in `submit`).
    chained: f64,
    /// Messages handled in sequence: a frame sent and one taken each (the ring's step; a star's
    /// root counts one per peer), for the host-staged calls with the fold of a slice on the
    /// host.
    frames: f64,
    /// Bytes on the critical path through this rank's egress.
    wire: f64,
    /// Messages this rank waits for one after another (a latency each).
    hops: f64,
}

impl Work {
    fn add(self, o: Work) -> Work {
        Work {
            readback: self.readback + o.readback,
            upload: self.upload + o.upload,
            reduce: self.reduce + o.reduce,
            copy: self.copy + o.copy,
            host: self.host + o.host,
            steps: self.steps + o.steps,
            launches: self.launches + o.launches,
            chained: self.chained + o.chained,
            frames: self.frames + o.frames,
            wire: self.wire + o.wire,
            hops: self.hops + o.hops,
        }
    }

    /// Its steps' fixed costs under `f` (cleaned): each step's, each launch's, each wait.
    fn step_cost(&self, f: &Figures) -> f64 {
        self.steps * f.step + self.launches * f.launch + self.chained * f.wait
    }

    fn terms(&self, f: &Figures) -> Vec<(&'static str, f64)> {
        let f = f.cleaned();
        let t = |bytes: f64, rate: f64| {
            if bytes > 0.0 {
                bytes / rate.max(1.0)
            } else {
                0.0
            }
        };
        vec![
            ("readback", t(self.readback, f.readback)),
            ("upload", t(self.upload, f.upload)),
            ("reduce", t(self.reduce, f.reduce)),
            ("copy", t(self.copy, f.native_copy)),
            ("host", t(self.host, f.host_reduce)),
            ("steps", self.step_cost(&f)),
            ("frames", self.frames * f.frame),
        ]
    }
}

/// Predicts the times of all-reduces, reduce-scatters and all-gathers from a [`Probe`].
#[derive(Clone, Debug, PartialEq)]
pub struct CostModel {
    probe: Probe,
    slice_bytes: usize,
    unified: bool,
    link: Option<LinkCost>,
}

impl CostModel {
    /// A model from probe figures, for a communicator that pipelines in `slice_bytes` slices.
    pub fn new(probe: Probe, slice_bytes: usize) -> Self {
        CostModel {
            probe,
            slice_bytes,
            unified: false,
            link: None,
        }
    }

    /// The same model for ranks that talk over `link` (`None`: links that cost nothing next to
    /// the devices, as in-process channels). Every rank must hold the same model.
    pub fn with_link(mut self, link: Option<LinkCost>) -> Self {
        self.link = link;
        self
    }

    /// The network the model charges, if any.
    pub fn link(&self) -> Option<LinkCost> {
        self.link
    }

    /// The same model for ranks whose devices all map tensors in place (`unified`: every
    /// rank's [`unified_memory`](crate::RankDevice::unified_memory)), as
    /// [`CommGroup::probe`](crate::CommGroup::probe) finds: then `Auto` weighs the host-staged
    /// ring too, on every rank alike (see [`choose_for`](Self::choose_for)). Every rank must
    /// hold the same model.
    pub fn with_unified_memory(mut self, unified: bool) -> Self {
        self.unified = unified;
        self
    }

    /// Whether the model was made for ranks that all map tensors in place.
    pub fn unified_memory(&self) -> bool {
        self.unified
    }

    /// The figures it predicts from.
    pub fn probe(&self) -> &Probe {
        &self.probe
    }

    /// Predicted time of an all-reduce of `bytes` per rank with `algo` (not `Auto`) on the
    /// probed ranks.
    pub fn predict(&self, algo: Algorithm, bytes: usize, in_place: bool) -> Prediction {
        self.predict_for(algo, bytes, in_place, false)
    }

    /// [`predict`](Self::predict) for tensors that the host-staged ring can work in, mapped in
    /// place (`mapped`: a unified-memory device and tensors made with its
    /// [`tensor_usages`](crate::RankDevice::tensor_usages)), where it moves nothing between
    /// device and host. Only `Staged` depends on it.
    pub fn predict_for(
        &self,
        algo: Algorithm,
        bytes: usize,
        in_place: bool,
        mapped: bool,
    ) -> Prediction {
        let n = self.probe.alone.len().max(1);
        let works: Vec<Work> = (0..n)
            .map(|r| work(algo, n, r, bytes, in_place, self.slice_bytes, mapped))
            .collect();
        // A call submits to the device but in mapped tensors on the host.
        self.predict_works(&works, bytes, !(mapped && algo == Algorithm::Staged))
    }

    /// The time of a call of `bytes` per rank (the host's rate depends on it) whose ranks do
    /// `works` (one per rank, in rank order); `submits`: the call submits to the devices (it
    /// pays the probe's `submit`).
    fn predict_works(&self, works: &[Work], bytes: usize, submits: bool) -> Prediction {
        let n = works.len().max(1);
        let (alone, together) = self.probe.at_size(bytes);
        let mut terms = if self.probe.shared {
            let total = works.iter().fold(Work::default(), |a, w| a.add(*w));
            let mut t = total.terms(&together);
            // The step costs of ranks that share a device are measured per rank, all at once;
            // but a rank's own steps come one after another, so the busiest rank (a star's
            // root handling n-1 messages in turn) takes at least its steps at its own pace.
            if let Some(s) = t.iter_mut().find(|t| t.0 == "steps") {
                let busiest = works
                    .iter()
                    .zip(&alone)
                    .map(|(w, f)| w.step_cost(&f.cleaned()))
                    .fold(0.0, f64::max);
                s.1 = (s.1 / n as f64).max(busiest);
            }
            // A frame's cost was measured with every rank busy: the busiest rank's frames,
            // one after another.
            if let Some(s) = t.iter_mut().find(|t| t.0 == "frames") {
                let busiest = works.iter().map(|w| w.frames).fold(0.0, f64::max);
                s.1 = busiest * together.cleaned().frame;
            }
            t
        } else {
            // The slowest rank sets the pace.
            works
                .iter()
                .zip(&alone)
                .map(|(w, f)| w.terms(f))
                .max_by(|a, b| total(a).total_cmp(&total(b)))
                .unwrap_or_default()
        };
        let device = total(&terms);
        let mut bound = terms
            .iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map_or("steps", |t| t.0);
        let mut seconds = device;
        if let Some(link) = self.link {
            // Each rank has its own egress: the busiest one's bytes, and the longest chain of
            // messages, set the network's part.
            let wire = works.iter().map(|w| w.wire).fold(0.0, f64::max) * link.beta();
            let latency = works.iter().map(|w| w.hops).fold(0.0, f64::max) * link.alpha();
            seconds = device.max(wire) + latency;
            // What sets the time: the link where its bytes outlast all the device work, the
            // latencies where they outlast both.
            if latency > device.max(wire) {
                bound = "latency";
            } else if wire > device {
                bound = "link";
            }
            terms.push(("link", wire));
            terms.push(("latency", latency));
        }
        // Once a call, whatever its algorithm, before its work starts and after it ends (so
        // beside neither the devices nor the link): the slowest rank's; with its submission
        // where it submits.
        let once = |f: &Figures| {
            let f = f.cleaned();
            f.call + if submits { f.submit } else { 0.0 }
        };
        let call = if self.probe.shared {
            once(&together)
        } else {
            alone.iter().map(once).fold(0.0, f64::max)
        };
        if call > seconds {
            bound = "call";
        }
        seconds += call;
        terms.push(("call", call));
        Prediction {
            seconds,
            bound,
            terms,
        }
    }

    /// The floor of an all-reduce of `bytes` per rank on devices that hold their tensors apart
    /// from the host: every rank reads its buffer back once and uploads the result once, all
    /// ranks at once (no algorithm on a device without peer-to-peer moves less), the two added
    /// as the model adds its terms (a device whose copy engines read back and upload at once
    /// can beat it by up to 2x). Tensors mapped in place on a unified-memory device need
    /// neither, so there the floor is not this.
    pub fn floor(&self, bytes: usize) -> f64 {
        let n = self.probe.alone.len().max(1);
        let s = bytes as f64;
        if n == 1 {
            return 0.0;
        }
        let once = |f: &Figures, k: f64| k * s / f.readback.max(1.0) + k * s / f.upload.max(1.0);
        if self.probe.shared {
            once(&self.probe.together, n as f64)
        } else {
            self.probe
                .alone
                .iter()
                .map(|f| once(f, 1.0))
                .fold(0.0, f64::max)
        }
    }

    /// The sizes where [`choose`](Self::choose) changes its mind, among `sizes` (in bytes,
    /// ascending): the first size and its choice, then each size whose choice differs from the
    /// one before.
    ///
    /// ```
    /// use wccl::Algorithm;
    /// use wccl::model::{CostModel, Figures, Probe};
    /// // 16 ranks on their own devices: 1 GB/s each way, a device reduce of 0.1 GB/s, a host
    /// // that folds for free, 1 ms a step, 2 ms a message, one slice a call. Halving-doubling:
    /// // 8 steps and 8 messages (24 ms), 15/8 of the buffer each way and 15/16 of it reduced
    /// // on the device (13.125 ns a byte); naive's root: 1 step and 15 messages (31 ms), one
    /// // buffer each way (2 ns a byte). The 7 ms it saves stop paying at 7 ms / 11.125 ns =
    /// // 629,213 bytes.
    /// let f = Figures { upload: 1e9, readback: 1e9, copy: 1e9, reduce: 1e8, host_reduce: 1e15,
    ///     step: 1e-3, native_copy: 1e9, frame: 2e-3, call: 0.0, submit: 0.0, launch: 0.0,
    ///     wait: 0.0, host_cached: 0.0 };
    /// let m = CostModel::new(Probe { alone: vec![f; 16], together: f, shared: false, bytes: 0 },
    ///     1 << 30);
    /// let sizes: Vec<usize> = (2..28).map(|k| 1usize << k).collect();
    /// assert_eq!(
    ///     m.crossovers(&sizes, true),
    ///     vec![(4, Algorithm::HalvingDoubling), (1 << 20, Algorithm::Naive)]
    /// );
    /// ```
    pub fn crossovers(&self, sizes: &[usize], in_place: bool) -> Vec<(usize, Algorithm)> {
        let mut out: Vec<(usize, Algorithm)> = Vec::new();
        for &b in sizes {
            let a = self.choose_for(b, in_place, self.unified);
            if out.last().is_none_or(|l| l.1 != a) {
                out.push((b, a));
            }
        }
        out
    }

    /// The algorithm with the smallest predicted time, among [`Algorithm::CONCRETE`].
    pub fn choose(&self, bytes: usize, in_place: bool) -> Algorithm {
        self.choose_for(bytes, in_place, false)
    }

    /// [`choose`](Self::choose) where the host-staged ring works in tensors mapped in place
    /// (`mapped`; `Auto` passes [`unified_memory`](Self::unified_memory), the same on every
    /// rank): then `Staged` is a
    /// candidate too, its entry being what it does there (no device traffic, the ring's folds
    /// and copies on the host, a frame per step at the probe's `frame` cost, which
    /// [`Communicator::probe_device`](crate::Communicator::probe_device) alone leaves at 0). Elsewhere its
    /// entry is too rough to choose by (issue 14).
    pub fn choose_for(&self, bytes: usize, in_place: bool, mapped: bool) -> Algorithm {
        let staged = mapped.then_some(Algorithm::Staged);
        Algorithm::CONCRETE
            .into_iter()
            .chain(staged)
            .min_by(|a, b| {
                self.predict_for(*a, bytes, in_place, mapped)
                    .seconds
                    .total_cmp(&self.predict_for(*b, bytes, in_place, mapped).seconds)
            })
            .unwrap_or(Algorithm::Ring)
    }

    /// Predicted time of a call of `kind` with `algo` on the probed ranks, for the kinds the
    /// model knows: all-reduce ([`predict_for`](Self::predict_for), in tensors mapped in place
    /// where the model says every device maps them), and reduce-scatter and all-gather, where
    /// `Algorithm::Staged` runs on host memory and every other algorithm is the device ring.
    /// `bytes`: the larger tensor of a rank (an all-reduce's buffer, a reduce-scatter's input,
    /// an all-gather's output). `None` for the other kinds.
    pub fn predict_call(
        &self,
        kind: CollectiveKind,
        algo: Algorithm,
        bytes: usize,
        in_place: bool,
    ) -> Option<Prediction> {
        match kind {
            CollectiveKind::AllReduce => {
                Some(self.predict_for(algo, bytes, in_place, self.unified))
            }
            CollectiveKind::ReduceScatter | CollectiveKind::AllGather => {
                let n = self.probe.alone.len().max(1);
                let staged = algo == Algorithm::Staged;
                let w = ring_work(kind, staged, n, bytes, in_place, self.slice_bytes);
                Some(self.predict_works(&vec![w; n], bytes, true))
            }
            _ => None,
        }
    }

    /// What `Algorithm::Auto` runs for a call of `kind` on `bytes` (as in
    /// [`predict_call`](Self::predict_call)): for all-reduce, [`choose_for`](Self::choose_for)
    /// with the model's [`unified_memory`](Self::unified_memory); for reduce-scatter and
    /// all-gather, the device ring or `Staged`, whichever is predicted faster. `None` for the
    /// other kinds.
    pub fn choose_call(
        &self,
        kind: CollectiveKind,
        bytes: usize,
        in_place: bool,
    ) -> Option<Algorithm> {
        match kind {
            CollectiveKind::AllReduce => Some(self.choose_for(bytes, in_place, self.unified)),
            CollectiveKind::ReduceScatter | CollectiveKind::AllGather => {
                let t = |a| {
                    self.predict_call(kind, a, bytes, in_place)
                        .map_or(f64::INFINITY, |p| p.seconds)
                };
                let staged = t(Algorithm::Staged) < t(Algorithm::Ring);
                Some(if staged {
                    Algorithm::Staged
                } else {
                    Algorithm::Ring
                })
            }
            _ => None,
        }
    }
}

/// What every rank of `n` does in a reduce-scatter of `bytes` (its input, n chunks) or an
/// all-gather into `bytes` (its output), following the plans in `algo/`: the device ring, or
/// (`staged`) the ring's steps on host memory. Every rank does the same.
fn ring_work(
    kind: CollectiveKind,
    staged: bool,
    n: usize,
    bytes: usize,
    in_place: bool,
    slice: usize,
) -> Work {
    let s = bytes as f64;
    if n <= 1 {
        // A copy of the input to the output, if they differ.
        return Work {
            copy: if in_place { 0.0 } else { s },
            ..Work::default()
        };
    }
    let (c, nf) = ((n - 1) as f64, n as f64);
    let chunk = bytes.div_ceil(n);
    let k = chunk.div_ceil(slice.max(1)).max(1) as f64;
    // The ring's n-1 steps of k slices, a frame each; (n-1)/n of the buffer out of every rank
    // in n-1 messages in sequence.
    let ring = Work {
        frames: c * k,
        wire: c / nf * s,
        hops: c,
        ..Work::default()
    };
    let scatter = kind == CollectiveKind::ReduceScatter;
    match (scatter, staged) {
        // The input copied into scratch, each step's slice read back and the received one
        // uploaded and folded by a kernel, the finished chunk copied out.
        (true, false) => Work {
            readback: c / nf * s,
            upload: c / nf * s,
            reduce: c / nf * s,
            copy: s + s / nf,
            steps: c * k,
            launches: c * k,
            chained: c * k,
            ..ring
        },
        // Every chunk read back once (n·k slices), folded on the host as it arrives, and this
        // rank's chunk uploaded (k slices); on the host, the folds and the sends' copies into
        // frames, (n-1)/n of the buffer each.
        (true, true) => Work {
            readback: s,
            upload: s / nf,
            host: 2.0 * c / nf * s,
            steps: (nf * k + k) / 2.0,
            ..ring
        },
        // This rank's piece copied into its place, each step's slice read back and the
        // received one uploaded.
        (false, false) => Work {
            readback: c / nf * s,
            upload: c / nf * s,
            copy: if in_place { 0.0 } else { s / nf },
            steps: c * k,
            chained: c * k,
            ..ring
        },
        // This rank's piece read back once, every piece received copied on the host and
        // uploaded as it arrives; each send copies a piece from host memory into a frame.
        (false, true) => Work {
            readback: s / nf,
            upload: c / nf * s,
            copy: if in_place { 0.0 } else { s / nf },
            host: 2.0 * c / nf * s,
            steps: (k + c * k) / 2.0,
            ..ring
        },
    }
}

/// Halving-doubling's shape for rank `r` of `n` on `bytes` (on the devices or on host memory):
/// among the p that exchange, log2(p) exchanges each way, each cut into slices from its
/// region's size; the first 2(n-p) ranks fold in pairs, the even one of each pair only sending
/// its buffer and taking the result back (`lone`).
struct HdShape {
    /// p, the largest power of two at most n.
    pf: f64,
    /// Slices of the whole buffer.
    whole: f64,
    /// Slices of all the exchanges one way.
    exchanges: f64,
    /// 1 on an odd folding rank (a partner's buffer in, the result back out), else 0.
    fold: f64,
    /// An even folding rank: out of the exchanges.
    lone: bool,
    /// Bytes on the critical path through this rank's egress: the partner's buffer in, the
    /// exchanges, the result back out, in sequence (a lone rank: its buffer).
    wire: f64,
    /// Messages in sequence.
    hops: f64,
}

impl HdShape {
    fn new(n: usize, r: usize, bytes: usize, slice: usize) -> Self {
        let p = 1usize << n.max(1).ilog2();
        let pf = p as f64;
        let s = bytes as f64;
        let folds = r < 2 * n.saturating_sub(p);
        let lone = folds && r.is_multiple_of(2);
        let fold = if folds && !lone { 1.0 } else { 0.0 };
        let exchanges: f64 = (1..=p.ilog2())
            .map(|j| (bytes >> j).div_ceil(slice.max(1)).max(1) as f64)
            .sum();
        let (wire, hops) = if lone {
            (s, 2.0)
        } else {
            (
                2.0 * (pf - 1.0) / pf * s + fold * 2.0 * s,
                2.0 * f64::from(p.ilog2()) + fold * 2.0,
            )
        };
        HdShape {
            pf,
            whole: bytes.div_ceil(slice.max(1)).max(1) as f64,
            exchanges,
            fold,
            lone,
            wire,
            hops,
        }
    }
}

fn total(terms: &[(&'static str, f64)]) -> f64 {
    terms.iter().map(|t| t.1).sum()
}

/// What rank `r` of `n` does in an all-reduce of `bytes` (rank 0 is the root of central and
/// naive), following the plans in `algo/`.
fn work(
    algo: Algorithm,
    n: usize,
    r: usize,
    bytes: usize,
    in_place: bool,
    slice: usize,
    mapped: bool,
) -> Work {
    let s = bytes as f64;
    let c = (n - 1) as f64;
    let nf = n as f64;
    let oop_copy = if in_place { 0.0 } else { s };
    if n == 1 {
        return Work {
            copy: oop_copy,
            ..Work::default()
        };
    }
    // Received copies go from the staging slot straight to their place (an upload); device
    // copies are the adapter's own (4-byte element types). The link terms: the ring's
    // 2(n-1)/n of the buffer out of every rank in 2(n-1) messages in sequence.
    let ring_link = Work {
        wire: 2.0 * c / nf * s,
        hops: 2.0 * c,
        ..Work::default()
    };
    match algo {
        Algorithm::Ring | Algorithm::Auto => {
            let chunk = bytes.div_ceil(n);
            let k = chunk.div_ceil(slice.max(1)).max(1) as f64;
            Work {
                readback: 2.0 * c / nf * s,
                upload: 2.0 * c / nf * s,
                reduce: c / nf * s,
                copy: oop_copy,
                host: 0.0,
                steps: 2.0 * c * k,
                launches: c * k,
                chained: 2.0 * c * k,
                frames: 2.0 * c * k,
                ..ring_link
            }
        }
        Algorithm::Staged if mapped => {
            // In the tensors, mapped in place: no device traffic and no device round trip per
            // step. On the host: in place, the tensor read once into host memory; every rank
            // folds (n-1)/n of the buffer into frames and copies (n-1)/n of it out of frames
            // (the all-gather), plus its first send and its own finished chunk (2/n); the
            // ring's 2(n-1) steps of k slices, a frame each.
            let chunk = bytes.div_ceil(n);
            let k = chunk.div_ceil(slice.max(1)).max(1) as f64;
            Work {
                readback: 0.0,
                upload: 0.0,
                reduce: 0.0,
                copy: 0.0,
                host: (2.0 * c + 2.0) / nf * s + if in_place { s } else { 0.0 },
                steps: 0.0,
                frames: 2.0 * c * k,
                ..ring_link
            }
        }
        Algorithm::Staged => {
            // One read-back and one upload of the whole buffer, a device step per slice each
            // way; the ring's steps, a frame each, folding (reduce-scatter) or copying
            // (all-gather) a slice on the host. Rough: the read-backs and uploads are
            // interleaved with the ring slice by slice, and this adds them up; `Auto` does
            // not choose `Staged` off unified memory until this entry is measured (issue 14).
            let whole = bytes.div_ceil(slice.max(1)).max(1) as f64;
            let chunk = bytes.div_ceil(n);
            let k = chunk.div_ceil(slice.max(1)).max(1) as f64;
            Work {
                readback: s,
                upload: s,
                reduce: 0.0,
                copy: 0.0,
                host: 2.0 * c / nf * s,
                steps: whole,
                frames: 2.0 * c * k,
                ..ring_link
            }
        }
        Algorithm::HalvingDoubling => {
            // Among the p that exchange: log2(p) halvings of the window each way, the ring's
            // volume, a slice count per exchange from its region's size; the first 2(n-p)
            // ranks add a whole-buffer fold (even ranks: only that, and the result back).
            let HdShape {
                pf,
                whole,
                exchanges,
                fold,
                lone,
                wire,
                hops,
            } = HdShape::new(n, r, bytes, slice);
            if lone {
                // Its uploads are of the partner's result.
                return Work {
                    readback: s,
                    upload: s,
                    copy: oop_copy,
                    steps: whole,
                    chained: whole,
                    frames: whole,
                    wire,
                    hops,
                    ..Work::default()
                };
            }
            Work {
                readback: 2.0 * (pf - 1.0) / pf * s + fold * s,
                upload: 2.0 * (pf - 1.0) / pf * s + fold * s,
                reduce: (pf - 1.0) / pf * s + fold * s,
                copy: oop_copy,
                host: 0.0,
                steps: 2.0 * exchanges + fold * whole,
                launches: exchanges + fold * whole,
                chained: 2.0 * exchanges + fold * whole,
                frames: 2.0 * exchanges + fold * whole,
                wire,
                hops,
            }
        }
        Algorithm::StagedHalvingDoubling => {
            // One read-back and one upload of the whole buffer, slice by slice (a device step
            // per slice); on the host the halvings fold (p-1)/p of it and the doublings copy
            // as much, and the sends copy as much again into frames, plus the fold of a pair's
            // buffer in and the result out; a frame per exchange slice. `Auto` does not weigh
            // it yet. The link: halving-doubling's.
            let HdShape {
                pf,
                whole,
                exchanges,
                fold,
                lone,
                wire,
                hops,
            } = HdShape::new(n, r, bytes, slice);
            if lone {
                return Work {
                    readback: s,
                    upload: s,
                    host: s,
                    steps: whole,
                    frames: whole,
                    wire,
                    hops,
                    ..Work::default()
                };
            }
            Work {
                readback: s,
                upload: s,
                host: 4.0 * (pf - 1.0) / pf * s + fold * 2.0 * s,
                steps: whole,
                frames: 2.0 * exchanges + fold * whole,
                wire,
                hops,
                ..Work::default()
            }
        }
        Algorithm::Central | Algorithm::Naive => {
            let k = bytes.div_ceil(slice.max(1)).max(1) as f64;
            if r != 0 {
                return Work {
                    readback: s,
                    upload: s,
                    steps: k,
                    frames: k,
                    wire: s,
                    hops: 2.0,
                    ..Work::default()
                };
            }
            // The root: every peer's buffer in (over the peers' egress, side by side), then
            // the result out to each peer in turn through its own.
            let star_link = Work {
                wire: nf * s,
                hops: 2.0,
                ..Work::default()
            };
            if algo == Algorithm::Central {
                Work {
                    readback: s,
                    upload: c * s,
                    reduce: c * s,
                    copy: oop_copy,
                    // Each result slice is read back once and copied for the other peers.
                    host: (c - 1.0) * s,
                    // A peer's slice uploaded and folded by a kernel, c times; the result's
                    // read back once; c messages in and c out.
                    steps: (c + 1.0) / 2.0 * k,
                    launches: c * k,
                    frames: c * k,
                    ..star_link
                }
            } else {
                Work {
                    readback: s,
                    upload: s,
                    reduce: 0.0,
                    copy: 0.0,
                    // Folding in c buffers, plus copying the result into c frames.
                    host: 2.0 * c * s,
                    // Its own slice read back and the result uploaded; c messages in and c
                    // out, in turn.
                    steps: k,
                    frames: c * k,
                    ..star_link
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model of `n` ranks whose figures, alone and together, are all `f`, one slice a call.
    fn same_everywhere(f: Figures, n: usize, shared: bool) -> CostModel {
        let p = Probe {
            alone: vec![f; n],
            together: f,
            shared,
            bytes: 0,
        };
        CostModel::new(p, 1 << 30)
    }

    fn figures(x: f64) -> Figures {
        Figures {
            upload: x,
            readback: x,
            copy: x,
            reduce: x,
            host_reduce: x,
            step: 0.0,
            native_copy: x,
            frame: 0.0,
            call: 0.0,
            submit: 0.0,
            launch: 0.0,
            wait: 0.0,
            host_cached: 0.0,
        }
    }

    /// What one rank's plan does, counted from its actions alone (as the executor carries
    /// them out), in the model's units: bytes read back and uploaded, folded by a kernel,
    /// copied on the device and on the host, device round trips (a lone read-back or upload
    /// counts half: the model's own definition, so `steps` checks counts, not how the
    /// executor overlaps them), kernel launches, frames sent, bytes sent. Not counted: `hops`
    /// (messages in sequence, a property of the schedule), `Scale` (Avg's division), and
    /// whether a device copy runs natively or as a kernel (it depends on the caller's buffer
    /// usages, not on the plan). `Source::Previous` is not modelled here (the plans tested
    /// do not use it).
    fn work_of(plan: &crate::algo::Plan, es: usize, in_place: bool) -> Work {
        use crate::algo::{Action, Buf, Source};
        use crate::types::Combine;
        let device = |b: Buf| b != Buf::Host;
        let bytes = |len: usize| (len * es) as f64;
        let (mut w, mut readbacks, mut uploads) = (Work::default(), 0.0, 0.0);
        for a in &plan.actions {
            match *a {
                Action::Copy { src, dst } => match (device(src.buf), device(dst.buf)) {
                    (true, false) => {
                        w.readback += bytes(src.len);
                        readbacks += 1.0;
                    }
                    (false, true) => {
                        w.upload += bytes(src.len);
                        uploads += 1.0;
                    }
                    // In place, the plans' only copy from the input to the output is this
                    // rank's piece onto itself: the same memory, which the executor skips.
                    (true, true) if in_place && src.buf == Buf::Input && dst.buf == Buf::Output => {
                    }
                    (true, true) => w.copy += bytes(src.len),
                    (false, false) => w.host += bytes(src.len),
                },
                Action::Scale { .. } => {}
                Action::Transfer(t) => {
                    if let Some((_, source)) = t.send {
                        let len = match source {
                            Source::Device(r) => {
                                if device(r.buf) {
                                    readbacks += 1.0;
                                    w.readback += bytes(r.len);
                                } else {
                                    // Copied from host memory into the frame.
                                    w.host += bytes(r.len);
                                }
                                r.len
                            }
                            Source::Forward => t.recv.map_or(0, |r| r.dst.len),
                            Source::Previous => panic!("Source::Previous is not counted here"),
                        };
                        w.frames += 1.0;
                        w.wire += bytes(len);
                    }
                    if let Some(r) = t.recv {
                        if device(r.dst.buf) {
                            uploads += 1.0;
                            w.upload += bytes(r.dst.len);
                            if r.combine != Combine::Copy {
                                w.launches += 1.0;
                                w.reduce += bytes(r.dst.len);
                            }
                        } else {
                            // Folded or copied into host memory.
                            w.host += bytes(r.dst.len);
                        }
                    }
                }
            }
        }
        w.steps = (readbacks + uploads) / 2.0;
        w
    }

    /// Every counted field of `got` (from the plan) against `want` (the model's), named.
    fn assert_same_work(case: &str, got: &Work, want: &Work) {
        for (field, g, m) in [
            ("readback", got.readback, want.readback),
            ("upload", got.upload, want.upload),
            ("reduce", got.reduce, want.reduce),
            ("copy", got.copy, want.copy),
            ("host", got.host, want.host),
            ("steps", got.steps, want.steps),
            ("launches", got.launches, want.launches),
            ("frames", got.frames, want.frames),
            ("wire", got.wire, want.wire),
        ] {
            let close = (g - m).abs() <= 1e-9 * g.abs().max(m.abs()).max(1.0);
            assert!(
                close,
                "{case}: {field}: the plan does {g}, the model says {m}"
            );
        }
    }

    /// The model's work for reduce-scatter and all-gather, device ring and staged, field by
    /// field against what the plans of `algo/` do, on every rank, at 1 rank and at rank counts
    /// that are not powers of two, with one slice and with many (uneven), in place and out.
    #[test]
    fn ring_work_follows_the_plans() {
        use crate::algo::{
            ring_all_gather, ring_reduce_scatter, staged_all_gather, staged_reduce_scatter,
        };
        use crate::types::ReduceOp;
        let es = 4;
        let kinds = [CollectiveKind::ReduceScatter, CollectiveKind::AllGather];
        for (n, count, se) in [1, 2, 3, 5, 8]
            .into_iter()
            .flat_map(|n| [1, 1000, 12_345].map(|c| (n, c)))
            .flat_map(|(n, c)| [1 << 20, 999].map(|se| (n, c, se)))
        {
            for (kind, staged, in_place) in kinds
                .into_iter()
                .flat_map(|k| [(k, false), (k, true)])
                .flat_map(|(k, st)| [(k, st, false), (k, st, true)])
            {
                let want = ring_work(kind, staged, n, n * count * es, in_place, se * es);
                for r in 0..n {
                    let plan = match (kind, staged) {
                        (CollectiveKind::ReduceScatter, false) => {
                            ring_reduce_scatter(n, r, count, ReduceOp::Sum, se)
                        }
                        (CollectiveKind::ReduceScatter, true) => {
                            staged_reduce_scatter(n, r, count, ReduceOp::Sum, se)
                        }
                        (_, false) => ring_all_gather(n, r, count, se),
                        (_, true) => staged_all_gather(n, r, count, se),
                    };
                    let case = format!(
                        "{kind} staged={staged} n={n} rank {r} count={count} slice={se} \
                         in_place={in_place}"
                    );
                    assert_same_work(&case, &work_of(&plan, es, in_place), &want);
                }
            }
        }
    }

    /// The device ring's all-reduce entry, field by field against the plan of every rank
    /// (counts every rank count divides: the entry assumes even chunks).
    #[test]
    fn the_ring_all_reduce_work_follows_its_plan() {
        use crate::algo::ring_all_reduce;
        use crate::types::ReduceOp;
        let es = 4;
        for n in [1, 2, 3, 5, 8] {
            for (count, se, in_place) in [1200, 12_000]
                .into_iter()
                .flat_map(|c| [(c, 1 << 20), (c, 999)])
                .flat_map(|(c, se)| [(c, se, false), (c, se, true)])
            {
                for r in 0..n {
                    let want = work(Algorithm::Ring, n, r, count * es, in_place, se * es, false);
                    let plan = ring_all_reduce(n, r, count, ReduceOp::Sum, in_place, se);
                    let case =
                        format!("n={n} rank {r} count={count} slice={se} in_place={in_place}");
                    assert_same_work(&case, &work_of(&plan, es, in_place), &want);
                }
            }
        }
    }

    /// `choose_call` for an all-reduce is `choose_for` with the model's unified memory: what
    /// `Auto` runs (the communicator asks `choose_call` for every kind).
    #[test]
    fn choose_call_for_an_all_reduce_is_choose_for() {
        let p = Probe {
            alone: vec![figures(1e9); 4],
            together: figures(1e9),
            shared: true,
            bytes: 0,
        };
        for unified in [false, true] {
            let m = CostModel::new(p.clone(), 1 << 20).with_unified_memory(unified);
            for bytes in [4, 4096, 1 << 20, 64 << 20] {
                for in_place in [false, true] {
                    assert_eq!(
                        m.choose_call(CollectiveKind::AllReduce, bytes, in_place),
                        Some(m.choose_for(bytes, in_place, unified)),
                        "{bytes} B, unified {unified}"
                    );
                }
            }
        }
    }

    #[test]
    fn independent_ring_matches_the_hand_computed_cost() {
        // 4 ranks, 1 GB/s everywhere, no step cost, 400 MB in place: each rank reads back and
        // uploads 2*3/4*400 MB and reduces 3/4*400 MB: 600+600+300 MB = 1.5 s.
        let p = Probe {
            alone: vec![figures(1e9); 4],
            together: figures(1e9),
            shared: false,
            bytes: 0,
        };
        let m = CostModel::new(p, 1 << 30);
        let t = m.predict(Algorithm::Ring, 400_000_000, true);
        assert!((t.seconds - 1.5).abs() < 1e-9, "{t:?}");
    }

    #[test]
    fn shared_central_adds_every_ranks_work() {
        // 2 ranks sharing 1 GB/s, 100 MB in place. Root: readback 100, upload 100, reduce 100
        // (and no extra copies: one peer). Other: readback 100, upload 100. Total 500 MB ->
        // 0.5 s; steps: the root's upload and read-back, half a step each, and the other's
        // read-back and upload: 2 steps, shared by 2 ranks at 1 ms each = 1 ms.
        let mut f = figures(1e9);
        f.step = 1e-3;
        let p = Probe {
            alone: vec![f; 2],
            together: f,
            shared: true,
            bytes: 0,
        };
        let m = CostModel::new(p, 1 << 30);
        let t = m.predict(Algorithm::Central, 100_000_000, true);
        assert!((t.seconds - 0.501).abs() < 1e-9, "{t:?}");
    }

    /// With a network, a call takes the longer of its device work and its busiest egress,
    /// plus its latencies in sequence: the ring by hand on 4 independent ranks.
    #[test]
    fn link_terms_by_hand() {
        let p = Probe {
            alone: vec![figures(1e9); 4],
            together: figures(1e9),
            shared: false,
            bytes: 0,
        };
        let link = LinkCost {
            gbps: 0.1,
            latency_us: 50.0,
        };
        let m = CostModel::new(p, 1 << 30).with_link(Some(link));
        // Device: 1.5 s as above. Wire: 2*3/4*400 MB at 0.1 GB/s = 6 s. Latency: 6 x 50 us.
        let t = m.predict(Algorithm::Ring, 400_000_000, true);
        assert!((t.seconds - (6.0 + 6.0 * 50e-6)).abs() < 1e-9, "{t:?}");
        assert_eq!(t.bound, "link");
        // The star's root: the peers' buffers in, then 3 out: 4 x 400 MB at 0.1 GB/s.
        let t = m.predict(Algorithm::Naive, 400_000_000, true);
        assert!((t.seconds - (16.0 + 2.0 * 50e-6)).abs() < 1e-9, "{t:?}");
        // Halving-doubling: the ring's volume, 2 log2(4) = 4 latencies.
        let t = m.predict(Algorithm::HalvingDoubling, 400_000_000, true);
        assert!((t.seconds - (6.0 + 4.0 * 50e-6)).abs() < 1e-9, "{t:?}");
        // A link that costs nothing (zero or NaN bandwidth) adds nothing.
        for gbps in [0.0, f64::NAN] {
            let free = m.clone().with_link(Some(LinkCost {
                gbps,
                latency_us: f64::NAN,
            }));
            let t = free.predict(Algorithm::Ring, 400_000_000, true);
            assert!((t.seconds - 1.5).abs() < 1e-9, "{t:?}");
        }
    }

    /// A host that folds fast makes the star (naive) the choice on free links; over a slow
    /// link its root's egress, n buffers against the ring's 2(n-1)/n, rules it out.
    #[test]
    fn a_slow_link_turns_auto_from_the_star() {
        let mut f = figures(1e9);
        f.host_reduce = 1e11;
        f.reduce = 2e8;
        let p = Probe {
            alone: vec![f; 4],
            together: f,
            shared: false,
            bytes: 0,
        };
        let m = CostModel::new(p, 1 << 20);
        assert_eq!(m.choose(64 << 20, true), Algorithm::Naive);
        let slow = m.with_link(Some(LinkCost {
            gbps: 0.01,
            latency_us: 50.0,
        }));
        let c = slow.choose(64 << 20, true);
        assert!(
            matches!(c, Algorithm::Ring | Algorithm::HalvingDoubling),
            "{c:?}"
        );
    }

    /// On a shared device a rank's own messages and kernels still come one after another: the
    /// star's root, with n-1 messages each way and (central) n-1 folds on the device, sets
    /// those terms once it has more than the average.
    #[test]
    fn the_busiest_rank_sets_the_pace_on_a_shared_device() {
        let n = 32;
        let model = |f: Figures| same_everywhere(f, n, true);
        let mut f = figures(1e15);
        f.frame = 1e-3;
        let m = model(f);
        // Naive's and central's root: 31 messages in and 31 out (31 frames), in turn: the
        // busiest rank's frames, not the average.
        for star in [Algorithm::Naive, Algorithm::Central] {
            let t = m.predict(star, 4, true);
            assert!((t.seconds - 31e-3).abs() < 1e-9, "{star}: {t:?}");
        }
        // Halving-doubling: 5 exchanges each way on every rank; the ring 2 x 31 steps.
        let t = m.predict(Algorithm::HalvingDoubling, 4, true);
        assert!((t.seconds - 10e-3).abs() < 1e-9, "{t:?}");
        let t = m.predict(Algorithm::Ring, 4, true);
        assert!((t.seconds - 62e-3).abs() < 1e-9, "{t:?}");
        assert_eq!(m.choose(4, true), Algorithm::HalvingDoubling);
        // Central's root launches a kernel for each of 31 peers' slices, in turn.
        let mut f = figures(1e15);
        f.launch = 1e-3;
        let m = model(f);
        let t = m.predict(Algorithm::Central, 4, true);
        assert!((t.seconds - 31e-3).abs() < 1e-9, "{t:?}");
        // The ring launches one for each of its 31 reduce-scatter steps, halving-doubling for
        // each of its 5 halvings; naive none.
        let t = m.predict(Algorithm::Ring, 4, true);
        assert!((t.seconds - 31e-3).abs() < 1e-9, "{t:?}");
        let t = m.predict(Algorithm::HalvingDoubling, 4, true);
        assert!((t.seconds - 5e-3).abs() < 1e-9, "{t:?}");
        assert!(m.predict(Algorithm::Naive, 4, true).seconds < 1e-9);
    }

    /// Every algorithm pays a frame per message exchanged (a frame sent and one taken; one of
    /// them alone, half) in sequence on its busiest rank: the rings 2(n-1) per slice,
    /// halving-doubling 2·log2(p) plus, on a rank that folds a partner in, its buffer in and
    /// the result out, the star's root n-1.
    #[test]
    fn frames_by_hand() {
        let mut f = figures(1e15);
        f.frame = 1e-3;
        for shared in [false, true] {
            for (n, want) in [
                (
                    4,
                    [
                        (Algorithm::StagedHalvingDoubling, 4.0),
                        (Algorithm::HalvingDoubling, 4.0),
                        (Algorithm::Ring, 6.0),
                        (Algorithm::Naive, 3.0),
                        (Algorithm::Central, 3.0),
                    ],
                ),
                (
                    3,
                    [
                        (Algorithm::StagedHalvingDoubling, 3.0),
                        (Algorithm::HalvingDoubling, 3.0),
                        (Algorithm::Ring, 4.0),
                        (Algorithm::Naive, 2.0),
                        (Algorithm::Central, 2.0),
                    ],
                ),
            ] {
                let m = same_everywhere(f, n, shared);
                let t = m.predict_for(Algorithm::Staged, 4, true, true);
                let ring = 2.0 * (n - 1) as f64;
                assert!((t.seconds - ring * 1e-3).abs() < 1e-9, "{t:?}");
                assert_eq!(t.bound, "frames");
                for (algo, frames) in want {
                    let t = m.predict(algo, 4, true);
                    assert!(
                        (t.seconds - frames * 1e-3).abs() < 1e-9,
                        "{n} ranks, {algo}: {t:?}"
                    );
                }
            }
        }
    }

    /// A peer's wait is charged to the device steps that upload what a peer just read back
    /// (the device ring's and halving-doubling's), one each, and to no other algorithm's:
    /// naive's, central's and the staged ones' device steps need no peer's. On 3 ranks
    /// halving-doubling's folding rank takes its partner's buffer in and sends the result
    /// back, one step more than the others (and the busiest rank sets the pace, shared or not).
    #[test]
    fn waits_by_hand() {
        use crate::types::CollectiveKind::{AllGather, ReduceScatter};
        let mut f = figures(1e15);
        f.wait = 1e-3;
        for shared in [false, true] {
            for (n, hd) in [(4, 4.0), (3, 3.0), (2, 2.0)] {
                let m = same_everywhere(f, n, shared);
                let c = (n - 1) as f64;
                for (algo, waits) in [
                    (Algorithm::Ring, 2.0 * c),
                    (Algorithm::HalvingDoubling, hd),
                    (Algorithm::Naive, 0.0),
                    (Algorithm::Central, 0.0),
                    (Algorithm::Staged, 0.0),
                    (Algorithm::StagedHalvingDoubling, 0.0),
                ] {
                    let t = m.predict(algo, 4 * n, true);
                    assert!(
                        (t.seconds - waits * 1e-3).abs() < 1e-9,
                        "{n} ranks, shared {shared}, {algo}: {t:?}"
                    );
                }
                for kind in [ReduceScatter, AllGather] {
                    for (algo, waits) in [(Algorithm::Ring, c), (Algorithm::Staged, 0.0)] {
                        let t = m.predict_call(kind, algo, 4 * n, true).map(|t| t.seconds);
                        assert!(
                            t.is_some_and(|t| (t - waits * 1e-3).abs() < 1e-9),
                            "{n} ranks, shared {shared}, {kind:?} {algo}: {t:?}"
                        );
                    }
                }
            }
        }
        // Each rank of halving-doubling on 3, which the busiest rank hides above: the lone
        // rank's result upload, the folding rank's buffer in, exchange and result out, the
        // third rank's exchange.
        for (r, waits) in [(0, 1.0), (1, 3.0), (2, 2.0)] {
            let w = work(Algorithm::HalvingDoubling, 3, r, 12, true, 1 << 30, false);
            assert_eq!(w.chained, waits, "rank {r}");
        }
    }

    /// A fixed cost that is not a number of at least 0 costs nothing: a NaN (which sorts
    /// first) must not make its algorithm the choice.
    #[test]
    fn figures_that_are_not_numbers_cost_nothing() {
        let mut f = figures(1e9);
        f.step = 1e-3;
        let m = |f: Figures| {
            CostModel::new(
                Probe {
                    alone: vec![f; 4],
                    together: f,
                    shared: true,
                    bytes: 0,
                },
                1 << 20,
            )
        };
        let base = m(f).predict(Algorithm::Ring, 4096, true).seconds;
        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            let mut g = f;
            (g.launch, g.frame, g.call, g.submit) = (bad, bad, bad, bad);
            let t = m(g).predict(Algorithm::Ring, 4096, true);
            assert_eq!(t.seconds, base, "{bad}: {t:?}");
            assert_eq!(m(g).choose(4096, true), m(f).choose(4096, true), "{bad}");
        }
    }

    /// A call's fixed cost once a call, whatever the size and the algorithm; its submission's
    /// too, but where the host-staged ring works in mapped tensors and uses no device.
    #[test]
    fn calls_by_hand() {
        let mut f = figures(1e15);
        f.call = 1e-3;
        f.submit = 2e-3;
        let p = Probe {
            alone: vec![f; 4],
            together: f,
            shared: true,
            bytes: 0,
        };
        let m = CostModel::new(p, 1 << 20);
        for algo in Algorithm::CONCRETE
            .into_iter()
            .chain([Algorithm::Staged, Algorithm::StagedHalvingDoubling])
        {
            for bytes in [4, 64 << 20] {
                let t = m.predict(algo, bytes, false);
                assert!((t.seconds - 3e-3).abs() < 1e-5, "{algo} {bytes}: {t:?}");
            }
        }
        let t = m.predict_for(Algorithm::Staged, 4, false, true);
        assert!((t.seconds - 1e-3).abs() < 1e-9, "{t:?}");
        assert_eq!(t.bound, "call");
    }

    /// The floor: one read-back and one upload per rank, all ranks at once on a shared device
    /// (at the aggregate rates), the slowest rank on independent ones.
    #[test]
    fn the_floor_by_hand() {
        let mut f = figures(1e9);
        f.readback = 2e9;
        let shared = Probe {
            alone: vec![f; 4],
            together: f,
            shared: true,
            bytes: 0,
        };
        // 4 x 100 MB at 2 GB/s + 4 x 100 MB at 1 GB/s = 0.2 + 0.4 s.
        let m = CostModel::new(shared, 1 << 20);
        assert!((m.floor(100_000_000) - 0.6).abs() < 1e-9);
        let mut slow = f;
        slow.upload = 0.5e9;
        let apart = Probe {
            alone: vec![f, f, slow, f],
            together: f,
            shared: false,
            bytes: 0,
        };
        // The slow rank: 0.05 + 0.2 s.
        let m = CostModel::new(apart, 1 << 20);
        assert!((m.floor(100_000_000) - 0.25).abs() < 1e-9);
        assert_eq!(
            CostModel::new(Probe::default(), 1 << 20).floor(1 << 20),
            0.0
        );
    }

    #[test]
    fn auto_follows_the_model() {
        // A host that reduces 100x faster than the device: naive wins; the reverse: not naive.
        let mut f = figures(1e9);
        f.host_reduce = 1e11;
        f.reduce = 1e8;
        let p = Probe {
            alone: vec![f; 4],
            together: f,
            shared: true,
            bytes: 0,
        };
        let m = CostModel::new(p.clone(), 1 << 20);
        assert_eq!(m.choose(64 << 20, true), Algorithm::Naive);
        let mut g = figures(1e9);
        g.host_reduce = 1e7;
        let p = Probe {
            alone: vec![g; 4],
            together: g,
            shared: false,
            bytes: 0,
        };
        assert_ne!(
            CostModel::new(p, 1 << 20).choose(64 << 20, true),
            Algorithm::Naive
        );
    }

    /// The host's rate by the call's size: the cached rate up to 1 MiB, the memory rate above;
    /// the memory rate at every size where the cached one was not measured, or the probe was
    /// no larger than 1 MiB.
    #[test]
    fn the_hosts_rate_follows_the_calls_size() {
        let mut f = figures(1e9);
        f.host_reduce = 5e9;
        f.host_cached = 20e9;
        let probed = 16 << 20;
        for bytes in [0, 4, 64 << 10, 1 << 20] {
            assert_eq!(f.host_rate(bytes, probed), 20e9, "{bytes}");
        }
        for bytes in [(1 << 20) + 4, 4 << 20, 16 << 20, 64 << 20, usize::MAX] {
            assert_eq!(f.host_rate(bytes, probed), 5e9, "{bytes}");
        }
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let g = Figures {
                host_cached: bad,
                ..f
            };
            for bytes in [4, 4 << 20, 64 << 20] {
                assert_eq!(g.host_rate(bytes, probed), 5e9, "{bad} {bytes}");
            }
        }
        for probed in [0, 4096, 1 << 20] {
            assert_eq!(f.host_rate(4, probed), 5e9, "probed {probed}");
        }
    }

    /// The model charges the host's work at its rate for the call's size, alone and together,
    /// in all-reduces and in reduce-scatters and all-gathers.
    #[test]
    fn host_work_is_charged_at_the_calls_size() {
        let mut f = figures(1e12);
        f.host_reduce = 1e9;
        f.host_cached = 4e9;
        for shared in [false, true] {
            let p = Probe {
                alone: vec![f; 4],
                together: f,
                shared,
                bytes: 16 << 20,
            };
            let m = CostModel::new(p, 1 << 20).with_unified_memory(true);
            let host = |t: &Prediction| t.terms.iter().find(|t| t.0 == "host").map(|t| t.1);
            for (bytes, rate) in [
                (64 << 10, 4e9),
                (1 << 20, 4e9),
                (4 << 20, 1e9),
                (16 << 20, 1e9),
            ] {
                // The staged ring in mapped tensors, out of place: (2(n-1)+2)/n of the buffer
                // on the host, per rank (all four ranks' together, shared).
                let per = 2.0 * bytes as f64;
                let want = if shared { 4.0 * per } else { per } / rate;
                let t = m.predict_for(Algorithm::Staged, bytes, false, true);
                let got = host(&t).unwrap_or_default();
                assert!((got / want - 1.0).abs() < 1e-9, "{bytes} {shared}: {t:?}");
                // A staged reduce-scatter: 2(n-1)/n of its input folded and copied into frames;
                // a staged all-gather: 2(n-1)/n of its output copied out of frames and into them.
                for kind in [CollectiveKind::ReduceScatter, CollectiveKind::AllGather] {
                    let per = 1.5 * bytes as f64;
                    let want = if shared { 4.0 * per } else { per } / rate;
                    let t = m.predict_call(kind, Algorithm::Staged, bytes, false);
                    let got = t.as_ref().and_then(host).unwrap_or_default();
                    assert!(
                        (got / want - 1.0).abs() < 1e-9,
                        "{kind:?} {bytes} {shared}: {t:?}"
                    );
                }
            }
        }
    }
}
