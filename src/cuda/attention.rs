//! Launchers of the slot-attention kernels (attention.cu): version 2 splits each image's tokens
//! over blocks and reduces the partial sums in chunk order (versions 3 and 4 within it: the slot
//! count compiled in; and, for k and v one tensor, the rows staged in shared memory); version 1,
//! one block per image and head, takes the shapes version 2 does not (and runs when its fast
//! path is off).

use super::{i, per_block, rs_grid, Arg, Buf, Cuda};
use crate::ops::attention::AttnDims;
use cudarc::driver::{DeviceRepr, LaunchConfig};

/// `AttnDims` as the kernels see it (struct AttnDims in attention.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct AttnDimsC {
    batch: i32,
    n: i32,
    k: i32,
    d: i32,
    heads: i32,
    scale: f32,
    eps: f32,
}
unsafe impl DeviceRepr for AttnDimsC {}

/// Tokens per block of the attention kernels, version 2 (ATT_T in attention.cu), and the most
/// slots they keep in registers (ATT_MAXK).
const ATT_T: usize = 256;
const ATT_MAXK: usize = 16;
/// Floats per token of attention_fwd_partial_f32's k-row stages (ATT_KLD in attention.cu).
const ATT_KLD: usize = 12;

/// attention_fwd_partial_f32's dynamic shared memory, in bytes: q, the weights of the block's
/// tokens, and each warp's stage of k rows.
fn attn_fwd_smem(dm: &AttnDims) -> usize {
    (dm.k * dm.head_dim() + ATT_T * dm.k + ATT_T * ATT_KLD) * 4
}

/// Version 3 of the attention kernels (`attention_*_v3k<KP>_f32`, within version 2): the slot
/// count compiled in as KP = 4 or 8 (k ≤ KP), for head widths 8, 16, 32 or 64 with d a
/// multiple of 4 (a thread takes a float4 of a token's values, dh / 4 threads a whole row, and
/// the staged rows go 8 floats at a time with no short slab). Returns KP, or None where version
/// 2 runs.
fn attn_v3_slots(dm: &AttnDims) -> Option<usize> {
    let ok = dm.k <= 8 && dm.d % 4 == 0 && matches!(dm.head_dim(), 8 | 16 | 32 | 64);
    ok.then_some(if dm.k <= 4 { 4 } else { 8 })
}

/// Version 3's kernels for KP slots and their dynamic shared memory in bytes (attention.cu has
/// the layouts): the forward (q, each warp's Σ a, the weights, the k-row stages), the
/// backward's first pass (dU, the v-row stages, each warp's two sums) and its second (dU, q,
/// 1 / S, c, the two per-token weights, the v-row stages). The column sums' partials reuse the
/// per-token weights and the stages, which hold at least (ATT_T / 32)·KP·dh floats.
struct AttnV3 {
    fwd: (&'static str, usize),
    bwd_stats: (&'static str, usize),
    bwd_main: (&'static str, usize),
}

fn attn_v3(dm: &AttnDims, kp: usize) -> AttnV3 {
    let dh = dm.head_dim();
    let warps = ATT_T / 32;
    let stages = ATT_T * ATT_KLD;
    debug_assert!(warps * kp * dh <= ATT_T * kp + stages);
    let (fwd, stats, main) = match kp {
        4 => (
            "attention_fwd_partial_v3k4_f32",
            "attention_bwd_stats_v3k4_f32",
            "attention_bwd_main_v3k4_f32",
        ),
        _ => (
            "attention_fwd_partial_v3k8_f32",
            "attention_bwd_stats_v3k8_f32",
            "attention_bwd_main_v3k8_f32",
        ),
    };
    AttnV3 {
        fwd: (fwd, (kp * dh + warps * kp + ATT_T * kp + stages) * 4),
        bwd_stats: (stats, (kp * dh + stages + warps * 2 * kp) * 4),
        bwd_main: (main, (2 * kp * dh + 2 * kp + 2 * ATT_T * kp + stages) * 4),
    }
}

/// Version 4 of the attention kernels (`attention_*_v4k<KP>_f32`, within version 2), for k and v
/// the same tensor and one head, d a multiple of 8 up to 64, k ≤ 8: each kernel copies its
/// block's rows of x to shared memory at a stride of d + 4 floats. The forward, the backward's
/// two passes, each with its dynamic shared memory in bytes (attention.cu has the layouts), or
/// None where version 3 (or 2) runs.
struct AttnV4 {
    fwd: (&'static str, usize),
    bwd_stats: (&'static str, usize),
    bwd_main: (&'static str, usize),
}

fn attn_v4(dm: &AttnDims) -> Option<AttnV4> {
    let ok = dm.heads == 1 && dm.k <= 8 && dm.d % 8 == 0 && dm.d <= 64;
    ok.then(|| {
        let (kp, fwd, stats, main) = match dm.k {
            0..=4 => (
                4,
                "attention_fwd_partial_v4k4_f32",
                "attention_bwd_stats_v4k4_f32",
                "attention_bwd_main_v4k4_f32",
            ),
            _ => (
                8,
                "attention_fwd_partial_v4k8_f32",
                "attention_bwd_stats_v4k8_f32",
                "attention_bwd_main_v4k8_f32",
            ),
        };
        let [f, st, m] = att4_shared_floats(kp, dm.d);
        AttnV4 {
            fwd: (fwd, f * 4),
            bwd_stats: (stats, st * 4),
            bwd_main: (main, m * 4),
        }
    })
}

/// Version 4's shared memory in floats (forward, backward pass 1, pass 2) for KP slots at width d.
const fn att4_shared_floats(kp: usize, d: usize) -> [usize; 3] {
    let (warps, rows) = (ATT_T / 32, ATT_T * (d + 4));
    [
        kp * d + warps * kp + ATT_T * kp + rows,
        kp * d + warps * 2 * kp + rows,
        2 * kp * d + 2 * kp + 2 * ATT_T * kp + rows,
    ]
}

/// Version 4's largest dynamic shared memory (d = 64) per kernel, which the backend opts it in to
/// ([`super::conv::LARGE_SHARED`]).
pub(super) const ATT4_MAX_SHARED: [(&str, u32); 6] = {
    let (k4, k8) = (att4_shared_floats(4, 64), att4_shared_floats(8, 64));
    [
        ("attention_fwd_partial_v4k4_f32", 4 * k4[0] as u32),
        ("attention_fwd_partial_v4k8_f32", 4 * k8[0] as u32),
        ("attention_bwd_stats_v4k4_f32", 4 * k4[1] as u32),
        ("attention_bwd_stats_v4k8_f32", 4 * k8[1] as u32),
        ("attention_bwd_main_v4k4_f32", 4 * k4[2] as u32),
        ("attention_bwd_main_v4k8_f32", 4 * k8[2] as u32),
    ]
};

/// The number of token chunks when version 2 of the attention kernels applies (K ≤ ATT_MAXK and
/// the largest shared-memory needs, those of attention_bwd_main_f32 and the forward, within 48
/// KiB), else None (version 1: one block per batch and head).
fn attn_v2_chunks(dm: &AttnDims) -> Option<usize> {
    let smem = (2 * dm.k * dm.head_dim() + 2 * dm.k + 2 * ATT_T * dm.k) * 4;
    let fits = dm.k <= ATT_MAXK
        && smem.max(attn_fwd_smem(dm)) <= 48 * 1024
        && dm.batch * dm.heads <= 65_535;
    fits.then(|| dm.n.div_ceil(ATT_T).max(1))
}

fn attn_grid(dm: &AttnDims, chunks: usize, shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (chunks as u32, (dm.batch * dm.heads) as u32, 1),
        block_dim: (ATT_T as u32, 1, 1),
        shared_mem_bytes,
    }
}

fn attn_c(dm: &AttnDims) -> AttnDimsC {
    AttnDimsC {
        batch: i(dm.batch),
        n: i(dm.n),
        k: i(dm.k),
        d: i(dm.d),
        heads: i(dm.heads),
        scale: dm.scale as f32,
        eps: dm.eps as f32,
    }
}

impl Cuda {
    /// [`crate::backend::Backend::attention_fwd`].
    pub(super) fn attention_fwd_kernels(
        &self,
        dm: &AttnDims,
        k: &Buf,
        v: &Buf,
        q: &Buf,
        attn: &mut Buf,
        upd: &mut Buf,
    ) {
        assert_eq!(dm.d % dm.heads, 0);
        assert_eq!(k.len(), dm.batch * dm.n * dm.d);
        assert_eq!(v.len(), dm.batch * dm.n * dm.d);
        assert_eq!(q.len(), dm.batch * dm.k * dm.d);
        assert_eq!(attn.len(), dm.attn_len());
        assert_eq!(upd.len(), dm.batch * dm.k * dm.d);
        if dm.batch * dm.heads == 0 {
            return;
        }
        let dc = attn_c(dm);
        let dh = dm.head_dim();
        if let Some(chunks) = attn_v2_chunks(dm).filter(|_| self.fast.attention_v2) {
            // Version 2: the tokens split over blocks, partial sums reduced in chunk order.
            let mut partial = self.scratch::<f32>(dm.batch * dm.heads * chunks * dm.k * (dh + 1));
            // Version 4 where k and v are one buffer (u, under the model's fold), and the device
            // gave it its shared memory.
            let v4 = attn_v4(dm).filter(|v4| {
                std::ptr::eq(k, v) && self.fast.attention_v4 && self.may_launch(v4.fwd.0)
            });
            if let Some(AttnV4 {
                fwd: (name, smem), ..
            }) = v4
            {
                let cfg = attn_grid(dm, chunks, smem as u32);
                launch!(self, name, cfg; &dc, k, q, attn, &mut partial);
            } else {
                let (name, smem) = match attn_v3_slots(dm).filter(|_| self.fast.attention_v3) {
                    Some(kp) => attn_v3(dm, kp).fwd,
                    None => ("attention_fwd_partial_f32", attn_fwd_smem(dm)),
                };
                let cfg = attn_grid(dm, chunks, smem as u32);
                launch!(self, name, cfg; &dc, k, v, q, attn, &mut partial);
            }
            let ci = i(chunks);
            launch!(self, "attention_fwd_reduce_f32", rs_grid(dm.batch * dm.heads * dm.k * dh);
                &dc, &ci, &partial, upd);
            return;
        }
        let smem = ((dm.k * dh + dm.k) * 4) as u32;
        assert!(smem <= 48 * 1024, "attention: K·D/heads too large for v1");
        launch!(self, "attention_fwd_f32", per_block(dm.batch * dm.heads, smem);
            &dc, k, v, q, attn, upd);
    }

    /// [`crate::backend::Backend::attention_bwd`]; with `dv` None (k and v the same tensor,
    /// [`crate::backend::Backend::attention_bwd_same_kv`]) the kernels get dk as dv too: each
    /// adds v's gradient into a row and then k's, in that order, from the same thread (their dk
    /// and dv are not `__restrict__`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_bwd_kernels(
        &self,
        dm: &AttnDims,
        k: &Buf,
        v: &Buf,
        q: &Buf,
        attn: &Buf,
        dupd: &Buf,
        dk: &mut Buf,
        dv: Option<&mut Buf>,
        dq: &mut Buf,
    ) {
        assert_eq!(dm.d % dm.heads, 0);
        assert_eq!(attn.len(), dm.attn_len());
        assert_eq!(dupd.len(), dm.batch * dm.k * dm.d);
        assert_eq!(dk.len(), dm.batch * dm.n * dm.d);
        let same = dv.is_none();
        let dk: &Buf = dk;
        let dv: &Buf = dv.map_or(dk, |dv| &*dv);
        assert_eq!(dv.len(), dm.batch * dm.n * dm.d);
        assert_eq!(dq.len(), dm.batch * dm.k * dm.d);
        if dm.batch * dm.heads == 0 {
            return;
        }
        let dc = attn_c(dm);
        let dh = dm.head_dim();
        if let Some(chunks) = attn_v2_chunks(dm).filter(|_| self.fast.attention_v2) {
            let bh = dm.batch * dm.heads;
            let mut stats = self.scratch::<f32>(bh * chunks * dm.k * 2);
            // Version 4 where k and v are one tensor (and dk, dv one buffer), and the device gave
            // both passes their shared memory.
            let v4 = attn_v4(dm).filter(|v4| {
                let fits = self.may_launch(v4.bwd_stats.0) && self.may_launch(v4.bwd_main.0);
                same && std::ptr::eq(k, v) && self.fast.attention_v4 && fits
            });
            if let Some(v4) = v4 {
                let ((stats_name, smem1), (main_name, smem2)) = (v4.bwd_stats, v4.bwd_main);
                launch!(self, stats_name, attn_grid(dm, chunks, smem1 as u32);
                    &dc, k, attn, dupd, &mut stats);
                let mut dq_partial = self.scratch::<f32>(bh * chunks * dm.k * dh);
                launch!(self, main_name, attn_grid(dm, chunks, smem2 as u32);
                    &dc, k, q, attn, dupd, &stats, dk, &mut dq_partial);
                let ci = i(chunks);
                launch!(self, "attention_bwd_dq_reduce_f32", rs_grid(bh * dm.k * dh);
                    &dc, &ci, &dq_partial, dq);
                return;
            }
            let ((stats_name, smem1), (main_name, smem2)) =
                match attn_v3_slots(dm).filter(|_| self.fast.attention_v3) {
                    Some(kp) => {
                        let v3 = attn_v3(dm, kp);
                        (v3.bwd_stats, v3.bwd_main)
                    }
                    None => (
                        (
                            "attention_bwd_stats_f32",
                            (dm.k * dh + 2 * ATT_T * dm.k) * 4,
                        ),
                        (
                            "attention_bwd_main_f32",
                            (2 * dm.k * dh + 2 * dm.k + 2 * ATT_T * dm.k) * 4,
                        ),
                    ),
                };
            launch!(self, stats_name, attn_grid(dm, chunks, smem1 as u32);
                &dc, v, attn, dupd, &mut stats);
            let mut dq_partial = self.scratch::<f32>(bh * chunks * dm.k * dh);
            launch!(self, main_name, attn_grid(dm, chunks, smem2 as u32);
                &dc, k, v, q, attn, dupd, &stats, dk, dv, &mut dq_partial);
            let ci = i(chunks);
            launch!(self, "attention_bwd_dq_reduce_f32", rs_grid(bh * dm.k * dh);
                &dc, &ci, &dq_partial, dq);
            return;
        }
        let mut scratch = self.scratch::<f32>(dm.attn_len());
        let smem = (2 * dm.k * 4) as u32;
        launch!(self, "attention_bwd_f32", per_block(dm.batch * dm.heads, smem);
            &dc, k, v, q, attn, dupd, &mut scratch, dk, dv, dq);
    }
}
