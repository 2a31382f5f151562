//! Launchers of the fused slot-cell kernels (`kernels/slotcell.cu`; the math and the reference
//! composition are in [`crate::ops::slotcell`]).

use super::{i, Arg, Buf, Cuda, DropoutArgs};
use crate::ops::elementwise::DropoutMask;
use crate::ops::layernorm::LN_EPS;
use crate::ops::slotcell::{
    param_lens, SlotCellDims, SlotQueryGrads, SlotQueryOut, SlotQueryParams, SlotQueryTape,
    SlotUpdateGrads, SlotUpdateOut, SlotUpdateParams, SlotUpdateScratch, SlotUpdateTape,
};
use cudarc::driver::{DeviceRepr, LaunchConfig};

/// `struct SlotCellDims` of slotcell.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct SlotCellDimsC {
    rows: i32,
    d: i32,
    hidden: i32,
}
unsafe impl DeviceRepr for SlotCellDimsC {}

/// Rows per block, threads per block, and the widest d and hidden width of slotcell.cu
/// (SC_ROWS, SC_THREADS, SC_MAXD, SC_MAXH).
const SC_ROWS: usize = 8;
const SC_THREADS: u32 = 256;
const SC_MAXD: usize = 64;
const SC_MAXH: usize = 256;
/// Rows per partial sum of the parameter gradients (SC_CHUNK).
const SC_CHUNK: usize = 32;

/// Grid of the parameter-gradient kernels: `len` elements, `chunks` row chunks.
fn params_cfg(len: usize, chunks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (len.div_ceil(SC_THREADS as usize) as u32, chunks as u32, 1),
        block_dim: (SC_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn launch_cfg(dims: &SlotCellDims) -> (SlotCellDimsC, LaunchConfig) {
    i(dims.rows * 3 * dims.d.max(dims.hidden));
    let c = SlotCellDimsC {
        rows: i(dims.rows),
        d: i(dims.d),
        hidden: i(dims.hidden),
    };
    let cfg = LaunchConfig {
        grid_dim: (dims.rows.div_ceil(SC_ROWS) as u32, 1, 1),
        block_dim: (SC_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    (c, cfg)
}

impl Cuda {
    /// Whether the fused kernels cover these widths: d ≤ 64 and hidden ≤ 256, both multiples of
    /// 4 (the weights' rows are read 16 bytes at a time). Otherwise the single ops run.
    pub(super) fn slot_cell_fusable(dims: &SlotCellDims) -> bool {
        (1..=SC_MAXD).contains(&dims.d)
            && (1..=SC_MAXH).contains(&dims.hidden)
            && dims.d % 4 == 0
            && dims.hidden % 4 == 0
    }

    pub(super) fn slot_query_fwd_fused(
        &self,
        dims: &SlotCellDims,
        p: &SlotQueryParams<'_, Buf>,
        slots: &Buf,
        o: SlotQueryOut<'_, Buf>,
    ) {
        let (rows, d) = (dims.rows, dims.d);
        assert_eq!(slots.len(), rows * d);
        assert_eq!(p.wq.len(), d * d);
        if rows == 0 {
            return;
        }
        let (dc, cfg) = launch_cfg(dims);
        let eps = LN_EPS as f32;
        launch!(self, "slot_query_fwd_f32", cfg;
            &dc, slots, p.norm_g, p.norm_b, p.wq, &eps, o.ln, o.mean, o.rstd, o.q);
    }

    pub(super) fn slot_update_fwd_fused(
        &self,
        dims: &SlotCellDims,
        p: &SlotUpdateParams<'_, Buf>,
        upd: &Buf,
        slots: &Buf,
        dropout: Option<&DropoutMask>,
        o: SlotUpdateOut<'_, Buf>,
    ) {
        let (rows, d, m) = (dims.rows, dims.d, dims.hidden);
        assert_eq!(upd.len(), rows * d);
        assert_eq!(slots.len(), rows * d);
        assert_eq!(p.w_ih.len(), 3 * d * d);
        assert_eq!(p.w_hh.len(), 3 * d * d);
        assert_eq!(p.w1.len(), m * d);
        assert_eq!(p.w2.len(), d * m);
        assert_eq!(o.hid.len(), rows * m);
        if rows == 0 {
            return;
        }
        let (dc, cfg) = launch_cfg(dims);
        let eps = LN_EPS as f32;
        let on = i32::from(dropout.is_some());
        let a = dropout.map_or(
            DropoutArgs {
                seed_lo: 0,
                seed_hi: 0,
                stream: 0,
                p: 0.0,
                scale: 1.0,
            },
            |mask| self.dropout_args(mask),
        );
        let sv = self.step_vals();
        launch!(self, "slot_update_fwd_f32", cfg;
            &dc, upd, slots, p.w_ih, p.b_ih, p.w_hh, p.b_hh, p.norm_g, p.norm_b, p.w1, p.b1,
            p.w2, p.b2, &eps, &on, &a.seed_lo, &a.seed_hi, &a.stream, &sv.buf, &a.p, &a.scale,
            o.gi, o.gh, o.h1, o.ln, o.mean, o.rstd, o.hid, o.out);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn slot_update_bwd_fused(
        &self,
        dims: &SlotCellDims,
        p: &SlotUpdateParams<'_, Buf>,
        t: &SlotUpdateTape<'_, Buf>,
        dropout: Option<&DropoutMask>,
        d_out: &Buf,
        s: SlotUpdateScratch<'_, Buf>,
        d_upd: &mut Buf,
        d_in: &mut Buf,
        g: SlotUpdateGrads<'_, Buf>,
    ) {
        let (rows, d, m) = (dims.rows, dims.d, dims.hidden);
        assert_eq!(d_out.len(), rows * d);
        assert_eq!(t.hid.len(), rows * m);
        assert_eq!(s.dgi.len(), rows * 3 * d);
        assert_eq!(s.dhid.len(), rows * m);
        if rows == 0 {
            return;
        }
        let (dc, cfg) = launch_cfg(dims);
        let scale = dropout.map_or(1.0, |mask| mask.scale() as f32);
        launch!(self, "slot_update_bwd_f32", cfg;
            &dc, p.w_ih, p.w_hh, p.norm_g, p.w1, p.w2, t.slots, t.gi, t.gh, t.h1, t.mean, t.rstd,
            t.hid, &scale, d_out, s.dln, s.dhid, s.dgi, s.dgh, d_upd, d_in);
        // (The update's tensors: the last ten of param_lens, in the kernel's segment order.)
        let len: usize = param_lens(dims)[3..].iter().sum();
        let chunks = rows.div_ceil(SC_CHUNK);
        let mut partial = self.scratch::<f32>(chunks * len);
        launch!(self, "slot_update_bwd_params_partial_f32", params_cfg(len, chunks);
            &dc, t.upd, t.slots, t.h1, t.mean, t.rstd, t.ln, t.hid, d_out, s.dln, s.dhid, s.dgi,
            s.dgh, &mut partial);
        let nc = i(chunks);
        launch!(self, "slot_update_bwd_params_reduce_f32", params_cfg(len, 1);
            &dc, &nc, &partial, g.w_ih, g.b_ih, g.w_hh, g.b_hh, g.norm_g, g.norm_b, g.w1, g.b1,
            g.w2, g.b2);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn slot_query_bwd_fused(
        &self,
        dims: &SlotCellDims,
        p: &SlotQueryParams<'_, Buf>,
        t: &SlotQueryTape<'_, Buf>,
        dq: &Buf,
        dln: &mut Buf,
        d_in: &mut Buf,
        g: SlotQueryGrads<'_, Buf>,
    ) {
        let (rows, d) = (dims.rows, dims.d);
        assert_eq!(dq.len(), rows * d);
        assert_eq!(dln.len(), rows * d);
        assert_eq!(d_in.len(), rows * d);
        if rows == 0 {
            return;
        }
        let (dc, cfg) = launch_cfg(dims);
        launch!(self, "slot_query_bwd_f32", cfg;
            &dc, p.wq, p.norm_g, t.slots, t.mean, t.rstd, dq, dln, d_in);
        let len: usize = param_lens(dims)[..3].iter().sum();
        let chunks = rows.div_ceil(SC_CHUNK);
        let mut partial = self.scratch::<f32>(chunks * len);
        launch!(self, "slot_query_bwd_params_partial_f32", params_cfg(len, chunks);
            &dc, t.slots, t.mean, t.rstd, t.ln, dq, dln, &mut partial);
        let nc = i(chunks);
        launch!(self, "slot_query_bwd_params_reduce_f32", params_cfg(len, 1);
            &dc, &nc, &partial, g.wq, g.norm_g, g.norm_b);
    }
}
