//! Running a plan: the sender and receiver sides of one operation, their
//! synchronisation, and the element-wise sums.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::super::{AbortHandle, CollectiveError, Result};
use super::connect::invalid_data;
use super::plan::{OP_HEADER_LEN, OpHeader, OpKind, Transfer};
use super::shm::{Pipe, Waker};

/// What the two sides of one operation share about the connections.
pub(super) struct Endpoint<'a> {
    pub(super) op: &'static str,
    pub(super) timeout: Duration,
    pub(super) abort: &'a AbortHandle,
    pub(super) next_rank: usize,
    pub(super) prev_rank: usize,
    pub(super) next: &'a TcpStream,
    pub(super) prev: &'a TcpStream,
    /// The shared-memory pipe that carries next's data instead of `next`
    /// (which then carries only wake-ups).
    pub(super) next_pipe: Option<&'a Pipe>,
    /// The shared-memory pipe that carries prev's data instead of `prev`.
    pub(super) prev_pipe: Option<&'a Pipe>,
}

impl Endpoint<'_> {
    pub(super) fn error(&self, peer: usize, e: io::Error) -> CollectiveError {
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

    /// Writes one message to next: through the pipe when there is one.
    fn send(&self, data: &[u8]) -> io::Result<()> {
        match self.next_pipe {
            Some(pipe) => pipe.send(&self.waker(self.next), data),
            None => (&*self.next).write_all(data),
        }
    }

    /// Reads one message of `dst.len()` bytes from prev into `dst`.
    fn receive_into(&self, dst: &mut [u8]) -> io::Result<()> {
        let Some(pipe) = self.prev_pipe else {
            return read_full(&mut &*self.prev, dst);
        };
        let mut done = 0;
        pipe.receive(&self.waker(self.prev), dst.len(), 1, |piece| {
            dst[done..done + piece.len()].copy_from_slice(piece);
            done += piece.len();
        })
    }

    /// Reads one message of `dst.len()` bytes from prev and sums it into
    /// `dst`: in place from the pipe, or through `scratch` from the socket.
    fn receive_reduce(&self, dst: &mut [u8], scratch: &mut [u8], reduce: Reduce) -> io::Result<()> {
        let Some(pipe) = self.prev_pipe else {
            let incoming = &mut scratch[..dst.len()];
            read_full(&mut &*self.prev, incoming)?;
            (reduce.add)(dst, incoming);
            return Ok(());
        };
        let mut done = 0;
        pipe.receive(&self.waker(self.prev), dst.len(), reduce.elem, |piece| {
            (reduce.add)(&mut dst[done..done + piece.len()], piece);
            done += piece.len();
        })
    }

    fn waker<'s>(&'s self, stream: &'s TcpStream) -> Waker<'s> {
        Waker {
            stream,
            timeout: self.timeout,
            abort: self.abort,
        }
    }

    /// Wakes the other side if it is blocked on a socket, and makes peers fail
    /// fast: after a failure the streams are out of step for good.
    pub(super) fn shutdown(&self) {
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
pub(super) struct SharedBuf {
    pub(super) ptr: *mut u8,
    pub(super) len: usize,
}

// SAFETY: access is coordinated through the plan's dependencies (see above).
unsafe impl Send for SharedBuf {}
// SAFETY: as above.
unsafe impl Sync for SharedBuf {}

impl SharedBuf {
    /// # Safety
    /// No other thread may write `[offset, offset + len)` while the slice lives.
    pub(super) unsafe fn slice(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset + len <= self.len, "transfer out of bounds");
        // SAFETY: in bounds of the borrowed buffer; the caller excludes writers.
        unsafe { std::slice::from_raw_parts(self.ptr.add(offset), len) }
    }

    /// # Safety
    /// No other thread may access `[offset, offset + len)` while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn slice_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset + len <= self.len, "transfer out of bounds");
        // SAFETY: in bounds of the borrowed buffer; the caller excludes other access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset), len) }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Side {
    Send,
    Receive,
}

/// Completed transfers of each side of one operation, and whether one side has
/// failed (the other must then stop waiting).
#[derive(Default)]
pub(super) struct Progress {
    pub(super) state: Mutex<ProgressState>,
    pub(super) changed: Condvar,
}

#[derive(Default)]
pub(super) struct ProgressState {
    pub(super) sent: usize,
    pub(super) received: usize,
    pub(super) first_failure: Option<Side>,
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data stays consistent even if a holder panicked.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Progress {
    /// Waits until `count(state) >= n`; false if a side failed meanwhile.
    pub(super) fn wait(&self, n: usize, count: impl Fn(&ProgressState) -> usize) -> bool {
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

    pub(super) fn bump(&self, side: Side) {
        let mut state = lock(&self.state);
        match side {
            Side::Send => state.sent += 1,
            Side::Receive => state.received += 1,
        }
        drop(state);
        self.changed.notify_all();
    }

    pub(super) fn fail(&self, side: Side) {
        lock(&self.state).first_failure.get_or_insert(side);
        self.changed.notify_all();
    }

    pub(super) fn first_failure(&self) -> Option<Side> {
        lock(&self.state).first_failure
    }
}

/// Runs one side of an operation. When it fails, or panics, the other side must
/// not wait for it: mark the failure and shut the sockets down (a blocked read
/// or write returns at once), otherwise `thread::scope` would wait forever.
pub(super) fn run_side(
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
pub(super) fn send_side(
    endpoint: &Endpoint<'_>,
    header: &OpHeader,
    buf: SharedBuf,
    sends: &[Transfer],
    progress: &Progress,
) -> Result<()> {
    let fail = |e| endpoint.error(endpoint.next_rank, e);
    endpoint.send(&header.encode()).map_err(fail)?;
    for transfer in sends {
        if transfer.after > 0 && !progress.wait(transfer.after, |s| s.received) {
            // The receiver failed; its error is the one reported.
            return Err(CollectiveError::Aborted);
        }
        if transfer.len > 0 {
            // SAFETY: the receiver writes this region only at steps ordered
            // before `after` or after this send completes (see `Transfer::after`).
            let data = unsafe { buf.slice(transfer.offset, transfer.len) };
            endpoint.send(data).map_err(fail)?;
        }
        progress.bump(Side::Send);
    }
    Ok(())
}

/// How a reducing receive combines incoming elements with the buffer's.
#[derive(Clone, Copy)]
pub(super) struct Reduce {
    /// `dst += src` element-wise over bytes of one element type.
    pub(super) add: fn(&mut [u8], &[u8]),
    /// That type's size: incoming data is summed in whole elements.
    pub(super) elem: usize,
}

impl Reduce {
    pub(super) fn of<T: Summable>() -> Self {
        Self {
            add: add_into::<T>,
            elem: size_of::<T>(),
        }
    }
}

/// Checks prev's header, then reads each planned sub-chunk, reducing it into the
/// buffer or storing it in place.
pub(super) fn receive_side(
    endpoint: &Endpoint<'_>,
    header: &OpHeader,
    buf: SharedBuf,
    receives: &[Transfer],
    scratch: &mut [u8],
    reduce: Option<Reduce>,
    progress: &Progress,
) -> Result<()> {
    if receives.is_empty() {
        return Ok(());
    }
    let peer = endpoint.prev_rank;
    let fail = |e| endpoint.error(peer, e);
    let mut theirs = [0u8; OP_HEADER_LEN];
    endpoint.receive_into(&mut theirs).map_err(fail)?;
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
                Some(reduce) if transfer.reduce => endpoint
                    .receive_reduce(dst, scratch, reduce)
                    .map_err(fail)?,
                _ => endpoint.receive_into(dst).map_err(fail)?,
            }
        }
        progress.bump(Side::Receive);
    }
    Ok(())
}

/// `read_exact`, except that EOF is reported as such even mid-buffer.
pub(super) fn read_full(stream: &mut &TcpStream, mut buf: &mut [u8]) -> io::Result<()> {
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
pub(super) trait Summable: Copy + std::ops::AddAssign + Send + Sync + 'static {
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
    /// The exact float32 value.
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
pub(super) fn add_into<T: Summable>(dst: &mut [u8], src: &[u8]) {
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
