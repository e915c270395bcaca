//! kiln's wire contracts, shared by every part.
//!
//! # Layout
//!
//! - [`worker`]: protobuf messages of the agent <-> worker channel (generated from
//!   `proto/kiln/worker.proto`), and [`frame`], their length-prefixed framing.
//! - [`spec`]: the job spec (TOML), its strict validation and `--set` overrides.
//!   It lives here because the CLI, the coordinator and the trainer all read it
//!   and none of them may depend on another (DESIGN.md §1; see docs/job-spec.md).

pub mod frame;
pub mod spec;

/// Messages of the local agent <-> worker channel.
pub mod worker {
    include!(concat!(env!("OUT_DIR"), "/kiln.worker.v1.rs"));
}
