//! Capturing a worker's stdout and stderr: each line is stamped with the time
//! and the worker's current rank and handed to the agent's [`LogSink`] (which
//! writes the node's rotated files and ships lines to the store; see
//! `kiln_coordinator::logs`). The last lines are also kept here, to put
//! beside a worker's failure.
//!
//! Pipes are read on blocking threads: a worker that prints a lot costs the
//! agent a thread, never a stalled async runtime, and a sink that is slow only
//! slows that worker's pipe, which the kernel buffers.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, PipeReader, Read};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;

/// Longest line read from a pipe; a longer one is split.
const MAX_LINE_BYTES: u64 = 16 * 1024;

/// Lines kept for a failure message.
const TAIL_LINES: usize = 5;

/// How long a dead worker's pipes may take to deliver their last lines (a
/// grandchild could hold them open forever).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerStream {
    /// The worker's standard output.
    Stdout,
    /// The worker's standard error (its tracing logs go there).
    Stderr,
}

/// One line a worker wrote.
#[derive(Debug, Clone)]
pub struct WorkerLine {
    /// The worker's slot on this node.
    pub local_rank: usize,
    /// Its global rank when it wrote the line; `None` before its first assignment.
    pub rank: Option<u32>,
    /// Stdout or stderr.
    pub stream: WorkerStream,
    /// When the agent read it.
    pub time: SystemTime,
    /// The line without its newline (lossy UTF-8).
    pub text: String,
}

/// Where the agent puts its workers' lines. Called from the pipe-reading
/// threads, so it may block briefly (a file write) but must not wait on the
/// network.
#[derive(Clone)]
pub struct LogSink(Arc<dyn Fn(WorkerLine) + Send + Sync>);

impl LogSink {
    /// A sink that hands every line to `sink`.
    pub fn new(sink: impl Fn(WorkerLine) + Send + Sync + 'static) -> Self {
        LogSink(Arc::new(sink))
    }
}

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogSink")
    }
}

/// A worker's output being captured.
pub(crate) struct Capture {
    /// The global rank stamped on lines; -1 before the first assignment.
    rank: Arc<AtomicI64>,
    /// The slot stamped on lines (a spare worker takes one when adopted).
    local_rank: Arc<AtomicUsize>,
    tail: Arc<Mutex<VecDeque<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Capture {
    /// Starts reading the worker's two pipes.
    pub(crate) fn start(
        local_rank: usize,
        stdout: PipeReader,
        stderr: PipeReader,
        sink: &LogSink,
    ) -> Self {
        let rank = Arc::new(AtomicI64::new(-1));
        let local_rank = Arc::new(AtomicUsize::new(local_rank));
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let readers = [
            (stdout, WorkerStream::Stdout),
            (stderr, WorkerStream::Stderr),
        ]
        .into_iter()
        .map(|(pipe, stream)| {
            let (rank, local_rank, tail, sink) =
                (rank.clone(), local_rank.clone(), tail.clone(), sink.clone());
            tokio::task::spawn_blocking(move || {
                read_lines(pipe, |text| {
                    let r = rank.load(Ordering::Relaxed);
                    if !text.trim().is_empty() {
                        let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                        if tail.len() == TAIL_LINES {
                            tail.pop_front();
                        }
                        tail.push_back(text.clone());
                    }
                    (sink.0)(WorkerLine {
                        local_rank: local_rank.load(Ordering::Relaxed),
                        rank: u32::try_from(r).ok(),
                        stream,
                        time: SystemTime::now(),
                        text,
                    });
                })
            })
        })
        .collect();
        Capture {
            rank,
            local_rank,
            tail,
            readers,
        }
    }

    /// The handle that stamps the worker's rank on its lines.
    pub(crate) fn rank_handle(&self) -> RankHandle {
        RankHandle(self.rank.clone())
    }

    /// Gives the worker's lines from now on to slot `local_rank` (a spare
    /// worker adopted into it).
    pub(crate) fn set_local_rank(&self, local_rank: usize) {
        self.local_rank.store(local_rank, Ordering::Relaxed);
    }

    /// The handle to the worker's last lines.
    pub(crate) fn tail_handle(&self) -> TailHandle {
        TailHandle(self.tail.clone())
    }

    /// Waits until the pipes are read to their end (the worker exited), at
    /// most [`DRAIN_TIMEOUT`].
    pub(crate) async fn drained(&mut self) {
        let readers = std::mem::take(&mut self.readers);
        let all = async {
            for reader in readers {
                let _ = reader.await;
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, all).await;
    }
}

/// Sets the rank a worker's lines carry (from its assignment on).
#[derive(Clone)]
pub(crate) struct RankHandle(Arc<AtomicI64>);

impl RankHandle {
    pub(crate) fn set(&self, rank: u32) {
        self.0.store(rank.into(), Ordering::Relaxed);
    }
}

/// A worker's last non-empty lines.
#[derive(Clone)]
pub(crate) struct TailHandle(Arc<Mutex<VecDeque<String>>>);

impl TailHandle {
    /// `; last lines of {log}:\n  ...`, or nothing when the worker printed nothing.
    pub(crate) fn describe(&self, log: &std::path::Path) -> String {
        let tail = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if tail.is_empty() {
            return String::new();
        }
        let lines: Vec<&str> = tail.iter().map(String::as_str).collect();
        format!(
            "; last lines of {}:\n  {}",
            log.display(),
            lines.join("\n  ")
        )
    }
}

/// Calls `line` for each line of `pipe` until its end; a line longer than
/// [`MAX_LINE_BYTES`] is delivered in pieces.
fn read_lines(pipe: impl Read, mut line: impl FnMut(String)) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader
            .by_ref()
            .take(MAX_LINE_BYTES)
            .read_until(b'\n', &mut buf)
        {
            Ok(0) => return,
            Ok(_) => {
                if buf.last() == Some(&b'\n') {
                    buf.pop();
                }
                if buf.last() == Some(&b'\r') {
                    buf.pop();
                }
                line(String::from_utf8_lossy(&buf).into_owned());
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_and_long_ones_cut() {
        let long = "y".repeat(MAX_LINE_BYTES as usize + 10);
        let input = format!("one\r\ntwo\n\n{long}\nlast without newline");
        let mut got = Vec::new();
        read_lines(input.as_bytes(), |l| got.push(l));
        assert_eq!(
            got.len(),
            6,
            "{:?}",
            got.iter().map(String::len).collect::<Vec<_>>()
        );
        assert_eq!(&got[..3], ["one", "two", ""]);
        assert_eq!(got[3].len(), MAX_LINE_BYTES as usize);
        assert_eq!(got[4], "y".repeat(10));
        assert_eq!(got[5], "last without newline");
    }
}
