//! kiln-coordinator: how the processes of a kiln job find each other and agree
//! on who trains with whom.
//!
//! Everything rests on one interface, [`store::Store`]: a revisioned key-value
//! store with compare-and-swap, prefix watches and leases (etcd's model). On
//! top of it, [`election`] picks a leader per job, and the leader runs the
//! [`rendezvous`] state machine through the [`membership`] driver: nodes put a
//! record on a lease, the leader turns record changes into rounds, and writes
//! each round's plan (members, ranks, peers) once, fenced by its round number.
//! The keys all of this lives under are spelled in one place, [`keyspace`].
//! `docs/coordination.md` describes the protocol for operators and reviewers.
//!
//! # Layout
//!
//! - [`store`]: the [`Store`](store::Store) trait and its contract
//!   (revisions, watches without gaps, leases), [`WatchStream`](store::WatchStream).
//!   - [`store::mem`]: [`MemStore`](store::mem::MemStore), in process, for
//!     `kiln run` and tests.
//!   - [`store::etcd`]: [`EtcdStore`](store::etcd::EtcdStore), an etcd
//!     cluster, with endpoint health and retries, TLS and authentication
//!     ([`EtcdSecurity`](store::etcd::EtcdSecurity)); [`store::connect`] opens
//!     a store from its URL (`etcd://host:port,...`, `etcds://...?ca=...`,
//!     with `user=` and `password_file=`, or `mem://`).
//! - [`etcd_server`]: real etcd processes (one member or a cluster, plain or
//!   TLS) for tests and benchmarks.
//! - [`conformance`]: the test suite every `Store` backend passes.
//! - [`election`]: leadership per key: [`campaign`](election::campaign),
//!   [`LeaderGuard`](election::LeaderGuard), [`leader`](election::leader).
//! - [`keyspace`]: key names under a root (default `/kiln`), DESIGN.md §3.
//! - [`launch`]: the launch backends behind `kiln launch`: an sbatch script
//!   ([`launch::slurm`]) or Kubernetes manifests ([`launch::k8s`]) that start
//!   one `kiln agent` per node.
//! - [`logs`]: per-rank worker logs: the line format, rotated files per node
//!   ([`NodeLogs`](logs::NodeLogs)), shipping to the store
//!   ([`LogShipper`](logs::LogShipper)), and the readers
//!   ([`read`](logs::read), [`follow`](logs::follow)) behind `kiln logs`.
//! - [`rendezvous`]: the sans-IO state machine: events and time in, actions
//!   out; node records and plans.
//! - [`membership`]: the async driver around it: [`run_leader`](membership::run_leader)
//!   for the leader, [`join`](membership::join) and
//!   [`NodeSession`](membership::NodeSession) for a node.
//! - [`status`]: the job record at `jobs/{job}/status`
//!   ([`JobStatus`](status::JobStatus)), updated by compare-and-swap
//!   ([`update`](status::update)), and cancel requests
//!   ([`request_cancel`](status::request_cancel), [`watch_cancel`](status::watch_cancel)).
//! - [`api`]: the job API (`kiln.job.v1.JobService`) over a store, with
//!   bearer-token authentication.
//! - [`replica`]: a coordinator replica's background work under an election
//!   (launching the agents of submitted jobs).
//! - [`error`]: the crate's [`Error`] and [`Result`].
//!
//! # Example
//!
//! One node rendezvousing with itself over the memory store:
//!
//! ```
//! use std::time::Duration;
//! use kiln_coordinator::keyspace::Keyspace;
//! use kiln_coordinator::membership;
//! use kiln_coordinator::rendezvous::{NodeRecord, RendezvousConfig};
//! use kiln_coordinator::store::{Store, mem::MemStore};
//! use tokio_util::sync::CancellationToken;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> kiln_coordinator::Result<()> {
//! let store: std::sync::Arc<dyn Store> = MemStore::new();
//! let ks = Keyspace::default();
//! let cfg = RendezvousConfig {
//!     job: "demo".into(),
//!     min_nodes: 1,
//!     max_nodes: 1,
//!     settle: Duration::ZERO,
//!     max_failures: 0,
//!     max_scale_events: 0,
//!     cooldown: Duration::ZERO,
//! };
//! let cancel = CancellationToken::new();
//! let leader = tokio::spawn(membership::run_leader(store.clone(), ks.clone(), cfg, None, cancel.clone()));
//! let record = NodeRecord {
//!     node: "node-0".into(),
//!     host: "127.0.0.1".into(),
//!     endpoints: vec!["127.0.0.1:29500".into(), "127.0.0.1:29501".into()],
//!     devices: 2,
//!     version: "dev".into(),
//!     presence: None,
//! };
//! let mut session = membership::join(store.clone(), ks, "demo", record, Duration::from_secs(5)).await?;
//! let plan = session.next_plan(0).await?;
//! assert_eq!((plan.round, plan.world_size), (1, 2));
//! // The job is done: stop the leader first, since a node leaving a running
//! // job is a failure to it.
//! cancel.cancel();
//! leader.await.expect("leader task")?;
//! session.leave().await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod api;
pub mod conformance;
pub mod election;
pub mod error;
pub mod etcd_server;
pub mod keyspace;
pub mod launch;
pub mod logs;
pub mod membership;
pub mod presence;
pub mod rendezvous;
pub mod replica;
pub mod status;
pub mod store;

pub use error::{Error, Result};
