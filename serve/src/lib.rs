//! kiln-serve: the inference server (Open Inference Protocol v2, REST and gRPC).
//!
//! Today this crate holds the protocol's tensor datatypes and their mapping to
//! checkpoint dtypes, the contract between the registry (checkpoints) and the
//! server; the server, batching, hot swap and drift monitoring come with the
//! registry issue (DESIGN.md §6).

pub mod datatype;
