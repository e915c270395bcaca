//! kiln-serve: the inference server (`kiln serve`).
//!
//! It serves registered model versions over the Open Inference Protocol v2
//! (KServe v2), REST and gRPC on one port, so unmodified clients
//! (`tritonclient`, KServe tooling) work; batches requests dynamically;
//! follows registry aliases, swapping versions without failing a request;
//! splits traffic between an alias's versions; exports Prometheus metrics;
//! and gives language models Triton's generate extension (text in, text out,
//! streamed as server-sent events). See `docs/serving.md`.
//!
//! # Layout
//!
//! - [`config`]: the server's settings (TOML file + flags) and tokens.
//! - [`app`]: starting a server ([`start`], [`RunningServer`]) and the one
//!   router of its port (gRPC by content type, REST otherwise).
//! - [`server`]: shared state, the inference path both protocols use, model
//!   (un)loading.
//! - [`listener`]: the accept loop: connection cap, header and idle
//!   timeouts, HTTP/2 keepalive, the in-flight cap, optional TLS.
//! - [`http`] and [`grpc`]: the two front ends; [`grpc_guard`]: the token
//!   and size checks a gRPC request passes before tonic decodes it.
//! - [`protocol`]: protocol-neutral requests and responses; decoding inputs,
//!   encoding outputs. [`datatype`]: the protocol's tensor datatypes.
//! - [`signature`]: a version's inputs and outputs, checked at load time.
//! - [`deployment`]: per model, the versions requests go to (canary weights),
//!   and the watcher that swaps them when an alias moves.
//! - [`model`]: loading a version's verified weights into its network.
//! - [`batcher`]: per version, the compute threads and their dynamic
//!   batching (at a few batch shapes), shared with [`lm`].
//! - [`lm`]: a language model's compute threads: batched next-token logits
//!   and generation (KV cache, seeded sampling), text streamed piece by piece;
//!   [`generate`]: Triton's generate extension (request, parameters, events).
//! - [`metrics`]: Prometheus metrics. [`auth`]: bearer tokens.
//! - [`drift`]: drift statistics and windows over a reference profile;
//!   [`monitor`]: feeding served rows to it, gauges and `drift.detected` events.
//!
//! # A request, end to end
//!
//! A front end parses the request into an [`protocol::InferRequest`] and
//! calls [`server::ServerState::infer`]: the model's [`deployment::Deployment`]
//! picks a version (the one named, or a seeded weighted draw), the input is
//! checked against that version's signature and decoded to `f32` rows, and
//! the rows are queued for the version's compute thread, which batches them
//! with others into a forward pass. The logits come back through a oneshot
//! channel and become the requested outputs.
//!
//! A language model's version takes `input_ids` instead (decoded to token
//! ids, batched with queued requests of the same sequence length; the last
//! block runs at the last position only) and also answers `/generate` and `/generate_stream`
//! ([`server::ServerState::generate`]): the prompt is tokenized with the
//! version's registered tokenizer on the blocking pool, generated on the
//! compute thread, and each token's text comes back through a channel.

#![warn(missing_docs)]

pub mod app;
pub mod auth;
pub mod batcher;
pub mod config;
pub mod datatype;
pub mod deployment;
pub mod drift;
pub mod error;
pub mod generate;
pub mod grpc;
pub mod grpc_guard;
pub mod http;
pub mod listener;
pub mod lm;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod packed;
pub mod protocol;
pub mod server;
pub mod signature;

pub use app::{RunningServer, start};
pub use config::ServeConfig;
pub use error::{Error, ModelError};
pub use server::ServerState;
