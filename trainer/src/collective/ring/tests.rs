//! The ring against real loopback sockets: sums, failures, handshakes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use super::connect::{HANDSHAKE_LEN, NONCE_LEN};
use super::*;
use std::thread;

const ROUND: u64 = 7;

/// Binds one loopback listener per rank and connects every rank on its own
/// thread over `transport`, then runs `body` on each; results in rank order.
fn with_ring<T: Send>(
    transport: Transport,
    world: usize,
    timeout: Duration,
    body: impl Fn(RingCollective) -> T + Sync,
) -> Vec<T> {
    let rounds = vec![ROUND; world];
    let secrets = vec![secret(); world];
    with_secrets(transport, &rounds, &secrets, timeout, |_, ring| {
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
    with_secrets(Transport::Auto, rounds, &secrets, timeout, body)
}

/// Like `with_rounds`, with a secret per rank.
fn with_secrets<T: Send>(
    transport: Transport,
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
                        RingCollective::connect_abortable(
                            rounds[rank],
                            rank,
                            peers,
                            listener,
                            &secrets[rank],
                            timeout,
                            transport,
                            AbortHandle::default(),
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

/// The correctness and failure tests run over both transports.
const TRANSPORTS: [Transport; 2] = [Transport::Auto, Transport::Tcp];

const LONG: Duration = Duration::from_secs(20);
const LENGTHS: [usize; 5] = [1, 7, 1000, 1_000_003, 3 * 1024 * 1024 / 4];

/// An integer value below 2^11, so sums over four ranks are exact in f32.
fn value(rank: usize, i: usize) -> f64 {
    ((i * 31 + rank * 977) % 2039) as f64 - 1000.0
}

#[test]
fn all_reduce_f32_equals_plain_sum() {
    for transport in TRANSPORTS {
        eprintln!("transport: {transport:?}");
        for world in 1..=4 {
            let results = with_ring(transport, world, LONG, |mut ring| {
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
}

#[test]
fn all_reduce_f64_equals_plain_sum() {
    for transport in TRANSPORTS {
        eprintln!("transport: {transport:?}");
        for world in 1..=4 {
            with_ring(transport, world, LONG, |mut ring| {
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
    for transport in TRANSPORTS {
        eprintln!("transport: {transport:?}");
        let seed = 0x5EED_2024;
        println!("seed {seed:#x}");
        let (world, len) = (3, 300_001);
        with_ring(transport, world, LONG, |mut ring| {
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
}

#[test]
fn broadcast_from_every_root() {
    for transport in TRANSPORTS {
        eprintln!("transport: {transport:?}");
        for world in 1..=4 {
            with_ring(transport, world, LONG, |mut ring| {
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
}

#[test]
fn all_gather_in_rank_order() {
    for transport in TRANSPORTS {
        eprintln!("transport: {transport:?}");
        for world in 1..=4 {
            with_ring(transport, world, LONG, |mut ring| {
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
}

#[test]
fn barrier_waits_for_the_last_rank() {
    for transport in TRANSPORTS {
        eprintln!("transport: {transport:?}");
        let late = Duration::from_millis(200);
        for world in 1..=4 {
            let waited = with_ring(transport, world, LONG, |mut ring| {
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
}

#[test]
fn collective_trait_on_tensors() {
    for transport in TRANSPORTS {
        eprintln!("transport: {transport:?}");
        let world = 3;
        with_ring(transport, world, LONG, |ring| {
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
}

#[test]
fn single_rank_ops_are_local() {
    with_ring(Transport::Auto, 1, LONG, |mut ring| {
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
    for transport in TRANSPORTS {
        eprintln!("transport: {transport:?}");
        let world = 3;
        let results = with_ring(transport, world, LONG, |mut ring| {
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
}

#[test]
fn silent_peer_times_out() {
    for transport in TRANSPORTS {
        eprintln!("transport: {transport:?}");
        let deadline = Duration::from_millis(300);
        let results = with_ring(transport, 2, deadline, |mut ring| {
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
}

#[test]
fn abort_unblocks_a_waiting_operation() {
    for transport in TRANSPORTS {
        eprintln!("transport: {transport:?}");
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let results = with_ring(transport, 2, LONG, |mut ring| {
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
    let results = with_secrets(
        Transport::Auto,
        &[ROUND; 2],
        &secrets,
        Duration::from_secs(5),
        |_, ring| ring.err(),
    );
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
    for transport in TRANSPORTS {
        eprintln!("transport: {transport:?}");
        let results = with_ring(transport, 2, LONG, |mut ring| {
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
}

#[test]
fn ranks_on_one_host_use_shared_memory_unless_told_tcp() {
    for transport in TRANSPORTS {
        let pipes = with_ring(transport, 3, LONG, |ring| {
            let links = ring.links.as_ref().expect("links");
            (links.next_pipe.is_some(), links.prev_pipe.is_some())
        });
        let expected = transport == Transport::Auto;
        assert!(
            pipes.iter().all(|&p| p == (expected, expected)),
            "{transport:?}: {pipes:?}"
        );
    }
}
