//! Launchers of the fused per-token chain (`kernels/tokens.cu`; the math and the reference
//! composition are in [`crate::ops::tokens`]).

use super::{i, rs_grid, Arg, Buf, Cuda};
use crate::backend::Backend;
use crate::config::Precision;
use crate::ops::layernorm::LN_EPS;
use crate::ops::tokens::{TokenActs, TokenDims, TokenGradActs, TokenGrads, TokenParams};
use cudarc::driver::{DeviceRepr, LaunchConfig};

/// `struct TokenDims` of tokens.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct TokenDimsC {
    rows: i32,
    h: i32,
    w: i32,
    c: i32,
    feat: i32,
    d: i32,
}
unsafe impl DeviceRepr for TokenDimsC {}

/// Tokens per tile, threads per block and the widest width of tokens.cu (TK_ROWS, TK_THREADS,
/// TK_MAXD).
const TK_ROWS: usize = 32;
const TK_THREADS: u32 = 128;
const TK_MAXD: usize = 64;
/// Blocks of the backward: at most TK_BWD_BLOCKS, each with at least TK_BWD_MIN_TILES tiles.
/// 792 = one wave of an H100 or H200 (132 SMs) at the six blocks per SM that the kernel's 80
/// registers allow: with 1024, Nsight Compute counted 1.29 waves (clevr6, `9d1ac3f`), so the
/// second wave's 232 blocks ran as long as the first's 792, each block walking the same number
/// of tiles. Derived from the sizes only, not from the device, so that which tiles a block sums,
/// and so the result bit for bit, is the same on every GPU.
const TK_BWD_BLOCKS: usize = 792;
const TK_BWD_MIN_TILES: usize = 2;

impl TokenDimsC {
    fn new(dims: &TokenDims) -> Self {
        let widest = dims.c.max(dims.feat).max(dims.d);
        i(dims.rows() * widest);
        TokenDimsC {
            rows: i(dims.rows()),
            h: i(dims.h),
            w: i(dims.w),
            c: i(dims.c),
            feat: i(dims.feat),
            d: i(dims.d),
        }
    }
}

fn blocks(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Cuda {
    /// Whether the fused kernels cover this chain: a two-layer MLP (c → feat → feat) and every
    /// width at most 64. Otherwise the single ops run (wider models, other MLP depths).
    pub(super) fn tokens_fusable(dims: &TokenDims, p: &TokenParams<'_, Buf>) -> bool {
        let widths_fit = [dims.c, dims.feat, dims.d]
            .iter()
            .all(|&n| (1..=TK_MAXD).contains(&n));
        widths_fit
            && p.mlp.len() == 2
            && (p.mlp[0].n_in, p.mlp[0].n_out) == (dims.c, dims.feat)
            && (p.mlp[1].n_in, p.mlp[1].n_out) == (dims.feat, dims.feat)
    }

    /// Whether the fused chain's tile products run on the tensor cores (version 2,
    /// `tokens_*_tf32`): under `precision: tf32`, with every width a multiple of 8 (the mma's k
    /// and n steps). Otherwise version 1, exact f32 FMA.
    fn tokens_on_tensor_cores(&self, dims: &TokenDims) -> bool {
        self.precision == Precision::Tf32 && [dims.c, dims.feat, dims.d].iter().all(|&n| n % 8 == 0)
    }

    pub(super) fn tokens_fwd_fused(
        &self,
        dims: &TokenDims,
        p: &TokenParams<'_, Buf>,
        enc_out: &Buf,
        a: &mut TokenActs<Buf>,
    ) {
        let rows = dims.rows();
        assert_eq!(enc_out.len(), rows * dims.c);
        if rows == 0 {
            return;
        }
        let dc = TokenDimsC::new(dims);
        let eps = LN_EPS as f32;
        let [h, f] = &mut a.mlp_act[..] else {
            unreachable!("tokens_fusable checked two MLP layers")
        };
        let cfg = blocks(rows.div_ceil(TK_ROWS), TK_THREADS);
        let name = if self.tokens_on_tensor_cores(dims) {
            "tokens_fwd_tf32"
        } else {
            "tokens_fwd_f32"
        };
        launch!(self, name, cfg;
            &dc, enc_out, p.pos_w, p.pos_b, p.norm_g, p.norm_b, p.mlp[0].w, p.mlp[0].b,
            p.mlp[1].w, p.mlp[1].b, p.norm_in_g, p.norm_in_b, p.wk, p.wv, &eps,
            &mut a.enc_pos, &mut a.ln0, &mut a.ln0_mean, &mut a.ln0_rstd, h, f,
            &mut a.ln_in, &mut a.ln_in_mean, &mut a.ln_in_rstd, &mut a.k, &mut a.v);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn tokens_bwd_fused(
        &self,
        dims: &TokenDims,
        p: &TokenParams<'_, Buf>,
        a: &TokenActs<Buf>,
        dk: &Buf,
        dv: &Buf,
        d: &mut TokenGradActs<Buf>,
        g: &mut TokenGrads<'_, Buf>,
    ) {
        let (rows, c, feat) = (dims.rows(), dims.c, dims.feat);
        assert_eq!(dk.len(), rows * dims.d);
        assert_eq!(dv.len(), rows * dims.d);
        if rows == 0 {
            return;
        }
        let dc = TokenDimsC::new(dims);
        let [dh, df] = &mut d.d_mlp_act[..] else {
            unreachable!("tokens_fusable checked two MLP layers")
        };
        let nblk = TK_BWD_BLOCKS.min(rows.div_ceil(TK_ROWS).div_ceil(TK_BWD_MIN_TILES));
        let plen = 4 * feat + 7 * c;
        let mut partial = self.scratch::<f32>(nblk * plen);
        let name = if self.tokens_on_tensor_cores(dims) {
            "tokens_bwd_tf32"
        } else {
            "tokens_bwd_f32"
        };
        launch!(self, name, blocks(nblk, TK_THREADS);
            &dc, dk, dv, p.wk, p.wv, &a.mlp_act[1], &a.ln_in_mean, &a.ln_in_rstd, p.norm_in_g,
            p.mlp[1].w, &a.mlp_act[0], p.mlp[0].w, &a.enc_pos, &a.ln0_mean, &a.ln0_rstd,
            p.norm_g, df, dh, &mut d.d_enc_pos, &mut partial);
        let (nb, ci, fi) = (i(nblk), i(c), i(feat));
        let [(gw1, gb1), (gw2, gb2)] = &mut g.mlp[..] else {
            unreachable!("tokens_fusable checked two MLP layers")
        };
        launch!(self, "tokens_bwd_reduce_f32", rs_grid(plen);
            &nb, &ci, &fi, &partial, g.norm_in_g, g.norm_in_b, gb2, gb1, g.norm_g, g.norm_b,
            g.pos_w, g.pos_b);
        // The four weight gradients: GEMMs over every token, by the linear layers' kernels
        // (tensor cores under TF32). dh is already masked by the ReLU.
        let d_ = dims.d;
        self.linear_bwd(
            rows, feat, d_, &a.ln_in, p.wk, &a.k, false, dk, None, g.wk, None,
        );
        self.linear_bwd(
            rows, feat, d_, &a.ln_in, p.wv, &a.v, false, dv, None, g.wv, None,
        );
        let (w2, h, f) = (p.mlp[1].w, &a.mlp_act[0], &a.mlp_act[1]);
        self.linear_bwd(rows, feat, feat, h, w2, f, false, df, None, gw2, None);
        let (w1, ln0) = (p.mlp[0].w, &a.ln0);
        self.linear_bwd(rows, c, feat, ln0, w1, h, false, dh, None, gw1, None);
    }
}
