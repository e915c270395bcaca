//! Chunk writes (and reads) on a local root that bypass the page cache
//! (`O_DIRECT`).
//!
//! A buffered write copies every byte into page-cache pages the kernel must
//! first allocate; on the 2-core VMs we measure on, a save to `tmpfs` (no disk
//! at all) took as long as one to disk, and the write path's page-cache copy
//! took more CPU than hashing and compression together, on the same two
//! cores. Chunks are written once and read back by another process (a resume)
//! if ever, so caching them is of no use to the writer. An `O_DIRECT` write
//! goes from a reused, block-aligned buffer straight to the device.
//!
//! The object is published as `object_store`'s local backend does: written
//! under a staging name (`{name}#{digits}`, which its listings skip), synced
//! (`fdatasync`), renamed into place, and its directory synced. A filesystem
//! that refuses `O_DIRECT` (tmpfs, some network filesystems) makes
//! [`put`] return `Ok(false)`, and the caller uses the buffered path.

use std::cell::RefCell;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Alignment of the buffer address and of the written length: the largest
/// logical block size of common devices, and the page size.
const ALIGN: usize = 4096;

/// Bytes of aligned buffers alive in the process (one per writing thread).
static BUFFER_BYTES: AtomicU64 = AtomicU64::new(0);

/// Bytes of direct-write buffers the process holds now.
pub fn buffer_bytes() -> u64 {
    BUFFER_BYTES.load(Ordering::Relaxed)
}

/// A heap buffer aligned to [`ALIGN`], reused by each writing thread.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    cap: usize,
}

impl AlignedBuf {
    fn with_capacity(cap: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(cap, ALIGN).expect("aligned layout");
        // Zeroed, so that the slice `as_mut_slice` makes is initialised
        // memory (a `&mut [u8]` over uninitialised bytes, handed to
        // `File::read`, is undefined behaviour). Once per buffer growth: the
        // buffer is reused by its thread.
        // SAFETY: `cap` is a positive multiple of ALIGN (callers round up).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        BUFFER_BYTES.fetch_add(cap as u64, Ordering::Relaxed);
        AlignedBuf { ptr, cap }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` owns `cap` initialised (zeroed at allocation) bytes;
        // `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.cap, ALIGN).expect("aligned layout");
        BUFFER_BYTES.fetch_sub(self.cap as u64, Ordering::Relaxed);
        // SAFETY: allocated in `with_capacity` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

thread_local! {
    static BUFFER: RefCell<Option<AlignedBuf>> = const { RefCell::new(None) };
}

/// Runs `f` on the thread's aligned buffer, grown if needed and cut to `len`
/// rounded up to whole blocks (at least one).
fn with_block_buffer<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    let padded = len.div_ceil(ALIGN).max(1) * ALIGN;
    BUFFER.with(|buffer| {
        let mut buffer = buffer.borrow_mut();
        if buffer.as_ref().is_none_or(|b| b.cap < padded) {
            *buffer = Some(AlignedBuf::with_capacity(padded));
        }
        f(&mut buffer.as_mut().expect("buffer just set").as_mut_slice()[..padded])
    })
}

/// Opens `path` with `O_DIRECT` added to `options`; `None` when the
/// filesystem refuses direct I/O.
fn open_direct(
    options: &mut std::fs::OpenOptions,
    path: &Path,
) -> std::io::Result<Option<std::fs::File>> {
    match options.custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `bytes` to `path` (creating its directory) with `O_DIRECT`, synced
/// and atomically published. `Ok(false)`: the filesystem does not do direct
/// I/O; nothing was left behind.
pub fn put(path: &Path, bytes: &[u8]) -> std::io::Result<bool> {
    publish(path, |file| write_padded(file, bytes))
}

/// Writes the frame `header` + `body` to `path` as [`put`] does, straight
/// from `body` when its address is `header.len()` bytes past a block
/// boundary (the save pipeline lays raw chunks out so in its stripe buffer):
/// only the first block (the header and the body's first bytes) and the
/// last partial block are copied into the thread's aligned buffer. Any other
/// body is copied whole, as by [`put`].
pub fn put_framed(path: &Path, header: &[u8], body: &[u8]) -> std::io::Result<bool> {
    let head = ALIGN - header.len();
    if body.len() < head || !(body.as_ptr() as usize + head).is_multiple_of(ALIGN) {
        let mut frame = Vec::with_capacity(header.len() + body.len());
        frame.extend_from_slice(header);
        frame.extend_from_slice(body);
        return put(path, &frame);
    }
    publish(path, |file| {
        use std::os::unix::fs::FileExt;
        with_block_buffer(ALIGN, |block| {
            block[..header.len()].copy_from_slice(header);
            block[header.len()..].copy_from_slice(&body[..head]);
            file.write_all_at(block, 0)
        })?;
        let middle = (body.len() - head) / ALIGN * ALIGN;
        file.write_all_at(&body[head..head + middle], ALIGN as u64)?;
        let tail = &body[head + middle..];
        if !tail.is_empty() {
            with_block_buffer(tail.len(), |block| {
                block[..tail.len()].copy_from_slice(tail);
                block[tail.len()..].fill(0);
                file.write_all_at(block, (ALIGN + middle) as u64)
            })?;
        }
        file.set_len((header.len() + body.len()) as u64)
    })
}

/// Creates a staging file beside `path` with `O_DIRECT`, lets `write` fill
/// it, syncs it, renames it into place and syncs the directory. `Ok(false)`:
/// the filesystem (or device) refuses direct I/O; nothing is left behind.
fn publish(
    path: &Path,
    write: impl FnOnce(&std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<bool> {
    static STAGING: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().expect("an object path has a directory");
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().expect("an object path has a name");
    let staging = dir.join(crate::store::staging_name(
        &name.to_string_lossy(),
        u64::from(std::process::id()) * 1_000_000_000_000 + STAGING.fetch_add(1, Ordering::Relaxed),
    ));
    let Some(file) = open_direct(
        std::fs::OpenOptions::new().write(true).create_new(true),
        &staging,
    )?
    else {
        return Ok(false);
    };
    let published = write(&file)
        .and_then(|()| file.sync_data())
        .and_then(|()| std::fs::rename(&staging, path))
        .and_then(|()| std::fs::File::open(dir)?.sync_all());
    match published {
        Ok(()) => Ok(true),
        Err(e) => {
            let _ = std::fs::remove_file(&staging);
            if e.raw_os_error() == Some(libc::EINVAL) {
                // The device wants a larger alignment than ALIGN: buffered.
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

/// Reads the whole file at `path` with `O_DIRECT` into the thread's aligned
/// buffer and hands its bytes to `f`. `Ok(None)`: the filesystem does not
/// do direct I/O (nothing was read). Loads use it for the same reason saves
/// do: filling freshly allocated page-cache pages cost more than decoding.
pub fn read<R>(path: &Path, f: impl FnOnce(&[u8]) -> R) -> std::io::Result<Option<R>> {
    use std::io::Read;
    let Some(mut file) = open_direct(std::fs::OpenOptions::new().read(true), path)? else {
        return Ok(None);
    };
    let len = file.metadata()?.len() as usize;
    with_block_buffer(len, |into| {
        let mut done = 0;
        while done < len {
            match file.read(&mut into[done..]) {
                Ok(0) => break, // shorter than its size said: the caller's checks see it
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && done == 0 => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        Ok(Some(f(&into[..done.min(len)])))
    })
}

/// Copies `bytes` into the thread's aligned buffer, zero-padded to whole
/// blocks, writes that, then trims the file to the real length.
fn write_padded(mut file: &std::fs::File, bytes: &[u8]) -> std::io::Result<()> {
    with_block_buffer(bytes.len(), |out| {
        out[..bytes.len()].copy_from_slice(bytes);
        out[bytes.len()..].fill(0);
        file.write_all(out)
    })?;
    file.set_len(bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_any_length_exactly_and_leaves_no_staging_file() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0usize, 1, 4095, 4096, 4097, 3 * 4096 + 17, 1 << 20] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let path = dir.path().join("chunks/ab").join(format!("{len}.zst"));
            match put(&path, &bytes).unwrap() {
                true => assert_eq!(std::fs::read(&path).unwrap(), bytes, "length {len}"),
                // A temporary directory on tmpfs: no direct I/O, nothing written.
                false => assert!(!path.exists()),
            }
            // Overwriting an existing object (same content, as chunks are) works.
            if put(&path, &bytes).unwrap() {
                assert_eq!(std::fs::read(&path).unwrap(), bytes);
            }
        }
        for len in [0usize, 1, 4097, 1 << 20] {
            let path = dir.path().join("chunks/ab").join(format!("{len}.zst"));
            if path.exists() {
                let back = read(&path, |b| b.to_vec()).unwrap();
                assert_eq!(back, Some(std::fs::read(&path).unwrap()), "length {len}");
            }
        }
        // Framed writes from a body laid out for direct I/O (and from one
        // that is not) store exactly header + body.
        let header = [7u8; 32];
        let mut buffer = vec![0u8; 4 << 20];
        let start = (32 + 4096 - buffer.as_ptr() as usize % 4096) % 4096;
        for (len, shift) in [
            (0usize, 0usize),
            (100, 0),
            (4064, 0),
            (4065, 0),
            (3 << 20, 0),
            ((3 << 20) + 17, 0),
            (70_000, 1),
        ] {
            let at = start + shift;
            for (i, b) in buffer[at..at + len].iter_mut().enumerate() {
                *b = (i * 13 % 251) as u8;
            }
            let body = &buffer[at..at + len];
            let path = dir
                .path()
                .join("chunks/ab")
                .join(format!("framed-{len}-{shift}"));
            if put_framed(&path, &header, body).unwrap() {
                let stored = std::fs::read(&path).unwrap();
                assert_eq!(stored.len(), 32 + len, "length {len}");
                assert!(
                    stored[..32] == header && stored[32..] == *body,
                    "length {len} shift {shift}"
                );
            }
        }
        let left: Vec<_> = std::fs::read_dir(dir.path().join("chunks/ab"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains('#'))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
