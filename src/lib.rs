//! # wccl — the WebGPU Collective Communications Library
//!
//! Collectives (all-reduce, reduce-scatter, all-gather, broadcast, reduce, barrier) across
//! several wgpu devices — one per adapter, or several on one adapter — with the reductions done by
//! WGSL compute kernels on the devices, and a deadline on every call.
//!
//! The layers, bottom up:
//! - [`device`]: adapters, one rank's device, typed buffers, staging buffers;
//! - `kernels`: the WGSL reduce kernels (sources in `shaders/`);
//! - [`link`]: how frames move between ranks (crossbeam channels in one process, TCP across
//!   processes and hosts);
//! - [`rendezvous`]: how the ranks of a job, one process each, find each other (launchers'
//!   variables, rank 0's store);
//! - [`algo`]: one schedule per algorithm (ring all-reduce, chain broadcast, ...), pure code;
//! - [`comm`]: [`Communicator`] (one rank), [`CommGroup`] (all ranks of a process), and the
//!   executor that runs an algorithm's plan on a device over a link;
//! - [`ps`]: the parameter server (push/pull, modes, replication, CAP choice);
//! - [`tp`]: tensor parallelism (a tiled WGSL matmul, column- and row-parallel products and
//!   layers, the Megatron MLP block);
//! - [`availability`]: the arithmetic of nines and replicas, and a model of a training job's
//!   progress under failures (pure code, no devices).
//!
//! ```no_run
//! # fn main() -> wccl::Result<()> {
//! use wccl::{CommGroup, ReduceOp};
//!
//! // Four ranks over whatever adapters exist (sharing one when there are fewer).
//! let mut group = CommGroup::builder().ranks(4).build()?;
//! let bufs = (0..4)
//!     .map(|r| group.comm(r).upload(&vec![r as f32 + 1.0; 1 << 16]))
//!     .collect::<wccl::Result<Vec<_>>>()?;
//! let views: Vec<_> = bufs.iter().map(|b| b.view()).collect();
//! group.all_reduce(&views, ReduceOp::Sum)?;
//! assert!(group.comm(0).download(&bufs[0])?.iter().all(|&x| x == 10.0));
//! # Ok(()) }
//! ```

#![warn(missing_docs, missing_debug_implementations)]

pub mod algo;
pub mod availability;
pub mod bench;
pub mod comm;
mod deadline;
pub mod device;
mod error;
mod kernels;
pub mod link;
pub mod model;
pub mod ps;
pub mod rendezvous;
pub mod tp;
mod types;

pub use algo::{Algorithm, ParseAlgorithmError};
pub use comm::{
    AbortHandle, CallOptions, Collective, CommConfig, CommGroup, Communicator, ConnectOptions,
    GroupBuilder, OnFailure, Outcome,
};
pub use device::{AdapterSelector, DeviceBuffer, RankDevice, TensorRef};
pub use error::{At, Error, Result};
pub use half::{bf16, f16};
pub use types::{CollectiveKind, DType, Element, ReduceOp};
/// The wgpu this crate is built against: its types ([`wgpu::Device`], [`wgpu::AdapterInfo`],
/// ...) appear in wccl's API, so callers name them through this re-export and never mismatch
/// versions.
pub use wgpu;

/// README.md's examples, compiled as doc tests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
