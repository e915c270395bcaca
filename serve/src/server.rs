//! The server's shared state and what both protocols do with it: the
//! inference path, generation, metadata, model (un)loading. The front ends
//! ([`crate::http`], [`crate::grpc`]) call into it; [`crate::app`] starts
//! it and routes the port to them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_checkpoint::registry::{Registry, Selector};
use kiln_hooks::Hooks;
use kiln_hooks::event::VersionSwapped;
use tokio_util::sync::CancellationToken;

use crate::batcher::{Job, JobOutput};
use crate::config::{ServeConfig, Tokens};
use crate::deployment::{Deployment, Deployments, Engine, Loader, Swap, watch};
use crate::error::{ErrorKind, ModelError, RequestError};
use crate::generate::GenerateRequest;
use crate::lm::{GenerateEvent, GenerateJob, LmJob};
use crate::metrics::{Metrics, RequestLabels, UNKNOWN_MODEL};
use crate::model::{argmax_rows, softmax_rows};
use crate::protocol::{
    InferRequest, InferResponse, OutputData, OutputTensor, decode_inputs, decode_token_ids,
};
use crate::signature::OutputKind;

/// Which front end a request came through (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// REST (the protocol's HTTP/JSON binding, binary extension included).
    Http,
    /// gRPC (`inference.GRPCInferenceService`).
    Grpc,
}

impl Protocol {
    /// The `protocol` label.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
        }
    }
}

/// State shared by every request.
pub struct ServerState {
    /// The settings it started with.
    pub config: ServeConfig,
    /// The registry models are served from.
    pub registry: Registry,
    /// The tokens read at start (from files or the environment).
    pub tokens: Tokens,
    /// Every metric `/metrics` exports.
    pub metrics: Metrics,
    /// Loads versions (at start, on management loads, on swaps).
    pub loader: Loader,
    /// The served models by name.
    pub deployments: Deployments,
    /// Where `version.swapped` and `drift.detected` events go.
    pub hooks: Hooks,
    /// Set once every configured model is loaded.
    pub ready: AtomicBool,
    /// State of the splitmix64 generator behind canary draws.
    pub(crate) rng: Mutex<u64>,
    /// Stops the listener and every watcher.
    pub cancel: CancellationToken,
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState")
            .field("registry", &self.registry.url())
            .finish_non_exhaustive()
    }
}

impl ServerState {
    /// A uniform 64-bit draw from the server's seeded generator (splitmix64).
    pub fn draw(&self) -> u64 {
        let mut state = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// The deployment serving `name`.
    pub fn deployment(&self, name: &str) -> Result<Arc<Deployment>, RequestError> {
        self.deployments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| {
                RequestError::not_found(format!("model {name:?} is not served by this server"))
            })
    }

    /// Every deployment, by name.
    pub fn all_deployments(&self) -> BTreeMap<String, Arc<Deployment>> {
        self.deployments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the server is ready: started, and every model loaded.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.cancel.is_cancelled()
    }

    /// Runs one inference request, from any front end; records its metrics.
    /// `received` is when the request arrived.
    pub async fn infer(
        &self,
        model: &str,
        version: Option<&str>,
        request: InferRequest,
        protocol: Protocol,
        received: Instant,
    ) -> Result<InferResponse, RequestError> {
        let mut labels = self.request_labels(model, true, protocol);
        let result = self
            .infer_inner(model, version, request, &mut labels, received)
            .await;
        match &result {
            Ok(_) => self.metrics.observe_request(&labels, received.elapsed()),
            Err(e) => self.record_error(&labels, e, received),
        }
        result
    }

    /// The labels of a request for `model` before a version is chosen. The
    /// model's name becomes a label only when the request passed its token
    /// check and the model is served; anything else is
    /// [`crate::metrics::UNKNOWN_MODEL`], so that clients cannot add series.
    pub fn request_labels(
        &self,
        model: &str,
        authenticated: bool,
        protocol: Protocol,
    ) -> RequestLabels {
        let served = authenticated
            && self
                .deployments
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(model);
        RequestLabels {
            model: if served { model } else { UNKNOWN_MODEL }.to_string(),
            version: String::new(),
            protocol: protocol.label().to_string(),
        }
    }

    /// Counts a failed request (also those that fail before [`Self::infer`]).
    pub fn record_error(&self, labels: &RequestLabels, e: &RequestError, received: Instant) {
        self.metrics
            .observe_error(labels, e.label(), received.elapsed());
        if e.kind == ErrorKind::Internal {
            tracing::error!(model = %labels.model, version = %labels.version, error = %e.message, "inference failed");
        } else {
            tracing::debug!(model = %labels.model, error = %e.message, "request refused");
        }
    }

    async fn infer_inner(
        &self,
        model: &str,
        version: Option<&str>,
        request: InferRequest,
        labels: &mut RequestLabels,
        received: Instant,
    ) -> Result<InferResponse, RequestError> {
        let version = parse_version(version)?;
        let deployment = self.deployment(model)?;
        let served = deployment.choose(version, self.draw())?;
        labels.version = served.labels.version.clone();
        let io = &served.io;

        // Which outputs, in which order, and which of them as binary data.
        let requested: Vec<(&crate::signature::OutputSpec, bool)> = match &request.outputs {
            None => io
                .outputs
                .iter()
                .map(|o| (o, request.binary_output))
                .collect(),
            Some(list) => {
                let mut out = Vec::with_capacity(list.len());
                for r in list {
                    let spec = io.output(&r.name).ok_or_else(|| {
                        RequestError::bad_request(format!(
                            "unknown output {:?}; the model's outputs are {}",
                            r.name,
                            io.output_names()
                        ))
                    })?;
                    if out
                        .iter()
                        .any(|(o, _): &(&crate::signature::OutputSpec, bool)| o.name == r.name)
                    {
                        return Err(RequestError::bad_request(format!(
                            "output {} is requested twice",
                            r.name
                        )));
                    }
                    out.push((spec, r.binary.unwrap_or(request.binary_output)));
                }
                out
            }
        };

        let limit = self.config.request_timeout();
        let limit = request.timeout.map_or(limit, |t| t.min(limit));
        let deadline = received + limit;
        let max_rows = self.config.limits.max_request_rows;
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<JobOutput, RequestError>>();
        let (rows, drift_inputs) = match &served.engine {
            Engine::Batched(queue) => {
                let input = decode_inputs(io, &request.inputs, max_rows)?;
                let rows = input.rows;
                // Drift monitoring needs the inputs after the compute thread took them.
                let drift_inputs = served.drift.as_ref().map(|_| input.values.clone());
                // A lone request runs here and now (the queue's `inline_when_idle`).
                queue.run_or_submit(Job {
                    rows,
                    values: input.values,
                    enqueued: Instant::now(),
                    reply: tx,
                })?;
                (rows, drift_inputs)
            }
            Engine::Language { queue, .. } => {
                let tokens = decode_token_ids(io, &request.inputs, max_rows)?;
                let rows = tokens.rows;
                // A language model's drift column is the token: every id a row.
                let drift_inputs = served
                    .drift
                    .as_ref()
                    .map(|_| tokens.ids.iter().map(|&t| t as f32).collect());
                queue.submit(LmJob::Logits {
                    len: tokens.len,
                    job: Job {
                        rows: tokens.rows,
                        values: tokens.ids,
                        enqueued: Instant::now(),
                        reply: tx,
                    },
                })?;
                (rows, drift_inputs)
            }
        };
        let out = match tokio::time::timeout_at(deadline.into(), rx).await {
            Err(_) => {
                return Err(RequestError::new(
                    ErrorKind::Timeout,
                    format!("the request did not finish within {} ms", limit.as_millis()),
                ));
            }
            Ok(Err(_)) => return Err(RequestError::internal("the compute thread stopped")),
            Ok(Ok(r)) => r?,
        };

        let classes = io.classes;
        let predictions = argmax_rows(&out.logits, classes);
        if let (Some(drift), Some(inputs)) = (&served.drift, drift_inputs) {
            // Off the request's path: the rows join the drift window in a
            // task that runs once this request's answer is on its way.
            let (drift, predictions) = (drift.clone(), predictions.clone());
            let (labels, metrics, hooks) = (
                served.labels.clone(),
                self.metrics.clone(),
                self.hooks.clone(),
            );
            tokio::spawn(async move {
                let windows = drift.observe(&inputs, &predictions);
                crate::monitor::evaluate_in_background(drift, windows, labels, metrics, hooks);
            });
        }
        let mut outputs = Vec::with_capacity(requested.len());
        for (spec, binary) in requested {
            let (shape, data) = match spec.kind {
                OutputKind::Logits => (
                    vec![rows as i64, classes as i64],
                    OutputData::F32(out.logits.clone()),
                ),
                OutputKind::Probabilities => (
                    vec![rows as i64, classes as i64],
                    OutputData::F32(softmax_rows(&out.logits, classes)),
                ),
                OutputKind::Predictions => {
                    (vec![rows as i64], OutputData::I64(predictions.clone()))
                }
            };
            outputs.push(OutputTensor {
                name: spec.name.clone(),
                datatype: spec.datatype,
                shape,
                data,
                binary,
            });
        }
        Ok(InferResponse {
            model_name: model.to_string(),
            model_version: served.version.version.to_string(),
            id: request.id,
            outputs,
            compute: out.compute,
        })
    }

    /// Starts a generation (Triton's generate extension) on a language model:
    /// checks the parameters, tokenizes the prompt on the blocking pool and
    /// queues the generation for the version's compute thread. Errors before
    /// generation starts are counted here; the caller reports how the
    /// generation ended with [`Self::record_success`] or [`Self::record_error`]
    /// on the returned labels.
    pub async fn generate(
        &self,
        model: &str,
        version: Option<&str>,
        request: GenerateRequest,
        received: Instant,
    ) -> Result<Generation, RequestError> {
        let mut labels = self.request_labels(model, true, Protocol::Http);
        let result = self
            .generate_inner(model, version, request, &mut labels, received)
            .await;
        if let Err(e) = &result {
            self.record_error(&labels, e, received);
        }
        result
    }

    async fn generate_inner(
        &self,
        model: &str,
        version: Option<&str>,
        request: GenerateRequest,
        labels: &mut RequestLabels,
        received: Instant,
    ) -> Result<Generation, RequestError> {
        let version = parse_version(version)?;
        let deployment = self.deployment(model)?;
        let served = deployment.choose(version, self.draw())?;
        labels.version = served.labels.version.clone();
        let what = format!("model {model} version {}", served.version.version);
        let Engine::Language { queue, tokenizer } = &served.engine else {
            return Err(RequestError::bad_request(format!(
                "{what} is not a language model; generate serves language models (use infer)"
            )));
        };
        let Some(tokenizer) = tokenizer.clone() else {
            return Err(RequestError::bad_request(format!(
                "{what} was registered without a tokenizer, so it cannot turn text into tokens; use infer on input_ids"
            )));
        };
        let (context, vocab) = (served.io.features, served.io.classes);
        let params = request.params(context, vocab, self.draw())?;
        if request.text_input.is_empty() {
            return Err(RequestError::bad_request(
                "text_input is empty; give the text to continue",
            ));
        }
        let text = request.text_input;
        let encoder = tokenizer.clone();
        let ids = tokio::task::spawn_blocking(move || encoder.encode(&text))
            .await
            .map_err(|e| RequestError::internal(format!("tokenizer task: {e}")))?
            .map_err(|e| RequestError::bad_request(format!("tokenize text_input: {e}")))?;
        if ids.is_empty() {
            return Err(RequestError::bad_request(
                "text_input makes no tokens; give the text to continue",
            ));
        }
        if ids.len() > context {
            return Err(RequestError::bad_request(format!(
                "text_input is {} tokens; the model's context is {context} tokens (and generation needs room after the prompt)",
                ids.len()
            )));
        }
        self.metrics.observe_prompt(&served.labels, ids.len());
        if let Some(drift) = &served.drift {
            let tokens: Vec<f32> = ids.iter().map(|&t| t as f32).collect();
            let windows = drift.observe(&tokens, &[]);
            crate::monitor::evaluate_in_background(
                drift.clone(),
                windows,
                served.labels.clone(),
                self.metrics.clone(),
                self.hooks.clone(),
            );
        }
        let deadline = received + self.config.request_timeout();
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        queue.submit(LmJob::Generate(GenerateJob {
            prompt: ids.into_iter().map(i64::from).collect(),
            params,
            tokenizer,
            deadline,
            enqueued: Instant::now(),
            events,
        }))?;
        Ok(Generation {
            model_name: model.to_string(),
            model_version: served.version.version.to_string(),
            labels: labels.clone(),
            deadline,
            events: rx,
        })
    }

    /// Counts an answered request.
    pub fn record_success(&self, labels: &RequestLabels, received: Instant) {
        self.metrics.observe_request(labels, received.elapsed());
    }

    /// Loads (or reloads) the model `selector` names and starts following it;
    /// returns when it is ready. Replaces a deployment of the same name.
    pub async fn load_model(self: &Arc<Self>, selector: Selector) -> Result<(), ModelError> {
        let started = Instant::now();
        let current = self.deployment(&selector.name).ok();
        let (key, targets) = self.loader.desired(&selector).await?;
        let current_routing = current.as_ref().map(|d| d.routing());
        let routing = self
            .loader
            .build(&selector.name, key, &targets, current_routing.as_deref())
            .await?;
        let deployment = Arc::new(Deployment::new(
            selector.clone(),
            routing,
            self.cancel.child_token(),
        ));
        let swap = Swap {
            model: selector.name.clone(),
            selector: selector.to_string(),
            from: current_routing.map(|r| r.weights()).unwrap_or_default(),
            to: deployment.routing().weights(),
        };
        let old = self
            .deployments
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(selector.name.clone(), deployment.clone());
        if let Some(old) = old {
            old.cancel.cancel();
        }
        self.on_swap(&swap, started.elapsed());
        let state = Arc::downgrade(self);
        let poll = self.config.poll_interval();
        tokio::spawn(watch(
            deployment,
            self.loader.clone(),
            poll,
            move |swap: &Swap, took: Duration| {
                if let Some(state) = state.upgrade() {
                    state.on_swap(swap, took);
                }
            },
        ));
        Ok(())
    }

    /// Stops serving `name`; requests in flight finish. False if not served.
    pub fn unload_model(&self, name: &str) -> bool {
        let removed = self
            .deployments
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        match removed {
            Some(d) => {
                d.cancel.cancel();
                let gone: Vec<u64> = d.routing().weights().iter().map(|(v, _)| *v).collect();
                self.metrics.set_weights(name, &[], &gone);
                tracing::info!(model = name, "model unloaded");
                true
            }
            None => false,
        }
    }

    /// Metrics and events of a change of served versions.
    fn on_swap(&self, swap: &Swap, took: Duration) {
        let previous: Vec<u64> = swap.from.iter().map(|(v, _)| *v).collect();
        self.metrics.set_weights(&swap.model, &swap.to, &previous);
        if swap.from.is_empty() {
            return;
        }
        self.metrics.count_swap(&swap.model);
        let primary = |t: &[(u64, u32)]| {
            t.iter()
                .copied()
                .reduce(|a, b| if b.1 > a.1 { b } else { a })
                .map(|(v, _)| v)
        };
        let alias = swap.selector.split_once('@').map(|(_, a)| a.to_string());
        if let Some(to_version) = primary(&swap.to) {
            self.hooks.emit(kiln_hooks::Event::of(
                "kiln-serve",
                &VersionSwapped {
                    model: swap.model.clone(),
                    alias,
                    from_version: primary(&swap.from),
                    to_version,
                    load_secs: took.as_secs_f64(),
                },
            ));
        }
    }
}

/// A generation under way: its version and the events its compute thread
/// sends (pieces, then `Done` or `Failed`).
#[derive(Debug)]
pub struct Generation {
    /// The model asked for.
    pub model_name: String,
    /// The version generating, in decimal.
    pub model_version: String,
    /// For the request's metrics when it ends.
    pub labels: RequestLabels,
    /// When the request's time limit passes.
    pub deadline: Instant,
    /// Pieces, then `Done` or `Failed`; dropping it stops the generation.
    pub events: tokio::sync::mpsc::UnboundedReceiver<GenerateEvent>,
}

/// A tensor's name, datatype and shape, as metadata lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TensorMetadata {
    /// The tensor's name.
    pub name: String,
    /// Its datatype as the protocol spells it (`FP32`, `INT64`).
    pub datatype: String,
    /// Its shape; `-1` is a variable dimension (the batch first).
    pub shape: Vec<i64>,
}

/// What `GET /v2/models/{name}[/versions/{v}]` and gRPC `ModelMetadata` say.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModelMetadata {
    /// The model's name.
    pub name: String,
    /// The version asked for, or every served version, ascending.
    pub versions: Vec<String>,
    /// Always [`PLATFORM`].
    pub platform: String,
    /// The one input of the version described (the primary one when no
    /// version was asked for).
    pub inputs: Vec<TensorMetadata>,
    /// Its outputs.
    pub outputs: Vec<TensorMetadata>,
}

/// The `platform` of every kiln model: libtorch through kiln.
pub const PLATFORM: &str = "kiln_libtorch";

/// Protocol extensions the server implements.
pub const EXTENSIONS: &[&str] = &["binary_tensor_data", "model_repository", "generate"];

impl ServerState {
    /// Metadata of a model (its primary version's tensors, every served
    /// version) or of one served version.
    pub fn model_metadata(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<ModelMetadata, RequestError> {
        let version = parse_version(version)?;
        let deployment = self.deployment(name)?;
        let routing = deployment.routing();
        let (served, versions) = match version {
            Some(_) => {
                let s = deployment.choose(version, 0)?;
                let v = vec![s.version.version.to_string()];
                (s, v)
            }
            None => {
                let mut v: Vec<u64> = routing.weights().iter().map(|(v, _)| *v).collect();
                v.sort_unstable();
                (
                    routing.primary().clone(),
                    v.iter().map(u64::to_string).collect(),
                )
            }
        };
        let io = &served.io;
        Ok(ModelMetadata {
            name: name.to_string(),
            versions,
            platform: PLATFORM.to_string(),
            inputs: vec![TensorMetadata {
                name: io.input.name.clone(),
                datatype: io.input.datatype.to_string(),
                shape: io.input.shape.clone(),
            }],
            outputs: io
                .outputs
                .iter()
                .map(|o| TensorMetadata {
                    name: o.name.clone(),
                    datatype: o.datatype.to_string(),
                    shape: o.shape.clone(),
                })
                .collect(),
        })
    }

    /// Whether a model (or one version of it) is ready: served and loaded.
    /// An unknown model is an error (404), a known one not ready is `false`.
    pub fn model_ready(&self, name: &str, version: Option<&str>) -> Result<bool, RequestError> {
        let version = parse_version(version)?;
        let deployment = self.deployment(name)?;
        Ok(match version {
            Some(v) => deployment.routing().get(v).is_some(),
            None => true,
        } && !self.cancel.is_cancelled())
    }
}

fn parse_version(version: Option<&str>) -> Result<Option<u64>, RequestError> {
    match version.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|&v| v >= 1)
            .map(Some)
            .ok_or_else(|| {
                RequestError::bad_request(format!(
                    "model version {v:?} must be a whole number from 1"
                ))
            }),
    }
}
