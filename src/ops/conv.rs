//! 2-D convolution and transposed convolution, channels-last activations, PyTorch weights.
//!
//! Math (per image, stride s, padding p, kernel k):
//! - conv: `y[oy,ox,co] = b[co] + Σ_{ci,ky,kx} W[co,ci,ky,kx] · x[oy·s−p+ky, ox·s−p+kx, ci]`
//! - transposed conv: the adjoint of that map with the roles of input and output swapped:
//!   `y[oy·s−p+ky, ox·s−p+kx, co] += W[ci,co,ky,kx] · x[oy,ox,ci]` (+ `b[co]`), with
//!   h_out = (h_in − 1)·s − 2p + k + output_padding (PyTorch's ConvTranspose2d).
//!
//! Optional ReLU after the bias. Both are computed as im2col + GEMM: a conv is
//! `cols(x) · Wᵀ`; a transposed conv is `col2im(x · W)`; the backward passes reuse the same two
//! gathers, which keeps the four cases short and obviously consistent.

use super::{par_backward, relu_mask, REDUCE_CHUNK};
use crate::real::Real;
use rayon::prelude::*;

/// Shape of one conv or transposed-conv layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub h_in: usize,
    pub w_in: usize,
    pub c_in: usize,
    pub h_out: usize,
    pub w_out: usize,
    pub c_out: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvGeom {
    /// A convolution: h_out = (h_in + 2·pad − k) / stride + 1.
    pub fn conv(
        h_in: usize,
        w_in: usize,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Self {
        let h_out = (h_in + 2 * pad - k) / stride + 1;
        let w_out = (w_in + 2 * pad - k) / stride + 1;
        Self {
            h_in,
            w_in,
            c_in,
            h_out,
            w_out,
            c_out,
            k,
            stride,
            pad,
        }
    }

    /// A 'same' convolution with an odd kernel and stride 1.
    pub fn same(h: usize, w: usize, c_in: usize, c_out: usize, k: usize) -> Self {
        Self::conv(h, w, c_in, c_out, k, 1, k / 2)
    }

    /// A transposed convolution: h_out = (h_in − 1)·stride − 2·pad + k + out_pad.
    #[allow(clippy::too_many_arguments)]
    pub fn transposed(
        h_in: usize,
        w_in: usize,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        pad: usize,
        out_pad: usize,
    ) -> Self {
        let h_out = (h_in - 1) * stride + k + out_pad - 2 * pad;
        let w_out = (w_in - 1) * stride + k + out_pad - 2 * pad;
        Self {
            h_in,
            w_in,
            c_in,
            h_out,
            w_out,
            c_out,
            k,
            stride,
            pad,
        }
    }

    pub fn in_len(&self) -> usize {
        self.h_in * self.w_in * self.c_in
    }
    pub fn out_len(&self) -> usize {
        self.h_out * self.w_out * self.c_out
    }
    pub fn weight_len(&self) -> usize {
        self.c_in * self.c_out * self.k * self.k
    }
    /// Multiply-adds per image of the convolution: every output position of `h_out × w_out`
    /// takes k²·c_in taps per output channel.
    pub fn macs(&self) -> usize {
        self.h_out * self.w_out * self.c_out * self.c_in * self.k * self.k
    }

    /// Multiply-adds per image when this geometry is a transposed convolution: every INPUT
    /// position scatters k² taps (a quarter of `macs()` for stride 2).
    pub fn macs_transposed(&self) -> usize {
        self.h_in * self.w_in * self.c_out * self.c_in * self.k * self.k
    }
}

/// The gather shared by all four passes: for a conv from a `[h, w, c]` image sampled at
/// `ho × wo` output positions, `cols[(oy·wo+ox), (ci·k+ky)·k+kx] = img[oy·s−p+ky, ox·s−p+kx, ci]`.
#[derive(Clone, Copy, Debug)]
struct Patches {
    h: usize,
    w: usize,
    c: usize,
    ho: usize,
    wo: usize,
    k: usize,
    s: usize,
    p: usize,
}

impl Patches {
    fn row_len(&self) -> usize {
        self.c * self.k * self.k
    }
    fn len(&self) -> usize {
        self.ho * self.wo * self.row_len()
    }

    /// Calls `f(col_start, image_start, len)` for every run of in-bounds taps of output position
    /// (oy, ox): `len` values starting at `col_start` in the row of cols correspond to `len`
    /// contiguous values of the image. Columns are ordered (ky, kx, channel), so every tap is a
    /// run of `c` channels, and with stride 1 a whole kernel row of taps is one run.
    #[inline]
    fn for_runs(&self, oy: usize, ox: usize, mut f: impl FnMut(usize, usize, usize)) {
        let (k, c, w) = (self.k, self.c, self.w as isize);
        let (s, p) = (self.s as isize, self.p as isize);
        for ky in 0..k {
            let iy = oy as isize * s - p + ky as isize;
            if iy < 0 || iy >= self.h as isize {
                continue;
            }
            let row_start = iy as usize * self.w;
            let ix0 = ox as isize * s - p;
            if s == 1 {
                // Taps kx in lo..hi are inside the image: one contiguous run.
                let lo = (-ix0).clamp(0, k as isize) as usize;
                let hi = (w - ix0).clamp(0, k as isize) as usize;
                if hi > lo {
                    let ix = (ix0 + lo as isize) as usize;
                    f((ky * k + lo) * c, (row_start + ix) * c, (hi - lo) * c);
                }
            } else {
                for kx in 0..k {
                    let ix = ix0 + kx as isize;
                    if ix >= 0 && ix < w {
                        f((ky * k + kx) * c, (row_start + ix as usize) * c, c);
                    }
                }
            }
        }
    }

    fn im2col<T: Real>(&self, img: &[T], cols: &mut [T]) {
        cols.fill(T::zero());
        let rl = self.row_len();
        for oy in 0..self.ho {
            for ox in 0..self.wo {
                let row = &mut cols[(oy * self.wo + ox) * rl..][..rl];
                self.for_runs(oy, ox, |col, idx, len| {
                    row[col..col + len].copy_from_slice(&img[idx..idx + len])
                });
            }
        }
    }

    fn col2im_add<T: Real>(&self, cols: &[T], img: &mut [T]) {
        let rl = self.row_len();
        for oy in 0..self.ho {
            for ox in 0..self.wo {
                let row = &cols[(oy * self.wo + ox) * rl..][..rl];
                self.for_runs(oy, ox, |col, idx, len| {
                    img[idx..idx + len]
                        .iter_mut()
                        .zip(&row[col..col + len])
                        .for_each(|(a, &b)| *a += b)
                });
            }
        }
    }
}

/// PyTorch weights `[outer, a, k, k]` → `[outer, k, k, a]`, the (ky, kx, channel) column order of
/// the gathers (a = in channels of a conv, out channels of a transposed conv).
fn to_tap_major<T: Real>(w: &[T], a: usize, k: usize) -> Vec<T> {
    let mut out = vec![T::zero(); w.len()];
    for (src, dst) in w
        .chunks_exact(a * k * k)
        .zip(out.chunks_exact_mut(a * k * k))
    {
        for ai in 0..a {
            for t in 0..k * k {
                dst[t * a + ai] = src[ai * k * k + t];
            }
        }
    }
    out
}

/// The inverse of [`to_tap_major`], accumulated: `dw += permute(g)`.
fn add_from_tap_major<T: Real>(g: &[T], a: usize, k: usize, dw: &mut [T]) {
    for (src, dst) in g
        .chunks_exact(a * k * k)
        .zip(dw.chunks_exact_mut(a * k * k))
    {
        for ai in 0..a {
            for t in 0..k * k {
                dst[ai * k * k + t] += src[t * a + ai];
            }
        }
    }
}

impl ConvGeom {
    /// Patches of the conv's input sampled at its output positions.
    fn conv_patches(&self) -> Patches {
        let g = *self;
        Patches {
            h: g.h_in,
            w: g.w_in,
            c: g.c_in,
            ho: g.h_out,
            wo: g.w_out,
            k: g.k,
            s: g.stride,
            p: g.pad,
        }
    }
    /// Patches of a transposed conv's OUTPUT sampled at its input positions (the adjoint conv).
    fn transposed_patches(&self) -> Patches {
        let g = *self;
        Patches {
            h: g.h_out,
            w: g.w_out,
            c: g.c_out,
            ho: g.h_in,
            wo: g.w_in,
            k: g.k,
            s: g.stride,
            p: g.pad,
        }
    }
}

fn add_bias_relu<T: Real>(y: &mut [T], bias: &[T], relu: bool) {
    for px in y.chunks_exact_mut(bias.len()) {
        for (v, &b) in px.iter_mut().zip(bias) {
            *v += b;
            if relu && *v < T::zero() {
                *v = T::zero();
            }
        }
    }
}

fn sum_rows_into<T: Real>(g: &[T], width: usize, db: &mut [T]) {
    for row in g.chunks_exact(width) {
        for (d, &v) in db.iter_mut().zip(row) {
            *d += v;
        }
    }
}

/// Forward conv over `batch` images: x `[batch, h_in, w_in, c_in]`, w `[c_out, c_in, k, k]`,
/// b `[c_out]` → y `[batch, h_out, w_out, c_out]` (overwritten).
pub fn conv2d_fwd<T: Real>(
    g: &ConvGeom,
    batch: usize,
    x: &[T],
    w: &[T],
    b: &[T],
    relu: bool,
    y: &mut [T],
) {
    assert_eq!(x.len(), batch * g.in_len());
    assert_eq!(y.len(), batch * g.out_len());
    assert_eq!(w.len(), g.weight_len());
    let pt = g.conv_patches();
    // Weights in the (ky, kx, channel) column order of the gathers.
    let wt = to_tap_major(w, g.c_in, g.k);
    let w = &wt[..];
    let rl = pt.row_len();
    y.par_chunks_mut(g.out_len())
        .zip(x.par_chunks(g.in_len()))
        .for_each_init(
            || vec![T::zero(); pt.len()],
            |cols, (yi, xi)| {
                pt.im2col(xi, cols);
                let m = g.h_out * g.w_out;
                // y[m, c_out] = cols[m, rl] · Wᵀ, W stored [c_out, rl].
                T::gemm(
                    m,
                    rl,
                    g.c_out,
                    T::one(),
                    cols,
                    rl as isize,
                    1,
                    w,
                    1,
                    rl as isize,
                    T::zero(),
                    yi,
                    g.c_out as isize,
                    1,
                );
                add_bias_relu(yi, b, relu);
            },
        );
}

/// Backward of [`conv2d_fwd`]: accumulates dx (if given), dw and db. `y` is the forward output
/// (used for the ReLU mask).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_bwd<T: Real>(
    g: &ConvGeom,
    batch: usize,
    x: &[T],
    w: &[T],
    y: &[T],
    relu: bool,
    dy: &[T],
    dx: Option<&mut [T]>,
    dw: &mut [T],
    db: &mut [T],
) {
    let pt = g.conv_patches();
    // Weights in the (ky, kx, channel) column order of the gathers.
    let wt = to_tap_major(w, g.c_in, g.k);
    let w = &wt[..];
    let mut dwt = vec![T::zero(); g.weight_len()];
    let (rl, m) = (pt.row_len(), g.h_out * g.w_out);
    let (il, ol) = (g.in_len(), g.out_len());
    let has_dx = dx.is_some();
    par_backward(
        batch,
        REDUCE_CHUNK,
        dx,
        il,
        &mut dwt,
        Some(db),
        g.c_out,
        |first, count, dx_chunk, pw, pb| {
            let mut cols = vec![T::zero(); pt.len()];
            for j in 0..count {
                let i = first + j;
                let gy = relu_mask(&dy[i * ol..][..ol], &y[i * ol..][..ol], relu);
                sum_rows_into(&gy, g.c_out, pb);
                // dW[c_out, rl] += gyᵀ · cols
                pt.im2col(&x[i * il..][..il], &mut cols);
                let (co, rli) = (g.c_out as isize, rl as isize);
                T::gemm(
                    g.c_out,
                    m,
                    rl,
                    T::one(),
                    &gy,
                    1,
                    co,
                    &cols,
                    rli,
                    1,
                    T::one(),
                    pw,
                    rli,
                    1,
                );
                if has_dx {
                    // dcols[m, rl] = gy · W ; dx += col2im(dcols)
                    T::gemm(
                        m,
                        g.c_out,
                        rl,
                        T::one(),
                        &gy,
                        co,
                        1,
                        w,
                        rli,
                        1,
                        T::zero(),
                        &mut cols,
                        rli,
                        1,
                    );
                    pt.col2im_add(&cols, &mut dx_chunk[j * il..][..il]);
                }
            }
        },
    );
    add_from_tap_major(&dwt, g.c_in, g.k, dw);
}

/// Forward transposed conv: x `[batch, h_in, w_in, c_in]`, w `[c_in, c_out, k, k]`, b `[c_out]`
/// → y `[batch, h_out, w_out, c_out]` (overwritten).
pub fn conv_t2d_fwd<T: Real>(
    g: &ConvGeom,
    batch: usize,
    x: &[T],
    w: &[T],
    b: &[T],
    relu: bool,
    y: &mut [T],
) {
    assert_eq!(x.len(), batch * g.in_len());
    assert_eq!(y.len(), batch * g.out_len());
    assert_eq!(w.len(), g.weight_len());
    let pt = g.transposed_patches();
    // Weights in the (ky, kx, channel) column order of the gathers.
    let wt = to_tap_major(w, g.c_out, g.k);
    let w = &wt[..];
    let rl = pt.row_len();
    y.par_chunks_mut(g.out_len())
        .zip(x.par_chunks(g.in_len()))
        .for_each_init(
            || vec![T::zero(); pt.len()],
            |cols, (yi, xi)| {
                let m = g.h_in * g.w_in;
                // cols[m, rl] = x[m, c_in] · W[c_in, rl]
                T::gemm(
                    m,
                    g.c_in,
                    rl,
                    T::one(),
                    xi,
                    g.c_in as isize,
                    1,
                    w,
                    rl as isize,
                    1,
                    T::zero(),
                    cols,
                    rl as isize,
                    1,
                );
                yi.fill(T::zero());
                pt.col2im_add(cols, yi);
                add_bias_relu(yi, b, relu);
            },
        );
}

/// Backward of [`conv_t2d_fwd`]: accumulates dx (if given), dw and db.
#[allow(clippy::too_many_arguments)]
pub fn conv_t2d_bwd<T: Real>(
    g: &ConvGeom,
    batch: usize,
    x: &[T],
    w: &[T],
    y: &[T],
    relu: bool,
    dy: &[T],
    dx: Option<&mut [T]>,
    dw: &mut [T],
    db: &mut [T],
) {
    let pt = g.transposed_patches();
    // Weights in the (ky, kx, channel) column order of the gathers.
    let wt = to_tap_major(w, g.c_out, g.k);
    let w = &wt[..];
    let mut dwt = vec![T::zero(); g.weight_len()];
    let (rl, m) = (pt.row_len(), g.h_in * g.w_in);
    let (il, ol) = (g.in_len(), g.out_len());
    let has_dx = dx.is_some();
    par_backward(
        batch,
        REDUCE_CHUNK,
        dx,
        il,
        &mut dwt,
        Some(db),
        g.c_out,
        |first, count, dx_chunk, pw, pb| {
            let mut cols = vec![T::zero(); pt.len()];
            for j in 0..count {
                let i = first + j;
                let gy = relu_mask(&dy[i * ol..][..ol], &y[i * ol..][..ol], relu);
                sum_rows_into(&gy, g.c_out, pb);
                pt.im2col(&gy, &mut cols);
                let (ci, rli) = (g.c_in as isize, rl as isize);
                // dW[c_in, rl] += xᵀ · dcols
                T::gemm(
                    g.c_in,
                    m,
                    rl,
                    T::one(),
                    &x[i * il..][..il],
                    1,
                    ci,
                    &cols,
                    rli,
                    1,
                    T::one(),
                    pw,
                    rli,
                    1,
                );
                if has_dx {
                    // dx[m, c_in] += dcols · Wᵀ
                    let dxi = &mut dx_chunk[j * il..][..il];
                    T::gemm(
                        m,
                        rl,
                        g.c_in,
                        T::one(),
                        &cols,
                        rli,
                        1,
                        w,
                        1,
                        rli,
                        T::one(),
                        dxi,
                        ci,
                        1,
                    );
                }
            }
        },
    );
    add_from_tap_major(&dwt, g.c_out, g.k, dw);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::*;

    /// PyTorch's Conv2d written out directly (NCHW semantics on NHWC storage).
    fn naive_conv(
        g: &ConvGeom,
        batch: usize,
        x: &[f64],
        w: &[f64],
        b: &[f64],
        relu: bool,
    ) -> Vec<f64> {
        let mut y = vec![0.0; batch * g.out_len()];
        for n in 0..batch {
            for oy in 0..g.h_out {
                for ox in 0..g.w_out {
                    for co in 0..g.c_out {
                        let mut s = b[co];
                        for ci in 0..g.c_in {
                            for ky in 0..g.k {
                                for kx in 0..g.k {
                                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                                    let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                                    if iy < 0
                                        || ix < 0
                                        || iy >= g.h_in as isize
                                        || ix >= g.w_in as isize
                                    {
                                        continue;
                                    }
                                    let xv = x[n * g.in_len()
                                        + (iy as usize * g.w_in + ix as usize) * g.c_in
                                        + ci];
                                    s += w[((co * g.c_in + ci) * g.k + ky) * g.k + kx] * xv;
                                }
                            }
                        }
                        y[n * g.out_len() + (oy * g.w_out + ox) * g.c_out + co] =
                            if relu { s.max(0.0) } else { s };
                    }
                }
            }
        }
        y
    }

    /// PyTorch's ConvTranspose2d written out directly (scatter form).
    fn naive_conv_t(
        g: &ConvGeom,
        batch: usize,
        x: &[f64],
        w: &[f64],
        b: &[f64],
        relu: bool,
    ) -> Vec<f64> {
        let mut y = vec![0.0; batch * g.out_len()];
        for n in 0..batch {
            for px in 0..g.h_out * g.w_out {
                for co in 0..g.c_out {
                    y[n * g.out_len() + px * g.c_out + co] = b[co];
                }
            }
            for iy in 0..g.h_in {
                for ix in 0..g.w_in {
                    for ci in 0..g.c_in {
                        let xv = x[n * g.in_len() + (iy * g.w_in + ix) * g.c_in + ci];
                        for co in 0..g.c_out {
                            for ky in 0..g.k {
                                for kx in 0..g.k {
                                    let oy = (iy * g.stride + ky) as isize - g.pad as isize;
                                    let ox = (ix * g.stride + kx) as isize - g.pad as isize;
                                    if oy < 0
                                        || ox < 0
                                        || oy >= g.h_out as isize
                                        || ox >= g.w_out as isize
                                    {
                                        continue;
                                    }
                                    y[n * g.out_len()
                                        + (oy as usize * g.w_out + ox as usize) * g.c_out
                                        + co] +=
                                        w[((ci * g.c_out + co) * g.k + ky) * g.k + kx] * xv;
                                }
                            }
                        }
                    }
                }
            }
        }
        if relu {
            y.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        y
    }

    fn geoms() -> Vec<(ConvGeom, bool)> {
        vec![
            (ConvGeom::same(7, 6, 3, 4, 5), false),
            (ConvGeom::same(5, 5, 2, 3, 3), true),
            (ConvGeom::conv(9, 8, 2, 3, 5, 2, 2), false),
            (ConvGeom::transposed(4, 3, 3, 2, 5, 2, 2, 1), true),
            (ConvGeom::transposed(5, 5, 2, 3, 5, 1, 2, 0), false),
            (ConvGeom::transposed(6, 4, 3, 4, 3, 1, 1, 0), false),
        ]
    }

    #[test]
    fn transposed_shapes_match_pytorch() {
        // 8 → 16 with k5 s2 p2 output_padding 1 (the official 'same' stride-2 upsampling).
        let g = ConvGeom::transposed(8, 8, 64, 64, 5, 2, 2, 1);
        assert_eq!((g.h_out, g.w_out), (16, 16));
        let g = ConvGeom::transposed(35, 35, 32, 4, 3, 1, 1, 0);
        assert_eq!((g.h_out, g.w_out), (35, 35));
    }

    fn run(
        g: &ConvGeom,
        transposed: bool,
        batch: usize,
        x: &[f64],
        w: &[f64],
        b: &[f64],
        relu: bool,
    ) -> Vec<f64> {
        let mut y = vec![f64::NAN; batch * g.out_len()];
        if transposed {
            conv_t2d_fwd(g, batch, x, w, b, relu, &mut y);
        } else {
            conv2d_fwd(g, batch, x, w, b, relu, &mut y);
        }
        y
    }

    #[test]
    fn forward_matches_naive_formula() {
        for (i, &(g, relu)) in geoms().iter().enumerate() {
            let transposed = i >= 3;
            let batch = 3;
            let x = rand_vec(batch * g.in_len(), 1 + i as u64, 1.0);
            let w = rand_vec(g.weight_len(), 10 + i as u64, 0.5);
            let b = rand_vec(g.c_out, 20 + i as u64, 0.5);
            let y = run(&g, transposed, batch, &x, &w, &b, relu);
            let want = if transposed {
                naive_conv_t(&g, batch, &x, &w, &b, relu)
            } else {
                naive_conv(&g, batch, &x, &w, &b, relu)
            };
            assert!(
                rel_l2(&y, &want) < 1e-13,
                "case {i} {g:?}: {}",
                rel_l2(&y, &want)
            );
        }
    }

    #[test]
    fn f32_forward_close_to_f64() {
        let g = ConvGeom::same(6, 6, 3, 4, 5);
        let x = rand_vec(2 * g.in_len(), 1, 1.0);
        let w = rand_vec(g.weight_len(), 2, 0.5);
        let b = rand_vec(4, 3, 0.5);
        let y64 = run(&g, false, 2, &x, &w, &b, false);
        let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        let mut y32 = vec![0f32; y64.len()];
        conv2d_fwd(&g, 2, &f(&x), &f(&w), &f(&b), false, &mut y32);
        let y32: Vec<f64> = y32.iter().map(|&a| a as f64).collect();
        assert!(rel_l2(&y32, &y64) < 1e-6);
    }

    #[test]
    fn backward_matches_finite_differences() {
        for (i, &(g, relu)) in geoms().iter().enumerate() {
            let transposed = i >= 3;
            let batch = 5; // more than REDUCE_CHUNK, so the partial sums are exercised
            let x = rand_vec(batch * g.in_len(), 30 + i as u64, 1.0);
            let w = rand_vec(g.weight_len(), 40 + i as u64, 0.5);
            let b = rand_vec(g.c_out, 50 + i as u64, 0.5);
            let dy = rand_vec(batch * g.out_len(), 60 + i as u64, 1.0);
            let y = run(&g, transposed, batch, &x, &w, &b, relu);
            let (mut dx, mut dw, mut db) = (
                vec![0.5; x.len()],
                vec![0.25; w.len()],
                vec![0.125; b.len()],
            );
            if transposed {
                conv_t2d_bwd(
                    &g,
                    batch,
                    &x,
                    &w,
                    &y,
                    relu,
                    &dy,
                    Some(&mut dx),
                    &mut dw,
                    &mut db,
                );
            } else {
                conv2d_bwd(
                    &g,
                    batch,
                    &x,
                    &w,
                    &y,
                    relu,
                    &dy,
                    Some(&mut dx),
                    &mut dw,
                    &mut db,
                );
            }
            // The backward accumulates: subtract the initial values back out.
            dx.iter_mut().for_each(|v| *v -= 0.5);
            dw.iter_mut().for_each(|v| *v -= 0.25);
            db.iter_mut().for_each(|v| *v -= 0.125);
            let h = 1e-6;
            let fx = fd_grad(&x, h, |x| {
                dot(&dy, &run(&g, transposed, batch, x, &w, &b, relu))
            });
            let fw = fd_grad(&w, h, |w| {
                dot(&dy, &run(&g, transposed, batch, &x, w, &b, relu))
            });
            let fb = fd_grad(&b, h, |b| {
                dot(&dy, &run(&g, transposed, batch, &x, &w, b, relu))
            });
            assert_grad(&format!("case {i} dx"), &dx, &fx, 1e-6);
            assert_grad(&format!("case {i} dw"), &dw, &fw, 1e-6);
            assert_grad(&format!("case {i} db"), &db, &fb, 1e-6);
        }
    }
}
