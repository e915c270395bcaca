//! kiln-ui: the web dashboard (`kiln ui`, `kiln run --ui`, `kiln coordinator
//! --ui`) and the metrics history it reads. No libtorch.
//!
//! The dashboard is an axum server with a small JSON API and static pages
//! embedded in the binary (plain HTML, CSS and JavaScript, hand-written SVG
//! charts; no build step). Its pages poll the API, so live curves update
//! without a reload. What it shows comes from where kiln already keeps it:
//! job records in the coordination store, run folders, checkpoint roots, the
//! registry, and a `kiln serve`'s `/metrics`. The user guide is `docs/ui.md`.
//!
//! # Layout
//!
//! - [`history`]: a job's metrics history ([`JobHistory`]): the progress
//!   series downsampled into a bounded number of buckets
//!   ([`ProgressSeries`]), held-out metrics, rounds and checkpoints. Pure.
//! - [`recorder`]: the agent's side: folds progress into the history and
//!   writes it to the store (`jobs/{job}/history`) and the run folder.
//! - [`jobs`]: reading jobs back from a store and from run folders.
//! - [`checkpoints`], [`registry`], [`serving`]: what the Checkpoints,
//!   Registry and Serving pages show (serving parses Prometheus text).
//! - [`server`]: the routes, the token check, [`UiConfig`] and [`serve`].
//! - `assets`: the embedded pages.

#![warn(missing_docs)]

mod assets;
pub mod checkpoints;
pub mod history;
pub mod jobs;
pub mod recorder;
pub mod registry;
pub mod server;
pub mod serving;

pub use history::{JobHistory, ProgressSeries, Sample};
pub use jobs::JobSources;
pub use recorder::{Record, Recorder, RecorderConfig};
pub use server::{UiConfig, check_listen, router, serve};
