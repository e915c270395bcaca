//! kiln-models: built-in `tch::nn` networks chosen in the spec, and TorchScript
//! modules exported from Python (trained through `TrainableCModule`).
//!
//! Classifiers (mlp, cnn, a TorchScript module returning logits) map a batch of
//! flat features [n, features] to logits [n, classes]; the gpt (and a
//! TorchScript language model) maps tokens [n, t] to logits [n, t, vocab]; a
//! TorchScript module may instead return its own loss from the batch's named
//! tensors. Parameters live in a `VarStore`, named so that the weights digest
//! and exported files are stable (`fc0.weight`, `h.0.attn.c_attn.weight`, ...).
//!
//! # Layout
//!
//! - this file: [`build`] (spec -> network), [`Net`], parameter helpers.
//! - [`gpt`]: the decoder-only transformer, its KV cache and sampling.
//! - [`error`]: the crate's one [`Error`].

#![warn(missing_docs)]

pub mod error;
pub mod gpt;

pub use error::{Error, Result};
use kiln_proto::spec::{ModelKind, ModelReturns, ModelSpec, PositionKind, Precision};
use tch::nn::{self, Module, ModuleT};
use tch::{Device, Kind, Tensor};

/// A network ready to train (or, frozen, to serve).
pub enum Net {
    /// An mlp or a cnn: flat features [n, features] to logits [n, classes].
    Builtin(nn::Sequential),
    /// The decoder-only transformer: tokens [n, t] to logits [n, t, vocab].
    Gpt(gpt::Gpt),
    /// `forward` returns logits or a loss, as the spec's `model.returns` says.
    Script(tch::TrainableCModule),
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Net::Builtin(_) => f.write_str("Net::Builtin"),
            Net::Gpt(_) => f.write_str("Net::Gpt"),
            Net::Script(_) => f.write_str("Net::Script"),
        }
    }
}

impl Net {
    /// Logits for a batch of flat features (classifiers) or tokens (language
    /// models); `train` turns dropout on.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Net::Builtin(seq) => Ok(seq.forward(xs)),
            Net::Gpt(gpt) => gpt.forward_t(xs, train),
            Net::Script(m) => m
                .forward_ts(&[xs])
                .map_err(Error::torch("run the TorchScript module's forward")),
        }
    }

    /// Logits of a classifier; see [`Net::forward_t`].
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        match self {
            Net::Builtin(seq) => seq.forward(xs),
            Net::Gpt(gpt) => gpt
                .forward_t(xs, false)
                .expect("tokens within the model's context"),
            Net::Script(m) => m.forward_t(xs, true),
        }
    }

    /// A TorchScript module's own loss: `forward(batch)` with the batch's
    /// named tensors as a `Dict[str, Tensor]`, returning a scalar.
    pub fn script_loss(&self, batch: &[(String, Tensor)]) -> Result<Tensor> {
        let Net::Script(m) = self else {
            return Err(Error::config(
                "only a TorchScript module returns its own loss",
            ));
        };
        let dict = tch::IValue::GenericDict(
            batch
                .iter()
                .map(|(name, t)| {
                    (
                        tch::IValue::String(name.clone()),
                        tch::IValue::Tensor(t.shallow_clone()),
                    )
                })
                .collect(),
        );
        let names: Vec<&str> = batch.iter().map(|(n, _)| n.as_str()).collect();
        let out = m.forward_is(&[dict]).map_err(|e| {
            Error::module(
                format!("run the TorchScript module's forward on a batch of {names:?}"),
                Some(e),
            )
        })?;
        let tch::IValue::Tensor(loss) = out else {
            return Err(Error::module(
                format!(
                    "the TorchScript module returned {out:?}; with model.returns = \"loss\" it must return a scalar tensor"
                ),
                None,
            ));
        };
        if loss.numel() != 1 || !loss.is_floating_point() {
            return Err(Error::module(
                format!(
                    "the TorchScript module returned a {:?} tensor of shape {:?}; with model.returns = \"loss\" it must return a scalar loss",
                    loss.kind(),
                    loss.size()
                ),
                None,
            ));
        }
        Ok(loss.view([]).to_kind(Kind::Float))
    }
}

/// What the data gives a model: its input width and, for classifiers, the
/// number of classes; for language models, the context length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModelIo {
    /// Values per sample (classifiers).
    pub features: usize,
    /// Logits per sample (classifiers).
    pub classes: usize,
    /// Tokens per sample (language models).
    pub context: Option<usize>,
}

/// Builds the model of `spec` for `features` inputs and `classes` outputs in `vs`
/// (a classifier in fp32; see [`build_with`]).
pub fn build(spec: &ModelSpec, features: usize, classes: usize, vs: &nn::VarStore) -> Result<Net> {
    let io = ModelIo {
        features,
        classes,
        context: None,
    };
    build_with(spec, io, Precision::Fp32, vs)
}

/// Builds the model of `spec` in `vs`.
///
/// `precision = bf16` is built into the gpt (its matrix products cast the fp32
/// master weights to bfloat16, on CPU and CUDA alike). Other models refuse it:
/// libtorch's autocast is reachable from tch only for CUDA and only at its
/// default float16, which is not what the spec asks for.
pub fn build_with(
    spec: &ModelSpec,
    io: ModelIo,
    precision: Precision,
    vs: &nn::VarStore,
) -> Result<Net> {
    if precision == Precision::Bf16 && spec.kind != ModelKind::Gpt {
        return Err(Error::config(format!(
            "train.precision = \"bf16\" is built into model.kind = \"gpt\" only; \
             train {} models in fp32",
            format!("{:?}", spec.kind).to_lowercase()
        )));
    }
    let root = vs.root();
    let (f, c) = (io.features as i64, io.classes as i64);
    let (features, classes) = (io.features, io.classes);
    match spec.kind {
        ModelKind::Gpt => {
            let vocab = spec
                .vocab
                .ok_or_else(|| Error::config("model.vocab: required for a gpt"))?;
            let seq_len = spec.seq_len.or(io.context).ok_or_else(|| {
                Error::config("model.seq_len: required for a gpt (or data.seq_len)")
            })?;
            let config = gpt::GptConfig {
                vocab,
                seq_len,
                n_layer: spec.n_layer,
                n_head: spec.n_head,
                d_model: spec.d_model,
                dropout: spec.dropout,
                positions: match spec.positions {
                    PositionKind::Learned => gpt::Positions::Learned,
                    PositionKind::Rotary => gpt::Positions::Rotary,
                },
                bf16: precision == Precision::Bf16,
            };
            Ok(Net::Gpt(gpt::Gpt::new(&root, config)?))
        }
        ModelKind::Mlp => {
            let mut seq = nn::seq();
            let mut width = f;
            for (i, &h) in spec.hidden.iter().enumerate() {
                seq = seq.add(nn::linear(
                    &root / format!("fc{i}"),
                    width,
                    h as i64,
                    Default::default(),
                ));
                seq = seq.add_fn(|x| x.relu());
                width = h as i64;
            }
            let last = spec.hidden.len();
            Ok(Net::Builtin(seq.add(nn::linear(
                &root / format!("fc{last}"),
                width,
                c,
                Default::default(),
            ))))
        }
        ModelKind::Cnn => {
            let shape = input_shape(spec, features)?;
            let (channels, mut height, mut width) =
                (shape[0] as i64, shape[1] as i64, shape[2] as i64);
            let view = [-1, channels, height, width];
            let mut seq = nn::seq().add_fn(move |x| x.view(view));
            let mut in_channels = channels;
            let conv = nn::ConvConfig {
                padding: 1,
                ..Default::default()
            };
            for (i, &out) in spec.channels.iter().enumerate() {
                if height < 2 || width < 2 {
                    return Err(Error::config(format!(
                        "model.channels: {} pooling blocks shrink a {}x{} input below 1x1; use fewer blocks",
                        spec.channels.len(),
                        shape[1],
                        shape[2]
                    )));
                }
                seq = seq
                    .add(nn::conv2d(
                        &root / format!("conv{i}"),
                        in_channels,
                        out as i64,
                        3,
                        conv,
                    ))
                    .add_fn(|x| x.relu().max_pool2d_default(2));
                in_channels = out as i64;
                height /= 2;
                width /= 2;
            }
            let flat = in_channels * height * width;
            let hidden = spec.hidden[0] as i64;
            Ok(Net::Builtin(
                seq.add_fn(|x| x.flatten(1, -1))
                    .add(nn::linear(&root / "fc0", flat, hidden, Default::default()))
                    .add_fn(|x| x.relu())
                    .add(nn::linear(&root / "fc1", hidden, c, Default::default())),
            ))
        }
        ModelKind::Torchscript => {
            let path = spec
                .path
                .as_ref()
                .ok_or_else(|| Error::config("model.path: required for a torchscript model"))?;
            let mut module = tch::TrainableCModule::load(path, root).map_err(|e| {
                Error::module(
                    format!("load TorchScript module {}", path.display()),
                    Some(e),
                )
            })?;
            module.set_train();
            if spec.returns == ModelReturns::Loss || io.context.is_some() {
                // Its inputs are the batch's named tensors or tokens: checked
                // on the first step, with the batch's field names in the error.
                return Ok(Net::Script(module));
            }
            // A forward on one dummy sample checks the module fits the data now,
            // with a clear message, rather than deep inside the first step.
            let probe = Tensor::zeros([1, f], (Kind::Float, vs.device()));
            let out = tch::no_grad(|| module.forward_ts(&[probe])).map_err(|e| {
                Error::module(
                    format!(
                        "run TorchScript module {} on a [1, {features}] input",
                        path.display()
                    ),
                    Some(e),
                )
            })?;
            if out.size() != [1, c] {
                return Err(Error::module(
                    format!(
                        "TorchScript module {} returns shape {:?} for a [1, {features}] input; expected [1, {classes}] logits",
                        path.display(),
                        out.size()
                    ),
                    None,
                ));
            }
            Ok(Net::Script(module))
        }
    }
}

/// `[channels, height, width]` of one sample for convolutional models.
fn input_shape(spec: &ModelSpec, features: usize) -> Result<Vec<usize>> {
    match &spec.input_shape {
        Some(s) => {
            if s.iter().product::<usize>() != features {
                return Err(Error::config(format!(
                    "model.input_shape {s:?} holds {} values but the data has {features} features per sample",
                    s.iter().product::<usize>()
                )));
            }
            Ok(s.clone())
        }
        None => {
            let side = (features as f64).sqrt().round() as usize;
            if side * side != features {
                return Err(Error::config(format!(
                    "model.input_shape: required for cnn since {features} features are not a square image"
                )));
            }
            Ok(vec![1, side, side])
        }
    }
}

/// Trainable parameters sorted by name: the canonical order of buckets,
/// optimizer state, broadcasts and digests.
pub fn named_parameters(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut params: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    params
}

/// Parameter bytes on the CPU, contiguous, for digests and export.
pub fn to_host_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.detach().to_device(Device::Cpu).contiguous();
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut bytes, numel);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn spec(kind: ModelKind) -> ModelSpec {
        ModelSpec {
            hidden: vec![16],
            channels: vec![4, 8],
            ..ModelSpec::new(kind)
        }
    }

    #[test]
    fn builtin_models_map_features_to_logits() {
        for kind in [ModelKind::Mlp, ModelKind::Cnn] {
            let vs = nn::VarStore::new(Device::Cpu);
            let net = build(&spec(kind), 64, 10, &vs).unwrap();
            let out = net.forward(&Tensor::ones([5, 64], (Kind::Float, Device::Cpu)));
            assert_eq!(out.size(), [5, 10], "{kind:?}");
            let names: Vec<String> = named_parameters(&vs).into_iter().map(|(n, _)| n).collect();
            assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted: {names:?}");
            assert!(names.contains(&"fc0.weight".to_string()), "{names:?}");
        }
    }

    #[test]
    fn cnn_rejects_shapes_it_cannot_use() {
        let vs = nn::VarStore::new(Device::Cpu);
        let err = build(&spec(ModelKind::Cnn), 60, 10, &vs)
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.input_shape"), "{err}");
        let mut s = spec(ModelKind::Cnn);
        s.channels = vec![4, 4, 4, 4];
        let err = build(&s, 64, 10, &vs).unwrap_err().to_string();
        assert!(err.contains("model.channels"), "{err}");
    }

    #[test]
    fn torchscript_fixture_trains_and_checks_its_shape() {
        let path = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo"))
            .join("../examples/torchscript/model.pt");
        let mut s = spec(ModelKind::Torchscript);
        s.path = Some(path);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = build(&s, 64, 10, &vs).unwrap();
        assert!(!named_parameters(&vs).is_empty());
        let out = net.forward(&Tensor::ones([3, 64], (Kind::Float, Device::Cpu)));
        assert_eq!(out.size(), [3, 10]);
        let vs2 = nn::VarStore::new(Device::Cpu);
        let err = format!("{:#}", build(&s, 64, 7, &vs2).unwrap_err());
        assert!(err.contains("expected [1, 7] logits"), "{err}");
    }
}
