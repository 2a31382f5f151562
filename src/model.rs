//! The Slot Attention autoencoder (model.md), written once over [`Backend`]:
//! CNN encoder + soft position embedding → LayerNorm + per-token MLP → slot attention
//! (K slots, T iterations of the cell) → spatial broadcast decoder per slot → alpha
//! compositing → MSE. Forward and backward are spelled out op by op; the two gradient modes:
//! - implicit (`implicit_diff: true`): T iterations into a scratch tape that is overwritten each
//!   time (nothing recorded), then ONE recorded cell application on the detached slots; the
//!   backward runs through that application only, and mu / log_sigma get no gradient;
//! - BPTT: T recorded cell applications from mu + exp(log_sigma)·noise, backward through all.
//!
//! **The fold** (where the backend asks for it, [`Backend::folds_kv`], with one head and
//! feat = d): slot attention reads u = LN_in(f) itself instead of k = u·Wkᵀ and v = u·Wvᵀ.
//! With q = LN_s(s)·Wqᵀ, the logits q·kᵀ = (LN_s(s)·W_qkᵀ)·uᵀ with W_qk = Wkᵀ·Wq, and the GRU's
//! input gates upd·W_ihᵀ = upd_u·W_viᵀ with upd_u = Σ_n w_n·u_n and W_vi = W_ih·Wv: the same
//! function, with W_qk in Wq's place and W_vi in W_ih's. The two products run once per forward
//! on weights alone; the backward turns their gradients back into Wq's, Wk's, W_ih's and Wv's.
//! Per token, the chain then writes u only (no k, v), attention reads one tensor, not two,
//! and its backward writes one (d u), not two; Wk's and Wv's gradients need no pass over the
//! tokens.

use crate::backend::{Alloc, Backend, SizeCounter};
use crate::config::{DecoderKind, InitScheme, ModelConfig};
use crate::ops::attention::AttnDims;
use crate::ops::bcastconv::{BcastConvDims, BcastConvGrads, BcastConvParams};
use crate::ops::conv::ConvGeom;
use crate::ops::elementwise::DropoutMask;
use crate::ops::slotcell::{
    SlotCellDims, SlotQueryGrads, SlotQueryOut, SlotQueryParams, SlotQueryTape, SlotUpdateGrads,
    SlotUpdateOut, SlotUpdateParams, SlotUpdateScratch, SlotUpdateTape,
};
use crate::ops::tokens::{
    MlpLayer, TokenActs, TokenDims, TokenGradActs, TokenGrads, TokenOutGrads, TokenParams,
};
use crate::rng::{stream, Philox};

/// How a parameter tensor is initialised (the official code: glorot-uniform weights, zero
/// biases, LayerNorm γ = 1, β = 0).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Glorot {
        fan_in: usize,
        fan_out: usize,
    },
    /// U(−bound, bound).
    Uniform {
        bound: f64,
    },
    Zeros,
    Ones,
}

/// Name (PyTorch state-dict style), shape (PyTorch layout) and initialiser of one tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Index of a parameter tensor in [`Model::params`].
pub type Pid = usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    Conv,
    ConvTranspose,
}

/// One conv layer of the encoder or decoder with its parameters.
#[derive(Clone, Copy, Debug)]
pub struct ConvLayer {
    pub kind: LayerKind,
    pub geom: ConvGeom,
    pub relu: bool,
    pub w: Pid,
    pub b: Pid,
}

#[derive(Clone, Copy, Debug)]
pub struct Dense {
    pub w: Pid,
    pub b: Option<Pid>,
    pub n_in: usize,
    pub n_out: usize,
}

#[derive(Clone, Copy, Debug)]
pub struct Norm {
    pub g: Pid,
    pub b: Pid,
}

/// Every dimension and parameter index of the model; derived from a [`ModelConfig`].
#[derive(Clone, Debug)]
pub struct Arch {
    pub res: usize,
    pub k: usize,
    pub d: usize,
    pub heads: usize,
    pub feat: usize,
    pub mlp_hidden: usize,
    pub eps: f64,
    pub dropout: f64,
    pub implicit: bool,
    pub iters: usize,
    pub fwd_tol: Option<f64>,
    pub encoder: Vec<ConvLayer>,
    pub enc_pos: Dense,
    pub enc_norm: Norm,
    pub enc_mlp: Vec<Dense>,
    pub norm_inputs: Norm,
    pub to_k: Dense,
    pub to_v: Dense,
    pub to_q: Dense,
    pub norm_slots: Norm,
    pub mu: Pid,
    pub log_sigma: Pid,
    pub gru_ih: Dense,
    pub gru_hh: Dense,
    pub norm_mlp: Norm,
    pub mlp1: Dense,
    pub mlp2: Dense,
    /// Side of the broadcast grid (decoder_init_size, or the resolution for `full`).
    pub dec_grid: usize,
    pub dec_pos: Dense,
    pub decoder: Vec<ConvLayer>,
    pub specs: Vec<ParamSpec>,
}

struct SpecBuilder {
    specs: Vec<ParamSpec>,
    scheme: InitScheme,
}

impl SpecBuilder {
    fn add(&mut self, name: String, shape: Vec<usize>, init: Init) -> Pid {
        self.specs.push(ParamSpec { name, shape, init });
        self.specs.len() - 1
    }
    /// (weight, bias) initialisers of a layer with these fans under the chosen scheme.
    fn inits(&self, fan_in: usize, fan_out: usize) -> (Init, Init) {
        match self.scheme {
            InitScheme::Official => (Init::Glorot { fan_in, fan_out }, Init::Zeros),
            InitScheme::Pytorch => {
                // kaiming_uniform(a = √5) reduces to U(±1/√fan_in); the bias uses the same bound.
                let u = Init::Uniform {
                    bound: 1.0 / (fan_in as f64).sqrt(),
                };
                (u, u)
            }
        }
    }
    fn dense(&mut self, prefix: &str, n_in: usize, n_out: usize, bias: bool) -> Dense {
        let (wi, bi) = self.inits(n_in, n_out);
        let w = self.add(format!("{prefix}.weight"), vec![n_out, n_in], wi);
        let b = bias.then(|| self.add(format!("{prefix}.bias"), vec![n_out], bi));
        Dense { w, b, n_in, n_out }
    }
    fn norm(&mut self, prefix: &str, dim: usize) -> Norm {
        Norm {
            g: self.add(format!("{prefix}.weight"), vec![dim], Init::Ones),
            b: self.add(format!("{prefix}.bias"), vec![dim], Init::Zeros),
        }
    }
    fn conv(&mut self, prefix: &str, kind: LayerKind, geom: ConvGeom, relu: bool) -> ConvLayer {
        let (ci, co, k) = (geom.c_in, geom.c_out, geom.k);
        // Conv2d weights are [out, in, k, k], ConvTranspose2d weights [in, out, k, k].
        let shape = match kind {
            LayerKind::Conv => vec![co, ci, k, k],
            LayerKind::ConvTranspose => vec![ci, co, k, k],
        };
        // PyTorch takes fan_in from the weight's dim 1: in·k² for Conv2d, out·k² for
        // ConvTranspose2d; glorot is symmetric in the two fans.
        let (wi, bi) = match (self.scheme, kind) {
            (InitScheme::Pytorch, LayerKind::ConvTranspose) => self.inits(co * k * k, ci * k * k),
            _ => self.inits(ci * k * k, co * k * k),
        };
        let w = self.add(format!("{prefix}.weight"), shape, wi);
        let b = self.add(format!("{prefix}.bias"), vec![co], bi);
        ConvLayer {
            kind,
            geom,
            relu,
            w,
            b,
        }
    }
}

impl Arch {
    /// Elements of each parameter tensor (and of its gradient), in `specs` order.
    pub fn grad_lens(&self) -> Vec<usize> {
        self.specs.iter().map(|s| s.numel()).collect()
    }

    pub fn new(m: &ModelConfig) -> Self {
        let mut sb = SpecBuilder {
            specs: Vec::new(),
            scheme: m.init,
        };
        let res = m.resolution;
        let (d, k) = (m.slot_size, m.num_slots);
        let mut encoder = Vec::new();
        let mut c_in = 3;
        for (i, &c) in m.encoder_channels.iter().enumerate() {
            encoder.push(sb.conv(
                &format!("encoder.convs.{i}"),
                LayerKind::Conv,
                ConvGeom::same(res, res, c_in, c, 5),
                true,
            ));
            c_in = c;
        }
        let c_enc = c_in;
        let enc_pos = sb.dense("encoder.pos", 4, c_enc, true);
        let enc_norm = sb.norm("encoder.norm", c_enc);
        let mut enc_mlp = Vec::new();
        let mut n_in = c_enc;
        for i in 0..m.num_layers {
            // PyTorch Sequential numbering: Linear, ReLU, Linear, ... → 0, 2, 4, ...
            enc_mlp.push(sb.dense(&format!("encoder.mlp.{}", 2 * i), n_in, m.feat_size, true));
            n_in = m.feat_size;
        }
        let feat = m.feat_size;
        let norm_inputs = sb.norm("slot_attention.norm_inputs", feat);
        let to_q = sb.dense("slot_attention.project_q", d, d, false);
        let to_k = sb.dense("slot_attention.project_k", feat, d, false);
        let to_v = sb.dense("slot_attention.project_v", feat, d, false);
        let norm_slots = sb.norm("slot_attention.norm_slots", d);
        // [1, 1, D] as in the official code; Keras' glorot on that shape: fan_in 1, fan_out D.
        let mu = sb.add(
            "slot_attention.slots_mu".into(),
            vec![1, 1, d],
            Init::Glorot {
                fan_in: 1,
                fan_out: d,
            },
        );
        let log_sigma = sb.add(
            "slot_attention.slots_log_sigma".into(),
            vec![1, 1, d],
            Init::Glorot {
                fan_in: 1,
                fan_out: d,
            },
        );
        let gru_ih = sb.dense_named("slot_attention.gru", "ih", d, 3 * d);
        let gru_hh = sb.dense_named("slot_attention.gru", "hh", d, 3 * d);
        let norm_mlp = sb.norm("slot_attention.norm_mlp", d);
        let mlp1 = sb.dense("slot_attention.mlp.0", d, m.mlp_hidden_size, true);
        let mlp2 = sb.dense("slot_attention.mlp.2", m.mlp_hidden_size, d, true);

        let chans = m.decoder_channels();
        let mut decoder = Vec::new();
        let (dec_grid, dec_pos);
        match m.decoder {
            DecoderKind::Broadcast => {
                dec_grid = m.decoder_init_size;
                dec_pos = sb.dense("decoder.pos", 4, d, true);
                let ups = m.decoder_upsamplings();
                let (mut s, mut c_in) = (dec_grid, d);
                for (i, &c) in chans.iter().enumerate() {
                    let g = if i < ups {
                        // TF 'same' for stride 2 (n → 2n) = PyTorch padding 2, output_padding 1.
                        ConvGeom::transposed(s, s, c_in, c, 5, 2, 2, 1)
                    } else {
                        ConvGeom::transposed(s, s, c_in, c, 5, 1, 2, 0)
                    };
                    decoder.push(sb.conv(
                        &format!("decoder.convs.{i}"),
                        LayerKind::ConvTranspose,
                        g,
                        true,
                    ));
                    s = g.h_out;
                    c_in = c;
                }
                let g = ConvGeom::transposed(s, s, c_in, 4, 3, 1, 1, 0);
                decoder.push(sb.conv(
                    &format!("decoder.convs.{}", chans.len()),
                    LayerKind::ConvTranspose,
                    g,
                    false,
                ));
            }
            DecoderKind::Full => {
                dec_grid = res;
                dec_pos = sb.dense("decoder.pos", 4, d, true);
                let mut c_in = d;
                for (i, &c) in chans.iter().enumerate() {
                    decoder.push(sb.conv(
                        &format!("decoder.convs.{i}"),
                        LayerKind::Conv,
                        ConvGeom::same(res, res, c_in, c, 5),
                        true,
                    ));
                    c_in = c;
                }
                let g = ConvGeom::same(res, res, c_in, 4, 3);
                decoder.push(sb.conv(
                    &format!("decoder.convs.{}", chans.len()),
                    LayerKind::Conv,
                    g,
                    false,
                ));
            }
        }
        let last = decoder.last().expect("decoder has layers").geom;
        assert_eq!(
            (last.h_out, last.w_out),
            (res, res),
            "decoder output size must equal the resolution"
        );
        Arch {
            res,
            k,
            d,
            heads: m.num_heads,
            feat,
            mlp_hidden: m.mlp_hidden_size,
            eps: m.eps,
            dropout: m.dropout,
            implicit: m.implicit_diff,
            iters: m.max_iter_fwd,
            fwd_tol: m.fwd_tol,
            encoder,
            enc_pos,
            enc_norm,
            enc_mlp,
            norm_inputs,
            to_k,
            to_v,
            to_q,
            norm_slots,
            mu,
            log_sigma,
            gru_ih,
            gru_hh,
            norm_mlp,
            mlp1,
            mlp2,
            dec_grid,
            dec_pos,
            decoder,
            specs: sb.specs,
        }
    }

    pub fn pixels(&self) -> usize {
        self.res * self.res
    }
    pub fn enc_channels(&self) -> usize {
        self.encoder.last().map(|l| l.geom.c_out).unwrap_or(3)
    }
    pub fn num_params(&self) -> usize {
        self.specs.iter().map(|s| s.numel()).sum()
    }
    /// Bytes of a training (or, with `training` false, evaluation) workspace at batch size
    /// `batch`: the buffers that [`Workspace::new`] allocates on a backend like `like` (a backend,
    /// or a [`SizeCounter`] for the backends' defaults), counted without allocating.
    pub fn workspace_bytes<A: Alloc>(&self, like: &A, batch: usize, training: bool) -> u64 {
        // The one choice of the backend that changes the buffers: whether the first decoder
        // convolution splits (see `Workspace::new`).
        let split = self
            .bcast_conv_dims(1)
            .map_or(true, |dims| like.bcast_conv_splits(&dims));
        let counter = SizeCounter::new(split, like.folds_kv());
        Workspace::new(&counter, self, batch, training);
        counter.bytes()
    }
    /// Bytes of the parameters, their gradients and Adam's two moments.
    pub fn train_state_bytes(&self) -> u64 {
        4 * 4 * self.num_params() as u64
    }
    /// Cell applications of a training forward: T + 1 (implicit) or T (BPTT).
    pub fn train_applications(&self) -> usize {
        if self.implicit {
            self.iters + 1
        } else {
            self.iters
        }
    }
    /// Whether slot attention can read u with Wk and Wv folded into the cell's weights (see
    /// "The fold" above): one head, and u as wide as the slots.
    pub fn kv_foldable(&self) -> bool {
        self.heads == 1 && self.feat == self.d
    }
    /// The per-token chain's widths; it ends at u (no k, v) under the fold.
    fn token_dims(&self, batch: usize, fold: bool) -> TokenDims {
        TokenDims {
            batch,
            h: self.res,
            w: self.res,
            c: self.enc_channels(),
            feat: self.feat,
            d: self.d,
            kv: !fold,
        }
    }
    fn token_params<'a, Buf>(&self, p: &'a [Buf]) -> TokenParams<'a, Buf> {
        TokenParams {
            pos_w: &p[self.enc_pos.w],
            pos_b: &p[self.enc_pos.b.expect("position embedding bias")],
            norm_g: &p[self.enc_norm.g],
            norm_b: &p[self.enc_norm.b],
            mlp: self
                .enc_mlp
                .iter()
                .map(|l| MlpLayer {
                    n_in: l.n_in,
                    n_out: l.n_out,
                    w: &p[l.w],
                    b: &p[l.b.expect("encoder MLP bias")],
                })
                .collect(),
            norm_in_g: &p[self.norm_inputs.g],
            norm_in_b: &p[self.norm_inputs.b],
            wk: &p[self.to_k.w],
            wv: &p[self.to_v.w],
        }
    }
    /// The chain's gradient tensors, borrowed out of the model's gradient list.
    fn token_grads<'a, Buf>(&self, g: &'a mut [Buf]) -> TokenGrads<'a, Buf> {
        let mut slots: Vec<Option<&'a mut Buf>> = g.iter_mut().map(Some).collect();
        let mut take = |i: Pid| slots[i].take().expect("each gradient tensor borrowed once");
        TokenGrads {
            pos_w: take(self.enc_pos.w),
            pos_b: take(self.enc_pos.b.expect("position embedding bias")),
            norm_g: take(self.enc_norm.g),
            norm_b: take(self.enc_norm.b),
            mlp: self
                .enc_mlp
                .iter()
                .map(|l| (take(l.w), take(l.b.expect("encoder MLP bias"))))
                .collect(),
            norm_in_g: take(self.norm_inputs.g),
            norm_in_b: take(self.norm_inputs.b),
            wk: take(self.to_k.w),
            wv: take(self.to_v.w),
        }
    }
    /// The decoder's broadcast input with its first layer as one op ([`crate::ops::bcastconv`]),
    /// when that layer is a convolution (the full-resolution decoder); None for a transposed one.
    fn bcast_conv_dims(&self, slots: usize) -> Option<BcastConvDims> {
        let l = &self.decoder[0];
        (l.kind == LayerKind::Conv).then_some(BcastConvDims {
            slots,
            geom: l.geom,
        })
    }
    fn bcast_conv_params<'a, Buf>(&self, p: &'a [Buf]) -> BcastConvParams<'a, Buf> {
        let l = &self.decoder[0];
        BcastConvParams {
            pos_w: &p[self.dec_pos.w],
            pos_b: &p[self.dec_pos.b.expect("decoder position embedding bias")],
            w: &p[l.w],
            b: &p[l.b],
            relu: l.relu,
        }
    }
    fn bcast_conv_grads<'a, Buf>(&self, g: &'a mut [Buf]) -> BcastConvGrads<'a, Buf> {
        let mut slots: Vec<Option<&'a mut Buf>> = g.iter_mut().map(Some).collect();
        let mut take = |i: Pid| slots[i].take().expect("each gradient tensor borrowed once");
        let l = &self.decoder[0];
        BcastConvGrads {
            pos_w: take(self.dec_pos.w),
            pos_b: take(self.dec_pos.b.expect("decoder position embedding bias")),
            w: take(l.w),
            b: take(l.b),
        }
    }
    fn slot_cell_dims(&self, batch: usize) -> SlotCellDims {
        SlotCellDims {
            rows: batch * self.k,
            d: self.d,
            hidden: self.mlp_hidden,
        }
    }
    fn slot_query_params<'a, Buf>(&self, p: &'a [Buf]) -> SlotQueryParams<'a, Buf> {
        SlotQueryParams {
            norm_g: &p[self.norm_slots.g],
            norm_b: &p[self.norm_slots.b],
            wq: &p[self.to_q.w],
        }
    }
    fn slot_query_grads<'a, Buf>(&self, g: &'a mut [Buf]) -> SlotQueryGrads<'a, Buf> {
        let mut slots: Vec<Option<&'a mut Buf>> = g.iter_mut().map(Some).collect();
        let mut take = |i: Pid| slots[i].take().expect("each gradient tensor borrowed once");
        SlotQueryGrads {
            norm_g: take(self.norm_slots.g),
            norm_b: take(self.norm_slots.b),
            wq: take(self.to_q.w),
        }
    }
    fn slot_update_params<'a, Buf>(&self, p: &'a [Buf]) -> SlotUpdateParams<'a, Buf> {
        let bias = |l: Dense| &p[l.b.expect("the GRU's and the MLP's layers have biases")];
        let (ih, hh, m1, m2) = (self.gru_ih, self.gru_hh, self.mlp1, self.mlp2);
        SlotUpdateParams {
            w_ih: &p[ih.w],
            b_ih: bias(ih),
            w_hh: &p[hh.w],
            b_hh: bias(hh),
            norm_g: &p[self.norm_mlp.g],
            norm_b: &p[self.norm_mlp.b],
            w1: &p[m1.w],
            b1: bias(m1),
            w2: &p[m2.w],
            b2: bias(m2),
        }
    }
    fn slot_update_grads<'a, Buf>(&self, g: &'a mut [Buf]) -> SlotUpdateGrads<'a, Buf> {
        let mut slots: Vec<Option<&'a mut Buf>> = g.iter_mut().map(Some).collect();
        let mut take = |i: Pid| slots[i].take().expect("each gradient tensor borrowed once");
        let bias = |l: Dense| l.b.expect("the GRU's and the MLP's layers have biases");
        let (ih, hh, m1, m2) = (self.gru_ih, self.gru_hh, self.mlp1, self.mlp2);
        SlotUpdateGrads {
            w_ih: take(ih.w),
            b_ih: take(bias(ih)),
            w_hh: take(hh.w),
            b_hh: take(bias(hh)),
            norm_g: take(self.norm_mlp.g),
            norm_b: take(self.norm_mlp.b),
            w1: take(m1.w),
            b1: take(bias(m1)),
            w2: take(m2.w),
            b2: take(bias(m2)),
        }
    }
    fn attn_dims(&self, batch: usize) -> AttnDims {
        AttnDims {
            batch,
            n: self.pixels(),
            k: self.k,
            d: self.d,
            heads: self.heads,
            scale: 1.0 / ((self.d / self.heads) as f64).sqrt(),
            eps: self.eps,
        }
    }
}

impl SpecBuilder {
    /// GRUCell tensors: weight_ih / weight_hh [3D, D], bias_ih / bias_hh [3D].
    fn dense_named(&mut self, prefix: &str, which: &str, d: usize, d3: usize) -> Dense {
        // (PyTorch's GRUCell draws every tensor from U(±1/√hidden): fan_in = d gives that.)
        let (wi, bi) = self.inits(d, d3);
        let w = self.add(format!("{prefix}.weight_{which}"), vec![d3, d], wi);
        let b = Some(self.add(format!("{prefix}.bias_{which}"), vec![d3], bi));
        Dense {
            w,
            b,
            n_in: d,
            n_out: d3,
        }
    }
}

/// Initial parameter values: glorot-uniform from the counter-based generator (stream INIT,
/// step = tensor index), so a given seed gives the same model on every backend.
pub fn init_params(specs: &[ParamSpec], seed: u64) -> Vec<Vec<f64>> {
    let rng = Philox::new(seed);
    specs
        .iter()
        .enumerate()
        .map(|(t, s)| match s.init {
            Init::Zeros => vec![0.0; s.numel()],
            Init::Ones => vec![1.0; s.numel()],
            Init::Uniform { bound } => (0..s.numel())
                .map(|i| (2.0 * rng.uniform(stream::INIT, t as u32, i as u64) - 1.0) * bound)
                .collect(),
            Init::Glorot { fan_in, fan_out } => {
                let limit = (6.0 / (fan_in + fan_out) as f64).sqrt();
                (0..s.numel())
                    .map(|i| (2.0 * rng.uniform(stream::INIT, t as u32, i as u64) - 1.0) * limit)
                    .collect()
            }
        })
        .collect()
}

/// What one cell application records (all `[B·K, ·]` rows).
pub struct CellTape<Buf> {
    pub slots_in: Buf,
    ln_s: Buf,
    ln_s_mean: Buf,
    ln_s_rstd: Buf,
    q: Buf,
    attn: Buf,
    upd: Buf,
    gi: Buf,
    gh: Buf,
    h1: Buf,
    ln_m: Buf,
    ln_m_mean: Buf,
    ln_m_rstd: Buf,
    hid: Buf,
    pub out: Buf,
}

impl<Buf> CellTape<Buf> {
    fn new<A: Alloc<Buf = Buf>>(be: &A, a: &Arch, batch: usize) -> Self {
        let rows = batch * a.k;
        let (d, m) = (a.d, a.mlp_hidden);
        CellTape {
            slots_in: be.buffer(rows * d),
            ln_s: be.buffer(rows * d),
            ln_s_mean: be.buffer(rows),
            ln_s_rstd: be.buffer(rows),
            q: be.buffer(rows * d),
            attn: be.buffer(a.attn_dims(batch).attn_len()),
            upd: be.buffer(rows * d),
            gi: be.buffer(rows * 3 * d),
            gh: be.buffer(rows * 3 * d),
            h1: be.buffer(rows * d),
            ln_m: be.buffer(rows * d),
            ln_m_mean: be.buffer(rows),
            ln_m_rstd: be.buffer(rows),
            hid: be.buffer(rows * m),
            out: be.buffer(rows * d),
        }
    }
    fn bytes<B: Backend<Buf = Buf>>(&self, be: &B, elem: usize) -> usize {
        [
            &self.slots_in,
            &self.ln_s,
            &self.ln_s_mean,
            &self.ln_s_rstd,
            &self.q,
            &self.attn,
            &self.upd,
            &self.gi,
            &self.gh,
            &self.h1,
            &self.ln_m,
            &self.ln_m_mean,
            &self.ln_m_rstd,
            &self.hid,
            &self.out,
        ]
        .iter()
        .map(|b| be.len(b) * elem)
        .sum()
    }
}

/// Gradient scratch of one cell backward.
struct CellGrads<Buf> {
    d_in: Buf,
    d_out: Buf,
    dh1: Buf,
    dhid: Buf,
    dln_m: Buf,
    dgi: Buf,
    dgh: Buf,
    dupd: Buf,
    dq: Buf,
    dln_s: Buf,
}

/// The fold's weights (see "The fold" at the top): W_qk = Wkᵀ·Wq `[feat][d]` takes Wq's place in
/// the query, W_vi = W_ih·Wv `[3d][feat]` the GRU's W_ih; computed by every forward. g_qk and
/// g_vi collect their gradients in a backward (empty in an evaluation workspace).
struct KvFold<Buf> {
    w_qk: Buf,
    w_vi: Buf,
    g_qk: Buf,
    g_vi: Buf,
}

/// Every activation buffer of a forward + backward at one batch size, allocated once and
/// reused by every step (nothing is allocated inside a step).
pub struct Workspace<Buf> {
    pub batch: usize,
    /// False for [`Model::eval_workspace`]: only [`Pass::Eval`] may run on it.
    pub training: bool,
    pub image: Buf,
    enc_act: Vec<Buf>,
    /// The per-token chain's activations, k and v among them (empty under the fold).
    tok: TokenActs<Buf>,
    /// The fold's weights and their gradients (None: slot attention reads k and v).
    fold: Option<KvFold<Buf>>,
    noise: Buf,
    slots0: Buf,
    /// Recorded cell applications: T for BPTT, 1 for implicit.
    cells: Vec<CellTape<Buf>>,
    /// Overwritten by every gradient-free iteration (implicit mode and evaluation).
    scratch: CellTape<Buf>,
    dec_in: Buf,
    pub dec_act: Vec<Buf>,
    pub masks: Buf,
    pub recon: Buf,
    pub loss: Buf,
    // Gradients of activations.
    /// d(output) of every encoder conv but the last, whose output gradient is
    /// `d_tok.d_enc_pos` (the position embedding passes it through unchanged).
    d_enc_act: Vec<Buf>,
    d_tok: TokenGradActs<Buf>,
    /// d k and d v, `[B·N, d]`; under the fold, d u `[B·N, feat]` in dk and dv empty.
    dk: Buf,
    dv: Buf,
    cg: CellGrads<Buf>,
    d_dec_in: Buf,
    d_dec_act: Vec<Buf>,
    /// Slots given from outside instead of mu + σ·noise (see [`SlotsFrom::Given`]).
    given_slots: Buf,
}

impl<Buf> Workspace<Buf> {
    /// Every buffer of a training (or, with `training` false, evaluation) workspace at batch
    /// size `batch`, from `be`.
    pub fn new<A: Alloc<Buf = Buf>>(be: &A, a: &Arch, batch: usize, training: bool) -> Self {
        let (res, p) = (a.res, a.pixels());
        let bn = batch * p;
        let bk = batch * a.k;
        // Gradient buffers have length 0 in an evaluation workspace.
        let galloc = |n: usize| be.buffer(if training { n } else { 0 });
        let (d, m) = (a.d, a.mlp_hidden);
        let g = a.dec_grid;
        // The decoder's broadcast input and its gradient: only a composed first layer reads
        // them (a split one works from the slots: ops::bcastconv).
        let split = a
            .bcast_conv_dims(bk)
            .is_some_and(|dims| be.bcast_conv_splits(&dims));
        let bcast_len = if split { 0 } else { bk * g * g * d };
        let fold = a.kv_foldable() && be.folds_kv();
        let tok_dims = a.token_dims(batch, fold);
        let recorded = match (training, a.implicit) {
            (false, _) => 0,
            (true, true) => 1,
            (true, false) => a.iters,
        };
        Workspace {
            batch,
            training,
            image: be.buffer(batch * res * res * 3),
            enc_act: a
                .encoder
                .iter()
                .map(|l| be.buffer(batch * l.geom.out_len()))
                .collect(),
            tok: TokenActs::new(be, &tok_dims, a.enc_mlp.len()),
            fold: fold.then(|| KvFold {
                w_qk: be.buffer(a.feat * d),
                w_vi: be.buffer(3 * d * a.feat),
                g_qk: galloc(a.feat * d),
                g_vi: galloc(3 * d * a.feat),
            }),
            noise: be.buffer(bk * d),
            slots0: be.buffer(bk * d),
            cells: (0..recorded).map(|_| CellTape::new(be, a, batch)).collect(),
            scratch: CellTape::new(be, a, batch),
            dec_in: be.buffer(bcast_len),
            dec_act: a
                .decoder
                .iter()
                .map(|l| be.buffer(bk * l.geom.out_len()))
                .collect(),
            masks: be.buffer(batch * a.k * p),
            recon: be.buffer(batch * p * 3),
            loss: be.buffer(1),
            d_enc_act: a
                .encoder
                .iter()
                .take(a.encoder.len().saturating_sub(1))
                .map(|l| galloc(batch * l.geom.out_len()))
                .collect(),
            d_tok: TokenGradActs::new(be, &tok_dims, a.enc_mlp.len(), training),
            dk: galloc(bn * if fold { a.feat } else { d }),
            dv: galloc(if fold { 0 } else { bn * d }),
            cg: CellGrads {
                d_in: galloc(bk * d),
                d_out: galloc(bk * d),
                dh1: galloc(bk * d),
                dhid: galloc(bk * m),
                dln_m: galloc(bk * d),
                dgi: galloc(bk * 3 * d),
                dgh: galloc(bk * 3 * d),
                dupd: galloc(bk * d),
                dq: galloc(bk * d),
                dln_s: galloc(bk * d),
            },
            d_dec_in: galloc(bcast_len),
            d_dec_act: a
                .decoder
                .iter()
                .map(|l| galloc(bk * l.geom.out_len()))
                .collect(),
            given_slots: be.buffer(bk * d),
        }
    }
}

/// Where the initial slots come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotsFrom {
    /// mu + exp(log_sigma) · noise with noise from (seed, SLOT_NOISE, step).
    Noise,
    /// The contents of `Workspace::given_slots` (set with [`Model::set_initial_slots`]).
    Given,
    /// Implicit training only: the given slots ARE the detached fixed-point estimate; the
    /// gradient-free iterations are skipped and the recorded application starts from them.
    /// This is exactly the function whose gradient implicit differentiation computes, so finite
    /// differences of it check the implicit gradient.
    Detached,
}

/// What a forward pass is for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pass {
    /// Training step `step`: dropout on, tapes recorded for [`Model::backward`].
    Train { step: u64 },
    /// Evaluation: no dropout, nothing recorded, `applications` cell applications in total.
    Eval { applications: usize, step: u64 },
}

/// Diagnostics of the gradient-free iterations.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ForwardStats {
    /// Gradient-free iterations actually run (fewer than T when `fwd_tol` stopped them).
    pub iters_run: usize,
    /// ||Δslots|| / ||slots|| of the last gradient-free iteration (only when `fwd_tol` is set).
    pub last_residual: Option<f64>,
}

pub struct Model<B: Backend> {
    pub arch: Arch,
    pub params: Vec<B::Buf>,
    pub grads: Vec<B::Buf>,
    pub seed: u64,
}

impl<B: Backend> Model<B> {
    /// A freshly initialised model (glorot from `seed`).
    pub fn new(be: &B, cfg: &ModelConfig, seed: u64) -> Self {
        let arch = Arch::new(cfg);
        let values = init_params(&arch.specs, seed);
        Self::from_values(be, arch, &values, seed)
    }

    pub fn from_values(be: &B, arch: Arch, values: &[Vec<f64>], seed: u64) -> Self {
        assert_eq!(values.len(), arch.specs.len());
        let params = arch
            .specs
            .iter()
            .zip(values)
            .map(|(s, v)| {
                assert_eq!(v.len(), s.numel(), "{}", s.name);
                let mut b = be.alloc(s.numel());
                be.upload_f64(v, &mut b);
                b
            })
            .collect();
        let grads = arch.specs.iter().map(|s| be.alloc(s.numel())).collect();
        Self {
            arch,
            params,
            grads,
            seed,
        }
    }

    /// Buffers for training steps (forward + backward) at batch size `batch`.
    pub fn workspace(&self, be: &B, batch: usize) -> Workspace<B::Buf> {
        self.new_workspace(be, batch, true)
    }

    /// Buffers for evaluation passes only ([`Pass::Eval`]): no recorded tapes and no gradient
    /// buffers, so evaluating next to a training run costs a fraction of its memory.
    pub fn eval_workspace(&self, be: &B, batch: usize) -> Workspace<B::Buf> {
        self.new_workspace(be, batch, false)
    }

    fn new_workspace(&self, be: &B, batch: usize, training: bool) -> Workspace<B::Buf> {
        Workspace::new(be, &self.arch, batch, training)
    }

    /// Bytes held by the slot-attention module's saved activations (recorded cell tapes plus the
    /// gradient-free scratch): constant in T under implicit differentiation, linear under BPTT.
    pub fn slot_saved_bytes(&self, be: &B, ws: &Workspace<B::Buf>, elem: usize) -> usize {
        ws.cells
            .iter()
            .chain(std::iter::once(&ws.scratch))
            .map(|c| c.bytes(be, elem))
            .sum()
    }

    /// The detached slots the recorded application of the last implicit training forward
    /// started from (a host read).
    pub fn detached_slots(&self, be: &B, ws: &Workspace<B::Buf>) -> Vec<f64> {
        be.download(&ws.cells[0].slots_in)
    }

    /// The slot noise of the last forward (a host read).
    pub fn noise(&self, be: &B, ws: &Workspace<B::Buf>) -> Vec<f64> {
        be.download(&ws.noise)
    }

    /// Use `slots` (`[B·K·D]`) as the initial slots of passes with [`SlotsFrom::Given`].
    pub fn set_initial_slots(&self, be: &B, ws: &mut Workspace<B::Buf>, slots: &[f64]) {
        be.upload_f64(slots, &mut ws.given_slots);
    }

    /// The dropout mask of cell application `application` of training step `step` (None when
    /// dropout is off).
    pub fn dropout_mask(&self, step: u64, application: usize) -> Option<DropoutMask> {
        (self.arch.dropout > 0.0).then(|| DropoutMask {
            rng: Philox::new(self.seed),
            stream: stream::DROPOUT_ITER_BASE + application as u32,
            step: step as u32,
            p: self.arch.dropout,
        })
    }

    /// W_qk and W_vi from the current weights (see "The fold").
    fn fold_weights(&self, be: &B, f: &mut KvFold<B::Buf>) {
        let (a, p) = (&self.arch, &self.params);
        let (d, feat) = (a.d, a.feat);
        be.matmul_small(
            feat,
            d,
            d,
            &p[a.to_k.w],
            true,
            &p[a.to_q.w],
            false,
            &mut f.w_qk,
            false,
        );
        let w_ih = &p[a.gru_ih.w];
        be.matmul_small(
            3 * d,
            feat,
            d,
            w_ih,
            false,
            &p[a.to_v.w],
            false,
            &mut f.w_vi,
            false,
        );
    }

    /// Wq's, Wk's, W_ih's and Wv's gradients (accumulated) from those of W_qk and W_vi.
    fn unfold_grads(&mut self, be: &B, f: &KvFold<B::Buf>) {
        let a = &self.arch;
        let (p, g) = (&self.params, &mut self.grads);
        let (d, feat) = (a.d, a.feat);
        let (wq, wk, wv, w_ih) = (&p[a.to_q.w], &p[a.to_k.w], &p[a.to_v.w], &p[a.gru_ih.w]);
        // W_qk = Wkᵀ·Wq: dWq += Wk·dW_qk, dWk += Wq·dW_qkᵀ.
        be.matmul_small(
            d,
            d,
            feat,
            wk,
            false,
            &f.g_qk,
            false,
            &mut g[a.to_q.w],
            true,
        );
        be.matmul_small(d, feat, d, wq, false, &f.g_qk, true, &mut g[a.to_k.w], true);
        // W_vi = W_ih·Wv: dW_ih += dW_vi·Wvᵀ, dWv += W_ihᵀ·dW_vi.
        be.matmul_small(
            3 * d,
            d,
            feat,
            &f.g_vi,
            false,
            wv,
            true,
            &mut g[a.gru_ih.w],
            true,
        );
        be.matmul_small(
            d,
            feat,
            3 * d,
            w_ih,
            true,
            &f.g_vi,
            false,
            &mut g[a.to_v.w],
            true,
        );
    }

    /// One application of the slot-attention cell: tape.slots_in → tape.out. k and v are u
    /// both under the fold (`fold` Some).
    #[allow(clippy::too_many_arguments)]
    fn cell_fwd(
        &self,
        be: &B,
        k: &B::Buf,
        v: &B::Buf,
        fold: Option<&KvFold<B::Buf>>,
        t: &mut CellTape<B::Buf>,
        batch: usize,
        dropout: Option<DropoutMask>,
    ) {
        let a = &self.arch;
        let p = &self.params;
        let dims = a.slot_cell_dims(batch);
        let mut qp = a.slot_query_params(p);
        let mut up = a.slot_update_params(p);
        if let Some(f) = fold {
            qp.wq = &f.w_qk;
            up.w_ih = &f.w_vi;
        }
        be.slot_query_fwd(
            &dims,
            &qp,
            &t.slots_in,
            SlotQueryOut {
                ln: &mut t.ln_s,
                mean: &mut t.ln_s_mean,
                rstd: &mut t.ln_s_rstd,
                q: &mut t.q,
            },
        );
        be.attention_fwd(&a.attn_dims(batch), k, v, &t.q, &mut t.attn, &mut t.upd);
        be.slot_update_fwd(
            &dims,
            &up,
            &t.upd,
            &t.slots_in,
            dropout.as_ref(),
            SlotUpdateOut {
                gi: &mut t.gi,
                gh: &mut t.gh,
                h1: &mut t.h1,
                ln: &mut t.ln_m,
                mean: &mut t.ln_m_mean,
                rstd: &mut t.ln_m_rstd,
                hid: &mut t.hid,
                out: &mut t.out,
            },
        );
    }

    /// Backward of one cell application: from cg.d_out, accumulates cg.d_in, dk, dv and the
    /// cell's parameter gradients. Under the fold (`fold` Some, k and v both u, dv None): d u
    /// into dk, and W_qk's and W_vi's gradients into the fold's.
    #[allow(clippy::too_many_arguments)]
    fn cell_bwd(
        &mut self,
        be: &B,
        k: &B::Buf,
        v: &B::Buf,
        fold: Option<&mut KvFold<B::Buf>>,
        t: &CellTape<B::Buf>,
        cg: &mut CellGrads<B::Buf>,
        dk: &mut B::Buf,
        dv: Option<&mut B::Buf>,
        batch: usize,
        dropout: Option<DropoutMask>,
    ) {
        let a = &self.arch;
        let (p, g) = (&self.params, &mut self.grads);
        let dims = a.slot_cell_dims(batch);
        let mut qp = a.slot_query_params(p);
        let mut up = a.slot_update_params(p);
        let (mut g_qk, mut g_vi) = (None, None);
        if let Some(f) = fold {
            qp.wq = &f.w_qk;
            up.w_ih = &f.w_vi;
            (g_qk, g_vi) = (Some(&mut f.g_qk), Some(&mut f.g_vi));
        }
        let mut ug = a.slot_update_grads(g);
        if let Some(gv) = g_vi {
            ug.w_ih = gv;
        }
        be.slot_update_bwd(
            &dims,
            &up,
            &SlotUpdateTape {
                upd: &t.upd,
                slots: &t.slots_in,
                gi: &t.gi,
                gh: &t.gh,
                h1: &t.h1,
                ln: &t.ln_m,
                mean: &t.ln_m_mean,
                rstd: &t.ln_m_rstd,
                hid: &t.hid,
                out: &t.out,
            },
            dropout.as_ref(),
            &cg.d_out,
            SlotUpdateScratch {
                dh1: &mut cg.dh1,
                dln: &mut cg.dln_m,
                dhid: &mut cg.dhid,
                dgi: &mut cg.dgi,
                dgh: &mut cg.dgh,
            },
            &mut cg.dupd,
            &mut cg.d_in,
            ug,
        );
        // Attention.
        be.fill_zero(&mut cg.dq);
        let am = a.attn_dims(batch);
        match dv {
            Some(dv) => be.attention_bwd(&am, k, v, &t.q, &t.attn, &cg.dupd, dk, dv, &mut cg.dq),
            None => {
                assert!(std::ptr::eq(k, v), "k and v are one tensor under the fold");
                be.attention_bwd_same_kv(&am, k, &t.q, &t.attn, &cg.dupd, dk, &mut cg.dq)
            }
        }
        let mut qg = a.slot_query_grads(g);
        if let Some(gq) = g_qk {
            qg.wq = gq;
        }
        be.slot_query_bwd(
            &dims,
            &qp,
            &SlotQueryTape {
                slots: &t.slots_in,
                ln: &t.ln_s,
                mean: &t.ln_s_mean,
                rstd: &t.ln_s_rstd,
                q: &t.q,
            },
            &cg.dq,
            &mut cg.dln_s,
            &mut cg.d_in,
            qg,
        );
    }

    /// Forward pass on the batch in `ws.image`; the loss lands in `ws.loss` (read it with
    /// [`Model::loss`]), masks and recon in `ws.masks` / `ws.recon`.
    pub fn forward(
        &self,
        be: &B,
        ws: &mut Workspace<B::Buf>,
        pass: Pass,
        init: SlotsFrom,
    ) -> ForwardStats {
        assert!(
            ws.training || matches!(pass, Pass::Eval { .. }),
            "a training pass needs a workspace from Model::workspace"
        );
        let a = &self.arch;
        let p = &self.params;
        let batch = ws.batch;
        let np = a.pixels();
        let bk = batch * a.k;
        // Encoder.
        for (i, l) in a.encoder.iter().enumerate() {
            let (done, rest) = ws.enc_act.split_at_mut(i);
            let x = if i == 0 { &ws.image } else { &done[i - 1] };
            be.conv2d_fwd(&l.geom, batch, x, &p[l.w], &p[l.b], l.relu, &mut rest[0]);
        }
        // Per-token chain: position embedding, LayerNorm, MLP, LayerNorm, k and v (or, under
        // the fold, the weights that let slot attention read u).
        if let Some(f) = &mut ws.fold {
            self.fold_weights(be, f);
        }
        be.tokens_fwd(
            &a.token_dims(batch, ws.fold.is_some()),
            &a.token_params(p),
            ws.enc_act.last().unwrap_or(&ws.image),
            &mut ws.tok,
        );
        let step = match pass {
            Pass::Train { step } | Pass::Eval { step, .. } => step,
        };
        match init {
            SlotsFrom::Noise => {
                be.fill_normal(
                    Philox::new(self.seed),
                    stream::SLOT_NOISE,
                    step as u32,
                    &mut ws.noise,
                );
                be.slot_init_fwd(a.d, &p[a.mu], &p[a.log_sigma], &ws.noise, &mut ws.slots0);
            }
            SlotsFrom::Given | SlotsFrom::Detached => be.copy(&ws.given_slots, &mut ws.slots0),
        }
        // Slot attention: the iterations.
        let mut stats = ForwardStats::default();
        let (k, v) = match ws.fold {
            Some(_) => (&ws.tok.ln_in, &ws.tok.ln_in),
            None => (&ws.tok.k, &ws.tok.v),
        };
        let fold = ws.fold.as_ref();
        let final_slots: &B::Buf = match pass {
            Pass::Eval { applications, .. } => {
                be.copy(&ws.slots0, &mut ws.scratch.slots_in);
                for it in 0..applications {
                    if it > 0 {
                        std::mem::swap(&mut ws.scratch.slots_in, &mut ws.scratch.out);
                    }
                    self.cell_fwd(be, k, v, fold, &mut ws.scratch, batch, None);
                }
                stats.iters_run = applications;
                &ws.scratch.out
            }
            Pass::Train { step } if a.implicit => {
                // T gradient-free iterations in the scratch tape (overwritten each time).
                be.copy(&ws.slots0, &mut ws.scratch.out);
                let iters = if init == SlotsFrom::Detached {
                    0
                } else {
                    a.iters
                };
                for it in 0..iters {
                    std::mem::swap(&mut ws.scratch.slots_in, &mut ws.scratch.out);
                    self.cell_fwd(
                        be,
                        k,
                        v,
                        fold,
                        &mut ws.scratch,
                        batch,
                        self.dropout_mask(step, it),
                    );
                    stats.iters_run = it + 1;
                    if let Some(tol) = a.fwd_tol {
                        let r = be.rel_change(&ws.scratch.out, &ws.scratch.slots_in);
                        stats.last_residual = Some(r);
                        if r < tol {
                            break;
                        }
                    }
                }
                // One recorded application from the detached fixed-point estimate.
                let cell = &mut ws.cells[0];
                be.copy(&ws.scratch.out, &mut cell.slots_in);
                let mask = self.dropout_mask(step, a.iters);
                self.cell_fwd(be, k, v, fold, cell, batch, mask);
                &ws.cells[0].out
            }
            Pass::Train { step } => {
                be.copy(&ws.slots0, &mut ws.cells[0].slots_in);
                for it in 0..a.iters {
                    if it > 0 {
                        let (prev, cur) = ws.cells.split_at_mut(it);
                        be.copy(&prev[it - 1].out, &mut cur[0].slots_in);
                    }
                    self.cell_fwd(
                        be,
                        k,
                        v,
                        fold,
                        &mut ws.cells[it],
                        batch,
                        self.dropout_mask(step, it),
                    );
                }
                stats.iters_run = a.iters;
                &ws.cells[a.iters - 1].out
            }
        };
        // Decoder, per slot (a batch of B·K images). A first convolution runs with the broadcast
        // (one op: see ops::bcastconv).
        let g = a.dec_grid;
        let bcast_conv = a.bcast_conv_dims(bk);
        match &bcast_conv {
            Some(dims) => be.bcast_conv_fwd(
                dims,
                &a.bcast_conv_params(p),
                final_slots,
                &mut ws.dec_in,
                &mut ws.dec_act[0],
            ),
            None => be.broadcast_pos_fwd(
                g,
                g,
                a.d,
                final_slots,
                &p[a.dec_pos.w],
                &p[a.dec_pos.b.unwrap()],
                &mut ws.dec_in,
            ),
        }
        let first = usize::from(bcast_conv.is_some());
        for (i, l) in a.decoder.iter().enumerate().skip(first) {
            let (done, rest) = ws.dec_act.split_at_mut(i);
            let x = if i == 0 { &ws.dec_in } else { &done[i - 1] };
            match l.kind {
                LayerKind::Conv => {
                    be.conv2d_fwd(&l.geom, bk, x, &p[l.w], &p[l.b], l.relu, &mut rest[0])
                }
                LayerKind::ConvTranspose => {
                    be.conv_t2d_fwd(&l.geom, bk, x, &p[l.w], &p[l.b], l.relu, &mut rest[0])
                }
            }
        }
        let dec_out = ws.dec_act.last().expect("decoder output");
        be.composite_mse_fwd(
            batch,
            a.k,
            np,
            dec_out,
            &ws.image,
            &mut ws.masks,
            &mut ws.recon,
            &mut ws.loss,
        );
        stats
    }

    /// The loss of the last forward (a host read).
    pub fn loss(&self, be: &B, ws: &Workspace<B::Buf>) -> f64 {
        be.download(&ws.loss)[0]
    }

    pub fn zero_grads(&mut self, be: &B) {
        for g in &mut self.grads {
            be.fill_zero(g);
        }
    }

    /// Backward of the last `Pass::Train { step }` forward: ACCUMULATES d(loss)/d(param) into
    /// `self.grads` (call [`Model::zero_grads`] first).
    pub fn backward(&mut self, be: &B, ws: &mut Workspace<B::Buf>, step: u64, init: SlotsFrom) {
        assert!(
            ws.training,
            "backward needs a workspace from Model::workspace"
        );
        let batch = ws.batch;
        let a = self.arch.clone();
        let np = a.pixels();
        let bk = batch * a.k;
        // Loss → decoder output. (Each layer's dx is the only contribution to the gradient of
        // its input, so the conv backward overwrites it: no zeroing of those buffers.)
        let nd = a.decoder.len();
        be.fill_zero(&mut ws.d_dec_act[nd - 1]);
        be.composite_mse_bwd(
            batch,
            a.k,
            np,
            &ws.dec_act[nd - 1],
            &ws.image,
            &ws.masks,
            &ws.recon,
            1.0,
            &mut ws.d_dec_act[nd - 1],
        );
        // Decoder layers, last to first (but a first convolution run with the broadcast).
        let bcast_conv = a.bcast_conv_dims(bk);
        let first = usize::from(bcast_conv.is_some());
        for i in (first..nd).rev() {
            let l = a.decoder[i];
            let (lower, upper) = ws.d_dec_act.split_at_mut(i);
            let dy = &upper[0];
            let x = if i == 0 {
                &ws.dec_in
            } else {
                &ws.dec_act[i - 1]
            };
            let dx = if i == 0 {
                &mut ws.d_dec_in
            } else {
                &mut lower[i - 1]
            };
            let (gw, gb) = two_mut(&mut self.grads, l.w, l.b);
            be.conv_bwd_set_dx(
                l.kind == LayerKind::ConvTranspose,
                &l.geom,
                bk,
                x,
                &self.params[l.w],
                &ws.dec_act[i],
                l.relu,
                dy,
                dx,
                gw,
                gb,
            );
        }
        let cg = &mut ws.cg;
        be.fill_zero(&mut cg.d_out);
        match &bcast_conv {
            Some(dims) => be.bcast_conv_bwd(
                dims,
                &a.bcast_conv_params(&self.params),
                &ws.cells.last().expect("a recorded cell application").out,
                &ws.dec_in,
                &ws.dec_act[0],
                &ws.d_dec_act[0],
                &mut ws.d_dec_in,
                &mut cg.d_out,
                a.bcast_conv_grads(&mut self.grads),
            ),
            None => {
                let g = a.dec_grid;
                let (gw, gb) = two_mut(&mut self.grads, a.dec_pos.w, a.dec_pos.b.unwrap());
                be.broadcast_pos_bwd(g, g, a.d, &ws.d_dec_in, &mut cg.d_out, gw, gb);
            }
        }
        // Slot attention cells, last to first.
        be.fill_zero(&mut ws.dk);
        be.fill_zero(&mut ws.dv);
        if let Some(f) = &mut ws.fold {
            be.fill_zero(&mut f.g_qk);
            be.fill_zero(&mut f.g_vi);
        }
        let recorded = ws.cells.len();
        for it in (0..recorded).rev() {
            be.fill_zero(&mut ws.cg.d_in);
            let application = if a.implicit { a.iters } else { it };
            let mask = self.dropout_mask(step, application);
            let (k, v, dv) = match ws.fold {
                Some(_) => (&ws.tok.ln_in, &ws.tok.ln_in, None),
                None => (&ws.tok.k, &ws.tok.v, Some(&mut ws.dv)),
            };
            self.cell_bwd(
                be,
                k,
                v,
                ws.fold.as_mut(),
                &ws.cells[it],
                &mut ws.cg,
                &mut ws.dk,
                dv,
                batch,
                mask,
            );
            std::mem::swap(&mut ws.cg.d_in, &mut ws.cg.d_out);
        }
        if let Some(f) = &ws.fold {
            self.unfold_grads(be, f);
        }
        // Now cg.d_out holds d(initial slots of the recorded chain).
        if !a.implicit && init == SlotsFrom::Noise {
            let (gm, gs) = two_mut(&mut self.grads, a.mu, a.log_sigma);
            be.slot_init_bwd(
                a.d,
                &self.params[a.log_sigma],
                &ws.noise,
                &ws.cg.d_out,
                gm,
                gs,
            );
        }
        // Implicit: the gradient w.r.t. the detached slots is dropped here; mu and log_sigma
        // get none.
        let mut g = a.token_grads(&mut self.grads);
        let up = match ws.fold {
            Some(_) => TokenOutGrads::U(&ws.dk),
            None => TokenOutGrads::Kv {
                dk: &ws.dk,
                dv: &ws.dv,
            },
        };
        be.tokens_bwd(
            &a.token_dims(batch, ws.fold.is_some()),
            &a.token_params(&self.params),
            &ws.tok,
            up,
            &mut ws.d_tok,
            &mut g,
        );
        let p = &self.params;
        let gr = &mut self.grads;
        // Encoder convs, last to first (the position embedding passes the gradient through).
        // Each layer's dx is the only contribution to its input's gradient: overwritten.
        let ne = a.encoder.len();
        for i in (0..ne).rev() {
            let l = a.encoder[i];
            let (lower, upper) = ws.d_enc_act.split_at_mut(i);
            let dy = upper.first().unwrap_or(&ws.d_tok.d_enc_pos);
            let x = if i == 0 {
                &ws.image
            } else {
                &ws.enc_act[i - 1]
            };
            let (gw, gb) = two_mut(gr, l.w, l.b);
            let (w, y) = (&p[l.w], &ws.enc_act[i]);
            if i == 0 {
                // The image needs no gradient.
                be.conv2d_bwd(&l.geom, batch, x, w, y, l.relu, dy, None, gw, gb);
            } else {
                let dx = &mut lower[i - 1];
                be.conv_bwd_set_dx(false, &l.geom, batch, x, w, y, l.relu, dy, dx, gw, gb);
            }
        }
    }
}

/// Two distinct mutable elements of a slice.
pub fn two_mut<T>(v: &mut [T], i: usize, j: usize) -> (&mut T, &mut T) {
    assert_ne!(i, j);
    if i < j {
        let (a, b) = v.split_at_mut(j);
        (&mut a[i], &mut b[0])
    } else {
        let (a, b) = v.split_at_mut(i);
        (&mut b[0], &mut a[j])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn arch(init: &str) -> Arch {
        let yaml = format!("Model:\n  init: {init}\nTraining:\n  data_type: tetrominoes\n");
        Arch::new(&Config::from_yaml(&yaml).unwrap().model)
    }

    #[test]
    fn initialisers_follow_the_scheme() {
        let (off, pt) = (arch("official"), arch("pytorch"));
        let (v_off, v_pt) = (init_params(&off.specs, 0), init_params(&pt.specs, 0));
        let find = |a: &Arch, name: &str| a.specs.iter().position(|s| s.name == name).unwrap();
        let max = |v: &[f64]| v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        // Official: glorot weights, zero biases. Conv 64→64 k5: limit sqrt(6 / (1600 + 1600)).
        let w = find(&off, "encoder.convs.1.weight");
        assert!(
            max(&v_off[w]) <= (6.0f64 / 3200.0).sqrt()
                && max(&v_off[w]) > 0.9 * (6.0f64 / 3200.0).sqrt()
        );
        assert!(v_off[find(&off, "encoder.convs.1.bias")]
            .iter()
            .all(|&b| b == 0.0));
        // PyTorch: U(±1/sqrt(fan_in)) for weights and biases; ConvTranspose2d's fan_in is out·k².
        let b = find(&pt, "encoder.convs.1.bias");
        assert!(max(&v_pt[b]) <= 1.0 / 40.0 && max(&v_pt[b]) > 0.0);
        let g = find(&pt, "slot_attention.gru.weight_hh");
        assert!(max(&v_pt[g]) <= 1.0 / 8.0 && max(&v_pt[g]) > 0.9 / 8.0);
        let d = find(&pt, "decoder.convs.5.weight"); // ConvTranspose2d [64, 4, 3, 3]
        assert!(
            max(&v_pt[d]) <= 1.0 / 6.0 && max(&v_pt[d]) > 0.9 / 6.0,
            "fan_in = 4·9 = 36"
        );
        // LayerNorms are ones and zeros in both.
        assert!(v_pt[find(&pt, "encoder.norm.weight")]
            .iter()
            .all(|&x| x == 1.0));
    }
}
