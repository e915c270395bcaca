//! kiln-trainer: everything that runs on a training node.
//!
//! # Layout
//!
//! - [`agent`]: the node supervisor. Spawns one `kiln worker` process per device,
//!   hands each its assignment over the local channel (`kiln_proto::worker`),
//!   relays their reports, serves Prometheus metrics, and stops every worker
//!   when one fails.
//! - [`logs`]: capturing each worker's stdout and stderr line by line, stamped
//!   with time and rank, into the agent's [`LogSink`](logs::LogSink).
//! - [`worker`]: one training rank, top-down: connect to the agent, build the
//!   collective, the model and the data, then step until done.
//! - [`collective`]: the `Collective` trait and its backends (TCP ring for CPU
//!   tensors, NCCL for CUDA tensors).
//! - [`data`]: datasets (safetensors shards, a seeded generator) and the global
//!   sampler (seeded order per epoch, global sample cursor).
//! - models live in the `kiln-models` crate (shared with serving).
//! - [`optim`]: optimizers (SGD with momentum, AdamW) and learning-rate schedules,
//!   written over plain tensors so their state can be saved and transferred.
//! - [`device`]: CUDA discovery (libtorch's CUDA backend is loaded on demand).
//! - [`metrics`]: the agent's Prometheus registry.
//! - [`error`]: the crate's one [`Error`]; a collective's failure is its own
//!   variant, which ends a round rather than the job.

#![warn(missing_docs)]

pub mod affinity;
pub mod agent;
pub mod collective;
pub mod data;
pub mod device;
pub mod error;
pub mod logs;
pub mod metrics;
pub mod optim;
pub mod state;
pub mod worker;

pub use error::{Error, Result};
