//! The per-slot work of one slot-attention cell application, before and after the attention, as
//! two ops each way.
//!
//! Math, per slot row s (`[rows, d]`, rows = batch · K), with u the attention's update:
//!   query:   ls = LN_s(s);  q = ls·Wqᵀ
//!   update:  gi = u·W_ihᵀ + b_ih;  gh = s·W_hhᵀ + b_hh      (PyTorch's GRUCell, `[rows, 3d]`)
//!            h1 = gates(gi, gh, s)                        ([`crate::ops::gru`])
//!            lm = LN_m(h1);  hid = dropout(relu(lm·W1ᵀ + b1));  out = (hid·W2ᵀ + b2) + h1
//!
//! Backward (from d_out, and from dq after the attention's backward): the same math in reverse;
//! d_upd is overwritten, the slots' gradient and the parameter gradients accumulate.
//!
//! Here all four ops are composed from the single ops (`slot_*_by_ops`): that composition is the
//! reference and the [`Backend`] trait's default. The CUDA backend replaces each with fused
//! kernels (`kernels/slotcell.cu`: one launch per forward op instead of 2 and 8, three per
//! backward op instead of ~7 and ~22) when d ≤ 64 and the MLP's hidden width ≤ 256, both
//! multiples of 4, and is tested against this composition on the CPU (`tests/cuda.rs`,
//! `slot_cell_fwd_bwd_parity`). The composition's own gradients are checked against finite
//! differences with the rest of the model (`tests/model_gradcheck.rs`).

use crate::backend::Backend;
use crate::ops::elementwise::DropoutMask;

/// Widths of the cell's per-slot work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotCellDims {
    /// Slot rows: batch · K.
    pub rows: usize,
    /// Slot width.
    pub d: usize,
    /// The residual MLP's hidden width.
    pub hidden: usize,
}

/// The query's parameters: LN_s's γ and β (`[d]`), Wq (`[d][d]`, no bias).
pub struct SlotQueryParams<'a, Buf> {
    pub norm_g: &'a Buf,
    pub norm_b: &'a Buf,
    pub wq: &'a Buf,
}

/// What the query writes (every element overwritten).
pub struct SlotQueryOut<'a, Buf> {
    /// LN_s(s), `[rows, d]`, with its per-row mean and 1/σ (`[rows]`).
    pub ln: &'a mut Buf,
    pub mean: &'a mut Buf,
    pub rstd: &'a mut Buf,
    /// `[rows, d]`.
    pub q: &'a mut Buf,
}

/// The update's parameters, in PyTorch's layouts: W_ih, W_hh `[3d][d]` and their biases `[3d]`
/// (gate order r, z, n); LN_m's γ, β `[d]`; W1 `[hidden][d]`, b1; W2 `[d][hidden]`, b2.
pub struct SlotUpdateParams<'a, Buf> {
    pub w_ih: &'a Buf,
    pub b_ih: &'a Buf,
    pub w_hh: &'a Buf,
    pub b_hh: &'a Buf,
    pub norm_g: &'a Buf,
    pub norm_b: &'a Buf,
    pub w1: &'a Buf,
    pub b1: &'a Buf,
    pub w2: &'a Buf,
    pub b2: &'a Buf,
}

/// What the update writes (every element overwritten): the tape of the cell's backward.
pub struct SlotUpdateOut<'a, Buf> {
    /// `[rows, 3d]` each, biases included.
    pub gi: &'a mut Buf,
    pub gh: &'a mut Buf,
    /// The GRU's output, `[rows, d]`.
    pub h1: &'a mut Buf,
    /// LN_m(h1) `[rows, d]` with its per-row mean and 1/σ.
    pub ln: &'a mut Buf,
    pub mean: &'a mut Buf,
    pub rstd: &'a mut Buf,
    /// The MLP's hidden activations after the ReLU and the dropout, `[rows, hidden]`.
    pub hid: &'a mut Buf,
    /// The new slots, `[rows, d]`.
    pub out: &'a mut Buf,
}

/// The query by the single ops (the reference).
pub fn slot_query_fwd_by_ops<B: Backend + ?Sized>(
    be: &B,
    dims: &SlotCellDims,
    p: &SlotQueryParams<'_, B::Buf>,
    slots: &B::Buf,
    o: SlotQueryOut<'_, B::Buf>,
) {
    let (rows, d) = (dims.rows, dims.d);
    be.layernorm_fwd(rows, d, slots, p.norm_g, p.norm_b, o.ln, o.mean, o.rstd);
    be.linear_fwd(rows, d, d, o.ln, p.wq, None, false, o.q);
}

/// The update by the single ops (the reference). `dropout` applies to the hidden activations.
pub fn slot_update_fwd_by_ops<B: Backend + ?Sized>(
    be: &B,
    dims: &SlotCellDims,
    p: &SlotUpdateParams<'_, B::Buf>,
    upd: &B::Buf,
    slots: &B::Buf,
    dropout: Option<&DropoutMask>,
    o: SlotUpdateOut<'_, B::Buf>,
) {
    let (rows, d, m) = (dims.rows, dims.d, dims.hidden);
    be.linear_fwd(rows, d, 3 * d, upd, p.w_ih, Some(p.b_ih), false, o.gi);
    be.linear_fwd(rows, d, 3 * d, slots, p.w_hh, Some(p.b_hh), false, o.gh);
    be.gru_gates_fwd(d, o.gi, o.gh, slots, o.h1);
    be.layernorm_fwd(rows, d, o.h1, p.norm_g, p.norm_b, o.ln, o.mean, o.rstd);
    be.linear_fwd(rows, d, m, o.ln, p.w1, Some(p.b1), true, o.hid);
    if let Some(mask) = dropout {
        be.dropout_fwd(mask, o.hid);
    }
    be.linear_fwd(rows, m, d, o.hid, p.w2, Some(p.b2), false, o.out);
    be.add_assign(o.out, o.h1);
}

/// What the query's backward reads from its forward.
pub struct SlotQueryTape<'a, Buf> {
    pub slots: &'a Buf,
    pub ln: &'a Buf,
    pub mean: &'a Buf,
    pub rstd: &'a Buf,
    pub q: &'a Buf,
}

/// The query's parameter gradients (accumulated).
pub struct SlotQueryGrads<'a, Buf> {
    pub norm_g: &'a mut Buf,
    pub norm_b: &'a mut Buf,
    pub wq: &'a mut Buf,
}

/// What the update's backward reads from its forward (its inputs and [`SlotUpdateOut`]).
pub struct SlotUpdateTape<'a, Buf> {
    pub upd: &'a Buf,
    pub slots: &'a Buf,
    pub gi: &'a Buf,
    pub gh: &'a Buf,
    pub h1: &'a Buf,
    pub ln: &'a Buf,
    pub mean: &'a Buf,
    pub rstd: &'a Buf,
    pub hid: &'a Buf,
    pub out: &'a Buf,
}

/// The update's parameter gradients (accumulated), in the order of [`SlotUpdateParams`].
pub struct SlotUpdateGrads<'a, Buf> {
    pub w_ih: &'a mut Buf,
    pub b_ih: &'a mut Buf,
    pub w_hh: &'a mut Buf,
    pub b_hh: &'a mut Buf,
    pub norm_g: &'a mut Buf,
    pub norm_b: &'a mut Buf,
    pub w1: &'a mut Buf,
    pub b1: &'a mut Buf,
    pub w2: &'a mut Buf,
    pub b2: &'a mut Buf,
}

/// Scratch of the update's backward (contents afterwards unspecified): `[rows, d]` dh1 and dln,
/// `[rows, hidden]` dhid, `[rows, 3d]` dgi and dgh.
pub struct SlotUpdateScratch<'a, Buf> {
    pub dh1: &'a mut Buf,
    pub dln: &'a mut Buf,
    pub dhid: &'a mut Buf,
    pub dgi: &'a mut Buf,
    pub dgh: &'a mut Buf,
}

/// The update's backward by the single ops (the reference): from d_out, `d_upd` OVERWRITTEN with
/// the gradient of the attention's update, the gradient of the incoming slots ADDED to `d_in`, the
/// parameter gradients accumulated.
#[allow(clippy::too_many_arguments)]
pub fn slot_update_bwd_by_ops<B: Backend + ?Sized>(
    be: &B,
    dims: &SlotCellDims,
    p: &SlotUpdateParams<'_, B::Buf>,
    t: &SlotUpdateTape<'_, B::Buf>,
    dropout: Option<&DropoutMask>,
    d_out: &B::Buf,
    s: SlotUpdateScratch<'_, B::Buf>,
    d_upd: &mut B::Buf,
    d_in: &mut B::Buf,
    g: SlotUpdateGrads<'_, B::Buf>,
) {
    let (rows, d, m) = (dims.rows, dims.d, dims.hidden);
    // Residual: out = h1 + mlp(LN_m(h1)).
    be.copy(d_out, s.dh1);
    be.fill_zero(s.dhid);
    let (x, y) = (t.hid, t.out);
    be.linear_bwd(
        rows,
        m,
        d,
        x,
        p.w2,
        y,
        false,
        d_out,
        Some(s.dhid),
        g.w2,
        Some(g.b2),
    );
    if let Some(mask) = dropout {
        be.dropout_bwd(mask, s.dhid);
    }
    be.fill_zero(s.dln);
    let dhid = &*s.dhid;
    be.linear_bwd(
        rows,
        d,
        m,
        t.ln,
        p.w1,
        t.hid,
        true,
        dhid,
        Some(s.dln),
        g.w1,
        Some(g.b1),
    );
    let (gamma, mean, rstd) = (p.norm_g, t.mean, t.rstd);
    be.layernorm_bwd(
        rows, d, t.h1, gamma, mean, rstd, s.dln, s.dh1, g.norm_g, g.norm_b,
    );
    // GRU.
    be.fill_zero(s.dgi);
    be.fill_zero(s.dgh);
    be.gru_gates_bwd(d, t.gi, t.gh, t.slots, s.dh1, s.dgi, s.dgh, d_in);
    let (dgi, dgh) = (&*s.dgi, &*s.dgh);
    be.linear_bwd(
        rows,
        d,
        3 * d,
        t.slots,
        p.w_hh,
        t.gh,
        false,
        dgh,
        Some(d_in),
        g.w_hh,
        Some(g.b_hh),
    );
    be.fill_zero(d_upd);
    be.linear_bwd(
        rows,
        d,
        3 * d,
        t.upd,
        p.w_ih,
        t.gi,
        false,
        dgi,
        Some(d_upd),
        g.w_ih,
        Some(g.b_ih),
    );
}

/// The query's backward by the single ops (the reference): from dq, the gradient of the slots
/// ADDED to `d_in`, the parameter gradients accumulated; `dln` (`[rows, d]`) is scratch.
#[allow(clippy::too_many_arguments)]
pub fn slot_query_bwd_by_ops<B: Backend + ?Sized>(
    be: &B,
    dims: &SlotCellDims,
    p: &SlotQueryParams<'_, B::Buf>,
    t: &SlotQueryTape<'_, B::Buf>,
    dq: &B::Buf,
    dln: &mut B::Buf,
    d_in: &mut B::Buf,
    g: SlotQueryGrads<'_, B::Buf>,
) {
    let (rows, d) = (dims.rows, dims.d);
    be.fill_zero(dln);
    be.linear_bwd(
        rows,
        d,
        d,
        t.ln,
        p.wq,
        t.q,
        false,
        dq,
        Some(dln),
        g.wq,
        None,
    );
    let (gamma, mean, rstd) = (p.norm_g, t.mean, t.rstd);
    be.layernorm_bwd(
        rows, d, t.slots, gamma, mean, rstd, dln, d_in, g.norm_g, g.norm_b,
    );
}

/// Names of the parameter tensors in the order [`slot_cell_fwd_flat`] takes them.
pub const PARAM_NAMES: [&str; 13] = [
    "norm_slots.g",
    "norm_slots.b",
    "project_q",
    "gru.weight_ih",
    "gru.bias_ih",
    "gru.weight_hh",
    "gru.bias_hh",
    "norm_mlp.g",
    "norm_mlp.b",
    "mlp.0.weight",
    "mlp.0.bias",
    "mlp.2.weight",
    "mlp.2.bias",
];

/// Names of the outputs in the order [`slot_cell_fwd_flat`] writes them.
pub const OUT_NAMES: [&str; 12] = [
    "ls", "ls mean", "ls rstd", "q", "gi", "gh", "h1", "lm", "lm mean", "lm rstd", "hid", "out",
];

/// Lengths of the tensors of [`PARAM_NAMES`].
pub fn param_lens(dims: &SlotCellDims) -> [usize; 13] {
    let (d, m) = (dims.d, dims.hidden);
    [
        d,
        d,
        d * d,
        3 * d * d,
        3 * d,
        3 * d * d,
        3 * d,
        d,
        d,
        m * d,
        m,
        d * m,
        d,
    ]
}

/// Lengths of the outputs of [`OUT_NAMES`].
pub fn out_lens(dims: &SlotCellDims) -> [usize; 12] {
    let (r, d, m) = (dims.rows, dims.d, dims.hidden);
    [
        r * d,
        r,
        r,
        r * d,
        r * 3 * d,
        r * 3 * d,
        r * d,
        r * d,
        r,
        r,
        r * m,
        r * d,
    ]
}

/// Both ops, the query then the update (from `upd`, as if the attention had produced it), with
/// their tensors in flat lists: the layout of the kernel bench and the parity tests. `by_ops`
/// runs the reference composition on `be` instead of its own implementation.
#[allow(clippy::too_many_arguments)]
pub fn slot_cell_fwd_flat<B: Backend + ?Sized>(
    be: &B,
    by_ops: bool,
    dims: &SlotCellDims,
    p: &[B::Buf],
    slots: &B::Buf,
    upd: &B::Buf,
    dropout: Option<&DropoutMask>,
    o: &mut [B::Buf],
) {
    let [ls, ls_mean, ls_rstd, q, gi, gh, h1, lm, lm_mean, lm_rstd, hid, out] = o else {
        panic!("{} slot cell outputs, not 12", o.len())
    };
    let [norm_g, norm_b, wq, w_ih, b_ih, w_hh, b_hh, norm_mg, norm_mb, w1, b1, w2, b2] = p else {
        panic!("{} slot cell tensors, not 13", p.len())
    };
    let query = SlotQueryParams { norm_g, norm_b, wq };
    let qo = SlotQueryOut {
        ln: ls,
        mean: ls_mean,
        rstd: ls_rstd,
        q,
    };
    let update = SlotUpdateParams {
        w_ih,
        b_ih,
        w_hh,
        b_hh,
        norm_g: norm_mg,
        norm_b: norm_mb,
        w1,
        b1,
        w2,
        b2,
    };
    let uo = SlotUpdateOut {
        gi,
        gh,
        h1,
        ln: lm,
        mean: lm_mean,
        rstd: lm_rstd,
        hid,
        out,
    };
    if by_ops {
        slot_query_fwd_by_ops(be, dims, &query, slots, qo);
        slot_update_fwd_by_ops(be, dims, &update, upd, slots, dropout, uo);
    } else {
        be.slot_query_fwd(dims, &query, slots, qo);
        be.slot_update_fwd(dims, &update, upd, slots, dropout, uo);
    }
}

/// Lengths of the backward's scratch buffers in the order [`slot_cell_bwd_flat`] takes them:
/// dh1, dln_m, dhid, dgi, dgh, dln_s.
pub fn scratch_lens(dims: &SlotCellDims) -> [usize; 6] {
    let (r, d, m) = (dims.rows, dims.d, dims.hidden);
    [r * d, r * d, r * m, r * 3 * d, r * 3 * d, r * d]
}

/// Both backward ops, the update's from `d_out` then the query's from `dq` (as if the attention
/// had turned `d_upd` into it), with their tensors in flat lists: `p` and `g` as [`PARAM_NAMES`],
/// `fwd` as [`OUT_NAMES`] (the forward's outputs), `scratch` as [`scratch_lens`]. `d_upd` is
/// overwritten; `d_in` and `g` accumulate. `by_ops` runs the reference composition on `be`.
#[allow(clippy::too_many_arguments)]
pub fn slot_cell_bwd_flat<B: Backend + ?Sized>(
    be: &B,
    by_ops: bool,
    dims: &SlotCellDims,
    p: &[B::Buf],
    fwd: &[B::Buf],
    slots: &B::Buf,
    upd: &B::Buf,
    dropout: Option<&DropoutMask>,
    d_out: &B::Buf,
    dq: &B::Buf,
    scratch: &mut [B::Buf],
    d_upd: &mut B::Buf,
    d_in: &mut B::Buf,
    g: &mut [B::Buf],
) {
    let [ls, ls_mean, ls_rstd, q, gi, gh, h1, lm, lm_mean, lm_rstd, hid, out] = fwd else {
        panic!("{} slot cell outputs, not 12", fwd.len())
    };
    let [dh1, dln, dhid, dgi, dgh, dln_s] = scratch else {
        panic!("{} slot cell scratch buffers, not 6", scratch.len())
    };
    let [norm_g, norm_b, wq, w_ih, b_ih, w_hh, b_hh, norm_mg, norm_mb, w1, b1, w2, b2] = p else {
        panic!("{} slot cell tensors, not 13", p.len())
    };
    let [gn_g, gn_b, g_wq, g_wih, g_bih, g_whh, g_bhh, gm_g, gm_b, g_w1, g_b1, g_w2, g_b2] = g
    else {
        panic!("{} slot cell gradients, not 13", g.len())
    };
    let update = SlotUpdateParams {
        w_ih,
        b_ih,
        w_hh,
        b_hh,
        norm_g: norm_mg,
        norm_b: norm_mb,
        w1,
        b1,
        w2,
        b2,
    };
    let ut = SlotUpdateTape {
        upd,
        slots,
        gi,
        gh,
        h1,
        ln: lm,
        mean: lm_mean,
        rstd: lm_rstd,
        hid,
        out,
    };
    let us = SlotUpdateScratch {
        dh1,
        dln,
        dhid,
        dgi,
        dgh,
    };
    let ug = SlotUpdateGrads {
        w_ih: g_wih,
        b_ih: g_bih,
        w_hh: g_whh,
        b_hh: g_bhh,
        norm_g: gm_g,
        norm_b: gm_b,
        w1: g_w1,
        b1: g_b1,
        w2: g_w2,
        b2: g_b2,
    };
    let query = SlotQueryParams { norm_g, norm_b, wq };
    let qt = SlotQueryTape {
        slots,
        ln: ls,
        mean: ls_mean,
        rstd: ls_rstd,
        q,
    };
    let qg = SlotQueryGrads {
        norm_g: gn_g,
        norm_b: gn_b,
        wq: g_wq,
    };
    if by_ops {
        slot_update_bwd_by_ops(be, dims, &update, &ut, dropout, d_out, us, d_upd, d_in, ug);
        slot_query_bwd_by_ops(be, dims, &query, &qt, dq, dln_s, d_in, qg);
    } else {
        be.slot_update_bwd(dims, &update, &ut, dropout, d_out, us, d_upd, d_in, ug);
        be.slot_query_bwd(dims, &query, &qt, dq, dln_s, d_in, qg);
    }
}
