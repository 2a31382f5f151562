//! Adam / AdamW and the learning-rate schedule of the official object-discovery code.

use crate::backend::AdamStep;
use crate::real::Real;
use rayon::prelude::*;

/// The official schedule (model.md): for the update of 0-based step s,
/// lr(s) = base · min(s / warmup, 1) · rate^(s / decay_steps), decaying from the start. As in the
/// official code, the first update has lr 0 when there is a warm-up (Adam's moments still see
/// its gradient).
pub fn learning_rate(
    base: f64,
    warmup_steps: usize,
    decay_rate: f64,
    decay_steps: usize,
    step: u64,
) -> f64 {
    let s = step as f64;
    let warm = if warmup_steps == 0 {
        1.0
    } else {
        (s / warmup_steps as f64).min(1.0)
    };
    base * warm * decay_rate.powf(s / decay_steps as f64)
}

/// The reference Adam(W) update:
/// g' = grad_scale·g; m = β1 m + (1−β1) g'; v = β2 v + (1−β2) g'²;
/// p −= lr·(m / (1−β1^t)) / (sqrt(v / (1−β2^t)) + eps) + lr·wd·p.
/// (PyTorch's AdamW applies the decay first, p ← p·(1 − lr·wd), then the Adam step; the two
/// orders differ only by lr²·wd terms, and we follow PyTorch exactly.)
pub fn adam_step_cpu<T: Real>(s: &AdamStep, param: &mut [T], grad: &[T], m: &mut [T], v: &mut [T]) {
    let (b1, b2) = (s.beta1, s.beta2);
    let bc1 = 1.0 - b1.powi(s.t as i32);
    let bc2 = 1.0 - b2.powi(s.t as i32);
    let decay = 1.0 - s.lr * s.weight_decay;
    param
        .par_iter_mut()
        .zip(grad.par_iter())
        .zip(m.par_iter_mut().zip(v.par_iter_mut()))
        .for_each(|((p, g), (mm, vv))| {
            let g = g.to_f64c() * s.grad_scale;
            let m1 = b1 * mm.to_f64c() + (1.0 - b1) * g;
            let v1 = b2 * vv.to_f64c() + (1.0 - b2) * g * g;
            let update = s.lr * (m1 / bc1) / ((v1 / bc2).sqrt() + s.eps);
            *p = T::from_f64c(p.to_f64c() * decay - update);
            *mm = T::from_f64c(m1);
            *vv = T::from_f64c(v1);
        });
}

/// What one optimizer step needs from the host: everything that does not depend on the
/// gradients. The gradient norm, the clip scale, the finiteness check and the bias corrections
/// are decided beside the gradients ([`OptReport::decide`] on the CPU, `opt_control_f64` in
/// `kernels/optim.cu` on the GPU), so that a training step needs no host read.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the gradient to this global L2 norm.
    pub grad_clip: Option<f64>,
    /// `on_nonfinite: stop`: after the first non-finite step, make no further update, so that
    /// the state the host finds at its next read is the one before that step.
    pub latch: bool,
    /// The 0-based index of this step (recorded for non-finite steps).
    pub step: u64,
}

/// The optimizer's bookkeeping, kept beside the parameters and read by the host only when it
/// needs it (log intervals, checkpoints, the end of the run).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OptReport {
    /// Adam updates made: the `t` of the bias corrections.
    pub updates: u64,
    /// Steps that made no update (non-finite, or after a latch).
    pub skipped: u64,
    /// The first and the last non-finite step, and the loss and gradient norm of the first.
    pub first_bad: Option<(u64, f64, f64)>,
    pub last_bad_step: Option<u64>,
    /// A non-finite step happened with `latch` set: no update since.
    pub latched: bool,
    /// Loss and gradient norm of the last step.
    pub last_loss: f64,
    pub last_grad_norm: f64,
    /// Sum and number of the losses of the updating steps (interval means are differences).
    pub loss_sum: f64,
    pub loss_count: u64,
}

impl OptReport {
    /// A fresh report for a run whose Adam has made `updates` updates.
    pub fn starting_at(updates: u64) -> OptReport {
        OptReport {
            updates,
            ..Default::default()
        }
    }

    /// Account for a step with `loss` and squared gradient norm `norm_sq`; the Adam update to
    /// make, or None when the step makes none.
    pub fn decide(&mut self, h: &OptHyper, loss: f64, norm_sq: f64) -> Option<AdamStep> {
        let norm = norm_sq.sqrt();
        self.last_loss = loss;
        self.last_grad_norm = norm;
        if !(loss.is_finite() && norm.is_finite()) {
            self.skipped += 1;
            self.first_bad.get_or_insert((h.step, loss, norm));
            self.last_bad_step = Some(h.step);
            self.latched |= h.latch;
            return None;
        }
        if self.latched {
            self.skipped += 1;
            return None;
        }
        self.updates += 1;
        self.loss_sum += loss;
        self.loss_count += 1;
        Some(AdamStep {
            lr: h.lr,
            beta1: h.beta1,
            beta2: h.beta2,
            eps: h.eps,
            weight_decay: h.weight_decay,
            t: self.updates,
            grad_scale: match h.grad_clip {
                Some(c) if norm > c => c / norm,
                _ => 1.0,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let lr = |s| learning_rate(4e-4, 10_000, 0.5, 100_000, s);
        assert!((lr(5_000) - 4e-4 * 0.5 * 0.5f64.powf(0.05)).abs() < 1e-12);
        assert!((lr(100_000) - 4e-4 * 0.5).abs() < 1e-12);
        assert!((lr(10_000) - 4e-4 * 0.5f64.powf(0.1)).abs() < 1e-12);
        assert_eq!(lr(0), 0.0);
        assert_eq!(learning_rate(1e-3, 0, 1.0, 1, 7), 1e-3);
    }

    #[test]
    fn decide_clips_skips_and_latches() {
        let mut h = OptHyper {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            grad_clip: Some(1.0),
            latch: false,
            step: 0,
        };
        let mut r = OptReport::starting_at(5);
        let a = r.decide(&h, 0.5, 4.0).unwrap();
        assert_eq!((a.t, a.grad_scale, r.updates), (6, 0.5, 6));
        h.step = 1;
        assert!(r.decide(&h, f64::NAN, 1.0).is_none());
        h.step = 2;
        assert!(r.decide(&h, 0.25, f64::INFINITY).is_none());
        assert_eq!(r.first_bad.map(|b| b.0), Some(1));
        assert_eq!((r.last_bad_step, r.skipped, r.updates), (Some(2), 2, 6));
        h.step = 3;
        assert_eq!(r.decide(&h, 0.25, 0.25).unwrap().grad_scale, 1.0);
        assert_eq!((r.loss_sum, r.loss_count), (0.75, 2));
        // With the latch, nothing updates after a non-finite step, finite or not.
        h.latch = true;
        h.step = 4;
        assert!(r.decide(&h, f64::NAN, 1.0).is_none());
        h.step = 5;
        assert!(r.decide(&h, 0.1, 0.1).is_none());
        assert!(r.latched);
        assert_eq!((r.updates, r.skipped, r.last_bad_step), (7, 4, Some(4)));
    }

    #[test]
    fn adam_matches_hand_computation() {
        let s = AdamStep {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            t: 1,
            grad_scale: 1.0,
        };
        let (mut p, g, mut m, mut v) = (
            vec![1.0f64, -2.0],
            vec![0.5, -0.25],
            vec![0.0; 2],
            vec![0.0; 2],
        );
        adam_step_cpu(&s, &mut p, &g, &mut m, &mut v);
        // First step: m̂ = g, v̂ = g², so the step is lr·sign(g) (up to eps), plus the decay.
        assert!((p[0] - (1.0 * (1.0 - 0.001) - 0.1)).abs() < 1e-7);
        assert!((p[1] - (-2.0 * (1.0 - 0.001) + 0.1)).abs() < 1e-7);
        assert!((m[0] - 0.05).abs() < 1e-15 && (v[1] - 0.001 * 0.0625).abs() < 1e-15);
    }
}
