//! WGSL compute kernels and their pipelines. The WGSL itself lives in `shaders/`.

mod elementwise;
mod matmul;
mod reduce;
mod update;

pub(crate) use elementwise::ElementwiseKernels;
pub use matmul::MatmulKernel;
pub(crate) use matmul::{MatmulCall, MatmulKernels};
pub(crate) use reduce::{KernelOp, ReduceKernels};
pub(crate) use update::UpdateKernel;
