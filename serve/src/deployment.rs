//! Served models: for each model name, the versions it routes to (with
//! their traffic weights), following the registry as aliases move.
//!
//! A [`Deployment`] holds its current [`Routing`] behind a lock that is held
//! only to clone an `Arc`: a request takes the routing as it is when the
//! request arrives and keeps its version alive until it is answered. A
//! watcher task reads the alias (or `latest`) every poll interval; when it
//! moved, the new versions are loaded and warmed up in the background while
//! the old ones keep serving, then the routing is replaced in one step.
//! Requests in flight finish on the version they started on; its compute
//! thread stops when the last of them is done. A version that fails to load
//! leaves the old routing in place (retried with backoff), so a bad
//! promotion never takes a model down. Rolling back is the alias moving back
//! (`Registry::rollback`): the watcher sees it like any other move.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use kiln_checkpoint::registry::{ModelVersion, Pick, Registry, Selector};
use tokio_util::sync::CancellationToken;

use crate::batcher::{BatchQueue, BatchSettings, warm_up};
use crate::drift::DriftOptions;
use crate::error::{ModelError, RequestError};
use crate::lm::LmQueue;
use crate::metrics::{Metrics, VersionLabels};
use crate::model::ServingNet;
use crate::monitor::VersionDrift;
use crate::signature::IoSpec;

/// One loaded, warmed-up version with its compute thread.
pub struct ServedVersion {
    /// Its registry record.
    pub version: ModelVersion,
    /// Its inputs and outputs, checked against the record at load time.
    pub io: IoSpec,
    /// Its compute threads and their queue.
    pub engine: Engine,
    /// Its metric labels (model name and version number).
    pub labels: VersionLabels,
    /// Drift monitoring, when the version has a reference profile.
    pub drift: Option<Arc<VersionDrift>>,
}

/// The compute thread of a version and how requests reach it.
pub enum Engine {
    /// A classifier: rows of features, dynamically batched.
    Batched(BatchQueue),
    /// A language model: token ids and generations, one at a time; with its
    /// tokenizer when the version has one (generate needs it).
    Language {
        /// Logits and generation requests for its compute threads.
        queue: LmQueue,
        /// Turns prompts into ids and ids into text; `None`: infer on
        /// token ids only.
        tokenizer: Option<Arc<kiln_text::Tokenizer>>,
    },
}

impl std::fmt::Debug for ServedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedVersion")
            .field("name", &self.version.name)
            .field("version", &self.version.version)
            .finish_non_exhaustive()
    }
}

/// What a routing was built from; the watcher rebuilds when it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoutingKey {
    /// A pinned version.
    Pinned(u64),
    /// The latest version, which was this one.
    Latest(u64),
    /// An alias at this generation.
    Alias(u64),
}

/// The versions a model's requests go to, with weights (summing to a
/// positive total; a request picks version `i` with probability
/// `weight_i / total`).
#[derive(Debug)]
pub struct Routing {
    /// Where the selector pointed when this routing was built.
    pub key: RoutingKey,
    /// Each version with its weight (non-empty).
    pub targets: Vec<(Arc<ServedVersion>, u32)>,
}

impl Routing {
    /// The version for a request that names none; `draw` is a uniform random
    /// number (the server's seeded generator).
    pub fn pick(&self, draw: u64) -> &Arc<ServedVersion> {
        let total: u64 = self.targets.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut at = draw % total.max(1);
        for (served, w) in &self.targets {
            let w = u64::from(*w);
            if at < w {
                return served;
            }
            at -= w;
        }
        &self.targets[0].0
    }

    /// The version numbered `version`, if this routing serves it.
    pub fn get(&self, version: u64) -> Option<&Arc<ServedVersion>> {
        self.targets
            .iter()
            .map(|(s, _)| s)
            .find(|s| s.version.version == version)
    }

    /// The target with the largest weight (the first of equals): the version
    /// whose metadata a request without a version sees.
    pub fn primary(&self) -> &Arc<ServedVersion> {
        let mut best = &self.targets[0];
        for t in &self.targets[1..] {
            if t.1 > best.1 {
                best = t;
            }
        }
        &best.0
    }

    /// `(version, weight)` pairs.
    pub fn weights(&self) -> Vec<(u64, u32)> {
        self.targets
            .iter()
            .map(|(s, w)| (s.version.version, *w))
            .collect()
    }

    /// Served version numbers, ascending, comma separated (for messages).
    pub fn versions_text(&self) -> String {
        let mut v: Vec<u64> = self
            .targets
            .iter()
            .map(|(s, _)| s.version.version)
            .collect();
        v.sort_unstable();
        let v: Vec<String> = v.iter().map(u64::to_string).collect();
        v.join(", ")
    }
}

/// Everything loading a version needs.
#[derive(Clone)]
pub struct Loader {
    /// Where versions, their checkpoints and blobs are read.
    pub registry: Registry,
    /// Batching and compute-thread settings of every version loaded.
    pub batch: BatchSettings,
    /// Where loaded versions report (and the watcher counts failed loads).
    pub metrics: Metrics,
    /// Drift options; `None`: drift monitoring is off.
    pub drift: Option<DriftOptions>,
    /// Least time between two evaluated windows of one version.
    pub drift_interval: std::time::Duration,
}

impl Loader {
    /// Loads, checks and warms up `version`, then starts its compute thread.
    pub async fn load(&self, version: ModelVersion) -> Result<Arc<ServedVersion>, ModelError> {
        let what = format!("{}:{}", version.name, version.version);
        let io = IoSpec::of(&version)
            .map_err(|e| ModelError::unservable(format!("{what}: check its signature: {e}")))?;
        let started = Instant::now();
        let registry = self.registry.clone();
        let batch = self.batch.clone();
        let v = version.clone();
        let language = io.is_language_model();
        let (nets, tokenizer) = tokio::task::spawn_blocking(
            move || -> Result<(Vec<ServingNet>, Option<kiln_text::Tokenizer>), ModelError> {
                if batch.threads > 0 {
                    tch::set_num_threads(batch.threads as i32);
                }
                if language {
                    let nets = ServingNet::load_instances(&registry, &v, batch.lm_instances, &[])?;
                    let tokenizer = crate::model::load_tokenizer(&registry, &v)?;
                    for net in &nets {
                        crate::lm::warm_up(net, &batch)?;
                    }
                    Ok((nets, tokenizer))
                } else {
                    let nets = ServingNet::load_instances(
                        &registry,
                        &v,
                        batch.instances,
                        &batch.packed_shapes,
                    )?;
                    for net in &nets {
                        warm_up(net, &batch)?;
                    }
                    Ok((nets, None))
                }
            },
        )
        .await
        .map_err(|e| ModelError::internal("model load task", e))??;
        let drift = self.drift(&version, &io).await;
        let labels = VersionLabels {
            model: version.name.clone(),
            version: version.version.to_string(),
        };
        let thread = format!("serve-{}", version.version);
        let engine = if language {
            if tokenizer.is_none() {
                tracing::warn!(model = %version.name, version = version.version, "language model without a tokenizer: infer on token ids only, no generate");
            }
            Engine::Language {
                queue: LmQueue::start(
                    nets,
                    self.batch.clone(),
                    self.metrics.clone(),
                    labels.clone(),
                    thread,
                )
                .map_err(|e| ModelError::internal("start the compute thread", e))?,
                tokenizer: tokenizer.map(Arc::new),
            }
        } else {
            Engine::Batched(
                BatchQueue::start(
                    nets,
                    self.batch.clone(),
                    self.metrics.clone(),
                    labels.clone(),
                    thread,
                )
                .map_err(|e| ModelError::internal("start the compute thread", e))?,
            )
        };
        tracing::info!(
            model = %version.name,
            version = version.version,
            step = version.checkpoint.step,
            took_ms = started.elapsed().as_millis() as u64,
            "model version loaded and warmed up"
        );
        Ok(Arc::new(ServedVersion {
            version,
            io,
            engine,
            labels,
            drift,
        }))
    }

    /// The drift monitor of `version`, if monitoring is on and the version
    /// has a usable reference profile. A profile that cannot be used is
    /// logged and monitoring skipped: drift is advisory, serving is not.
    async fn drift(&self, version: &ModelVersion, io: &IoSpec) -> Option<Arc<VersionDrift>> {
        let options = self.drift?;
        if !version.has_reference_profile {
            return None;
        }
        let (name, v) = (&version.name, version.version);
        let made = async {
            let bytes = self
                .registry
                .reference_profile(name, v)
                .await
                .map_err(|e| ModelError::storage("read the reference profile", e))?
                .ok_or_else(|| {
                    ModelError::unservable("the registry lists a reference profile but has none")
                })?;
            // A language model's profile has one column: a prompt token a row.
            let columns = if io.is_language_model() {
                1
            } else {
                io.features
            };
            VersionDrift::new(&bytes, columns, options)
                .map(|d| d.with_min_interval(self.drift_interval))
        }
        .await;
        match made {
            Ok(d) => Some(Arc::new(d)),
            Err(e) => {
                tracing::warn!(model = %name, version = v, error = %e, "drift monitoring off for this version");
                None
            }
        }
    }

    /// Where `selector` points now: the routing key and `(version, weight)`
    /// targets with a positive weight.
    pub async fn desired(
        &self,
        selector: &Selector,
    ) -> Result<(RoutingKey, Vec<(u64, u32)>), ModelError> {
        let name = &selector.name;
        match &selector.pick {
            Pick::Version(v) => Ok((RoutingKey::Pinned(*v), vec![(*v, 100)])),
            Pick::Latest => {
                let latest = self.registry.latest(name).await.map_err(|e| {
                    ModelError::storage(format!("read the latest version of {name}"), e)
                })?;
                match latest {
                    Some(v) => Ok((RoutingKey::Latest(v.version), vec![(v.version, 100)])),
                    None => Err(ModelError::NotFound {
                        what: format!(
                            "model {name} (no versions) in registry {}",
                            self.registry.url()
                        ),
                    }),
                }
            }
            Pick::Alias(alias) => {
                let found =
                    self.registry.alias(name, alias).await.map_err(|e| {
                        ModelError::storage(format!("read alias {name}@{alias}"), e)
                    })?;
                let Some(a) = found else {
                    return Err(ModelError::NotFound {
                        what: format!(
                            "alias {alias} of model {name} in registry {}",
                            self.registry.url()
                        ),
                    });
                };
                let targets: Vec<(u64, u32)> = a
                    .targets
                    .iter()
                    .filter(|t| t.weight > 0)
                    .map(|t| (t.version, t.weight))
                    .collect();
                if targets.is_empty() {
                    return Err(ModelError::unservable(format!(
                        "alias {name}@{alias} has no target with a positive weight"
                    )));
                }
                Ok((RoutingKey::Alias(a.generation), targets))
            }
        }
    }

    /// A routing for `targets`, reusing versions `current` already serves.
    pub async fn build(
        &self,
        name: &str,
        key: RoutingKey,
        targets: &[(u64, u32)],
        current: Option<&Routing>,
    ) -> Result<Routing, ModelError> {
        let mut out = Vec::with_capacity(targets.len());
        for &(v, weight) in targets {
            let served = match current.and_then(|r| r.get(v)) {
                Some(s) => s.clone(),
                None => {
                    let record = self.registry.version(name, v).await.map_err(|e| {
                        ModelError::storage(format!("read version {v} of {name}"), e)
                    })?;
                    self.load(record).await?
                }
            };
            out.push((served, weight));
        }
        Ok(Routing { key, targets: out })
    }
}

/// One served model.
pub struct Deployment {
    /// The model's name (the selector's).
    pub name: String,
    /// What it follows: a pinned version, `latest` or an alias.
    pub selector: Selector,
    routing: RwLock<Arc<Routing>>,
    /// Stops this deployment's watcher (unload, shutdown).
    pub cancel: CancellationToken,
}

impl std::fmt::Debug for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployment")
            .field("selector", &self.selector.to_string())
            .finish_non_exhaustive()
    }
}

/// A change of a model's versions, for events and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swap {
    /// The model's name.
    pub model: String,
    /// What it follows (`m`, `m:3`, `m@production`).
    pub selector: String,
    /// `(version, weight)` served before; empty for a first load.
    pub from: Vec<(u64, u32)>,
    /// `(version, weight)` served now.
    pub to: Vec<(u64, u32)>,
}

impl Deployment {
    /// A deployment serving `routing`.
    pub fn new(selector: Selector, routing: Routing, cancel: CancellationToken) -> Deployment {
        Deployment {
            name: selector.name.clone(),
            selector,
            routing: RwLock::new(Arc::new(routing)),
            cancel,
        }
    }

    /// The routing now.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the routing; returns what changed.
    pub fn replace(&self, routing: Routing) -> Swap {
        let to = routing.weights();
        let old = std::mem::replace(
            &mut *self.routing.write().unwrap_or_else(|e| e.into_inner()),
            Arc::new(routing),
        );
        Swap {
            model: self.name.clone(),
            selector: self.selector.to_string(),
            from: old.weights(),
            to,
        }
    }

    /// The version a request goes to: the one it names (if served), else a
    /// weighted draw.
    pub fn choose(
        &self,
        version: Option<u64>,
        draw: u64,
    ) -> Result<Arc<ServedVersion>, RequestError> {
        let routing = self.routing();
        match version {
            Some(v) => routing.get(v).cloned().ok_or_else(|| {
                RequestError::not_found(format!(
                    "version {v} of model {} is not served (serving: {})",
                    self.name,
                    routing.versions_text()
                ))
            }),
            None => Ok(routing.pick(draw).clone()),
        }
    }
}

/// Follows `deployment`'s alias (or `latest`) until cancelled, swapping when
/// it moves; `on_swap` hears of every swap and how long its loads took.
pub async fn watch(
    deployment: Arc<Deployment>,
    loader: Loader,
    poll: Duration,
    on_swap: impl Fn(&Swap, Duration) + Send + Sync + 'static,
) {
    if matches!(deployment.selector.pick, Pick::Version(_)) {
        return;
    }
    // After a failed load of a target, wait before trying it again (doubling
    // up to a minute) rather than reloading a broken version every poll.
    let mut failed: Option<(RoutingKey, Instant, Duration)> = None;
    loop {
        tokio::select! {
            _ = deployment.cancel.cancelled() => return,
            _ = tokio::time::sleep(poll) => {}
        }
        let (key, targets) = match loader.desired(&deployment.selector).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(model = %deployment.name, selector = %deployment.selector, error = %e, "cannot read where the model points; keeping the served versions");
                continue;
            }
        };
        let current = deployment.routing();
        if key == current.key {
            continue;
        }
        if let Some((k, at, wait)) = &failed
            && *k == key
            && at.elapsed() < *wait
        {
            continue;
        }
        tracing::info!(model = %deployment.name, selector = %deployment.selector, targets = ?targets, "model moved; loading its new versions");
        let started = Instant::now();
        let built = tokio::select! {
            _ = deployment.cancel.cancelled() => return,
            b = loader.build(&deployment.name, key.clone(), &targets, Some(&current)) => b,
        };
        match built {
            Ok(routing) => {
                failed = None;
                let swap = deployment.replace(routing);
                tracing::info!(model = %swap.model, from = ?swap.from, to = ?swap.to, "swapped model versions");
                on_swap(&swap, started.elapsed());
            }
            Err(e) => {
                let wait = match &failed {
                    Some((k, _, w)) if *k == key => (*w * 2).min(Duration::from_secs(60)),
                    _ => poll.max(Duration::from_secs(1)),
                };
                tracing::error!(model = %deployment.name, selector = %deployment.selector, error = %e, retry_in_ms = wait.as_millis() as u64, "cannot load the new versions; keeping the served ones");
                loader.metrics.count_load_failure(&deployment.name);
                failed = Some((key, Instant::now(), wait));
            }
        }
    }
}

/// The served models by name.
pub type Deployments = RwLock<BTreeMap<String, Arc<Deployment>>>;
