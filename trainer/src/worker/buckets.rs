//! Gradient buckets: every parameter's gradient lives in a slot of a flat
//! float32 bucket (backward accumulates straight into it), so a bucket is
//! all-reduced as one contiguous tensor, after backward or overlapped with
//! it; and clipping by the global norm.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::hooks::GradReadyHooks;
use crate::collective::Collective;
use crate::error::{Error, Result};

/// Gradients travel in flat buckets of about `bucket_bytes`, laid out in the
/// order backward makes them ready; the last bucket carries one extra
/// element, the rank's weighted loss, so the global loss costs no extra
/// collective.
///
/// Overlapped (`comm.overlap`), a bucket is all-reduced by a communication
/// thread as soon as backward has accumulated all its gradients, while
/// backward goes on with earlier layers. Each bucket is reduced by the same
/// collective call either way, so the result is bit for bit the same.
pub(super) struct GradBuckets {
    buckets: Vec<Bucket>,
    /// Gradients travel as bfloat16 (`comm.grad_dtype = "bf16"`): half the
    /// bytes; the loss then travels apart, in float64, so its report keeps
    /// full precision.
    bf16_wire: bool,
    /// The hooks and readiness of the overlapped mode; `None` when the
    /// all-reduce runs after backward.
    overlap: Option<Overlap>,
}

struct Bucket {
    flat: Tensor,
    /// (parameter index, offset, elements).
    members: Vec<(usize, i64, i64)>,
    /// Whether the members' `.grad` tensors are views into `flat`: backward then
    /// accumulates straight into the bucket and no copy is needed either way.
    aliased: bool,
}

/// Which buckets backward has completed, shared with the gradient hooks.
struct Readiness {
    /// Hooks count only while armed: during the last micro-batch's backward.
    armed: AtomicBool,
    /// The bucket of each parameter.
    bucket_of: Vec<usize>,
    /// Gradients each bucket still waits for.
    remaining: Vec<AtomicUsize>,
    /// Per bucket, whether it is complete; and whether backward has ended
    /// (then every bucket is: parameters that got no gradient keep zeros).
    ready: Mutex<(Vec<bool>, bool)>,
    changed: Condvar,
}

struct Overlap {
    readiness: Arc<Readiness>,
    _hooks: GradReadyHooks,
}

impl GradBuckets {
    /// `order` lists the parameter indices in the order backward readies them
    /// ([`hooks::ready_order`]); `overlap` asks for the overlapped all-reduce,
    /// which needs every bucket to alias its gradients (else it is off).
    pub(super) fn new(
        params: &[Tensor],
        order: &[usize],
        bucket_bytes: usize,
        device: Device,
        bf16_wire: bool,
        overlap: bool,
    ) -> Result<Self> {
        if order.len() != params.len() {
            return Err(Error::failed(format!(
                "bucket order names {} parameters of {}",
                order.len(),
                params.len()
            )));
        }
        let mut groups: Vec<Vec<(usize, i64, i64)>> = vec![Vec::new()];
        let mut filled = 0usize;
        for &i in order {
            let p = &params[i];
            if p.kind() != Kind::Float {
                return Err(Error::failed(format!(
                    "parameter {i} is {:?}; gradient buckets hold float32",
                    p.kind()
                )));
            }
            let n = p.numel() as i64;
            if filled > 0 && filled + n as usize * 4 > bucket_bytes {
                groups.push(Vec::new());
                filled = 0;
            }
            let group = groups.last_mut().expect("one group at least");
            let offset = group.last().map_or(0, |&(_, o, n)| o + n);
            group.push((i, offset, n));
            filled += n as usize * 4;
        }
        let last = groups.len() - 1;
        // Materialise every gradient (a zero backward), so that each can be
        // re-pointed at its slot of a bucket.
        let zero: Tensor = params.iter().map(|p| (p * 0.0).sum(Kind::Float)).sum();
        zero.backward();
        let buckets: Vec<Bucket> = groups
            .into_iter()
            .enumerate()
            .map(|(i, members)| {
                let len = members.iter().map(|m| m.2).sum::<i64>() + i64::from(i == last);
                let flat = Tensor::zeros([len], (Kind::Float, device));
                let aliased = members.iter().all(|&(p, offset, n)| {
                    let view = flat.narrow(0, offset, n).view(params[p].size().as_slice());
                    let mut grad = params[p].grad();
                    grad.set_data(&view);
                    // libtorch accumulates into a defined gradient in place, so the
                    // alias holds; checked, and copying stays the fallback.
                    params[p].grad().data_ptr() == view.data_ptr()
                });
                tracing::debug!(bucket = i, aliased, "gradient bucket");
                Bucket {
                    flat,
                    members,
                    aliased,
                }
            })
            .collect();
        let overlap = if overlap && buckets.iter().all(|b| b.aliased) {
            let mut bucket_of = vec![0; params.len()];
            for (b, bucket) in buckets.iter().enumerate() {
                for &(p, _, _) in &bucket.members {
                    bucket_of[p] = b;
                }
            }
            let readiness = Arc::new(Readiness {
                armed: AtomicBool::new(false),
                bucket_of,
                remaining: buckets.iter().map(|_| AtomicUsize::new(0)).collect(),
                ready: Mutex::new((vec![false; buckets.len()], false)),
                changed: Condvar::new(),
            });
            let hooks = {
                let readiness = readiness.clone();
                GradReadyHooks::install(params, move |p| readiness.gradient_ready(p))?
            };
            Some(Overlap {
                readiness,
                _hooks: hooks,
            })
        } else {
            if overlap {
                tracing::warn!(
                    "gradients could not be aliased into buckets: all-reduce after backward"
                );
            }
            None
        };
        Ok(Self {
            buckets,
            bf16_wire,
            overlap,
        })
    }

    /// Bytes all-reduced per step.
    pub(super) fn bytes(&self) -> usize {
        let width = if self.bf16_wire { 2 } else { 4 };
        self.buckets.iter().map(|b| b.flat.numel() * width).sum()
    }

    /// Whether [`GradBuckets::backward_and_reduce`] overlaps.
    pub(super) fn overlapped(&self) -> bool {
        self.overlap.is_some()
    }

    /// Runs the last micro-batch's `backward` and sums every parameter's
    /// gradient over all ranks in place; returns the global loss (the sum of
    /// the ranks' weighted losses, `local_loss` here) and the seconds the
    /// reduction kept the step waiting after backward.
    ///
    /// Overlapped, a communication thread reduces bucket after bucket as
    /// backward completes them, in bucket order (the same on every rank).
    pub(super) fn backward_and_reduce(
        &mut self,
        params: &[Tensor],
        comm: &mut dyn Collective,
        local_loss: f64,
        backward: impl FnOnce(),
    ) -> Result<(f64, f64)> {
        let Some(overlap) = &self.overlap else {
            backward();
            let started = Instant::now();
            let loss = self.all_reduce(params, comm, local_loss)?;
            return Ok((loss, started.elapsed().as_secs_f64()));
        };
        if comm.world_size() == 1 {
            backward();
            return Ok((local_loss, 0.0));
        }
        let readiness = overlap.readiness.clone();
        readiness.arm(&self.buckets);
        let bf16_wire = self.bf16_wire;
        let buckets = &mut self.buckets;
        let last = buckets.len() - 1;
        let (result, waited) = std::thread::scope(|scope| {
            let reducer = std::thread::Builder::new()
                .name("grad-allreduce".into())
                .spawn_scoped(scope, || -> Result<f64> {
                    let mut loss = local_loss;
                    for (i, bucket) in buckets.iter_mut().enumerate() {
                        readiness.wait(i);
                        if i == last && !bf16_wire {
                            let _ = bucket
                                .flat
                                .narrow(0, bucket.flat.numel() as i64 - 1, 1)
                                .fill_(local_loss);
                        }
                        reduce(bucket, comm, bf16_wire)?;
                        if i == last && !bf16_wire {
                            loss = bucket.flat.double_value(&[bucket.flat.numel() as i64 - 1]);
                        }
                    }
                    if bf16_wire {
                        loss = reduce_loss(comm, local_loss, buckets_device(buckets))?;
                    }
                    Ok(loss)
                });
            // Whatever backward does, the reducer must learn that it ended.
            let backward_outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(backward));
            let backward_done = Instant::now();
            readiness.finish();
            let result = match reducer {
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|_| Err(Error::failed("the all-reduce thread panicked"))),
                Err(e) => Err(Error::failed(format!("start the all-reduce thread: {e}"))),
            };
            if let Err(panic) = backward_outcome {
                std::panic::resume_unwind(panic);
            }
            (result, backward_done.elapsed().as_secs_f64())
        });
        readiness.disarm();
        Ok((result?, waited))
    }

    /// Sums every parameter's gradient over all ranks in place, after
    /// backward; returns the global loss.
    fn all_reduce(
        &mut self,
        params: &[Tensor],
        comm: &mut dyn Collective,
        local_loss: f64,
    ) -> Result<f64> {
        if comm.world_size() == 1 {
            return Ok(local_loss);
        }
        let last = self.buckets.len() - 1;
        let mut loss = local_loss;
        for (i, bucket) in self.buckets.iter_mut().enumerate() {
            tch::no_grad(|| {
                for &(p, offset, n) in bucket.members.iter().filter(|_| !bucket.aliased) {
                    let grad = params[p].grad();
                    let mut slot = bucket.flat.narrow(0, offset, n);
                    if grad.defined() {
                        slot.copy_(&grad.view([-1]));
                    } else {
                        let _ = slot.zero_();
                    }
                }
                if i == last && !self.bf16_wire {
                    let _ = bucket
                        .flat
                        .narrow(0, bucket.flat.numel() as i64 - 1, 1)
                        .fill_(local_loss);
                }
            });
            reduce(bucket, comm, self.bf16_wire)?;
            tch::no_grad(|| {
                for &(p, offset, n) in bucket.members.iter().filter(|_| !bucket.aliased) {
                    let mut grad = params[p].grad();
                    if grad.defined() {
                        grad.copy_(&bucket.flat.narrow(0, offset, n).view_as(&grad));
                    }
                }
            });
            if i == last && !self.bf16_wire {
                loss = bucket.flat.double_value(&[bucket.flat.numel() as i64 - 1]);
            }
        }
        if self.bf16_wire {
            loss = reduce_loss(comm, local_loss, buckets_device(&self.buckets))?;
        }
        Ok(loss)
    }
}

fn buckets_device(buckets: &[Bucket]) -> Device {
    buckets[0].flat.device()
}

/// All-reduces one bucket, in bfloat16 on the wire when asked.
fn reduce(bucket: &mut Bucket, comm: &mut dyn Collective, bf16_wire: bool) -> Result<()> {
    if bf16_wire {
        let mut wire = tch::no_grad(|| bucket.flat.to_kind(Kind::BFloat16));
        comm.all_reduce_sum(&mut wire)?;
        tch::no_grad(|| bucket.flat.copy_(&wire));
    } else {
        comm.all_reduce_sum(&mut bucket.flat)?;
    }
    Ok(())
}

/// The global loss, summed in float64 apart from a bfloat16 wire.
fn reduce_loss(comm: &mut dyn Collective, local_loss: f64, device: Device) -> Result<f64> {
    let mut total = Tensor::from_slice(&[local_loss]).to_device(device);
    comm.all_reduce_sum(&mut total)?;
    Ok(total.double_value(&[0]))
}

impl Readiness {
    /// Called by the hook of parameter `p` on the backward thread.
    fn gradient_ready(&self, p: usize) {
        if !self.armed.load(Ordering::Acquire) {
            return;
        }
        let b = self.bucket_of[p];
        if self.remaining[b].fetch_sub(1, Ordering::AcqRel) == 1 {
            self.ready.lock().expect("readiness lock").0[b] = true;
            self.changed.notify_all();
        }
    }

    /// Before the last micro-batch's backward: every bucket waits for all
    /// its members.
    fn arm(&self, buckets: &[Bucket]) {
        let mut ready = self.ready.lock().expect("readiness lock");
        for (b, bucket) in buckets.iter().enumerate() {
            self.remaining[b].store(bucket.members.len(), Ordering::Release);
            ready.0[b] = false;
        }
        ready.1 = false;
        drop(ready);
        self.armed.store(true, Ordering::Release);
    }

    /// Backward has returned: buckets still waiting (parameters that got no
    /// gradient this step) are complete too.
    fn finish(&self) {
        self.ready.lock().expect("readiness lock").1 = true;
        self.changed.notify_all();
    }

    fn disarm(&self) {
        self.armed.store(false, Ordering::Release);
    }

    /// Blocks until bucket `b` is complete (or backward has returned).
    fn wait(&self, b: usize) {
        let mut ready = self.ready.lock().expect("readiness lock");
        while !(ready.0[b] || ready.1) {
            ready = self.changed.wait(ready).expect("readiness lock");
        }
    }
}

/// The global L2 norm of the parameters' gradients, computed as PyTorch's
/// `clip_grad_norm_` does (the norm of the per-parameter norms), and, with
/// `max_norm`, the gradients scaled by `min(1, max_norm / (norm + 1e-6))`.
/// Run after the all-reduce, every rank sees the same gradients and clips
/// alike. Returns the norm before clipping.
pub(super) fn clip_grad_norm(params: &[Tensor], max_norm: Option<f64>) -> f64 {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = params
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads.iter().map(|g| vector_norm(&g.view([-1]))).collect();
        let total = vector_norm(&Tensor::stack(&norms, 0));
        if let Some(max_norm) = max_norm {
            // PyTorch's `max_norm / (total + 1e-6)` is `reciprocal() * max_norm`
            // (Tensor.__rtruediv__); the same order gives the same bits.
            let coef = ((&total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
            for mut g in grads {
                let _ = g.g_mul_(&coef);
            }
        }
        total.double_value(&[])
    })
}

/// The L2 norm of a 1-D tensor (`linalg_norm` of a vector is
/// `linalg.vector_norm`, the kernel `clip_grad_norm_` uses).
fn vector_norm(v: &Tensor) -> Tensor {
    v.linalg_norm(2.0, None::<&[i64]>, false, None::<Kind>)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same gradients clipped here and by PyTorch's `clip_grad_norm_`
    /// (run by the project's venv) come out bit for bit equal, with the
    /// same total norm.
    #[test]
    fn clipping_matches_pytorch_clip_grad_norm_bit_for_bit() {
        let repo =
            std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("..");
        let python = repo.join(".venv/bin/python");
        assert!(
            python.exists(),
            "{} missing: run scripts/bootstrap.sh",
            python.display()
        );
        tch::manual_seed(3);
        let shapes: [&[i64]; 3] = [&[7, 5], &[5], &[3, 4, 2]];
        let params: Vec<Tensor> = shapes
            .iter()
            .map(|s| Tensor::zeros(*s, (Kind::Float, Device::Cpu)).set_requires_grad(true))
            .collect();
        let grads: Vec<Tensor> = shapes
            .iter()
            .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)) * 3.0)
            .collect();
        // Materialise each .grad as the chosen values.
        let loss: Tensor = params
            .iter()
            .zip(&grads)
            .map(|(p, g)| (p * g).sum(Kind::Float))
            .sum();
        loss.backward();
        let dir = tempfile::tempdir().unwrap();
        let before = dir.path().join("before.safetensors");
        let named: Vec<(String, Tensor)> = grads
            .iter()
            .enumerate()
            .map(|(i, g)| (format!("g{i}"), g.shallow_clone()))
            .collect();
        Tensor::write_safetensors(&named, &before).unwrap();
        let norm = clip_grad_norm(&params, Some(1.5));
        let after = dir.path().join("after.safetensors");
        let clipped: Vec<(String, Tensor)> = params
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("g{i}"), p.grad().copy()))
            .collect();
        Tensor::write_safetensors(&clipped, &after).unwrap();
        let script = r#"
import sys, torch
from safetensors.torch import load_file
before, after = load_file(sys.argv[1]), load_file(sys.argv[2])
params = []
for name in sorted(before):
    p = torch.zeros_like(before[name], requires_grad=True)
    p.grad = before[name].clone()
    params.append((name, p))
total = torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.5)
for name, p in params:
    assert torch.equal(p.grad, after[name]), (name, (p.grad - after[name]).abs().max())
print(repr(total.item()))
"#;
        let out = std::process::Command::new(&python)
            .arg("-c")
            .arg(script)
            .arg(&before)
            .arg(&after)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "PyTorch disagrees: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let torch_norm: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert_eq!(norm, torch_norm, "total norm");
        assert!(norm > 1.5, "the test clips: norm {norm}");
    }
}
