//! The pure part of an operation: its header on the wire, and the transfer
//! plans that say which sub-chunk each side moves when.

use super::SUB_CHUNK_BYTES;

/// Bytes of an [`OpHeader`] on the wire.
pub(super) const OP_HEADER_LEN: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum OpKind {
    AllReduceF32 = 1,
    AllReduceF64 = 2,
    Broadcast = 3,
    AllGather = 4,
    Barrier = 5,
    AllReduceBf16 = 6,
}

impl OpKind {
    pub(super) fn name(self) -> &'static str {
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
pub(super) struct OpHeader {
    pub(super) op: OpKind,
    pub(super) seq: u64,
    /// Elements (all-reduce) or bytes (broadcast; all-gather per rank).
    pub(super) len: u64,
    /// Broadcast root; `u64::MAX` for other operations.
    pub(super) root: u64,
}

impl OpHeader {
    pub(super) fn encode(&self) -> [u8; OP_HEADER_LEN] {
        let mut out = [0u8; OP_HEADER_LEN];
        out[..8].copy_from_slice(&(self.op as u64).to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.len.to_le_bytes());
        out[24..32].copy_from_slice(&self.root.to_le_bytes());
        out
    }

    pub(super) fn describe(bytes: &[u8; OP_HEADER_LEN]) -> String {
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
pub(super) struct Transfer {
    /// Byte offset into the operation's buffer.
    pub(super) offset: usize,
    /// Bytes; zero for the empty sub-chunks of short chunks (kept so that the
    /// transfer indices, and thus the dependencies, follow one formula).
    pub(super) len: usize,
    /// The transfer may start once the other direction has completed this many
    /// transfers: a send waits for the receive that produced its data, a receive
    /// that overwrites waits for the send that last read that memory.
    pub(super) after: usize,
    /// Add the received data into the buffer instead of overwriting it.
    pub(super) reduce: bool,
}

/// Elements `[start, end)` of chunk `c` when `n` elements are split into `world`
/// chunks whose sizes differ by at most one.
pub(super) fn chunk_range(n: usize, world: usize, c: usize) -> (usize, usize) {
    let (base, extra) = (n / world, n % world);
    let start = |c: usize| c * base + c.min(extra);
    (start(c), start(c + 1))
}

/// Sub-chunk `k` of elements `[start, end)`, in bytes: `(offset, len)`.
pub(super) fn sub_chunk(
    start: usize,
    end: usize,
    k: usize,
    sub: usize,
    elem: usize,
) -> (usize, usize) {
    let from = (start + k * sub).min(end);
    let to = (start + (k + 1) * sub).min(end);
    (from * elem, (to - from) * elem)
}

/// Sub-chunks per chunk of `max_chunk` elements (at least one, so that the
/// header flows even for empty buffers).
pub(super) fn sub_chunks(max_chunk: usize, sub: usize) -> usize {
    max_chunk.div_ceil(sub).max(1)
}

/// Reduce-scatter then all-gather, as one sequence of `2 (W - 1)` steps: at step
/// `s` rank `r` sends chunk `(r - s) mod W` and receives chunk `(r - s - 1) mod W`
/// (reducing during the first `W - 1` steps, overwriting after), so what is sent
/// at step `s + 1` is what was received at step `s`.
pub(super) fn plan_all_reduce(
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
pub(super) fn plan_all_gather(
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
pub(super) fn plan_broadcast(
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

#[cfg(test)]
mod tests {
    use super::*;

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
