//! The stripe buffer: the host copy of this rank's share of the state that
//! a save works from, reused from save to save, and the copy into it (the
//! part of a save that blocks training).

use std::sync::mpsc;

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

/// Copies `sources` back to back into `dst`, on up to `threads` threads.
pub(crate) fn copy_parallel(sources: &[&[u8]], dst: &mut [u8], threads: usize) {
    const PARALLEL_ABOVE: usize = 32 << 20;
    if threads <= 1 || dst.len() < PARALLEL_ABOVE {
        let mut at = 0;
        for s in sources {
            dst[at..at + s.len()].copy_from_slice(s);
            at += s.len();
        }
        return;
    }
    // Split the sources into `threads` groups of similar bytes.
    let share = dst.len().div_ceil(threads);
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
        let mut rest = dst;
        for &(a, b) in &groups {
            let len: usize = sources[a..b].iter().map(|s| s.len()).sum();
            let (mine, tail) = rest.split_at_mut(len);
            rest = tail;
            let group = &sources[a..b];
            scope.spawn(move || {
                let mut at = 0;
                for s in group {
                    mine[at..at + s.len()].copy_from_slice(s);
                    at += s.len();
                }
            });
        }
    });
}
