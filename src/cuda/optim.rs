//! The optimizer on the device: the gradient norm, the non-finite check, clipping and AdamW over
//! every parameter tensor in three multi-tensor launches (optim.cu), with the bookkeeping in a
//! device-side control block so that a step reads nothing back.

use super::{i, per_block, per_elem, Arg, Buf, Cuda, DevBuf};
use crate::backend::AdamStep;
use crate::optim::{OptHyper, OptReport};

/// Slots of the optimizer's control block (`CTRL_*` in optim.cu).
mod ctrl {
    pub const UPDATES: usize = 0;
    pub const SKIPPED: usize = 1;
    pub const FIRST_BAD_STEP: usize = 2;
    pub const FIRST_BAD_LOSS: usize = 3;
    pub const FIRST_BAD_NORM: usize = 4;
    pub const LAST_BAD_STEP: usize = 5;
    pub const LATCHED: usize = 6;
    pub const LAST_LOSS: usize = 7;
    pub const LAST_NORM: usize = 8;
    pub const LOSS_SUM: usize = 9;
    pub const LOSS_COUNT: usize = 10;
    pub const APPLY: usize = 11;
    pub const GRAD_SCALE: usize = 12;
    pub const BC1: usize = 13;
    pub const BC2: usize = 14;
    pub const LEN: usize = 16;
}

/// Elements per block of the multi-tensor kernels (MT_CHUNK in optim.cu).
const MT_CHUNK: usize = 4096;

/// The optimizer's bookkeeping on the device, all allocated once: the control block, one
/// partial sum of the gradient norm per block, and the multi-tensor tables (each tensor's
/// param, grad, m and v addresses and length; each block's tensor and first element).
pub struct CudaOptState {
    ctrl: DevBuf<f64>,
    partials: DevBuf<f64>,
    lens: Vec<usize>,
    tab: DevBuf<u64>,
    /// What `tab` holds, to upload it again only if a buffer moved.
    tab_host: Vec<u64>,
    map: DevBuf<u64>,
    blocks: usize,
}

impl Cuda {
    /// Adam on one tensor with the grad scale and bias corrections of `ctrl`.
    #[allow(clippy::too_many_arguments)]
    fn adam_ctrl(
        &self,
        lr: f64,
        b1: f64,
        b2: f64,
        eps: f64,
        weight_decay: f64,
        ctrl: &DevBuf<f64>,
        param: &mut Buf,
        grad: &Buf,
        m: &mut Buf,
        v: &mut Buf,
    ) {
        let n = param.len();
        assert_eq!(grad.len(), n);
        assert_eq!(m.len(), n);
        assert_eq!(v.len(), n);
        if n == 0 {
            return;
        }
        let ni = i(n);
        let decay = 1.0 - lr * weight_decay;
        launch!(self, "adam_f32", per_elem(n);
            &ni, param, grad, m, v, &lr, &b1, &b2, &eps, &decay, ctrl);
    }

    /// [`crate::backend::Backend::adam_step`].
    pub(super) fn adam_step_one(
        &self,
        s: &AdamStep,
        param: &mut Buf,
        grad: &Buf,
        m: &mut Buf,
        v: &mut Buf,
    ) {
        // A single update with host-known hyper-parameters: its own control block.
        let mut c = vec![0.0f64; ctrl::LEN];
        c[ctrl::APPLY] = 1.0;
        c[ctrl::GRAD_SCALE] = s.grad_scale;
        c[ctrl::BC1] = 1.0 - s.beta1.powi(s.t as i32);
        c[ctrl::BC2] = 1.0 - s.beta2.powi(s.t as i32);
        let mut cb = self.scratch::<f64>(ctrl::LEN);
        self.upload_any(&c, &mut cb);
        let wd = s.weight_decay;
        self.adam_ctrl(s.lr, s.beta1, s.beta2, s.eps, wd, &cb, param, grad, m, v);
    }

    /// [`crate::backend::Backend::opt_state`].
    pub(super) fn opt_state_alloc(&self, grad_lens: &[usize], start: &OptReport) -> CudaOptState {
        let mut map = Vec::new();
        for (t, &n) in grad_lens.iter().enumerate() {
            i(n);
            for first in (0..n).step_by(MT_CHUNK) {
                map.push(((t as u64) << 32) | first as u64);
            }
        }
        let blocks = map.len();
        i(blocks);
        let mut c = vec![0.0f64; ctrl::LEN];
        c[ctrl::UPDATES] = start.updates as f64;
        c[ctrl::SKIPPED] = start.skipped as f64;
        c[ctrl::FIRST_BAD_STEP] = -1.0;
        c[ctrl::LAST_BAD_STEP] = start.last_bad_step.map_or(-1.0, |s| s as f64);
        if let Some((step, loss, norm)) = start.first_bad {
            c[ctrl::FIRST_BAD_STEP] = step as f64;
            c[ctrl::FIRST_BAD_LOSS] = loss;
            c[ctrl::FIRST_BAD_NORM] = norm;
        }
        c[ctrl::LATCHED] = start.latched as i32 as f64;
        c[ctrl::LAST_LOSS] = start.last_loss;
        c[ctrl::LAST_NORM] = start.last_grad_norm;
        c[ctrl::LOSS_SUM] = start.loss_sum;
        c[ctrl::LOSS_COUNT] = start.loss_count as f64;
        let mut ctrl_buf = self.alloc_any::<f64>(ctrl::LEN, false);
        self.upload_any(&c, &mut ctrl_buf);
        let mut map_buf = self.alloc_any::<u64>(blocks.max(1), false);
        if blocks > 0 {
            self.upload_any(&map, &mut map_buf);
        }
        CudaOptState {
            ctrl: ctrl_buf,
            partials: self.alloc_any::<f64>(blocks.max(1), false),
            lens: grad_lens.to_vec(),
            tab: self.alloc_any::<u64>(5 * grad_lens.len().max(1), false),
            tab_host: Vec::new(),
            map: map_buf,
            blocks,
        }
    }

    /// [`crate::backend::Backend::opt_step`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn opt_step_launch(
        &self,
        h: &OptHyper,
        loss: &Buf,
        params: &mut [Buf],
        grads: &[Buf],
        m: &mut [Buf],
        v: &mut [Buf],
        st: &mut CudaOptState,
    ) {
        assert_eq!(loss.len(), 1);
        let nt = st.lens.len();
        assert!(params.len() == nt && grads.len() == nt && m.len() == nt && v.len() == nt);
        // The table of addresses: uploaded on the first step, and again only if a buffer moved
        // (a host-to-device copy, not a synchronization).
        let mut tab = Vec::with_capacity(5 * nt);
        for t in 0..nt {
            let n = st.lens[t];
            assert!(params[t].len() == n && grads[t].len() == n && m[t].len() == n);
            assert_eq!(v[t].len(), n);
            tab.extend([
                self.addr(&params[t]),
                self.addr(&grads[t]),
                self.addr(&m[t]),
                self.addr(&v[t]),
                n as u64,
            ]);
        }
        if tab != st.tab_host && nt > 0 {
            self.upload_any(&tab, &mut st.tab);
            st.tab_host = tab;
        }
        let cfg = per_block(st.blocks, 0);
        if st.blocks > 0 {
            launch!(self, "sum_squares_multi_f32", cfg; &st.tab, &st.map, &mut st.partials);
        }
        let np = i(st.blocks);
        let (b1, b2) = (h.beta1, h.beta2);
        let clip = h.grad_clip.unwrap_or(0.0);
        let (has_clip, latch) = (h.grad_clip.is_some() as i32, h.latch as i32);
        // Step, lr and decay from the per-step scalars (normally set by `begin_step` already).
        self.set_step_vals(Self::step_vals_for(h));
        let sv = &self.step_vals().buf;
        launch!(self, "opt_control_f64", per_block(1, 0);
            &np, &st.partials, loss, &mut st.ctrl, &b1, &b2, &clip, &has_clip, &latch, sv);
        if st.blocks > 0 {
            let eps = h.eps;
            launch!(self, "adam_multi_f32", cfg; &st.tab, &st.map, &b1, &b2, &eps, &st.ctrl, sv);
        }
    }

    /// [`crate::backend::Backend::opt_report`].
    pub(super) fn opt_report_read(&self, st: &CudaOptState) -> OptReport {
        let c = self.read(&st.ctrl);
        let step = |x: f64| (x >= 0.0).then_some(x as u64);
        OptReport {
            updates: c[ctrl::UPDATES] as u64,
            skipped: c[ctrl::SKIPPED] as u64,
            first_bad: step(c[ctrl::FIRST_BAD_STEP])
                .map(|s| (s, c[ctrl::FIRST_BAD_LOSS], c[ctrl::FIRST_BAD_NORM])),
            last_bad_step: step(c[ctrl::LAST_BAD_STEP]),
            latched: c[ctrl::LATCHED] != 0.0,
            last_loss: c[ctrl::LAST_LOSS],
            last_grad_norm: c[ctrl::LAST_NORM],
            loss_sum: c[ctrl::LOSS_SUM],
            loss_count: c[ctrl::LOSS_COUNT] as u64,
        }
    }
}
