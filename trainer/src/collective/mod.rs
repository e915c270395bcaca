//! Collectives: one trait, two backends.
//!
//! - [`ring::RingCollective`]: a bandwidth-optimal ring (reduce-scatter then
//!   all-gather) for CPU tensors, over shared memory between ranks on one host
//!   and TCP between hosts; every read has a deadline and a dead peer is a
//!   clean error.
//! - [`nccl::NcclCollective`]: NCCL through `cudarc` for CUDA tensors.
//!
//! Every operation works in place on contiguous tensors. An [`AbortHandle`]
//! lets another thread (the agent relay, on a round change) break a collective
//! that is blocked on a peer.

#![warn(missing_docs)]

/// NCCL through `cudarc`, for CUDA tensors.
pub mod nccl;
/// The CPU ring: shared memory between ranks on one host, TCP between hosts.
pub mod ring;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tch::Tensor;

/// What can go wrong in a collective; every variant names what the caller can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CollectiveError {
    /// A peer sent nothing within the deadline (`[comm] timeout_secs`): it
    /// hangs, or a rank runs far behind; the round should be redone.
    #[error("{op}: no data from rank {peer} within {timeout_secs:.1}s")]
    Timeout {
        /// The operation that waited (`all_reduce_sum_f32`, `barrier`, ...).
        op: &'static str,
        /// The rank waited for.
        peer: usize,
        /// The deadline, in seconds.
        timeout_secs: f64,
    },
    /// A peer's connection ended: it died or left the round.
    #[error("{op}: rank {peer} closed the connection (it died or left the round)")]
    PeerClosed {
        /// The operation that was running.
        op: &'static str,
        /// The rank that went.
        peer: usize,
    },
    /// An [`AbortHandle`] broke the collective (a newer round arrived).
    #[error("collective aborted")]
    Aborted,
    /// Connecting to a peer failed before the deadline.
    #[error("connect to rank {peer} at {addr}: {source}")]
    Connect {
        /// The rank connected to.
        peer: usize,
        /// Its address, as the round's plan gives it.
        addr: String,
        /// The last connection error.
        source: std::io::Error,
    },
    /// Any other I/O failure with a peer (including a peer running another
    /// collective than this rank: the message says which).
    #[error("{op}: i/o with rank {peer}: {source}")]
    Io {
        /// The operation that was running.
        op: &'static str,
        /// The rank on the other end.
        peer: usize,
        /// What failed.
        source: std::io::Error,
    },
    /// The call cannot be served (a tensor's dtype, device or layout; a rank
    /// out of range): a programming error, not a fault of the round.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// NCCL reported an error (its message).
    #[error("nccl: {0}")]
    Nccl(String),
}

/// A collective's result.
pub type Result<T, E = CollectiveError> = std::result::Result<T, E>;

/// Collective operations over all ranks of one round.
pub trait Collective: Send {
    /// This rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Ranks in the round.
    fn world_size(&self) -> usize;
    /// Sums `t` element-wise over all ranks, in place (float32 or float64, contiguous).
    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()>;
    /// Copies `t` from rank `root` to every rank, in place (any dtype, contiguous).
    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()>;
    /// Gathers every rank's `input` into `output` (world_size x input's elements,
    /// rank order); same dtype, contiguous.
    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()>;
    /// Returns when every rank has called it.
    fn barrier(&mut self) -> Result<()>;
    /// A handle that breaks this collective from another thread.
    fn abort_handle(&self) -> AbortHandle;
}

/// Breaks a collective from another thread: operations in flight and later ones
/// fail with [`CollectiveError::Aborted`].
#[derive(Clone, Default)]
pub struct AbortHandle {
    aborted: Arc<AtomicBool>,
    on_abort: Arc<std::sync::Mutex<Vec<AbortAction>>>,
}

type AbortAction = Box<dyn Fn() + Send + Sync>;

impl AbortHandle {
    /// Registers an action run once on abort (closing sockets, aborting a communicator).
    pub fn on_abort(&self, f: impl Fn() + Send + Sync + 'static) {
        self.on_abort
            .lock()
            .expect("abort actions lock")
            .push(Box::new(f));
    }

    /// Breaks the collective: runs the registered actions once and makes every
    /// later operation fail with [`CollectiveError::Aborted`].
    pub fn abort(&self) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            for f in self.on_abort.lock().expect("abort actions lock").iter() {
                f();
            }
        }
    }

    /// Whether [`abort`](Self::abort) has been called.
    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }
}
