//! Shared helpers for the op tests: random inputs, finite differences, relative errors.

use crate::rng::Philox;

/// Deterministic pseudo-random values in [-scale, scale).
pub fn rand_vec(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let r = Philox::new(seed);
    (0..n)
        .map(|i| (2.0 * r.uniform(99, 0, i as u64) - 1.0) * scale)
        .collect()
}

/// ||a - b|| / max(||b||, tiny): the relative L2 error used by every check.
pub fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    assert!(
        num.is_finite() && den.is_finite(),
        "NaN or Inf in a compared tensor"
    );
    num / den.max(1e-300)
}

/// Central finite-difference gradient of the scalar `f` with respect to every element of `x`.
pub fn fd_grad(x: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + h;
            let fp = f(&xp);
            xp[i] = orig - h;
            let fm = f(&xp);
            xp[i] = orig;
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

/// <a, b>: the scalar loss Σ dy·y used to turn an op's output into something to differentiate.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Assert that the analytic gradient matches finite differences to `tol` relative L2 error.
pub fn assert_grad(name: &str, analytic: &[f64], numeric: &[f64], tol: f64) {
    let e = rel_l2(analytic, numeric);
    assert!(e < tol, "{name}: relative L2 error {e:.3e} >= {tol:.1e}");
}
