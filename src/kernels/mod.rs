//! WGSL compute kernels and their pipelines. The WGSL itself lives in `shaders/`.

mod reduce;

pub(crate) use reduce::{KernelOp, ReduceKernels};
