//! The spatial broadcast decoder's input and its first convolution as one op.
//!
//! Math, per slot s (z: `[S, C]`, S = batch · K), on an H × W grid:
//!   x[s, p] = z[s] + pos(p)                       (spatial broadcast + soft position embedding)
//!   y[s, p] = act(b + Σ_{tap valid at p} W_tap · x[s, p + tap])   (k × k conv, stride 1, "same")
//!
//! Here it is composed from the single ops ([`bcast_conv_fwd_by_ops`], [`bcast_conv_bwd_by_ops`]):
//! that composition is the reference and the [`Backend`] trait's default. Because x is the same
//! vector at every pixel of a slot plus an image shared by every slot, the convolution splits:
//!   y[s, p] = act(Σ_{tap valid at p} W_tap · z[s]  +  conv(pos)(p))
//! and which taps are valid depends only on the pixel's distance to the border: k² classes of
//! pixels. So y needs k² matrix-vector products per slot plus one convolution of a single image
//! instead of a convolution of S images (32 GFLOP → 0.03 at the tetrominoes shapes, B = 64),
//! and the backward likewise (the gradient of z from per-class sums of dy, the weight gradient
//! from per-class outer products plus one single-image weight gradient). The CUDA backend
//! computes it so (`kernels/bcastconv.cu`) for "same" stride-1 convolutions of grids at least
//! k wide, and is tested against this composition on the CPU (`tests/cuda.rs`,
//! `bcast_conv_fwd_bwd_parity`).

use crate::backend::Backend;
use crate::ops::conv::ConvGeom;

/// The op's shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BcastConvDims {
    /// Slots (images of the decoder): batch · K.
    pub slots: usize,
    /// The convolution: h_in × w_in × c_in (c_in: the slot width) → h_out × w_out × c_out.
    pub geom: ConvGeom,
}

impl BcastConvDims {
    /// Whether the convolution is "same" with stride 1 on a grid at least k wide, the case the
    /// split by border classes covers.
    pub fn splits(&self) -> bool {
        let g = &self.geom;
        g.stride == 1
            && g.k == 2 * g.pad + 1
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
