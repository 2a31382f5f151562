//! The slot-attention step: logits, softmax over the SLOTS, +eps, normalisation over the inputs,
//! weighted mean of the values. Per head h (channels h·dh .. (h+1)·dh, dh = D / heads):
//!
//! ```text
//! logit[n,k] = scale · Σ_d k[n,d] q[k,d]
//! p[n,·]     = softmax_k(logit[n,·])            (saved for backward, layout [B, H, N, K])
//! a[n,k]     = p[n,k] + eps,   S[k] = Σ_n a[n,k],   w[n,k] = a[n,k] / S[k]
//! upd[k,d]   = Σ_n w[n,k] v[n,d]
//! ```
//!
//! k, v are `[B, N, D]`, q and upd are `[B, K, D]`.

use crate::real::Real;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnDims {
    pub batch: usize,
    /// Inputs per image (N = H·W tokens).
    pub n: usize,
    /// Slots.
    pub k: usize,
    /// Slot / attention size D.
    pub d: usize,
    pub heads: usize,
    /// Multiplies the logits: 1/sqrt(D / heads).
    pub scale: f64,
    pub eps: f64,
}

impl AttnDims {
    pub fn head_dim(&self) -> usize {
        self.d / self.heads
    }
    /// Elements of the saved softmax `[B, H, N, K]`.
    pub fn attn_len(&self) -> usize {
        self.batch * self.heads * self.n * self.k
    }
}

/// Forward. Writes p (`attn`, `[B,H,N,K]`) and `upd` (`[B,K,D]`); both overwritten.
pub fn attention_fwd<T: Real>(
    dm: &AttnDims,
    kk: &[T],
    v: &[T],
    q: &[T],
    attn: &mut [T],
    upd: &mut [T],
) {
    let AttnDims { n, k, d, heads, .. } = *dm;
    let dh = dm.head_dim();
    assert_eq!(kk.len(), dm.batch * n * d);
    assert_eq!(q.len(), dm.batch * k * d);
    assert_eq!(attn.len(), dm.attn_len());
    let (scale, eps) = (T::from_f64c(dm.scale), T::from_f64c(dm.eps));
    attn.par_chunks_mut(heads * n * k)
        .zip(upd.par_chunks_mut(k * d))
        .enumerate()
        .for_each(|(b, (attn_b, upd_b))| {
            let (kb, vb, qb) = (
                &kk[b * n * d..][..n * d],
                &v[b * n * d..][..n * d],
                &q[b * k * d..][..k * d],
            );
            upd_b.fill(T::zero());
            let mut colsum = vec![T::zero(); k];
            for h in 0..heads {
                let p_h = &mut attn_b[h * n * k..][..n * k];
                colsum.fill(T::zero());
                for t in 0..n {
                    let kt = &kb[t * d + h * dh..][..dh];
                    let row = &mut p_h[t * k..][..k];
                    let mut mx = T::neg_infinity();
                    for s in 0..k {
                        let qs = &qb[s * d + h * dh..][..dh];
                        let l = scale * kt.iter().zip(qs).map(|(&a, &b)| a * b).sum::<T>();
                        row[s] = l;
                        mx = mx.max(l);
                    }
                    let mut z = T::zero();
                    for r in row.iter_mut() {
                        *r = (*r - mx).exp();
                        z += *r;
                    }
                    for (s, r) in row.iter_mut().enumerate() {
                        *r /= z;
                        colsum[s] += *r + eps;
                    }
                }
                for t in 0..n {
                    let vt = &vb[t * d + h * dh..][..dh];
                    for s in 0..k {
                        let w = (p_h[t * k + s] + eps) / colsum[s];
                        let us = &mut upd_b[s * d + h * dh..][..dh];
                        us.iter_mut().zip(vt).for_each(|(u, &vv)| *u += w * vv);
                    }
                }
            }
        });
}

/// Backward: from d(upd), accumulates dk, dv (`[B,N,D]`) and dq (`[B,K,D]`).
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<T: Real>(
    dm: &AttnDims,
    kk: &[T],
    v: &[T],
    q: &[T],
    attn: &[T],
    dupd: &[T],
    dk: &mut [T],
    dv: &mut [T],
    dq: &mut [T],
) {
    attention_bwd_into(dm, kk, v, q, attn, dupd, dk, Some(dv), dq)
}

/// Backward when k and v are the same tensor x: accumulates d k + d v into dx (and dq).
pub fn attention_bwd_same_kv<T: Real>(
    dm: &AttnDims,
    x: &[T],
    q: &[T],
    attn: &[T],
    dupd: &[T],
    dx: &mut [T],
    dq: &mut [T],
) {
    attention_bwd_into(dm, x, x, q, attn, dupd, dx, None, dq)
}

/// The backward, with v's gradient added into dk when `dv` is None.
#[allow(clippy::too_many_arguments)]
fn attention_bwd_into<T: Real>(
    dm: &AttnDims,
    kk: &[T],
    v: &[T],
    q: &[T],
    attn: &[T],
    dupd: &[T],
    dk: &mut [T],
    dv: Option<&mut [T]>,
    dq: &mut [T],
) {
    let AttnDims { n, k, d, heads, .. } = *dm;
    let dh = dm.head_dim();
    let (scale, eps) = (T::from_f64c(dm.scale), T::from_f64c(dm.eps));
    let dv_chunks: Vec<Option<&mut [T]>> = match dv {
        Some(dv) => dv.chunks_mut(n * d).map(Some).collect(),
        None => (0..dm.batch).map(|_| None).collect(),
    };
    dk.par_chunks_mut(n * d)
        .zip(dv_chunks)
        .zip(dq.par_chunks_mut(k * d))
        .enumerate()
        .for_each(|(b, ((dk_b, mut dv_b), dq_b))| {
            let (kb, vb, qb) = (
                &kk[b * n * d..][..n * d],
                &v[b * n * d..][..n * d],
                &q[b * k * d..][..k * d],
            );
            let du = &dupd[b * k * d..][..k * d];
            let mut colsum = vec![T::zero(); k];
            let mut c = vec![T::zero(); k];
            let mut dw = vec![T::zero(); n * k];
            let mut da = vec![T::zero(); k];
            for h in 0..heads {
                let p_h = &attn[(b * heads + h) * n * k..][..n * k];
                colsum.fill(T::zero());
                for t in 0..n {
                    for s in 0..k {
                        colsum[s] += p_h[t * k + s] + eps;
                    }
                }
                // Pass 1: dw[n,k] = <dU[k], v[n]> and c[k] = Σ_n dw·w; dv from the weights.
                c.fill(T::zero());
                for t in 0..n {
                    let vt = &vb[t * d + h * dh..][..dh];
                    let dvt = match dv_b.as_deref_mut() {
                        Some(dv_b) => &mut dv_b[t * d + h * dh..][..dh],
                        None => &mut dk_b[t * d + h * dh..][..dh],
                    };
                    for s in 0..k {
                        let dus = &du[s * d + h * dh..][..dh];
                        let w = (p_h[t * k + s] + eps) / colsum[s];
                        let g = dus.iter().zip(vt).map(|(&a, &b)| a * b).sum::<T>();
                        dw[t * k + s] = g;
                        c[s] += g * w;
                        dvt.iter_mut().zip(dus).for_each(|(o, &u)| *o += w * u);
                    }
                }
                // Pass 2: through the normalisation over inputs, then the softmax over slots.
                for t in 0..n {
                    let prow = &p_h[t * k..][..k];
                    let mut dot = T::zero();
                    for s in 0..k {
                        da[s] = (dw[t * k + s] - c[s]) / colsum[s];
                        dot += da[s] * prow[s];
                    }
                    let kt = &kb[t * d + h * dh..][..dh];
                    let dkt = &mut dk_b[t * d + h * dh..][..dh];
                    for s in 0..k {
                        let dl = scale * prow[s] * (da[s] - dot);
                        let qs = &qb[s * d + h * dh..][..dh];
                        dkt.iter_mut().zip(qs).for_each(|(o, &qq)| *o += dl * qq);
                        let dqs = &mut dq_b[s * d + h * dh..][..dh];
                        dqs.iter_mut().zip(kt).for_each(|(o, &kv)| *o += dl * kv);
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::*;

    fn dims(heads: usize) -> AttnDims {
        AttnDims {
            batch: 2,
            n: 7,
            k: 3,
            d: 4,
            heads,
            scale: 1.0 / ((4 / heads) as f64).sqrt(),
            eps: 1e-8,
        }
    }

    fn run(dm: &AttnDims, kk: &[f64], v: &[f64], q: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let mut attn = vec![f64::NAN; dm.attn_len()];
        let mut upd = vec![f64::NAN; dm.batch * dm.k * dm.d];
        attention_fwd(dm, kk, v, q, &mut attn, &mut upd);
        (attn, upd)
    }

    /// The textbook formula, one output element at a time.
    fn naive(dm: &AttnDims, kk: &[f64], v: &[f64], q: &[f64]) -> Vec<f64> {
        let AttnDims {
            batch,
            n,
            k,
            d,
            heads,
            scale,
            eps,
        } = *dm;
        let dh = d / heads;
        let mut out = vec![0.0; batch * k * d];
        for b in 0..batch {
            for h in 0..heads {
                let logit = |t: usize, s: usize| {
                    (0..dh)
                        .map(|j| kk[(b * n + t) * d + h * dh + j] * q[(b * k + s) * d + h * dh + j])
                        .sum::<f64>()
                        * scale
                };
                let p = |t: usize, s: usize| {
                    let z: f64 = (0..k).map(|s2| logit(t, s2).exp()).sum();
                    logit(t, s).exp() / z + eps
                };
                for s in 0..k {
                    let total: f64 = (0..n).map(|t| p(t, s)).sum();
                    for j in 0..dh {
                        out[(b * k + s) * d + h * dh + j] = (0..n)
                            .map(|t| p(t, s) / total * v[(b * n + t) * d + h * dh + j])
                            .sum::<f64>();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn forward_matches_naive_formula() {
        for heads in [1, 2] {
            let dm = dims(heads);
            let kk = rand_vec(dm.batch * dm.n * dm.d, 1, 1.5);
            let v = rand_vec(dm.batch * dm.n * dm.d, 2, 1.0);
            let q = rand_vec(dm.batch * dm.k * dm.d, 3, 1.5);
            let (attn, upd) = run(&dm, &kk, &v, &q);
            assert!(rel_l2(&upd, &naive(&dm, &kk, &v, &q)) < 1e-13);
            // The softmax is over the slots: every (b, h, n) row sums to 1.
            for row in attn.chunks(dm.k) {
                assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-14);
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        for heads in [1, 2] {
            let mut dm = dims(heads);
            dm.eps = 1e-2; // a visible eps, so its effect on the normalisation is checked too
            let kk = rand_vec(dm.batch * dm.n * dm.d, 4, 1.5);
            let v = rand_vec(dm.batch * dm.n * dm.d, 5, 1.0);
            let q = rand_vec(dm.batch * dm.k * dm.d, 6, 1.5);
            let du = rand_vec(dm.batch * dm.k * dm.d, 7, 1.0);
            let (attn, _) = run(&dm, &kk, &v, &q);
            let (mut dk, mut dv, mut dq) =
                (vec![0.0; kk.len()], vec![0.0; v.len()], vec![0.0; q.len()]);
            attention_bwd(&dm, &kk, &v, &q, &attn, &du, &mut dk, &mut dv, &mut dq);
            let h = 1e-6;
            let fk = fd_grad(&kk, h, |x| dot(&du, &run(&dm, x, &v, &q).1));
            let fv = fd_grad(&v, h, |x| dot(&du, &run(&dm, &kk, x, &q).1));
            let fq = fd_grad(&q, h, |x| dot(&du, &run(&dm, &kk, &v, x).1));
            assert_grad("dk", &dk, &fk, 1e-6);
            assert_grad("dv", &dv, &fv, 1e-6);
            assert_grad("dq", &dq, &fq, 1e-6);
            // k = v = x: the same-tensor backward against finite differences in x.
            let (mut dx, mut dq2) = (vec![0.0; kk.len()], vec![0.0; q.len()]);
            let (attn_x, _) = run(&dm, &kk, &kk, &q);
            attention_bwd_same_kv(&dm, &kk, &q, &attn_x, &du, &mut dx, &mut dq2);
            let fx = fd_grad(&kk, h, |x| dot(&du, &run(&dm, x, x, &q).1));
            let fq2 = fd_grad(&q, h, |x| dot(&du, &run(&dm, &kk, &kk, x).1));
            assert_grad("dx (k = v = x)", &dx, &fx, 1e-6);
            assert_grad("dq (k = v = x)", &dq2, &fq2, 1e-6);
        }
    }
}
