//! Optimizers and learning-rate schedules over plain tensors.
//!
//! Written here rather than taken from libtorch's C++ optimizers because their
//! state must be visible: checkpoints save it and a surviving rank broadcasts it
//! to a replacement. The update rules follow PyTorch's `SGD` (momentum buffer
//! starts as the first gradient; weight decay as an L2 term) and `AdamW`
//! (decoupled weight decay, bias-corrected moments).

use kiln_proto::spec::{OptimizerKind, OptimizerSpec, ScheduleKind, ScheduleSpec};
use tch::Tensor;

/// Per-parameter state, in the same order as the parameters it updates.
#[derive(Debug)]
pub struct Optimizer {
    spec: OptimizerSpec,
    /// SGD: momentum buffers. AdamW: first moments.
    first: Vec<Tensor>,
    /// AdamW: second moments (empty for SGD).
    second: Vec<Tensor>,
    /// Updates applied so far (AdamW's bias correction; SGD's first-step rule).
    pub steps: u64,
}

impl Optimizer {
    /// The optimizer `spec` asks for over `params`, its state zeroed (on the
    /// parameters' devices) and no update applied yet.
    pub fn new(spec: &OptimizerSpec, params: &[Tensor]) -> Self {
        let zeros = || {
            params
                .iter()
                .map(|p| p.zeros_like().detach())
                .collect::<Vec<_>>()
        };
        let second = match spec.kind {
            OptimizerKind::Adamw => zeros(),
            OptimizerKind::Sgd => Vec::new(),
        };
        Self {
            spec: spec.clone(),
            first: zeros(),
            second,
            steps: 0,
        }
    }

    /// The state buffers by name (`momentum`; or `exp_avg`, `exp_avg_sq`), each
    /// with one tensor per parameter in parameter order: what checkpoints save
    /// and state transfer sends.
    pub fn buffers(&self) -> Vec<(&'static str, &[Tensor])> {
        match self.spec.kind {
            OptimizerKind::Sgd => vec![("momentum", &self.first)],
            OptimizerKind::Adamw => vec![("exp_avg", &self.first), ("exp_avg_sq", &self.second)],
        }
    }

    /// [`Optimizer::buffers`], writable (restoring from a checkpoint).
    pub fn buffers_mut(&mut self) -> Vec<(&'static str, &mut [Tensor])> {
        match self.spec.kind {
            OptimizerKind::Sgd => vec![("momentum", &mut self.first)],
            OptimizerKind::Adamw => vec![
                ("exp_avg", &mut self.first),
                ("exp_avg_sq", &mut self.second),
            ],
        }
    }

    /// SGD or AdamW: what a checkpoint's `training_state.optimizer` must match.
    pub fn kind(&self) -> OptimizerKind {
        self.spec.kind
    }

    /// Applies one update with learning rate `lr` from the parameters' `.grad()`.
    pub fn step(&mut self, params: &mut [Tensor], lr: f64) {
        let s = &self.spec;
        self.steps += 1;
        tch::no_grad(|| match s.kind {
            OptimizerKind::Sgd => {
                let neg_lr = params
                    .first()
                    .map(|p| Tensor::from(-lr).to_kind(p.kind()).to_device(p.device()));
                let Some(neg_lr) = neg_lr else { return };
                for (p, buf) in params.iter_mut().zip(&mut self.first) {
                    let g = p.grad();
                    if !g.defined() {
                        continue;
                    }
                    // A new tensor, not `+=`: the gradient itself stays untouched.
                    let g = if s.weight_decay != 0.0 {
                        g + &*p * s.weight_decay
                    } else {
                        g
                    };
                    let update = if s.momentum != 0.0 {
                        if self.steps == 1 {
                            buf.copy_(&g);
                        } else {
                            let _ = buf.g_mul_scalar_(s.momentum);
                            let _ = buf.g_add_(&g);
                        }
                        buf.shallow_clone()
                    } else {
                        g
                    };
                    // p += update * (-lr), fused: no parameter-sized temporary
                    // (a fresh multi-MiB allocation per step costs page faults).
                    let _ = p.addcmul_(&update, &neg_lr);
                }
            }
            OptimizerKind::Adamw => {
                let (b1, b2) = (s.beta1, s.beta2);
                let bias1 = 1.0 - b1.powi(self.steps as i32);
                let bias2 = 1.0 - b2.powi(self.steps as i32);
                for ((p, m), v) in params.iter_mut().zip(&mut self.first).zip(&mut self.second) {
                    let g = p.grad();
                    if !g.defined() {
                        continue;
                    }
                    if s.weight_decay != 0.0 {
                        let _ = p.g_mul_scalar_(1.0 - lr * s.weight_decay);
                    }
                    let _ = m.g_mul_scalar_(b1);
                    let _ = m.g_add_(&(&g * (1.0 - b1)));
                    let _ = v.g_mul_scalar_(b2);
                    let _ = v.g_add_(&(&g * &g * (1.0 - b2)));
                    let denom = (&*v / bias2).sqrt() + s.eps;
                    let _ = p.g_sub_(&(&*m / &denom * (lr / bias1)));
                }
            }
        });
    }
}

/// The learning rate before update `step` (0-based) of a `total`-step run.
pub fn learning_rate(opt: &OptimizerSpec, schedule: &ScheduleSpec, step: u64, total: u64) -> f64 {
    let peak = opt.lr;
    if step < schedule.warmup_steps {
        return peak * (step + 1) as f64 / schedule.warmup_steps as f64;
    }
    match schedule.kind {
        ScheduleKind::Constant => peak,
        ScheduleKind::Cosine => {
            let span = total.saturating_sub(schedule.warmup_steps).max(1) as f64;
            let progress = ((step - schedule.warmup_steps) as f64 / span).min(1.0);
            schedule.min_lr
                + 0.5 * (peak - schedule.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn params() -> Vec<Tensor> {
        vec![Tensor::from_slice(&[1.0f32, -2.0, 3.0]).set_requires_grad(true)]
    }

    fn set_grad(p: &Tensor, g: &[f32]) {
        let mut grad = p.grad();
        if !grad.defined() {
            // Materialise a grad through a backward of <p, g>.
            (p * Tensor::from_slice(g)).sum(Kind::Float).backward();
        } else {
            grad.copy_(&Tensor::from_slice(g));
        }
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.detach().to_device(Device::Cpu)).unwrap()
    }

    #[test]
    fn sgd_with_momentum_matches_pytorch_rule() {
        let spec = OptimizerSpec {
            kind: OptimizerKind::Sgd,
            momentum: 0.9,
            ..Default::default()
        };
        let mut p = params();
        let mut opt = Optimizer::new(&spec, &p);
        set_grad(&p[0], &[1.0, 1.0, 1.0]);
        opt.step(&mut p, 0.1);
        // First step: buf = g; p -= lr * g.
        assert_eq!(values(&p[0]), [0.9, -2.1, 2.9]);
        set_grad(&p[0], &[1.0, 0.0, -1.0]);
        opt.step(&mut p, 0.1);
        // buf = 0.9 * 1 + g = [1.9, 0.9, -0.1]; p -= 0.1 * buf.
        let got = values(&p[0]);
        for (a, b) in got.iter().zip([0.71f32, -2.19, 2.91]) {
            assert!((a - b).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr_times_sign() {
        let spec = OptimizerSpec {
            kind: OptimizerKind::Adamw,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut p = params();
        let mut opt = Optimizer::new(&spec, &p);
        set_grad(&p[0], &[0.5, -3.0, 0.0]);
        opt.step(&mut p, 0.01);
        let got = values(&p[0]);
        for (a, b) in got.iter().zip([0.99f32, -1.99, 3.0]) {
            assert!((a - b).abs() < 1e-5, "{got:?}");
        }
        assert_eq!(opt.buffers().len(), 2);
    }

    #[test]
    fn adamw_decay_is_decoupled() {
        let spec = OptimizerSpec {
            kind: OptimizerKind::Adamw,
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut p = params();
        let mut opt = Optimizer::new(&spec, &p);
        set_grad(&p[0], &[0.0, 0.0, 0.0]);
        opt.step(&mut p, 0.1);
        // Zero gradient: only the decay acts, p *= 1 - lr * wd.
        assert_eq!(values(&p[0]), [0.95, -1.9, 2.85]);
    }

    #[test]
    fn schedules() {
        let opt = OptimizerSpec {
            lr: 1.0,
            ..Default::default()
        };
        let constant = ScheduleSpec {
            kind: ScheduleKind::Constant,
            warmup_steps: 4,
            min_lr: 0.0,
        };
        assert_eq!(learning_rate(&opt, &constant, 0, 100), 0.25);
        assert_eq!(learning_rate(&opt, &constant, 3, 100), 1.0);
        assert_eq!(learning_rate(&opt, &constant, 50, 100), 1.0);
        let cosine = ScheduleSpec {
            kind: ScheduleKind::Cosine,
            warmup_steps: 10,
            min_lr: 0.1,
        };
        assert_eq!(learning_rate(&opt, &cosine, 10, 110), 1.0);
        assert!((learning_rate(&opt, &cosine, 60, 110) - 0.55).abs() < 1e-12);
        assert!((learning_rate(&opt, &cosine, 110, 110) - 0.1).abs() < 1e-12);
        let lrs: Vec<f64> = (10..110)
            .map(|s| learning_rate(&opt, &cosine, s, 110))
            .collect();
        assert!(
            lrs.windows(2).all(|w| w[1] <= w[0]),
            "cosine decays monotonically"
        );
    }
}
