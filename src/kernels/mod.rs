//! WGSL compute kernels and their pipelines. The WGSL itself lives in `shaders/`.

mod reduce;
mod update;

pub(crate) use reduce::{KernelOp, ReduceKernels};
pub(crate) use update::UpdateKernel;
