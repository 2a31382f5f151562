//! Launchers of the decoder's broadcast input and first convolution split by border classes
//! (`kernels/bcastconv.cu`; the math and the reference composition are in
//! [`crate::ops::bcastconv`]).

use super::{i, per_elem, rs_grid, Arg, Buf, Cuda};
use crate::backend::Backend;
use crate::ops::bcastconv::{BcastConvDims, BcastConvGrads, BcastConvParams};
use crate::ops::conv::ConvGeom;
use cudarc::driver::LaunchConfig;

/// Threads of `bconv_bwd_classes_f32` (BC_THREADS; it takes k ≤ 7, as BcastConvDims::splits).
const BC_THREADS: u32 = 1024;

/// Threads of `bconv_slot_classes_f32` (BC_SC_THREADS: a warp per slot, 8 slots per block).
const BC_SC_THREADS: u32 = 256;

/// The widths the kernels take, as i32: slots, h, w, c_in, c_out, k, pad.
struct Ints {
    s: i32,
    h: i32,
    w: i32,
    c: i32,
    o: i32,
    k: i32,
    pad: i32,
}

impl Ints {
    fn new(dims: &BcastConvDims) -> Ints {
        let g = &dims.geom;
        i(dims.slots * g.h_out * g.w_out * g.c_out.max(g.c_in));
        Ints {
            s: i(dims.slots),
            h: i(g.h_in),
            w: i(g.w_in),
            c: i(g.c_in),
            o: i(g.c_out),
            k: i(g.k),
            pad: i(g.pad),
        }
    }
}

impl Cuda {
    /// The position image (pos(p) at every pixel, one image) in a scratch buffer.
    fn bcast_pos_image(
        &self,
        g: &ConvGeom,
        p: &BcastConvParams<'_, Buf>,
    ) -> super::Scratch<'_, f32> {
        let mut img = self.scratch::<f32>(g.h_in * g.w_in * g.c_in);
        self.fill_zero(&mut img);
        self.softpos_add_fwd(g.h_in, g.w_in, g.c_in, p.pos_w, p.pos_b, &mut img);
        img
    }

    /// Wc (the weights summed over each border class's taps) in a scratch buffer.
    fn bcast_weight_classes(&self, n: &Ints, w: &Buf) -> super::Scratch<'_, f32> {
        let len = (n.k * n.k * n.o * n.c) as usize;
        let mut wc = self.scratch::<f32>(len);
        launch!(self, "bconv_weight_classes_f32", per_elem(len);
            &n.o, &n.c, &n.k, &n.pad, w, &mut *wc);
        wc
    }

    pub(super) fn bcast_conv_fwd_split(
        &self,
        dims: &BcastConvDims,
        p: &BcastConvParams<'_, Buf>,
        z: &Buf,
        y: &mut Buf,
    ) {
        let g = &dims.geom;
        assert_eq!(z.len(), dims.slots * g.c_in);
        assert_eq!(y.len(), dims.slots * g.h_out * g.w_out * g.c_out);
        if dims.slots == 0 {
            return;
        }
        let n = Ints::new(dims);
        // P = conv(pos) + b: one image through the convolution kernels.
        let img = self.bcast_pos_image(g, p);
        let mut pimg = self.scratch::<f32>(g.h_out * g.w_out * g.c_out);
        // (One image: split-K spreads its reduction over the GPU.)
        self.conv_fwd_common(false, g, 1, &img, p.w, p.b, false, &mut pimg, true);
        let wc = self.bcast_weight_classes(&n, p.w);
        let ncls = n.k * n.k;
        let zlen = dims.slots * (ncls * n.o) as usize;
        let mut zc = self.scratch::<f32>(zlen);
        let per_class = LaunchConfig {
            grid_dim: (
                dims.slots.div_ceil(BC_SC_THREADS as usize / 32) as u32,
                ncls as u32,
                g.c_out.div_ceil(32) as u32,
            ),
            block_dim: (BC_SC_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "bconv_slot_classes_f32", per_class;
            &n.s, &n.o, &n.c, &ncls, &*wc, z, &mut *zc);
        let relu = p.relu as i32;
        // (Four channels per thread when they come in fours.)
        let per_thread = if g.c_out % 4 == 0 { 4 } else { 1 };
        launch!(self, "bconv_out_f32", per_elem(y.len() / per_thread);
            &n.s, &n.h, &n.w, &n.o, &n.k, &n.pad, &relu, &*zc, &*pimg, y);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn bcast_conv_bwd_split(
        &self,
        dims: &BcastConvDims,
        p: &BcastConvParams<'_, Buf>,
        z: &Buf,
        y: &Buf,
        dy: &Buf,
        dz: &mut Buf,
        g: BcastConvGrads<'_, Buf>,
    ) {
        let geom = &dims.geom;
        assert_eq!(dy.len(), y.len());
        assert_eq!(dz.len(), z.len());
        if dims.slots == 0 {
            return;
        }
        let n = Ints::new(dims);
        let (ncls, relu) = (n.k * n.k, p.relu as i32);
        // Per-class sums of g and the sum over slots of g.
        let zlen = dims.slots * (ncls * n.o) as usize;
        let mut dzc = self.scratch::<f32>(zlen);
        let per_slot = LaunchConfig {
            grid_dim: (dims.slots as u32, 1, 1),
            block_dim: (BC_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "bconv_bwd_classes_f32", per_slot;
            &n.s, &n.h, &n.w, &n.o, &n.k, &n.pad, &relu, y, dy, &mut *dzc);
        let hw = n.h * n.w;
        let plen = (hw * n.o) as usize;
        let mut dp = self.scratch::<f32>(plen);
        launch!(self, "bconv_bwd_pos_f32", rs_grid(plen);
            &n.s, &hw, &n.o, &relu, y, dy, &mut *dp);
        // The position image's share: one image's convolution backward (dW, db, and the image's
        // gradient, then the position embedding's). dp is already through the ReLU, so the
        // backward runs without one (and does not read its y: dp stands in).
        let img = self.bcast_pos_image(geom, p);
        let mut dimg = self.scratch::<f32>(img.len());
        self.conv_bwd_common(
            false,
            geom,
            1,
            &img,
            p.w,
            &dp,
            false,
            &dp,
            Some(&mut dimg),
            true,
            g.w,
            g.b,
            true,
        );
        self.softpos_add_bwd(geom.h_in, geom.w_in, geom.c_in, &dimg, g.pos_w, g.pos_b);
        // The slots' share: dz, and dW through the classes.
        let wc = self.bcast_weight_classes(&n, p.w);
        // (Column sums per slot: rs_grid's blocks over the channels, one row of them per slot.)
        let mut per_slot_channels = rs_grid(geom.c_in);
        per_slot_channels.grid_dim.1 = dims.slots as u32;
        launch!(self, "bconv_bwd_dz_f32", per_slot_channels;
            &n.s, &n.o, &n.c, &ncls, &*wc, &*dzc, dz);
        let mut dwc = self.scratch::<f32>(wc.len());
        launch!(self, "bconv_bwd_dwc_f32", rs_grid(wc.len());
            &n.s, &n.o, &n.c, &ncls, &*dzc, z, &mut *dwc);
        launch!(self, "bconv_bwd_dw_fold_f32", per_elem(g.w.len());
            &n.o, &n.c, &n.k, &n.pad, &*dwc, g.w);
    }
}
