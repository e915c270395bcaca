//! A registered version made ready to serve: its weights loaded from its
//! checkpoint (the weights-only subset, every chunk verified, then the whole
//! set checked against the registered weights digest), copied by name into
//! the network `kiln_models::build` makes from the version's definition, and
//! warmed up. A language model's tokenizer comes from the registry too
//! ([`load_tokenizer`]).

use std::collections::HashMap;

use kiln_checkpoint::registry::{ModelTask, ModelVersion, Registry};
use kiln_checkpoint::{CheckpointRoot, DType, OwnedTensor, TensorView, weights_digest};
use kiln_models::Net;
use kiln_proto::spec::ModelKind;

use crate::error::ModelError;
use crate::packed::PackedMlp;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// Checkpoint tensors that hold model parameters start with this (see
/// trainer/src/state.rs: `model/{parameter}`, `optim/{buffer}/{parameter}`).
const MODEL_PREFIX: &str = "model/";

/// A network with its weights, ready for forward passes. Owned by one
/// compute thread (libtorch modules are `Send`, not `Sync`).
pub struct ServingNet {
    net: Net,
    /// Holds the parameters the network reads.
    _vs: nn::VarStore,
    /// A TorchScript module's file, kept while the module lives (shared
    /// by a version's instances).
    _script: Option<std::sync::Arc<tempfile::NamedTempFile>>,
    /// An MLP's layers with packed weights, for the row counts packed for.
    packed: Option<PackedMlp>,
    features: usize,
    classes: usize,
}

impl std::fmt::Debug for ServingNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingNet")
            .field("net", &self.net)
            .field("features", &self.features)
            .field("classes", &self.classes)
            .finish()
    }
}

impl ServingNet {
    /// Builds the network of `version` and loads its verified weights.
    /// Blocking (checkpoint reads, libtorch): call it off the async threads.
    pub fn load(registry: &Registry, version: &ModelVersion) -> Result<ServingNet, ModelError> {
        let mut nets = Self::load_instances(registry, version, 1, &[])?;
        Ok(nets.remove(0))
    }

    /// `count` copies of the network of `version` (one per compute thread),
    /// its weights read and verified once. An MLP of at least
    /// [`PACK_MIN_WEIGHT_BYTES`] of weights also gets its weights packed for
    /// passes of each of `pack_shapes` rows (see [`crate::packed`]), unless
    /// the packed copies would pass [`PACK_MAX_BYTES`]. Blocking: call it
    /// off the async threads.
    pub fn load_instances(
        registry: &Registry,
        version: &ModelVersion,
        count: usize,
        pack_shapes: &[usize],
    ) -> Result<Vec<ServingNet>, ModelError> {
        let what = format!("{}:{}", version.name, version.version);
        let root = CheckpointRoot::open(&version.checkpoint.root).map_err(|e| {
            ModelError::storage(
                format!("{what}: open checkpoint root {}", version.checkpoint.root),
                e,
            )
        })?;
        let step = version.checkpoint.step;
        let manifest = block_on(kiln_checkpoint::load::resolve_async(
            &root,
            &step.to_string(),
        ))
        .map_err(|e| {
            ModelError::storage(format!("{what}: find the checkpoint of step {step}"), e)
        })?;
        let tensors = kiln_checkpoint::load(&root, &manifest, |n| n.starts_with(MODEL_PREFIX))
            .map_err(|e| ModelError::storage(format!("{what}: load weights of step {step}"), e))?;
        let weights: Vec<OwnedTensor> = tensors
            .into_iter()
            .map(|mut t| {
                t.name = t.name[MODEL_PREFIX.len()..].to_string();
                t
            })
            .collect();
        if weights.is_empty() {
            return Err(ModelError::unservable(format!(
                "{what}: checkpoint {} holds no model weights",
                root.url_of(&manifest.key)
            )));
        }
        let views: Vec<TensorView<'_>> = weights.iter().map(|t| t.view()).collect();
        let digest = weights_digest(&views);
        if digest != version.checkpoint.digest {
            return Err(ModelError::unservable(format!(
                "{what}: the weights of checkpoint step {step} have digest {digest}, but the registry recorded {}; the checkpoint is not the one registered",
                version.checkpoint.digest
            )));
        }

        let mut spec = version.model.spec.clone();
        let script = if spec.kind == ModelKind::Torchscript {
            let bytes =
                block_on(registry.torchscript(&version.name, version.version)).map_err(|e| {
                    ModelError::storage(format!("{what}: read its TorchScript module"), e)
                })?;
            let Some(bytes) = bytes else {
                return Err(ModelError::unservable(format!(
                    "{what}: a torchscript model without a registered TorchScript module"
                )));
            };
            let mut file = tempfile::Builder::new()
                .prefix("kiln-serve-")
                .suffix(".pt")
                .tempfile()
                .map_err(|e| {
                    ModelError::internal("create a temporary file for the TorchScript module", e)
                })?;
            std::io::Write::write_all(&mut file, &bytes)
                .map_err(|e| ModelError::internal("write the TorchScript module", e))?;
            spec.path = Some(file.path().to_path_buf());
            Some(std::sync::Arc::new(file))
        } else {
            None
        };
        let (features, classes) = (version.model.features, version.model.classes);
        let io = kiln_models::ModelIo {
            features,
            classes,
            context: (version.model.task == ModelTask::LanguageModel).then_some(features),
        };
        let mut nets = Vec::with_capacity(count.max(1));
        for _ in 0..count.max(1) {
            let vs = nn::VarStore::new(Device::Cpu);
            let mut net =
                kiln_models::build_with(&spec, io, kiln_proto::spec::Precision::Fp32, &vs)
                    .map_err(|e| {
                        ModelError::unservable(format!("{what}: build the network: {e:#}"))
                    })?;
            check_task(&what, &net, version)?;
            copy_weights(&vs, &weights).map_err(|reason| {
                ModelError::unservable(format!("{what}: load weights: {reason}"))
            })?;
            if let Net::Script(module) = &mut net {
                module.set_eval();
            }
            let mut vs = vs;
            vs.freeze();
            let packed = pack_mlp(&what, &spec, &vs, &weights, pack_shapes)?;
            nets.push(ServingNet {
                net,
                _vs: vs,
                _script: script.clone(),
                packed,
                features,
                classes,
            });
        }
        Ok(nets)
    }

    /// Values per sample.
    pub fn features(&self) -> usize {
        self.features
    }

    /// Logits per sample.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The language model, if this is one.
    pub fn gpt(&self) -> Option<&kiln_models::gpt::Gpt> {
        match &self.net {
            Net::Gpt(gpt) => Some(gpt),
            _ => None,
        }
    }

    /// A language model's next-token logits after each of `rows` sequences
    /// of `len` ids (`ids`: row-major, checked against the vocabulary by the
    /// caller), as rows x vocab values: the logits of each sequence's last
    /// position.
    pub fn next_token_logits(
        &self,
        rows: usize,
        len: usize,
        ids: &[i64],
    ) -> Result<Vec<f32>, ModelError> {
        let gpt = self.gpt().ok_or_else(|| ModelError::Internal {
            reason: "next-token logits of a model that is not a language model".into(),
        })?;
        if ids.len() != rows * len {
            return Err(ModelError::Internal {
                reason: format!("{} ids for {rows} sequences of {len}", ids.len()),
            });
        }
        let x = Tensor::from_slice(ids).view([rows as i64, len as i64]);
        let last = tch::no_grad(|| gpt.next_token_logits(&x))
            .map_err(|e| ModelError::internal("forward pass", e))?;
        if last.size() != [rows as i64, self.classes as i64] {
            return Err(ModelError::unservable(format!(
                "the language model returned {:?} for {rows} sequences; expected [{rows}, {}]",
                last.size(),
                self.classes
            )));
        }
        Vec::<f32>::try_from(&last.view([-1])).map_err(|e| ModelError::internal("copy logits", e))
    }

    /// Logits of `rows` samples (`values`: rows x features, row-major), as
    /// rows x classes values. libtorch reports some failures by panicking;
    /// callers catch that.
    pub fn forward(&self, rows: usize, values: &[f32]) -> Result<Vec<f32>, ModelError> {
        if values.len() != rows * self.features {
            return Err(ModelError::Internal {
                reason: format!(
                    "{} values for {rows} rows of {} features",
                    values.len(),
                    self.features
                ),
            });
        }
        let x = Tensor::from_slice(values).view([rows as i64, self.features as i64]);
        let y = tch::no_grad(|| match &self.net {
            Net::Builtin(seq) => match &self.packed {
                Some(packed) if packed.handles(rows) => Ok(packed.forward(&x)?),
                _ => Ok(seq.forward(&x)),
            },
            Net::Script(module) => Ok(module.forward_ts(&[&x])?),
            Net::Gpt(_) => Err(anyhow::anyhow!(
                "language models are not served through infer on features"
            )),
        })
        .map_err(|e| ModelError::internal("forward pass", e))?;
        if y.size() != [rows as i64, self.classes as i64] || y.kind() != Kind::Float {
            return Err(ModelError::unservable(format!(
                "the network returned {:?} {:?} for {rows} rows; expected Float [{rows}, {}]",
                y.kind(),
                y.size(),
                self.classes
            )));
        }
        let y = y.contiguous().view([-1]);
        Vec::<f32>::try_from(&y).map_err(|e| ModelError::internal("copy logits", e))
    }
}

/// Least weight bytes of an MLP whose weights are packed: below it the
/// weights stay in cache and packing gains little.
pub const PACK_MIN_WEIGHT_BYTES: usize = 1 << 20;
/// Most bytes the packed copies of one instance may take.
pub const PACK_MAX_BYTES: usize = 1 << 30;

/// An MLP's layers `fc0..fcN` packed for `shapes` (see [`ServingNet::load_instances`]).
fn pack_mlp(
    what: &str,
    spec: &kiln_proto::spec::ModelSpec,
    vs: &nn::VarStore,
    weights: &[OwnedTensor],
    shapes: &[usize],
) -> Result<Option<PackedMlp>, ModelError> {
    let bytes: usize = weights.iter().map(|w| w.data.len()).sum();
    if spec.kind != ModelKind::Mlp
        || shapes.is_empty()
        || bytes < PACK_MIN_WEIGHT_BYTES
        || !crate::packed::available()
    {
        return Ok(None);
    }
    let vars = vs.variables();
    let layers: Vec<(Tensor, Tensor)> = (0..=spec.hidden.len())
        .map(|i| {
            let get = |part: &str| {
                vars.get(&format!("fc{i}.{part}"))
                    .map(Tensor::shallow_clone)
                    .ok_or_else(|| ModelError::Internal {
                        reason: format!("{what}: the MLP has no fc{i}.{part}"),
                    })
            };
            Ok((get("weight")?, get("bias")?))
        })
        .collect::<Result<_, ModelError>>()?;
    // What the packed copies will take, from one layer's packing: they grow
    // with the weights.
    let probe = PackedMlp::new(
        vec![(layers[0].0.shallow_clone(), layers[0].1.shallow_clone())],
        &shapes[..1],
    )
    .map_err(|e| ModelError::internal(format!("{what}: pack its weights"), e))?;
    let first = layers[0].0.numel() * 4;
    let estimate = probe.bytes() as f64 / first as f64 * bytes as f64 * shapes.len() as f64;
    if estimate > PACK_MAX_BYTES as f64 {
        tracing::info!(
            model = what,
            estimate_mb = estimate / 1e6,
            "weights not packed: the packed copies would take too much memory"
        );
        return Ok(None);
    }
    let packed = PackedMlp::new(layers, shapes)
        .map_err(|e| ModelError::internal(format!("{what}: pack its weights"), e))?;
    tracing::info!(model = what, shapes = ?packed.shapes(), packed_mb = packed.bytes() as f64 / 1e6, "weights packed for MKL's packed sgemm");
    Ok(Some(packed))
}

/// Checks that the network the spec builds is what the registry says
/// `version` is (a language model and its shapes, or a classifier).
fn check_task(what: &str, net: &Net, version: &ModelVersion) -> Result<(), ModelError> {
    let (features, classes) = (version.model.features, version.model.classes);
    if let Net::Gpt(gpt) = net {
        let cfg = gpt.config();
        if version.model.task != ModelTask::LanguageModel
            || cfg.seq_len != features
            || cfg.vocab != classes
        {
            return Err(ModelError::unservable(format!(
                "{what}: the registry describes a {:?} of {features} features and {classes} classes, but the spec builds a gpt of context {} and vocabulary {}",
                version.model.task, cfg.seq_len, cfg.vocab
            )));
        }
    } else if version.model.task != ModelTask::Classifier {
        return Err(ModelError::unservable(format!(
            "{what}: registered as a language model, but model.kind is not gpt"
        )));
    }
    Ok(())
}

/// Copies every parameter of `vs` from `weights` (same names, dtype, shape);
/// a weight the network does not have is an error too (another architecture).
/// The error says which weight does not fit.
fn copy_weights(vs: &nn::VarStore, weights: &[OwnedTensor]) -> Result<(), String> {
    let params = kiln_models::named_parameters(vs);
    let by_name: HashMap<&str, &OwnedTensor> =
        weights.iter().map(|t| (t.name.as_str(), t)).collect();
    for (name, param) in &params {
        let src = by_name.get(name.as_str()).ok_or_else(|| {
            format!("the checkpoint has no weight {name} (was it saved by another model?)")
        })?;
        let shape: Vec<i64> = src.shape.iter().map(|&d| d as i64).collect();
        if shape != param.size() || src.dtype != DType::F32 || param.kind() != Kind::Float {
            return Err(format!(
                "weight {name} is {:?} {:?}; the network expects F32 {:?}",
                src.dtype,
                src.shape,
                param.size()
            ));
        }
        let host = Tensor::from_data_size(&src.data, &shape, Kind::Float);
        tch::no_grad(|| param.detach().copy_(&host));
    }
    if params.len() != weights.len() {
        let known: std::collections::HashSet<&str> =
            params.iter().map(|(n, _)| n.as_str()).collect();
        let extra: Vec<&str> = weights
            .iter()
            .map(|t| t.name.as_str())
            .filter(|n| !known.contains(n))
            .collect();
        return Err(format!(
            "the checkpoint has weights the network does not: {} (was it saved by another model?)",
            extra.join(", ")
        ));
    }
    Ok(())
}

/// The tokenizer of a language model's `version`, from the registry; `None`
/// when the version has none. It must not make ids beyond the model's
/// vocabulary. Blocking: call it off the async threads.
pub fn load_tokenizer(
    registry: &Registry,
    version: &ModelVersion,
) -> Result<Option<kiln_text::Tokenizer>, ModelError> {
    if !version.has_tokenizer {
        return Ok(None);
    }
    let what = format!("{}:{}", version.name, version.version);
    let bytes = block_on(registry.tokenizer(&version.name, version.version))
        .map_err(|e| ModelError::storage(format!("{what}: read its tokenizer"), e))?
        .ok_or_else(|| {
            ModelError::unservable(format!(
                "{what}: the registry lists a tokenizer but has none"
            ))
        })?;
    // kiln_text reads tokenizers from files.
    let mut file = tempfile::Builder::new()
        .prefix("kiln-serve-")
        .suffix(".tokenizer.json")
        .tempfile()
        .map_err(|e| ModelError::internal("create a temporary file for the tokenizer", e))?;
    std::io::Write::write_all(&mut file, &bytes)
        .map_err(|e| ModelError::internal("write the tokenizer", e))?;
    let tokenizer = kiln_text::Tokenizer::from_file(file.path())
        .map_err(|e| ModelError::unservable(format!("{what}: load its tokenizer: {e}")))?;
    if tokenizer.vocab_size() > version.model.classes {
        return Err(ModelError::unservable(format!(
            "{what}: the tokenizer makes {} ids but the model's vocabulary is {}",
            tokenizer.vocab_size(),
            version.model.classes
        )));
    }
    Ok(Some(tokenizer))
}

/// Runs a future to completion from blocking code (the loaders run on
/// `spawn_blocking` threads, which may not block on the runtime itself).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle.block_on(f),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build a runtime for a model load")
            .block_on(f),
    }
}

/// Softmax of each row of `logits` (rows x classes), in `f32`, row by row
/// (so a row's probabilities never depend on other rows).
pub fn softmax_rows(logits: &[f32], classes: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks_exact(classes) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = row.iter().map(|&x| (x - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        out.extend(exps.iter().map(|&e| e / sum));
    }
    out
}

/// The index of each row's largest logit (the first of equals; NaN never wins).
pub fn argmax_rows(logits: &[f32], classes: usize) -> Vec<i64> {
    logits
        .chunks_exact(classes)
        .map(|row| {
            let mut best = 0;
            for (i, &x) in row.iter().enumerate() {
                if x > row[best] || row[best].is_nan() && !x.is_nan() {
                    best = i;
                }
            }
            best as i64
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_and_softmax_are_row_wise() {
        let logits = [1.0, 3.0, 3.0, f32::NAN, 0.5, -1.0];
        assert_eq!(argmax_rows(&logits, 3), vec![1, 1]);
        let p = softmax_rows(&logits[..3], 3);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(p[1], p[2]);
        assert_eq!(softmax_rows(&[2.0, 2.0], 2), vec![0.5, 0.5]);
    }
}
