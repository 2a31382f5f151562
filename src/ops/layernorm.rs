//! LayerNorm over the last dimension: y = (x − mean) / sqrt(var + 1e-5) · γ + β.
//! eps = 1e-5 is PyTorch's default (the official TF code uses Keras' 1e-3); we follow PyTorch so
//! that checkpoints behave identically when loaded there.

use super::par_chunks_reduce;
use crate::real::Real;
use rayon::prelude::*;

pub const LN_EPS: f64 = 1e-5;
const ROW_CHUNK: usize = 1024;

/// Normalises each row of x `[rows, dim]` into y; saves each row's mean and 1/std for backward.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_fwd<T: Real>(
    rows: usize,
    dim: usize,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    y: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
) {
    assert_eq!(x.len(), rows * dim);
    assert_eq!(y.len(), rows * dim);
    let n = T::from_f64c(dim as f64);
    let eps = T::from_f64c(LN_EPS);
    y.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .for_each(|((yr, xr), (m, rs))| {
            let mu = xr.iter().copied().sum::<T>() / n;
            let var = xr.iter().map(|&v| (v - mu) * (v - mu)).sum::<T>() / n;
            let r = T::one() / (var + eps).sqrt();
            for i in 0..dim {
                yr[i] = (xr[i] - mu) * r * gamma[i] + beta[i];
            }
            *m = mu;
            *rs = r;
        });
}

/// Backward of [`layernorm_fwd`]: accumulates dx, dγ and dβ.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd<T: Real>(
    rows: usize,
    dim: usize,
    x: &[T],
    gamma: &[T],
    mean: &[T],
    rstd: &[T],
    dy: &[T],
    dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
) {
    let n = T::from_f64c(dim as f64);
    let mut grads = vec![T::zero(); 2 * dim];
    par_chunks_reduce(
        rows,
        ROW_CHUNK,
        dx,
        dim,
        &mut grads,
        |first, count, dxc, part| {
            let (pg, pb) = part.split_at_mut(dim);
            for j in 0..count {
                let r = first + j;
                let (xr, dyr) = (&x[r * dim..][..dim], &dy[r * dim..][..dim]);
                let (mu, rs) = (mean[r], rstd[r]);
                // With x̂ = (x − μ)·r and g = dy·γ: dx = r · (g − mean(g) − x̂ · mean(g·x̂)).
                let mut mg = T::zero();
                let mut mgx = T::zero();
                for i in 0..dim {
                    let xh = (xr[i] - mu) * rs;
                    let g = dyr[i] * gamma[i];
                    mg += g;
                    mgx += g * xh;
                    pg[i] += dyr[i] * xh;
                    pb[i] += dyr[i];
                }
                mg /= n;
                mgx /= n;
                let dxr = &mut dxc[j * dim..][..dim];
                for i in 0..dim {
                    let xh = (xr[i] - mu) * rs;
                    dxr[i] += rs * (dyr[i] * gamma[i] - mg - xh * mgx);
                }
            }
        },
    );
    dgamma
        .iter_mut()
        .zip(&grads[..dim])
        .for_each(|(d, &v)| *d += v);
    dbeta
        .iter_mut()
        .zip(&grads[dim..])
        .for_each(|(d, &v)| *d += v);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::*;

    fn run(
        rows: usize,
        dim: usize,
        x: &[f64],
        g: &[f64],
        b: &[f64],
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (mut y, mut m, mut r) = (
            vec![f64::NAN; rows * dim],
            vec![f64::NAN; rows],
            vec![f64::NAN; rows],
        );
        layernorm_fwd(rows, dim, x, g, b, &mut y, &mut m, &mut r);
        (y, m, r)
    }

    #[test]
    fn forward_matches_naive_formula() {
        let (rows, dim) = (4, 6);
        let x = rand_vec(rows * dim, 1, 2.0);
        let g = rand_vec(dim, 2, 1.0);
        let b = rand_vec(dim, 3, 1.0);
        let (y, _, _) = run(rows, dim, &x, &g, &b);
        for r in 0..rows {
            let xr = &x[r * dim..][..dim];
            let mu: f64 = xr.iter().sum::<f64>() / dim as f64;
            let var: f64 = xr.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / dim as f64;
            for i in 0..dim {
                let want = (xr[i] - mu) / (var + LN_EPS).sqrt() * g[i] + b[i];
                assert!((y[r * dim + i] - want).abs() < 1e-13);
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (rows, dim) = (ROW_CHUNK + 5, 5);
        let x = rand_vec(rows * dim, 4, 2.0);
        let g = rand_vec(dim, 5, 1.0);
        let b = rand_vec(dim, 6, 1.0);
        let dy = rand_vec(rows * dim, 7, 1.0);
        let (_, m, r) = run(rows, dim, &x, &g, &b);
        let (mut dx, mut dg, mut db) = (vec![0.0; x.len()], vec![0.0; dim], vec![0.0; dim]);
        layernorm_bwd(rows, dim, &x, &g, &m, &r, &dy, &mut dx, &mut dg, &mut db);
        let h = 1e-6;
        let small = 3 * dim; // finite differences on the first rows of x only: each row is independent
        let fx = fd_grad(&x[..small], h, |xs| {
            let mut xx = x.clone();
            xx[..small].copy_from_slice(xs);
            dot(&dy, &run(rows, dim, &xx, &g, &b).0)
        });
        assert_grad("dx", &dx[..small], &fx, 1e-6);
        let fg = fd_grad(&g, h, |g| dot(&dy, &run(rows, dim, &x, g, &b).0));
        let fb = fd_grad(&b, h, |b| dot(&dy, &run(rows, dim, &x, &g, b).0));
        assert_grad("dgamma", &dg, &fg, 1e-6);
        assert_grad("dbeta", &db, &fb, 1e-6);
    }
}
