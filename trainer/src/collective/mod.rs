//! Collectives: one trait, two backends.
//!
//! - [`ring::RingCollective`]: a bandwidth-optimal TCP ring (reduce-scatter then
//!   all-gather) for CPU tensors; every read has a deadline and a dead peer is a
//!   clean error.
//! - [`nccl::NcclCollective`]: NCCL through `cudarc` for CUDA tensors.
//!
//! Every operation works in place on contiguous tensors. An [`AbortHandle`]
//! lets another thread (the agent relay, on a round change) break a collective
//! that is blocked on a peer.

pub mod nccl;
pub mod ring;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tch::Tensor;

/// What can go wrong in a collective; every variant names what the caller can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CollectiveError {
    #[error("{op}: no data from rank {peer} within {timeout_secs:.1}s")]
    Timeout {
        op: &'static str,
        peer: usize,
        timeout_secs: f64,
    },
    #[error("{op}: rank {peer} closed the connection (it died or left the round)")]
    PeerClosed { op: &'static str, peer: usize },
    #[error("collective aborted")]
    Aborted,
    #[error("connect to rank {peer} at {addr}: {source}")]
    Connect {
        peer: usize,
        addr: String,
        source: std::io::Error,
    },
    #[error("{op}: i/o with rank {peer}: {source}")]
    Io {
        op: &'static str,
        peer: usize,
        source: std::io::Error,
    },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("nccl: {0}")]
    Nccl(String),
}

pub type Result<T, E = CollectiveError> = std::result::Result<T, E>;

/// Collective operations over all ranks of one round.
pub trait Collective: Send {
    fn rank(&self) -> usize;
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

    pub fn abort(&self) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            for f in self.on_abort.lock().expect("abort actions lock").iter() {
                f();
            }
        }
    }

    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }
}
