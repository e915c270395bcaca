//! kiln-checkpoint: the storage side of training state, without libtorch.
//!
//! Checkpoints deal in typed byte views ([`TensorView`]: name, dtype, shape,
//! bytes); the trainer and the server convert to and from `tch::Tensor`. This
//! keeps the storage engine fast to build, test and benchmark.
//!
//! # Layout
//!
//! - [`tensor`]: [`DType`] and [`TensorView`].
//! - [`digest`]: the canonical weights digest that makes two runs comparable
//!   bit for bit.

pub mod digest;
pub mod tensor;

pub use digest::weights_digest;
pub use tensor::{DType, TensorView};
