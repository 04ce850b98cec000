//! Tensor parallelism, Megatron-LM style: one matrix product split across the ranks of a
//! communicator, with the collectives that join the shards.
//!
//! - [`Kernels`]: a rank's device work — the tiled WGSL matmul (`shaders/matmul.wgsl`, f32 and
//!   f16 with f32 accumulation, optional transposes, any shape), GELU forward and backward, and
//!   column copies (`shaders/elementwise.wgsl`).
//! - [`ColumnParallel`] and [`RowParallel`]: `C = A B` split by columns of B (joined by an
//!   all-gather) or along the inner dimension (joined by an all-reduce).
//! - [`ColumnParallelLinear`], [`RowParallelLinear`] and [`ParallelMlp`]: layers with forward and
//!   backward passes (f32). The MLP block needs one all-reduce forward and one backward.
//!
//! Work that fails on one rank between collectives (bad shapes, say) breaks its communicator and
//! aborts the peers, as a failed collective does, so nobody waits for the deadline.

mod kernels;
mod linear;
mod mlp;
mod split;

pub use crate::kernels::MatmulKernel;
pub use kernels::{Kernels, Matmul};
pub use linear::{ColumnParallelLinear, RowParallelLinear};
pub use mlp::ParallelMlp;
pub use split::{ColumnParallel, RowParallel, columns_of, rows_of, shard};

use crate::comm::Communicator;
use crate::error::{At, Error, Result};

/// Passes on the result of a rank-local step; a failure breaks `comm` and aborts its peers.
fn local<T>(comm: &mut Communicator, result: Result<T>) -> Result<T> {
    if let Err(e) = &result {
        comm.abort(e);
    }
    result
}

/// Refuses a call with `message`: an [`Error::InvalidArgument`] that also breaks `comm` and
/// aborts its peers.
fn refuse(comm: &mut Communicator, message: String) -> Error {
    let e = Error::InvalidArgument {
        at: At::rank(comm.rank()),
        message,
    };
    comm.abort(&e);
    e
}
