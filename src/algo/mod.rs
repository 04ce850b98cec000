//! Algorithms: each collective's schedule, one file per algorithm.
//!
//! An algorithm is a pure function from (ranks, this rank, sizes, op) to a [`Plan`]: the list of
//! device copies, transfers to and from neighbours, and scalings this rank performs. Algorithms
//! never touch wgpu or a link; the communicator's executor runs the plan, pipelining read-backs
//! ahead of the transfers that need them.

mod central_all_reduce;
mod chain_broadcast;
mod chain_reduce;
mod dissemination_barrier;
mod halving_doubling_all_reduce;
mod naive_all_reduce;
mod plan;
mod ring_all_gather;
mod ring_all_reduce;
mod ring_barrier;
mod ring_reduce_scatter;
#[cfg(test)]
mod simulate;
mod staged_all_gather;
mod staged_halving_doubling_all_reduce;
mod staged_reduce_scatter;
mod staged_ring_all_reduce;
mod tree_broadcast;
mod tree_reduce;

pub use central_all_reduce::central_all_reduce;
pub use chain_broadcast::chain_broadcast;
pub(crate) use chain_broadcast::chain_broadcast_data;
pub use chain_reduce::chain_reduce;
pub use dissemination_barrier::dissemination_barrier;
pub use halving_doubling_all_reduce::halving_doubling_all_reduce;
pub use naive_all_reduce::naive_all_reduce;
pub(crate) use plan::Fold;
pub use plan::{Action, Buf, Plan, Recv, Region, Source, Transfer, partition};
pub use ring_all_gather::ring_all_gather;
pub use ring_all_reduce::ring_all_reduce;
pub use ring_barrier::ring_barrier;
pub use ring_reduce_scatter::ring_reduce_scatter;
pub use staged_all_gather::staged_all_gather;
pub use staged_halving_doubling_all_reduce::staged_halving_doubling_all_reduce;
pub use staged_reduce_scatter::staged_reduce_scatter;
pub use staged_ring_all_reduce::staged_ring_all_reduce;
pub use tree_broadcast::tree_broadcast;
pub use tree_reduce::tree_reduce;

/// The number of slices each chunk is cut into so that no slice exceeds `slice_elems`; every
/// rank computes it from the largest chunk, so sender and receiver agree slice by slice.
pub(crate) fn slices_per_chunk(largest_chunk: usize, slice_elems: usize) -> usize {
    largest_chunk.div_ceil(slice_elems.max(1)).max(1)
}

/// How an all-reduce is carried out (and, `Staged`, a reduce-scatter or an all-gather).
///
/// Non-exhaustive: new algorithms are not breaking changes, so a `match` needs a `_` arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Algorithm {
    /// Ring reduce-scatter + all-gather, reductions on the devices: bandwidth-optimal.
    #[default]
    Ring,
    /// Everyone sends to rank 0, which reduces on its device and sends the result back (the
    /// parameter-server pattern).
    Central,
    /// Everything is read back to rank 0's host, reduced by its CPU, and written back.
    Naive,
    /// The host-staged ring: one read-back, the ring on host memory (folding on the CPU), one
    /// upload: the ring's link traffic, and N bytes each way between device and host instead
    /// of the device ring's 2(n-1)/n·N; on a unified-memory device, in tensors mapped in
    /// place, none at all. `Auto` weighs it only there (elsewhere its model entry is rough).
    ///
    /// Reduce-scatter and all-gather run on host memory too with it ([`staged_reduce_scatter`],
    /// [`staged_all_gather`]): one read-back of the input (all-gather: of this rank's piece),
    /// the ring's steps between host memories, and one upload of the result, with no device
    /// round trip per step. `Auto` runs them as the cost model predicts faster, staged or on
    /// the device ring; every other algorithm runs them as the device ring.
    Staged = 4,
    /// Recursive halving-doubling (Rabenseifner): a reduce-scatter by recursive halving and an
    /// all-gather by recursive doubling among p, the largest power of two at most n: 2·log2(p)
    /// exchanges against the ring's 2(n-1), and the ring's link traffic, 2(p-1)/p of the buffer
    /// each way; reductions on the devices. Rank counts that are not powers of two fold their
    /// 2(n-p) first ranks in pairs first (one more buffer each way, and two more steps, on
    /// those). For small messages at scale; `Auto` weighs it everywhere.
    HalvingDoubling = 5,
    /// Halving-doubling on host memory: one read-back, the exchanges between host memories
    /// (folding on the CPU), one upload: N bytes each way between device and host per rank,
    /// and no device round trip per exchange, so small messages at scale pay only the link and
    /// the host per step (Gloo's CUDA halving-doubling stages this way). `Auto` does not weigh
    /// it yet: its model entry, like the staged ring's off unified memory, is not yet
    /// measured against what it does.
    StagedHalvingDoubling = 6,
    /// Whichever the cost model predicts fastest for this size and these devices.
    ///
    /// The choice rests on the model, which every rank must hold alike, and on the call's size
    /// (as NCCL's tuning rests on what the ranks agreed at init plus count and type), not on
    /// whether a rank's call is in place or what its tensors are: ranks with different models
    /// may choose differently and fail the call. For reduce-scatter and all-gather it picks
    /// between the device ring and their staged forms. For all-reduce, where the probe found
    /// that every rank maps tensors in place, the choice includes
    /// the host-staged ring, which then maps the whole wgpu buffer of a tensor made with
    /// [`tensor_usages`](crate::RankDevice::tensor_usages) for the length of the call.
    ///
    /// Without a cost model (no [`CommGroup::probe`](crate::CommGroup::probe) and no
    /// [`Communicator::set_cost_model`](crate::Communicator::set_cost_model)), `Auto` runs the
    /// ring, silently; [`Communicator::last_algorithm`](crate::Communicator::last_algorithm)
    /// then says `Ring`, never `Auto`.
    Auto = 3,
}

impl Algorithm {
    /// The concrete algorithms `Auto` chooses among everywhere; `Staged` joins them where every
    /// rank maps tensors in place (`CostModel::unified_memory`, see `CostModel::choose_for`). For every
    /// algorithm, [`ALL`](Self::ALL).
    pub const CONCRETE: [Algorithm; 4] = [
        Algorithm::Ring,
        Algorithm::Central,
        Algorithm::Naive,
        Algorithm::HalvingDoubling,
    ];
    /// Every concrete algorithm (not `Auto`), the host-staged ones included.
    pub const ALL: [Algorithm; 6] = [
        Algorithm::Ring,
        Algorithm::Central,
        Algorithm::Naive,
        Algorithm::Staged,
        Algorithm::HalvingDoubling,
        Algorithm::StagedHalvingDoubling,
    ];

    pub(crate) const fn code(self) -> u32 {
        self as u32
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Algorithm::Ring => "ring",
            Algorithm::Central => "central",
            Algorithm::Naive => "naive",
            Algorithm::Staged => "staged",
            Algorithm::HalvingDoubling => "hd",
            Algorithm::StagedHalvingDoubling => "staged-hd",
            Algorithm::Auto => "auto",
        })
    }
}

/// The error of parsing an [`Algorithm`] from a name that is none of `ring`, `central`,
/// `naive`, `staged`, `hd`, `staged-hd`, `auto`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown algorithm '{name}' (ring, central, naive, staged, hd, staged-hd, auto)")]
pub struct ParseAlgorithmError {
    /// The name that was given.
    pub name: String,
}

impl std::str::FromStr for Algorithm {
    type Err = ParseAlgorithmError;
    fn from_str(s: &str) -> Result<Self, ParseAlgorithmError> {
        match s {
            "ring" => Ok(Algorithm::Ring),
            "central" => Ok(Algorithm::Central),
            "naive" => Ok(Algorithm::Naive),
            "staged" => Ok(Algorithm::Staged),
            "hd" | "halving-doubling" => Ok(Algorithm::HalvingDoubling),
            "staged-hd" => Ok(Algorithm::StagedHalvingDoubling),
            "auto" => Ok(Algorithm::Auto),
            _ => Err(ParseAlgorithmError { name: s.into() }),
        }
    }
}
