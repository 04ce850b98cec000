//! Algorithms: each collective's schedule, one file per algorithm.
//!
//! An algorithm is a pure function from (ranks, this rank, sizes, op) to a [`Plan`]: the list of
//! device copies, transfers to and from neighbours, and scalings this rank performs. Algorithms
//! never touch wgpu or a link; the communicator's executor runs the plan, pipelining read-backs
//! ahead of the transfers that need them.

mod chain_broadcast;
mod chain_reduce;
mod plan;
mod ring_all_gather;
mod ring_all_reduce;
mod ring_barrier;
mod ring_reduce_scatter;
#[cfg(test)]
mod simulate;

pub use chain_broadcast::chain_broadcast;
pub use chain_reduce::chain_reduce;
pub use plan::{Action, Buf, Plan, Recv, Region, Source, Transfer, partition};
pub use ring_all_gather::ring_all_gather;
pub use ring_all_reduce::ring_all_reduce;
pub use ring_barrier::ring_barrier;
pub use ring_reduce_scatter::ring_reduce_scatter;

/// The number of slices each chunk is cut into so that no slice exceeds `slice_elems`; every
/// rank computes it from the largest chunk, so sender and receiver agree slice by slice.
pub(crate) fn slices_per_chunk(largest_chunk: usize, slice_elems: usize) -> usize {
    largest_chunk.div_ceil(slice_elems.max(1)).max(1)
}
