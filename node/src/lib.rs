//! kiln-node: what one node of a job runs, above the coordinator and the
//! trainer.
//!
//! `kiln-coordinator` (the store, rendezvous, election, job status) and
//! `kiln-trainer` (the workers) may not depend on each other (DESIGN.md §1);
//! a node of a job needs both, so their meeting point is this crate, between
//! them and the CLI. `kiln agent` and `kiln run` are argument parsing, a call
//! into it, and output.
//!
//! # Layout
//!
//! - [`agent`]: [`NodeAgent`](agent::NodeAgent), one node of an elastic job
//!   (`kiln agent`): joins the rendezvous, campaigns for its leadership
//!   (`kiln_coordinator::membership::lead_rendezvous`), supervises its workers
//!   across rounds, records the job's status, registers the model; and
//!   [`job_spec`](agent::job_spec), the spec every node of a job shares.
//! - [`local`]: [`run_local`](local::run_local), `kiln run`'s job: one node,
//!   one round, over the process's memory store.
//! - [`workers`]: starting a node's workers and its `/metrics`.
//! - [`events`]: [`JobEvents`](events::JobEvents), the job events
//!   (`[[hooks]]`) a node sends for what its workers report, shared by
//!   `kiln run` and `kiln agent`.
//! - [`register`]: registering a model version, a finished job's or one by
//!   hand (`kiln registry register`).
//! - [`logs`]: the node's worker logs (files, store, console).
//! - [`history`]: the dashboard's metrics history of a job
//!   ([`RunFeed`](history::RunFeed) for `kiln run`,
//!   [`AgentHistory`](history::AgentHistory) for `kiln agent`).
//!
//! Errors are `anyhow` with context, like the CLI's: every error here ends
//! the node's part in the job and is reported, not acted on.

#![warn(missing_docs)]

pub mod agent;
pub mod events;
pub mod history;
pub mod local;
pub mod logs;
pub mod register;
pub mod workers;

/// The node name of `kiln run`'s one node.
pub const LOCAL_NODE: &str = "local";
