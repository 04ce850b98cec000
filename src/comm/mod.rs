//! Communicators: the per-rank handle, group construction and group calls, the frame header,
//! and the executor that runs an algorithm's plan on a device over a link.

mod agree;
mod communicator;
mod executor;
mod group;
mod grow;
mod host_ops;
mod job_probe;
mod last_write;
mod launch;
mod local;
mod probe;
mod protocol;
mod split;
mod straggle;
mod survive;

pub use communicator::{
    AbortHandle, CallOptions, Collective, CommConfig, Communicator, MAX_PIPELINE_DEPTH, OnFailure,
    Outcome,
};
pub(crate) use communicator::{TREE_MIN_RANKS, on_tree};
pub use group::{CommGroup, GroupBuilder, MAX_RANKS};
pub use launch::ConnectOptions;
