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
