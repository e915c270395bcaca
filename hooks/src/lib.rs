//! kiln hooks: events from training and serving, delivered to configured sinks.
//!
//! A job spec's `[[hooks]]` entries (and the server config's hook list) are
//! [`kiln_proto::spec::HookSpec`]s. [`Hooks::new`] checks them, reads webhook
//! secrets, and starts one background delivery task per hook. Callers build an
//! [`Event`] (usually from a payload struct: `Event::of("digits", &JobStarted
//! { .. })`) and [`Hooks::emit`] it; emitting never waits. Before exiting, a
//! process calls [`Hooks::flush`] so its last events are not lost.
//!
//! ```no_run
//! # async fn example(specs: &[kiln_proto::spec::HookSpec]) -> Result<(), kiln_hooks::Error> {
//! use std::time::Duration;
//! use kiln_hooks::{Event, Hooks, event::JobFailed};
//!
//! let hooks = Hooks::new(specs)?;
//! hooks.emit(Event::of("digits", &JobFailed {
//!     job: "digits".into(),
//!     error: "restart budget spent".into(),
//!     step: Some(120),
//!     round: Some(3),
//! }));
//! hooks.flush(Duration::from_secs(10)).await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - `event`: [`Event`], the kind constants ([`kind`]) and one payload struct per kind.
//! - `config`: from specs to ready sinks (secrets, URLs, filters, programs).
//! - `dispatch`: [`Hooks`]: per-sink bounded queues, delivery tasks, retries,
//!   statistics, flush.
//! - `sink`: one delivery attempt: the log, a webhook POST, a command.
//! - `retry`: [`HookOptions`] and the backoff schedule.
//! - `signature`: the webhook signature scheme and [`verify_signature`].
//!
//! The wire format, signature scheme and retry policy are documented for
//! receivers in `docs/hooks.md`.

#![warn(missing_docs)]

mod config;
mod dispatch;
mod error;
pub mod event;
mod retry;
mod signature;
mod sink;

pub use dispatch::{Hooks, SinkStats};
pub use error::{Error, Result};
pub use event::{Event, EventPayload, kind};
pub use retry::HookOptions;
pub use signature::{SIGNATURE_PREFIX, sign, verify_signature};
pub use sink::{HEADER_DELIVERY, HEADER_EVENT, HEADER_SIGNATURE, HEADER_TIMESTAMP};
