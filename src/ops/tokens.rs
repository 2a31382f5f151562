//! The per-token chain between the encoder's convolutions and slot attention, as one op.
//!
//! Math, per token of pixel p (e: the encoder's output, `[rows, c]`):
//!   x = e + pos(p)                                  (soft position embedding)
//!   a = LN0(x);  h_1 = relu(a·W1ᵀ + b1); …; f = h_{L−1}·W_Lᵀ + b_L   (encoder MLP, L layers)
//!   u = LN_in(f);  k = u·Wkᵀ;  v = u·Wvᵀ             (slot attention's inputs)
//!
//! With `kv` false the chain ends at u: slot attention then reads u itself, Wk and Wv folded
//! into the slot cell's weights (`model.rs`, "The fold"), and the backward starts from d u.
//!
//! Here it is composed from the single ops ([`tokens_fwd_by_ops`], [`tokens_bwd_by_ops`]): that
//! composition is the reference, and the [`Backend`] trait's default. The CUDA backend replaces
//! it with one fused kernel each way (`kernels/tokens.cu`) when the MLP has two layers and every
//! width is at most 64, and is tested against this composition on the CPU (`tests/cuda.rs`,
//! `tokens_fwd_bwd_parity`). The composition's own gradients are checked against finite
//! differences with the rest of the model (`tests/model_gradcheck.rs`, every parameter tensor).

use crate::backend::{Alloc, Backend};

/// Widths of the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenDims {
    /// Images; tokens = batch · h · w.
    pub batch: usize,
    pub h: usize,
    pub w: usize,
    /// Encoder channels (the width of e, x and a).
    pub c: usize,
    /// Feature width (every MLP layer's output, u).
    pub feat: usize,
    /// Slot width (k, v).
    pub d: usize,
    /// Whether the chain computes k and v (else it ends at u, and k, v hold nothing).
    pub kv: bool,
}

impl TokenDims {
    pub fn rows(&self) -> usize {
        self.batch * self.h * self.w
    }
}

/// One dense layer's weight `[n_out][n_in]` and bias `[n_out]`, with its widths.
pub struct MlpLayer<'a, Buf> {
    pub n_in: usize,
    pub n_out: usize,
    pub w: &'a Buf,
    pub b: &'a Buf,
}

/// The chain's parameters.
pub struct TokenParams<'a, Buf> {
    /// Position embedding `[c][4]`, `[c]`.
    pub pos_w: &'a Buf,
    pub pos_b: &'a Buf,
    pub norm_g: &'a Buf,
    pub norm_b: &'a Buf,
    /// ReLU after every layer but the last.
    pub mlp: Vec<MlpLayer<'a, Buf>>,
    pub norm_in_g: &'a Buf,
    pub norm_in_b: &'a Buf,
    /// `[d][feat]` each, no bias.
    pub wk: &'a Buf,
    pub wv: &'a Buf,
}

impl<'a, Buf> TokenParams<'a, Buf> {
    /// The tensors of a flat list in the order pos_w, pos_b, norm_g, norm_b, (W, b) of each MLP
    /// layer (the first c → feat, the others feat → feat), norm_in_g, norm_in_b, wk, wv: the
    /// layout the kernel benches and parity tests build.
    pub fn from_flat(p: &'a [Buf], c: usize, feat: usize) -> Self {
        assert!(
            p.len() >= 8 && p.len() % 2 == 0,
            "{} token tensors",
            p.len()
        );
        let layers = (p.len() - 8) / 2;
        TokenParams {
            pos_w: &p[0],
            pos_b: &p[1],
            norm_g: &p[2],
            norm_b: &p[3],
            mlp: (0..layers)
                .map(|i| MlpLayer {
                    n_in: if i == 0 { c } else { feat },
                    n_out: feat,
                    w: &p[4 + 2 * i],
                    b: &p[5 + 2 * i],
                })
                .collect(),
            norm_in_g: &p[4 + 2 * layers],
            norm_in_b: &p[5 + 2 * layers],
            wk: &p[6 + 2 * layers],
            wv: &p[7 + 2 * layers],
        }
    }
}

/// Their gradients (accumulated into, like every backward).
pub struct TokenGrads<'a, Buf> {
    pub pos_w: &'a mut Buf,
    pub pos_b: &'a mut Buf,
    pub norm_g: &'a mut Buf,
    pub norm_b: &'a mut Buf,
    /// (dW, db) per MLP layer.
    pub mlp: Vec<(&'a mut Buf, &'a mut Buf)>,
    pub norm_in_g: &'a mut Buf,
    pub norm_in_b: &'a mut Buf,
    pub wk: &'a mut Buf,
    pub wv: &'a mut Buf,
}

impl<'a, Buf> TokenGrads<'a, Buf> {
    /// The gradients of a flat list in the order of [`TokenParams::from_flat`].
    pub fn from_flat(g: &'a mut [Buf]) -> Self {
        assert!(
            g.len() >= 8 && g.len() % 2 == 0,
            "{} token tensors",
            g.len()
        );
        let layers = (g.len() - 8) / 2;
        let (head, rest) = g.split_at_mut(4);
        let (mlp, tail) = rest.split_at_mut(2 * layers);
        let [pos_w, pos_b, norm_g, norm_b] = head else {
            unreachable!("split at 4")
        };
        let [norm_in_g, norm_in_b, wk, wv] = tail else {
            unreachable!("checked above")
        };
        TokenGrads {
            pos_w,
            pos_b,
            norm_g,
            norm_b,
            mlp: mlp
                .chunks_exact_mut(2)
                .map(|wb| {
                    let [w, b] = wb else {
                        unreachable!("chunks of 2")
                    };
                    (w, b)
                })
                .collect(),
            norm_in_g,
            norm_in_b,
            wk,
            wv,
        }
    }
}

/// What the forward writes (all overwritten) and the backward reads.
pub struct TokenActs<Buf> {
    /// x `[rows, c]`.
    pub enc_pos: Buf,
    /// a = LN0(x) `[rows, c]`, with its per-row mean and 1/σ.
    pub ln0: Buf,
    pub ln0_mean: Buf,
    pub ln0_rstd: Buf,
    /// Each MLP layer's output `[rows, feat]` (the last one is f).
    pub mlp_act: Vec<Buf>,
    /// u = LN_in(f) `[rows, feat]`, with its per-row mean and 1/σ.
    pub ln_in: Buf,
    pub ln_in_mean: Buf,
    pub ln_in_rstd: Buf,
    /// `[rows, d]` each; empty when the chain ends at u (`TokenDims::kv` false).
    pub k: Buf,
    pub v: Buf,
}

impl<Buf> TokenActs<Buf> {
    pub fn new<A: Alloc<Buf = Buf> + ?Sized>(be: &A, dims: &TokenDims, mlp_layers: usize) -> Self {
        let (rows, c, feat, d) = (dims.rows(), dims.c, dims.feat, dims.d);
        TokenActs {
            enc_pos: be.buffer(rows * c),
            ln0: be.buffer(rows * c),
            ln0_mean: be.buffer(rows),
            ln0_rstd: be.buffer(rows),
            mlp_act: (0..mlp_layers).map(|_| be.buffer(rows * feat)).collect(),
            ln_in: be.buffer(rows * feat),
            ln_in_mean: be.buffer(rows),
            ln_in_rstd: be.buffer(rows),
            k: be.buffer(if dims.kv { rows * d } else { 0 }),
            v: be.buffer(if dims.kv { rows * d } else { 0 }),
        }
    }

    /// f, the input of LN_in (a when the MLP has no layers).
    pub fn feats(&self) -> &Buf {
        self.mlp_act.last().unwrap_or(&self.ln0)
    }
}

/// The backward's per-token gradients. `d_enc_pos` = d e (= d x: the position embedding passes
/// the gradient through) is what the encoder's convolutions continue from; the others are
/// scratch of the chain whose contents depend on the implementation.
pub struct TokenGradActs<Buf> {
    pub d_enc_pos: Buf,
    pub d_ln0: Buf,
    pub d_mlp_act: Vec<Buf>,
    pub d_ln_in: Buf,
}

impl<Buf> TokenGradActs<Buf> {
    /// Zero-length buffers when `training` is false (an evaluation workspace).
    pub fn new<A: Alloc<Buf = Buf> + ?Sized>(
        be: &A,
        dims: &TokenDims,
        mlp_layers: usize,
        training: bool,
    ) -> Self {
        let (rows, c, feat) = (dims.rows(), dims.c, dims.feat);
        let galloc = |n: usize| be.buffer(if training { n } else { 0 });
        TokenGradActs {
            d_enc_pos: galloc(rows * c),
            d_ln0: galloc(rows * c),
            d_mlp_act: (0..mlp_layers).map(|_| galloc(rows * feat)).collect(),
            d_ln_in: galloc(rows * feat),
        }
    }
}

/// The forward from the single ops.
pub fn tokens_fwd_by_ops<B: Backend + ?Sized>(
    be: &B,
    dims: &TokenDims,
    p: &TokenParams<'_, B::Buf>,
    enc_out: &B::Buf,
    acts: &mut TokenActs<B::Buf>,
) {
    let (rows, c) = (dims.rows(), dims.c);
    be.copy(enc_out, &mut acts.enc_pos);
    be.softpos_add_fwd(dims.h, dims.w, c, p.pos_w, p.pos_b, &mut acts.enc_pos);
    be.layernorm_fwd(
        rows,
        c,
        &acts.enc_pos,
        p.norm_g,
        p.norm_b,
        &mut acts.ln0,
        &mut acts.ln0_mean,
        &mut acts.ln0_rstd,
    );
    let nl = p.mlp.len();
    for (i, l) in p.mlp.iter().enumerate() {
        let (done, rest) = acts.mlp_act.split_at_mut(i);
        let x = if i == 0 { &acts.ln0 } else { &done[i - 1] };
        be.linear_fwd(
            rows,
            l.n_in,
            l.n_out,
            x,
            l.w,
            Some(l.b),
            i + 1 < nl,
            &mut rest[0],
        );
    }
    let feats = acts.mlp_act.last().unwrap_or(&acts.ln0);
    be.layernorm_fwd(
        rows,
        dims.feat,
        feats,
        p.norm_in_g,
        p.norm_in_b,
        &mut acts.ln_in,
        &mut acts.ln_in_mean,
        &mut acts.ln_in_rstd,
    );
    if dims.kv {
        for (w, out) in [(p.wk, &mut acts.k), (p.wv, &mut acts.v)] {
            be.linear_fwd(rows, dims.feat, dims.d, &acts.ln_in, w, None, false, out);
        }
    }
}

/// Where the chain's backward starts: the gradients of its outputs.
pub enum TokenOutGrads<'a, Buf> {
    /// d k and d v, `[rows, d]` each (`TokenDims::kv` true); Wk's and Wv's gradients accumulate.
    Kv { dk: &'a Buf, dv: &'a Buf },
    /// d u, `[rows, feat]` (the chain ends at u); Wk's and Wv's gradients are left alone.
    U(&'a Buf),
}

/// The backward from the single ops: `d.d_enc_pos` is overwritten with d e; the parameter
/// gradients accumulate.
#[allow(clippy::too_many_arguments)]
pub fn tokens_bwd_by_ops<B: Backend + ?Sized>(
    be: &B,
    dims: &TokenDims,
    p: &TokenParams<'_, B::Buf>,
    acts: &TokenActs<B::Buf>,
    up: TokenOutGrads<'_, B::Buf>,
    d: &mut TokenGradActs<B::Buf>,
    g: &mut TokenGrads<'_, B::Buf>,
) {
    let (rows, c, feat) = (dims.rows(), dims.c, dims.feat);
    match up {
        TokenOutGrads::Kv { dk, dv } => {
            assert!(dims.kv, "d k and d v given to a chain that ends at u");
            be.fill_zero(&mut d.d_ln_in);
            for (w, y, dy, gw) in [
                (p.wk, &acts.k, dk, &mut *g.wk),
                (p.wv, &acts.v, dv, &mut *g.wv),
            ] {
                let dx = Some(&mut d.d_ln_in);
                be.linear_bwd(
                    rows,
                    feat,
                    dims.d,
                    &acts.ln_in,
                    w,
                    y,
                    false,
                    dy,
                    dx,
                    gw,
                    None,
                );
            }
        }
        TokenOutGrads::U(du) => {
            assert!(!dims.kv, "d u given to a chain that ends with k and v");
            be.copy(du, &mut d.d_ln_in);
        }
    }
    for buf in d.d_mlp_act.iter_mut() {
        be.fill_zero(buf);
    }
    be.fill_zero(&mut d.d_ln0);
    {
        let dfeats = match d.d_mlp_act.last_mut() {
            Some(x) => x,
            None => &mut d.d_ln0,
        };
        be.layernorm_bwd(
            rows,
            feat,
            acts.feats(),
            p.norm_in_g,
            &acts.ln_in_mean,
            &acts.ln_in_rstd,
            &d.d_ln_in,
            dfeats,
            g.norm_in_g,
            g.norm_in_b,
        );
    }
    let nl = p.mlp.len();
    for i in (0..nl).rev() {
        let l = &p.mlp[i];
        let (lower, upper) = d.d_mlp_act.split_at_mut(i);
        let x = if i == 0 {
            &acts.ln0
        } else {
            &acts.mlp_act[i - 1]
        };
        let dx = if i == 0 {
            &mut d.d_ln0
        } else {
            &mut lower[i - 1]
        };
        let (gw, gb) = &mut g.mlp[i];
        be.linear_bwd(
            rows,
            l.n_in,
            l.n_out,
            x,
            l.w,
            &acts.mlp_act[i],
            i + 1 < nl,
            &upper[0],
            Some(dx),
            gw,
            Some(gb),
        );
    }
    be.fill_zero(&mut d.d_enc_pos);
    be.layernorm_bwd(
        rows,
        c,
        &acts.enc_pos,
        p.norm_g,
        &acts.ln0_mean,
        &acts.ln0_rstd,
        &d.d_ln0,
        &mut d.d_enc_pos,
        g.norm_g,
        g.norm_b,
    );
    be.softpos_add_bwd(dims.h, dims.w, c, &d.d_enc_pos, g.pos_w, g.pos_b);
}
