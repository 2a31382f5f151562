//! The one trait the model is written against. A backend owns its buffers (host vectors on the
//! CPU, device memory on a GPU) and implements every op of [`crate::ops`] on them, forward and
//! backward, with the same argument order and the same conventions: forward outputs are
//! overwritten, backward gradients are accumulated (`+=`).

use crate::ops::attention::AttnDims;
use crate::ops::bcastconv::{
    bcast_conv_bwd_by_ops, bcast_conv_fwd_by_ops, BcastConvDims, BcastConvGrads, BcastConvParams,
};
use crate::ops::conv::ConvGeom;
use crate::ops::elementwise::DropoutMask;
use crate::ops::slotcell::{
    slot_query_bwd_by_ops, slot_query_fwd_by_ops, slot_update_bwd_by_ops, slot_update_fwd_by_ops,
    SlotCellDims, SlotQueryGrads, SlotQueryOut, SlotQueryParams, SlotQueryTape, SlotUpdateGrads,
    SlotUpdateOut, SlotUpdateParams, SlotUpdateScratch, SlotUpdateTape,
};
use crate::ops::tokens::{
    tokens_bwd_by_ops, tokens_fwd_by_ops, TokenActs, TokenDims, TokenGradActs, TokenGrads,
    TokenOutGrads, TokenParams,
};
use crate::optim::{OptHyper, OptReport};
use crate::rng::Philox;

/// Where a set of buffers comes from: every backend, or a [`SizeCounter`] that only adds up
/// their sizes (so that a workspace can be sized before anything is allocated).
pub trait Alloc {
    type Buf;
    /// A zero-filled buffer of `len` f32 elements.
    fn buffer(&self, len: usize) -> Self::Buf;
    /// Whether the decoder's first convolution will run split ([`Backend::bcast_conv_splits`]):
    /// then the workspace holds no broadcast input or gradient.
    fn bcast_conv_splits(&self, dims: &BcastConvDims) -> bool;
    /// Whether slot attention will read u with Wk and Wv folded ([`Backend::folds_kv`]): then
    /// the workspace holds no k, v or their gradients, but the folded weights.
    fn folds_kv(&self) -> bool;
}

impl<B: Backend + ?Sized> Alloc for B {
    type Buf = B::Buf;
    fn buffer(&self, len: usize) -> B::Buf {
        self.alloc(len)
    }
    fn bcast_conv_splits(&self, dims: &BcastConvDims) -> bool {
        Backend::bcast_conv_splits(self, dims)
    }
    fn folds_kv(&self) -> bool {
        Backend::folds_kv(self)
    }
}

/// Counts the bytes of the f32 buffers asked of it and allocates nothing.
pub struct SizeCounter {
    bytes: std::cell::Cell<u64>,
    /// Whether the decoder's first convolution splits where it can (as on both backends by
    /// default; the CUDA backend's `bcast_split` fast path can be switched off).
    bcast_split: bool,
    /// Whether slot attention reads u with Wk and Wv folded (the CPU's default: no).
    kv_fold: bool,
}

impl Default for SizeCounter {
    fn default() -> Self {
        SizeCounter::new(true, false)
    }
}

impl SizeCounter {
    pub fn new(bcast_split: bool, kv_fold: bool) -> Self {
        SizeCounter {
            bytes: Default::default(),
            bcast_split,
            kv_fold,
        }
    }
    pub fn bytes(&self) -> u64 {
        self.bytes.get()
    }
}

impl Alloc for SizeCounter {
    type Buf = ();
    fn buffer(&self, len: usize) {
        self.bytes.set(self.bytes.get() + 4 * len as u64);
    }
    fn bcast_conv_splits(&self, dims: &BcastConvDims) -> bool {
        self.bcast_split && dims.splits()
    }
    fn folds_kv(&self) -> bool {
        self.kv_fold
    }
}

/// The device time of one kernel's launches ([`Backend::kernel_profile`]).
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    pub name: &'static str,
    pub launches: u64,
    /// Their total time, milliseconds.
    pub ms: f64,
}

/// The launches timed by [`Backend::profile_kernels`], summed per kernel, slowest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelProfile {
    pub kernels: Vec<KernelTime>,
    /// Timed by the host's clock around each launch (the emulator: says nothing about a GPU),
    /// not by events on the device.
    pub host_clock: bool,
}

/// Hyper-parameters of one Adam(W) update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay (AdamW): p −= lr · wd · p.
    pub weight_decay: f64,
    /// 1-based step count, for the bias corrections.
    pub t: u64,
    /// Multiplies the gradient first (gradient-norm clipping).
    pub grad_scale: f64,
}

pub trait Backend: Sync {
    type Buf: Send + Sync;
    /// The optimizer's bookkeeping ([`OptReport`]), where the parameters live.
    type OptState: Send + Sync;
    /// A captured training step that the backend can replay (a CUDA graph); `()` on a backend
    /// that cannot capture.
    type StepGraph;

    /// A short description, e.g. "cpu (f32, 2 threads)".
    fn describe(&self) -> String;
    /// A zero-filled buffer of `len` elements.
    fn alloc(&self, len: usize) -> Self::Buf;
    fn len(&self, buf: &Self::Buf) -> usize;
    fn upload_f64(&self, src: &[f64], dst: &mut Self::Buf);
    fn upload_f32(&self, src: &[f32], dst: &mut Self::Buf);
    fn download(&self, src: &Self::Buf) -> Vec<f64>;
    fn download_f32(&self, src: &Self::Buf) -> Vec<f32> {
        self.download(src).into_iter().map(|v| v as f32).collect()
    }
    fn fill_zero(&self, buf: &mut Self::Buf);
    fn copy(&self, src: &Self::Buf, dst: &mut Self::Buf);
    /// y += x
    fn add_assign(&self, y: &mut Self::Buf, x: &Self::Buf);
    /// x *= a
    fn scale(&self, x: &mut Self::Buf, a: f64);
    /// Σ x² (a host read: call it outside the hot path or at most once per step).
    fn sum_squares(&self, x: &Self::Buf) -> f64;
    /// ||new − old|| / ||old|| (a host read).
    fn rel_change(&self, new: &Self::Buf, old: &Self::Buf) -> f64;
    /// Element i = normal(seed, stream, step, i).
    fn fill_normal(&self, rng: Philox, stream: u32, step: u32, buf: &mut Self::Buf);

    #[allow(clippy::too_many_arguments)]
    fn conv2d_fwd(
        &self,
        g: &ConvGeom,
        batch: usize,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        relu: bool,
        y: &mut Self::Buf,
    );
    #[allow(clippy::too_many_arguments)]
    fn conv2d_bwd(
        &self,
        g: &ConvGeom,
        batch: usize,
        x: &Self::Buf,
        w: &Self::Buf,
        y: &Self::Buf,
        relu: bool,
        dy: &Self::Buf,
        dx: Option<&mut Self::Buf>,
        dw: &mut Self::Buf,
        db: &mut Self::Buf,
    );
    #[allow(clippy::too_many_arguments)]
    fn conv_t2d_fwd(
        &self,
        g: &ConvGeom,
        batch: usize,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        relu: bool,
        y: &mut Self::Buf,
    );
    #[allow(clippy::too_many_arguments)]
    fn conv_t2d_bwd(
        &self,
        g: &ConvGeom,
        batch: usize,
        x: &Self::Buf,
        w: &Self::Buf,
        y: &Self::Buf,
        relu: bool,
        dy: &Self::Buf,
        dx: Option<&mut Self::Buf>,
        dw: &mut Self::Buf,
        db: &mut Self::Buf,
    );
    /// [`Backend::conv2d_bwd`] (or, when `transposed`, [`Backend::conv_t2d_bwd`]) with `dx`
    /// OVERWRITTEN rather than accumulated into: for a dx that has no other contribution, it
    /// saves zeroing it first and reading it back. The default is exactly that zeroing followed
    /// by the accumulating op.
    #[allow(clippy::too_many_arguments)]
    fn conv_bwd_set_dx(
        &self,
        transposed: bool,
        g: &ConvGeom,
        batch: usize,
        x: &Self::Buf,
        w: &Self::Buf,
        y: &Self::Buf,
        relu: bool,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
        db: &mut Self::Buf,
    ) {
        self.fill_zero(dx);
        if transposed {
            self.conv_t2d_bwd(g, batch, x, w, y, relu, dy, Some(dx), dw, db);
        } else {
            self.conv2d_bwd(g, batch, x, w, y, relu, dy, Some(dx), dw, db);
        }
    }
    #[allow(clippy::too_many_arguments)]
    fn linear_fwd(
        &self,
        rows: usize,
        n_in: usize,
        n_out: usize,
        x: &Self::Buf,
        w: &Self::Buf,
        b: Option<&Self::Buf>,
        relu: bool,
        y: &mut Self::Buf,
    );
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd(
        &self,
        rows: usize,
        n_in: usize,
        n_out: usize,
        x: &Self::Buf,
        w: &Self::Buf,
        y: &Self::Buf,
        relu: bool,
        dy: &Self::Buf,
        dx: Option<&mut Self::Buf>,
        dw: &mut Self::Buf,
        db: Option<&mut Self::Buf>,
    );
    #[allow(clippy::too_many_arguments)]
    fn layernorm_fwd(
        &self,
        rows: usize,
        dim: usize,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        y: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
    );
    #[allow(clippy::too_many_arguments)]
    fn layernorm_bwd(
        &self,
        rows: usize,
        dim: usize,
        x: &Self::Buf,
        gamma: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        dgamma: &mut Self::Buf,
        dbeta: &mut Self::Buf,
    );
    #[allow(clippy::too_many_arguments)]
    fn softpos_add_fwd(
        &self,
        h: usize,
        w: usize,
        c: usize,
        wp: &Self::Buf,
        bp: &Self::Buf,
        x: &mut Self::Buf,
    );
    #[allow(clippy::too_many_arguments)]
    fn softpos_add_bwd(
        &self,
        h: usize,
        w: usize,
        c: usize,
        dy: &Self::Buf,
        dwp: &mut Self::Buf,
        dbp: &mut Self::Buf,
    );
    /// The per-token chain between the encoder and slot attention ([`crate::ops::tokens`]):
    /// every output in `acts` overwritten. The default composes the single ops (the reference).
    fn tokens_fwd(
        &self,
        dims: &TokenDims,
        p: &TokenParams<'_, Self::Buf>,
        enc_out: &Self::Buf,
        acts: &mut TokenActs<Self::Buf>,
    ) {
        tokens_fwd_by_ops(self, dims, p, enc_out, acts)
    }
    /// Its backward from the gradients of its outputs (d k and d v, or d u when the chain ends
    /// at u): `d.d_enc_pos` overwritten with the gradient of `enc_out`, the parameter gradients
    /// accumulated. The default composes the single ops (the reference).
    fn tokens_bwd(
        &self,
        dims: &TokenDims,
        p: &TokenParams<'_, Self::Buf>,
        acts: &TokenActs<Self::Buf>,
        up: TokenOutGrads<'_, Self::Buf>,
        d: &mut TokenGradActs<Self::Buf>,
        g: &mut TokenGrads<'_, Self::Buf>,
    ) {
        tokens_bwd_by_ops(self, dims, p, acts, up, d, g)
    }
    /// Whether the model may run slot attention on u with Wk and Wv folded into the slot
    /// cell's weights (`model.rs`, "The fold"). The CPU reference does not unless asked
    /// ([`crate::cpu::Cpu::folding_kv`]); the CUDA backend does (fast path `kv_fold`).
    fn folds_kv(&self) -> bool {
        false
    }
    /// C (+)= op(A)·op(B), for the fold's small products: op(A) `[m][kd]` (A stored `[kd][m]`
    /// when `a_t`), op(B) `[kd][n]` (B stored `[n][kd]` when `b_t`), C `[m][n]` overwritten, or
    /// added to when `accumulate`. Exact f32 (or f64) products, k in order.
    #[allow(clippy::too_many_arguments)]
    fn matmul_small(
        &self,
        m: usize,
        n: usize,
        kd: usize,
        a: &Self::Buf,
        a_t: bool,
        b: &Self::Buf,
        b_t: bool,
        c: &mut Self::Buf,
        accumulate: bool,
    );
    /// The slot-attention cell's per-slot work before the attention ([`crate::ops::slotcell`]):
    /// every output in `o` overwritten. The default composes the single ops (the reference).
    fn slot_query_fwd(
        &self,
        dims: &SlotCellDims,
        p: &SlotQueryParams<'_, Self::Buf>,
        slots: &Self::Buf,
        o: SlotQueryOut<'_, Self::Buf>,
    ) {
        slot_query_fwd_by_ops(self, dims, p, slots, o)
    }
    /// ... and after it, from the attention's update `upd` to the new slots: every output in `o`
    /// overwritten. The default composes the single ops (the reference).
    fn slot_update_fwd(
        &self,
        dims: &SlotCellDims,
        p: &SlotUpdateParams<'_, Self::Buf>,
        upd: &Self::Buf,
        slots: &Self::Buf,
        dropout: Option<&DropoutMask>,
        o: SlotUpdateOut<'_, Self::Buf>,
    ) {
        slot_update_fwd_by_ops(self, dims, p, upd, slots, dropout, o)
    }
    /// The update's backward from d_out: `d_upd` overwritten, `d_in` and the parameter gradients
    /// accumulated, `s` scratch. The default composes the single ops (the reference).
    #[allow(clippy::too_many_arguments)]
    fn slot_update_bwd(
        &self,
        dims: &SlotCellDims,
        p: &SlotUpdateParams<'_, Self::Buf>,
        t: &SlotUpdateTape<'_, Self::Buf>,
        dropout: Option<&DropoutMask>,
        d_out: &Self::Buf,
        s: SlotUpdateScratch<'_, Self::Buf>,
        d_upd: &mut Self::Buf,
        d_in: &mut Self::Buf,
        g: SlotUpdateGrads<'_, Self::Buf>,
    ) {
        slot_update_bwd_by_ops(self, dims, p, t, dropout, d_out, s, d_upd, d_in, g)
    }
    /// The query's backward from dq: `d_in` and the parameter gradients accumulated, `dln`
    /// scratch. The default composes the single ops (the reference).
    #[allow(clippy::too_many_arguments)]
    fn slot_query_bwd(
        &self,
        dims: &SlotCellDims,
        p: &SlotQueryParams<'_, Self::Buf>,
        t: &SlotQueryTape<'_, Self::Buf>,
        dq: &Self::Buf,
        dln: &mut Self::Buf,
        d_in: &mut Self::Buf,
        g: SlotQueryGrads<'_, Self::Buf>,
    ) {
        slot_query_bwd_by_ops(self, dims, p, t, dq, dln, d_in, g)
    }
    #[allow(clippy::too_many_arguments)]
    fn broadcast_pos_fwd(
        &self,
        h: usize,
        w: usize,
        c: usize,
        z: &Self::Buf,
        wp: &Self::Buf,
        bp: &Self::Buf,
        y: &mut Self::Buf,
    );
    #[allow(clippy::too_many_arguments)]
    fn broadcast_pos_bwd(
        &self,
        h: usize,
        w: usize,
        c: usize,
        dy: &Self::Buf,
        dz: &mut Self::Buf,
        dwp: &mut Self::Buf,
        dbp: &mut Self::Buf,
    );
    /// Whether [`Backend::bcast_conv_fwd`] and its backward split the convolution by border
    /// classes for `dims` (possible when `dims.splits()`). The default, false, goes with the
    /// default composition of those two methods; a backend that splits overrides all three.
    fn bcast_conv_splits(&self, dims: &BcastConvDims) -> bool {
        let _ = dims;
        false
    }
    /// The decoder's broadcast input and first convolution ([`crate::ops::bcastconv`]): y
    /// overwritten; `x` is the composition's broadcast input (written here, read by the
    /// backward). When `self.bcast_conv_splits(dims)` the backend splits the convolution, and
    /// `x` (and the backward's `dx`) may be empty placeholders. The default composes the single
    /// ops (the reference).
    fn bcast_conv_fwd(
        &self,
        dims: &BcastConvDims,
        p: &BcastConvParams<'_, Self::Buf>,
        z: &Self::Buf,
        x: &mut Self::Buf,
        y: &mut Self::Buf,
    ) {
        bcast_conv_fwd_by_ops(self, dims, p, z, x, y)
    }
    /// Its backward from dy (z: the forward's input): the gradient of z added to `dz`, the
    /// parameter gradients accumulated, `dx` scratch. The default composes the single ops (the reference).
    #[allow(clippy::too_many_arguments)]
    fn bcast_conv_bwd(
        &self,
        dims: &BcastConvDims,
        p: &BcastConvParams<'_, Self::Buf>,
        z: &Self::Buf,
        x: &Self::Buf,
        y: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        dz: &mut Self::Buf,
        g: BcastConvGrads<'_, Self::Buf>,
    ) {
        bcast_conv_bwd_by_ops(self, dims, p, z, x, y, dy, dx, dz, g)
    }
    fn attention_fwd(
        &self,
        dm: &AttnDims,
        k: &Self::Buf,
        v: &Self::Buf,
        q: &Self::Buf,
        attn: &mut Self::Buf,
        upd: &mut Self::Buf,
    );
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        dm: &AttnDims,
        k: &Self::Buf,
        v: &Self::Buf,
        q: &Self::Buf,
        attn: &Self::Buf,
        dupd: &Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        dq: &mut Self::Buf,
    );
    /// [`Backend::attention_bwd`] where k and v are the same tensor x: d k + d v accumulate
    /// into dx.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd_same_kv(
        &self,
        dm: &AttnDims,
        x: &Self::Buf,
        q: &Self::Buf,
        attn: &Self::Buf,
        dupd: &Self::Buf,
        dx: &mut Self::Buf,
        dq: &mut Self::Buf,
    );
    fn gru_gates_fwd(
        &self,
        d: usize,
        gi: &Self::Buf,
        gh: &Self::Buf,
        h: &Self::Buf,
        h_new: &mut Self::Buf,
    );
    #[allow(clippy::too_many_arguments)]
    fn gru_gates_bwd(
        &self,
        d: usize,
        gi: &Self::Buf,
        gh: &Self::Buf,
        h: &Self::Buf,
        dh_new: &Self::Buf,
        dgi: &mut Self::Buf,
        dgh: &mut Self::Buf,
        dh: &mut Self::Buf,
    );
    fn slot_init_fwd(
        &self,
        d: usize,
        mu: &Self::Buf,
        log_sigma: &Self::Buf,
        noise: &Self::Buf,
        slots: &mut Self::Buf,
    );
    #[allow(clippy::too_many_arguments)]
    fn slot_init_bwd(
        &self,
        d: usize,
        log_sigma: &Self::Buf,
        noise: &Self::Buf,
        dslots: &Self::Buf,
        dmu: &mut Self::Buf,
        dlog_sigma: &mut Self::Buf,
    );
    fn dropout_fwd(&self, mask: &DropoutMask, x: &mut Self::Buf);
    fn dropout_bwd(&self, mask: &DropoutMask, dx: &mut Self::Buf);
    /// Writes masks, recon and the mean squared error into `loss` (one element).
    #[allow(clippy::too_many_arguments)]
    fn composite_mse_fwd(
        &self,
        batch: usize,
        k: usize,
        p: usize,
        dec: &Self::Buf,
        target: &Self::Buf,
        masks: &mut Self::Buf,
        recon: &mut Self::Buf,
        loss: &mut Self::Buf,
    );
    #[allow(clippy::too_many_arguments)]
    fn composite_mse_bwd(
        &self,
        batch: usize,
        k: usize,
        p: usize,
        dec: &Self::Buf,
        target: &Self::Buf,
        masks: &Self::Buf,
        recon: &Self::Buf,
        dloss: f64,
        ddec: &mut Self::Buf,
    );
    /// Device memory in use in bytes, where the backend has a device (None on the CPU).
    fn device_memory_used(&self) -> Option<u64> {
        None
    }
    /// Bytes that new buffers can take now and where ("GPU": its free memory; "host": the
    /// available memory on the CPU), or None where it is not known.
    fn memory_available(&self) -> Option<(u64, &'static str)> {
        None
    }
    /// Optimizer bookkeeping for gradient tensors of `grad_lens` elements, starting from
    /// `start`.
    fn opt_state(&self, grad_lens: &[usize], start: &OptReport) -> Self::OptState;
    /// One optimizer step over every tensor, without a host read: the global gradient norm,
    /// the finiteness of it and of `loss` (a 1-element buffer), clipping, and AdamW on every
    /// parameter when the step is finite ([`OptReport::decide`] is the rule).
    #[allow(clippy::too_many_arguments)]
    fn opt_step(
        &self,
        h: &OptHyper,
        loss: &Self::Buf,
        params: &mut [Self::Buf],
        grads: &[Self::Buf],
        m: &mut [Self::Buf],
        v: &mut [Self::Buf],
        st: &mut Self::OptState,
    );
    /// The bookkeeping as of the last step queued (a host read).
    fn opt_report(&self, st: &Self::OptState) -> OptReport;
    /// Called before each training step with its hyper-parameters, before anything of the step
    /// is queued: a backend that reads the per-step values (step number, learning rate) from
    /// its own memory sets them here, so that a replayed step uses the current ones.
    fn begin_step(&self, _h: &OptHyper) {}
    /// Whether [`Backend::capture_begin`] can work here.
    fn can_capture(&self) -> bool {
        false
    }
    /// Start capturing: until [`Backend::capture_end`] the queued work is recorded, not run.
    /// Err (and nothing started) where the backend cannot capture.
    fn capture_begin(&self) -> Result<(), String> {
        Err(format!("{} cannot capture a step", self.describe()))
    }
    /// End the capture and return what it recorded (not yet run).
    fn capture_end(&self) -> Result<Self::StepGraph, String>;
    /// Queue a captured step again.
    fn replay(&self, graph: &Self::StepGraph) -> Result<(), String>;
    /// Start (`true`, clearing earlier timings) or stop timing every kernel launch on the
    /// device, a diagnostic (`slotfix bench --kernels`); false where the backend has no kernels
    /// to time. Steps to be timed must run eagerly: a captured step carries no timings.
    fn profile_kernels(&self, _on: bool) -> bool {
        false
    }
    /// The launches timed so far, summed per kernel name, slowest first; clears them. Waits for
    /// the device.
    fn kernel_profile(&self) -> Result<KernelProfile, String> {
        Ok(KernelProfile::default())
    }
    /// One Adam(W) update of a parameter tensor and its two moment buffers.
    fn adam_step(
        &self,
        s: &AdamStep,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
    );
}
