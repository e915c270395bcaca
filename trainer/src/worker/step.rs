//! One training step, top to bottom: forward and backward over the rank's
//! micro-batches, the gradient all-reduce, clipping by the global norm, the
//! optimizer update.
//!
//! The loss each micro-batch back-propagates is scaled so that, summed over
//! every micro-batch of every rank, it is the mean loss of the global batch.
//! Gradients are then summed over ranks, so the update does not depend on the
//! world size or the micro-batch size (DESIGN.md §4).

use kiln_models::Net;
use kiln_proto::spec::{DataKind, JobSpec, ModelReturns};
use tch::{Kind, Reduction, Tensor};

use super::buckets::{GradBuckets, clip_grad_norm};
use crate::collective::Collective;
use crate::data::{Data, Sample};
use crate::error::{Context, Error, Result};
use crate::optim::Optimizer;

/// What a micro-batch's loss is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// Logits [n, classes] of `x` against the labels `y`: cross-entropy.
    Classification,
    /// Logits [n, t, vocab] of `tokens` against `targets`: cross-entropy per
    /// token; a sample's loss is its mean over its tokens.
    Language,
    /// The model's own scalar loss from the batch's named tensors: a mean over
    /// the micro-batch's samples.
    OwnLoss,
}

impl Objective {
    pub fn of(spec: &JobSpec) -> Self {
        if spec.model.returns == ModelReturns::Loss {
            Objective::OwnLoss
        } else if spec.data.kind == DataKind::Tokens {
            Objective::Language
        } else {
            Objective::Classification
        }
    }

    /// The loss of `batch` summed over its samples (each sample's loss a mean
    /// over its tokens for language data), as a float32 scalar.
    pub fn loss_sum(&self, net: &Net, batch: &[(String, Tensor)], train: bool) -> Result<Tensor> {
        let field = |name: &str| {
            batch
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| {
                    let names: Vec<&str> = batch.iter().map(|(n, _)| n.as_str()).collect();
                    Error::invalid(format!("the batch has no `{name}` (fields: {names:?})"))
                })
        };
        match self {
            Objective::Classification => {
                let (xs, ys) = (field("x")?, field("y")?);
                let logits = net.forward_t(xs, train)?;
                if logits.dim() != 2 || logits.size()[0] != xs.size()[0] {
                    return Err(Error::invalid(format!(
                        "the model returned logits of shape {:?} for {} samples; expected [samples, classes]",
                        logits.size(),
                        xs.size()[0]
                    )));
                }
                Ok(logits.cross_entropy_loss::<Tensor>(ys, None, Reduction::Sum, -100, 0.0))
            }
            Objective::Language => {
                let (tokens, targets) = (field("tokens")?, field("targets")?);
                let logits = net.forward_t(tokens, train)?;
                let (n, t) = (tokens.size()[0], tokens.size()[1]);
                if logits.dim() != 3 || logits.size()[..2] != [n, t] {
                    return Err(Error::invalid(format!(
                        "the model returned logits of shape {:?} for tokens [{n}, {t}]; expected [{n}, {t}, vocab]",
                        logits.size()
                    )));
                }
                let vocab = logits.size()[2];
                let per_token = logits
                    .view([n * t, vocab])
                    .to_kind(Kind::Float)
                    .cross_entropy_loss::<Tensor>(
                        &targets.view([n * t]),
                        None,
                        Reduction::Sum,
                        -100,
                        0.0,
                    );
                Ok(per_token / t as f64)
            }
            Objective::OwnLoss => {
                let n = batch
                    .first()
                    .map_or(0, |(_, t)| t.size().first().copied().unwrap_or(1));
                Ok(net.script_loss(batch)? * n as f64)
            }
        }
    }
}

/// What a step measured.
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    /// Global mean loss of the step.
    pub loss: f64,
    /// Global gradient norm before clipping (NaN when clipping is off).
    pub grad_norm: f64,
    /// Seconds the step waited for the all-reduce after backward (all of
    /// it without overlap; what the overlap did not hide with it).
    pub reduce_seconds: f64,
}

/// Everything one step needs besides the model and the data.
pub struct StepContext<'a> {
    pub objective: Objective,
    pub global_batch: usize,
    pub micro_batch: usize,
    pub lr: f64,
    pub clip: Option<f64>,
    /// Seeds the dropout masks of a micro-batch from its first sample's
    /// global position, so a resumed run draws the same masks.
    pub seed: u64,
    pub comm: &'a mut dyn Collective,
}

/// Runs one step over `samples`, this rank's slice of the global batch
/// starting at global position `first_position`.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    net: &Net,
    params: &mut [Tensor],
    opt: &mut Optimizer,
    buckets: &mut GradBuckets,
    data: &Data,
    samples: &[Sample],
    first_position: u64,
    device: tch::Device,
    cx: StepContext<'_>,
) -> Result<StepOutcome> {
    for p in params.iter_mut() {
        p.zero_grad();
    }
    let mut local_loss = 0.0;
    let chunks: Vec<&[Sample]> = samples.chunks(cx.micro_batch).collect();
    let mut result = None;
    for (i, chunk) in chunks.iter().enumerate() {
        let position = first_position + (i * cx.micro_batch) as u64;
        tch::manual_seed((cx.seed ^ position.wrapping_mul(0x9e37_79b9_7f4a_7c15)) as i64);
        let batch = data.batch(chunk, device)?;
        // Weighted by the global batch: summed over ranks, the gradient is the
        // global mean's, whatever the world size and micro-batching.
        let l = cx.objective.loss_sum(net, &batch, true)? / cx.global_batch as f64;
        local_loss += l.double_value(&[]);
        if i + 1 < chunks.len() {
            l.backward();
        } else {
            // The last backward: buckets are all-reduced as it completes them
            // (or after it, without overlap).
            result = Some(
                buckets
                    .backward_and_reduce(params, cx.comm, local_loss, || l.backward())
                    .context("all-reduce gradients")?,
            );
        }
    }
    let (loss, reduce_seconds) = result.context("a step needs at least one sample")?;
    if !loss.is_finite() {
        return Err(Error::failed(format!(
            "loss is {loss}: training diverged (lower optimizer.lr?)"
        )));
    }
    let grad_norm = match cx.clip {
        Some(max) => clip_grad_norm(params, Some(max)),
        None => f64::NAN,
    };
    opt.step(params, cx.lr);
    Ok(StepOutcome {
        loss,
        grad_norm,
        reduce_seconds,
    })
}
