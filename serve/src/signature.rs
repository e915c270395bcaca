//! What a served version takes and gives: its registered signature, checked
//! against what the server can compute.
//!
//! kiln's models map a batch of flat features `[n, features]` to logits
//! `[n, classes]`. A version's signature names its one input (name, datatype,
//! shape with `-1` for the batch) and its outputs. The server computes three
//! outputs, by name:
//!
//! - `logits`: `FP32 [-1, classes]`, the network's output;
//! - `probabilities`: `FP32 [-1, classes]`, the softmax of the logits;
//! - `predictions`: `INT64 [-1]`, the class with the highest logit (the first
//!   of equals).
//!
//! A version serves the outputs its signature lists, plus `predictions`
//! whether listed or not (class ids are what most callers want, and they cost
//! nothing next to the logits). A signature naming any other output, or an
//! input the model cannot take, is refused when the version is loaded, not
//! when the first request arrives.
//!
//! Language models take token ids instead: one integer input (`input_ids`,
//! `INT64 [-1, -1]`: a batch of sequences of 1 to `context` tokens) and give
//! the same three outputs for the position after each sequence's last token
//! (`logits` `[-1, vocab]`, `predictions`: the most likely next token).

use crate::error::ModelError;
use kiln_checkpoint::registry::{ModelTask, ModelVersion, Signature, TensorSignature};

use crate::datatype::Datatype;

/// The one input of a served version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputSpec {
    /// The name requests must give it (`input`, `input_ids`, ...).
    pub name: String,
    /// The datatype requests must send, as registered (features are
    /// converted to `f32`; token ids are `INT64` or `INT32`).
    pub datatype: Datatype,
    /// As registered; `-1` (only first) is the batch dimension.
    pub shape: Vec<i64>,
}

/// What an output holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// The network's output, `FP32 [-1, classes]`.
    Logits,
    /// The softmax of the logits, `FP32 [-1, classes]`.
    Probabilities,
    /// The class (or next token) with the highest logit, `INT64 [-1]`.
    Predictions,
}

/// One output of a served version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSpec {
    /// `logits`, `probabilities` or `predictions`.
    pub name: String,
    /// What the server computes for it.
    pub kind: OutputKind,
    /// As registered (checked to be what `kind` gives).
    pub datatype: Datatype,
    /// As registered; `-1` first is the batch dimension.
    pub shape: Vec<i64>,
}

/// The inputs and outputs of a served version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoSpec {
    /// The one input.
    pub input: InputSpec,
    /// The outputs served: the signature's, plus `predictions` always.
    pub outputs: Vec<OutputSpec>,
    /// Values per sample the network takes (the product of the input's
    /// non-batch dimensions); for a language model, its context: the most
    /// tokens per sequence.
    pub features: usize,
    /// Logits per sample (a language model's vocabulary).
    pub classes: usize,
    /// Classifier (features in) or language model (token ids in).
    pub task: ModelTask,
}

/// The name of the always-served class id output.
pub const PREDICTIONS: &str = "predictions";

impl IoSpec {
    /// The spec of `version`: its signature checked against its model
    /// definition; an empty signature means kiln's classifier signature.
    /// A signature or definition the server cannot serve is
    /// [`ModelError::Unservable`], its message naming the field
    /// (`signature.outputs[1]: ...`); so are the two constructors' refusals.
    pub fn of(version: &ModelVersion) -> Result<IoSpec, ModelError> {
        let (features, classes) = (version.model.features, version.model.classes);
        match version.model.task {
            ModelTask::Classifier => Self::from_signature(&version.signature, features, classes),
            ModelTask::LanguageModel => Self::language_model(&version.signature, features, classes),
        }
    }

    /// The spec of a language model's signature: a context of `context`
    /// tokens over `vocab` ids. An empty signature means kiln's
    /// (`Signature::language_model`).
    pub fn language_model(
        sig: &Signature,
        context: usize,
        vocab: usize,
    ) -> Result<IoSpec, ModelError> {
        if context == 0 || vocab == 0 {
            return Err(ModelError::unservable(format!(
                "model definition: the context ({context}) and the vocabulary ({vocab}) must be at least 1"
            )));
        }
        let default;
        let sig = if sig.inputs.is_empty() && sig.outputs.is_empty() {
            default = Signature::language_model(vocab);
            &default
        } else {
            sig
        };
        if sig.inputs.len() != 1 {
            return Err(ModelError::unservable(format!(
                "signature: a language model takes one input tensor (token ids); this one lists {} ({})",
                sig.inputs.len(),
                names(&sig.inputs)
            )));
        }
        let t = &sig.inputs[0];
        let datatype = match Datatype::parse(&t.datatype) {
            Some(d @ (Datatype::Int64 | Datatype::Int32)) => d,
            _ => {
                return Err(ModelError::unservable(format!(
                    "signature.inputs[0]: a language model's token ids are INT64 or INT32, not {}",
                    t.datatype
                )));
            }
        };
        let sequences = t.shape.len() == 2
            && t.shape[0] == -1
            && (t.shape[1] == -1 || (1..=context as i64).contains(&t.shape[1]));
        if !sequences {
            return Err(ModelError::unservable(format!(
                "signature.inputs[0]: shape {:?} must be [-1, -1] (a batch of sequences of up to {context} tokens)",
                t.shape
            )));
        }
        let input = InputSpec {
            name: t.name.clone(),
            datatype,
            shape: t.shape.clone(),
        };
        Self::finish(input, sig, context, vocab, ModelTask::LanguageModel)
    }

    /// The spec of a signature for a model of `features` inputs and `classes`
    /// outputs.
    pub fn from_signature(
        sig: &Signature,
        features: usize,
        classes: usize,
    ) -> Result<IoSpec, ModelError> {
        if features == 0 || classes == 0 {
            return Err(ModelError::unservable(format!(
                "model definition: features ({features}) and classes ({classes}) must be at least 1"
            )));
        }
        let default;
        let sig = if sig.inputs.is_empty() && sig.outputs.is_empty() {
            default = Signature::classifier(features, classes);
            &default
        } else {
            sig
        };
        if sig.inputs.len() != 1 {
            return Err(ModelError::unservable(format!(
                "signature: kiln serves models of one input tensor; this one lists {} ({})",
                sig.inputs.len(),
                names(&sig.inputs)
            )));
        }
        let input = input_spec(&sig.inputs[0], features)?;
        Self::finish(input, sig, features, classes, ModelTask::Classifier)
    }

    /// The outputs of `sig` (plus `predictions`) beside `input`.
    fn finish(
        input: InputSpec,
        sig: &Signature,
        features: usize,
        classes: usize,
        task: ModelTask,
    ) -> Result<IoSpec, ModelError> {
        let mut outputs = Vec::new();
        for (i, o) in sig.outputs.iter().enumerate() {
            let spec = output_spec(i, o, classes)?;
            if outputs.iter().any(|x: &OutputSpec| x.name == spec.name) {
                return Err(ModelError::unservable(format!(
                    "signature.outputs[{i}]: output {} is listed twice",
                    spec.name
                )));
            }
            outputs.push(spec);
        }
        if !outputs.iter().any(|o| o.kind == OutputKind::Predictions) {
            outputs.push(OutputSpec {
                name: PREDICTIONS.to_string(),
                kind: OutputKind::Predictions,
                datatype: Datatype::Int64,
                shape: vec![-1],
            });
        }
        if input.name == PREDICTIONS || outputs.iter().any(|o| o.name == input.name) {
            return Err(ModelError::unservable(format!(
                "signature: input {} has the name of an output",
                input.name
            )));
        }
        Ok(IoSpec {
            input,
            outputs,
            features,
            classes,
            task,
        })
    }

    /// Whether the version is a language model (token ids in).
    pub fn is_language_model(&self) -> bool {
        self.task == ModelTask::LanguageModel
    }

    /// The output called `name`.
    pub fn output(&self, name: &str) -> Option<&OutputSpec> {
        self.outputs.iter().find(|o| o.name == name)
    }

    /// Output names, comma separated (for messages).
    pub fn output_names(&self) -> String {
        let names: Vec<&str> = self.outputs.iter().map(|o| o.name.as_str()).collect();
        names.join(", ")
    }
}

fn names(list: &[TensorSignature]) -> String {
    let names: Vec<&str> = list.iter().map(|t| t.name.as_str()).collect();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

fn input_spec(t: &TensorSignature, features: usize) -> Result<InputSpec, ModelError> {
    let Some(datatype) = Datatype::parse(&t.datatype) else {
        return Err(ModelError::unservable(format!(
            "signature.inputs[0]: datatype {} is not served; allowed: BOOL, UINT8, INT8, INT16, INT32, INT64, FP16, BF16, FP32, FP64",
            t.datatype
        )));
    };
    if t.shape.len() < 2 || t.shape[0] != -1 {
        return Err(ModelError::unservable(format!(
            "signature.inputs[0]: shape {:?} must start with -1 (the batch) and have at least one more dimension",
            t.shape
        )));
    }
    if t.shape[1..].iter().any(|&d| d < 1) {
        return Err(ModelError::unservable(format!(
            "signature.inputs[0]: shape {:?}: only the first (batch) dimension may be -1; the others must be at least 1",
            t.shape
        )));
    }
    let per_sample: i64 = t.shape[1..].iter().product();
    if per_sample != features as i64 {
        return Err(ModelError::unservable(format!(
            "signature.inputs[0]: shape {:?} holds {per_sample} values per sample but the model takes {features}",
            t.shape
        )));
    }
    Ok(InputSpec {
        name: t.name.clone(),
        datatype,
        shape: t.shape.clone(),
    })
}

fn output_spec(i: usize, t: &TensorSignature, classes: usize) -> Result<OutputSpec, ModelError> {
    let (kind, datatype, shape) = match t.name.as_str() {
        "logits" => (OutputKind::Logits, Datatype::Fp32, vec![-1, classes as i64]),
        "probabilities" => (
            OutputKind::Probabilities,
            Datatype::Fp32,
            vec![-1, classes as i64],
        ),
        PREDICTIONS => (OutputKind::Predictions, Datatype::Int64, vec![-1]),
        other => {
            return Err(ModelError::unservable(format!(
                "signature.outputs[{i}]: kiln serves outputs logits, probabilities and predictions; {other} is none of them"
            )));
        }
    };
    if t.datatype != datatype.as_str() {
        return Err(ModelError::unservable(format!(
            "signature.outputs[{i}]: {} is {datatype}, not {}",
            t.name, t.datatype
        )));
    }
    if t.shape != shape {
        return Err(ModelError::unservable(format!(
            "signature.outputs[{i}]: {} has shape {shape:?} for this model, not {:?}",
            t.name, t.shape
        )));
    }
    Ok(OutputSpec {
        name: t.name.clone(),
        kind,
        datatype,
        shape,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(name: &str, datatype: &str, shape: &[i64]) -> TensorSignature {
        TensorSignature {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn classifier_signature_serves_logits_and_predictions() {
        let io = IoSpec::from_signature(&Signature::classifier(64, 10), 64, 10).unwrap();
        assert_eq!(io.input.name, "input");
        assert_eq!(io.input.datatype, Datatype::Fp32);
        assert_eq!(io.output_names(), "logits, predictions");
        assert_eq!(io.output("predictions").unwrap().shape, vec![-1]);
        let empty = Signature {
            inputs: vec![],
            outputs: vec![],
        };
        assert_eq!(IoSpec::from_signature(&empty, 64, 10).unwrap(), io);
    }

    #[test]
    fn image_shaped_inputs_and_probabilities() {
        let sig = Signature {
            inputs: vec![ts("image", "UINT8", &[-1, 1, 8, 8])],
            outputs: vec![
                ts("probabilities", "FP32", &[-1, 10]),
                ts("predictions", "INT64", &[-1]),
            ],
        };
        let io = IoSpec::from_signature(&sig, 64, 10).unwrap();
        assert_eq!(io.input.datatype, Datatype::Uint8);
        assert_eq!(io.output_names(), "probabilities, predictions");
    }

    #[test]
    fn language_models_take_token_ids_of_any_length_up_to_the_context() {
        let io = IoSpec::language_model(&Signature::language_model(256), 32, 256).unwrap();
        assert!(io.is_language_model());
        assert_eq!(io.input.name, "input_ids");
        assert_eq!(io.input.datatype, Datatype::Int64);
        assert_eq!(io.input.shape, [-1, -1]);
        assert_eq!(io.output_names(), "logits, predictions");
        assert_eq!(io.output("logits").unwrap().shape, [-1, 256]);
        assert_eq!((io.features, io.classes), (32, 256));
        let bad = |sig: Signature, want: &str| {
            let e = IoSpec::language_model(&sig, 32, 256)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e} does not contain {want}");
        };
        let logits = vec![ts("logits", "FP32", &[-1, 256])];
        bad(
            Signature {
                inputs: vec![ts("input_ids", "FP32", &[-1, -1])],
                outputs: logits.clone(),
            },
            "INT64 or INT32, not FP32",
        );
        bad(
            Signature {
                inputs: vec![ts("input_ids", "INT64", &[-1, 33])],
                outputs: logits.clone(),
            },
            "up to 32 tokens",
        );
        bad(
            Signature {
                inputs: vec![ts("input_ids", "INT64", &[-1, -1])],
                outputs: vec![ts("logits", "FP32", &[-1, 255])],
            },
            "logits has shape [-1, 256]",
        );
    }

    #[test]
    fn refuses_what_it_cannot_serve() {
        let check = |sig: Signature, want: &str| {
            let e = IoSpec::from_signature(&sig, 64, 10)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e} does not contain {want}");
        };
        let good_out = vec![ts("logits", "FP32", &[-1, 10])];
        check(
            Signature {
                inputs: vec![ts("x", "FP32", &[-1, 63])],
                outputs: good_out.clone(),
            },
            "holds 63 values",
        );
        check(
            Signature {
                inputs: vec![ts("x", "BYTES", &[-1, 64])],
                outputs: good_out.clone(),
            },
            "datatype BYTES",
        );
        check(
            Signature {
                inputs: vec![ts("x", "FP32", &[64])],
                outputs: good_out.clone(),
            },
            "must start with -1",
        );
        check(
            Signature {
                inputs: vec![ts("x", "FP32", &[-1, 64])],
                outputs: vec![ts("embedding", "FP32", &[-1, 10])],
            },
            "embedding is none",
        );
        check(
            Signature {
                inputs: vec![ts("x", "FP32", &[-1, 64])],
                outputs: vec![ts("logits", "FP64", &[-1, 10])],
            },
            "logits is FP32",
        );
        check(
            Signature {
                inputs: vec![ts("a", "FP32", &[-1, 64]), ts("b", "FP32", &[-1, 64])],
                outputs: good_out,
            },
            "lists 2 (a, b)",
        );
    }
}
