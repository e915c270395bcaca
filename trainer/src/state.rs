//! Training state <-> checkpoints: which tensors make up the state, how they are
//! named, and what else a run needs to continue exactly.
//!
//! State tensors: `model/{parameter}` and `optim/{buffer}/{parameter}`
//! (`momentum`, or `exp_avg` and `exp_avg_sq`). Everything else is in the
//! manifest's `training_state`: the step, the global sample cursor, the
//! optimizer's update count and the schedule position. Nothing random runs after
//! initialisation (the data order is a pure function of seed and step), so the
//! seed is the whole RNG state; a checkpoint therefore resumes bit for bit.

use kiln_checkpoint::{DType, OwnedTensor, TensorView};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{Context, Error, Result};
use crate::optim::Optimizer;

/// The scalar part of the state, saved as the manifest's `training_state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// Steps completed.
    pub step: u64,
    /// Samples consumed (global): where the data order continues.
    pub sample_cursor: u64,
    /// The optimizer whose buffers were saved: `sgd` or `adamw`.
    pub optimizer: String,
    /// Updates the optimizer applied (AdamW's bias correction).
    pub optimizer_steps: u64,
    /// Position in the learning-rate schedule (the step) and its length.
    pub schedule_position: u64,
    /// Steps of the run the schedule spans (`train.steps`).
    pub schedule_total: u64,
    /// The seed every random choice derives from.
    pub seed: u64,
    /// Ranks of the round that saved it (a resume may use another number).
    pub world_size: u32,
    /// Global loss of the last step (reported when a run resumes at its end).
    pub loss: Option<f64>,
}

/// One state tensor ready to be viewed as bytes: borrowed straight from a
/// contiguous CPU tensor (no copy: the checkpointer copies only its stripe), or
/// copied to the host (GPU tensors).
pub struct StateTensor {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    /// Keeps the borrowed memory alive.
    tensor: Tensor,
    host: Option<Vec<u8>>,
}

impl StateTensor {
    fn new(name: String, t: &Tensor) -> Result<Self> {
        let dtype = dtype_of(t.kind())?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        let borrowable = t.device() == Device::Cpu && t.is_contiguous();
        let tensor = t.detach();
        let host = (!borrowable).then(|| kiln_models::to_host_bytes(&tensor));
        Ok(Self {
            name,
            dtype,
            shape,
            tensor,
            host,
        })
    }

    /// The bytes as a view; valid while the tensor is not modified.
    pub fn view(&self) -> TensorView<'_> {
        let data: &[u8] = match &self.host {
            Some(bytes) => bytes,
            None => {
                let len = self.tensor.numel() * self.dtype.size();
                if len == 0 {
                    &[]
                } else {
                    // SAFETY: a contiguous CPU tensor's storage holds `len` bytes
                    // from `data_ptr`; `self.tensor` keeps it alive for `'_`, and
                    // the training loop does not modify it while a save copies it
                    // (save blocks until its stripe is copied).
                    unsafe { std::slice::from_raw_parts(self.tensor.data_ptr() as *const u8, len) }
                }
            }
        };
        TensorView {
            name: &self.name,
            dtype: self.dtype,
            shape: &self.shape,
            data,
        }
    }
}

/// Every state tensor of the model and the optimizer, in canonical names.
pub fn state_tensors(params: &[(String, Tensor)], opt: &Optimizer) -> Result<Vec<StateTensor>> {
    let mut out = Vec::new();
    for (name, t) in params {
        out.push(StateTensor::new(format!("model/{name}"), t)?);
    }
    for (buffer, tensors) in opt.buffers() {
        if tensors.len() != params.len() {
            return Err(Error::failed(format!(
                "optimizer buffer {buffer} has {} tensors for {} parameters",
                tensors.len(),
                params.len()
            )));
        }
        for ((name, _), t) in params.iter().zip(tensors) {
            out.push(StateTensor::new(format!("optim/{buffer}/{name}"), t)?);
        }
    }
    Ok(out)
}

/// Copies loaded tensors into the parameters and the optimizer state; every
/// state tensor must be present with the same dtype and shape.
pub fn restore(
    loaded: &[OwnedTensor],
    params: &[(String, Tensor)],
    opt: &mut Optimizer,
) -> Result<()> {
    let by_name: std::collections::HashMap<&str, &OwnedTensor> =
        loaded.iter().map(|t| (t.name.as_str(), t)).collect();
    let copy_into = |name: &str, dst: &Tensor| -> Result<()> {
        let src = by_name.get(name).ok_or_else(|| {
            Error::invalid(format!(
                "the checkpoint has no tensor {name} (was it saved by another model or optimizer?)"
            ))
        })?;
        copy_tensor(name, src, dst).context("restore from checkpoint")
    };
    for (name, p) in params {
        copy_into(&format!("model/{name}"), p)?;
    }
    for (buffer, tensors) in opt.buffers_mut() {
        for ((name, _), t) in params.iter().zip(tensors.iter()) {
            copy_into(&format!("optim/{buffer}/{name}"), t)?;
        }
    }
    Ok(())
}

/// Initialises parameters from a safetensors file (`model.init`): every
/// parameter must be there, named as in the model or with a `model/` prefix.
pub fn init_from_safetensors(path: &std::path::Path, params: &[(String, Tensor)]) -> Result<()> {
    let loaded = kiln_checkpoint::import_safetensors(path)
        .with_context(|| format!("read {}", path.display()))?;
    let renamed: Vec<OwnedTensor> = loaded
        .into_iter()
        .map(|mut t| {
            if !t.name.starts_with("model/") {
                t.name = format!("model/{}", t.name);
            }
            t
        })
        .collect();
    let by_name: std::collections::HashMap<&str, &OwnedTensor> =
        renamed.iter().map(|t| (t.name.as_str(), t)).collect();
    for (name, p) in params {
        let key = format!("model/{name}");
        let src = by_name.get(key.as_str()).ok_or_else(|| {
            Error::invalid(format!(
                "model.init: {} has no tensor {name} (nor model/{name})",
                path.display()
            ))
        })?;
        copy_tensor(&key, src, p)?;
    }
    Ok(())
}

fn copy_tensor(name: &str, src: &OwnedTensor, dst: &Tensor) -> Result<()> {
    let shape: Vec<i64> = src.shape.iter().map(|&d| d as i64).collect();
    if shape != dst.size() || dtype_of(dst.kind())? != src.dtype {
        return Err(Error::invalid(format!(
            "tensor {name} is {:?} {:?}; the model expects {:?} {:?}",
            src.dtype,
            src.shape,
            dst.kind(),
            dst.size()
        )));
    }
    let host = Tensor::from_data_size(&src.data, &shape, dst.kind());
    tch::no_grad(|| dst.detach().copy_(&host));
    Ok(())
}

/// The checkpoint dtype of a tensor kind; an error for kinds checkpoints
/// do not hold (complex numbers, quantized kinds).
pub fn dtype_of(kind: Kind) -> Result<DType> {
    Ok(match kind {
        Kind::Float => DType::F32,
        Kind::Double => DType::F64,
        Kind::Half => DType::F16,
        Kind::BFloat16 => DType::BF16,
        Kind::Int64 => DType::I64,
        Kind::Int => DType::I32,
        Kind::Int16 => DType::I16,
        Kind::Int8 => DType::I8,
        Kind::Uint8 => DType::U8,
        Kind::Bool => DType::Bool,
        other => return Err(Error::failed(format!("no checkpoint dtype for {other:?}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::spec::{OptimizerKind, OptimizerSpec};

    #[test]
    fn state_round_trips_through_owned_tensors() {
        let params = vec![
            (
                "a".to_string(),
                Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0])
                    .view([2, 2])
                    .set_requires_grad(true),
            ),
            (
                "b".to_string(),
                Tensor::from_slice(&[5.0f32]).set_requires_grad(true),
            ),
        ];
        let spec = OptimizerSpec {
            kind: OptimizerKind::Adamw,
            ..Default::default()
        };
        let plain: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
        let mut opt = Optimizer::new(&spec, &plain);
        let _ = opt.buffers_mut()[0].1[0].fill_(0.5);
        let saved: Vec<OwnedTensor> = state_tensors(&params, &opt)
            .unwrap()
            .iter()
            .map(|s| {
                let v = s.view();
                OwnedTensor {
                    name: v.name.to_string(),
                    dtype: v.dtype,
                    shape: v.shape.to_vec(),
                    data: v.data.to_vec(),
                }
            })
            .collect();
        let names: Vec<&str> = saved.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "model/a",
                "model/b",
                "optim/exp_avg/a",
                "optim/exp_avg/b",
                "optim/exp_avg_sq/a",
                "optim/exp_avg_sq/b"
            ]
        );

        let fresh = vec![
            (
                "a".to_string(),
                Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true),
            ),
            (
                "b".to_string(),
                Tensor::zeros([1], (Kind::Float, Device::Cpu)).set_requires_grad(true),
            ),
        ];
        let plain: Vec<Tensor> = fresh.iter().map(|(_, t)| t.shallow_clone()).collect();
        let mut opt2 = Optimizer::new(&spec, &plain);
        restore(&saved, &fresh, &mut opt2).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(fresh[0].1.detach().view([-1])).unwrap(),
            [1.0, 2.0, 3.0, 4.0]
        );
        assert_eq!(
            Vec::<f32>::try_from(opt2.buffers()[0].1[0].view([-1])).unwrap(),
            [0.5; 4]
        );

        let partial: Vec<OwnedTensor> = saved
            .into_iter()
            .filter(|t| t.name != "optim/exp_avg_sq/b")
            .collect();
        let err = restore(&partial, &fresh, &mut opt2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("optim/exp_avg_sq/b"), "{err}");
    }
}
