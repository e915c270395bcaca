//! Connecting a rank into the ring: the authenticated handshake, connecting to
//! next while accepting prev, and the sockets' settings.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::super::{AbortHandle, CollectiveError, Result};
use super::exec::lock;
use super::shm::{self, Pipe};
use super::{RingSecret, Transport};

/// The protocol's version: 3 added the transport offer after the handshake
/// (`shm.rs`), so a rank of an older build fails at the handshake, clearly.
pub(super) const HANDSHAKE_MAGIC: [u8; 8] = *b"KILNRNG3";
/// Magic, kind, round, rank, world (8 bytes each), nonce, MAC.
pub(super) const HANDSHAKE_LEN: usize = 40 + NONCE_LEN + MAC_LEN;
pub(super) const NONCE_LEN: usize = 16;
pub(super) const MAC_LEN: usize = 32;
/// The bytes a handshake's MAC covers: everything before the MAC.
pub(super) const SIGNED_LEN: usize = HANDSHAKE_LEN - MAC_LEN;

pub(super) struct Links {
    pub(super) next: TcpStream,
    pub(super) prev: TcpStream,
    /// Clones of `next` and `prev` owned by the abort action, so that another
    /// thread can shut the sockets down; emptied on drop so the descriptors do not
    /// outlive the ring when an [`AbortHandle`] does.
    pub(super) abort_clones: Arc<Mutex<Vec<TcpStream>>>,
    /// The shared-memory pipe beside `next` (this side writes it), when next
    /// runs on this host.
    pub(super) next_pipe: Option<Pipe>,
    /// The shared-memory pipe beside `prev` (this side reads it).
    pub(super) prev_pipe: Option<Pipe>,
}

impl Links {
    pub(super) fn new(
        next: TcpStream,
        prev: TcpStream,
        hello: &Handshake,
        timeout: Duration,
        transport: Transport,
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
        let connect_error = |peer| {
            move |source| CollectiveError::Io {
                op: "connect",
                peer,
                source,
            }
        };
        let shared_memory = transport == Transport::Auto;
        let offered = shm::offer(&next, shared_memory).map_err(connect_error(next_rank))?;
        let prev_pipe = shm::answer(&prev, shared_memory).map_err(connect_error(prev_rank))?;
        let next_pipe = shm::accepted(&next, offered).map_err(connect_error(next_rank))?;
        tracing::debug!(
            rank = hello.rank,
            next_shared_memory = next_pipe.is_some(),
            prev_shared_memory = prev_pipe.is_some(),
            "ring links"
        );
        Ok(Self {
            next,
            prev,
            abort_clones,
            next_pipe,
            prev_pipe,
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
pub(super) fn tune_socket(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum HandshakeKind {
    Hello = 0,
    Accept = 1,
    Refuse = 2,
    /// The acceptor itself failed to join the ring and is giving up.
    Abandon = 3,
}

/// The first message each way on a connection.
#[derive(Clone, Copy, Debug)]
pub(super) struct Handshake {
    pub(super) kind: HandshakeKind,
    pub(super) round: u64,
    pub(super) rank: usize,
    pub(super) world: usize,
    /// A hello's own fresh nonce; a reply echoes the hello's.
    pub(super) nonce: [u8; NONCE_LEN],
    /// HMAC-SHA256 of the bytes before it under the round's secret (zero in
    /// a refusal, which proves nothing and says nothing).
    pub(super) mac: [u8; MAC_LEN],
}

impl Handshake {
    /// The refusal: every field zero.
    pub(super) const REFUSAL: Handshake = Handshake {
        kind: HandshakeKind::Refuse,
        round: 0,
        rank: 0,
        world: 0,
        nonce: [0; NONCE_LEN],
        mac: [0; MAC_LEN],
    };

    pub(super) fn encode(&self) -> [u8; HANDSHAKE_LEN] {
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
    pub(super) fn signed(mut self, secret: &RingSecret) -> Self {
        use hmac::Mac;
        let mut mac = secret.mac();
        mac.update(&self.encode()[..SIGNED_LEN]);
        self.mac = mac.finalize().into_bytes().into();
        self
    }

    /// Whether the MAC is right under `secret` (compared in constant time).
    pub(super) fn verifies(&self, secret: &RingSecret) -> bool {
        use hmac::Mac;
        let mut mac = secret.mac();
        mac.update(&self.encode()[..SIGNED_LEN]);
        mac.verify_slice(&self.mac).is_ok()
    }

    pub(super) fn decode(bytes: &[u8; HANDSHAKE_LEN]) -> io::Result<Self> {
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

/// `N` bytes from the operating system's random source: secrets, nonces,
/// shared-memory names and tokens.
pub(super) fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

pub(super) fn invalid_data(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Connects to next and accepts prev concurrently (either may be waiting for the
/// other rank to start), returning `(next, prev)`.
pub(super) fn connect_links(
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

pub(super) fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

/// Connects to `peers[next]` (retrying until the deadline: the peer may not be
/// listening yet), sends our hello and checks the reply.
pub(super) fn connect_next(
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
pub(super) fn describe_mismatch(
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
pub(super) const ABANDON_GRACE: Duration = Duration::from_millis(200);

/// How long an accepted connection has to send its hello.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Accepted connections whose hello is still being read; more are dropped.
pub(super) const MAX_PENDING_HANDSHAKES: usize = 64;

/// Reads the hello of an accepted connection within `limit`.
pub(super) fn read_handshake(stream: &mut TcpStream, limit: Duration) -> io::Result<Handshake> {
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
pub(super) fn accept_prev(
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
