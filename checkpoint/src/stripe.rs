//! The stripe buffer: the host copy of this rank's share of the state that
//! a save works from, reused from save to save, and the copy into it (the
//! part of a save that blocks training).

use std::sync::mpsc;

use crate::codec::{HEADER_LEN, RawFrameDigest};

/// The reusable stripe buffer while a background save reads it; it goes
/// home to the checkpointer when the last chunk job drops it.
pub(crate) struct StripeBuffer {
    pub(crate) data: Vec<u8>,
    pub(crate) home: mpsc::Sender<Vec<u8>>,
}

impl Drop for StripeBuffer {
    fn drop(&mut self) {
        let _ = self.home.send(std::mem::take(&mut self.data));
    }
}

/// A zeroed buffer of `len` bytes whose pages are resident (faulted in on
/// up to `threads` threads), so that the first copy into it runs at memory
/// speed instead of taking a page fault every 4 KiB.
pub(crate) fn resident_zeroed(len: usize, threads: usize) -> Vec<u8> {
    // A large zeroed allocation is a fresh anonymous mapping: nothing is
    // resident until written.
    let mut buffer = vec![0u8; len];
    const PAGE: usize = 4096;
    let share = len.div_ceil(threads.max(1)).div_ceil(PAGE) * PAGE;
    if share == 0 {
        return buffer;
    }
    std::thread::scope(|scope| {
        for part in buffer.chunks_mut(share) {
            scope.spawn(move || populate(part));
        }
    });
    buffer
}

/// Faults in the pages of `part`: one `madvise(MADV_POPULATE_WRITE)` where
/// the kernel has it (Linux 5.14), else a write to every page.
fn populate(part: &mut [u8]) {
    const PAGE: usize = 4096;
    #[cfg(target_os = "linux")]
    {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        let start = part.as_mut_ptr() as usize;
        let aligned = start.next_multiple_of(PAGE);
        let end = (start + part.len()) / PAGE * PAGE;
        if end > aligned {
            // SAFETY: [aligned, end) lies inside `part`, which we borrow
            // mutably; populating writes nothing visible (the pages stay zero).
            let r = unsafe {
                libc::madvise(
                    aligned as *mut libc::c_void,
                    end - aligned,
                    MADV_POPULATE_WRITE,
                )
            };
            if r == 0 {
                return;
            }
        }
    }
    for page in part.chunks_mut(PAGE) {
        // A volatile write, so the store of the zero that is already there
        // is not optimised away.
        // SAFETY: `page` is a valid, exclusively borrowed, non-empty slice.
        unsafe { std::ptr::write_volatile(page.as_mut_ptr(), 0) };
    }
}

/// Block size of direct I/O (see `crate::direct`).
const BLOCK: usize = 4096;

/// Bytes the stripe buffer needs for chunks of `lens`: back to back, or
/// with room to place each chunk where [`chunk_offsets`] puts it.
pub(crate) fn capacity_for(lens: &[usize], aligned: bool) -> usize {
    let sum: usize = lens.iter().sum();
    if aligned {
        sum + (lens.len() + 1) * BLOCK
    } else {
        sum
    }
}

/// Where each chunk goes in a stripe buffer starting at address `base`:
/// back to back, or (`aligned`) each `header` bytes past a block boundary.
/// Then a chunk's raw frame (its `header`-byte header followed by the
/// chunk) is written with `O_DIRECT` from the buffer itself: only the first
/// and last block are copied (`crate::direct::put_framed`). The gaps cost
/// less than a block per chunk.
pub(crate) fn chunk_offsets(
    lens: &[usize],
    base: usize,
    aligned: bool,
    header: usize,
) -> Vec<usize> {
    let mut at = 0;
    lens.iter()
        .map(|&len| {
            if aligned {
                // The next offset whose address is `header` past a boundary.
                let address = base + at;
                at += (header % BLOCK + BLOCK - address % BLOCK) % BLOCK;
            }
            let offset = at;
            at += len;
            offset
        })
        .collect()
}

/// A chunk's address and raw frame header, computed while it was copied.
pub(crate) type ChunkDigest = (String, [u8; HEADER_LEN]);

/// Pieces a chunk is copied (and digested) in: small enough that a piece
/// is still in the core's cache when it is hashed, large enough for the
/// hash's SIMD lanes.
const PIECE: usize = 128 << 10;

/// Copies `src` into `dst`; with `digest`, hashes and checksums each piece
/// right after copying it.
fn copy_chunk(src: &[u8], dst: &mut [u8], digest: bool) -> Option<ChunkDigest> {
    if !digest {
        dst.copy_from_slice(src);
        return None;
    }
    let mut d = RawFrameDigest::new(src.len());
    for (s, t) in src.chunks(PIECE).zip(dst.chunks_mut(PIECE)) {
        t.copy_from_slice(s);
        d.update(t);
    }
    Some(d.finish())
}

/// Copies each of `sources` to its offset in `dst` (increasing, not
/// overlapping), on up to `threads` threads. With `digest`, also returns
/// each chunk's [`ChunkDigest`] (else `None`s).
pub(crate) fn copy_parallel(
    sources: &[&[u8]],
    offsets: &[usize],
    dst: &mut [u8],
    threads: usize,
    digest: bool,
) -> Vec<Option<ChunkDigest>> {
    const PARALLEL_ABOVE: usize = 32 << 20;
    let total: usize = sources.iter().map(|s| s.len()).sum();
    if threads <= 1 || total < PARALLEL_ABOVE {
        return sources
            .iter()
            .zip(offsets)
            .map(|(s, &o)| copy_chunk(s, &mut dst[o..o + s.len()], digest))
            .collect();
    }
    // Split the sources into `threads` groups of similar bytes.
    let share = total.div_ceil(threads);
    let mut groups: Vec<(usize, usize)> = Vec::new(); // source index ranges
    let (mut start, mut bytes) = (0, 0);
    for (i, s) in sources.iter().enumerate() {
        bytes += s.len();
        if bytes >= share {
            groups.push((start, i + 1));
            start = i + 1;
            bytes = 0;
        }
    }
    if start < sources.len() {
        groups.push((start, sources.len()));
    }
    std::thread::scope(|scope| {
        // `rest` starts at `consumed` in `dst`.
        let (mut rest, mut consumed) = (dst, 0);
        let mut handles = Vec::with_capacity(groups.len());
        for &(a, b) in &groups {
            let end = offsets[b - 1] + sources[b - 1].len();
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(end - consumed);
            let base = consumed;
            rest = tail;
            consumed = end;
            let (group, at) = (&sources[a..b], &offsets[a..b]);
            handles.push(scope.spawn(move || {
                group
                    .iter()
                    .zip(at)
                    .map(|(s, &o)| copy_chunk(s, &mut mine[o - base..o - base + s.len()], digest))
                    .collect::<Vec<_>>()
            }));
        }
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("copy thread"))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_chunks_sit_a_header_past_a_block_and_fit_the_capacity() {
        let lens = [8 << 20, 3, 4096, 5000, 1 << 20];
        for base in [0usize, 16, 4064, 4080, 123_456] {
            let offsets = chunk_offsets(&lens, base, true, 32);
            let mut end = 0;
            for (&o, &len) in offsets.iter().zip(&lens) {
                assert_eq!((base + o) % BLOCK, 32, "base {base}");
                assert!(o >= end, "chunks overlap");
                assert!(o - end < BLOCK, "gap of a block or more");
                end = o + len;
            }
            assert!(end <= capacity_for(&lens, true), "base {base}");
        }
        let packed = chunk_offsets(&lens, 16, false, 32);
        assert_eq!(
            packed,
            [
                0,
                8 << 20,
                (8 << 20) + 3,
                (8 << 20) + 4099,
                (8 << 20) + 9099
            ]
        );
        assert_eq!(capacity_for(&lens, false), lens.iter().sum::<usize>());
    }

    #[test]
    fn the_parallel_copy_puts_every_source_at_its_offset() {
        let data: Vec<Vec<u8>> = (0..7u8)
            .map(|i| vec![i + 1; (9 << 20) + i as usize * 77])
            .collect();
        let sources: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
        let lens: Vec<usize> = data.iter().map(|d| d.len()).collect();
        for (aligned, threads) in [(true, 3), (false, 2), (true, 1)] {
            let mut dst = vec![0u8; capacity_for(&lens, aligned)];
            let offsets = chunk_offsets(&lens, dst.as_ptr() as usize, aligned, 32);
            let digests = copy_parallel(&sources, &offsets, &mut dst, threads, aligned);
            for ((s, &o), d) in sources.iter().zip(&offsets).zip(&digests) {
                assert!(
                    dst[o..o + s.len()] == **s,
                    "aligned {aligned} threads {threads}"
                );
                match d {
                    Some(d) => assert_eq!(
                        *d,
                        (crate::codec::address(s), crate::codec::raw_frame_header(s))
                    ),
                    None => assert!(!aligned, "digests asked for"),
                }
            }
            let copied: usize = dst.iter().filter(|&&b| b != 0).count();
            assert_eq!(
                copied,
                lens.iter().sum::<usize>(),
                "nothing outside the chunks"
            );
        }
    }
}
