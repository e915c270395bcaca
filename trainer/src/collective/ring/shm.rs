//! A shared-memory byte pipe for one direction of the ring between two ranks
//! on the same host (NCCL's SHM transport plays this part for GPUs).
//!
//! # Why
//!
//! Over loopback TCP a 2-rank all-reduce is bounded by what the kernel moves
//! per direction with both directions busy (2.4 GB/s on the 2-core benchmark
//! machine against 4.4 GB/s for one stream): every byte is copied into a
//! socket buffer and out again by the kernel, with its per-packet work on the
//! same cores that train. Through shared memory the sender copies each byte
//! once into a ring buffer both processes map, and the receiver sums it into
//! its gradients straight from there (or copies it out once when storing).
//!
//! # Layout
//!
//! A file in `/dev/shm` (mode 0600, a random name, unlinked as soon as both
//! sides have mapped it): one header page, then `CAPACITY` bytes of ring. The
//! header holds the total bytes written and read so far (each advanced by one
//! side only) and two "sleeping" flags. Positions grow without wrapping; a
//! byte's place in the ring is its position modulo `CAPACITY`.
//!
//! # Waiting, wake-ups and failure
//!
//! The link's TCP connection stays open beside the pipe and carries only
//! wake-ups: a side that finds nothing to do sets its sleeping flag, looks
//! again, and sleeps in `poll(2)` on the socket; the other side, after
//! advancing its position, clears that flag and sends one byte when it was
//! set. Because the socket is the one thing both sides wait on, everything the
//! TCP ring relies on still holds: a peer that dies closes it (EOF wakes the
//! waiter: [`PeerClosed`](super::super::CollectiveError::PeerClosed)), an
//! [`AbortHandle`](super::super::AbortHandle) or a failing side shuts it down
//! (the waiter wakes at once), and no progress within the link's timeout is a
//! timeout.
//!
//! # Framing
//!
//! Every message (an operation header, one sub-chunk) starts at a multiple of
//! 8 bytes: after a message whose length is not, both sides skip to the next
//! multiple. Sums then read elements in place at their natural alignment, and
//! no element straddles the end of the ring (its capacity is a multiple of 8).
//!
//! # Trust
//!
//! Only a process of the same user can open the file, and only a peer that
//! passed the ring's authenticated handshake is offered its name. The peer's
//! positions are still checked (a corrupt one is an error, never an
//! out-of-bounds access); the bytes themselves are as trusted as the TCP ring's
//! unauthenticated data (docs/security.md).

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::super::AbortHandle;
use super::connect::random_bytes;

/// Bytes of ring per pipe (per direction of a link). Eight sub-chunks: the
/// sender may run that far ahead of the receiver.
pub(super) const CAPACITY: usize = 4 << 20;
/// The header page before the ring.
const HEADER: usize = 4096;
/// The most bytes copied in before the reader is told, and summed or copied
/// out before the writer is told: small enough that the other side starts
/// early, large enough that wake-ups stay rare.
const PIECE: usize = 128 << 10;
/// Spins before sleeping: a wake-up through the socket costs a few
/// microseconds; a sub-chunk's piece arriving is usually sooner than that
/// while both sides stream.
const SPINS: u32 = 256;
/// Messages start at multiples of this many bytes.
const ALIGN: u64 = 8;
const MAGIC: u64 = u64::from_le_bytes(*b"KILNSHM1");
/// The name's prefix in /dev/shm; the rest is 32 hex digits.
const PREFIX: &str = "kiln-ring-";
const TOKEN_LEN: usize = 16;
/// The offer sent on a new link: magic, name length, name (≤ 64), token.
const OFFER_MAGIC: [u8; 8] = *b"KILNSHMO";

/// The header page, as both processes see it. Each position is written by one
/// side only; each lives on its own cache line.
#[repr(C, align(64))]
struct Header {
    magic: AtomicU64,
    capacity: AtomicU64,
    token: [u8; TOKEN_LEN],
    _pad0: [u8; 32],
    /// Total bytes the writer has published.
    written: AtomicU64,
    /// Set by the reader before it sleeps; cleared by the writer, which then
    /// sends a wake-up byte.
    reader_sleeping: AtomicU32,
    _pad1: [u8; 52],
    /// Total bytes the reader has consumed.
    read: AtomicU64,
    /// Set by the writer before it sleeps; cleared by the reader, which then
    /// sends a wake-up byte.
    writer_sleeping: AtomicU32,
    _pad2: [u8; 52],
}

const _: () = assert!(size_of::<Header>() <= HEADER);
const _: () =
    assert!(CAPACITY.is_multiple_of(ALIGN as usize) && PIECE.is_multiple_of(ALIGN as usize));

/// One side's mapping of a pipe.
pub(super) struct Pipe {
    base: *mut u8,
    /// The file's path while it exists (the creator unlinks it once the peer
    /// has answered the offer).
    path: Option<CString>,
}

// SAFETY: the mapping is plain shared memory; the header is accessed through
// atomics only and the ring through the position protocol (module docs), from
// one thread at a time per side (the ring's sender writes `next`'s pipe, its
// receiver reads `prev`'s).
unsafe impl Send for Pipe {}
// SAFETY: as above.
unsafe impl Sync for Pipe {}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.unlink();
        // SAFETY: `base` is the start of a live mapping of `HEADER + CAPACITY`
        // bytes that nothing references once the pipe is dropped.
        unsafe { libc::munmap(self.base.cast(), HEADER + CAPACITY) };
    }
}

impl Pipe {
    /// A new pipe in /dev/shm, for this side to write.
    fn create() -> io::Result<(Self, String, [u8; TOKEN_LEN])> {
        let name = format!("{PREFIX}{}", hex::encode(random_bytes::<16>()?));
        let token: [u8; TOKEN_LEN] = random_bytes()?;
        let path = CString::new(format!("/dev/shm/{name}")).expect("no NUL in the name");
        // SAFETY: a NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let pipe = Self::map(fd, Some(path), true)?;
        // SAFETY: the creator is the only one with the file so far, and no
        // reference to the header exists yet: the token's bytes are written
        // in place through the mapping's pointer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                token.as_ptr(),
                pipe.base.add(std::mem::offset_of!(Header, token)),
                TOKEN_LEN,
            )
        };
        let header = pipe.header();
        header.capacity.store(CAPACITY as u64, Ordering::Relaxed);
        header.magic.store(MAGIC, Ordering::Release);
        Ok((pipe, name, token))
    }

    /// The pipe the peer offered, for this side to read; `None` when it is not
    /// reachable from here (another host or container) or not the one offered.
    fn open(name: &str, token: &[u8; TOKEN_LEN]) -> io::Result<Option<Self>> {
        let hex_ok = name.len() == PREFIX.len() + 32
            && name.starts_with(PREFIX)
            && name[PREFIX.len()..].bytes().all(|b| b.is_ascii_hexdigit());
        if !hex_ok {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "shared-memory offer with a malformed name",
            ));
        }
        let path = CString::new(format!("/dev/shm/{name}")).expect("hex has no NUL");
        // SAFETY: a NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Ok(None);
        }
        let pipe = match Self::map(fd, None, false) {
            Ok(pipe) => pipe,
            Err(_) => return Ok(None),
        };
        let header = pipe.header();
        let same = header.magic.load(Ordering::Acquire) == MAGIC
            && header.capacity.load(Ordering::Relaxed) == CAPACITY as u64
            && header.token == *token;
        Ok(same.then_some(pipe))
    }

    /// Maps `fd` (closed here) as a pipe; `create` sizes the file first.
    fn map(fd: libc::c_int, path: Option<CString>, create: bool) -> io::Result<Self> {
        let len = HEADER + CAPACITY;
        let result = (|| {
            // SAFETY: `fd` is an open descriptor; `st` is written by fstat.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            if unsafe { libc::fstat(fd, &mut st) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: plain getter.
            if st.st_uid != unsafe { libc::geteuid() } || st.st_mode & libc::S_IFMT != libc::S_IFREG
            {
                return Err(io::Error::other("shared-memory file of another user"));
            }
            if create {
                // Reserve the memory now: a tmpfs that fills up later (a
                // container's 64 MiB /dev/shm) would otherwise kill the writer
                // with SIGBUS mid-operation instead of leaving the link on TCP.
                // SAFETY: an open descriptor of a new regular file.
                let err = unsafe { libc::posix_fallocate(fd, 0, len as libc::off_t) };
                if err != 0 {
                    return Err(io::Error::from_raw_os_error(err));
                }
            } else if st.st_size != len as libc::off_t {
                return Err(io::Error::other("shared-memory file of another size"));
            }
            // SAFETY: mapping `len` bytes of a file at least that long; the
            // result is checked.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                )
            };
            if base == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            Ok(base.cast::<u8>())
        })();
        // SAFETY: `fd` is ours to close; the mapping outlives it.
        unsafe { libc::close(fd) };
        match result {
            Ok(base) => Ok(Self { base, path }),
            Err(e) => {
                if let Some(path) = &path {
                    // SAFETY: a NUL-terminated path.
                    unsafe { libc::unlink(path.as_ptr()) };
                }
                Err(e)
            }
        }
    }

    /// Removes the file (the mappings stay): once the peer has mapped it, or
    /// refused it, nobody else needs the name.
    fn unlink(&mut self) {
        if let Some(path) = self.path.take() {
            // SAFETY: a NUL-terminated path.
            unsafe { libc::unlink(path.as_ptr()) };
        }
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping starts with a page for the header, page-aligned
        // (so aligned for `Header`), zero-filled at creation (a valid `Header`:
        // atomics and bytes); it lives as long as `self`.
        unsafe { &*self.base.cast::<Header>() }
    }

    fn ring(&self) -> *mut u8 {
        // SAFETY: within the mapping.
        unsafe { self.base.add(HEADER) }
    }

    /// `written - read`, checked: a peer that corrupts its position ends the
    /// pipe instead of making this side read or write out of bounds.
    fn filled(&self) -> io::Result<u64> {
        let header = self.header();
        // Sequentially consistent: a side that has just set its sleeping
        // flag must see the other's latest position (or the other sees the
        // flag and wakes it); see `Waker::wait`.
        let filled = header
            .written
            .load(Ordering::SeqCst)
            .wrapping_sub(header.read.load(Ordering::SeqCst));
        if filled > CAPACITY as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "shared-memory pipe positions corrupted by the peer",
            ));
        }
        Ok(filled)
    }

    /// Writes `data` as one message (see Framing).
    pub(super) fn send(&self, wake: &Waker<'_>, data: &[u8]) -> io::Result<()> {
        let header = self.header();
        let mut written = header.written.load(Ordering::Relaxed);
        let end = written + padded(data.len());
        let mut data = data;
        while written < end {
            let filled = wake.wait(&header.writer_sleeping, || {
                self.filled().map(|f| (f < CAPACITY as u64).then_some(f))
            })?;
            let offset = (written % CAPACITY as u64) as usize;
            let room = (CAPACITY - filled as usize)
                .min(CAPACITY - offset)
                .min(PIECE)
                .min((end - written) as usize);
            let copy = room.min(data.len());
            // SAFETY: `[offset, offset + room)` is inside the ring and free:
            // the reader has consumed it and reads it again only once
            // `written` is advanced past it below.
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), self.ring().add(offset), copy);
            }
            data = &data[copy..];
            written += room as u64;
            header.written.store(written, Ordering::SeqCst);
            wake.notify(&header.reader_sleeping);
        }
        Ok(())
    }

    /// Reads one message of `len` bytes, handing it to `each` in pieces whose
    /// lengths are multiples of `granule` (a power of two ≤ 8; the last piece
    /// may be shorter) and which start at multiples of `granule` in memory.
    pub(super) fn receive(
        &self,
        wake: &Waker<'_>,
        len: usize,
        granule: usize,
        mut each: impl FnMut(&[u8]),
    ) -> io::Result<()> {
        debug_assert!(granule.is_power_of_two() && granule as u64 <= ALIGN);
        let header = self.header();
        let mut read = header.read.load(Ordering::Relaxed);
        let start = read;
        let end = read + padded(len);
        while read < end {
            let want = ((start + len as u64).saturating_sub(read))
                .min(granule as u64)
                .max(1);
            let filled = wake.wait(&header.reader_sleeping, || {
                self.filled().map(|f| (f >= want).then_some(f))
            })?;
            let offset = (read % CAPACITY as u64) as usize;
            let avail = (filled as usize)
                .min(CAPACITY - offset)
                .min(PIECE)
                .min((end - read) as usize);
            let data_left = (start + len as u64).saturating_sub(read) as usize;
            let mut take = avail.min(data_left);
            if take < data_left {
                take -= take % granule;
            }
            if take > 0 {
                // SAFETY: `[offset, offset + take)` is inside the ring and
                // published: the writer wrote it before advancing `written`
                // (which `filled` reads with SeqCst) and writes it again only
                // after `read` is advanced past it below.
                let piece = unsafe { std::slice::from_raw_parts(self.ring().add(offset), take) };
                each(piece);
            }
            // Padding after the data is consumed with its last piece.
            let consumed = if take == data_left { avail } else { take };
            read += consumed as u64;
            header.read.store(read, Ordering::SeqCst);
            wake.notify(&header.writer_sleeping);
        }
        Ok(())
    }
}

fn padded(len: usize) -> u64 {
    (len as u64).div_ceil(ALIGN) * ALIGN
}

/// Waiting and waking through the link's socket (see the module docs).
pub(super) struct Waker<'a> {
    pub(super) stream: &'a TcpStream,
    pub(super) timeout: Duration,
    pub(super) abort: &'a AbortHandle,
}

impl Waker<'_> {
    /// Returns `ready()`'s value once it is `Some`, sleeping on the socket
    /// meanwhile with `my_flag` set so the other side wakes this one.
    fn wait<T>(
        &self,
        my_flag: &AtomicU32,
        ready: impl Fn() -> io::Result<Option<T>>,
    ) -> io::Result<T> {
        if let Some(v) = ready()? {
            return Ok(v);
        }
        for _ in 0..SPINS {
            std::hint::spin_loop();
            if let Some(v) = ready()? {
                return Ok(v);
            }
        }
        let started = Instant::now();
        let fd = self.stream.as_raw_fd();
        loop {
            my_flag.store(1, Ordering::SeqCst);
            if let Some(v) = ready()? {
                // Not sleeping after all: spare the other side a wake-up.
                my_flag.store(0, Ordering::Relaxed);
                return Ok(v);
            }
            if self.abort.is_aborted() {
                return Err(io::ErrorKind::ConnectionAborted.into());
            }
            let left = self.timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
                continue;
            }
            if n > 0 && self.drain()? {
                // The peer is gone or the socket was shut down here (abort, or
                // the other side of this operation failed). What it published
                // before it went is still to be had.
                return match ready()? {
                    Some(v) => Ok(v),
                    None => Err(io::ErrorKind::UnexpectedEof.into()),
                };
            }
        }
    }

    /// Reads the wake-up bytes waiting on the socket; true at EOF: the peer
    /// is gone (or the socket was shut down here).
    fn drain(&self) -> io::Result<bool> {
        let mut buf = [0u8; 64];
        loop {
            // SAFETY: reading into a local buffer of the given length.
            let n = unsafe {
                libc::recv(
                    self.stream.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            match n {
                0 => return Ok(true),
                n if n > 0 => continue,
                _ => {
                    let e = io::Error::last_os_error();
                    return match e.kind() {
                        io::ErrorKind::WouldBlock => Ok(false),
                        io::ErrorKind::Interrupted => continue,
                        _ => Err(e),
                    };
                }
            }
        }
    }

    /// Wakes the other side if it set `their_flag` (it sleeps on the socket).
    /// Best effort: a peer that is gone needs no waking, and a broken socket
    /// is this side's next wait's to report.
    fn notify(&self, their_flag: &AtomicU32) {
        if their_flag.swap(0, Ordering::SeqCst) == 0 {
            return;
        }
        loop {
            // SAFETY: sending one byte from a local.
            let n = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    [1u8].as_ptr().cast(),
                    1,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            // A full socket holds wake-ups the peer has yet to read: it wakes anyway.
            if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return;
            }
        }
    }
}

/// A pipe this side created and offered to next, until next answers.
pub(super) struct Offered(Pipe);

/// Setting up a link's pipe, step 1 of 3: offers next a new pipe when
/// `enabled` (or tells it this link stays on TCP). Every rank offers on next
/// before it reads prev's offer ([`answer`]), so nobody waits on an answer
/// before giving its own.
pub(super) fn offer(next: &TcpStream, enabled: bool) -> io::Result<Option<Offered>> {
    let created = if enabled {
        match Pipe::create() {
            Ok(created) => Some(created),
            Err(e) => {
                tracing::debug!(error = %e, "no shared-memory pipe: the ring stays on TCP");
                None
            }
        }
    } else {
        None
    };
    let mut message = OFFER_MAGIC.to_vec();
    match &created {
        Some((_, name, token)) => {
            message.push(name.len() as u8);
            message.extend_from_slice(name.as_bytes());
            message.extend_from_slice(token);
        }
        None => message.push(0),
    }
    (&*next).write_all(&message)?;
    Ok(created.map(|(pipe, _, _)| Offered(pipe)))
}

/// Step 2 of 3: reads prev's offer and answers it: the pipe to read from prev
/// when it offered one and this side can map it (same host, `enabled`).
pub(super) fn answer(prev: &TcpStream, enabled: bool) -> io::Result<Option<Pipe>> {
    let malformed = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut head = [0u8; 9];
    (&*prev).read_exact(&mut head)?;
    if head[..8] != OFFER_MAGIC {
        return Err(malformed("not a kiln ring transport offer"));
    }
    let name_len = head[8] as usize;
    if name_len == 0 {
        return Ok(None);
    }
    if name_len > 64 {
        return Err(malformed("shared-memory offer with a malformed name"));
    }
    let mut rest = vec![0u8; name_len + TOKEN_LEN];
    (&*prev).read_exact(&mut rest)?;
    let name = std::str::from_utf8(&rest[..name_len])
        .map_err(|_| malformed("shared-memory offer with a malformed name"))?;
    let token: [u8; TOKEN_LEN] = rest[name_len..].try_into().expect("TOKEN_LEN bytes");
    let pipe = if enabled {
        Pipe::open(name, &token)?
    } else {
        None
    };
    (&*prev).write_all(&[u8::from(pipe.is_some())])?;
    Ok(pipe)
}

/// Step 3 of 3: next's answer to this side's offer: the pipe to write to next
/// when next mapped it. The file is removed either way.
pub(super) fn accepted(next: &TcpStream, offered: Option<Offered>) -> io::Result<Option<Pipe>> {
    let Some(Offered(mut pipe)) = offered else {
        return Ok(None);
    };
    let mut answer = [0u8; 1];
    // On an error the pipe is dropped, which removes its file.
    (&*next).read_exact(&mut answer)?;
    pipe.unlink();
    Ok((answer[0] == 1).then_some(pipe))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// A connected pair of loopback sockets with a pipe set up from `a` to
    /// `b` the way a ring link does it: `(a, b, writer's pipe, reader's pipe)`.
    fn pipe_pair() -> (TcpStream, TcpStream, Pipe, Pipe) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (b, _) = listener.accept().expect("accept");
        // A one-link "ring": a is this rank's next connection, b its prev.
        let offered = offer(&a, true).expect("offer");
        let name = offered.as_ref().map(|o| o.0.path.clone()).expect("a pipe");
        let read = answer(&b, true).expect("answer").expect("mapped");
        let write = accepted(&a, offered).expect("accepted").expect("taken");
        let path = name.expect("the file existed until answered");
        assert!(
            !std::path::Path::new(path.to_str().expect("utf-8")).exists(),
            "the file is removed once answered"
        );
        (a, b, write, read)
    }

    fn waker<'a>(stream: &'a TcpStream, abort: &'a AbortHandle) -> Waker<'a> {
        Waker {
            stream,
            timeout: Duration::from_secs(10),
            abort,
        }
    }

    #[test]
    fn messages_of_any_length_arrive_whole_across_the_ring_end() {
        let (a, b, write, read) = pipe_pair();
        let abort = AbortHandle::default();
        // Lengths that are not multiples of 8 (padding), and enough bytes in
        // all to wrap the ring several times.
        let lengths: Vec<usize> = (0..200).map(|i| (i * 7919 + 13) % 300_000).collect();
        let message = |i: usize, len: usize| -> Vec<u8> {
            (0..len).map(|j| (i * 31 + j * 7) as u8).collect()
        };
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for (i, &len) in lengths.iter().enumerate() {
                    write
                        .send(&waker(&a, &abort), &message(i, len))
                        .expect("send");
                }
            });
            for (i, &len) in lengths.iter().enumerate() {
                let granule = [1, 2, 4, 8][i % 4];
                let mut got = Vec::with_capacity(len);
                read.receive(&waker(&b, &abort), len, granule, |piece| {
                    assert_eq!(piece.as_ptr() as usize % granule, 0, "aligned pieces");
                    if got.len() + piece.len() < len {
                        assert_eq!(piece.len() % granule, 0, "whole elements");
                    }
                    got.extend_from_slice(piece);
                })
                .expect("receive");
                assert_eq!(got, message(i, len), "message {i}");
            }
        });
        let total: u64 = lengths.iter().map(|&l| padded(l)).sum();
        assert!(total > 3 * CAPACITY as u64, "wrapped the ring");
    }

    #[test]
    fn a_corrupt_position_is_an_error_not_an_out_of_bounds_read() {
        let (_a, b, write, read) = pipe_pair();
        let abort = AbortHandle::default();
        // The writer side claims more than the ring holds.
        write
            .header()
            .written
            .store(CAPACITY as u64 + 64, Ordering::SeqCst);
        let err = read
            .receive(&waker(&b, &abort), 16, 1, |_| panic!("nothing to read"))
            .expect_err("corrupt");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[test]
    fn a_peer_that_goes_is_noticed_at_once_and_what_it_sent_still_arrives() {
        let (a, b, write, read) = pipe_pair();
        let abort = AbortHandle::default();
        write.send(&waker(&a, &abort), b"last words").expect("send");
        drop(write);
        drop(a);
        let started = Instant::now();
        let mut got = Vec::new();
        read.receive(&waker(&b, &abort), 10, 1, |piece| {
            got.extend_from_slice(piece)
        })
        .expect("what was sent before the peer went");
        assert_eq!(got, b"last words");
        let err = read
            .receive(&waker(&b, &abort), 10, 1, |_| {})
            .expect_err("nothing more comes");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not the deadline"
        );
    }

    #[test]
    fn malformed_or_foreign_offers_are_refused() {
        let token = [0u8; TOKEN_LEN];
        for name in [
            "../etc/passwd",
            "kiln-ring-zz",
            "kiln-ring-0123456789abcdef0123456789abcdeg",
        ] {
            let err = Pipe::open(name, &token).err().expect(name);
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{name}");
        }
        // Well formed, but no such file here (another host): stays on TCP.
        let absent = Pipe::open("kiln-ring-0123456789abcdef0123456789abcdef", &token);
        assert!(matches!(absent, Ok(None)));
        // The right file with the wrong token: not the one offered.
        let (pipe, name, mut token) = Pipe::create().expect("create");
        token[0] ^= 1;
        assert!(matches!(Pipe::open(&name, &token), Ok(None)));
        drop(pipe);
    }
}
