//! A bandwidth-optimal ring for CPU tensors.
//!
//! # Layout
//!
//! - this file: the API ([`RingCollective`], [`RingSecret`], [`Transport`])
//!   and the tensor checks;
//! - `connect.rs`: connecting into the ring (the authenticated handshake,
//!   connecting to next while accepting prev);
//! - `plan.rs`: the pure part: operation headers, and which sub-chunk each
//!   side moves when;
//! - `exec.rs`: running a plan (the sender and receiver sides, their
//!   synchronisation, the sums);
//! - `shm.rs`: the shared-memory pipe between ranks on one host.
//!
//! # Topology
//!
//! Rank `r` opens one connection to its *next* rank `(r + 1) % W` and accepts one
//! from its *prev* rank `(r - 1 + W) % W`. Data only ever flows next-wards, so each
//! connection carries one direction (for `W = 2` the pair holds two connections,
//! one per direction). With `W = 1` there are no sockets and every operation is a
//! local copy or a no-op.
//!
//! # Transport
//!
//! Between ranks on one host (`Transport::Auto`, the default) each
//! connection's data goes through a shared-memory pipe and the connection
//! itself carries only wake-ups, so it still reports a dead peer or an abort
//! at once (`shm.rs`); elsewhere, and with `Transport::Tcp`, through the
//! connection. Everything below holds for both.
//!
//! # Algorithms
//!
//! - all-reduce is a reduce-scatter followed by an all-gather: the buffer is cut
//!   into `W` chunks and, over `2 (W - 1)` steps, every rank sends one chunk per
//!   step, i.e. `2 (W - 1) / W` of the buffer in total, which is the lower bound
//!   for any all-reduce (hence "bandwidth-optimal").
//! - all-gather is the second half of that; broadcast is a pipelined chain from
//!   the root around the ring; the barrier is an all-gather of one byte.
//!
//! # Pipelining
//!
//! Each chunk is cut into sub-chunks of `SUB_CHUNK_BYTES` (512 KiB). For the
//! duration of one operation a scoped sender thread writes sub-chunks to *next*
//! while the calling thread reads sub-chunks from *prev* and adds them into the
//! buffer straight from a reused receive buffer, or from the shared-memory pipe
//! in place (overwrite steps read directly into the caller's buffer, with no
//! intermediate copy). The two threads
//! synchronise per sub-chunk through two counters of completed transfers: a
//! sub-chunk is forwarded as soon as it has been reduced, so transfer, reduction
//! and forwarding overlap, and a sub-chunk is overwritten only once the sender is
//! done reading it. One thread spawn per operation costs microseconds, noise next
//! to a megabyte transfer; a persistent sender thread would have to hold the
//! caller's buffer beyond a borrow, which scoped threads rule out by
//! construction. On loopback, sub-chunks from 128 KiB to 1 MiB measured alike
//! (within noise).
//!
//! # Wire format
//!
//! Little-endian throughout; floats travel as their native in-memory bytes, so
//! the ring refuses to build for big-endian targets (it is exercised on x86-64
//! only). A connection starts with a handshake each way (magic, round, rank,
//! world size, a nonce, and an HMAC-SHA256 of all that under the round's
//! [`RingSecret`]); the acceptor refuses a connection that does not prove it
//! knows the secret, or comes from another round, another world size or a
//! rank other than its prev, and keeps waiting for the right one. Its reply
//! proves the same to the connector and is bound to the connector's nonce.
//! A refusal reveals nothing: no round, rank, world size or reason (the
//! refusing rank logs why). The handshake authenticates peers; it neither
//! encrypts nor authenticates the data that follows (see docs/security.md).
//! Every operation starts with a header (operation, sequence number, length,
//! root) so that ranks calling different collectives fail with a clear error
//! instead of silently exchanging garbage.
//!
//! # Failure
//!
//! Every read and write has the deadline given to [`RingCollective::connect`]: no
//! progress within it is [`CollectiveError::Timeout`]; EOF or a reset is
//! [`CollectiveError::PeerClosed`] naming the peer. An [`AbortHandle`] shuts the
//! sockets down, which wakes a blocked read or write at once. After any failure
//! the byte streams are out of step, so the ring shuts its sockets down (peers
//! then fail fast instead of waiting for their deadline) and every later
//! operation fails.
mod connect;
mod exec;
mod plan;
mod shm;
#[cfg(test)]
mod tests;

use std::io;
use std::net::{Shutdown, TcpListener};
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use super::{AbortHandle, Collective, CollectiveError, Result};
pub use connect::fuzzing;
use connect::{Handshake, HandshakeKind, Links, MAC_LEN, connect_links, random_bytes};
pub use exec::Bf16;
use exec::{Endpoint, Progress, SharedBuf, Side, lock, receive_side, run_side, send_side};
use exec::{Reduce, Summable};
use plan::{OpHeader, OpKind, Transfer, plan_all_gather, plan_all_reduce, plan_broadcast};

#[cfg(target_endian = "big")]
compile_error!("the ring sends floats as native bytes and assumes a little-endian target");

/// Pipelining granularity. Small enough that the first forward starts early and
/// the receive buffer stays in L2 while it is being reduced; large enough that
/// the per-sub-chunk synchronisation (one mutex round trip) is negligible.
const SUB_CHUNK_BYTES: usize = 512 * 1024;

/// The secret that admits a connection to one round's ring: every rank of the
/// round has it (from the round's plan), nobody else should. 32 random bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct RingSecret([u8; 32]);

impl RingSecret {
    /// A new secret from the operating system's random source.
    pub fn random() -> io::Result<Self> {
        random_bytes().map(Self)
    }

    /// The secret from its bytes; exactly 32 of them.
    pub fn from_bytes(bytes: &[u8]) -> std::result::Result<Self, String> {
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| format!("a ring secret is 32 bytes, got {}", bytes.len()))?;
        Ok(Self(bytes))
    }

    /// The secret's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn mac(&self) -> HmacSha256 {
        <HmacSha256 as hmac::Mac>::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

impl std::fmt::Debug for RingSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RingSecret(..)")
    }
}

/// How the ring moves data between neighbours.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// Shared memory between ranks on the same host (a pipe in `/dev/shm`
    /// beside each connection; see `shm.rs`), TCP between hosts and wherever
    /// the peer cannot map this host's `/dev/shm` (another container).
    #[default]
    Auto,
    /// TCP on every link, even between ranks on one host.
    Tcp,
}

/// The ring over the ranks of one round. See the [module docs](self).
pub struct RingCollective {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// `None` when `world == 1`.
    links: Option<Links>,
    abort: AbortHandle,
    /// Operations started so far; carried in each [`OpHeader`] so that a rank that
    /// skipped or added a collective is detected at the next one.
    seq: u64,
    /// Why the ring is unusable: set by the first failed operation, because the
    /// byte streams are then out of step.
    broken: Option<BrokenRing>,
    /// Receive buffer for reducing steps, reused across calls; `u64` storage so
    /// that its `f32` / `f64` views are aligned.
    scratch: Vec<u64>,
    /// Transfer plans, reused across calls.
    sends: Vec<Transfer>,
    receives: Vec<Transfer>,
}

/// The first failure, remembered to explain why later operations fail.
struct BrokenRing {
    peer: usize,
    reason: String,
}

impl RingCollective {
    /// Connects this rank into the ring.
    ///
    /// `listener` is this rank's already-bound listener; its address is
    /// `peers[rank]`. It is switched to non-blocking mode while accepting and back
    /// to blocking mode afterwards. `round` is a fencing token: the handshake
    /// carries it, and connections from another round (or a wrong rank, or another
    /// world size) are refused; so are connections that do not prove they know
    /// `secret`, and a peer whose reply does not prove it is refused in turn. Connecting retries until `timeout`, which is also
    /// the deadline of every later read and write: it must exceed the longest time
    /// a rank may wait inside a collective for the slowest rank to join (the skew
    /// of a training step), or healthy rounds will fail with
    /// [`CollectiveError::Timeout`].
    pub fn connect(
        round: u64,
        rank: usize,
        peers: &[String],
        listener: &TcpListener,
        secret: &RingSecret,
        timeout: Duration,
    ) -> Result<Self> {
        Self::connect_abortable(
            round,
            rank,
            peers,
            listener,
            secret,
            timeout,
            Transport::Auto,
            AbortHandle::default(),
        )
    }

    /// [`connect`](Self::connect) with a choice of `transport`, that `abort`
    /// can break while it waits for peers (a newer round arrived), and whose
    /// `abort` becomes the ring's own [`abort_handle`](Collective::abort_handle).
    #[allow(clippy::too_many_arguments)]
    pub fn connect_abortable(
        round: u64,
        rank: usize,
        peers: &[String],
        listener: &TcpListener,
        secret: &RingSecret,
        timeout: Duration,
        transport: Transport,
        abort: AbortHandle,
    ) -> Result<Self> {
        let world = peers.len();
        if rank >= world {
            return Err(CollectiveError::Unsupported(format!(
                "rank {rank} out of range for {world} peers"
            )));
        }
        // A zero duration is rejected by `set_read_timeout`; treat it as "as short as possible".
        let timeout = timeout.max(Duration::from_millis(1));
        let links = if world == 1 {
            None
        } else {
            let hello = Handshake {
                kind: HandshakeKind::Hello,
                round,
                rank,
                world,
                nonce: random_bytes().map_err(|source| CollectiveError::Connect {
                    peer: rank,
                    addr: peers[rank].clone(),
                    source,
                })?,
                mac: [0; MAC_LEN],
            };
            let (next, prev) = match connect_links(&hello, peers, listener, secret, timeout, &abort)
            {
                Err(_) if abort.is_aborted() => return Err(CollectiveError::Aborted),
                links => links?,
            };
            Some(Links::new(next, prev, &hello, timeout, transport, &abort)?)
        };
        if abort.is_aborted() {
            // Aborted while the links were being made: the abort actions ran
            // before the links registered theirs.
            return Err(CollectiveError::Aborted);
        }
        tracing::debug!(round, rank, world, "ring connected");
        Ok(Self {
            rank,
            world,
            timeout,
            links,
            abort,
            seq: 0,
            broken: None,
            scratch: Vec::new(),
            sends: Vec::new(),
            receives: Vec::new(),
        })
    }

    /// Sums `buf` element-wise over all ranks, in place.
    pub fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_sum(buf)
    }

    /// Sums `buf` element-wise over all ranks, in place.
    pub fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce_sum(buf)
    }

    /// Copies `buf` from rank `root` to every rank, in place.
    pub fn broadcast_bytes(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        self.check_usable()?;
        if root >= self.world {
            return Err(CollectiveError::Unsupported(format!(
                "broadcast root {root} out of range for world size {}",
                self.world
            )));
        }
        if self.world == 1 {
            return Ok(());
        }
        plan_broadcast(
            self.rank,
            self.world,
            root,
            buf.len(),
            &mut self.sends,
            &mut self.receives,
        );
        let header = self.next_header(OpKind::Broadcast, buf.len(), root as u64);
        self.run(header, buf, None)
    }

    /// Gathers every rank's `input` into `output`, in rank order;
    /// `output.len()` must be `input.len() * world_size`.
    pub fn all_gather_bytes(&mut self, input: &[u8], output: &mut [u8]) -> Result<()> {
        self.check_usable()?;
        let block = input.len();
        if output.len() != block * self.world {
            return Err(CollectiveError::Unsupported(format!(
                "all-gather output holds {} bytes, expected {} x {} ranks",
                output.len(),
                block,
                self.world
            )));
        }
        output[self.rank * block..(self.rank + 1) * block].copy_from_slice(input);
        if self.world == 1 {
            return Ok(());
        }
        plan_all_gather(
            self.rank,
            self.world,
            block,
            &mut self.sends,
            &mut self.receives,
        );
        let header = self.next_header(OpKind::AllGather, block, u64::MAX);
        self.run(header, output, None)
    }

    /// Returns once every rank has called it.
    pub fn barrier(&mut self) -> Result<()> {
        self.check_usable()?;
        if self.world == 1 {
            return Ok(());
        }
        // An all-gather of one byte: a rank can only have received every other
        // rank's byte once all of them have entered the barrier.
        let mut arrivals = vec![0u8; self.world];
        arrivals[self.rank] = 1;
        plan_all_gather(
            self.rank,
            self.world,
            1,
            &mut self.sends,
            &mut self.receives,
        );
        let header = self.next_header(OpKind::Barrier, 1, u64::MAX);
        self.run(header, &mut arrivals, None)
    }

    fn all_reduce_sum<T: Summable>(&mut self, buf: &mut [T]) -> Result<()> {
        self.check_usable()?;
        if self.world == 1 {
            return Ok(());
        }
        plan_all_reduce(
            self.rank,
            self.world,
            buf.len(),
            size_of::<T>(),
            &mut self.sends,
            &mut self.receives,
        );
        let header = self.next_header(T::OP, buf.len(), u64::MAX);
        // SAFETY: `T` is f32 or f64: plain bytes without padding, every bit pattern
        // valid, so viewing the exclusively borrowed buffer as bytes is sound.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), size_of_val(buf))
        };
        self.run(header, bytes, Some(Reduce::of::<T>()))
    }

    fn check_usable(&self) -> Result<()> {
        if self.abort.is_aborted() {
            return Err(CollectiveError::Aborted);
        }
        match &self.broken {
            None => Ok(()),
            Some(broken) => Err(CollectiveError::Io {
                op: "collective",
                peer: broken.peer,
                source: io::Error::other(format!(
                    "ring unusable after an earlier failure: {}",
                    broken.reason
                )),
            }),
        }
    }

    fn next_header(&mut self, op: OpKind, len: usize, root: u64) -> OpHeader {
        self.seq += 1;
        OpHeader {
            op,
            seq: self.seq,
            len: len as u64,
            root,
        }
    }

    /// Runs the planned `self.sends` / `self.receives` over `buf`: the sends on a
    /// scoped thread, the receives on this one.
    fn run(&mut self, header: OpHeader, buf: &mut [u8], reduce: Option<Reduce>) -> Result<()> {
        let Some(links) = &self.links else {
            // Callers return early for world == 1, the only case without links.
            return Ok(());
        };
        // Sums from a pipe read in place; only a socket needs a receive buffer.
        if reduce.is_some() && links.prev_pipe.is_none() && self.scratch.is_empty() {
            self.scratch = vec![0u64; SUB_CHUNK_BYTES.div_ceil(8)];
        }
        let endpoint = Endpoint {
            op: header.op.name(),
            timeout: self.timeout,
            abort: &self.abort,
            next_rank: (self.rank + 1) % self.world,
            prev_rank: (self.rank + self.world - 1) % self.world,
            next: &links.next,
            prev: &links.prev,
            next_pipe: links.next_pipe.as_ref(),
            prev_pipe: links.prev_pipe.as_ref(),
        };
        let shared = SharedBuf {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        };
        let progress = Progress::default();
        let sends = &self.sends;
        let receives = &self.receives;
        // SAFETY: `u64` storage viewed as bytes (no padding, any bit pattern valid).
        let scratch = unsafe {
            std::slice::from_raw_parts_mut(
                self.scratch.as_mut_ptr().cast::<u8>(),
                size_of_val(self.scratch.as_slice()),
            )
        };
        let (sent, received) = std::thread::scope(|scope| {
            let sender = (!sends.is_empty()).then(|| {
                scope.spawn(|| {
                    run_side(Side::Send, &endpoint, &progress, || {
                        send_side(&endpoint, &header, shared, sends, &progress)
                    })
                })
            });
            let received = run_side(Side::Receive, &endpoint, &progress, || {
                receive_side(
                    &endpoint, &header, shared, receives, scratch, reduce, &progress,
                )
            });
            let sent = match sender {
                Some(handle) => handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                None => Ok(()),
            };
            (sent, received)
        });
        let error = match (sent, received) {
            (Ok(()), Ok(())) => return Ok(()),
            (Err(error), Ok(())) | (Ok(()), Err(error)) => error,
            // The side that failed first holds the cause; the other one only saw
            // the sockets being shut down.
            (Err(send_error), Err(receive_error)) => match progress.first_failure() {
                Some(Side::Send) => send_error,
                _ => receive_error,
            },
        };
        let error = if self.abort.is_aborted() {
            CollectiveError::Aborted
        } else {
            error
        };
        let peer = match &error {
            CollectiveError::Timeout { peer, .. }
            | CollectiveError::PeerClosed { peer, .. }
            | CollectiveError::Io { peer, .. } => *peer,
            _ => endpoint.prev_rank,
        };
        tracing::debug!(rank = self.rank, %error, "ring operation failed; ring closed");
        self.broken = Some(BrokenRing {
            peer,
            reason: error.to_string(),
        });
        Err(error)
    }
}

impl Drop for RingCollective {
    fn drop(&mut self) {
        if let Some(links) = &self.links {
            // Shut down rather than just close: an `AbortHandle` clone may keep
            // duplicated descriptors alive, and peers must see EOF now.
            let _ = links.next.shutdown(Shutdown::Both);
            let _ = links.prev.shutdown(Shutdown::Both);
            lock(&links.abort_clones).clear();
        }
    }
}

impl Collective for RingCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()> {
        check_plain_cpu(t, "all_reduce_sum")?;
        match t.kind() {
            Kind::Float => {
                // SAFETY: a defined, dense, contiguous CPU Float tensor, borrowed mutably.
                let buf = unsafe { tensor_elements_mut::<f32>(t) }?;
                self.all_reduce_sum_f32(buf)
            }
            Kind::Double => {
                // SAFETY: as above, for Double.
                let buf = unsafe { tensor_elements_mut::<f64>(t) }?;
                self.all_reduce_sum_f64(buf)
            }
            Kind::BFloat16 => {
                // SAFETY: as above, for BFloat16 (two bytes, any bit pattern).
                let buf = unsafe { tensor_elements_mut::<Bf16>(t) }?;
                self.all_reduce_sum(buf)
            }
            kind => Err(CollectiveError::Unsupported(format!(
                "all_reduce_sum on {kind:?} tensors (the ring sums Float, Double and BFloat16)"
            ))),
        }
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()> {
        check_plain_cpu(t, "broadcast")?;
        // SAFETY: a defined, dense, contiguous CPU tensor, borrowed mutably.
        let bytes = unsafe { tensor_elements_mut::<u8>(t) }?;
        self.broadcast_bytes(bytes, root)
    }

    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        check_plain_cpu(input, "all_gather input")?;
        check_plain_cpu(output, "all_gather output")?;
        if input.kind() != output.kind() {
            return Err(CollectiveError::Unsupported(format!(
                "all_gather from {:?} into {:?}",
                input.kind(),
                output.kind()
            )));
        }
        // The two may overlap (a rank's input is commonly a view of its slot in
        // the output): compare the address ranges before any slice exists, and
        // copy an overlapping input out first, so that a shared and a mutable
        // slice of the same bytes never live at once.
        let range = |t: &Tensor| {
            let start = t.data_ptr() as usize;
            start..start + t.numel() * t.kind().elt_size_in_bytes()
        };
        let (input_range, output_range) = (range(input), range(&*output));
        let overlap = !input_range.is_empty()
            && input_range.start < output_range.end
            && output_range.start < input_range.end;
        let input_copy;
        let input_bytes: &[u8] = if overlap {
            // SAFETY: a defined, dense, contiguous CPU tensor; the slice is
            // dropped (copied out) before the output is borrowed mutably.
            input_copy = unsafe { tensor_bytes(input) }.to_vec();
            &input_copy
        } else {
            // SAFETY: as above; the ranges do not overlap, so the mutable
            // output slice below aliases none of these bytes.
            unsafe { tensor_bytes(input) }
        };
        // SAFETY: a defined, dense, contiguous CPU tensor, borrowed mutably.
        let output_bytes = unsafe { tensor_elements_mut::<u8>(output) }?;
        self.all_gather_bytes(input_bytes, output_bytes)
    }

    fn barrier(&mut self) -> Result<()> {
        RingCollective::barrier(self)
    }

    fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }
}

/// Refuses tensors whose memory is not one dense CPU block.
fn check_plain_cpu(t: &Tensor, what: &str) -> Result<()> {
    if !t.defined() {
        return Err(CollectiveError::Unsupported(format!(
            "{what}: undefined tensor"
        )));
    }
    if t.device() != Device::Cpu {
        return Err(CollectiveError::Unsupported(format!(
            "{what}: tensor on {:?} (the ring handles CPU tensors)",
            t.device()
        )));
    }
    if t.is_sparse() || t.is_mkldnn() || !t.is_contiguous() {
        return Err(CollectiveError::Unsupported(format!(
            "{what}: tensor is not dense and contiguous"
        )));
    }
    Ok(())
}

/// The tensor's memory as a slice: `numel * element size` bytes from `data_ptr()`
/// (which already includes the storage offset).
///
/// # Safety
///
/// `t` must have passed [`check_plain_cpu`], and nothing may write its storage
/// while the slice is alive.
unsafe fn tensor_bytes(t: &Tensor) -> &[u8] {
    let len = t.numel() * t.kind().elt_size_in_bytes();
    if len == 0 {
        return &[];
    }
    // SAFETY: a contiguous CPU tensor's elements are `len` bytes at `data_ptr()`,
    // kept alive by `t`; the caller excludes concurrent writers.
    unsafe { std::slice::from_raw_parts(t.data_ptr().cast::<u8>(), len) }
}

/// The tensor's memory as a mutable slice of `T` (`u8` for raw bytes).
///
/// # Safety
///
/// `t` must have passed [`check_plain_cpu`], its element size must be a multiple
/// of `size_of::<T>()` (`T` = the element type, or `u8`), `T` must accept any bit
/// pattern, and nothing else (another view of the same storage included) may
/// touch the storage while the slice is alive.
unsafe fn tensor_elements_mut<T>(t: &mut Tensor) -> Result<&mut [T]> {
    let len = t.numel() * t.kind().elt_size_in_bytes() / size_of::<T>();
    if len == 0 {
        return Ok(&mut []);
    }
    let ptr = t.data_ptr().cast::<T>();
    if !ptr.is_aligned() {
        return Err(CollectiveError::Unsupported(
            "tensor data is not aligned for its element type".into(),
        ));
    }
    // SAFETY: see the function's contract; the memory is kept alive by `t`, which
    // is borrowed mutably for the slice's lifetime.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}
