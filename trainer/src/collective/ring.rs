//! A bandwidth-optimal TCP ring for CPU tensors.
//!
//! # Topology
//!
//! Rank `r` opens one connection to its *next* rank `(r + 1) % W` and accepts one
//! from its *prev* rank `(r - 1 + W) % W`. Data only ever flows next-wards, so each
//! connection carries one direction (for `W = 2` the pair holds two connections,
//! one per direction). With `W = 1` there are no sockets and every operation is a
//! local copy or a no-op.
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
//! buffer straight from a reused receive buffer (overwrite steps read directly
//! into the caller's buffer, with no intermediate copy). The two threads
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

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::{AbortHandle, Collective, CollectiveError, Result};

#[cfg(target_endian = "big")]
compile_error!("the TCP ring sends floats as native bytes and assumes a little-endian target");

/// Pipelining granularity. Small enough that the first forward starts early and
/// the receive buffer stays in L2 while it is being reduced; large enough that
/// the per-sub-chunk synchronisation (one mutex round trip) is negligible.
const SUB_CHUNK_BYTES: usize = 512 * 1024;

const HANDSHAKE_MAGIC: [u8; 8] = *b"KILNRNG2";
/// Magic, kind, round, rank, world (8 bytes each), nonce, MAC.
const HANDSHAKE_LEN: usize = 40 + NONCE_LEN + MAC_LEN;
const NONCE_LEN: usize = 16;
const MAC_LEN: usize = 32;
/// The bytes a handshake's MAC covers: everything before the MAC.
const SIGNED_LEN: usize = HANDSHAKE_LEN - MAC_LEN;

/// The secret that admits a connection to one round's ring: every rank of the
/// round has it (from the round's plan), nobody else should. 32 random bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct RingSecret([u8; 32]);

impl RingSecret {
    /// A new secret from the operating system's random source.
    pub fn random() -> io::Result<Self> {
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(Self(bytes))
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

impl std::fmt::Debug for RingSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RingSecret(..)")
    }
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;
const OP_HEADER_LEN: usize = 32;

/// A TCP ring over the ranks of one round. See the [module docs](self).
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

struct Links {
    next: TcpStream,
    prev: TcpStream,
    /// Clones of `next` and `prev` owned by the abort action, so that another
    /// thread can shut the sockets down; emptied on drop so the descriptors do not
    /// outlive the ring when an [`AbortHandle`] does.
    abort_clones: Arc<Mutex<Vec<TcpStream>>>,
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
            AbortHandle::default(),
        )
    }

    /// [`connect`](Self::connect) that `abort` can break while it waits for
    /// peers (a newer round arrived), and that becomes the ring's own
    /// [`abort_handle`](Collective::abort_handle).
    pub fn connect_abortable(
        round: u64,
        rank: usize,
        peers: &[String],
        listener: &TcpListener,
        secret: &RingSecret,
        timeout: Duration,
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
                nonce: random_nonce().map_err(|source| CollectiveError::Connect {
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
            Some(Links::new(next, prev, &hello, timeout, &abort)?)
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
        self.run(header, bytes, Some(add_into::<T>))
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
    fn run(&mut self, header: OpHeader, buf: &mut [u8], reduce: Option<ReduceFn>) -> Result<()> {
        let Some(links) = &self.links else {
            // Callers return early for world == 1, the only case without links.
            return Ok(());
        };
        if reduce.is_some() && self.scratch.is_empty() {
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

impl Links {
    fn new(
        next: TcpStream,
        prev: TcpStream,
        hello: &Handshake,
        timeout: Duration,
        abort: &AbortHandle,
    ) -> Result<Self> {
        let next_rank = (hello.rank + 1) % hello.world;
        let prev_rank = (hello.rank + hello.world - 1) % hello.world;
        for (stream, peer) in [(&next, next_rank), (&prev, prev_rank)] {
            let configured = tune_socket(stream)
                .and_then(|()| stream.set_read_timeout(Some(timeout)))
                .and_then(|()| stream.set_write_timeout(Some(timeout)));
            configured.map_err(|source| CollectiveError::Io {
                op: "connect",
                peer,
                source,
            })?;
        }
        let clones = vec![next.try_clone(), prev.try_clone()]
            .into_iter()
            .collect::<io::Result<Vec<_>>>()
            .map_err(|source| CollectiveError::Io {
                op: "connect",
                peer: next_rank,
                source,
            })?;
        let abort_clones = Arc::new(Mutex::new(clones));
        let on_abort = Arc::clone(&abort_clones);
        abort.on_abort(move || {
            for stream in lock(&on_abort).iter() {
                // Shutting down wakes any thread blocked on the socket; an error
                // means it is already closed, which is what we want.
                let _ = stream.shutdown(Shutdown::Both);
            }
        });
        Ok(Self {
            next,
            prev,
            abort_clones,
        })
    }
}

/// TCP_NODELAY: headers and the tail of a sub-chunk must not wait for Nagle.
///
/// Socket buffer sizes are deliberately left to the kernel. Linux autotunes them
/// per connection up to `net.ipv4.tcp_{r,w}mem` (megabytes by default), while an
/// explicit `SO_RCVBUF`/`SO_SNDBUF` turns autotuning off and is capped by
/// `net.core.{r,w}mem_max` (208 KiB on many hosts). Measured with
/// `bench/allreduce.py` on loopback, an explicit 4 MiB was slower at 64 MiB than
/// autotuning (median 1.3 against 2.0 GB/s).
fn tune_socket(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)
}

// ---------------------------------------------------------------------------
// Connecting

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HandshakeKind {
    Hello = 0,
    Accept = 1,
    Refuse = 2,
    /// The acceptor itself failed to join the ring and is giving up.
    Abandon = 3,
}

/// The first message each way on a connection.
#[derive(Clone, Copy, Debug)]
struct Handshake {
    kind: HandshakeKind,
    round: u64,
    rank: usize,
    world: usize,
    /// A hello's own fresh nonce; a reply echoes the hello's.
    nonce: [u8; NONCE_LEN],
    /// HMAC-SHA256 of the bytes before it under the round's secret (zero in
    /// a refusal, which proves nothing and says nothing).
    mac: [u8; MAC_LEN],
}

impl Handshake {
    /// The refusal: every field zero.
    const REFUSAL: Handshake = Handshake {
        kind: HandshakeKind::Refuse,
        round: 0,
        rank: 0,
        world: 0,
        nonce: [0; NONCE_LEN],
        mac: [0; MAC_LEN],
    };

    fn encode(&self) -> [u8; HANDSHAKE_LEN] {
        let mut out = [0u8; HANDSHAKE_LEN];
        out[..8].copy_from_slice(&HANDSHAKE_MAGIC);
        out[8..16].copy_from_slice(&(self.kind as u64).to_le_bytes());
        out[16..24].copy_from_slice(&self.round.to_le_bytes());
        out[24..32].copy_from_slice(&(self.rank as u64).to_le_bytes());
        out[32..40].copy_from_slice(&(self.world as u64).to_le_bytes());
        out[40..SIGNED_LEN].copy_from_slice(&self.nonce);
        out[SIGNED_LEN..].copy_from_slice(&self.mac);
        out
    }

    /// This handshake with its MAC under `secret`.
    fn signed(mut self, secret: &RingSecret) -> Self {
        use hmac::Mac;
        let mut mac = secret.mac();
        mac.update(&self.encode()[..SIGNED_LEN]);
        self.mac = mac.finalize().into_bytes().into();
        self
    }

    /// Whether the MAC is right under `secret` (compared in constant time).
    fn verifies(&self, secret: &RingSecret) -> bool {
        use hmac::Mac;
        let mut mac = secret.mac();
        mac.update(&self.encode()[..SIGNED_LEN]);
        mac.verify_slice(&self.mac).is_ok()
    }

    fn decode(bytes: &[u8; HANDSHAKE_LEN]) -> io::Result<Self> {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i..i + 8]);
            u64::from_le_bytes(w)
        };
        if bytes[..8] != HANDSHAKE_MAGIC {
            return Err(invalid_data("not a kiln ring handshake (bad magic)".into()));
        }
        let kind = match word(8) {
            0 => HandshakeKind::Hello,
            1 => HandshakeKind::Accept,
            2 => HandshakeKind::Refuse,
            3 => HandshakeKind::Abandon,
            other => return Err(invalid_data(format!("unknown handshake kind {other}"))),
        };
        let to_usize =
            |v: u64| usize::try_from(v).map_err(|_| invalid_data(format!("rank {v} too large")));
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&bytes[40..SIGNED_LEN]);
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(&bytes[SIGNED_LEN..]);
        Ok(Self {
            kind,
            round: word(16),
            rank: to_usize(word(24))?,
            world: to_usize(word(32))?,
            nonce,
            mac,
        })
    }
}

/// The handshake's read path on bytes from the network, for `fuzz/` (not
/// part of the API).
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// The length of a handshake on the wire.
    pub const HANDSHAKE_LEN: usize = super::HANDSHAKE_LEN;
    /// The first eight bytes of every handshake.
    pub const HANDSHAKE_MAGIC: [u8; 8] = super::HANDSHAKE_MAGIC;

    /// Decodes `bytes` as a received handshake and runs the checks either
    /// side runs on it: authentication under `secret`, then the expected
    /// kind, round, rank and world size. Returns the mismatch, as a peer
    /// would report it, or `Ok(())` when the handshake is the one expected.
    pub fn check_handshake(
        bytes: &[u8; HANDSHAKE_LEN],
        secret: &RingSecret,
        round: u64,
        rank: usize,
        world: usize,
    ) -> io::Result<std::result::Result<(), String>> {
        let got = Handshake::decode(bytes)?;
        assert_eq!(&got.encode(), bytes, "a decoded handshake encodes back");
        if !got.verifies(secret) {
            return Ok(Err("failed authentication".into()));
        }
        let kind = if got.kind == HandshakeKind::Hello {
            HandshakeKind::Hello
        } else {
            HandshakeKind::Accept
        };
        Ok(describe_mismatch(&got, kind, round, rank, world).map_or(Ok(()), Err))
    }

    /// `bytes`' signed part signed under `secret`: a handshake that passes
    /// authentication, so the checks after it are reached.
    pub fn sign(bytes: &mut [u8; HANDSHAKE_LEN], secret: &RingSecret) {
        use hmac::Mac;
        let mut mac = secret.mac();
        mac.update(&bytes[..SIGNED_LEN]);
        let tag: [u8; MAC_LEN] = mac.finalize().into_bytes().into();
        bytes[SIGNED_LEN..].copy_from_slice(&tag);
    }
}

fn random_nonce() -> io::Result<[u8; NONCE_LEN]> {
    let mut nonce = [0u8; NONCE_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut nonce)?;
    Ok(nonce)
}

fn invalid_data(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Connects to next and accepts prev concurrently (either may be waiting for the
/// other rank to start), returning `(next, prev)`.
fn connect_links(
    hello: &Handshake,
    peers: &[String],
    listener: &TcpListener,
    secret: &RingSecret,
    timeout: Duration,
    abort: &AbortHandle,
) -> Result<(TcpStream, TcpStream)> {
    let deadline = Instant::now() + timeout;
    let stop_accepting = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let acceptor = scope.spawn(|| {
            accept_prev(
                hello,
                peers,
                listener,
                secret,
                deadline,
                &stop_accepting,
                abort,
            )
        });
        let next = connect_next(hello, peers, secret, deadline, abort);
        if next.is_err() {
            stop_accepting.store(true, Ordering::SeqCst);
        }
        let prev = acceptor
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        Ok((next?, prev?))
    })
}

fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

/// Connects to `peers[next]` (retrying until the deadline: the peer may not be
/// listening yet), sends our hello and checks the reply.
fn connect_next(
    hello: &Handshake,
    peers: &[String],
    secret: &RingSecret,
    deadline: Instant,
    abort: &AbortHandle,
) -> Result<TcpStream> {
    let next = (hello.rank + 1) % hello.world;
    let addr = &peers[next];
    let connect_error = |source| CollectiveError::Connect {
        peer: next,
        addr: addr.clone(),
        source,
    };
    let mut backoff = Duration::from_millis(5);
    let mut stream = loop {
        let attempt = (|| {
            let left =
                remaining(deadline).ok_or_else(|| io::Error::from(io::ErrorKind::TimedOut))?;
            let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
            let mut last = io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "address resolved to nothing",
            );
            for socket_addr in addrs {
                match TcpStream::connect_timeout(&socket_addr, left) {
                    Ok(stream) => return Ok(stream),
                    Err(e) => last = e,
                }
            }
            Err(last)
        })();
        match attempt {
            Ok(stream) => break stream,
            Err(_) if abort.is_aborted() => return Err(CollectiveError::Aborted),
            Err(e) => match remaining(deadline) {
                Some(left) => std::thread::sleep(backoff.min(left)),
                None => return Err(connect_error(e)),
            },
        }
        backoff = (backoff * 2).min(Duration::from_millis(200));
    };
    let handshake = (|| {
        stream.set_nodelay(true)?;
        stream.write_all(&hello.signed(secret).encode())?;
        stream.set_read_timeout(Some(
            remaining(deadline).unwrap_or(Duration::from_millis(1)),
        ))?;
        let mut reply = [0u8; HANDSHAKE_LEN];
        stream.read_exact(&mut reply)?;
        Handshake::decode(&reply)
    })();
    let reply = handshake.map_err(connect_error)?;
    let mismatch = if reply.kind == HandshakeKind::Abandon {
        Some(format!(
            "rank {next} gave up joining round {} (its own connection failed)",
            reply.round
        ))
    } else if reply.kind == HandshakeKind::Refuse {
        Some(format!(
            "rank {next} refused the handshake of rank {} of {} in round {} (it is in another round or expects another rank; its log says which)",
            hello.rank, hello.world, hello.round
        ))
    } else if !reply.verifies(secret) || reply.nonce != hello.nonce {
        // Whoever answers at next's address does not hold this round's
        // secret (or replays an old answer): not a member of the ring.
        Some(format!(
            "the reply from rank {next}'s address failed authentication: it is not a member of round {}",
            hello.round
        ))
    } else {
        describe_mismatch(
            &reply,
            HandshakeKind::Accept,
            hello.round,
            next,
            hello.world,
        )
    };
    match mismatch {
        None => Ok(stream),
        Some(reason) => Err(connect_error(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            reason,
        ))),
    }
}

/// Why `got` is not the handshake we expect, if it is not.
fn describe_mismatch(
    got: &Handshake,
    kind: HandshakeKind,
    round: u64,
    rank: usize,
    world: usize,
) -> Option<String> {
    if got.kind != kind {
        Some(format!("expected a {kind:?} handshake, got {:?}", got.kind))
    } else if got.round != round {
        Some(format!(
            "peer is in round {}, this rank is in round {round}",
            got.round
        ))
    } else if got.world != world {
        Some(format!(
            "peer has world size {}, this rank has {world}",
            got.world
        ))
    } else if got.rank != rank {
        Some(format!("peer is rank {}, expected rank {rank}", got.rank))
    } else {
        None
    }
}

/// How long a failing connect keeps answering connections before it returns, so
/// that a peer waiting for our reply learns why at once instead of at its deadline.
const ABANDON_GRACE: Duration = Duration::from_millis(200);

/// How long an accepted connection has to send its hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Accepted connections whose hello is still being read; more are dropped.
const MAX_PENDING_HANDSHAKES: usize = 64;

/// Reads the hello of an accepted connection within `limit`.
fn read_handshake(stream: &mut TcpStream, limit: Duration) -> io::Result<Handshake> {
    // Accepted sockets do not inherit O_NONBLOCK on Linux; be explicit anyway.
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(limit))?;
    let mut bytes = [0u8; HANDSHAKE_LEN];
    stream.read_exact(&mut bytes)?;
    Handshake::decode(&bytes)
}

/// Accepts connections until one carries prev's hello for this round; refuses
/// (and logs) others, so a stale process from an earlier round cannot join.
/// Once `stop` is set (connecting to next failed) it answers pending connections
/// for [`ABANDON_GRACE`] without accepting any, then gives up.
fn accept_prev(
    hello: &Handshake,
    peers: &[String],
    listener: &TcpListener,
    secret: &RingSecret,
    deadline: Instant,
    stop: &AtomicBool,
    abort: &AbortHandle,
) -> Result<TcpStream> {
    let prev = (hello.rank + hello.world - 1) % hello.world;
    let accept_error = |source| CollectiveError::Connect {
        peer: prev,
        addr: peers[prev].clone(),
        source,
    };
    // Non-blocking so that the deadline and `stop` are honoured.
    listener.set_nonblocking(true).map_err(accept_error)?;
    let handshakes = std::sync::mpsc::channel::<(TcpStream, SocketAddr, io::Result<Handshake>)>();
    let mut reading = 0usize;
    let mut last_refusal: Option<String> = None;
    let mut abandon_at: Option<Instant> = None;
    // Nonces of the hellos answered so far: a replayed hello is refused.
    let mut seen_nonces = std::collections::HashSet::new();
    let result = loop {
        if abort.is_aborted() {
            break Err(io::Error::other("aborted: a newer round was assigned"));
        }
        if abandon_at.is_none() && stop.load(Ordering::SeqCst) {
            abandon_at = Some((Instant::now() + ABANDON_GRACE).min(deadline));
        }
        let until = abandon_at.unwrap_or(deadline);
        let Some(left) = remaining(until) else {
            if abandon_at.is_some() {
                break Err(io::Error::other("gave up: connecting to next failed"));
            }
            let why = last_refusal
                .take()
                .map(|r| format!("; refused: {r}"))
                .unwrap_or_default();
            break Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("rank {prev} did not connect in time{why}"),
            ));
        };
        // Handshakes are read on their own threads, each with a short
        // deadline, so a connection that never speaks (or speaks slowly)
        // cannot hold up the one from prev.
        let (mut stream, from, handshake) = match handshakes.1.try_recv() {
            Ok(read) => {
                reading -= 1;
                read
            }
            Err(_) => {
                match listener.accept() {
                    Ok((stream, from)) => {
                        if reading >= MAX_PENDING_HANDSHAKES {
                            tracing::warn!(rank = hello.rank, %from, "ring: too many connections waiting to say hello; dropped one");
                            continue;
                        }
                        reading += 1;
                        let done = handshakes.0.clone();
                        let limit = HANDSHAKE_TIMEOUT.min(left);
                        std::thread::spawn(move || {
                            let mut stream = stream;
                            let handshake = read_handshake(&mut stream, limit);
                            let _ = done.send((stream, from, handshake));
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2).min(left));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
                continue;
            }
        };
        let theirs = match handshake {
            Ok(theirs) => theirs,
            Err(e) => {
                tracing::warn!(rank = hello.rank, %from, error = %e, "ring: dropped a connection with a bad handshake");
                last_refusal = Some(format!("{from}: {e}"));
                continue;
            }
        };
        let mismatch = if !theirs.verifies(secret) {
            Some("the hello failed authentication (not signed with this round's secret)".into())
        } else if !seen_nonces.insert(theirs.nonce) {
            Some("a replayed hello (its nonce was seen before)".into())
        } else {
            describe_mismatch(
                &theirs,
                HandshakeKind::Hello,
                hello.round,
                prev,
                hello.world,
            )
        };
        let kind = match (&mismatch, abandon_at) {
            (Some(_), _) => HandshakeKind::Refuse,
            (None, Some(_)) => HandshakeKind::Abandon,
            (None, None) => HandshakeKind::Accept,
        };
        // A refusal says only that it is one: who and where this rank is is
        // nobody's business but the ring's (the reason is logged here).
        let reply = match kind {
            HandshakeKind::Refuse => Handshake::REFUSAL,
            // Bound to their nonce: a recorded answer cannot be replayed.
            _ => Handshake {
                kind,
                nonce: theirs.nonce,
                ..*hello
            }
            .signed(secret),
        };
        let replied = stream.write_all(&reply.encode());
        match (mismatch, replied) {
            (Some(reason), _) => {
                tracing::warn!(rank = hello.rank, round = hello.round, %from, %reason, "ring: refused a connection");
                last_refusal = Some(format!("{from}: {reason}"));
            }
            (None, Ok(())) if kind == HandshakeKind::Accept => break Ok(stream),
            (None, Ok(())) => {}
            (None, Err(e)) => last_refusal = Some(format!("{from}: reply failed: {e}")),
        }
    };
    // Hellos still being read get their refusal from a thread of their own,
    // which ends when the last of them has been answered (or timed out).
    let (done, read) = handshakes;
    drop(done);
    if reading > 0 {
        let _ = std::thread::Builder::new()
            .name("ring-refuser".into())
            .spawn(move || {
                for (mut stream, _, _) in read {
                    let _ = stream.write_all(&Handshake::REFUSAL.encode());
                }
            });
    }
    // Hand the listener back in the default (blocking) mode.
    let restored = listener.set_nonblocking(false);
    let stream = result.map_err(accept_error)?;
    restored.map_err(accept_error)?;
    Ok(stream)
}

// ---------------------------------------------------------------------------
// Operations on the wire

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpKind {
    AllReduceF32 = 1,
    AllReduceF64 = 2,
    Broadcast = 3,
    AllGather = 4,
    Barrier = 5,
    AllReduceBf16 = 6,
}

impl OpKind {
    fn name(self) -> &'static str {
        match self {
            OpKind::AllReduceF32 => "all_reduce_sum_f32",
            OpKind::AllReduceF64 => "all_reduce_sum_f64",
            OpKind::AllReduceBf16 => "all_reduce_sum_bf16",
            OpKind::Broadcast => "broadcast",
            OpKind::AllGather => "all_gather",
            OpKind::Barrier => "barrier",
        }
    }
}

/// Sent before an operation's data on every connection it uses; the receiver
/// checks that prev is running the same operation.
#[derive(Clone, Copy, Debug)]
struct OpHeader {
    op: OpKind,
    seq: u64,
    /// Elements (all-reduce) or bytes (broadcast; all-gather per rank).
    len: u64,
    /// Broadcast root; `u64::MAX` for other operations.
    root: u64,
}

impl OpHeader {
    fn encode(&self) -> [u8; OP_HEADER_LEN] {
        let mut out = [0u8; OP_HEADER_LEN];
        out[..8].copy_from_slice(&(self.op as u64).to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.len.to_le_bytes());
        out[24..32].copy_from_slice(&self.root.to_le_bytes());
        out
    }

    fn describe(bytes: &[u8; OP_HEADER_LEN]) -> String {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let op = match word(0) {
            1 => "all_reduce_sum_f32",
            2 => "all_reduce_sum_f64",
            3 => "broadcast",
            4 => "all_gather",
            5 => "barrier",
            6 => "all_reduce_sum_bf16",
            _ => "an unknown operation",
        };
        format!(
            "{op} (call #{}, length {}, root {})",
            word(8),
            word(16),
            word(24) as i64
        )
    }
}

/// One contiguous transfer of a sub-chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Transfer {
    /// Byte offset into the operation's buffer.
    offset: usize,
    /// Bytes; zero for the empty sub-chunks of short chunks (kept so that the
    /// transfer indices, and thus the dependencies, follow one formula).
    len: usize,
    /// The transfer may start once the other direction has completed this many
    /// transfers: a send waits for the receive that produced its data, a receive
    /// that overwrites waits for the send that last read that memory.
    after: usize,
    /// Add the received data into the buffer instead of overwriting it.
    reduce: bool,
}

/// Elements `[start, end)` of chunk `c` when `n` elements are split into `world`
/// chunks whose sizes differ by at most one.
fn chunk_range(n: usize, world: usize, c: usize) -> (usize, usize) {
    let (base, extra) = (n / world, n % world);
    let start = |c: usize| c * base + c.min(extra);
    (start(c), start(c + 1))
}

/// Sub-chunk `k` of elements `[start, end)`, in bytes: `(offset, len)`.
fn sub_chunk(start: usize, end: usize, k: usize, sub: usize, elem: usize) -> (usize, usize) {
    let from = (start + k * sub).min(end);
    let to = (start + (k + 1) * sub).min(end);
    (from * elem, (to - from) * elem)
}

/// Sub-chunks per chunk of `max_chunk` elements (at least one, so that the
/// header flows even for empty buffers).
fn sub_chunks(max_chunk: usize, sub: usize) -> usize {
    max_chunk.div_ceil(sub).max(1)
}

/// Reduce-scatter then all-gather, as one sequence of `2 (W - 1)` steps: at step
/// `s` rank `r` sends chunk `(r - s) mod W` and receives chunk `(r - s - 1) mod W`
/// (reducing during the first `W - 1` steps, overwriting after), so what is sent
/// at step `s + 1` is what was received at step `s`.
fn plan_all_reduce(
    rank: usize,
    world: usize,
    n: usize,
    elem: usize,
    sends: &mut Vec<Transfer>,
    receives: &mut Vec<Transfer>,
) {
    sends.clear();
    receives.clear();
    let sub = (SUB_CHUNK_BYTES / elem).max(1);
    let k_count = sub_chunks(n.div_ceil(world), sub);
    for s in 0..2 * (world - 1) {
        let send_chunk = (rank + 2 * world - s) % world;
        let receive_chunk = (rank + 2 * world - s - 1) % world;
        let (send_start, send_end) = chunk_range(n, world, send_chunk);
        let (receive_start, receive_end) = chunk_range(n, world, receive_chunk);
        for k in 0..k_count {
            let (offset, len) = sub_chunk(send_start, send_end, k, sub, elem);
            let after = if s == 0 { 0 } else { (s - 1) * k_count + k + 1 };
            sends.push(Transfer {
                offset,
                len,
                after,
                reduce: false,
            });
            let (offset, len) = sub_chunk(receive_start, receive_end, k, sub, elem);
            // From step W - 1 on, the chunk received was sent (read) at step s + 1 - W.
            let after = if s + 1 >= world {
                (s + 1 - world) * k_count + k + 1
            } else {
                0
            };
            receives.push(Transfer {
                offset,
                len,
                after,
                reduce: s + 1 < world,
            });
        }
    }
}

/// At step `t` rank `r` sends block `(r - t) mod W` and receives block
/// `(r - t - 1) mod W`, which it forwards at step `t + 1`.
fn plan_all_gather(
    rank: usize,
    world: usize,
    block: usize,
    sends: &mut Vec<Transfer>,
    receives: &mut Vec<Transfer>,
) {
    sends.clear();
    receives.clear();
    let k_count = sub_chunks(block, SUB_CHUNK_BYTES);
    for t in 0..world - 1 {
        let send_block = (rank + world - t) % world;
        let receive_block = (rank + 2 * world - t - 1) % world;
        for k in 0..k_count {
            let start = send_block * block;
            let (offset, len) = sub_chunk(start, start + block, k, SUB_CHUNK_BYTES, 1);
            let after = if t == 0 { 0 } else { (t - 1) * k_count + k + 1 };
            sends.push(Transfer {
                offset,
                len,
                after,
                reduce: false,
            });
            let start = receive_block * block;
            let (offset, len) = sub_chunk(start, start + block, k, SUB_CHUNK_BYTES, 1);
            receives.push(Transfer {
                offset,
                len,
                after: 0,
                reduce: false,
            });
        }
    }
}

/// A chain from `root` around the ring: every rank but the root receives each
/// sub-chunk, and every rank but the root's prev forwards it once received.
fn plan_broadcast(
    rank: usize,
    world: usize,
    root: usize,
    n: usize,
    sends: &mut Vec<Transfer>,
    receives: &mut Vec<Transfer>,
) {
    sends.clear();
    receives.clear();
    let distance = (rank + world - root) % world;
    let k_count = sub_chunks(n, SUB_CHUNK_BYTES);
    for k in 0..k_count {
        let (offset, len) = sub_chunk(0, n, k, SUB_CHUNK_BYTES, 1);
        if distance != 0 {
            receives.push(Transfer {
                offset,
                len,
                after: 0,
                reduce: false,
            });
        }
        if distance != world - 1 {
            let after = if distance == 0 { 0 } else { k + 1 };
            sends.push(Transfer {
                offset,
                len,
                after,
                reduce: false,
            });
        }
    }
}

// ---------------------------------------------------------------------------
// Running a plan

/// What the two sides of one operation share about the connections.
struct Endpoint<'a> {
    op: &'static str,
    timeout: Duration,
    abort: &'a AbortHandle,
    next_rank: usize,
    prev_rank: usize,
    next: &'a TcpStream,
    prev: &'a TcpStream,
}

impl Endpoint<'_> {
    fn error(&self, peer: usize, e: io::Error) -> CollectiveError {
        use io::ErrorKind as K;
        if self.abort.is_aborted() {
            return CollectiveError::Aborted;
        }
        match e.kind() {
            K::WouldBlock | K::TimedOut => CollectiveError::Timeout {
                op: self.op,
                peer,
                timeout_secs: self.timeout.as_secs_f64(),
            },
            K::UnexpectedEof
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::BrokenPipe
            | K::NotConnected
            | K::WriteZero => CollectiveError::PeerClosed { op: self.op, peer },
            _ => CollectiveError::Io {
                op: self.op,
                peer,
                source: e,
            },
        }
    }

    /// Wakes the other side if it is blocked on a socket, and makes peers fail
    /// fast: after a failure the streams are out of step for good.
    fn shutdown(&self) {
        // An error here means the socket is already down.
        let _ = self.next.shutdown(Shutdown::Both);
        let _ = self.prev.shutdown(Shutdown::Both);
    }
}

/// The caller's buffer, shared between the sender and the receiver of one
/// operation. The plan guarantees that a region is never written while the other
/// side reads it (see [`Transfer::after`]); the buffer is borrowed mutably by
/// [`RingCollective::run`] for longer than both sides live.
#[derive(Clone, Copy)]
struct SharedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: access is coordinated through the plan's dependencies (see above).
unsafe impl Send for SharedBuf {}
// SAFETY: as above.
unsafe impl Sync for SharedBuf {}

impl SharedBuf {
    /// # Safety
    /// No other thread may write `[offset, offset + len)` while the slice lives.
    unsafe fn slice(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset + len <= self.len, "transfer out of bounds");
        // SAFETY: in bounds of the borrowed buffer; the caller excludes writers.
        unsafe { std::slice::from_raw_parts(self.ptr.add(offset), len) }
    }

    /// # Safety
    /// No other thread may access `[offset, offset + len)` while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset + len <= self.len, "transfer out of bounds");
        // SAFETY: in bounds of the borrowed buffer; the caller excludes other access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset), len) }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Send,
    Receive,
}

/// Completed transfers of each side of one operation, and whether one side has
/// failed (the other must then stop waiting).
#[derive(Default)]
struct Progress {
    state: Mutex<ProgressState>,
    changed: Condvar,
}

#[derive(Default)]
struct ProgressState {
    sent: usize,
    received: usize,
    first_failure: Option<Side>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data stays consistent even if a holder panicked.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Progress {
    /// Waits until `count(state) >= n`; false if a side failed meanwhile.
    fn wait(&self, n: usize, count: impl Fn(&ProgressState) -> usize) -> bool {
        let mut state = lock(&self.state);
        loop {
            if state.first_failure.is_some() {
                return false;
            }
            if count(&state) >= n {
                return true;
            }
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn bump(&self, side: Side) {
        let mut state = lock(&self.state);
        match side {
            Side::Send => state.sent += 1,
            Side::Receive => state.received += 1,
        }
        drop(state);
        self.changed.notify_all();
    }

    fn fail(&self, side: Side) {
        lock(&self.state).first_failure.get_or_insert(side);
        self.changed.notify_all();
    }

    fn first_failure(&self) -> Option<Side> {
        lock(&self.state).first_failure
    }
}

/// Runs one side of an operation. When it fails, or panics, the other side must
/// not wait for it: mark the failure and shut the sockets down (a blocked read
/// or write returns at once), otherwise `thread::scope` would wait forever.
fn run_side(
    side: Side,
    endpoint: &Endpoint<'_>,
    progress: &Progress,
    body: impl FnOnce() -> Result<()>,
) -> Result<()> {
    struct OnUnwind<'a, 'b>(Side, &'a Endpoint<'b>, &'a Progress);
    impl Drop for OnUnwind<'_, '_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.2.fail(self.0);
                self.1.shutdown();
            }
        }
    }
    let guard = OnUnwind(side, endpoint, progress);
    let result = body();
    drop(guard);
    if result.is_err() {
        progress.fail(side);
        endpoint.shutdown();
    }
    result
}

/// Writes the header, then each planned sub-chunk to next once its data is ready.
fn send_side(
    endpoint: &Endpoint<'_>,
    header: &OpHeader,
    buf: SharedBuf,
    sends: &[Transfer],
    progress: &Progress,
) -> Result<()> {
    let fail = |e| endpoint.error(endpoint.next_rank, e);
    let mut next = endpoint.next;
    next.write_all(&header.encode()).map_err(fail)?;
    for transfer in sends {
        if transfer.after > 0 && !progress.wait(transfer.after, |s| s.received) {
            // The receiver failed; its error is the one reported.
            return Err(CollectiveError::Aborted);
        }
        if transfer.len > 0 {
            // SAFETY: the receiver writes this region only at steps ordered
            // before `after` or after this send completes (see `Transfer::after`).
            let data = unsafe { buf.slice(transfer.offset, transfer.len) };
            next.write_all(data).map_err(fail)?;
        }
        progress.bump(Side::Send);
    }
    Ok(())
}

type ReduceFn = fn(&mut [u8], &[u8]);

/// Checks prev's header, then reads each planned sub-chunk, reducing it into the
/// buffer or storing it in place.
fn receive_side(
    endpoint: &Endpoint<'_>,
    header: &OpHeader,
    buf: SharedBuf,
    receives: &[Transfer],
    scratch: &mut [u8],
    reduce: Option<ReduceFn>,
    progress: &Progress,
) -> Result<()> {
    if receives.is_empty() {
        return Ok(());
    }
    let peer = endpoint.prev_rank;
    let fail = |e| endpoint.error(peer, e);
    let mut prev = endpoint.prev;
    let mut theirs = [0u8; OP_HEADER_LEN];
    read_full(&mut prev, &mut theirs).map_err(fail)?;
    let ours = header.encode();
    if theirs != ours {
        return Err(CollectiveError::Io {
            op: endpoint.op,
            peer,
            source: invalid_data(format!(
                "rank {peer} runs {} while this rank runs {}: every rank must call the same \
                 collectives in the same order",
                OpHeader::describe(&theirs),
                OpHeader::describe(&ours)
            )),
        });
    }
    for transfer in receives {
        if transfer.after > 0 && !progress.wait(transfer.after, |s| s.sent) {
            return Err(CollectiveError::Aborted);
        }
        if transfer.len > 0 {
            // SAFETY: the sender reads this region only at steps that complete
            // before `after` or that wait for this receive (see `Transfer::after`).
            let dst = unsafe { buf.slice_mut(transfer.offset, transfer.len) };
            match reduce {
                Some(reduce) if transfer.reduce => {
                    let incoming = &mut scratch[..transfer.len];
                    read_full(&mut prev, incoming).map_err(fail)?;
                    reduce(dst, incoming);
                }
                _ => read_full(&mut prev, dst).map_err(fail)?,
            }
        }
        progress.bump(Side::Receive);
    }
    Ok(())
}

/// `read_exact`, except that EOF is reported as such even mid-buffer.
fn read_full(stream: &mut &TcpStream, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match stream.read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Element types the ring can sum.
trait Summable: Copy + std::ops::AddAssign + Send + Sync + 'static {
    const OP: OpKind;
}

impl Summable for f32 {
    const OP: OpKind = OpKind::AllReduceF32;
}

impl Summable for f64 {
    const OP: OpKind = OpKind::AllReduceF64;
}

/// A bfloat16 on the wire (`comm.grad_dtype = "bf16"`): half the bytes of
/// float32. Each hop adds in float32 and rounds to nearest-even once, as
/// NCCL's bf16 sum does.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Bf16 {
    pub fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }

    /// Round to nearest, ties to even; NaN stays NaN.
    pub fn from_f32(x: f32) -> Self {
        let bits = x.to_bits();
        if x.is_nan() {
            return Bf16(((bits >> 16) as u16) | 0x40);
        }
        let round = 0x7fff + ((bits >> 16) & 1);
        Bf16((bits.wrapping_add(round) >> 16) as u16)
    }
}

impl std::ops::AddAssign for Bf16 {
    fn add_assign(&mut self, other: Self) {
        *self = Bf16::from_f32(self.to_f32() + other.to_f32());
    }
}

impl Summable for Bf16 {
    const OP: OpKind = OpKind::AllReduceBf16;
}

/// `dst += src` element-wise, both given as bytes of `T` (little-endian is native
/// here). A plain zip loop, which the compiler vectorises.
fn add_into<T: Summable>(dst: &mut [u8], src: &[u8]) {
    let n = dst.len() / size_of::<T>();
    assert!(dst.len() == src.len() && dst.len() == n * size_of::<T>());
    assert!(dst.as_ptr().cast::<T>().is_aligned() && src.as_ptr().cast::<T>().is_aligned());
    // SAFETY: lengths and alignment checked above; `T` (f32, f64, Bf16)
    // accepts any bit pattern; `dst` and `src` are distinct borrows, so they do not overlap.
    let (dst, src) = unsafe {
        (
            std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<T>(), n),
            std::slice::from_raw_parts(src.as_ptr().cast::<T>(), n),
        )
    };
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread;

    const ROUND: u64 = 7;

    /// Binds one loopback listener per rank and connects every rank on its own
    /// thread, then runs `body` on each; results in rank order.
    fn with_ring<T: Send>(
        world: usize,
        timeout: Duration,
        body: impl Fn(RingCollective) -> T + Sync,
    ) -> Vec<T> {
        with_rounds(&vec![ROUND; world], timeout, |_, ring| {
            body(ring.expect("connect"))
        })
    }

    /// The secret of the test rounds (any 32 bytes).
    fn secret() -> RingSecret {
        RingSecret::from_bytes(&[7u8; 32]).expect("32 bytes")
    }

    /// Like `with_ring`, with a round per rank and the connect result handed over.
    fn with_rounds<T: Send>(
        rounds: &[u64],
        timeout: Duration,
        body: impl Fn(usize, Result<RingCollective>) -> T + Sync,
    ) -> Vec<T> {
        let secrets = vec![secret(); rounds.len()];
        with_secrets(rounds, &secrets, timeout, body)
    }

    /// Like `with_rounds`, with a secret per rank.
    fn with_secrets<T: Send>(
        rounds: &[u64],
        secrets: &[RingSecret],
        timeout: Duration,
        body: impl Fn(usize, Result<RingCollective>) -> T + Sync,
    ) -> Vec<T> {
        let listeners: Vec<TcpListener> = rounds
            .iter()
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let peers: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().expect("local addr").to_string())
            .collect();
        thread::scope(|scope| {
            let handles: Vec<_> = listeners
                .iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let (peers, body) = (&peers, &body);
                    scope.spawn(move || {
                        body(
                            rank,
                            RingCollective::connect(
                                rounds[rank],
                                rank,
                                peers,
                                listener,
                                &secrets[rank],
                                timeout,
                            ),
                        )
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank thread panicked"))
                .collect()
        })
    }

    const LONG: Duration = Duration::from_secs(20);
    const LENGTHS: [usize; 5] = [1, 7, 1000, 1_000_003, 3 * 1024 * 1024 / 4];

    /// An integer value below 2^11, so sums over four ranks are exact in f32.
    fn value(rank: usize, i: usize) -> f64 {
        ((i * 31 + rank * 977) % 2039) as f64 - 1000.0
    }

    #[test]
    fn all_reduce_f32_equals_plain_sum() {
        for world in 1..=4 {
            let results = with_ring(world, LONG, |mut ring| {
                let rank = ring.rank;
                for len in LENGTHS {
                    let mut buf: Vec<f32> = (0..len).map(|i| value(rank, i) as f32).collect();
                    ring.all_reduce_sum_f32(&mut buf).expect("all-reduce");
                    let wrong = (0..len)
                        .find(|&i| buf[i] != (0..world).map(|r| value(r, i)).sum::<f64>() as f32);
                    assert_eq!(
                        wrong, None,
                        "world {world} rank {rank} len {len}: first wrong index"
                    );
                }
                rank
            });
            assert_eq!(results, (0..world).collect::<Vec<_>>());
        }
    }

    #[test]
    fn all_reduce_f64_equals_plain_sum() {
        for world in 1..=4 {
            with_ring(world, LONG, |mut ring| {
                let rank = ring.rank;
                for len in LENGTHS {
                    let mut buf: Vec<f64> = (0..len).map(|i| value(rank, i) * 1e6).collect();
                    ring.all_reduce_sum_f64(&mut buf).expect("all-reduce");
                    let wrong = (0..len)
                        .find(|&i| buf[i] != (0..world).map(|r| value(r, i) * 1e6).sum::<f64>());
                    assert_eq!(
                        wrong, None,
                        "world {world} rank {rank} len {len}: first wrong index"
                    );
                }
            });
        }
    }

    /// A small deterministic generator (splitmix64) so the test needs no crate.
    fn random_values(seed: u64, len: usize) -> Vec<f32> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn all_reduce_random_values_within_tolerance() {
        let seed = 0x5EED_2024;
        println!("seed {seed:#x}");
        let (world, len) = (3, 300_001);
        with_ring(world, LONG, |mut ring| {
            let inputs: Vec<Vec<f32>> = (0..world)
                .map(|r| random_values(seed + r as u64, len))
                .collect();
            let mut buf = inputs[ring.rank].clone();
            ring.all_reduce_sum_f32(&mut buf).expect("all-reduce");
            for (i, got) in buf.iter().enumerate() {
                let want: f64 = inputs.iter().map(|v| v[i] as f64).sum();
                assert!(
                    (*got as f64 - want).abs() <= 1e-6,
                    "index {i}: {got} vs {want}"
                );
            }
        });
    }

    #[test]
    fn broadcast_from_every_root() {
        for world in 1..=4 {
            with_ring(world, LONG, |mut ring| {
                let rank = ring.rank;
                for len in [0, 1, 1000, 1_500_007] {
                    for root in (0..world).rev() {
                        let pattern = |i: usize| (i * 7 + root * 13) as u8;
                        let mut buf: Vec<u8> = if rank == root {
                            (0..len).map(pattern).collect()
                        } else {
                            vec![0xAA; len]
                        };
                        ring.broadcast_bytes(&mut buf, root).expect("broadcast");
                        let wrong = (0..len).find(|&i| buf[i] != pattern(i));
                        assert_eq!(
                            wrong, None,
                            "world {world} rank {rank} root {root} len {len}"
                        );
                    }
                }
                let mut buf = [0u8; 4];
                assert!(matches!(
                    ring.broadcast_bytes(&mut buf, world),
                    Err(CollectiveError::Unsupported(_))
                ));
            });
        }
    }

    #[test]
    fn all_gather_in_rank_order() {
        for world in 1..=4 {
            with_ring(world, LONG, |mut ring| {
                let rank = ring.rank;
                for len in [0, 1, 999, 1_200_001] {
                    let block = |r: usize| (0..len).map(move |i| (i + 101 * r) as u8);
                    let input: Vec<u8> = block(rank).collect();
                    let mut output = vec![0u8; len * world];
                    ring.all_gather_bytes(&input, &mut output)
                        .expect("all-gather");
                    let want: Vec<u8> = (0..world).flat_map(block).collect();
                    assert!(output == want, "world {world} rank {rank} len {len}");
                }
            });
        }
    }

    #[test]
    fn barrier_waits_for_the_last_rank() {
        let late = Duration::from_millis(200);
        for world in 1..=4 {
            let waited = with_ring(world, LONG, |mut ring| {
                ring.barrier().expect("first barrier");
                if ring.rank == world - 1 {
                    thread::sleep(late);
                }
                let start = Instant::now();
                ring.barrier().expect("second barrier");
                start.elapsed()
            });
            for (rank, waited) in waited.iter().enumerate().take(world - 1) {
                assert!(
                    *waited >= late / 2,
                    "world {world}: rank {rank} left after {waited:?}"
                );
            }
        }
    }

    #[test]
    fn collective_trait_on_tensors() {
        let world = 3;
        with_ring(world, LONG, |ring| {
            let mut ring: Box<dyn Collective> = Box::new(ring);
            let rank = ring.rank() as f64;
            assert_eq!(ring.world_size(), world);

            let mut floats = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0]) * (rank + 1.0);
            ring.all_reduce_sum(&mut floats).expect("all-reduce float");
            assert_eq!(
                Vec::<f32>::try_from(&floats).expect("to vec"),
                vec![6.0, 12.0, 18.0, 24.0, 30.0]
            );

            let mut doubles = Tensor::from_slice(&[0.5f64, -1.0]).reshape([2, 1]) + rank;
            ring.all_reduce_sum(&mut doubles)
                .expect("all-reduce double");
            assert_eq!(
                Vec::<f64>::try_from(doubles.flatten(0, -1)).expect("to vec"),
                vec![4.5, 0.0]
            );

            // A transposed view is not contiguous: refused, and the ring stays usable.
            let mut transposed = Tensor::zeros([3, 4], (Kind::Float, Device::Cpu)).tr();
            assert!(!transposed.is_contiguous());
            let refused = ring.all_reduce_sum(&mut transposed);
            assert!(
                matches!(refused, Err(CollectiveError::Unsupported(_))),
                "{refused:?}"
            );
            let mut ints = Tensor::from_slice(&[1i64, 2]);
            let refused = ring.all_reduce_sum(&mut ints);
            assert!(
                matches!(refused, Err(CollectiveError::Unsupported(_))),
                "{refused:?}"
            );

            let mut longs = if rank == 2.0 {
                Tensor::from_slice(&[i64::MAX, -5, 42])
            } else {
                Tensor::zeros([3], (Kind::Int64, Device::Cpu))
            };
            ring.broadcast(&mut longs, 2).expect("broadcast");
            assert_eq!(
                Vec::<i64>::try_from(&longs).expect("to vec"),
                vec![i64::MAX, -5, 42]
            );

            // In-place all-gather: the input is this rank's slot of the output.
            let mut gathered = Tensor::zeros([world as i64, 2], (Kind::Int, Device::Cpu));
            let mut slot = gathered.get(rank as i64);
            let _ = slot.fill_(rank as i64 * 10 + 1);
            let input = gathered.get(rank as i64);
            ring.all_gather(&input, &mut gathered).expect("all-gather");
            assert_eq!(
                Vec::<i32>::try_from(gathered.flatten(0, -1)).expect("to vec"),
                vec![1, 1, 11, 11, 21, 21]
            );
            // A separate input, of another dtype.
            let input = Tensor::from_slice(&[rank, -rank]);
            let mut gathered = Tensor::zeros([world as i64 * 2], (Kind::Double, Device::Cpu));
            ring.all_gather(&input, &mut gathered).expect("all-gather");
            assert_eq!(
                Vec::<f64>::try_from(&gathered).expect("to vec"),
                vec![0.0, -0.0, 1.0, -1.0, 2.0, -2.0]
            );
            ring.barrier().expect("barrier");
        });
    }

    #[test]
    fn single_rank_ops_are_local() {
        with_ring(1, LONG, |mut ring| {
            let mut buf = [1.5f32, 2.5];
            ring.all_reduce_sum_f32(&mut buf).expect("all-reduce");
            assert_eq!(buf, [1.5, 2.5]);
            let mut output = [0u8; 3];
            ring.all_gather_bytes(&[1, 2, 3], &mut output)
                .expect("all-gather");
            assert_eq!(output, [1, 2, 3]);
            ring.abort_handle().abort();
            assert!(matches!(ring.barrier(), Err(CollectiveError::Aborted)));
        });
    }

    #[test]
    fn dead_peer_is_an_error_not_a_hang() {
        let world = 3;
        let results = with_ring(world, LONG, |mut ring| {
            let mut buf = vec![1.0f32; 1 << 20];
            ring.all_reduce_sum_f32(&mut buf).expect("first all-reduce");
            if ring.rank == 2 {
                drop(ring);
                return None;
            }
            let start = Instant::now();
            let result = ring.all_reduce_sum_f32(&mut buf);
            let elapsed = start.elapsed();
            // Later operations keep failing.
            let later = ring.barrier();
            Some((result, elapsed, later))
        });
        for (rank, result) in results.into_iter().enumerate().take(2) {
            let (result, elapsed, later) = result.expect("surviving rank");
            assert!(
                matches!(
                    result,
                    Err(CollectiveError::PeerClosed { .. } | CollectiveError::Io { .. })
                ),
                "rank {rank}: {result:?}"
            );
            assert!(
                elapsed < Duration::from_secs(2),
                "rank {rank} took {elapsed:?}"
            );
            assert!(
                later.is_err(),
                "rank {rank}: barrier after a failure succeeded"
            );
        }
    }

    #[test]
    fn silent_peer_times_out() {
        let deadline = Duration::from_millis(300);
        let results = with_ring(2, deadline, |mut ring| {
            if ring.rank == 1 {
                thread::sleep(Duration::from_millis(1000));
                return None;
            }
            let start = Instant::now();
            let mut buf = vec![0.0f32; 1000];
            let result = ring.all_reduce_sum_f32(&mut buf);
            Some((result, start.elapsed()))
        });
        let (result, elapsed) = results.into_iter().next().flatten().expect("rank 0 result");
        assert!(
            matches!(result, Err(CollectiveError::Timeout { peer: 1, .. })),
            "{result:?}"
        );
        assert!(
            elapsed >= Duration::from_millis(250) && elapsed < Duration::from_millis(1200),
            "timed out after {elapsed:?}"
        );
    }

    #[test]
    fn abort_unblocks_a_waiting_operation() {
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let results = with_ring(2, LONG, |mut ring| {
            if ring.rank == 1 {
                // Stay connected but silent until rank 0 is done.
                let _ = lock(&release_rx).recv_timeout(Duration::from_secs(10));
                return None;
            }
            let handle = ring.abort_handle();
            let aborter = thread::spawn(move || {
                thread::sleep(Duration::from_millis(200));
                handle.abort();
            });
            let start = Instant::now();
            let mut buf = vec![0.0f32; 1000];
            let result = ring.all_reduce_sum_f32(&mut buf);
            let elapsed = start.elapsed();
            aborter.join().expect("aborter");
            let later = ring.all_reduce_sum_f32(&mut buf);
            let _ = release_tx.send(());
            Some((result, elapsed, later))
        });
        let (result, elapsed, later) = results.into_iter().next().flatten().expect("rank 0 result");
        assert!(
            matches!(result, Err(CollectiveError::Aborted)),
            "{result:?}"
        );
        assert!(elapsed < Duration::from_secs(2), "abort took {elapsed:?}");
        assert!(matches!(later, Err(CollectiveError::Aborted)), "{later:?}");
    }

    #[test]
    fn wrong_round_is_refused() {
        let start = Instant::now();
        let results = with_rounds(&[1, 2], Duration::from_secs(5), |_, ring| ring.err());
        for (rank, error) in results.into_iter().enumerate() {
            let error = error.expect("connect across rounds must fail");
            assert!(
                matches!(error, CollectiveError::Connect { .. }),
                "rank {rank}: {error:?}"
            );
            assert!(error.to_string().contains("round"), "rank {rank}: {error}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "refusal took {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn ranks_with_different_secrets_refuse_each_other() {
        let secrets = [secret(), RingSecret::random().expect("random secret")];
        let results = with_secrets(&[ROUND; 2], &secrets, Duration::from_secs(5), |_, ring| {
            ring.err()
        });
        for (rank, error) in results.into_iter().enumerate() {
            let error = error.expect("a ring across secrets must not form");
            assert!(
                matches!(error, CollectiveError::Connect { .. }),
                "rank {rank}: {error:?}"
            );
        }
    }

    /// Two ranks on loopback: their listeners and addresses.
    fn two_listeners() -> (Vec<TcpListener>, Vec<String>) {
        let listeners: Vec<TcpListener> = (0..2)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let peers = listeners
            .iter()
            .map(|l| l.local_addr().expect("addr").to_string())
            .collect();
        (listeners, peers)
    }

    /// Sends `hello` to rank 0 before a 2-rank ring forms (and all-reduces),
    /// and returns what rank 0 answered it.
    fn answer_to_an_early_hello(hello: Handshake) -> Handshake {
        let (listeners, peers) = two_listeners();
        let mut intruder = TcpStream::connect(&peers[0]).expect("intruder connect");
        intruder.write_all(&hello.encode()).expect("intruder hello");
        // Give rank 0's acceptor the intruder's hello before the real one.
        thread::sleep(Duration::from_millis(100));
        thread::scope(|scope| {
            let ranks: Vec<_> = listeners
                .iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let peers = &peers;
                    scope.spawn(move || {
                        let mut ring =
                            RingCollective::connect(ROUND, rank, peers, listener, &secret(), LONG)
                                .expect("connect");
                        let mut buf = vec![rank as f32 + 1.0; 4];
                        ring.all_reduce_sum_f32(&mut buf).expect("all-reduce");
                        assert_eq!(buf, vec![3.0; 4]);
                    })
                })
                .collect();
            for rank in ranks {
                rank.join().expect("rank thread");
            }
        });
        let mut reply = [0u8; HANDSHAKE_LEN];
        intruder.read_exact(&mut reply).expect("refusal reply");
        Handshake::decode(&reply).expect("decode")
    }

    /// Someone who knows the round, the ranks and the world size but not the
    /// secret connects to rank 0 first, posing as its prev (rank 1): refused,
    /// and the ring forms with the real rank 1.
    #[test]
    fn an_impostor_without_the_secret_is_refused_and_the_ring_still_forms() {
        let forged = Handshake {
            kind: HandshakeKind::Hello,
            round: ROUND,
            rank: 1,
            world: 2,
            nonce: [1; NONCE_LEN],
            mac: [0; MAC_LEN],
        }
        .signed(&RingSecret::random().expect("random secret"));
        let reply = answer_to_an_early_hello(forged);
        assert_eq!(reply.kind, HandshakeKind::Refuse);
        assert_eq!(
            reply.encode(),
            Handshake::REFUSAL.encode(),
            "a refusal reveals nothing"
        );
    }

    /// A process from round 6 knocks on rank 0's door first.
    #[test]
    fn stale_connection_is_refused_and_the_ring_still_forms() {
        let stale_hello = Handshake {
            kind: HandshakeKind::Hello,
            round: 6,
            rank: 1,
            world: 2,
            nonce: [2; NONCE_LEN],
            mac: [0; MAC_LEN],
        }
        .signed(&secret());
        let reply = answer_to_an_early_hello(stale_hello);
        // A refusal reveals nothing of the refusing rank.
        assert_eq!(
            (reply.kind, reply.round, reply.rank, reply.world),
            (HandshakeKind::Refuse, 0, 0, 0)
        );
    }

    #[test]
    fn idle_connections_do_not_hold_up_the_ring() {
        let (listeners, peers) = two_listeners();
        // Connections that never say hello, to both ranks, before the ring forms.
        let idle: Vec<TcpStream> = (0..10)
            .map(|i| TcpStream::connect(&peers[i % 2]).expect("idle connect"))
            .collect();
        let started = Instant::now();
        thread::scope(|scope| {
            let ranks: Vec<_> = listeners
                .iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let peers = &peers;
                    scope.spawn(move || {
                        let mut ring =
                            RingCollective::connect(ROUND, rank, peers, listener, &secret(), LONG)
                                .expect("connect");
                        ring.barrier().expect("barrier");
                    })
                })
                .collect();
            for rank in ranks {
                rank.join().expect("rank thread");
            }
        });
        // Without concurrent handshakes each idle connection held the
        // acceptor for the whole collective deadline (LONG = 20 s).
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the ring formed after {:?}",
            started.elapsed()
        );
        drop(idle);
    }

    #[test]
    fn mismatched_calls_fail_loudly() {
        let results = with_ring(2, LONG, |mut ring| {
            let mut buf = vec![1.0f32; 10 + ring.rank];
            ring.all_reduce_sum_f32(&mut buf)
        });
        for (rank, result) in results.iter().enumerate() {
            let message = result
                .as_ref()
                .expect_err("mismatched lengths must fail")
                .to_string();
            assert!(
                message.contains("same collectives") || message.contains("closed"),
                "rank {rank}: {message}"
            );
        }
        assert!(
            results
                .iter()
                .any(|r| matches!(r, Err(e) if e.to_string().contains("length 10")))
        );
    }

    /// The invariants the sender/receiver overlap relies on, checked on the plans:
    /// a send forwards exactly what its dependency received, and a region is never
    /// written while a send may still be reading it.
    fn check_plan(sends: &[Transfer], receives: &[Transfer], what: &str) {
        let overlaps = |a: &Transfer, b: &Transfer| {
            a.len > 0 && b.len > 0 && a.offset < b.offset + b.len && b.offset < a.offset + a.len
        };
        for (i, send) in sends.iter().enumerate() {
            if send.after > 0 {
                let source = receives[send.after - 1];
                assert_eq!(
                    (source.offset, source.len),
                    (send.offset, send.len),
                    "{what}: send {i}"
                );
            }
        }
        for (j, receive) in receives.iter().enumerate() {
            for (i, send) in sends.iter().enumerate() {
                if overlaps(send, receive) {
                    let done_before = i < receive.after;
                    let waits_for_it = send.after > j;
                    assert!(
                        done_before || waits_for_it,
                        "{what}: receive {j} races send {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn plans_forward_what_they_received_and_never_race() {
        for world in 2..=5 {
            for n in [0, 1, 3, 1_000_003] {
                for rank in 0..world {
                    let what = format!("all-reduce world {world} n {n} rank {rank}");
                    let (mut sends, mut receives) = (Vec::new(), Vec::new());
                    plan_all_reduce(rank, world, n, 4, &mut sends, &mut receives);
                    check_plan(&sends, &receives, &what);
                    // Everything but the own chunk is reduced in, everything but the
                    // chunk this rank finished is overwritten.
                    let size = |c: usize| {
                        let (start, end) = chunk_range(n, world, c % world);
                        4 * (end - start)
                    };
                    let reduced: usize = receives.iter().filter(|t| t.reduce).map(|t| t.len).sum();
                    let stored: usize = receives.iter().filter(|t| !t.reduce).map(|t| t.len).sum();
                    assert_eq!(reduced, 4 * n - size(rank), "{what}");
                    assert_eq!(stored, 4 * n - size(rank + 1), "{what}");

                    plan_all_gather(rank, world, n, &mut sends, &mut receives);
                    check_plan(&sends, &receives, &format!("all-gather {what}"));
                    let stored: usize = receives.iter().map(|t| t.len).sum();
                    assert_eq!(stored, n * (world - 1), "all-gather {what}");

                    for root in 0..world {
                        plan_broadcast(rank, world, root, n, &mut sends, &mut receives);
                        check_plan(&sends, &receives, &format!("broadcast root {root} {what}"));
                        let stored: usize = receives.iter().map(|t| t.len).sum();
                        assert_eq!(stored, if rank == root { 0 } else { n }, "broadcast {what}");
                    }
                }
            }
        }
    }
}
