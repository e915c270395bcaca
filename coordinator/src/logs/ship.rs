//! Worker logs in the store, for multi-node jobs: `kiln logs` on any machine
//! that reaches the store reads every node's lines.
//!
//! Bounded three ways: per worker slot, at most one batch of at most
//! `batch_bytes` per flush interval (more is dropped and counted, and the
//! count is itself logged), only the newest `store_bytes` kept (older batches
//! deleted), and a queue of lines between the workers and the store that
//! drops instead of waiting, so a slow store never slows training.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{LogConfig, LogFilter, LogLine, LogStream, sort_by_time};
use crate::error::{Error, Result};
use crate::keyspace::Keyspace;
use crate::status::JobStatus;
use crate::store::{Store, WatchEvent};

/// Lines queued for the shipper across all workers; more are dropped.
const QUEUE_LINES: usize = 8192;

/// How long one store call of the shipper may take before it is given up.
const STORE_CALL: Duration = Duration::from_secs(5);

/// After the job's status turned terminal, a follower ends once no batch
/// arrived for this long (the nodes ship their last lines as they exit).
const FOLLOW_DRAIN_QUIET: Duration = Duration::from_secs(2);

/// The most a follower waits for those last lines.
const FOLLOW_DRAIN_MAX: Duration = Duration::from_secs(15);

/// Ships one node's log lines to the store in the background.
#[derive(Debug)]
pub struct LogShipper {
    tx: mpsc::Sender<(usize, String)>,
    /// Lines the queue refused since the last flush.
    dropped: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl LogShipper {
    /// Starts shipping the lines of `node` in `job`. Continues the sequence
    /// numbers of batches a previous agent of the node left in the store.
    pub async fn start(
        store: Arc<dyn Store>,
        keyspace: Keyspace,
        job: &str,
        node: &str,
        config: LogConfig,
    ) -> Result<Self> {
        crate::keyspace::validate_name("job", job)?;
        crate::keyspace::validate_name("node", node)?;
        let (existing, _) = store
            .get_prefix(&keyspace.node_logs_prefix(job, node))
            .await?;
        let mut kept: BTreeMap<usize, VecDeque<(String, usize)>> = BTreeMap::new();
        let mut next_seq = 0;
        for kv in existing {
            if let Some((_, worker, seq)) = keyspace.parse_log_batch(job, &kv.key) {
                kept.entry(worker)
                    .or_default()
                    .push_back((kv.key.clone(), kv.value.len()));
                next_seq = next_seq.max(seq + 1);
            }
        }
        let (tx, rx) = mpsc::channel(QUEUE_LINES);
        let dropped = Arc::new(AtomicU64::new(0));
        let shipping = Shipping {
            store,
            keyspace,
            job: job.to_string(),
            node: node.to_string(),
            config,
            next_seq,
            kept,
            pending: BTreeMap::new(),
            over_budget: BTreeMap::new(),
            dropped: dropped.clone(),
            warned: false,
        };
        let task = tokio::spawn(shipping.run(rx));
        Ok(LogShipper { tx, dropped, task })
    }

    /// Queues a formatted line of worker slot `worker`; drops it (and counts
    /// it) when the queue is full. Never waits.
    pub fn send(&self, worker: usize, line: String) {
        if self.tx.try_send((worker, line)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Ships what is queued, then stops (waiting at most `timeout`).
    pub async fn close(self, timeout: Duration) {
        let LogShipper { tx, task, .. } = self;
        drop(tx);
        let abort = task.abort_handle();
        if tokio::time::timeout(timeout, task).await.is_err() {
            abort.abort();
            tracing::warn!("log shipping did not finish within {timeout:?}; last lines lost");
        }
    }
}

/// The shipper's state, owned by its task.
struct Shipping {
    store: Arc<dyn Store>,
    keyspace: Keyspace,
    job: String,
    node: String,
    config: LogConfig,
    next_seq: u64,
    /// Batches in the store per worker, oldest first, with their sizes.
    kept: BTreeMap<usize, VecDeque<(String, usize)>>,
    /// Lines waiting for the next flush, per worker.
    pending: BTreeMap<usize, String>,
    /// Lines over a worker's batch budget since the last flush.
    over_budget: BTreeMap<usize, u64>,
    dropped: Arc<AtomicU64>,
    warned: bool,
}

impl Shipping {
    async fn run(mut self, mut rx: mpsc::Receiver<(usize, String)>) {
        let mut tick = tokio::time::interval(self.config.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                line = rx.recv() => match line {
                    Some((worker, line)) => self.queue(worker, line),
                    None => break,
                },
                _ = tick.tick() => self.flush().await,
            }
        }
        self.flush().await;
    }

    fn queue(&mut self, worker: usize, line: String) {
        let batch = self.pending.entry(worker).or_default();
        if batch.len() + line.len() + 1 > self.config.batch_bytes {
            *self.over_budget.entry(worker).or_default() += 1;
            return;
        }
        batch.push_str(&line);
        batch.push('\n');
    }

    async fn flush(&mut self) {
        let queue_dropped = self.dropped.swap(0, Ordering::Relaxed);
        if queue_dropped > 0 {
            // Which worker lost them is unknown: say so on slot 0's log.
            *self.over_budget.entry(0).or_default() += queue_dropped;
        }
        for (worker, lost) in std::mem::take(&mut self.over_budget) {
            let note = LogLine::new(
                Utc::now(),
                &self.node,
                None,
                LogStream::Stderr,
                &format!(
                    "kiln: {lost} log lines of this node were not shipped to the store (rate bound); the node's files have them"
                ),
            );
            let batch = self.pending.entry(worker).or_default();
            batch.push_str(&note.format());
            batch.push('\n');
        }
        for (worker, batch) in std::mem::take(&mut self.pending) {
            if batch.is_empty() {
                continue;
            }
            let key = self
                .keyspace
                .log_batch(&self.job, &self.node, worker, self.next_seq);
            self.next_seq += 1;
            let size = batch.len();
            let put =
                tokio::time::timeout(STORE_CALL, self.store.put(&key, batch.into_bytes(), None));
            match put.await {
                Ok(Ok(_)) => {
                    self.kept.entry(worker).or_default().push_back((key, size));
                }
                Ok(Err(e)) => self.warn_once(&format!("ship worker log batch: {e}")),
                Err(_) => self.warn_once(&format!(
                    "ship worker log batch: no answer within {STORE_CALL:?}"
                )),
            }
            self.trim(worker).await;
        }
    }

    /// Deletes a worker's oldest batches until it keeps at most `store_bytes`
    /// (always keeping the newest batch).
    async fn trim(&mut self, worker: usize) {
        let Some(kept) = self.kept.get_mut(&worker) else {
            return;
        };
        let mut total: usize = kept.iter().map(|(_, size)| size).sum();
        while total > self.config.store_bytes && kept.len() > 1 {
            let (key, size) = kept.pop_front().expect("more than one");
            total -= size;
            match tokio::time::timeout(STORE_CALL, self.store.delete(&key)).await {
                Ok(Ok(_)) => {}
                // Left behind; a later trim does not retry it, the job's
                // deletion removes it.
                Ok(Err(e)) => tracing::debug!(key, "delete old log batch: {e}"),
                Err(_) => tracing::debug!(key, "delete old log batch: timed out"),
            }
        }
    }

    fn warn_once(&mut self, message: &str) {
        if !self.warned {
            self.warned = true;
            tracing::warn!(
                job = self.job,
                node = self.node,
                "{message} (further errors not logged)"
            );
        }
    }
}

/// [`Error::NotFound`] unless the store has a spec or a status for `job`.
pub(super) async fn check_job(store: &dyn Store, keyspace: &Keyspace, job: &str) -> Result<()> {
    if store.get(&keyspace.job_spec(job)).await?.is_some()
        || store.get(&keyspace.job_status(job)).await?.is_some()
    {
        Ok(())
    } else {
        Err(Error::not_found(format!(
            "job {job} in the store (no {})",
            keyspace.job_spec(job)
        )))
    }
}

/// The matching lines of one stored batch.
fn batch_lines(value: &[u8], filter: &LogFilter, out: &mut Vec<LogLine>) {
    for raw in String::from_utf8_lossy(value).lines() {
        if let Some(line) = LogLine::parse(raw)
            && filter.matches(&line)
        {
            out.push(line);
        }
    }
}

/// Whether a batch key can hold lines the filter wants (its node matches).
fn batch_wanted(keyspace: &Keyspace, job: &str, key: &str, filter: &LogFilter) -> bool {
    match keyspace.parse_log_batch(job, key) {
        Some((node, _, _)) => filter.node.as_deref().is_none_or(|n| n == node),
        None => false,
    }
}

pub(super) async fn read_store(
    store: &dyn Store,
    keyspace: &Keyspace,
    job: &str,
    filter: &LogFilter,
) -> Result<Vec<LogLine>> {
    check_job(store, keyspace, job).await?;
    let (batches, _) = store.get_prefix(&keyspace.logs_prefix(job)).await?;
    let mut lines = Vec::new();
    for kv in batches {
        if batch_wanted(keyspace, job, &kv.key, filter) {
            batch_lines(&kv.value, filter, &mut lines);
        }
    }
    sort_by_time(&mut lines);
    Ok(lines)
}

pub(super) async fn follow_store(
    store: Arc<dyn Store>,
    keyspace: Keyspace,
    job: &str,
    filter: &LogFilter,
    tx: &mpsc::Sender<Result<LogLine>>,
    cancel: &CancellationToken,
) -> Result<()> {
    let prefix = keyspace.job_prefix(job);
    let (keys, revision) = store.get_prefix(&prefix).await?;
    let status_key = keyspace.job_status(job);
    let mut lines = Vec::new();
    let mut ended = false;
    for kv in &keys {
        if kv.key == status_key {
            ended = JobStatus::from_json(&kv.key, &kv.value)?
                .phase
                .is_terminal();
        } else if batch_wanted(&keyspace, job, &kv.key, filter) {
            batch_lines(&kv.value, filter, &mut lines);
        }
    }
    sort_by_time(&mut lines);
    for line in lines {
        if tx.send(Ok(line)).await.is_err() {
            return Ok(());
        }
    }
    let mut watch = store.watch_prefix(&prefix, Some(revision)).await?;
    let mut drain_until = ended.then(|| tokio::time::Instant::now() + FOLLOW_DRAIN_MAX);
    loop {
        let quiet = match drain_until {
            Some(until) => until.min(tokio::time::Instant::now() + FOLLOW_DRAIN_QUIET),
            None => tokio::time::Instant::now() + Duration::from_secs(3600),
        };
        let event = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tx.closed() => return Ok(()),
            _ = tokio::time::sleep_until(quiet), if drain_until.is_some() => return Ok(()),
            event = watch.try_next() => event?,
        };
        let Some(WatchEvent::Put(kv)) = event else {
            if event.is_none() {
                return Err(Error::unavailable("the store ended the log watch"));
            }
            continue;
        };
        if kv.key == status_key {
            if drain_until.is_none()
                && JobStatus::from_json(&kv.key, &kv.value)?
                    .phase
                    .is_terminal()
            {
                drain_until = Some(tokio::time::Instant::now() + FOLLOW_DRAIN_MAX);
            }
            continue;
        }
        if batch_wanted(&keyspace, job, &kv.key, filter) {
            let mut lines = Vec::new();
            batch_lines(&kv.value, filter, &mut lines);
            for line in lines {
                if tx.send(Ok(line)).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::{LogSource, follow, read};
    use crate::store::mem::MemStore;

    fn line(node: &str, rank: u32, text: &str) -> LogLine {
        LogLine::new(Utc::now(), node, Some(rank), LogStream::Stdout, text)
    }

    #[tokio::test]
    async fn batches_are_bounded_and_read_back_in_order() {
        let store: Arc<dyn Store> = MemStore::new();
        let ks = Keyspace::default();
        store
            .put(&ks.job_spec("j"), b"{}".to_vec(), None)
            .await
            .unwrap();
        let config = LogConfig {
            store_bytes: 2048,
            batch_bytes: 1024,
            flush_interval: Duration::from_secs(3600),
            ..LogConfig::default()
        };
        let shipper = LogShipper::start(store.clone(), ks.clone(), "j", "n1", config.clone())
            .await
            .unwrap();
        // The first tick flushes at once; send after it so one batch holds all.
        tokio::time::sleep(Duration::from_millis(50)).await;
        for i in 0..100 {
            shipper.send(0, line("n1", 4, &format!("line {i:03}")).format());
        }
        shipper.close(Duration::from_secs(5)).await;
        let source = LogSource::Store {
            store: store.clone(),
            keyspace: ks.clone(),
        };
        let lines = read(&source, "j", &LogFilter::default()).await.unwrap();
        let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
        assert!(texts.len() < 100, "the batch budget dropped lines");
        assert!(
            texts.iter().any(|t| t.contains("were not shipped")),
            "{texts:?}"
        );
        assert_eq!(texts[0], "line 000");

        // A restarted shipper continues the sequence and trims old batches.
        for round in 0..5 {
            let shipper = LogShipper::start(store.clone(), ks.clone(), "j", "n1", config.clone())
                .await
                .unwrap();
            for i in 0..10 {
                shipper.send(
                    0,
                    line("n1", 4, &format!("round {round} line {i}")).format(),
                );
            }
            shipper.close(Duration::from_secs(5)).await;
        }
        let (batches, _) = store.get_prefix(&ks.logs_prefix("j")).await.unwrap();
        let bytes: usize = batches.iter().map(|kv| kv.value.len()).sum();
        assert!(bytes <= 2048, "{bytes} bytes kept");
        let lines = read(
            &source,
            "j",
            &LogFilter {
                rank: Some(4),
                ..LogFilter::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(lines.last().unwrap().text, "round 4 line 9");
        let none = read(
            &source,
            "j",
            &LogFilter {
                node: Some("n2".into()),
                ..LogFilter::default()
            },
        )
        .await
        .unwrap();
        assert!(none.is_empty());
        let err = read(&source, "other", &LogFilter::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        let err = follow(
            source,
            "other",
            LogFilter::default(),
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
    }
}
