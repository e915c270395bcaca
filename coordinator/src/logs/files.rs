//! A node's log files: one per local worker slot, rotated by size, and the
//! readers of a data folder (read once, or follow while the job runs).
//!
//! ```text
//! {data}/jobs/{job}/logs/                  kiln run (node "local")
//! {data}/jobs/{job}/nodes/{node}/logs/     kiln agent --node NODE
//!     worker-{i}.log                       the current file of worker slot i
//!     worker-{i}.log.1 ... worker-{i}.log.N  rotated, .1 the newest
//!     .writer.lock                         flock'ed by the writing process
//! ```
//!
//! The lock tells a follower that the job is over: the kernel releases it when
//! the writer exits, however it exits (SIGKILL included).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{LogConfig, LogFilter, LogLine, LogShipper, sort_by_time};
use crate::error::{Error, Result};

/// The lock file a log folder's writer holds.
const LOCK_FILE: &str = ".writer.lock";

/// How often a follower looks for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// The writing side of one node's logs: rotated files per worker slot and,
/// for multi-node jobs, a [`LogShipper`] to the store. Safe to share between
/// the threads that read the workers' pipes.
#[derive(Debug)]
pub struct NodeLogs {
    dir: PathBuf,
    node: String,
    config: LogConfig,
    files: Mutex<BTreeMap<usize, RotatingFile>>,
    shipper: Mutex<Option<LogShipper>>,
    /// Only the first write error is logged (a full disk would repeat it per line).
    failed: AtomicBool,
    /// Held (flock) while this process writes the folder.
    _lock: File,
}

impl NodeLogs {
    /// Opens the log folder `dir` (created if needed) of `node` for writing.
    /// [`Error::AlreadyExists`] when another live process writes it.
    pub fn open(dir: &Path, node: &str, config: LogConfig) -> Result<Self> {
        crate::keyspace::validate_name("node", node)?;
        if config.file_bytes == 0 {
            return Err(Error::invalid("logs.file_mib", "must be at least 1"));
        }
        let io = |what: &str, e: std::io::Error| {
            Error::unavailable(format!("{what} {}: {e}", dir.display()))
        };
        std::fs::create_dir_all(dir).map_err(|e| io("create log folder", e))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(|e| io("open the lock of log folder", e))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::WouldBlock {
                return Err(Error::AlreadyExists {
                    what: format!(
                        "a live writer of log folder {} (another agent or run of this job and node)",
                        dir.display()
                    ),
                });
            }
            return Err(io("lock log folder", e));
        }
        Ok(NodeLogs {
            dir: dir.to_path_buf(),
            node: node.to_string(),
            config,
            files: Mutex::new(BTreeMap::new()),
            shipper: Mutex::new(None),
            failed: AtomicBool::new(false),
            _lock: lock,
        })
    }

    /// Also ships every line to the store.
    pub fn with_shipper(self, shipper: LogShipper) -> Self {
        *self.shipper.lock().unwrap_or_else(|e| e.into_inner()) = Some(shipper);
        self
    }

    /// The node name every line carries.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The current file of worker slot `worker`.
    pub fn path(&self, worker: usize) -> PathBuf {
        worker_path(&self.dir, worker)
    }

    /// Creates the file of worker slot `worker` if it has none yet, so that
    /// every worker has one even before (or without) its first line.
    pub fn create(&self, worker: usize) -> Result<()> {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        self.file(&mut files, worker).map(|_| ()).map_err(|e| {
            Error::unavailable(format!(
                "create {}: {e}",
                worker_path(&self.dir, worker).display()
            ))
        })
    }

    /// The open file of worker slot `worker`, opened on first use.
    fn file<'a>(
        &self,
        files: &'a mut BTreeMap<usize, RotatingFile>,
        worker: usize,
    ) -> std::io::Result<&'a mut RotatingFile> {
        match files.entry(worker) {
            std::collections::btree_map::Entry::Occupied(o) => Ok(o.into_mut()),
            std::collections::btree_map::Entry::Vacant(v) => RotatingFile::open(
                &worker_path(&self.dir, worker),
                self.config.file_bytes,
                self.config.files,
            )
            .map(|f| v.insert(f)),
        }
    }

    /// Appends a line of worker slot `worker` to its file (rotating it when
    /// full) and hands it to the shipper. Never blocks on the store and never
    /// fails: a write error is logged once and the line is lost.
    pub fn write(&self, worker: usize, line: &LogLine) {
        let text = line.format();
        let written = {
            let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
            self.file(&mut files, worker)
                .and_then(|f| f.write_line(&text))
        };
        if let Err(e) = written
            && !self.failed.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(node = self.node, worker, "write worker log: {e}");
        }
        if let Some(shipper) = &*self.shipper.lock().unwrap_or_else(|e| e.into_inner()) {
            shipper.send(worker, text);
        }
    }

    /// Ships the lines still queued for the store (waiting at most `timeout`).
    pub async fn close(&self, timeout: Duration) {
        let shipper = self
            .shipper
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(shipper) = shipper {
            shipper.close(timeout).await;
        }
    }
}

fn worker_path(dir: &Path, worker: usize) -> PathBuf {
    dir.join(format!("worker-{worker}.log"))
}

/// `worker-0.log` -> `worker-0.log.{n}`.
fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// A file that is renamed to `.1` (and older ones shifted up to `.{keep}`)
/// when the next line would pass `max_bytes`: at most `(keep + 1) × max_bytes`
/// on disk, plus one line.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: usize,
}

impl RotatingFile {
    /// Opens `path` for appending (a restarted agent continues its file).
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile {
            path: path.to_path_buf(),
            file,
            size,
            max_bytes,
            keep,
        })
    }

    /// Appends `text` and a newline, rotating first when it would not fit.
    pub fn write_line(&mut self, text: &str) -> std::io::Result<()> {
        let len = text.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.max_bytes {
            self.rotate()?;
        }
        let mut buf = Vec::with_capacity(text.len() + 1);
        buf.extend_from_slice(text.as_bytes());
        buf.push(b'\n');
        // One write per line: a follower never sees half a line for long, and
        // a crash loses at most the line being written.
        self.file.write_all(&buf)?;
        self.size += len;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            for n in (1..self.keep).rev() {
                match std::fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1)) {
                    Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&self.path, rotated(&self.path, 1))?;
        }
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// [`Error::NotFound`] unless `data/jobs/{job}` exists.
pub(super) fn check_job(data: &Path, job: &str) -> Result<()> {
    let run = data.join("jobs").join(job);
    if run.is_dir() {
        Ok(())
    } else {
        Err(Error::not_found(format!(
            "job {job} (no run folder {})",
            run.display()
        )))
    }
}

/// The log folders of `job` under data folder `data`: `kiln run`'s and each
/// node's.
fn log_dirs(data: &Path, job: &str) -> Vec<PathBuf> {
    let run = data.join("jobs").join(job);
    let mut dirs = Vec::new();
    if run.join("logs").is_dir() {
        dirs.push(run.join("logs"));
    }
    if let Ok(nodes) = std::fs::read_dir(run.join("nodes")) {
        let mut nodes: Vec<PathBuf> = nodes
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("logs"))
            .filter(|p| p.is_dir())
            .collect();
        nodes.sort();
        dirs.extend(nodes);
    }
    dirs
}

/// The current files (`worker-{i}.log`) of a log folder, by slot.
fn worker_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<(usize, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let slot = name.strip_prefix("worker-")?.strip_suffix(".log")?;
            Some((slot.parse().ok()?, e.path()))
        })
        .collect();
    files.sort();
    files.into_iter().map(|(_, p)| p).collect()
}

/// The rotated files of `path` that exist, oldest first.
fn rotated_files(path: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut n = 1;
    loop {
        let p = rotated(path, n);
        if !p.exists() {
            break;
        }
        found.push(p);
        n += 1;
    }
    found.reverse();
    found
}

/// Complete lines of `bytes` that parse and match; an unparsable line (a log
/// written before lines were stamped) is skipped.
fn parse_lines(bytes: &[u8], filter: &LogFilter, out: &mut Vec<LogLine>) {
    for raw in bytes.split(|b| *b == b'\n') {
        if raw.is_empty() {
            continue;
        }
        if let Some(line) = LogLine::parse(&String::from_utf8_lossy(raw))
            && filter.matches(&line)
        {
            out.push(line);
        }
    }
}

/// Every kept line of `job` in data folder `data` that `filter` matches.
pub(super) fn read_dir(data: &Path, job: &str, filter: &LogFilter) -> Result<Vec<LogLine>> {
    check_job(data, job)?;
    let mut lines = Vec::new();
    for dir in log_dirs(data, job) {
        for current in worker_files(&dir) {
            for path in rotated_files(&current).iter().chain([&current]) {
                match std::fs::read(path) {
                    Ok(bytes) => parse_lines(&bytes, filter, &mut lines),
                    // Rotated away between the listing and the read.
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(Error::unavailable(format!(
                            "read log {}: {e}",
                            path.display()
                        )));
                    }
                }
            }
        }
    }
    sort_by_time(&mut lines);
    Ok(lines)
}

/// Whether some live process holds the lock of log folder `dir`.
fn has_writer(dir: &Path) -> bool {
    let Ok(lock) = File::open(dir.join(LOCK_FILE)) else {
        return false;
    };
    // SAFETY: flock on a descriptor we own; closing it releases the lock.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 }
}

/// The follower's position in one worker's current file.
struct Tail {
    file: Option<(File, u64)>,
    /// Bytes after the last newline read so far.
    partial: Vec<u8>,
}

impl Tail {
    /// Appends what was written since the last call; follows a rotation by
    /// finishing the renamed file, then opening the new one.
    fn read_new(&mut self, path: &Path, out: &mut Vec<u8>) -> std::io::Result<()> {
        loop {
            if self.file.is_none() {
                match File::open(path) {
                    Ok(f) => {
                        let ino = f.metadata()?.ino();
                        self.file = Some((f, ino));
                    }
                    Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
            let (file, ino) = self.file.as_mut().expect("opened above");
            file.read_to_end(&mut self.partial)?;
            let rotated = match std::fs::metadata(path) {
                Ok(m) => m.ino() != *ino,
                Err(e) if e.kind() == ErrorKind::NotFound => true,
                Err(e) => return Err(e),
            };
            if rotated {
                // Lines appended just before the rename are in our handle.
                file.read_to_end(&mut self.partial)?;
            }
            if let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') {
                out.extend(self.partial.drain(..=end));
            }
            if !rotated {
                return Ok(());
            }
            self.file = None;
            if !path.exists() {
                return Ok(());
            }
        }
    }
}

/// Sends every kept line, then new lines as they are written, until every
/// writer of the job's log folders exited (and the rest was sent), `cancel`
/// fires, or the receiver is dropped.
pub(super) fn follow_dir(
    data: &Path,
    job: &str,
    filter: &LogFilter,
    tx: &mpsc::Sender<Result<LogLine>>,
    cancel: &CancellationToken,
) {
    let mut tails: BTreeMap<PathBuf, Tail> = BTreeMap::new();
    loop {
        // Looked at before reading: lines written before the writer exited
        // are then read in this pass.
        let dirs = log_dirs(data, job);
        let ended = !dirs.iter().any(|d| has_writer(d));
        let mut lines = Vec::new();
        for dir in &dirs {
            for current in worker_files(dir) {
                let mut bytes = Vec::new();
                if !tails.contains_key(&current) {
                    for old in rotated_files(&current) {
                        if let Ok(b) = std::fs::read(&old) {
                            bytes.extend(b);
                        }
                    }
                }
                let tail = tails.entry(current.clone()).or_insert(Tail {
                    file: None,
                    partial: Vec::new(),
                });
                if let Err(e) = tail.read_new(&current, &mut bytes) {
                    let _ = tx.blocking_send(Err(Error::unavailable(format!(
                        "read log {}: {e}",
                        current.display()
                    ))));
                    return;
                }
                parse_lines(&bytes, filter, &mut lines);
            }
        }
        sort_by_time(&mut lines);
        for line in lines {
            if tx.blocking_send(Ok(line)).is_err() {
                return;
            }
        }
        if ended || cancel.is_cancelled() {
            return;
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::LogStream;
    use chrono::Utc;

    fn total_size(dir: &Path) -> (u64, usize) {
        let mut size = 0;
        let mut count = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            if name.starts_with("worker-0.log") {
                size += e.metadata().unwrap().len();
                count += 1;
            }
        }
        (size, count)
    }

    #[test]
    fn rotation_bounds_the_size_and_keeps_the_newest_lines() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("jobs/j/logs");
        let config = LogConfig {
            file_bytes: 4096,
            files: 2,
            ..LogConfig::default()
        };
        let logs = NodeLogs::open(&dir, "local", config).unwrap();
        let line = |i: usize| {
            LogLine::new(
                Utc::now(),
                "local",
                Some(0),
                LogStream::Stdout,
                &format!("line {i:06} {}", "x".repeat(40)),
            )
        };
        let one = line(0).format().len() as u64 + 1;
        let written = 2000;
        for i in 0..written {
            logs.write(0, &line(i));
        }
        let (size, count) = total_size(&dir);
        assert_eq!(count, 3, "the current file and 2 rotated ones");
        assert!(size <= 3 * 4096, "{size} bytes kept, bound {}", 3 * 4096);
        assert!(
            size > 2 * 4096,
            "rotation keeps the rotated files ({size} bytes)"
        );
        assert!(
            written as u64 * one > 10 * size,
            "the test writes well past the bound"
        );
        // The newest lines are kept, in order, without gaps.
        let lines = read_dir(data.path(), "j", &LogFilter::default()).unwrap();
        let numbers: Vec<usize> = lines
            .iter()
            .map(|l| l.text[5..11].parse().unwrap())
            .collect();
        assert_eq!(*numbers.last().unwrap(), written - 1);
        assert!(
            numbers.windows(2).all(|w| w[1] == w[0] + 1),
            "gap in {numbers:?}"
        );
        assert_eq!(numbers.len() as u64, size / one);
    }

    #[test]
    fn a_folder_has_one_writer_and_a_follower_ends_with_it() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("jobs/j/logs");
        let logs = NodeLogs::open(&dir, "local", LogConfig::default()).unwrap();
        let err = NodeLogs::open(&dir, "local", LogConfig::default()).unwrap_err();
        assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
        assert!(has_writer(&dir));
        let line = LogLine::new(Utc::now(), "local", Some(1), LogStream::Stderr, "hello");
        logs.write(1, &line);
        let (tx, mut rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let follower = {
            let data = data.path().to_path_buf();
            std::thread::spawn(move || follow_dir(&data, "j", &LogFilter::default(), &tx, &cancel))
        };
        assert_eq!(rx.blocking_recv().unwrap().unwrap(), line);
        let later = LogLine::new(Utc::now(), "local", Some(1), LogStream::Stdout, "bye");
        logs.write(1, &later);
        drop(logs);
        assert_eq!(rx.blocking_recv().unwrap().unwrap(), later);
        assert!(
            rx.blocking_recv().is_none(),
            "the stream ends with the writer"
        );
        follower.join().unwrap();
        assert!(!has_writer(&dir));
        let err = read_dir(data.path(), "nope", &LogFilter::default()).unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
    }
}
