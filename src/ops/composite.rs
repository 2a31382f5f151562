//! Alpha compositing and the loss. The decoder emits 4 channels per slot and pixel:
//! `rgb = out[..3]`, `alpha = out[3]`. masks = softmax over the K slots of alpha;
//! recon = Σ_k masks_k · rgb_k; loss = mean over all pixels and channels of (recon − target)².
//! Layouts: dec `[B, K, P, 4]`, target and recon `[B, P, 3]`, masks `[B, K, P]`.

use crate::real::Real;
use rayon::prelude::*;

/// Forward: writes masks and recon, returns the mean squared error.
pub fn composite_mse_fwd<T: Real>(
    batch: usize,
    k: usize,
    p: usize,
    dec: &[T],
    target: &[T],
    masks: &mut [T],
    recon: &mut [T],
) -> T {
    assert_eq!(dec.len(), batch * k * p * 4);
    assert_eq!(target.len(), batch * p * 3);
    let sse: Vec<T> = masks
        .par_chunks_mut(k * p)
        .zip(recon.par_chunks_mut(p * 3))
        .enumerate()
        .map(|(b, (mb, rb))| {
            let db = &dec[b * k * p * 4..][..k * p * 4];
            let tb = &target[b * p * 3..][..p * 3];
            let mut sse = T::zero();
            for px in 0..p {
                let mut mx = T::neg_infinity();
                for s in 0..k {
                    mx = mx.max(db[(s * p + px) * 4 + 3]);
                }
                let mut z = T::zero();
                for s in 0..k {
                    let e = (db[(s * p + px) * 4 + 3] - mx).exp();
                    mb[s * p + px] = e;
                    z += e;
                }
                let mut rgb = [T::zero(); 3];
                for s in 0..k {
                    let m = mb[s * p + px] / z;
                    mb[s * p + px] = m;
                    for (c, v) in rgb.iter_mut().enumerate() {
                        *v += m * db[(s * p + px) * 4 + c];
                    }
                }
                for c in 0..3 {
                    rb[px * 3 + c] = rgb[c];
                    let e = rgb[c] - tb[px * 3 + c];
                    sse += e * e;
                }
            }
            sse
        })
        .collect();
    // Summed in batch order so the loss does not depend on the thread schedule.
    sse.into_iter().fold(T::zero(), |a, b| a + b) / T::from_f64c((batch * p * 3) as f64)
}

/// Backward of the loss times `dloss`: accumulates ddec `[B, K, P, 4]`.
#[allow(clippy::too_many_arguments)]
pub fn composite_mse_bwd<T: Real>(
    batch: usize,
    k: usize,
    p: usize,
    dec: &[T],
    target: &[T],
    masks: &[T],
    recon: &[T],
    dloss: T,
    ddec: &mut [T],
) {
    let scale = dloss * T::from_f64c(2.0 / (batch * p * 3) as f64);
    ddec.par_chunks_mut(k * p * 4)
        .enumerate()
        .for_each(|(b, gb)| {
            let db = &dec[b * k * p * 4..][..k * p * 4];
            let (tb, rb, mb) = (
                &target[b * p * 3..][..p * 3],
                &recon[b * p * 3..][..p * 3],
                &masks[b * k * p..][..k * p],
            );
            let mut dm = vec![T::zero(); k];
            for px in 0..p {
                let dr: [T; 3] = std::array::from_fn(|c| scale * (rb[px * 3 + c] - tb[px * 3 + c]));
                let mut dot = T::zero();
                for s in 0..k {
                    let m = mb[s * p + px];
                    let o = (s * p + px) * 4;
                    let mut g = T::zero();
                    for c in 0..3 {
                        gb[o + c] += dr[c] * m;
                        g += dr[c] * db[o + c];
                    }
                    dm[s] = g;
                    dot += g * m;
                }
                // Through the softmax over slots.
                for s in 0..k {
                    gb[(s * p + px) * 4 + 3] += mb[s * p + px] * (dm[s] - dot);
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::*;

    fn run(b: usize, k: usize, p: usize, dec: &[f64], t: &[f64]) -> (f64, Vec<f64>, Vec<f64>) {
        let (mut m, mut r) = (vec![f64::NAN; b * k * p], vec![f64::NAN; b * p * 3]);
        let l = composite_mse_fwd(b, k, p, dec, t, &mut m, &mut r);
        (l, m, r)
    }

    #[test]
    fn forward_matches_naive_formula() {
        let (b, k, p) = (2, 3, 5);
        let dec = rand_vec(b * k * p * 4, 1, 2.0);
        let t = rand_vec(b * p * 3, 2, 1.0);
        let (loss, masks, recon) = run(b, k, p, &dec, &t);
        let mut sse = 0.0;
        for bi in 0..b {
            for px in 0..p {
                let a = |s: usize| dec[((bi * k + s) * p + px) * 4 + 3];
                let z: f64 = (0..k).map(|s| a(s).exp()).sum();
                for c in 0..3 {
                    let r: f64 = (0..k)
                        .map(|s| a(s).exp() / z * dec[((bi * k + s) * p + px) * 4 + c])
                        .sum();
                    assert!((recon[(bi * p + px) * 3 + c] - r).abs() < 1e-14);
                    sse += (r - t[(bi * p + px) * 3 + c]).powi(2);
                }
                let msum: f64 = (0..k).map(|s| masks[(bi * k + s) * p + px]).sum();
                assert!((msum - 1.0).abs() < 1e-14);
            }
        }
        assert!((loss - sse / (b * p * 3) as f64).abs() < 1e-15);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (b, k, p) = (2, 3, 5);
        let dec = rand_vec(b * k * p * 4, 3, 2.0);
        let t = rand_vec(b * p * 3, 4, 1.0);
        let (_, m, r) = run(b, k, p, &dec, &t);
        let mut g = vec![0.0; dec.len()];
        composite_mse_bwd(b, k, p, &dec, &t, &m, &r, 1.5, &mut g);
        let fd = fd_grad(&dec, 1e-6, |x| 1.5 * run(b, k, p, x, &t).0);
        assert_grad("ddec", &g, &fd, 1e-6);
    }
}
