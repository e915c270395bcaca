//! Per-rank worker logs: the line format, where the lines are kept, and how
//! they are read back.
//!
//! An agent captures each worker's stdout and stderr line by line and turns
//! every line into a [`LogLine`]: time, node, rank, stream, text. The lines go
//! to two places:
//!
//! - **Files** on the node ([`files`]): `{run folder}/logs/worker-{i}.log` per
//!   local worker slot `i`, rotated by size (`worker-{i}.log.1` ... `.N`), so a
//!   node never keeps more than `(files + 1) × file_bytes` per worker. A lock
//!   file held by the writing process tells a follower when the job is over.
//! - **The store** ([`ship`]), for multi-node jobs: batches under
//!   `jobs/{job}/logs/{node}/{worker}/{seq}`, at most one batch per worker and
//!   flush interval, only the last `store_bytes` per worker kept. Shipping never
//!   blocks the worker: lines that do not fit the rate bound are counted and
//!   reported as dropped.
//!
//! Readers ([`read`], [`follow`]) take a [`LogSource`] (a data folder or a
//! store) and a [`LogFilter`]; both are plain async functions so that an HTTP
//! handler can call them as well as `kiln logs`.
//!
//! On disk and in the store a line reads
//! `2026-12-06T13:21:30.123Z node-0 r3 err text...`: time (RFC 3339, UTC,
//! milliseconds), node, `r{rank}` (`r-` before the worker's first round),
//! `out` or `err`, then the text as the worker wrote it.

pub mod files;
pub mod ship;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::keyspace::Keyspace;
use crate::store::Store;

pub use files::NodeLogs;
pub use ship::LogShipper;

/// Longest text kept of one line, in bytes; the rest is cut (a worker that
/// prints a megabyte without a newline must not make one huge line).
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Which of the worker's output streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogStream {
    /// Standard output (`out` in a formatted line).
    Stdout,
    /// Standard error (`err` in a formatted line).
    Stderr,
}

impl LogStream {
    /// `out` or `err`, as in a formatted line.
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "out",
            LogStream::Stderr => "err",
        }
    }
}

/// One line a worker wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// When the agent read the line.
    pub time: DateTime<Utc>,
    /// The node the worker runs on (`local` for `kiln run`).
    pub node: String,
    /// The worker's global rank when it wrote the line; `None` before its first
    /// round (an elastic worker's rank may change from round to round).
    pub rank: Option<u32>,
    /// The stream the worker wrote it to.
    pub stream: LogStream,
    /// The line without its newline, at most [`MAX_LINE_BYTES`].
    pub text: String,
}

impl LogLine {
    /// A line with `time` cut to milliseconds (the stored precision), `text`
    /// cut to [`MAX_LINE_BYTES`] and without a trailing `\r` or `\n`.
    pub fn new(
        time: DateTime<Utc>,
        node: &str,
        rank: Option<u32>,
        stream: LogStream,
        text: &str,
    ) -> Self {
        let text = text.trim_end_matches(['\n', '\r']);
        let mut end = text.len().min(MAX_LINE_BYTES);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        LogLine {
            time: time.trunc_subsecs(3),
            node: node.to_string(),
            rank,
            stream,
            // A stray newline inside would split the stored line in two.
            text: text[..end].replace(['\n', '\r'], " "),
        }
    }

    /// The stored form: `TIME NODE rRANK STREAM TEXT` (no newline).
    pub fn format(&self) -> String {
        let rank = match self.rank {
            Some(r) => format!("r{r}"),
            None => "r-".to_string(),
        };
        format!(
            "{} {} {rank} {} {}",
            self.time.to_rfc3339_opts(SecondsFormat::Millis, true),
            self.node,
            self.stream.as_str(),
            self.text
        )
    }

    /// Parses the stored form; `None` for a line that is not one (a worker
    /// log written by an older kiln, a torn last line).
    pub fn parse(line: &str) -> Option<LogLine> {
        let mut parts = line.splitn(5, ' ');
        let time = DateTime::parse_from_rfc3339(parts.next()?)
            .ok()?
            .with_timezone(&Utc);
        let node = parts.next()?;
        let rank = match parts.next()?.strip_prefix('r')? {
            "-" => None,
            digits => Some(digits.parse().ok()?),
        };
        let stream = match parts.next()? {
            "out" => LogStream::Stdout,
            "err" => LogStream::Stderr,
            _ => return None,
        };
        let text = parts.next().unwrap_or("");
        (!node.is_empty()).then(|| LogLine {
            time,
            node: node.to_string(),
            rank,
            stream,
            text: text.to_string(),
        })
    }
}

impl std::fmt::Display for LogLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.format())
    }
}

/// Which lines a reader wants; `None` fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogFilter {
    /// Lines of this node only (`--node`).
    pub node: Option<String>,
    /// Lines of this global rank only (`--rank`); lines written before a
    /// worker had a rank never match.
    pub rank: Option<u32>,
    /// Lines written at or after this time.
    pub since: Option<DateTime<Utc>>,
}

impl LogFilter {
    /// Whether `line` passes every filter that is set.
    pub fn matches(&self, line: &LogLine) -> bool {
        self.node.as_ref().is_none_or(|n| *n == line.node)
            && self.rank.is_none_or(|r| line.rank == Some(r))
            && self.since.is_none_or(|t| line.time >= t)
    }
}

/// [`parse_since`] from the current time.
pub fn since_now(text: &str) -> Result<DateTime<Utc>> {
    parse_since(text, Utc::now())
}

/// Parses `--since`: a duration back from `now` (`90s`, `5m`, `2h`, `1d`,
/// `1h30m`) or an RFC 3339 time (`2026-12-06T13:00:00Z`).
pub fn parse_since(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let bad = || {
        Error::invalid(
            "since",
            format!(
                "{text:?} is neither a duration (90s, 5m, 2h, 1d, 1h30m) nor an RFC 3339 time (2026-12-06T13:00:00Z)"
            ),
        )
    };
    let mut seconds: u64 = 0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        let n: u64 = number.parse().map_err(|_| bad())?;
        seconds = n
            .checked_mul(unit)
            .and_then(|s| seconds.checked_add(s))
            .ok_or_else(bad)?;
        number.clear();
    }
    if !number.is_empty() || text.is_empty() {
        return Err(bad());
    }
    let back = chrono::Duration::try_seconds(seconds as i64).ok_or_else(bad)?;
    now.checked_sub_signed(back).ok_or_else(bad)
}

/// How much log a node keeps, and how fast it ships lines to the store
/// (the spec's `[logs]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Size at which a worker's log file is rotated.
    pub file_bytes: u64,
    /// Rotated files kept per worker besides the current one.
    pub files: usize,
    /// Newest bytes of log kept in the store per worker (multi-node jobs).
    pub store_bytes: usize,
    /// Most bytes shipped per worker and flush; more is dropped and counted.
    pub batch_bytes: usize,
    /// How often lines are shipped to the store.
    pub flush_interval: Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            file_bytes: 16 << 20,
            files: 3,
            store_bytes: 256 << 10,
            batch_bytes: 64 << 10,
            flush_interval: Duration::from_secs(1),
        }
    }
}

/// Where to read a job's logs from.
#[derive(Clone)]
pub enum LogSource {
    /// A data folder (`--data-dir`): `jobs/{job}/logs/` of `kiln run` and
    /// `jobs/{job}/nodes/{node}/logs/` of each `kiln agent` that used it.
    Dir(PathBuf),
    /// The store of a multi-node job: the batches the agents shipped.
    Store {
        /// The job's store.
        store: Arc<dyn Store>,
        /// The keys the job lives under.
        keyspace: Keyspace,
    },
}

impl std::fmt::Debug for LogSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogSource::Dir(dir) => f.debug_tuple("Dir").field(dir).finish(),
            LogSource::Store { keyspace, .. } => f
                .debug_struct("Store")
                .field("root", &keyspace.root())
                .finish(),
        }
    }
}

/// Every kept line of `job` that `filter` matches, oldest first.
/// [`Error::NotFound`] when the source knows no such job.
pub async fn read(source: &LogSource, job: &str, filter: &LogFilter) -> Result<Vec<LogLine>> {
    crate::keyspace::validate_name("job", job)?;
    match source {
        LogSource::Dir(dir) => {
            let (dir, job, filter) = (dir.clone(), job.to_string(), filter.clone());
            tokio::task::spawn_blocking(move || files::read_dir(&dir, &job, &filter))
                .await
                .map_err(|e| Error::unavailable(format!("read logs: {e}")))?
        }
        LogSource::Store { store, keyspace } => {
            ship::read_store(&**store, keyspace, job, filter).await
        }
    }
}

/// The lines of a running job as they are written: first every kept line
/// that matches, then new ones. The stream ends after the job ends (every
/// writer of a data folder exited, or the job's status in the store became
/// terminal) and its last lines were delivered, or when `cancel` fires.
pub async fn follow(
    source: LogSource,
    job: &str,
    filter: LogFilter,
    cancel: CancellationToken,
) -> Result<LogFollow> {
    crate::keyspace::validate_name("job", job)?;
    let (tx, rx) = mpsc::channel(1024);
    match source {
        LogSource::Dir(dir) => {
            files::check_job(&dir, job)?;
            let job = job.to_string();
            std::thread::Builder::new()
                .name("kiln-logs-follow".into())
                .spawn(move || files::follow_dir(&dir, &job, &filter, &tx, &cancel))
                .map_err(|e| Error::unavailable(format!("start the log follower: {e}")))?;
        }
        LogSource::Store { store, keyspace } => {
            ship::check_job(&*store, &keyspace, job).await?;
            let job = job.to_string();
            tokio::spawn(async move {
                if let Err(e) =
                    ship::follow_store(store, keyspace, &job, &filter, &tx, &cancel).await
                {
                    let _ = tx.send(Err(e)).await;
                }
            });
        }
    }
    Ok(LogFollow { rx })
}

/// The receiving end of [`follow`].
#[derive(Debug)]
pub struct LogFollow {
    rx: mpsc::Receiver<Result<LogLine>>,
}

impl LogFollow {
    /// The next line; `None` once the job ended and its lines were delivered.
    pub async fn next(&mut self) -> Option<Result<LogLine>> {
        self.rx.recv().await
    }

    /// The lines as a `Stream` (for server-sent events and the like).
    pub fn into_stream(self) -> tokio_stream::wrappers::ReceiverStream<Result<LogLine>> {
        tokio_stream::wrappers::ReceiverStream::new(self.rx)
    }
}

/// Sorts lines by time, keeping the order of lines with the same time.
fn sort_by_time(lines: &mut [LogLine]) {
    lines.sort_by_key(|l| l.time);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_line_survives_its_stored_form() {
        let line = LogLine::new(
            at("2026-12-06T13:21:30.123Z"),
            "node-0",
            Some(3),
            LogStream::Stderr,
            "loss 0.25  with  spaces\r\n",
        );
        let text = line.format();
        assert_eq!(
            text,
            "2026-12-06T13:21:30.123Z node-0 r3 err loss 0.25  with  spaces"
        );
        assert_eq!(LogLine::parse(&text), Some(line.clone()));
        let early = LogLine::new(line.time, "n", None, LogStream::Stdout, "");
        assert_eq!(LogLine::parse(&early.format()), Some(early));
        for bad in [
            "",
            "hello world",
            "2026-12-06T13:21:30Z n r3 xx t",
            "2026-12-06T13:21:30Z n 3 out t",
        ] {
            assert_eq!(LogLine::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn long_lines_are_cut_on_a_char_boundary() {
        let text = "é".repeat(MAX_LINE_BYTES);
        let line = LogLine::new(Utc::now(), "n", Some(0), LogStream::Stdout, &text);
        assert!(line.text.len() <= MAX_LINE_BYTES && line.text.len() >= MAX_LINE_BYTES - 1);
    }

    #[test]
    fn since_takes_durations_and_times() {
        let now = at("2026-12-06T13:00:00Z");
        assert_eq!(parse_since("5m", now).unwrap(), at("2026-12-06T12:55:00Z"));
        assert_eq!(
            parse_since("1h30m", now).unwrap(),
            at("2026-12-06T11:30:00Z")
        );
        assert_eq!(parse_since("1d", now).unwrap(), at("2026-12-05T13:00:00Z"));
        assert_eq!(
            parse_since("2026-12-06T12:00:00+01:00", now).unwrap(),
            at("2026-12-06T11:00:00Z")
        );
        for bad in [
            "",
            "5",
            "m",
            "5x",
            "-5m",
            "yesterday",
            "99999999999999999999d",
        ] {
            let err = parse_since(bad, now).unwrap_err().to_string();
            assert!(err.contains("RFC 3339"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn filters_combine() {
        let line = LogLine::new(
            at("2026-12-06T13:00:00Z"),
            "a",
            Some(1),
            LogStream::Stdout,
            "x",
        );
        assert!(LogFilter::default().matches(&line));
        let f = |node: Option<&str>, rank, since: Option<&str>| LogFilter {
            node: node.map(String::from),
            rank,
            since: since.map(at),
        };
        assert!(f(Some("a"), Some(1), Some("2026-12-06T13:00:00Z")).matches(&line));
        assert!(!f(Some("b"), None, None).matches(&line));
        assert!(!f(None, Some(0), None).matches(&line));
        assert!(!f(None, None, Some("2026-12-06T13:00:00.001Z")).matches(&line));
        let early = LogLine {
            rank: None,
            ..line.clone()
        };
        assert!(!f(None, Some(1), None).matches(&early));
    }
}
