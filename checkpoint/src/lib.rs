//! kiln-checkpoint: the storage side of training state, without libtorch.
//!
//! Checkpoints deal in typed byte views ([`TensorView`]: name, dtype, shape,
//! bytes); the trainer and the server convert to and from `tch::Tensor`. This
//! keeps the storage engine fast to build, test and benchmark. The format is
//! specified in `docs/checkpoint-format.md`.
//!
//! # Layout
//!
//! - [`tensor`]: [`DType`] and [`TensorView`].
//! - [`digest`]: the canonical weights digest that makes two runs comparable
//!   bit for bit.
//! - [`error`]: the crate's one error type.
//! - [`store`]: [`CheckpointRoot`] (a URL over an `object_store` backend), the
//!   I/O runtime and the compare-and-swap behind `latest`.
//! - [`codec`]: chunk encoding (byte grouping, zstd, frame, checksums).
//! - [`compression`]: the codec policy: per save, compress or store raw,
//!   from measured CPU, idle cores and write throughput.
//! - [`sys`]: thread CPU time, idle CPU time and thread priority (Linux).
//! - [`plan`]: the canonical chunk list of a state and its per-rank stripes.
//! - [`manifest`]: manifest, part and `latest` records; the key layout.
//! - [`commit`]: the commit protocol as a pure state machine.
//! - [`save`]: [`Checkpointer`], the asynchronous per-rank save pipeline;
//!   beside it `upload` (a save's background half: chunks framed and
//!   uploaded, the part, the commit), `stripe` (the reusable host copy a
//!   save works from), `pool`
//!   (its CPU threads, at idle priority when asked) and `measure` (what the
//!   codec policy is fed: idle CPU, CPU time per chunk, write throughput).
//! - [`manager`]: [`CheckpointManager`], the training loop's policy around
//!   it (when to save, the failure budget, retention at the end).
//! - [`probe`]: the check that every rank of a round reads the others'
//!   writes under the checkpoint location (shared storage is never assumed).
//! - [`load`](mod@load): resolve, load, verify, fall back to a verified parent, list.
//! - [`gc`](mod@gc): retention and garbage collection (pins, branch heads).
//! - [`pin`]: pins, which keep registered checkpoints from retention, and
//!   the markers that order a registration against a collection.
//! - [`export`]: safetensors export and import, and writing in-memory
//!   tensors (a run's final weights) as safetensors.
//! - [`registry`]: the model registry, a catalog over checkpoints in the
//!   same object stores (versions, aliases, audit log).
//! - [`profile`]: a model version's reference data profile, against which the
//!   server detects drift.
//!
//! # A save, end to end
//!
//! Every rank calls [`Checkpointer::save`] with the same replicated state.
//! Each copies its stripe (a contiguous, byte-balanced range of the canonical
//! chunk list) and returns; the background pipeline hashes, compresses and
//! uploads the stripe's chunks (skipping those already stored) and writes the
//! rank's part. Rank 0 reads the other parts by key, writes the manifest with
//! a create-only put and moves `latest` by compare-and-swap. Readers follow
//! `latest` to the manifest and the manifest to the chunks; nothing on the
//! load path lists.

#![warn(missing_docs)]

pub mod codec;
pub mod commit;
pub mod compression;
pub mod digest;
#[cfg(target_os = "linux")]
mod direct;
pub mod error;
pub mod export;
mod failpoint;
pub mod gc;
pub mod load;
pub mod manager;
pub mod manifest;
mod measure;
pub mod pin;
pub mod plan;
mod pool;
pub mod probe;
pub mod profile;
pub mod registry;
pub mod save;
pub mod store;
mod stripe;
pub mod sys;
pub mod tensor;
#[doc(hidden)]
pub mod testdata;
mod upload;

pub use compression::{Codec, Compression, CompressionRecord};
pub use digest::weights_digest;
pub use error::{Error, Result};
pub use export::{
    export_safetensors, export_safetensors_with_progress, import_safetensors, write_safetensors,
};
pub use gc::{GcReport, PinReport, Retention, gc};
pub use load::{
    BadChunk, LoadTarget, ManifestSummary, OwnedTensor, Progress, VerifyReport, list, load,
    load_into, load_latest_verified, load_with_progress, resolve, verify, verify_with_progress,
};
pub use manager::{
    CheckpointManager, CheckpointPolicy, Conclusion, FinalSave, SaveEvent, SaveNews,
};
pub use manifest::{CheckpointMeta, FORMAT_VERSION, Manifest};
pub use save::{Checkpointer, MemoryStats, SaveConfig, SaveOutcome};
pub use store::CheckpointRoot;
pub use tensor::{DType, TensorView};
