//! The CPU backend: host vectors, the reference ops of [`crate::ops`], rayon over the batch.
//! Generic over f32 (training) and f64 (gradient checks).

use crate::backend::{AdamStep, Backend};
use crate::ops::bcastconv::{self, BcastConvDims, BcastConvGrads, BcastConvParams};
use crate::ops::{self, attention::AttnDims, conv::ConvGeom, elementwise::DropoutMask};
use crate::optim::{OptHyper, OptReport};
use crate::real::Real;
use crate::rng::Philox;
use rayon::prelude::*;
use std::marker::PhantomData;

#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu<T: Real> {
    _t: PhantomData<T>,
    /// Run slot attention on u with Wk and Wv folded ([`Backend::folds_kv`]); off in the
    /// reference, on only where a test compares the two.
    kv_fold: bool,
}

impl<T: Real> Cpu<T> {
    pub fn new() -> Self {
        Self {
            _t: PhantomData,
            kv_fold: false,
        }
    }
    /// The same backend with the fold on: the model then computes slot attention as the CUDA
    /// backend does (one head, feat = d), which tests compare with the plain reference.
    pub fn folding_kv(self) -> Self {
        Self {
            kv_fold: true,
            ..self
        }
    }
}

impl<T: Real> Backend for Cpu<T> {
    type Buf = Vec<T>;
    type OptState = crate::optim::OptReport;
    type StepGraph = ();

    fn describe(&self) -> String {
        format!(
            "cpu ({}, {} threads)",
            T::NAME,
            rayon::current_num_threads()
        )
    }
    /// MemAvailable of /proc/meminfo (Linux; None elsewhere).
    fn memory_available(&self) -> Option<(u64, &'static str)> {
        let s = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some((kb * 1024, "host"))
    }
    fn alloc(&self, len: usize) -> Vec<T> {
        vec![T::zero(); len]
    }
    fn len(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }
    fn upload_f64(&self, src: &[f64], dst: &mut Vec<T>) {
        assert_eq!(src.len(), dst.len());
        dst.iter_mut()
            .zip(src)
            .for_each(|(d, &s)| *d = T::from_f64c(s));
    }
    fn upload_f32(&self, src: &[f32], dst: &mut Vec<T>) {
        assert_eq!(src.len(), dst.len());
        dst.iter_mut()
            .zip(src)
            .for_each(|(d, &s)| *d = T::from_f64c(s as f64));
    }
    fn download(&self, src: &Vec<T>) -> Vec<f64> {
        src.iter().map(|v| v.to_f64c()).collect()
    }
    fn fill_zero(&self, buf: &mut Vec<T>) {
        buf.fill(T::zero());
    }
    fn copy(&self, src: &Vec<T>, dst: &mut Vec<T>) {
        dst.copy_from_slice(src);
    }
    fn add_assign(&self, y: &mut Vec<T>, x: &Vec<T>) {
        ops::elementwise::add_assign(y, x);
    }
    fn scale(&self, x: &mut Vec<T>, a: f64) {
        let a = T::from_f64c(a);
        x.par_iter_mut().for_each(|v| *v *= a);
    }
    fn sum_squares(&self, x: &Vec<T>) -> f64 {
        x.iter().map(|v| v.to_f64c() * v.to_f64c()).sum()
    }
    fn rel_change(&self, new: &Vec<T>, old: &Vec<T>) -> f64 {
        let num: f64 = new
            .iter()
            .zip(old)
            .map(|(a, b)| (a.to_f64c() - b.to_f64c()).powi(2))
            .sum();
        (num / self.sum_squares(old).max(1e-300)).sqrt()
    }
    fn fill_normal(&self, rng: Philox, stream: u32, step: u32, buf: &mut Vec<T>) {
        buf.par_iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = T::from_f64c(rng.normal(stream, step, i as u64)));
    }

    fn conv2d_fwd(
        &self,
        g: &ConvGeom,
        batch: usize,
        x: &Vec<T>,
        w: &Vec<T>,
        b: &Vec<T>,
        relu: bool,
        y: &mut Vec<T>,
    ) {
        ops::conv::conv2d_fwd(g, batch, x, w, b, relu, y);
    }
    fn conv2d_bwd(
        &self,
        g: &ConvGeom,
        batch: usize,
        x: &Vec<T>,
        w: &Vec<T>,
        y: &Vec<T>,
        relu: bool,
        dy: &Vec<T>,
        dx: Option<&mut Vec<T>>,
        dw: &mut Vec<T>,
        db: &mut Vec<T>,
    ) {
        ops::conv::conv2d_bwd(g, batch, x, w, y, relu, dy, dx.map(|d| &mut d[..]), dw, db);
    }
    fn conv_t2d_fwd(
        &self,
        g: &ConvGeom,
        batch: usize,
        x: &Vec<T>,
        w: &Vec<T>,
        b: &Vec<T>,
        relu: bool,
        y: &mut Vec<T>,
    ) {
        ops::conv::conv_t2d_fwd(g, batch, x, w, b, relu, y);
    }
    fn conv_t2d_bwd(
        &self,
        g: &ConvGeom,
        batch: usize,
        x: &Vec<T>,
        w: &Vec<T>,
        y: &Vec<T>,
        relu: bool,
        dy: &Vec<T>,
        dx: Option<&mut Vec<T>>,
        dw: &mut Vec<T>,
        db: &mut Vec<T>,
    ) {
        ops::conv::conv_t2d_bwd(g, batch, x, w, y, relu, dy, dx.map(|d| &mut d[..]), dw, db);
    }
    fn linear_fwd(
        &self,
        rows: usize,
        n_in: usize,
        n_out: usize,
        x: &Vec<T>,
        w: &Vec<T>,
        b: Option<&Vec<T>>,
        relu: bool,
        y: &mut Vec<T>,
    ) {
        ops::linear::linear_fwd(rows, n_in, n_out, x, w, b.map(|b| &b[..]), relu, y);
    }
    fn linear_bwd(
        &self,
        rows: usize,
        n_in: usize,
        n_out: usize,
        x: &Vec<T>,
        w: &Vec<T>,
        y: &Vec<T>,
        relu: bool,
        dy: &Vec<T>,
        dx: Option<&mut Vec<T>>,
        dw: &mut Vec<T>,
        db: Option<&mut Vec<T>>,
    ) {
        ops::linear::linear_bwd(
            rows,
            n_in,
            n_out,
            x,
            w,
            y,
            relu,
            dy,
            dx.map(|d| &mut d[..]),
            dw,
            db.map(|d| &mut d[..]),
        );
    }
    fn layernorm_fwd(
        &self,
        rows: usize,
        dim: usize,
        x: &Vec<T>,
        gamma: &Vec<T>,
        beta: &Vec<T>,
        y: &mut Vec<T>,
        mean: &mut Vec<T>,
        rstd: &mut Vec<T>,
    ) {
        ops::layernorm::layernorm_fwd(rows, dim, x, gamma, beta, y, mean, rstd);
    }
    fn layernorm_bwd(
        &self,
        rows: usize,
        dim: usize,
        x: &Vec<T>,
        gamma: &Vec<T>,
        mean: &Vec<T>,
        rstd: &Vec<T>,
        dy: &Vec<T>,
        dx: &mut Vec<T>,
        dgamma: &mut Vec<T>,
        dbeta: &mut Vec<T>,
    ) {
        ops::layernorm::layernorm_bwd(rows, dim, x, gamma, mean, rstd, dy, dx, dgamma, dbeta);
    }
    fn softpos_add_fwd(
        &self,
        h: usize,
        w: usize,
        c: usize,
        wp: &Vec<T>,
        bp: &Vec<T>,
        x: &mut Vec<T>,
    ) {
        ops::posembed::softpos_add_fwd(h, w, c, wp, bp, x);
    }
    fn softpos_add_bwd(
        &self,
        h: usize,
        w: usize,
        c: usize,
        dy: &Vec<T>,
        dwp: &mut Vec<T>,
        dbp: &mut Vec<T>,
    ) {
        ops::posembed::softpos_add_bwd(h, w, c, dy, dwp, dbp);
    }
    fn broadcast_pos_fwd(
        &self,
        h: usize,
        w: usize,
        c: usize,
        z: &Vec<T>,
        wp: &Vec<T>,
        bp: &Vec<T>,
        y: &mut Vec<T>,
    ) {
        ops::posembed::broadcast_pos_fwd(h, w, c, z, wp, bp, y);
    }
    fn bcast_conv_splits(&self, dims: &BcastConvDims) -> bool {
        dims.splits()
    }
    fn bcast_conv_fwd(
        &self,
        dims: &BcastConvDims,
        p: &BcastConvParams<'_, Vec<T>>,
        z: &Vec<T>,
        x: &mut Vec<T>,
        y: &mut Vec<T>,
    ) {
        if self.bcast_conv_splits(dims) {
            bcastconv::bcast_conv_fwd_split(dims, p.pos_w, p.pos_b, p.w, p.b, p.relu, z, y)
        } else {
            bcastconv::bcast_conv_fwd_by_ops(self, dims, p, z, x, y)
        }
    }
    fn bcast_conv_bwd(
        &self,
        dims: &BcastConvDims,
        p: &BcastConvParams<'_, Vec<T>>,
        z: &Vec<T>,
        x: &Vec<T>,
        y: &Vec<T>,
        dy: &Vec<T>,
        dx: &mut Vec<T>,
        dz: &mut Vec<T>,
        g: BcastConvGrads<'_, Vec<T>>,
    ) {
        if self.bcast_conv_splits(dims) {
            bcastconv::bcast_conv_bwd_split(
                dims, p.pos_w, p.pos_b, p.w, p.relu, z, y, dy, dz, g.pos_w, g.pos_b, g.w, g.b,
            )
        } else {
            bcastconv::bcast_conv_bwd_by_ops(self, dims, p, z, x, y, dy, dx, dz, g)
        }
    }
    fn broadcast_pos_bwd(
        &self,
        h: usize,
        w: usize,
        c: usize,
        dy: &Vec<T>,
        dz: &mut Vec<T>,
        dwp: &mut Vec<T>,
        dbp: &mut Vec<T>,
    ) {
        ops::posembed::broadcast_pos_bwd(h, w, c, dy, dz, dwp, dbp);
    }
    fn attention_fwd(
        &self,
        dm: &AttnDims,
        k: &Vec<T>,
        v: &Vec<T>,
        q: &Vec<T>,
        attn: &mut Vec<T>,
        upd: &mut Vec<T>,
    ) {
        ops::attention::attention_fwd(dm, k, v, q, attn, upd);
    }
    fn attention_bwd(
        &self,
        dm: &AttnDims,
        k: &Vec<T>,
        v: &Vec<T>,
        q: &Vec<T>,
        attn: &Vec<T>,
        dupd: &Vec<T>,
        dk: &mut Vec<T>,
        dv: &mut Vec<T>,
        dq: &mut Vec<T>,
    ) {
        ops::attention::attention_bwd(dm, k, v, q, attn, dupd, dk, dv, dq);
    }
    fn attention_bwd_same_kv(
        &self,
        dm: &AttnDims,
        x: &Vec<T>,
        q: &Vec<T>,
        attn: &Vec<T>,
        dupd: &Vec<T>,
        dx: &mut Vec<T>,
        dq: &mut Vec<T>,
    ) {
        ops::attention::attention_bwd_same_kv(dm, x, q, attn, dupd, dx, dq);
    }
    fn folds_kv(&self) -> bool {
        self.kv_fold
    }
    fn matmul_small(
        &self,
        m: usize,
        n: usize,
        kd: usize,
        a: &Vec<T>,
        a_t: bool,
        b: &Vec<T>,
        b_t: bool,
        c: &mut Vec<T>,
        accumulate: bool,
    ) {
        ops::linear::matmul_small(m, n, kd, a, a_t, b, b_t, c, accumulate);
    }
    fn gru_gates_fwd(&self, d: usize, gi: &Vec<T>, gh: &Vec<T>, h: &Vec<T>, h_new: &mut Vec<T>) {
        ops::gru::gru_gates_fwd(d, gi, gh, h, h_new);
    }
    fn gru_gates_bwd(
        &self,
        d: usize,
        gi: &Vec<T>,
        gh: &Vec<T>,
        h: &Vec<T>,
        dh_new: &Vec<T>,
        dgi: &mut Vec<T>,
        dgh: &mut Vec<T>,
        dh: &mut Vec<T>,
    ) {
        ops::gru::gru_gates_bwd(d, gi, gh, h, dh_new, dgi, dgh, dh);
    }
    fn slot_init_fwd(
        &self,
        d: usize,
        mu: &Vec<T>,
        log_sigma: &Vec<T>,
        noise: &Vec<T>,
        slots: &mut Vec<T>,
    ) {
        ops::elementwise::slot_init_fwd(d, mu, log_sigma, noise, slots);
    }
    fn slot_init_bwd(
        &self,
        d: usize,
        log_sigma: &Vec<T>,
        noise: &Vec<T>,
        dslots: &Vec<T>,
        dmu: &mut Vec<T>,
        dlog_sigma: &mut Vec<T>,
    ) {
        ops::elementwise::slot_init_bwd(d, log_sigma, noise, dslots, dmu, dlog_sigma);
    }
    fn dropout_fwd(&self, mask: &DropoutMask, x: &mut Vec<T>) {
        ops::elementwise::dropout_fwd(mask, x);
    }
    fn dropout_bwd(&self, mask: &DropoutMask, dx: &mut Vec<T>) {
        ops::elementwise::dropout_bwd(mask, dx);
    }
    fn composite_mse_fwd(
        &self,
        batch: usize,
        k: usize,
        p: usize,
        dec: &Vec<T>,
        target: &Vec<T>,
        masks: &mut Vec<T>,
        recon: &mut Vec<T>,
        loss: &mut Vec<T>,
    ) {
        loss[0] = ops::composite::composite_mse_fwd(batch, k, p, dec, target, masks, recon);
    }
    fn composite_mse_bwd(
        &self,
        batch: usize,
        k: usize,
        p: usize,
        dec: &Vec<T>,
        target: &Vec<T>,
        masks: &Vec<T>,
        recon: &Vec<T>,
        dloss: f64,
        ddec: &mut Vec<T>,
    ) {
        ops::composite::composite_mse_bwd(
            batch,
            k,
            p,
            dec,
            target,
            masks,
            recon,
            T::from_f64c(dloss),
            ddec,
        );
    }
    fn opt_state(&self, _grad_lens: &[usize], start: &OptReport) -> OptReport {
        *start
    }
    fn opt_step(
        &self,
        h: &OptHyper,
        loss: &Vec<T>,
        params: &mut [Vec<T>],
        grads: &[Vec<T>],
        m: &mut [Vec<T>],
        v: &mut [Vec<T>],
        st: &mut OptReport,
    ) {
        let norm_sq: f64 = grads.iter().map(|g| self.sum_squares(g)).sum();
        if let Some(a) = st.decide(h, loss[0].to_f64c(), norm_sq) {
            for i in 0..params.len() {
                self.adam_step(&a, &mut params[i], &grads[i], &mut m[i], &mut v[i]);
            }
        }
    }
    fn opt_report(&self, st: &OptReport) -> OptReport {
        *st
    }
    fn capture_end(&self) -> Result<(), String> {
        Err("the CPU backend does not capture".into())
    }
    fn replay(&self, _graph: &()) -> Result<(), String> {
        Err("the CPU backend does not capture".into())
    }
    fn adam_step(
        &self,
        s: &AdamStep,
        param: &mut Vec<T>,
        grad: &Vec<T>,
        m: &mut Vec<T>,
        v: &mut Vec<T>,
    ) {
        crate::optim::adam_step_cpu(s, param, grad, m, v);
    }
}
