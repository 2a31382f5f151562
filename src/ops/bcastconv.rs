//! The spatial broadcast decoder's input and its first convolution as one op.
//!
//! Math, per slot s (z: `[S, C]`, S = batch · K), on an H × W grid:
//! ```text
//! x[s, p] = z[s] + pos(p)                       (spatial broadcast + soft position embedding)
//! y[s, p] = act(b + Σ_{tap valid at p} W_tap · x[s, p + tap])   (k × k conv, stride 1, "same")
//! ```
//!
//! Here it is composed from the single ops ([`bcast_conv_fwd_by_ops`], [`bcast_conv_bwd_by_ops`]):
//! that composition is the reference and the [`Backend`] trait's default. Because x is the same
//! vector at every pixel of a slot plus an image shared by every slot, the convolution splits:
//! ```text
//! y[s, p] = act(Σ_{tap valid at p} W_tap · z[s]  +  conv(pos)(p))
//! ```
//! and which taps are valid depends only on the pixel's distance to the border: k² classes of
//! pixels. So y needs k² matrix-vector products per slot plus one convolution of a single image
//! instead of a convolution of S images (32 GFLOP → 0.03 at the tetrominoes shapes, B = 64),
//! and the backward likewise (the gradient of z from per-class sums of dy, the weight gradient
//! from per-class outer products plus one single-image weight gradient). Both backends compute
//! it so for "same" stride-1 convolutions of grids at least k wide: the CPU with
//! [`bcast_conv_fwd_split`] / [`bcast_conv_bwd_split`] (tested against the composition in f64
//! below; the model's gradient check runs through it), CUDA with `kernels/bcastconv.cu` (tested
//! against the composition on the CPU: `tests/cuda.rs`, `bcast_conv_fwd_bwd_parity`).

use crate::backend::Backend;
use crate::ops::conv::{self, ConvGeom};
use crate::ops::posembed;
use crate::real::Real;
use rayon::prelude::*;

/// The op's shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BcastConvDims {
    /// Slots (images of the decoder): batch · K.
    pub slots: usize,
    /// The convolution: h_in × w_in × c_in (c_in: the slot width) → h_out × w_out × c_out.
    pub geom: ConvGeom,
}

impl BcastConvDims {
    /// Whether the split by border classes covers the convolution: "same" with stride 1, k at
    /// most 7 (the widest the CUDA kernels take), on a grid at least k wide. Every backend
    /// splits exactly then, and the model then passes placeholders for the broadcast input and
    /// its gradient, which only the composition reads.
    pub fn splits(&self) -> bool {
        let g = &self.geom;
        g.stride == 1
            && g.k == 2 * g.pad + 1
            && g.k <= 7
            && (g.h_out, g.w_out) == (g.h_in, g.w_in)
            && g.h_in >= g.k
            && g.w_in >= g.k
    }
}

/// The op's parameters: the position embedding (`[c_in][4]`, `[c_in]`) and the convolution
/// (PyTorch's `[c_out][c_in][k][k]`, `[c_out]`), with a ReLU after it when `relu`.
pub struct BcastConvParams<'a, Buf> {
    pub pos_w: &'a Buf,
    pub pos_b: &'a Buf,
    pub w: &'a Buf,
    pub b: &'a Buf,
    pub relu: bool,
}

/// The parameters' gradients (accumulated).
pub struct BcastConvGrads<'a, Buf> {
    pub pos_w: &'a mut Buf,
    pub pos_b: &'a mut Buf,
    pub w: &'a mut Buf,
    pub b: &'a mut Buf,
}

/// The forward by the single ops (the reference): y `[S, h_out, w_out, c_out]` overwritten; `x`
/// (`[S, h_in, w_in, c_in]`) receives the broadcast input, which the reference backward reads.
pub fn bcast_conv_fwd_by_ops<B: Backend + ?Sized>(
    be: &B,
    dims: &BcastConvDims,
    p: &BcastConvParams<'_, B::Buf>,
    z: &B::Buf,
    x: &mut B::Buf,
    y: &mut B::Buf,
) {
    let g = &dims.geom;
    assert_eq!(
        be.len(x),
        dims.slots * g.in_len(),
        "the composed op needs the broadcast input (a placeholder is only for split ops)"
    );
    be.broadcast_pos_fwd(g.h_in, g.w_in, g.c_in, z, p.pos_w, p.pos_b, x);
    be.conv2d_fwd(g, dims.slots, x, p.w, p.b, p.relu, y);
}

/// The backward by the single ops (the reference), from dy and the forward's y (and its x; z is
/// what a split backward reads instead): the gradient of z ADDED to `dz`, the parameter gradients
/// accumulated; `dx` is scratch of x's size.
#[allow(clippy::too_many_arguments)]
pub fn bcast_conv_bwd_by_ops<B: Backend + ?Sized>(
    be: &B,
    dims: &BcastConvDims,
    p: &BcastConvParams<'_, B::Buf>,
    _z: &B::Buf,
    x: &B::Buf,
    y: &B::Buf,
    dy: &B::Buf,
    dx: &mut B::Buf,
    dz: &mut B::Buf,
    g: BcastConvGrads<'_, B::Buf>,
) {
    let geom = &dims.geom;
    be.conv_bwd_set_dx(false, geom, dims.slots, x, p.w, y, p.relu, dy, dx, g.w, g.b);
    be.broadcast_pos_bwd(geom.h_in, geom.w_in, geom.c_in, dx, dz, g.pos_w, g.pos_b);
}

/// The border class of pixel `y` on an axis of `n` pixels (see the module doc): y for the first
/// `pad`, `pad` in the interior, y − n + 2·pad + 1 for the last `pad`.
fn class_of(y: usize, n: usize, pad: usize) -> usize {
    if y < pad {
        y
    } else if y + pad >= n {
        y + 2 * pad + 1 - n
    } else {
        pad
    }
}

/// The taps class `c` admits along its axis.
fn taps_of(c: usize, pad: usize) -> std::ops::RangeInclusive<usize> {
    let lo = pad.saturating_sub(c);
    let hi = if c > pad { 3 * pad - c } else { 2 * pad };
    lo..=hi
}

/// Wc `[k²][c_out][c_in]`: the weights summed over the taps each border class admits.
fn weight_classes<T: Real>(g: &ConvGeom, w: &[T]) -> Vec<T> {
    let (k, pad, o, c) = (g.k, g.pad, g.c_out, g.c_in);
    let mut wc = vec![T::zero(); k * k * o * c];
    for (cls, block) in wc.chunks_mut(o * c).enumerate() {
        for (oc, v) in block.iter_mut().enumerate() {
            let wo = &w[oc * k * k..][..k * k];
            for ky in taps_of(cls / k, pad) {
                for kx in taps_of(cls % k, pad) {
                    *v += wo[ky * k + kx];
                }
            }
        }
    }
    wc
}

/// The forward split by border classes (the CPU's own; the composition above is the reference
/// it is tested against): `y[s, p] = act(Wc[cls(p)]·z[s] + P[p])`. Needs [`BcastConvDims::splits`].
#[allow(clippy::too_many_arguments)]
pub fn bcast_conv_fwd_split<T: Real>(
    dims: &BcastConvDims,
    pos_w: &[T],
    pos_b: &[T],
    w: &[T],
    b: &[T],
    relu: bool,
    z: &[T],
    y: &mut [T],
) {
    assert!(dims.splits(), "{dims:?} does not split by border classes");
    let g = &dims.geom;
    let (h, wd, c, o, k, pad) = (g.h_in, g.w_in, g.c_in, g.c_out, g.k, g.pad);
    assert_eq!(z.len(), dims.slots * c);
    assert_eq!(y.len(), dims.slots * g.out_len());
    // P = conv(pos) + b: the position image (one image) through the convolution.
    let img = posembed::pos_table(h, wd, c, pos_w, pos_b);
    let mut p = vec![T::zero(); g.out_len()];
    conv::conv2d_fwd(g, 1, &img, w, b, false, &mut p);
    let wc = weight_classes(g, w);
    y.par_chunks_mut(g.out_len())
        .zip(z.par_chunks(c))
        .for_each(|(ys, zs)| {
            let zc: Vec<T> = wc
                .chunks(c)
                .map(|row| row.iter().zip(zs).map(|(&a, &v)| a * v).sum())
                .collect();
            for py in 0..h {
                for px in 0..wd {
                    let cls = class_of(py, h, pad) * k + class_of(px, wd, pad);
                    let at = (py * wd + px) * o;
                    for (j, out) in ys[at..at + o].iter_mut().enumerate() {
                        let v = zc[cls * o + j] + p[at + j];
                        *out = if relu && v < T::zero() { T::zero() } else { v };
                    }
                }
            }
        });
}

/// The backward split by border classes (see [`bcast_conv_fwd_split`]): the gradient of z ADDED
/// to `dz`, the parameter gradients accumulated.
#[allow(clippy::too_many_arguments)]
pub fn bcast_conv_bwd_split<T: Real>(
    dims: &BcastConvDims,
    pos_w: &[T],
    pos_b: &[T],
    w: &[T],
    relu: bool,
    z: &[T],
    y: &[T],
    dy: &[T],
    dz: &mut [T],
    g_pos_w: &mut [T],
    g_pos_b: &mut [T],
    g_w: &mut [T],
    g_b: &mut [T],
) {
    assert!(dims.splits(), "{dims:?} does not split by border classes");
    let g = &dims.geom;
    let (h, wd, c, o, k, pad) = (g.h_in, g.w_in, g.c_in, g.c_out, g.k, g.pad);
    let (ncls, len) = (k * k, g.out_len());
    assert_eq!(y.len(), dims.slots * len);
    assert_eq!(dy.len(), y.len());
    let grad = |i: usize| {
        if !relu || y[i] > T::zero() {
            dy[i]
        } else {
            T::zero()
        }
    };
    // Per slot, the sums of g over each class's pixels.
    let dzc: Vec<Vec<T>> = (0..dims.slots)
        .into_par_iter()
        .map(|s| {
            let mut acc = vec![T::zero(); ncls * o];
            for py in 0..h {
                for px in 0..wd {
                    let cls = class_of(py, h, pad) * k + class_of(px, wd, pad);
                    let at = s * len + (py * wd + px) * o;
                    for j in 0..o {
                        acc[cls * o + j] += grad(at + j);
                    }
                }
            }
            acc
        })
        .collect();
    // dP = Σ_s g (slots in order), then the position image's share through one image's
    // convolution backward (dP is already through the ReLU).
    let mut dp = vec![T::zero(); len];
    dp.par_chunks_mut(o).enumerate().for_each(|(pix, d)| {
        for s in 0..dims.slots {
            for (j, v) in d.iter_mut().enumerate() {
                *v += grad(s * len + pix * o + j);
            }
        }
    });
    let img = posembed::pos_table(h, wd, c, pos_w, pos_b);
    let mut dimg = vec![T::zero(); g.in_len()];
    conv::conv2d_bwd(g, 1, &img, w, &dp, false, &dp, Some(&mut dimg), g_w, g_b);
    posembed::softpos_add_bwd(h, wd, c, &dimg, g_pos_w, g_pos_b);
    // The slots' share: dz[s] += Σ_cls Wc[cls]ᵀ dZc[s, cls]; dW through the classes.
    let wc = weight_classes(g, w);
    dz.par_chunks_mut(c).zip(&dzc).for_each(|(d, acc)| {
        for (j, &gv) in acc.iter().enumerate() {
            for (dc, &wv) in d.iter_mut().zip(&wc[j * c..][..c]) {
                *dc += wv * gv;
            }
        }
    });
    // dWc[cls][o][c] = Σ_s dZc[s][cls][o]·z[s][c], then onto the taps each class admits.
    let mut dwc = vec![T::zero(); ncls * o * c];
    dwc.par_chunks_mut(c).enumerate().for_each(|(j, d)| {
        for (s, acc) in dzc.iter().enumerate() {
            let gv = acc[j];
            for (dc, &zv) in d.iter_mut().zip(&z[s * c..][..c]) {
                *dc += gv * zv;
            }
        }
    });
    for (oc, gw) in g_w.chunks_mut(k * k).enumerate() {
        for cls in 0..ncls {
            let v = dwc[cls * o * c + oc];
            for ky in taps_of(cls / k, pad) {
                for kx in taps_of(cls % k, pad) {
                    gw[ky * k + kx] += v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Cpu;
    use crate::ops::testutil::{rand_vec, rel_l2};

    /// The split against the composition (the reference), forward and backward, in f64: k = 5
    /// with a ReLU, k = 3 on a non-square grid, k = 7 on a grid exactly 7 wide.
    #[test]
    fn split_matches_the_composition() {
        let be = Cpu::<f64>::new();
        for (ci, &(slots, h, w, c_in, c_out, k, relu)) in [
            (3, 7, 7, 4, 5, 5, true),
            (2, 9, 6, 3, 4, 3, false),
            (2, 7, 8, 3, 2, 7, true),
        ]
        .iter()
        .enumerate()
        {
            let dims = BcastConvDims {
                slots,
                geom: ConvGeom::same(h, w, c_in, c_out, k),
            };
            assert!(dims.splits());
            let s = 100 * ci as u64;
            let lens = [4 * c_in, c_in, c_out * c_in * k * k, c_out];
            let t: Vec<Vec<f64>> = lens
                .iter()
                .enumerate()
                .map(|(i, &n)| rand_vec(n, s + i as u64, 1.0))
                .collect();
            let p = BcastConvParams {
                pos_w: &t[0],
                pos_b: &t[1],
                w: &t[2],
                b: &t[3],
                relu,
            };
            let z = rand_vec(slots * c_in, s + 10, 1.0);
            let (mut x, mut want) = (
                vec![0.0; slots * h * w * c_in],
                vec![0.0; slots * h * w * c_out],
            );
            bcast_conv_fwd_by_ops(&be, &dims, &p, &z, &mut x, &mut want);
            let mut got = vec![f64::NAN; want.len()];
            bcast_conv_fwd_split(&dims, p.pos_w, p.pos_b, p.w, p.b, relu, &z, &mut got);
            assert!(rel_l2(&got, &want) < 1e-12, "y {}", rel_l2(&got, &want));
            let dy = rand_vec(want.len(), s + 11, 1.0);
            let start: Vec<Vec<f64>> = [slots * c_in, 4 * c_in, c_in, lens[2], c_out]
                .iter()
                .enumerate()
                .map(|(i, &n)| rand_vec(n, s + 20 + i as u64, 0.5))
                .collect();
            let (mut r, mut o) = (start.clone(), start);
            let mut dx = vec![0.0; x.len()];
            let [dz, gpw, gpb, gw, gb] = &mut r[..] else {
                unreachable!()
            };
            let grads = BcastConvGrads {
                pos_w: gpw,
                pos_b: gpb,
                w: gw,
                b: gb,
            };
            bcast_conv_bwd_by_ops(&be, &dims, &p, &z, &x, &want, &dy, &mut dx, dz, grads);
            let [dz, gpw, gpb, gw, gb] = &mut o[..] else {
                unreachable!()
            };
            bcast_conv_bwd_split(
                &dims, p.pos_w, p.pos_b, p.w, relu, &z, &want, &dy, dz, gpw, gpb, gw, gb,
            );
            for (i, name) in ["dz", "d pos_w", "d pos_b", "dw", "db"].iter().enumerate() {
                let e = rel_l2(&o[i], &r[i]);
                assert!(e < 1e-12, "case {ci} {name}: {e:.2e}");
            }
        }
    }
}
