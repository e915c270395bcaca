//! Held-out evaluation, and the reference profile a registered model's
//! server detects drift against.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::step::Objective;
use crate::collective::Collective;
use crate::data::{self, Data, Dataset, Sample};
use crate::error::{Context, Error, Result};
use kiln_models::Net;

/// Held-out metrics; each rank evaluates a contiguous slice and the totals
/// are summed over ranks. Every objective reports `loss` (the mean per
/// sample); classifiers add `accuracy`, language models `perplexity`
/// (exp of the mean per-token loss).
pub(super) fn evaluate(
    net: &Net,
    objective: Objective,
    data: &Data,
    rank: usize,
    world: usize,
    device: Device,
    comm: &mut dyn Collective,
) -> Result<BTreeMap<String, f64>> {
    let samples: Vec<Sample> = data::eval_slice(data.len(), rank, world)
        .map(|i| (None, i))
        .collect();
    // Language windows are long: smaller chunks keep activations bounded.
    let chunk = match objective {
        Objective::Language => 16,
        _ => 1024,
    };
    let (mut correct, mut loss_sum) = (0i64, 0f64);
    tch::no_grad(|| -> Result<()> {
        for part in samples.chunks(chunk) {
            let batch = data.batch(part, device)?;
            if objective != Objective::Classification {
                loss_sum += objective.loss_sum(net, &batch, false)?.double_value(&[]);
                continue;
            }
            let field = |name: &str| {
                batch
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t)
                    .ok_or_else(|| Error::invalid(format!("held-out data has no `{name}`")))
            };
            let (xs, ys) = (field("x")?, field("y")?);
            let logits = net.forward_t(xs, false)?;
            loss_sum += logits
                .cross_entropy_loss::<Tensor>(ys, None, tch::Reduction::Sum, -100, 0.0)
                .double_value(&[]);
            correct += logits
                .argmax(-1, false)
                .eq_tensor(ys)
                .sum(Kind::Int64)
                .int64_value(&[]);
        }
        Ok(())
    })?;
    let mut totals =
        Tensor::from_slice(&[correct as f64, loss_sum, samples.len() as f64]).to_device(device);
    comm.all_reduce_sum(&mut totals)
        .context("all-reduce evaluation totals")?;
    let totals =
        Vec::<f64>::try_from(totals.to_device(Device::Cpu)).context("read evaluation totals")?;
    let count = totals[2].max(1.0);
    let loss = totals[1] / count;
    let mut metrics = BTreeMap::from([("loss".to_string(), loss)]);
    match objective {
        Objective::Classification => {
            metrics.insert("accuracy".to_string(), totals[0] / count);
        }
        Objective::Language => {
            metrics.insert("perplexity".to_string(), loss.exp());
        }
        Objective::OwnLoss => {}
    }
    Ok(metrics)
}

/// The reference profile for drift detection: up to `rows` training inputs
/// (a seeded sample, in the first epoch's order) and the trained model's
/// predicted class for each, written as JSON to `path`. Classifiers only.
pub(super) fn write_reference_profile(
    net: &Net,
    data: &Dataset,
    order: &[u32],
    rows: usize,
    seed: u64,
    device: Device,
    path: &Path,
) -> Result<()> {
    use kiln_checkpoint::profile::{ProfileOptions, ReferenceProfile, Task};
    let indices: Vec<usize> = order.iter().take(rows).map(|&i| i as usize).collect();
    let xs = data.features_of(&indices, Device::Cpu)?;
    let predictions: Vec<f64> = tch::no_grad(|| -> Result<Vec<i64>> {
        let logits = net.forward_t(&xs.to_device(device), false)?;
        Ok(Vec::<i64>::try_from(
            logits.argmax(-1, false).to_device(Device::Cpu),
        )?)
    })
    .context("predictions for the reference profile")?
    .into_iter()
    .map(|c| c as f64)
    .collect();
    let inputs = Vec::<f32>::try_from(xs.view([-1])).context("reference inputs")?;
    let options = ProfileOptions {
        max_rows: rows.max(1),
        seed,
    };
    let profile = ReferenceProfile::from_model_io(
        &inputs,
        data.features(),
        None,
        &predictions,
        Task::Classification,
        &options,
    )
    .context("build the reference profile")?;
    std::fs::write(path, profile.to_json_bytes())
        .with_context(|| format!("write {}", path.display()))
}
