//! Soft position embedding (model.md): a 4-channel grid [u, v, 1−u, 1−v] per pixel, with
//! `u = linspace(0, 1, H)[i]`, `v = linspace(0, 1, W)[j]`, mapped by a Linear(4 → C) with bias.
//! - encoder: ADDED to the feature map: y = x + pos (in place);
//! - decoder: each slot is broadcast to every pixel and pos added: `y[s, p] = z[s] + pos[p]`.
//!
//! Weight `[C, 4]` (nn.Linear), bias `[C]`.

use crate::real::Real;
use rayon::prelude::*;

/// The grid [u, v, 1−u, 1−v] for pixel (i, j) of an h×w image.
pub fn grid_cell(i: usize, j: usize, h: usize, w: usize) -> [f64; 4] {
    let u = if h > 1 {
        i as f64 / (h - 1) as f64
    } else {
        0.0
    };
    let v = if w > 1 {
        j as f64 / (w - 1) as f64
    } else {
        0.0
    };
    [u, v, 1.0 - u, 1.0 - v]
}

/// pos `[h·w, c]` = grid · Wᵀ + b.
pub fn pos_table<T: Real>(h: usize, w: usize, c: usize, wp: &[T], bp: &[T]) -> Vec<T> {
    let mut t = vec![T::zero(); h * w * c];
    for i in 0..h {
        for j in 0..w {
            let g = grid_cell(i, j, h, w);
            for ch in 0..c {
                let mut s = bp[ch];
                for (q, &gq) in g.iter().enumerate() {
                    s += wp[ch * 4 + q] * T::from_f64c(gq);
                }
                t[(i * w + j) * c + ch] = s;
            }
        }
    }
    t
}

/// dW `[c, 4]` += Σ_p grid[p] ⊗ s[p], db += Σ_p s[p], from the batch-summed gradient s `[h·w, c]`.
fn pos_table_bwd<T: Real>(h: usize, w: usize, c: usize, s: &[T], dwp: &mut [T], dbp: &mut [T]) {
    for i in 0..h {
        for j in 0..w {
            let g = grid_cell(i, j, h, w);
            let sp = &s[(i * w + j) * c..][..c];
            for ch in 0..c {
                for (q, &gq) in g.iter().enumerate() {
                    dwp[ch * 4 + q] += sp[ch] * T::from_f64c(gq);
                }
                dbp[ch] += sp[ch];
            }
        }
    }
}

/// Sum of `x` `[n, len]` over n, in a fixed order.
fn sum_over_batch<T: Real>(x: &[T], len: usize) -> Vec<T> {
    let mut s = vec![T::zero(); len];
    for img in x.chunks_exact(len) {
        s.iter_mut().zip(img).for_each(|(a, &b)| *a += b);
    }
    s
}

/// Encoder: x `[batch, h, w, c]` += pos.
pub fn softpos_add_fwd<T: Real>(h: usize, w: usize, c: usize, wp: &[T], bp: &[T], x: &mut [T]) {
    let pos = pos_table(h, w, c, wp, bp);
    x.par_chunks_mut(h * w * c)
        .for_each(|img| img.iter_mut().zip(&pos).for_each(|(a, &p)| *a += p));
}

/// Encoder backward: accumulates dW and db (dx = dy is the caller's pass-through).
pub fn softpos_add_bwd<T: Real>(
    h: usize,
    w: usize,
    c: usize,
    dy: &[T],
    dwp: &mut [T],
    dbp: &mut [T],
) {
    let s = sum_over_batch(dy, h * w * c);
    pos_table_bwd(h, w, c, &s, dwp, dbp);
}

/// Decoder: y `[n, h, w, c]` (overwritten) = z `[n, c]` broadcast to every pixel + pos.
#[allow(clippy::too_many_arguments)]
pub fn broadcast_pos_fwd<T: Real>(
    h: usize,
    w: usize,
    c: usize,
    z: &[T],
    wp: &[T],
    bp: &[T],
    y: &mut [T],
) {
    let pos = pos_table(h, w, c, wp, bp);
    y.par_chunks_mut(h * w * c)
        .zip(z.par_chunks(c))
        .for_each(|(img, zs)| {
            for (px, pp) in img.chunks_exact_mut(c).zip(pos.chunks_exact(c)) {
                for ch in 0..c {
                    px[ch] = zs[ch] + pp[ch];
                }
            }
        });
}

/// Decoder backward: accumulates dz `[n, c]`, dW and db.
#[allow(clippy::too_many_arguments)]
pub fn broadcast_pos_bwd<T: Real>(
    h: usize,
    w: usize,
    c: usize,
    dy: &[T],
    dz: &mut [T],
    dwp: &mut [T],
    dbp: &mut [T],
) {
    dz.par_chunks_mut(c)
        .zip(dy.par_chunks(h * w * c))
        .for_each(|(dzs, img)| {
            for px in img.chunks_exact(c) {
                dzs.iter_mut().zip(px).for_each(|(a, &b)| *a += b);
            }
        });
    let s = sum_over_batch(dy, h * w * c);
    pos_table_bwd(h, w, c, &s, dwp, dbp);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::*;

    #[test]
    fn grid_is_linspace() {
        assert_eq!(grid_cell(0, 0, 5, 3), [0.0, 0.0, 1.0, 1.0]);
        assert_eq!(grid_cell(4, 2, 5, 3), [1.0, 1.0, 0.0, 0.0]);
        assert_eq!(grid_cell(2, 1, 5, 3), [0.5, 0.5, 0.5, 0.5]);
    }

    #[test]
    fn forward_matches_naive_formula() {
        let (n, h, w, c) = (2, 3, 4, 5);
        let wp = rand_vec(c * 4, 1, 1.0);
        let bp = rand_vec(c, 2, 1.0);
        let x0 = rand_vec(n * h * w * c, 3, 1.0);
        let mut x = x0.clone();
        softpos_add_fwd(h, w, c, &wp, &bp, &mut x);
        let z = rand_vec(n * c, 4, 1.0);
        let mut y = vec![f64::NAN; n * h * w * c];
        broadcast_pos_fwd(h, w, c, &z, &wp, &bp, &mut y);
        for b in 0..n {
            for i in 0..h {
                for j in 0..w {
                    let (u, v) = (i as f64 / (h - 1) as f64, j as f64 / (w - 1) as f64);
                    for ch in 0..c {
                        let p = bp[ch]
                            + wp[ch * 4] * u
                            + wp[ch * 4 + 1] * v
                            + wp[ch * 4 + 2] * (1.0 - u)
                            + wp[ch * 4 + 3] * (1.0 - v);
                        let idx = ((b * h + i) * w + j) * c + ch;
                        assert!((x[idx] - x0[idx] - p).abs() < 1e-14);
                        assert!((y[idx] - z[b * c + ch] - p).abs() < 1e-14);
                    }
                }
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (n, h, w, c) = (2, 3, 4, 5);
        let wp = rand_vec(c * 4, 5, 1.0);
        let bp = rand_vec(c, 6, 1.0);
        let z = rand_vec(n * c, 7, 1.0);
        let dy = rand_vec(n * h * w * c, 8, 1.0);
        let enc = |wp: &[f64], bp: &[f64]| {
            let mut x = vec![0.0; n * h * w * c];
            softpos_add_fwd(h, w, c, wp, bp, &mut x);
            dot(&dy, &x)
        };
        let dec = |z: &[f64], wp: &[f64], bp: &[f64]| {
            let mut y = vec![0.0; n * h * w * c];
            broadcast_pos_fwd(h, w, c, z, wp, bp, &mut y);
            dot(&dy, &y)
        };
        let (mut dw, mut db) = (vec![0.0; wp.len()], vec![0.0; c]);
        softpos_add_bwd(h, w, c, &dy, &mut dw, &mut db);
        let e = 1e-6;
        assert_grad("enc dW", &dw, &fd_grad(&wp, e, |x| enc(x, &bp)), 1e-6);
        assert_grad("enc db", &db, &fd_grad(&bp, e, |x| enc(&wp, x)), 1e-6);
        let (mut dz, mut dw, mut db) = (vec![0.0; z.len()], vec![0.0; wp.len()], vec![0.0; c]);
        broadcast_pos_bwd(h, w, c, &dy, &mut dz, &mut dw, &mut db);
        assert_grad("dec dz", &dz, &fd_grad(&z, e, |x| dec(x, &wp, &bp)), 1e-6);
        assert_grad("dec dW", &dw, &fd_grad(&wp, e, |x| dec(&z, x, &bp)), 1e-6);
        assert_grad("dec db", &db, &fd_grad(&bp, e, |x| dec(&z, &wp, x)), 1e-6);
    }
}
