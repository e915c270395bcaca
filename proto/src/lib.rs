//! kiln's wire contracts, shared by every part.
//!
//! # Layout
//!
//! - [`worker`]: protobuf messages of the agent <-> worker channel (generated from
//!   `proto/kiln/worker.proto`), and [`frame`], their length-prefixed framing.
//! - [`spec`]: the job spec (TOML), its strict validation and `--set` overrides.
//!   It lives here because the CLI, the coordinator and the trainer all read it
//!   and none of them may depend on another (DESIGN.md §1; see docs/job-spec.md).
//! - [`store_url`]: the syntax of store URLs (`etcd://`, `etcds://` with TLS
//!   files and credentials, `mem://`), shared by the CLI, specs and the coordinator.
//! - [`job`]: the job API of `kiln coordinator` (gRPC server and client,
//!   generated from `proto/kiln/job.proto`) and the mapping of its errors to
//!   gRPC status codes ([`job::ServiceError`]).
//! - [`inference`]: the Open Inference Protocol's gRPC service (server and
//!   client), served by `kiln-serve`.
//! - [`http_host`]: whether an HTTP `Host` names this machine's loopback
//!   interface, the DNS-rebinding check of the dashboard and of `kiln serve`'s
//!   token-less management.

#![warn(missing_docs)]

pub mod frame;
pub mod http_host;
pub mod job;
pub mod spec;
pub mod store_url;

/// Messages of the local agent <-> worker channel. An `Assignment` is much
/// larger than a `Stop`, and one is sent per round: not worth a box.
#[allow(clippy::large_enum_variant)]
pub mod worker {
    include!(concat!(env!("OUT_DIR"), "/kiln.worker.v1.rs"));
}

/// The Open Inference Protocol v2 (KServe v2) gRPC service that `kiln serve`
/// implements (generated from `proto/kiln/inference.proto`; the package is
/// `inference` because clients such as tritonclient call it by that name).
pub mod inference {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/inference.rs"));
}
