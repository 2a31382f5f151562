//! Launchers of the fused per-token chain (`kernels/tokens.cu`; the math and the reference
//! composition are in [`crate::ops::tokens`]).

use super::{i, rs_grid, Arg, Buf, Cuda};
use crate::backend::Backend;
use crate::config::Precision;
use crate::ops::layernorm::LN_EPS;
use crate::ops::tokens::{
    TokenActs, TokenDims, TokenGradActs, TokenGrads, TokenOutGrads, TokenParams,
};
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
    /// 1: the chain ends with k and v; 0: at u (the fold), and the backward starts from d u.
    kv: i32,
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

/// Version 3 (`tokens_{fwd,bwd}_v3*_tf32`): threads per block (TK3_THREADS) and tokens per
/// warp tile (TK3_ROWS).
const TK3_THREADS: u32 = 256;
const TK3_ROWS: usize = 16;

/// Bytes of dynamic shared memory of a version 3 forward whose widths are padded to `p`
/// (tokens.cu's `Tk3Smem`): four p × p weight matrices and 11 · p floats of vectors.
const fn tk3_shared_bytes(p: usize) -> u32 {
    ((4 * p * p + 11 * p) * 4) as u32
}
/// The most it takes (widths up to 64), which the backend opts in to
/// ([`super::conv::LARGE_SHARED`]).
pub(super) const TK3_MAX_SHARED: u32 = tk3_shared_bytes(TK_MAXD);
/// Bytes of dynamic shared memory of a version 3 backward (tokens_bwd_v3): four p × p weight
/// matrices, the two γ (2p floats), and per warp its column-sum scratch (8 rows of p + 8) and
/// its 11 running column sums (11p).
const fn tk3_bwd_shared_bytes(p: usize) -> u32 {
    ((4 * p * p + 2 * p + (TK3_THREADS as usize / 32) * (8 * (p + 8) + 11 * p)) * 4) as u32
}
pub(super) const TK3_BWD_MAX_SHARED: u32 = tk3_bwd_shared_bytes(TK_MAXD);
/// Blocks of the version 3 backward: at most TK3_BWD_BLOCKS (an H100's or H200's 132 SMs × the
/// 2 blocks per SM that its registers allow), each warp with at least TK3_BWD_MIN_TILES tiles.
/// From the sizes only, as TK_BWD_BLOCKS.
const TK3_BWD_BLOCKS: usize = 264;
const TK3_BWD_MIN_TILES: usize = 2;

/// The kernel of version 3 for these widths (`stem` + `_tf32` for widths up to 64,
/// `stem` + `w32_tf32` when every width is at most 32) and the width it pads them to.
fn tk3_kernel(dims: &TokenDims, wide: &'static str, narrow: &'static str) -> (&'static str, usize) {
    if dims.c.max(dims.feat).max(dims.d) <= 32 {
        (narrow, 32)
    } else {
        (wide, TK_MAXD)
    }
}

impl TokenDimsC {
    fn new(dims: &TokenDims) -> Self {
        let widest = dims.c.max(dims.feat).max(dims.d);
        // (Version 3 forms int row offsets for a last tile's rows past the end too.)
        i((dims.rows() + TK3_ROWS) * widest);
        TokenDimsC {
            rows: i(dims.rows()),
            h: i(dims.h),
            w: i(dims.w),
            c: i(dims.c),
            feat: i(dims.feat),
            d: i(dims.d),
            kv: i32::from(dims.kv),
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
        let tc = self.tokens_on_tensor_cores(dims);
        // Version 3 pads every width to 32 or 64.
        let (v3, padded) = tk3_kernel(dims, "tokens_fwd_v3_tf32", "tokens_fwd_v3w32_tf32");
        let (name, cfg) = if tc && self.fast.tokens_v3 && self.may_launch(v3) {
            // Persistent: at most the blocks the device holds at once, 8 warps of 16-token
            // tiles each (no reduction, so the grid may depend on the device).
            let bytes = tk3_shared_bytes(padded);
            let warp_tiles = rows.div_ceil(TK3_ROWS);
            let wanted = warp_tiles.div_ceil(TK3_THREADS as usize / 32);
            let n = wanted.min(self.resident_blocks(v3, TK3_THREADS, bytes));
            let mut cfg = blocks(n, TK3_THREADS);
            cfg.shared_mem_bytes = bytes;
            (v3, cfg)
        } else if tc {
            (
                "tokens_fwd_tf32",
                blocks(rows.div_ceil(TK_ROWS), TK_THREADS),
            )
        } else {
            ("tokens_fwd_f32", blocks(rows.div_ceil(TK_ROWS), TK_THREADS))
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
        up: TokenOutGrads<'_, Buf>,
        d: &mut TokenGradActs<Buf>,
        g: &mut TokenGrads<'_, Buf>,
    ) {
        let (rows, c, feat) = (dims.rows(), dims.c, dims.feat);
        // Under the fold the kernels read d u through their dk pointer (and dv not at all).
        let (dk, dv) = match up {
            TokenOutGrads::Kv { dk, dv } => {
                assert!(dims.kv, "d k and d v given to a chain that ends at u");
                assert_eq!(dk.len(), rows * dims.d);
                assert_eq!(dv.len(), rows * dims.d);
                (dk, dv)
            }
            TokenOutGrads::U(du) => {
                assert!(!dims.kv, "d u given to a chain that ends with k and v");
                assert_eq!(du.len(), rows * feat);
                (du, du)
            }
        };
        if rows == 0 {
            return;
        }
        let dc = TokenDimsC::new(dims);
        let [dh, df] = &mut d.d_mlp_act[..] else {
            unreachable!("tokens_fusable checked two MLP layers")
        };
        let tc = self.tokens_on_tensor_cores(dims);
        let (v3, padded) = tk3_kernel(dims, "tokens_bwd_v3_tf32", "tokens_bwd_v3w32_tf32");
        let (name, cfg) = if tc && self.fast.tokens_v3 && self.may_launch(v3) {
            let warps = TK3_THREADS as usize / 32;
            let per_block = warps * TK3_BWD_MIN_TILES;
            let n = TK3_BWD_BLOCKS.min(rows.div_ceil(TK3_ROWS).div_ceil(per_block));
            let mut cfg = blocks(n, TK3_THREADS);
            cfg.shared_mem_bytes = tk3_bwd_shared_bytes(padded);
            (v3, cfg)
        } else {
            let n = TK_BWD_BLOCKS.min(rows.div_ceil(TK_ROWS).div_ceil(TK_BWD_MIN_TILES));
            let name = if tc {
                "tokens_bwd_tf32"
            } else {
                "tokens_bwd_f32"
            };
            (name, blocks(n, TK_THREADS))
        };
        let nblk = cfg.grid_dim.0 as usize;
        let plen = 4 * feat + 7 * c;
        let mut partial = self.scratch::<f32>(nblk * plen);
        launch!(self, name, cfg;
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
        // The four weight gradients (two under the fold): GEMMs over every token, by the linear
        // layers' kernels (tensor cores under TF32). dh is already masked by the ReLU.
        let d_ = dims.d;
        if dims.kv {
            self.linear_bwd(
                rows, feat, d_, &a.ln_in, p.wk, &a.k, false, dk, None, g.wk, None,
            );
            self.linear_bwd(
                rows, feat, d_, &a.ln_in, p.wv, &a.v, false, dv, None, g.wv, None,
            );
        }
        let (w2, h, f) = (p.mlp[1].w, &a.mlp_act[0], &a.mlp_act[1]);
        self.linear_bwd(rows, feat, feat, h, w2, f, false, df, None, gw2, None);
        let (w1, ln0) = (p.mlp[0].w, &a.ln0);
        self.linear_bwd(rows, c, feat, ln0, w1, h, false, dh, None, gw1, None);
    }
}
