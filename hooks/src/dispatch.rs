//! [`Hooks`]: the handle callers emit through, one queue and one background
//! task per sink, retries, statistics and flushing.
//!
//! `emit` serializes the event once and offers it to every sink whose filter
//! takes its kind, with `try_send` on the sink's bounded queue: it never waits.
//! Each sink's task delivers its events one at a time, in order, retrying as
//! the sink's spec allows. A counter of events accepted but not yet finished
//! (delivered, or given up on) lets `flush` wait for the queues to drain.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use kiln_proto::spec::HookSpec;
use tokio::sync::{Notify, mpsc};

use crate::config::{EventFilter, SinkConfig, Target, resolve};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::retry::HookOptions;
use crate::sink::{Delivery, Outcome, attempt};

/// Delivers events to the configured hooks. Cheap to clone (clones share the
/// queues). When the last clone is dropped, the sinks' tasks finish the events
/// already queued and stop; call [`Hooks::flush`] before a process exits.
#[derive(Clone)]
pub struct Hooks {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    sinks: Vec<SinkHandle>,
    pending: Arc<Pending>,
}

/// The emitting side of one sink.
struct SinkHandle {
    index: usize,
    name: &'static str,
    filter: EventFilter,
    queue: mpsc::Sender<Arc<Delivery>>,
    counters: Arc<Counters>,
}

/// Events accepted by some queue and not finished yet, across all sinks.
struct Pending {
    count: AtomicUsize,
    /// Woken whenever `count` drops to zero.
    drained: Notify,
}

impl Pending {
    fn add(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    fn done(&self) {
        if self.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.drained.notify_waiters();
        }
    }
}

#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    retries: AtomicU64,
}

/// What one sink has done so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkStats {
    /// Position of the hook in the configured list.
    pub index: usize,
    /// `log`, `webhook` or `command`.
    pub sink: &'static str,
    /// Events delivered (after however many attempts).
    pub delivered: u64,
    /// Events given up on: retries spent, or a failure retrying cannot fix.
    pub failed: u64,
    /// Events not queued because the sink's queue was full.
    pub dropped: u64,
    /// Attempts that failed and were retried.
    pub retries: u64,
}

impl Hooks {
    /// Hooks that deliver nowhere; [`Hooks::emit`] does nothing.
    pub fn none() -> Hooks {
        Hooks { inner: None }
    }

    /// Checks `specs` (the `[[hooks]]` entries), reads their secrets and starts
    /// one delivery task per hook, with [`HookOptions::default`]. Must run
    /// inside a tokio runtime unless `specs` is empty.
    ///
    /// Errors name the hook and the field: `hooks[1].secret_env: environment
    /// variable HOOK_KEY is not set (...)`.
    pub fn new(specs: &[HookSpec]) -> Result<Hooks> {
        Hooks::with_options(specs, HookOptions::default())
    }

    /// [`Hooks::new`] with explicit queue size, backoff and error field path.
    pub fn with_options(specs: &[HookSpec], options: HookOptions) -> Result<Hooks> {
        if specs.is_empty() {
            return Ok(Hooks::none());
        }
        if options.queue_capacity == 0 {
            return Err(crate::error::invalid(
                "queue_capacity",
                "must be at least 1",
            ));
        }
        let configs = specs
            .iter()
            .enumerate()
            .map(|(index, spec)| resolve(spec, index, &options.field_prefix))
            .collect::<Result<Vec<SinkConfig>>>()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let client = if configs
            .iter()
            .any(|c| matches!(c.target, Target::Webhook { .. }))
        {
            Some(http_client()?)
        } else {
            None
        };

        let pending = Arc::new(Pending {
            count: AtomicUsize::new(0),
            drained: Notify::new(),
        });
        let options = Arc::new(options);
        let mut sinks = Vec::with_capacity(configs.len());
        for config in configs {
            let (queue, receiver) = mpsc::channel(options.queue_capacity);
            let counters = Arc::new(Counters::default());
            sinks.push(SinkHandle {
                index: config.index,
                name: config.target.name(),
                filter: config.filter.clone(),
                queue,
                counters: counters.clone(),
            });
            let worker = SinkWorker {
                config,
                client: client.clone(),
                options: options.clone(),
                counters,
                pending: pending.clone(),
            };
            runtime.spawn(worker.run(receiver));
        }
        Ok(Hooks {
            inner: Some(Arc::new(Inner { sinks, pending })),
        })
    }

    /// Whether no hook is configured.
    pub fn is_empty(&self) -> bool {
        self.inner.is_none()
    }

    /// Offers `event` to every hook whose `events` take its kind. Never waits:
    /// a hook whose queue is full drops the event, with a warning in the log
    /// and a count in [`SinkStats::dropped`]. Callable from any thread.
    pub fn emit(&self, event: Event) {
        let Some(inner) = &self.inner else {
            return;
        };
        let mut delivery: Option<Arc<Delivery>> = None;
        for sink in &inner.sinks {
            if !sink.filter.accepts(&event.kind) {
                continue;
            }
            let delivery = delivery
                .get_or_insert_with(|| {
                    Arc::new(Delivery {
                        kind: event.kind.clone(),
                        id: event.id.clone(),
                        body: Bytes::from(event.to_json()),
                    })
                })
                .clone();
            inner.pending.add();
            if let Err(error) = sink.queue.try_send(delivery) {
                inner.pending.done();
                sink.counters.dropped.fetch_add(1, Ordering::Relaxed);
                let why = match error {
                    mpsc::error::TrySendError::Full(_) => "its queue is full",
                    mpsc::error::TrySendError::Closed(_) => "its delivery task has stopped",
                };
                tracing::warn!(
                    hook = sink.index,
                    sink = sink.name,
                    kind = %event.kind,
                    id = %event.id,
                    "hook event dropped: {why}"
                );
            }
        }
    }

    /// Waits until every event emitted so far is finished (delivered, or
    /// given up on after its retries), or until `deadline` has passed.
    /// Returns whether everything finished. Events emitted while it waits are
    /// waited for too.
    pub async fn flush(&self, deadline: Duration) -> bool {
        let Some(inner) = &self.inner else {
            return true;
        };
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let drained = inner.pending.drained.notified();
            let mut drained = std::pin::pin!(drained);
            // Registered before the check, so a drain in between is not missed.
            drained.as_mut().enable();
            if inner.pending.count.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(until, drained).await.is_err() {
                return inner.pending.count.load(Ordering::SeqCst) == 0;
            }
        }
    }

    /// Events accepted by some queue and not finished yet.
    pub fn pending(&self) -> usize {
        self.inner
            .as_ref()
            .map_or(0, |inner| inner.pending.count.load(Ordering::SeqCst))
    }

    /// Per-hook counts, in configuration order.
    pub fn stats(&self) -> Vec<SinkStats> {
        let Some(inner) = &self.inner else {
            return Vec::new();
        };
        inner
            .sinks
            .iter()
            .map(|sink| SinkStats {
                index: sink.index,
                sink: sink.name,
                delivered: sink.counters.delivered.load(Ordering::Relaxed),
                failed: sink.counters.failed.load(Ordering::Relaxed),
                dropped: sink.counters.dropped.load(Ordering::Relaxed),
                retries: sink.counters.retries.load(Ordering::Relaxed),
            })
            .collect()
    }
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sinks: Vec<&str> = self
            .inner
            .as_ref()
            .map(|inner| inner.sinks.iter().map(|s| s.name).collect())
            .unwrap_or_default();
        f.debug_struct("Hooks")
            .field("sinks", &sinks)
            .field("pending", &self.pending())
            .finish()
    }
}

fn http_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .user_agent(concat!("kiln-hooks/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|error| Error::HttpClient(error.to_string()))
}

/// The delivering side of one sink: runs as a background task.
struct SinkWorker {
    config: SinkConfig,
    client: Option<reqwest::Client>,
    options: Arc<HookOptions>,
    counters: Arc<Counters>,
    pending: Arc<Pending>,
}

impl SinkWorker {
    /// Delivers queued events in order until every sender is gone.
    async fn run(self, mut queue: mpsc::Receiver<Arc<Delivery>>) {
        while let Some(delivery) = queue.recv().await {
            self.deliver(&delivery).await;
            self.pending.done();
        }
    }

    async fn deliver(&self, delivery: &Delivery) {
        let config = &self.config;
        let sink = config.target.name();
        let mut retries = 0u32;
        loop {
            let outcome = attempt(
                &config.target,
                self.client.as_ref(),
                config.index,
                delivery,
                config.timeout,
            )
            .await;
            let attempts = retries + 1;
            match outcome {
                Outcome::Delivered => {
                    self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                    if retries > 0 {
                        tracing::info!(hook = config.index, sink, kind = %delivery.kind, id = %delivery.id, attempts, "hook event delivered after retries");
                    }
                    return;
                }
                Outcome::GiveUp { reason } => {
                    self.counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(hook = config.index, sink, kind = %delivery.kind, id = %delivery.id, attempts, %reason, "hook event not delivered (not retried: it would fail again)");
                    return;
                }
                Outcome::Retry { reason, .. } if retries >= config.max_retries => {
                    self.counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(hook = config.index, sink, kind = %delivery.kind, id = %delivery.id, attempts, %reason, "hook event not delivered: retries spent");
                    return;
                }
                Outcome::Retry {
                    reason,
                    retry_after,
                } => {
                    let delay = self.options.delay(retries, retry_after);
                    tracing::warn!(hook = config.index, sink, kind = %delivery.kind, id = %delivery.id, attempts, %reason, delay_ms = delay.as_millis() as u64, "hook delivery failed; retrying");
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(delay).await;
                    retries += 1;
                }
            }
        }
    }
}
