//! The gates of PyTorch's GRUCell. The two matrix products gi = x·W_ihᵀ + b_ih and
//! gh = h·W_hhᵀ + b_hh (rows of 3·D, gate order r, z, n) are plain linear layers; this op is
//! what comes after them:
//!   r = σ(gi_r + gh_r),  z = σ(gi_z + gh_z),  n = tanh(gi_n + r ⊙ gh_n),  h' = (1 − z) ⊙ n + z ⊙ h

use crate::real::Real;
use rayon::prelude::*;

fn sigmoid<T: Real>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

/// h' `[rows, D]` (overwritten) from gi, gh `[rows, 3D]` and h `[rows, D]`.
pub fn gru_gates_fwd<T: Real>(d: usize, gi: &[T], gh: &[T], h: &[T], h_new: &mut [T]) {
    h_new.par_chunks_mut(d).enumerate().for_each(|(r, out)| {
        let (gir, ghr, hr) = (
            &gi[r * 3 * d..][..3 * d],
            &gh[r * 3 * d..][..3 * d],
            &h[r * d..][..d],
        );
        for j in 0..d {
            let rg = sigmoid(gir[j] + ghr[j]);
            let zg = sigmoid(gir[d + j] + ghr[d + j]);
            let ng = (gir[2 * d + j] + rg * ghr[2 * d + j]).tanh();
            out[j] = (T::one() - zg) * ng + zg * hr[j];
        }
    });
}

/// Backward: accumulates dgi, dgh `[rows, 3D]` and dh `[rows, D]` from dh'.
#[allow(clippy::too_many_arguments)]
pub fn gru_gates_bwd<T: Real>(
    d: usize,
    gi: &[T],
    gh: &[T],
    h: &[T],
    dh_new: &[T],
    dgi: &mut [T],
    dgh: &mut [T],
    dh: &mut [T],
) {
    dgi.par_chunks_mut(3 * d)
        .zip(dgh.par_chunks_mut(3 * d))
        .zip(dh.par_chunks_mut(d))
        .enumerate()
        .for_each(|(r, ((dgir, dghr), dhr))| {
            let (gir, ghr, hr, dor) = (
                &gi[r * 3 * d..][..3 * d],
                &gh[r * 3 * d..][..3 * d],
                &h[r * d..][..d],
                &dh_new[r * d..][..d],
            );
            for j in 0..d {
                let rg = sigmoid(gir[j] + ghr[j]);
                let zg = sigmoid(gir[d + j] + ghr[d + j]);
                let ng = (gir[2 * d + j] + rg * ghr[2 * d + j]).tanh();
                let g = dor[j];
                dhr[j] += g * zg;
                let dz = g * (hr[j] - ng) * zg * (T::one() - zg);
                let dn = g * (T::one() - zg) * (T::one() - ng * ng);
                let dr = dn * ghr[2 * d + j] * rg * (T::one() - rg);
                dgir[j] += dr;
                dghr[j] += dr;
                dgir[d + j] += dz;
                dghr[d + j] += dz;
                dgir[2 * d + j] += dn;
                dghr[2 * d + j] += dn * rg;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::*;

    fn run(d: usize, gi: &[f64], gh: &[f64], h: &[f64]) -> Vec<f64> {
        let mut out = vec![f64::NAN; h.len()];
        gru_gates_fwd(d, gi, gh, h, &mut out);
        out
    }

    #[test]
    fn forward_matches_pytorch_formula() {
        let (rows, d) = (3, 4);
        let gi = rand_vec(rows * 3 * d, 1, 2.0);
        let gh = rand_vec(rows * 3 * d, 2, 2.0);
        let h = rand_vec(rows * d, 3, 1.0);
        let out = run(d, &gi, &gh, &h);
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        for r in 0..rows {
            for j in 0..d {
                let g = |a: &[f64], gate: usize| a[r * 3 * d + gate * d + j];
                let rr = sig(g(&gi, 0) + g(&gh, 0));
                let z = sig(g(&gi, 1) + g(&gh, 1));
                let n = (g(&gi, 2) + rr * g(&gh, 2)).tanh();
                let want = (1.0 - z) * n + z * h[r * d + j];
                assert!((out[r * d + j] - want).abs() < 1e-15);
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (rows, d) = (3, 4);
        let gi = rand_vec(rows * 3 * d, 4, 2.0);
        let gh = rand_vec(rows * 3 * d, 5, 2.0);
        let h = rand_vec(rows * d, 6, 1.0);
        let dout = rand_vec(rows * d, 7, 1.0);
        let (mut dgi, mut dgh, mut dh) =
            (vec![0.0; gi.len()], vec![0.0; gh.len()], vec![0.0; h.len()]);
        gru_gates_bwd(d, &gi, &gh, &h, &dout, &mut dgi, &mut dgh, &mut dh);
        let e = 1e-6;
        assert_grad(
            "dgi",
            &dgi,
            &fd_grad(&gi, e, |x| dot(&dout, &run(d, x, &gh, &h))),
            1e-6,
        );
        assert_grad(
            "dgh",
            &dgh,
            &fd_grad(&gh, e, |x| dot(&dout, &run(d, &gi, x, &h))),
            1e-6,
        );
        assert_grad(
            "dh",
            &dh,
            &fd_grad(&h, e, |x| dot(&dout, &run(d, &gi, &gh, x))),
            1e-6,
        );
    }
}
