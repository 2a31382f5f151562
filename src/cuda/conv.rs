//! Launchers of the convolutions and transposed convolutions: the exact-f32 kernels (conv.cu,
//! version 1) and the implicit GEMMs on the tensor cores (conv_tc*.cu, versions 2 to 6), forward,
//! input gradient, weight and bias gradients. The linear layers reuse the tensor-core ones as
//! 1 × 1 convolutions.

use super::{i, per_elem, rs_grid, Arg, Buf, Cuda, Scratch, BLOCK};
use crate::backend::Backend;
use crate::config::Precision;
use crate::ops::conv::ConvGeom;
use cudarc::driver::{DeviceRepr, LaunchConfig};

/// `ConvGeom` as the kernels see it (struct ConvGeom in conv.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct ConvGeomC {
    h_in: i32,
    w_in: i32,
    c_in: i32,
    h_out: i32,
    w_out: i32,
    c_out: i32,
    k: i32,
    stride: i32,
    pad: i32,
}
unsafe impl DeviceRepr for ConvGeomC {}

impl ConvGeomC {
    fn new(g: &ConvGeom) -> Self {
        Self {
            h_in: i(g.h_in),
            w_in: i(g.w_in),
            c_in: i(g.c_in),
            h_out: i(g.h_out),
            w_out: i(g.w_out),
            c_out: i(g.c_out),
            k: i(g.k),
            stride: i(g.stride),
            pad: i(g.pad),
        }
    }
}

/// The activation-pass GEMM of the tensor-core convolutions (struct ConvGemm in conv_tc.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct ConvGemmC {
    batch: i32,
    hp: i32,
    wp: i32,
    hs: i32,
    ws: i32,
    cs: i32,
    n: i32,
    k: i32,
    stride: i32,
    pad: i32,
    w_nc: i32,
}
unsafe impl DeviceRepr for ConvGemmC {}

/// The weight-gradient GEMM of the tensor-core convolutions (struct ConvDwGemm in conv_tc.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct ConvDwGemmC {
    rows: i32,
    batch: i32,
    hp: i32,
    wp: i32,
    hs: i32,
    ws: i32,
    cs: i32,
    k: i32,
    stride: i32,
    pad: i32,
    chunk: i32,
}
unsafe impl DeviceRepr for ConvDwGemmC {}

/// Output tile side and threads per block of the tensor-core kernels (TC_BM = TC_BN, TC_THREADS).
const TC_TILE: usize = 64;
const TC_THREADS: u32 = 128;
/// The k-tile of the tensor-core passes (TC_BK in conv_tc.cuh).
const TC_BK: usize = 16;

/// Blocks the split weight-gradient GEMM aims for: two per SM of an H100 (132 SMs), the most
/// that are resident at once (registers allow two blocks of `conv_dw_partial_v3*` per SM).
const TC_DW_TARGET_BLOCKS: usize = 264;

/// The weight-gradient GEMM's split of its `npos` reduction positions into chunks (positions
/// per chunk, a multiple of the k-tile, and their number) for `tiles` output tiles: as many
/// chunks as keep `tiles × chunks` within one wave of TC_DW_TARGET_BLOCKS. Rounding the chunks up
/// instead gave 13 × 21 = 273 blocks for a 64-channel 5×5 layer: a second wave of 9 blocks that
/// took as long as the first (Nsight Compute, first GPU session). From the sizes only, not the
/// device, so that a step sums in the same order everywhere.
fn dw_chunks(tiles: usize, npos: usize) -> (usize, usize) {
    dw_chunks_of(tiles, npos.div_ceil(TC_BK), TC_BK, TC_DW_TARGET_BLOCKS)
}

/// [`dw_chunks`] over `ktiles` k-tiles of `width` reduction positions each (version 4's units
/// are 16 positions of one grid row, counted as width 1: its chunks count units), for a wave of
/// `target` blocks: the chunk's length in positions (a multiple of `width`), and the chunks. At
/// least 4 k-tiles per chunk.
fn dw_chunks_of(tiles: usize, ktiles: usize, width: usize, target: usize) -> (usize, usize) {
    let want = (target / tiles).clamp(1, ktiles.div_ceil(4).max(1));
    let per = ktiles.div_ceil(want);
    (per * width, ktiles.div_ceil(per))
}

/// Whether version 4 of the weight-gradient partials computes this GEMM: rows a multiple of
/// 32, gathered channels of 32, a 3×3 or 5×5 kernel, stride 1 or 2 (DW4 in conv_tc.cu).
fn dw4_applies(rows: usize, cs: usize, k: usize, stride: usize) -> bool {
    rows % 32 == 0 && cs % 32 == 0 && (k == 3 || k == 5) && (stride == 1 || stride == 2)
}

/// Version 4's rows per block: 64 where they divide the rows, else 32 (`v4r32`: 128 threads,
/// four blocks per SM where two of 64 rows fit).
fn dw4_row_tile(rows: usize) -> usize {
    if rows % 64 == 0 {
        64
    } else {
        32
    }
}

/// Version 4's unit, the positions of one grid row a block's k-tile covers, with `wide` (the
/// `dw_units` fast path): 40 for 32-row blocks at stride 1 over grid rows 33 to 40 wide (`u40`:
/// the small models' 35 × 35 in one unit per grid row, where units of 16 take three, 48
/// positions); 32 for 64-row blocks over rows a multiple of 32 wide (`u32`: half the barriers);
/// 16 otherwise.
fn dw4_unit(row_tile: usize, stride: usize, wp: usize, wide: bool) -> usize {
    match (wide, row_tile) {
        (true, 32) if stride == 1 && (33..=40).contains(&wp) => 40,
        (true, 64) if wp % 32 == 0 => 32,
        _ => 16,
    }
}

/// Blocks of version 4 that one SM holds at once (their `__launch_bounds__`): two of 64 rows;
/// four of 32 rows at stride 1 (units of 16 or 40), three at stride 2.
fn dw4_blocks_per_sm(row_tile: usize, stride: usize) -> usize {
    match (row_tile, stride) {
        (64, _) => 2,
        (_, 1) => 4,
        _ => 3,
    }
}

/// Whether version 5 of the weight-gradient partials computes what version 4 would with
/// `row_tile` rows and units of `unit` (the `dw_v5` fast path, `v5`): 64-row blocks with units
/// of 32, 5×5, stride 1 (`conv_dw_partial_v5k5s1_tf32`, 4 warps of 64 rows; at stride 2 it
/// measured slower than version 4).
fn dw5_applies(row_tile: usize, k: usize, stride: usize, unit: usize, v5: bool) -> bool {
    v5 && row_tile == 64 && k == 5 && stride == 1 && unit == 32
}

/// Threads of a version 5 block, and the blocks an SM holds (its `__launch_bounds__`); the
/// same for the wgmma form (`dw_wgmma`).
const DW5_THREADS: u32 = 128;
const DW5_BLOCKS_PER_SM: usize = 3;

/// The weight-gradient partials on wgmma (`dw_wgmma`, conv_wgmma.cu: sm_90a) where they apply
/// (what version 4 would run with 64-row blocks, units of 32 and a 5×5 kernel, at stride 1 or
/// 2; at stride 1 version 5's passes): the kernel for the convolution's form or the transposed
/// one's (`convt`), and its bytes of dynamic shared memory (three strip stages of 7·stride + 5
/// rows × 4 channel octets 144 bytes apart).
fn dwg_kernel(
    row_tile: usize,
    k: usize,
    stride: usize,
    unit: usize,
    convt: bool,
) -> Option<(&'static str, u32)> {
    if !(row_tile == 64 && k == 5 && unit == 32 && (stride == 1 || stride == 2)) {
        return None;
    }
    let name = match (stride, convt) {
        (1, false) => "conv_dw_partial_wg5s1_tf32",
        (1, true) => "conv_dw_partial_wg5s1t_tf32",
        (_, false) => "conv_dw_partial_wg5s2_tf32",
        (_, true) => "conv_dw_partial_wg5s2t_tf32",
    };
    Some((name, (3 * (7 * stride + 5) * 4 * 144) as u32))
}

/// Version 4's kernel for `row_tile` rows per block, a k × k kernel and the stride.
fn dw4_kernel(row_tile: usize, k: usize, stride: usize, unit: usize) -> &'static str {
    match (row_tile, k, stride) {
        (32, 3, 1) if unit == 40 => "conv_dw_partial_v4r32k3s1u40_tf32",
        (32, _, 1) if unit == 40 => "conv_dw_partial_v4r32k5s1u40_tf32",
        (64, 3, 1) if unit == 32 => "conv_dw_partial_v4k3s1u32_tf32",
        (64, 3, _) if unit == 32 => "conv_dw_partial_v4k3s2u32_tf32",
        (64, _, 1) if unit == 32 => "conv_dw_partial_v4k5s1u32_tf32",
        (64, _, _) if unit == 32 => "conv_dw_partial_v4k5s2u32_tf32",
        (64, 3, 1) => "conv_dw_partial_v4k3s1_tf32",
        (64, 3, _) => "conv_dw_partial_v4k3s2_tf32",
        (64, _, 1) => "conv_dw_partial_v4k5s1_tf32",
        (64, _, _) => "conv_dw_partial_v4k5s2_tf32",
        (_, 3, 1) => "conv_dw_partial_v4r32k3s1_tf32",
        (_, 3, _) => "conv_dw_partial_v4r32k3s2_tf32",
        (_, _, 1) => "conv_dw_partial_v4r32k5s1_tf32",
        _ => "conv_dw_partial_v4r32k5s2_tf32",
    }
}

/// Whether `conv_dw_partial_c4*` computes this weight-gradient GEMM: 64 or 32 rows, 1 to 4
/// gathered channels, a 3×3 or 5×5 kernel, stride 1 (the first encoder layer's, and the last
/// decoder layer's when it is a transposed convolution).
fn dwc4_applies(rows: usize, cs: usize, k: usize, stride: usize) -> bool {
    (rows == 64 || rows == 32) && (1..=4).contains(&cs) && (k == 3 || k == 5) && stride == 1
}

/// Whether `dw_c4` computes a convolution's weight gradient in the transposed form (rows c_in,
/// gathering its at most 4 outputs' g): where the direct form does not apply, and the mirrored
/// pad k − 1 − pad is one.
fn dwc4_mirror_applies(g: &ConvGeom) -> bool {
    !dwc4_applies(g.c_out, g.c_in, g.k, g.stride)
        && dwc4_applies(g.c_in, g.c_out, g.k, g.stride)
        && g.pad < g.k
}

/// The `dw_c4` kernel for `rows` (64 or 32) and a k × k kernel: its version on the tensor cores
/// (`dw_c4_tc`: 128 threads a block, dynamic shared memory [`dwc4tc_shared_bytes`]) when `tc`,
/// else the f32 FMAs (block [`dwc4_threads`]).
fn dwc4_kernel(k: usize, rows: usize, tc: bool) -> &'static str {
    match (tc, k, rows) {
        (false, 3, 64) => "conv_dw_partial_c4k3_f32",
        (false, _, 64) => "conv_dw_partial_c4k5_f32",
        (false, 3, _) => "conv_dw_partial_c4r32k3_f32",
        (false, ..) => "conv_dw_partial_c4r32k5_f32",
        (true, 3, 64) => "conv_dw_partial_c4tck3_tf32",
        (true, _, 64) => "conv_dw_partial_c4tck5_tf32",
        (true, 3, _) => "conv_dw_partial_c4tcr32k3_tf32",
        (true, ..) => "conv_dw_partial_c4tcr32k5_tf32",
    }
}

/// Threads of a `conv_dw_partial_c4*` block: a warp per 32 rows and tap row (conv_tc.cu).
fn dwc4_threads(rows: usize, k: usize) -> u32 {
    (32 * (rows / 32) * k) as u32
}

/// Threads of a `conv_dw_partial_c4tc*` block (DWC4TC_THREADS in conv_tc.cu).
const DWC4TC_THREADS: u32 = 128;

/// Bytes of dynamic shared memory of a `conv_dw_partial_c4tc*` launch (conv_tc.cu): two
/// buffers of 128 positions × (rows + 4) words of A (and as many of its mask when `masked`),
/// and two halos of 4 channel planes of 200 (k = 3) or 248 (k = 5) words.
const fn dwc4tc_shared_bytes(rows: usize, k: usize, masked: bool) -> u32 {
    let a = 2 * 128 * (rows + 4) * if masked { 2 } else { 1 };
    let plane = if k == 3 { 200 } else { 248 };
    (4 * (a + 2 * 4 * plane)) as u32
}

/// Whether `conv_dw_partial_k1tc_tf32` (`dw_k1`) computes this weight gradient: a 1×1
/// convolution's (not transposed: its B is x, never masked) at stride 1 without padding, 64
/// gathered channels, rows a multiple of 64 (the linear layers' under TF32, e.g. the token
/// chain's four).
fn dwk1_applies(g: &ConvGeom, rows: usize, cs: usize, as_convt: bool) -> bool {
    g.k == 1 && g.stride == 1 && g.pad == 0 && !as_convt && cs == 64 && rows % 64 == 0 && rows > 0
}

/// Bytes of dynamic shared memory of a `conv_dw_partial_k1tc_tf32` launch (conv_tc.cu): two
/// buffers of 64 positions × 68 words of A and of B, and of A's mask when `masked`.
const fn dwk1tc_shared_bytes(masked: bool) -> u32 {
    (4 * 2 * 64 * 68 * if masked { 3 } else { 2 }) as u32
}

/// Blocks `conv_dw_partial_k1tc_tf32` aims for, over all its row tiles: three per SM of an
/// H100 or H200 (68 KiB of shared memory each, unmasked), one wave.
const DWK1_TARGET_BLOCKS: usize = 396;

/// The `dw_k1` split of `tiles` tiles of 64 positions into chunks for `row_tiles` tiles of 64
/// rows: tiles per chunk (at least 2, so that the tests' small layers walk tiles too), and
/// chunks.
fn dwk1_chunks(tiles: usize, row_tiles: usize) -> (usize, usize) {
    tile_chunks(tiles, DWK1_TARGET_BLOCKS / row_tiles.max(1))
}

/// `tiles` split into chunks walked by one block each, for about `blocks` blocks: tiles per
/// chunk (at least 2, so that the tests' small layers walk tiles too), and chunks.
fn tile_chunks(tiles: usize, blocks: usize) -> (usize, usize) {
    let per = tiles.div_ceil(blocks.max(1)).max(2);
    (per, tiles.div_ceil(per))
}

/// Blocks `conv_dw_partial_c4*` aims for: four per SM of an H100, so that one block's loads
/// overlap another's sums (with k = 5 and 64 rows, 320 threads, fewer fit; the rest queue).
const DWC4_TARGET_BLOCKS: usize = 528;

/// The `dw_c4` split of `tiles` tiles of 8 × 16 positions into chunks: tiles per chunk (at
/// least 2, so that the small layers of the tests walk tiles too), and chunks (at most
/// DWC4_TARGET_BLOCKS). From the sizes only, as [`dw_chunks`].
fn dwc4_chunks(tiles: usize) -> (usize, usize) {
    tile_chunks(tiles, DWC4_TARGET_BLOCKS)
}

/// Whether version 4's sums of g (a transposed convolution's bias gradient) count every output
/// pixel of a row once: the strip ranges [own, own + unit·s) of a grid row's units (own =
/// min(pad, k − s), as in conv_dw_partial_v4) start at or before pixel 0 and reach its end.
/// (Rows are the covering taps' ky, `covering`.)
fn dw4_sums_cover(g: &ConvGeom, covering: Option<u32>, unit: usize) -> bool {
    let (k, s, pad) = (g.k as isize, g.stride as isize, g.pad as isize);
    let own = pad.min(k - s);
    let reach = (unit * g.w_in.div_ceil(unit)) as isize * s - pad + own;
    covering.is_some() && own >= 0 && reach >= g.w_out as isize
}

/// From the covering taps of a transposed convolution: the ky whose version 4 blocks sum g (a
/// bit mask) and the taps (ky, 0) the reduction then reads.
fn dw4_sum_rows(taps: u32, k: usize) -> (u32, u32) {
    let (mut kys, mut at) = (0u32, 0u32);
    for ky in 0..k {
        if (0..k).any(|kx| (taps >> (ky * k + kx)) & 1 == 1) {
            kys |= 1 << ky;
            at |= 1 << (ky * k);
        }
    }
    (kys, at)
}

/// The conv kernels compute flat indices over the whole batch in 32-bit ints: refuse sizes past
/// that range instead of letting them overflow.
pub(super) fn check_conv_range(g: &ConvGeom, batch: usize) {
    i(batch * g.in_len());
    i(batch * g.out_len());
}

/// The taps (bit ky·k + kx) whose direct gathers of a transposed convolution's output, over its
/// input grid, reach every output position exactly once: one tap per output phase q mod s in
/// each axis (tap ky reaches q = s·p − pad + ky for p in [0, n_in)). The column sums of those
/// taps in the dW GEMM add up to the bias gradient. None when a phase has no such tap, or the
/// taps do not fit a 32-bit mask.
fn convt_covering_taps(g: &ConvGeom) -> Option<u32> {
    if g.k * g.k > 32 {
        return None;
    }
    let (s, pad) = (g.stride as isize, g.pad as isize);
    // For each output phase with outputs: the tap that covers all of them.
    let axis = |n_in: usize, n_out: usize| -> Option<Vec<usize>> {
        let (n_in, n_out) = (n_in as isize, n_out as isize);
        (0..s.min(n_out))
            .map(|phase| {
                let last = phase + (n_out - 1 - phase) / s * s;
                (0..g.k).find(|&ky| {
                    let off = phase + pad - ky as isize;
                    off >= 0 && off % s == 0 && (last + pad - ky as isize) / s < n_in
                })
            })
            .collect()
    };
    let (ys, xs) = (axis(g.h_in, g.h_out)?, axis(g.w_in, g.w_out)?);
    Some(
        ys.iter()
            .flat_map(|&ky| xs.iter().map(move |&kx| 1u32 << (ky * g.k + kx)))
            .sum(),
    )
}

/// Threads per block of `conv_dw_partial_v3*_tf32` (DW3_THREADS in conv_tc.cu).
const DW3_THREADS: u32 = 256;

/// Threads per block of version 3 of the tensor-core activation passes (V3_THREADS in
/// conv_tc.cuh).
const V3_THREADS: u32 = 256;

/// Threads per block of version 6 (`conv_igemm_*_v6*`; V6_THREADS in conv_tc_v5.cuh).
const V6_THREADS: u32 = 128;

/// Bytes of dynamic shared memory of a version 3 activation pass with tiles of `bm × bn` and
/// k-tiles of `bk`: two stages of A (rows of bk + 4 words) and of B (bk + 8 words), as
/// V3Smem in conv_tc.cu lays them out.
const fn v3_shared_bytes(bm: usize, bn: usize, bk: usize) -> u32 {
    (4 * (2 * bm * (bk + 4) + 2 * bn * (bk + 8))) as u32
}

/// Bytes of dynamic shared memory of version 5 of an activation pass with `th × tw` output tiles,
/// at most `kh` taps per axis (k, or ⌈k/2⌉ for a phase of a stride-2 gather), `nt` output
/// channels per block and `cs` gathered channels: the halo, (th + kh − 1) × (tw + kh − 1) pixels
/// of cs + 4 words, and two weight stages of nt × (cs + 8) words (conv_igemm_v5 in conv_tc_v5.cuh).
const fn v5_shared_bytes(th: usize, tw: usize, kh: usize, nt: usize, cs: usize) -> u32 {
    (4 * ((th + kh - 1) * (tw + kh - 1) * (cs + 4) + 2 * nt * (cs + 8))) as u32
}

/// [`v5_shared_bytes`] of the 64-channel kernels, whose tiles are 8 × 16.
const fn v5_64_shared_bytes(kh: usize, nt: usize) -> u32 {
    v5_shared_bytes(8, 16, kh, nt, 64)
}

/// The output tile (rows, columns) of the 32-channel version 5 kernels on an `hp × wp` grid:
/// tw from 8 to 24 columns and th = ⌊128 / tw⌋ rows, the fewest tiles per image (8 × 16 on a
/// tie). A 35 × 35 grid takes 7 × 18: 10 tiles, where 8 × 16 needs 15.
fn v5_c32_tile(hp: usize, wp: usize) -> (usize, usize) {
    let tiles = |tw: usize| hp.div_ceil(128 / tw) * wp.div_ceil(tw);
    let mut best = 16;
    for tw in 8..=24 {
        if tiles(tw) < tiles(best) {
            best = tw;
        }
    }
    (128 / best, best)
}

/// The kernels that launch with more than 48 KiB of dynamic shared memory, and the most they
/// take: the version 3 activation passes with 32-wide k-tiles, and version 5. The backend
/// raises each one's limit to this once, when it loads them (on a GPU, `CU_FUNC_ATTRIBUTE_MAX_
/// DYNAMIC_SHARED_SIZE_BYTES`; the emulator's launch check allows it for these kernels only).
/// A kernel the device refuses this for is never launched: its fallback runs.
pub(super) const LARGE_SHARED: [(&str, u32); 36] = [
    (
        "conv_igemm_direct_v3_k32_tf32",
        v3_shared_bytes(128, 64, 32),
    ),
    (
        "conv_igemm_adjoint_v3_k32_tf32",
        v3_shared_bytes(128, 64, 32),
    ),
    ("conv_igemm_direct_v5k3_tf32", v5_64_shared_bytes(3, 64)),
    ("conv_igemm_adjoint_v5k3_tf32", v5_64_shared_bytes(3, 64)),
    ("conv_igemm_direct_v5k5_tf32", v5_64_shared_bytes(5, 64)),
    ("conv_igemm_adjoint_v5k5_tf32", v5_64_shared_bytes(5, 64)),
    ("conv_igemm_direct_v5n8k3_tf32", v5_64_shared_bytes(3, 8)),
    ("conv_igemm_adjoint_v5n8k3_tf32", v5_64_shared_bytes(3, 8)),
    ("conv_igemm_direct_v5n8k5_tf32", v5_64_shared_bytes(5, 8)),
    ("conv_igemm_adjoint_v5n8k5_tf32", v5_64_shared_bytes(5, 8)),
    ("conv_igemm_adjoint_v5s2k3_tf32", v5_64_shared_bytes(2, 64)),
    ("conv_igemm_adjoint_v5s2k5_tf32", v5_64_shared_bytes(3, 64)),
    ("conv_igemm_direct_v5s2k3_tf32", v5_64_shared_bytes(2, 64)),
    ("conv_igemm_direct_v5s2k5_tf32", v5_64_shared_bytes(3, 64)),
    ("conv_igemm_direct_v6k5_tf32", v5_64_shared_bytes(5, 64)),
    ("conv_igemm_adjoint_v6k5_tf32", v5_64_shared_bytes(5, 64)),
    ("conv_igemm_direct_wg5_tf32", WG_SHARED_BYTES),
    ("conv_igemm_adjoint_wg5_tf32", WG_SHARED_BYTES),
    ("conv_igemm_direct_n8sk3_tf32", n8s_shared_bytes(3)),
    ("conv_igemm_adjoint_n8sk3_tf32", n8s_shared_bytes(3)),
    ("conv_igemm_direct_n8sk5_tf32", n8s_shared_bytes(5)),
    ("conv_igemm_adjoint_n8sk5_tf32", n8s_shared_bytes(5)),
    ("wgmma_probe_tf32", super::WGMMA_PROBE_SHARED),
    // (The token chain's version 3: the four weight matrices at 64 wide.)
    ("tokens_fwd_v3_tf32", super::tokens::TK3_MAX_SHARED),
    super::attention::ATT4_MAX_SHARED[0],
    super::attention::ATT4_MAX_SHARED[1],
    super::attention::ATT4_MAX_SHARED[2],
    super::attention::ATT4_MAX_SHARED[3],
    super::attention::ATT4_MAX_SHARED[4],
    super::attention::ATT4_MAX_SHARED[5],
    ("tokens_bwd_v3_tf32", super::tokens::TK3_BWD_MAX_SHARED),
    // (`dw_c4_tc` and `dw_k1`: the most, with the mask of A.)
    ("conv_dw_partial_k1tc_tf32", dwk1tc_shared_bytes(true)),
    (
        "conv_dw_partial_c4tck3_tf32",
        dwc4tc_shared_bytes(64, 3, true),
    ),
    (
        "conv_dw_partial_c4tck5_tf32",
        dwc4tc_shared_bytes(64, 5, true),
    ),
    (
        "conv_dw_partial_c4tcr32k3_tf32",
        dwc4tc_shared_bytes(32, 3, true),
    ),
    (
        "conv_dw_partial_c4tcr32k5_tf32",
        dwc4tc_shared_bytes(32, 5, true),
    ),
];

/// Bytes of dynamic shared memory of a version 7 (`wgmma`) pass, conv_wgmma.cu's WgHalo: 16
/// planes of a halo of (16 + 4) × (8 + 4) pixels (stride 1) or (16 + 2) × (8 + 2) (stride 2, a
/// phase's), each padded to a number of pixels ≡ 1 mod 8, 4 words a pixel.
const fn wg_shared_bytes(stride: usize) -> u32 {
    let kh: usize = if stride == 1 { 5 } else { 3 };
    let pixels = (16 + kh - 1) * (8 + kh - 1);
    (16 * (pixels.div_ceil(8) * 8 + 1) * 4 * 4) as u32
}
const WG_SHARED_BYTES: u32 = wg_shared_bytes(1);

/// Version 7 of an activation pass (`conv_wgmma`, conv_wgmma.cu: sm_90a) where it applies: 64
/// gathered channels into 64 outputs, 5×5, stride 1 or 2 (as `v5s2`: the adjoint gather, a
/// transposed convolution's forward, an output phase per z; the direct one, its dx, the four
/// source phases in turn). Its kernel, grid and output tile (16 × 8 pixels per block, of the
/// output phase for the adjoint gather at stride 2; WG_THREADS 128).
fn wg_kernel(p: &ConvGemmC, adjoint: bool) -> Option<(&'static str, LaunchConfig, i32, i32)> {
    if !(p.cs == 64 && p.n == 64 && p.k == 5 && (p.stride == 1 || p.stride == 2)) {
        return None;
    }
    let (hp, wp, batch) = (p.hp as usize, p.wp as usize, p.batch as usize);
    let (s, z) = if p.stride == 2 && adjoint {
        (2, 4)
    } else {
        (1, 1)
    };
    let blocks = batch * hp.div_ceil(s).div_ceil(16) * wp.div_ceil(s).div_ceil(8);
    let name = match (adjoint, p.stride) {
        (true, 2) => "conv_igemm_adjoint_wg5s2_tf32",
        (false, 2) => "conv_igemm_direct_wg5s2_tf32",
        (true, _) => "conv_igemm_adjoint_wg5_tf32",
        (false, _) => "conv_igemm_direct_wg5_tf32",
    };
    let cfg = LaunchConfig {
        grid_dim: (i(blocks) as u32, 1, z),
        block_dim: (128, 1, 1),
        shared_mem_bytes: wg_shared_bytes(p.stride as usize),
    };
    Some((name, cfg, 16, 8))
}

/// Blocks `conv_igemm_*_n8s*` aims for: two per SM of an H100 or H200 (78 KiB of shared
/// memory each at k = 3), one wave.
const N8S_TARGET_BLOCKS: usize = 264;

/// Threads of a `conv_igemm_*_n8s*` block (N8S_THREADS in conv_tc_v5.cu).
const N8S_THREADS: u32 = 128;

/// Bytes of dynamic shared memory of a `conv_igemm_*_n8s*` launch (conv_tc_v5.cu): two halos
/// of (4 + k − 1) × (16 + k − 1) pixels × 68 words, and every tap's 8 weight rows of 72 words.
const fn n8s_shared_bytes(k: usize) -> u32 {
    (4 * (2 * (4 + k - 1) * (16 + k - 1) * 68 + k * k * 8 * 72)) as u32
}

/// The streamed version 5 for at most 8 outputs (`conv_n8s`) where it applies (64 gathered
/// channels, at most 8 outputs, stride 1, 3×3 or 5×5; the caller checks that the source is not
/// masked): the kernel, its launch and the tiles of 4 × 16 per block.
fn n8s_kernel(p: &ConvGemmC, adjoint: bool) -> Option<(&'static str, LaunchConfig, i32)> {
    if !(p.cs == 64 && (1..=8).contains(&p.n) && p.stride == 1 && (p.k == 3 || p.k == 5)) {
        return None;
    }
    let name = match (adjoint, p.k) {
        (false, 3) => "conv_igemm_direct_n8sk3_tf32",
        (true, 3) => "conv_igemm_adjoint_n8sk3_tf32",
        (false, _) => "conv_igemm_direct_n8sk5_tf32",
        (true, _) => "conv_igemm_adjoint_n8sk5_tf32",
    };
    let (hp, wp, batch) = (p.hp as usize, p.wp as usize, p.batch as usize);
    let (per, chunks) = tile_chunks(batch * hp.div_ceil(4) * wp.div_ceil(16), N8S_TARGET_BLOCKS);
    let cfg = LaunchConfig {
        grid_dim: (i(chunks) as u32, 1, 1),
        block_dim: (N8S_THREADS, 1, 1),
        shared_mem_bytes: n8s_shared_bytes(p.k as usize),
    };
    Some((name, cfg, i(per)))
}

/// Version 5 of an activation pass (a halo tile staged once; conv_tc_v5.cu), when it applies:
/// stride 1, a 3×3 or 5×5 kernel, and 64 gathered channels with more than 32 output channels
/// (64 per block) or at most 8 (`v5n8`: 8 per block; between the two, version 3's 32-wide tiles
/// waste less), or 32 gathered channels with at most 32 output channels (`v5c32`: 32 per block;
/// `v5c32n8`: 8). And stride 2 with 64 gathered channels and more than 32 outputs (`v5s2`): the
/// adjoint gather (a transposed convolution's forward) one output phase per z, the direct one
/// (its dx) over the four source phases in turn. Its
/// kernel, grid and output tile (rows, columns): one block per tile of an image (of a phase),
/// 8 × 16 pixels with 64 channels, [`v5_c32_tile`]'s with 32. With `v6`, the stride-1 5×5 passes
/// of 64 channels into more than 32 outputs and the passes of 32 channels into 9 to 32 take
/// version 6: the same tiles and shared memory, 4 warps of twice version 5's rows (`v6`: 64
/// pixels × 32 channels, `v6c32`: 32 × 32) instead of 8.
fn v5_kernel(
    p: &ConvGemmC,
    adjoint: bool,
    v6: bool,
) -> Option<(&'static str, LaunchConfig, i32, i32)> {
    let nt = match (p.cs, p.n) {
        (32 | 64, 1..=8) => 8,
        (64, 33..) => 64,
        (32, 9..=32) => 32,
        _ => return None,
    };
    if !(p.k == 3 || p.k == 5) {
        return None;
    }
    if p.stride == 2 && nt == 64 {
        // The adjoint gather: tiles of an output phase, a phase per z; the direct one: tiles
        // of the output, the four source phases in turn.
        let (hp, wp, batch) = (p.hp as usize, p.wp as usize, p.batch as usize);
        let (s, z) = if adjoint { (2, 4) } else { (1, 1) };
        let blocks = batch * hp.div_ceil(s).div_ceil(8) * wp.div_ceil(s).div_ceil(16);
        let (name, kh) = match (adjoint, p.k) {
            (true, 3) => ("conv_igemm_adjoint_v5s2k3_tf32", 2),
            (true, _) => ("conv_igemm_adjoint_v5s2k5_tf32", 3),
            (false, 3) => ("conv_igemm_direct_v5s2k3_tf32", 2),
            (false, _) => ("conv_igemm_direct_v5s2k5_tf32", 3),
        };
        let cfg = LaunchConfig {
            grid_dim: (i(blocks) as u32, (p.n as u32).div_ceil(64), z),
            block_dim: (V3_THREADS, 1, 1),
            shared_mem_bytes: v5_64_shared_bytes(kh, 64),
        };
        return Some((name, cfg, 8, 16));
    }
    if p.stride != 1 {
        return None;
    }
    // Version 6: the 32-channel passes, and the 64-channel ones of 5×5 only (the 3×3 ones added
    // ~50 s to conv_tc_v6.cu's NVRTC compile). Not at stride 2, above: there it measured 9–22 %
    // slower than version 5 (clevr6, H200, 916cccd; benches/NOTES.md).
    let wide = v6 && (nt == 32 || (nt == 64 && p.k == 5));
    let (hp, wp, batch) = (p.hp as usize, p.wp as usize, p.batch as usize);
    let (cs, k) = (p.cs as usize, p.k as usize);
    let (th, tw) = if cs == 64 {
        (8, 16)
    } else {
        v5_c32_tile(hp, wp)
    };
    let name = match (adjoint, p.k, nt, cs) {
        (false, 5, 64, _) if wide => "conv_igemm_direct_v6k5_tf32",
        (true, 5, 64, _) if wide => "conv_igemm_adjoint_v6k5_tf32",
        (false, 3, 32, _) if wide => "conv_igemm_direct_v6c32k3_tf32",
        (true, 3, 32, _) if wide => "conv_igemm_adjoint_v6c32k3_tf32",
        (false, _, 32, _) if wide => "conv_igemm_direct_v6c32k5_tf32",
        (true, _, 32, _) if wide => "conv_igemm_adjoint_v6c32k5_tf32",
        (false, 3, 32, _) => "conv_igemm_direct_v5c32k3_tf32",
        (true, 3, 32, _) => "conv_igemm_adjoint_v5c32k3_tf32",
        (false, _, 32, _) => "conv_igemm_direct_v5c32k5_tf32",
        (true, _, 32, _) => "conv_igemm_adjoint_v5c32k5_tf32",
        (false, 3, 8, 32) => "conv_igemm_direct_v5c32n8k3_tf32",
        (true, 3, 8, 32) => "conv_igemm_adjoint_v5c32n8k3_tf32",
        (false, _, 8, 32) => "conv_igemm_direct_v5c32n8k5_tf32",
        (true, _, 8, 32) => "conv_igemm_adjoint_v5c32n8k5_tf32",
        (adjoint, k, nt, _) => v5_64_kernel(adjoint, k, nt),
    };
    let blocks = batch * hp.div_ceil(th) * wp.div_ceil(tw);
    Some((
        name,
        LaunchConfig {
            grid_dim: (i(blocks) as u32, (p.n as u32).div_ceil(nt as u32), 1),
            block_dim: (if wide { V6_THREADS } else { V3_THREADS }, 1, 1),
            shared_mem_bytes: v5_shared_bytes(th, tw, k, nt, cs),
        },
        i(th),
        i(tw),
    ))
}

/// The 64-channel version 5 kernel for a gather (`adjoint` or direct), a k × k kernel and `nt`
/// (64 or 8) output channels per block.
fn v5_64_kernel(adjoint: bool, k: i32, nt: usize) -> &'static str {
    match (adjoint, k, nt) {
        (false, 3, 64) => "conv_igemm_direct_v5k3_tf32",
        (true, 3, 64) => "conv_igemm_adjoint_v5k3_tf32",
        (false, _, 64) => "conv_igemm_direct_v5k5_tf32",
        (true, _, 64) => "conv_igemm_adjoint_v5k5_tf32",
        (false, 3, _) => "conv_igemm_direct_v5n8k3_tf32",
        (true, 3, _) => "conv_igemm_adjoint_v5n8k3_tf32",
        (false, _, _) => "conv_igemm_direct_v5n8k5_tf32",
        (true, _, _) => "conv_igemm_adjoint_v5n8k5_tf32",
    }
}

/// Blocks of `conv_igemm_*_c4*` per column tile: each stages every tap's weights once and then
/// walks its share of the output tiles, so the weights are read ~1000 times, not once per tile.
/// Below that, one block per two tiles: every block with more than one tile walks them (so the
/// small layers of the tests run the walk and its halo prefetch too).
const C4_MAX_BLOCKS: usize = 1024;

/// Version 5 for at most 4 gathered channels (`c4`; conv_tc.cu), when it applies: stride 1, 1 to
/// 4 gathered channels, a 3×3 or 5×5 kernel and more than 8 output channels (64 per block, or
/// 32 for at most 32). Its kernel and grid. It takes W as it is (version 2's arguments).
fn c4_kernel(p: &ConvGemmC, adjoint: bool) -> Option<(&'static str, LaunchConfig)> {
    let nt = match p.n {
        9..=32 => 32,
        33.. => 64,
        _ => return None,
    };
    if p.stride != 1 || !(1..=4).contains(&p.cs) || !(p.k == 3 || p.k == 5) {
        return None;
    }
    let name = match (adjoint, p.k, nt) {
        (false, 3, 64) => "conv_igemm_direct_c4k3_tf32",
        (true, 3, 64) => "conv_igemm_adjoint_c4k3_tf32",
        (false, _, 64) => "conv_igemm_direct_c4k5_tf32",
        (true, _, 64) => "conv_igemm_adjoint_c4k5_tf32",
        (false, 3, _) => "conv_igemm_direct_c4n32k3_tf32",
        (true, 3, _) => "conv_igemm_adjoint_c4n32k3_tf32",
        (false, _, _) => "conv_igemm_direct_c4n32k5_tf32",
        (true, _, _) => "conv_igemm_adjoint_c4n32k5_tf32",
    };
    let (hp, wp, batch) = (p.hp as usize, p.wp as usize, p.batch as usize);
    let tiles = batch * hp.div_ceil(8) * wp.div_ceil(16);
    Some((
        name,
        LaunchConfig {
            grid_dim: (
                i(tiles.div_ceil(2).min(C4_MAX_BLOCKS)) as u32,
                (p.n as u32).div_ceil(nt as u32),
                1,
            ),
            block_dim: (V3_THREADS, 1, 1),
            shared_mem_bytes: 0,
        },
    ))
}

/// The kernel, grid and k-tile width of version 3 of an activation pass: 128 × 64 tiles, or
/// 256 × 32 tiles (`*_v3n32_*`) when there are at most 32 output channels; k-tiles of 32
/// (`*_v3_k32_*`) on 128 × 64 tiles when the gathered channels are a multiple of 32 and `k32`
/// allows it, of 16 otherwise. An adjoint gather with stride s > 1 has one z per output phase
/// (oy mod s, ox mod s), each over at most ⌈hp/s⌉·⌈wp/s⌉ positions per image.
fn v3_kernel(p: &ConvGemmC, adjoint: bool, k32: bool) -> (&'static str, LaunchConfig, usize) {
    let (hp, wp, batch, n) = (p.hp as usize, p.wp as usize, p.batch as usize, p.n as usize);
    let s = if adjoint { p.stride as usize } else { 1 };
    let rows = batch * hp.div_ceil(s) * wp.div_ceil(s);
    let narrow = n <= 32;
    let bk = if k32 && !narrow && p.cs % 32 == 0 {
        32
    } else {
        TC_BK
    };
    let (bm, bn) = if narrow { (256, 32) } else { (128, 64) };
    let name = match (adjoint, narrow, bk == 32) {
        (false, false, false) => "conv_igemm_direct_v3_tf32",
        (true, false, false) => "conv_igemm_adjoint_v3_tf32",
        (false, false, true) => "conv_igemm_direct_v3_k32_tf32",
        (true, false, true) => "conv_igemm_adjoint_v3_k32_tf32",
        (false, true, _) => "conv_igemm_direct_v3n32_tf32",
        (true, true, _) => "conv_igemm_adjoint_v3n32_tf32",
    };
    let mut cfg = tile_grid(rows, bm, n, bn, s * s, V3_THREADS);
    cfg.shared_mem_bytes = v3_shared_bytes(bm, bn, bk);
    (name, cfg, bk)
}

/// A version 3 activation pass: its GEMM, and how its epilogue and loads treat the output
/// (the kernel's `masked`, `relu` and `accumulate` arguments).
struct V3Launch {
    p: ConvGemmC,
    adjoint: bool,
    /// Split the reduction when the grid is small ([`v3_splits`]).
    split_k: bool,
    masked: i32,
    relu: i32,
    mode: i32,
}

/// Split-K of a version 3 activation pass that asks for it (the one-image convolutions of the
/// split broadcast convolution): blocks for about one wave of an H100's 132 SMs, at least
/// SPLITK_MIN_TILES k-tiles per split, at most SPLITK_MAX splits. From the sizes only (not the
/// device), so that the launches of a step are the same everywhere. 1: no split (a phased
/// pass, whose z is the phase, or a grid that is already large).
fn v3_splits(p: &ConvGemmC, cfg: &LaunchConfig, bk: usize) -> usize {
    const SPLITK_TARGET_BLOCKS: usize = 132;
    const SPLITK_MIN_TILES: usize = 4;
    const SPLITK_MAX: usize = 16;
    if cfg.grid_dim.2 != 1 {
        return 1;
    }
    let blocks = (cfg.grid_dim.0 * cfg.grid_dim.1) as usize;
    let ktiles = (p.k * p.k * p.cs) as usize / bk;
    SPLITK_TARGET_BLOCKS
        .div_ceil(blocks)
        .min(ktiles / SPLITK_MIN_TILES)
        .clamp(1, SPLITK_MAX)
}

/// One block of `threads` per `row_tile × col_tile` tile of a `rows × cols` output, `z` deep.
fn tile_grid(
    rows: usize,
    row_tile: usize,
    cols: usize,
    col_tile: usize,
    z: usize,
    threads: u32,
) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            rows.div_ceil(row_tile) as u32,
            cols.div_ceil(col_tile) as u32,
            z as u32,
        ),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Version 2's tensor-core tiles over an `m × n` output, `z` deep.
fn tc_grid(m: usize, n: usize, z: usize) -> LaunchConfig {
    tile_grid(m, TC_TILE, n, TC_TILE, z, TC_THREADS)
}

impl Cuda {
    /// Forward of a convolution (`transposed`: of a transposed one): checks, then the
    /// tensor-core path under TF32 or the exact-f32 kernel.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn conv_fwd_common(
        &self,
        transposed: bool,
        g: &ConvGeom,
        batch: usize,
        x: &Buf,
        w: &Buf,
        b: &Buf,
        relu: bool,
        y: &mut Buf,
        split_k: bool,
    ) {
        assert_eq!(x.len(), batch * g.in_len());
        assert_eq!(y.len(), batch * g.out_len());
        assert_eq!(w.len(), g.weight_len());
        assert_eq!(b.len(), g.c_out);
        let n = batch * g.out_len();
        if n == 0 {
            return;
        }
        check_conv_range(g, batch);
        if self.precision == Precision::Tf32 {
            return self.conv_tc_fwd(transposed, g, batch, x, w, Some(b), relu, y, split_k);
        }
        let gc = ConvGeomC::new(g);
        let (bi, ri) = (i(batch), relu as i32);
        let name = if transposed {
            "conv_t2d_fwd_f32"
        } else {
            "conv2d_fwd_f32"
        };
        launch!(self, name, per_elem(n); &gc, &bi, x, w, b, &ri, y);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn conv_bwd_common(
        &self,
        transposed: bool,
        g: &ConvGeom,
        batch: usize,
        x: &Buf,
        w: &Buf,
        y: &Buf,
        relu: bool,
        dy: &Buf,
        dx: Option<&mut Buf>,
        dx_set: bool,
        dw: &mut Buf,
        db: &mut Buf,
        split_k: bool,
    ) {
        assert_eq!(x.len(), batch * g.in_len());
        assert_eq!(y.len(), batch * g.out_len());
        assert_eq!(dy.len(), batch * g.out_len());
        assert_eq!(w.len(), g.weight_len());
        assert_eq!(dw.len(), g.weight_len());
        assert_eq!(db.len(), g.c_out);
        if batch == 0 {
            return;
        }
        check_conv_range(g, batch);
        if self.precision == Precision::Tf32 {
            if let Some(dx) = dx {
                assert_eq!(dx.len(), batch * g.in_len());
                self.conv_tc_dx(transposed, g, batch, w, y, relu, dy, dx, dx_set, split_k);
            }
            self.conv_tc_dw(transposed, g, batch, x, y, relu, dy, dw, Some(db));
            return;
        }
        let gc = ConvGeomC::new(g);
        let bi = i(batch);
        let ri = relu as i32;
        if let Some(dx) = dx {
            assert_eq!(dx.len(), batch * g.in_len());
            let n = batch * g.in_len();
            // (The exact-f32 dx kernels only accumulate.)
            if dx_set {
                self.fill_zero(dx);
            }
            if transposed {
                launch!(self, "conv_t2d_bwd_dx_f32", per_elem(n); &gc, &bi, w, y, dy, &ri, dx);
            } else {
                launch!(self, "conv2d_bwd_dx_f32", per_elem(n); &gc, &bi, w, y, dy, &ri, dx);
            }
        }
        // One block per weight, its threads striding over the positions summed (the output grid,
        // or the input grid of a transposed conv): no more warps than those positions fill.
        let positions = batch
            * if transposed {
                g.h_in * g.w_in
            } else {
                g.h_out * g.w_out
            };
        let warps = positions.div_ceil(32).clamp(1, BLOCK as usize / 32);
        let cfg = LaunchConfig {
            grid_dim: (g.weight_len() as u32, 1, 1),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        if transposed {
            launch!(self, "conv_t2d_bwd_dw_f32", cfg; &gc, &bi, x, y, dy, &ri, dw);
        } else {
            launch!(self, "conv2d_bwd_dw_f32", cfg; &gc, &bi, x, y, dy, &ri, dw);
        }
        self.conv_db(g, batch, y, relu, dy, db);
    }

    /// db += Σ over positions of dy (ReLU-masked by y).
    fn conv_db(&self, g: &ConvGeom, batch: usize, y: &Buf, relu: bool, dy: &Buf, db: &mut Buf) {
        self.col_sums(batch * g.h_out * g.w_out, g.c_out, y, relu, dy, db);
    }

    /// Forward pass of a convolution (`transposed` false) or transposed convolution on the
    /// tensor cores: y = relu?(b + conv(x, W)).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn conv_tc_fwd(
        &self,
        transposed: bool,
        g: &ConvGeom,
        batch: usize,
        x: &Buf,
        w: &Buf,
        b: Option<&Buf>,
        relu: bool,
        y: &mut Buf,
        split_k: bool,
    ) {
        // conv: direct gather of x, W[co][ci]; convT: adjoint gather of x, W[ci][co].
        let p = ConvGemmC {
            batch: i(batch),
            hp: i(g.h_out),
            wp: i(g.w_out),
            hs: i(g.h_in),
            ws: i(g.w_in),
            cs: i(g.c_in),
            n: i(g.c_out),
            k: i(g.k),
            stride: i(g.stride),
            pad: i(g.pad),
            w_nc: !transposed as i32,
        };
        let cfg = tc_grid(batch * g.h_out * g.w_out, g.c_out, 1);
        // mode 0: y = relu?(acc + b); 2: y = relu?(acc) (no bias: the kernel never reads it).
        let (zero, ri, mode) = (0i32, relu as i32, if b.is_some() { 0i32 } else { 2 });
        let b = b.unwrap_or(w);
        if let Some(wt) = self.conv_tc_v3_weights(&p, w) {
            let v3 = V3Launch {
                p,
                adjoint: transposed,
                split_k,
                masked: 0,
                relu: ri,
                mode,
            };
            self.conv_v3(&v3, x, x, &wt, b, y);
        } else if let Some((name, cfg)) = self.conv_c4_kernel(&p, transposed) {
            launch!(self, name, cfg; &p, x, x, &zero, w, b, &ri, &mode, y);
        } else if transposed {
            launch!(self, "conv_igemm_adjoint_tf32", cfg; &p, x, x, &zero, w, b, &ri, &mode, y);
        } else {
            launch!(self, "conv_igemm_direct_tf32", cfg; &p, x, x, &zero, w, b, &ri, &mode, y);
        }
    }

    /// [`c4_kernel`] where the `conv_c4` fast path is on.
    fn conv_c4_kernel(&self, p: &ConvGemmC, adjoint: bool) -> Option<(&'static str, LaunchConfig)> {
        c4_kernel(p, adjoint).filter(|_| self.fast.conv_c4)
    }

    /// For version 3 of the tensor-core activation passes (a gathered source of `cs` channels,
    /// a multiple of 16): the weights as `[n][k·k·cs]` TF32 bit patterns (conv_w_nk_tf32), in a
    /// scratch buffer. None: version 2 applies.
    fn conv_tc_v3_weights(&self, p: &ConvGemmC, w: &Buf) -> Option<Scratch<'_, f32>> {
        if !self.fast.conv_v3 || p.cs % 16 != 0 {
            return None;
        }
        let total = p.n as usize * (p.k * p.k * p.cs) as usize;
        i(total);
        let mut wt = self.scratch::<f32>(total);
        launch!(self, "conv_w_nk_tf32", per_elem(total); &p.n, &p.cs, &p.k, &p.w_nc, w, &mut *wt);
        Some(wt)
    }

    /// One version 3 activation pass (`conv_igemm_*_v3*`), split over the reduction when
    /// `v3.split_k` asks for it and [`v3_splits`] finds it worth it: the blocks write partial
    /// products to a scratch buffer and `conv_splitk_reduce_f32` applies the epilogue.
    fn conv_v3(&self, v3: &V3Launch, src: &Buf, mask: &Buf, wt: &Buf, bias: &Buf, out: &mut Buf) {
        let (mut name, mut cfg, mut bk) = v3_kernel(&v3.p, v3.adjoint, self.fast.conv_k32);
        if !self.may_launch(name) {
            (name, cfg, bk) = v3_kernel(&v3.p, v3.adjoint, false);
        }
        let (p, masked, relu, mode) = (&v3.p, &v3.masked, &v3.relu, &v3.mode);
        let splits = if v3.split_k && self.fast.conv_splitk {
            v3_splits(p, &cfg, bk)
        } else {
            1
        };
        let si = i(splits);
        if splits == 1 && self.fast.conv_v5 && self.fast.conv_n8s && v3.masked == 0 {
            let n8s = n8s_kernel(p, v3.adjoint).filter(|(n, ..)| self.may_launch(n));
            if let Some((name, cfg, chunk)) = n8s {
                launch!(self, name, cfg; p, &chunk, src, wt, bias, relu, mode, out);
                return;
            }
        }
        if splits == 1 && self.fast.conv_v5 && self.fast.conv_wgmma && self.has_wgmma() {
            let wg = wg_kernel(p, v3.adjoint).filter(|(n, ..)| self.may_launch(n));
            if let Some((name, cfg, th, tw)) = wg {
                launch!(self, name, cfg; p, &th, &tw, src, mask, masked, wt, bias, relu, mode, out);
                return;
            }
        }
        if splits == 1 && self.fast.conv_v5 {
            let v5 =
                v5_kernel(p, v3.adjoint, self.fast.conv_v6).filter(|(n, ..)| self.may_launch(n));
            if let Some((name, cfg, th, tw)) = v5 {
                launch!(self, name, cfg; p, &th, &tw, src, mask, masked, wt, bias, relu, mode, out);
                return;
            }
        }
        if splits == 1 {
            launch!(self, name, cfg; p, src, mask, masked, wt, bias, relu, mode, &si, out);
            return;
        }
        let len = (p.batch * p.hp * p.wp) as usize * p.n as usize;
        let mut partial = self.scratch::<f32>(splits * len);
        cfg.grid_dim.2 = splits as u32;
        launch!(self, name, cfg; p, src, mask, masked, wt, bias, relu, mode, &si, &mut *partial);
        let (li, ni) = (i(len), p.n);
        launch!(self, "conv_splitk_reduce_f32", per_elem(len);
            &si, &li, &ni, &*partial, bias, relu, mode, out);
    }

    /// dx += (or, with `dx_set`, dx =) the input gradient of a convolution or transposed
    /// convolution, on the tensor cores.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn conv_tc_dx(
        &self,
        transposed: bool,
        g: &ConvGeom,
        batch: usize,
        w: &Buf,
        y: &Buf,
        relu: bool,
        dy: &Buf,
        dx: &mut Buf,
        dx_set: bool,
        split_k: bool,
    ) {
        // conv: adjoint gather of g, W[co][ci] (W[c][n]); convT: direct gather of g, W[ci][co]
        // (W[n][c]). The GEMM's rows are the input positions, its columns the input channels.
        let p = ConvGemmC {
            batch: i(batch),
            hp: i(g.h_in),
            wp: i(g.w_in),
            hs: i(g.h_out),
            ws: i(g.w_out),
            cs: i(g.c_out),
            n: i(g.c_in),
            k: i(g.k),
            stride: i(g.stride),
            pad: i(g.pad),
            w_nc: transposed as i32,
        };
        let cfg = tc_grid(batch * g.h_in * g.w_in, g.c_in, 1);
        // accumulate = 1: dx += the product; 2 with relu = 0: dx = the product. Neither reads
        // the bias: pass w.
        let (zero, ri) = (0i32, relu as i32);
        let mode = if dx_set { 2i32 } else { 1 };
        if let Some(wt) = self.conv_tc_v3_weights(&p, w) {
            let v3 = V3Launch {
                p,
                adjoint: !transposed,
                split_k,
                masked: ri,
                relu: 0,
                mode,
            };
            self.conv_v3(&v3, dy, y, &wt, w, dx);
        } else if let Some((name, cfg)) = self.conv_c4_kernel(&p, !transposed) {
            launch!(self, name, cfg; &p, dy, y, &ri, w, w, &zero, &mode, dx);
        } else if transposed {
            launch!(self, "conv_igemm_direct_tf32", cfg; &p, dy, y, &ri, w, w, &zero, &mode, dx);
        } else {
            launch!(self, "conv_igemm_adjoint_tf32", cfg; &p, dy, y, &ri, w, w, &zero, &mode, dx);
        }
    }

    /// dW += the weight gradient of a convolution or transposed convolution, on the tensor
    /// cores (or, for at most 4 gathered channels, `dw_c4`'s FMAs): the reduction over
    /// positions is split into chunks summed in a fixed order. db (when given) comes from the
    /// operand sums of the dW GEMM (see `dw3_operand_sums` in conv_tc.cu) where the geometry
    /// allows; otherwise from a column-sum pass over dy.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn conv_tc_dw(
        &self,
        transposed: bool,
        g: &ConvGeom,
        batch: usize,
        x: &Buf,
        y: &Buf,
        relu: bool,
        dy: &Buf,
        dw: &mut Buf,
        db: Option<&mut Buf>,
    ) {
        // conv: rows co, A = g over the output grid, B = direct gather of x.
        // convT: rows ci, A = x over the input grid, B = direct gather of g.
        // A conv with at most 4 outputs (the full decoder's last layer) in the convT form
        // (`mirrored`, for `dw_c4`): dW[co][ci][ky][kx] = Σ_q x[q][ci] · g[q + pad − (ky, kx)][co]
        // is a direct gather of g with pad k − 1 − pad at the mirrored tap k − 1 − (ky, kx); the
        // reduction writes each tap back mirrored, in the conv's [co][ci] order.
        let mirrored = !transposed && self.fast.dw_c4 && dwc4_mirror_applies(g);
        let as_convt = transposed || mirrored;
        let (rows, hp, wp, hs, ws, cs) = if as_convt {
            (g.c_in, g.h_in, g.w_in, g.h_out, g.w_out, g.c_out)
        } else {
            (g.c_out, g.h_out, g.w_out, g.h_in, g.w_in, g.c_in)
        };
        let pad = if mirrored { g.k - 1 - g.pad } else { g.pad };
        let cols = g.k * g.k * cs;
        let npos = batch * hp * wp;
        // The bias gradient's taps: conv sums dy, the A rows (one "tap"); convT the B columns
        // of the taps that reach every output position exactly once. (Mirrored: a column-sum
        // pass, as `dw_c4` does not sum B.)
        let covering = match (transposed, mirrored) {
            (true, _) => convt_covering_taps(g),
            (false, true) => None,
            (false, false) => Some(1),
        };
        let c4 = self.fast.dw_c4 && dwc4_applies(rows, cs, g.k, g.stride);
        // (Within `dw_c4`, its tensor-core version where the device gave it its shared memory.)
        let c4tc = c4 && self.fast.dw_c4_tc && self.may_launch(dwc4_kernel(g.k, rows, true));
        let k1 = self.fast.dw_k1
            && dwk1_applies(g, rows, cs, as_convt)
            && self.may_launch("conv_dw_partial_k1tc_tf32");
        let unit = dw4_unit(dw4_row_tile(rows), g.stride, wp, self.fast.dw_units);
        let v5 = dw5_applies(dw4_row_tile(rows), g.k, g.stride, unit, self.fast.dw_v5);
        // Version 4's 5×5 passes in units of 32 (version 5's at stride 1) on wgmma (`dw_wgmma`,
        // sm_90a) where the device has it: the convolution's form (A = dy, masked) or the
        // transposed one's (B = g, masked), not the mirrored form of `dw_c4`.
        let wg = match self.fast.dw_wgmma && self.has_wgmma() && as_convt == transposed {
            true => dwg_kernel(dw4_row_tile(rows), g.k, g.stride, unit, as_convt),
            false => None,
        };
        let v4 = !c4
            && !k1
            && self.fast.dw_v4
            && dw4_applies(rows, cs, g.k, g.stride)
            && (db.is_none() || !transposed || dw4_sums_cover(g, covering, unit));
        // Version 3 tiles: 64 × 128, or 32 × 256 for at most 32 rows (conv_tc.cu, Dw3);
        // version 4: 64 or 32 rows × the k taps of one ky × 32 channels, over units of 16
        // positions.
        let v3 = !c4 && !k1 && !v4 && self.fast.dw_v3 && rows % 4 == 0 && cs % 4 == 0;
        let (row_tile, col_tile, name) = match (v4, v3, rows <= 32) {
            _ if c4 => (rows, cols, dwc4_kernel(g.k, rows, c4tc)),
            _ if k1 => (64, 64, "conv_dw_partial_k1tc_tf32"),
            (true, _, _) => {
                let rt = dw4_row_tile(rows);
                let name = match (wg, v5) {
                    (Some((name, _)), _) => name,
                    (_, true) => "conv_dw_partial_v5k5s1_tf32",
                    _ => dw4_kernel(rt, g.k, g.stride, unit),
                };
                (rt, g.k * 32, name)
            }
            (false, false, _) => (TC_TILE, TC_TILE, "conv_dw_partial_tf32"),
            (false, true, false) => (64, 128, "conv_dw_partial_v3_tf32"),
            (false, true, true) => (32, 256, "conv_dw_partial_v3r32_tf32"),
        };
        // Version 4's column tiles are (ky, 32 channels): k · cs / 32 of them.
        let col_tiles = if v4 {
            g.k * cs / 32
        } else {
            cols.div_ceil(col_tile)
        };
        let tiles = rows.div_ceil(row_tile) * col_tiles;
        // Version 4 splits units (16, 32 or 40 positions of one grid row) into chunks, the others
        // positions.
        let (chunk, chunks) = if k1 {
            dwk1_chunks(npos.div_ceil(64), rows / 64)
        } else if c4 {
            dwc4_chunks(batch * hp.div_ceil(8) * wp.div_ceil(16))
        } else if v4 {
            // (A wave of 32-row blocks, or of version 5's, holds more of them:
            // TC_DW_TARGET_BLOCKS is 2 per SM.)
            let per_sm = match v5 || wg.is_some() {
                true => DW5_BLOCKS_PER_SM,
                false => dw4_blocks_per_sm(row_tile, g.stride),
            };
            let target = TC_DW_TARGET_BLOCKS / 2 * per_sm;
            dw_chunks_of(tiles, batch * hp * wp.div_ceil(unit), 1, target)
        } else {
            dw_chunks(tiles, npos)
        };
        let p = ConvDwGemmC {
            rows: i(rows),
            batch: i(batch),
            hp: i(hp),
            wp: i(wp),
            hs: i(hs),
            ws: i(ws),
            cs: i(cs),
            k: i(g.k),
            stride: i(g.stride),
            pad: i(pad),
            chunk: i(chunk),
        };
        i(chunks * rows * cols);
        let mut partial = self.scratch::<f32>(chunks * rows * cols);
        let cfg = match (v4, v3) {
            // (`dw_c4_tc`: a conv's A, its dy, is masked by its ReLU, and the mask is staged too.)
            _ if c4 => LaunchConfig {
                grid_dim: (chunks as u32, 1, 1),
                block_dim: match c4tc {
                    true => (DWC4TC_THREADS, 1, 1),
                    false => (dwc4_threads(rows, g.k), 1, 1),
                },
                shared_mem_bytes: match c4tc {
                    true => dwc4tc_shared_bytes(rows, g.k, relu && !as_convt),
                    false => 0,
                },
            },
            _ if k1 => LaunchConfig {
                grid_dim: (chunks as u32, (rows / 64) as u32, 1),
                block_dim: (DWC4TC_THREADS, 1, 1),
                shared_mem_bytes: dwk1tc_shared_bytes(relu),
            },
            (true, _) => LaunchConfig {
                grid_dim: ((rows / row_tile) as u32, col_tiles as u32, chunks as u32),
                // (Version 5 and the wgmma form: 4 warps of 64 rows; version 4: a warp per 32
                // rows and 8 channels.)
                block_dim: match v5 || wg.is_some() {
                    true => (DW5_THREADS, 1, 1),
                    false => (4 * row_tile as u32, 1, 1),
                },
                shared_mem_bytes: wg.map_or(0, |(_, bytes)| bytes),
            },
            (false, true) => tile_grid(rows, row_tile, cols, col_tile, chunks, DW3_THREADS),
            (false, false) => tc_grid(rows, cols, chunks),
        };
        let (zero, ri) = (0i32, relu as i32);
        // (`dw_c4` sums the A rows only: a conv's dy, not a convT's g.)
        let db_taps = match (v3 || v4 || k1 || (c4 && !as_convt), &db) {
            (true, Some(_)) => covering,
            _ => None,
        };
        // Version 4 sums g per ky row of taps (the covering taps' ky), into tap (ky, 0).
        let (sum_kys, reduce_taps) = match (v4, db_taps) {
            (true, Some(taps)) if transposed => dw4_sum_rows(taps, g.k),
            (_, taps) => (0, taps.unwrap_or(0)),
        };
        let sums_len = if transposed { cols } else { rows };
        let mut sums = self.scratch::<f32>(if db_taps.is_some() {
            chunks * sums_len
        } else {
            1
        });
        // 0: no sums; 1: of the A rows (conv: dy); 2: of the B columns (convT: gathered dy).
        let sums_of: i32 = match (db_taps, transposed) {
            (None, _) => 0,
            (Some(_), false) => 1,
            (Some(_), true) => 2,
        };
        // convT: A = x, B = gathered g (dy through y's ReLU); conv: A = g, B = gathered x.
        let (a, a_mask, a_masked, b, b_mask, b_masked) = if as_convt {
            (x, x, &zero, dy, y, &ri)
        } else {
            (dy, y, &ri, x, x, &zero)
        };
        if v4 {
            launch!(self, name, cfg;
                &p, a, a_mask, a_masked, b, b_mask, b_masked, &mut partial, &sums_of, &sum_kys,
                &mut sums);
        } else if v3 || c4 || k1 {
            launch!(self, name, cfg;
                &p, a, a_mask, a_masked, b, b_mask, b_masked, &mut partial, &sums_of, &mut sums);
        } else {
            launch!(self, name, cfg; &p, a, a_mask, a_masked, b, b_mask, b_masked, &mut partial);
        }
        let (ci, ri2, csi, ki, mi) = (i(chunks), i(rows), i(cs), i(g.k), mirrored as i32);
        let sl = i(sums_len);
        match (db, db_taps) {
            (Some(db), Some(_)) => {
                assert_eq!(db.len(), g.c_out);
                let oi = i(g.c_out);
                launch!(self, "conv_dw_reduce_f32", rs_grid(rows * cols + g.c_out);
                    &ci, &ri2, &csi, &ki, &mi, &partial, dw, &sl, &oi, &reduce_taps, &*sums, db);
            }
            (db, _) => {
                // (No sums: no bias, or version 2, which sums the bias over dy on its own.)
                let (zero_u, mut none) = (0u32, self.scratch::<f32>(1));
                launch!(self, "conv_dw_reduce_f32", rs_grid(rows * cols);
                    &ci, &ri2, &csi, &ki, &mi, &partial, dw, &sl, &zero, &zero_u, &*sums,
                    &mut *none);
                if let Some(db) = db {
                    assert_eq!(db.len(), g.c_out);
                    self.conv_db(g, batch, y, relu, dy, db);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A "same" gather over `batch` images of 17 × 33 (W as [n][c]).
    fn gemm_17x33(batch: i32, cs: i32, n: i32, k: i32, stride: i32) -> ConvGemmC {
        ConvGemmC {
            batch,
            hp: 17,
            wp: 33,
            hs: 17,
            ws: 33,
            cs,
            n,
            k,
            stride,
            pad: k / 2,
            w_nc: 1,
        }
    }

    /// Version 4's sums of g: where `dw4_sums_cover` says yes, the units' ranges of strip pixels
    /// (`[px0·s − pad + own, … + unit·s)` for px0 = 0, unit, …; units of 16 or 40) cover every
    /// pixel of an output row exactly once; and the CLEVR decoder's layers are such layers.
    #[test]
    fn dw4_sum_ranges_cover_each_output_pixel_once() {
        let t = ConvGeom::transposed;
        for g in [
            t(8, 8, 64, 64, 5, 2, 2, 1),
            t(64, 64, 64, 64, 5, 2, 2, 1),
            t(128, 128, 64, 64, 5, 1, 2, 0),
            t(35, 35, 64, 64, 5, 1, 2, 0),
        ] {
            assert!(dw4_sums_cover(&g, convt_covering_taps(&g), 16), "{g:?}");
        }
        // The small decoders' 35-wide layer in units of 40; clevr6's decoder in units of 32.
        let t35 = t(35, 35, 32, 32, 5, 1, 2, 0);
        assert!(dw4_sums_cover(&t35, convt_covering_taps(&t35), 40));
        for g in [
            t(64, 64, 64, 64, 5, 2, 2, 1),
            t(128, 128, 64, 64, 5, 1, 2, 0),
        ] {
            assert!(dw4_sums_cover(&g, convt_covering_taps(&g), 32), "{g:?}");
        }
        let mut checked = 0;
        for k in [3usize, 5] {
            for s in [1usize, 2] {
                for pad in 0..k {
                    for op in 0..s {
                        for (w_in, unit) in [1usize, 5, 16, 17, 32, 33, 35, 40, 64]
                            .into_iter()
                            .flat_map(|w| [(w, 16usize), (w, 32), (w, 40)])
                        {
                            // (Only geometries with at least one output pixel; h_in is 4.)
                            if (w_in - 1) * s + k + op <= 2 * pad || 3 * s + k + op <= 2 * pad {
                                continue;
                            }
                            let g = t(4, w_in, 64, 64, k, s, pad, op);
                            if !dw4_sums_cover(&g, convt_covering_taps(&g), unit) {
                                continue;
                            }
                            let own = pad.min(k - s) as isize;
                            let mut count = vec![0; g.w_out];
                            for px0 in (0..w_in).step_by(unit) {
                                let start = (px0 * s) as isize - pad as isize + own;
                                for sx in start..start + (unit * s) as isize {
                                    if (0..g.w_out as isize).contains(&sx) {
                                        count[sx as usize] += 1;
                                    }
                                }
                            }
                            assert!(count.iter().all(|&c| c == 1), "{g:?}: {count:?}");
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 40, "{checked}");
        // The covering taps of the stride-2 5×5 layer are (2|3, 2|3): rows 2 and 3 sum g, into
        // taps (2, 0) and (3, 0).
        let s2 = t(8, 8, 64, 64, 5, 2, 2, 1);
        let taps = convt_covering_taps(&s2).unwrap();
        assert_eq!(dw4_sum_rows(taps, 5), (0b1100, (1 << 10) | (1 << 15)));
    }

    /// Version 4 takes the 64- and 32-channel layers with 3×3 and 5×5 kernels at stride 1 and 2
    /// only; 32-row blocks where 64 rows do not divide the rows.
    #[test]
    fn dw4_applies_to_the_clevr_layers_only() {
        assert!(
            dw4_applies(64, 64, 5, 1) && dw4_applies(64, 64, 5, 2) && dw4_applies(128, 32, 3, 2)
        );
        assert!(
            dw4_applies(32, 64, 5, 1) && dw4_applies(32, 32, 5, 1) && dw4_applies(96, 32, 3, 2)
        );
        assert_eq!(
            (
                dw4_row_tile(64),
                dw4_row_tile(128),
                dw4_row_tile(32),
                dw4_row_tile(96)
            ),
            (64, 64, 32, 32)
        );
        assert_eq!(dw4_kernel(32, 5, 1, 16), "conv_dw_partial_v4r32k5s1_tf32");
        // Units of 40: 32-row blocks at stride 1 over grids 33 to 40 wide; of 32: 64-row blocks
        // over rows a multiple of 32 wide; where asked.
        assert_eq!(
            (
                dw4_unit(32, 1, 35, true),
                dw4_unit(64, 1, 128, true),
                dw4_unit(64, 2, 32, true)
            ),
            (40, 32, 32)
        );
        assert_eq!(
            (
                dw4_unit(32, 1, 35, false),
                dw4_unit(64, 1, 35, true),
                dw4_unit(32, 2, 35, true),
                dw4_unit(32, 1, 32, true),
                dw4_unit(32, 1, 41, true),
                dw4_unit(64, 1, 128, false),
                dw4_unit(64, 2, 16, true)
            ),
            (16, 16, 16, 16, 16, 16, 16)
        );
        assert_eq!(dw4_kernel(64, 5, 1, 32), "conv_dw_partial_v4k5s1u32_tf32");
        assert_eq!(dw4_kernel(64, 3, 2, 32), "conv_dw_partial_v4k3s2u32_tf32");
        assert_eq!(
            dw4_kernel(32, 5, 1, 40),
            "conv_dw_partial_v4r32k5s1u40_tf32"
        );
        assert_eq!(
            dw4_kernel(32, 3, 1, 40),
            "conv_dw_partial_v4r32k3s1u40_tf32"
        );
        assert!(
            !dw4_applies(16, 32, 5, 1) && !dw4_applies(4, 32, 3, 1) && !dw4_applies(48, 32, 3, 1)
        );
        assert!(
            !dw4_applies(64, 16, 5, 1) && !dw4_applies(64, 3, 5, 1) && !dw4_applies(64, 4, 3, 1)
        );
        assert!(
            !dw4_applies(64, 64, 1, 1) && !dw4_applies(64, 64, 7, 1) && !dw4_applies(64, 64, 5, 3)
        );
    }

    /// The kernels opted in to more than 48 KiB exist in kernels.rs (the backend fails to open
    /// otherwise), need the opt-in, and are the only version 3 launches past 48 KiB.
    #[test]
    fn large_shared_kernels_are_loaded_and_need_the_opt_in() {
        let loaded: Vec<&str> = super::super::kernels::KERNEL_FILES
            .iter()
            .flat_map(|f| f.kernels.iter().copied())
            .collect();
        for (name, bytes) in LARGE_SHARED {
            assert!(loaded.contains(&name), "{name} is not in KERNEL_FILES");
            // (227 KiB: the most an sm_90 block can have.)
            assert!(bytes > 48 * 1024 && bytes <= 227 * 1024, "{name}: {bytes}");
        }
        assert_eq!(LARGE_SHARED[0].1, 57_344);
        for (n, cs, adjoint) in [
            (64, 64, false),
            (64, 64, true),
            (32, 64, true),
            (64, 48, false),
        ] {
            let p = ConvGemmC {
                batch: 2,
                hp: 8,
                wp: 8,
                hs: 8,
                ws: 8,
                cs,
                n,
                k: 5,
                stride: 2,
                pad: 2,
                w_nc: 1,
            };
            for k32 in [false, true] {
                let (name, cfg, bk) = v3_kernel(&p, adjoint, k32);
                // Version 5 applies here (stride 2) to the gathers of 64 channels into more than
                // 32 only (`v5s2`), with the bytes LARGE_SHARED lists for
                // it: the adjoint one over 2 images × 1 tile of each of 4 output phases, the
                // direct one over 2 × 1.
                let v5 = v5_kernel(&p, adjoint, k32);
                assert_eq!(v5.is_some(), cs == 64 && n > 32, "{n} {cs} {adjoint}");
                if let Some((v5_name, v5_cfg, ..)) = v5 {
                    let listed = LARGE_SHARED.iter().find(|(k, _)| *k == v5_name).unwrap();
                    assert_eq!(v5_cfg.shared_mem_bytes, listed.1, "{v5_name}");
                    let z = if adjoint { 4 } else { 1 };
                    assert_eq!(v5_cfg.grid_dim, (2, 1, z), "{v5_name}");
                    assert_eq!(v5_name.contains("adjoint"), adjoint, "{v5_name}");
                }
                let opted = LARGE_SHARED.iter().find(|(k, _)| *k == name);
                let want_k32 = k32 && n > 32 && cs % 32 == 0;
                assert_eq!(
                    (bk == 32, name.contains("_k32_")),
                    (want_k32, want_k32),
                    "{name}"
                );
                match opted {
                    Some(&(_, bytes)) => assert_eq!(cfg.shared_mem_bytes, bytes, "{name}"),
                    None => assert!(cfg.shared_mem_bytes <= 48 * 1024, "{name}"),
                }
            }
        }
        // Version 5: stride 1, k 3 or 5; 64 gathered channels into more than 32 outputs or at
        // most 8, its launch taking what LARGE_SHARED lists for it; 32 gathered channels into
        // at most 32, within 48 KiB.
        for (n, cs, k, stride, applies) in [
            (64, 64, 5, 1, true),
            (96, 64, 3, 1, true),
            (4, 64, 3, 1, true),
            (8, 64, 5, 1, true),
            (9, 64, 5, 1, false),
            (32, 64, 5, 1, false),
            (32, 32, 5, 1, true),
            (9, 32, 3, 1, true),
            (4, 32, 3, 1, true),
            (33, 32, 5, 1, false),
            (64, 32, 5, 1, false),
            (32, 48, 5, 1, false),
            (64, 64, 7, 1, false),
            (64, 64, 5, 2, false),
            (32, 32, 5, 2, false),
        ] {
            let p = gemm_17x33(3, cs, n, k, stride);
            for (adjoint, v6) in [(false, false), (true, false), (false, true), (true, true)] {
                // (At stride 2, `v5s2` takes the gathers of 64 channels into more than 32:
                // large_shared_kernels_are_loaded_and_need_the_opt_in checks its launches.)
                let s2 = stride == 2 && cs == 64 && n > 32;
                let v5 = v5_kernel(&p, adjoint, v6);
                assert_eq!(v5.is_some(), applies || s2, "{n} {cs} {k} {stride}");
                if let Some((name, cfg, th, tw)) = v5 {
                    assert_eq!(name.contains("s2k"), s2, "{name}");
                    // Version 6 takes the stride-1 passes into more than 8 outputs (64
                    // channels: 5×5 only), with 4 warps a block.
                    let wide = v6 && n > 8 && (cs == 32 || k == 5) && stride == 1;
                    let version = if wide { "_v6" } else { "_v5" };
                    assert!(name.contains(version), "{name}");
                    assert_eq!(cfg.block_dim.0, if wide { 128 } else { 256 }, "{name}");
                    if s2 {
                        continue;
                    }
                    let listed = LARGE_SHARED.iter().find(|(k, _)| *k == name);
                    if cs == 64 {
                        assert_eq!(cfg.shared_mem_bytes, listed.unwrap().1, "{name}");
                        assert_eq!((th, tw), (8, 16), "{name}");
                    } else {
                        // 17 × 33 takes 11 × 11 tiles (2 × 3 per image, where 8 × 16 needs 9).
                        assert!(
                            listed.is_none() && cfg.shared_mem_bytes <= 48 << 10,
                            "{name}"
                        );
                        assert_eq!((th, tw), (11, 11), "{name}");
                        assert!(name.contains("c32"), "{name}");
                    }
                    // 3 images of 3 × 3 (or 2 × 3) tiles; one column tile of 8 or
                    // ⌈n / 64⌉ (32 with 32 channels).
                    let cols = match (n, cs) {
                        (..=8, _) => 1,
                        (_, 32) => 1,
                        _ => (n as u32).div_ceil(64),
                    };
                    let blocks = if cs == 64 { 27 } else { 18 };
                    assert_eq!(cfg.grid_dim, (blocks, cols, 1), "{name}");
                    assert_eq!(name.contains("n8"), n <= 8, "{name}");
                }
            }
        }
    }

    /// Version 5 for at most 4 gathered channels: stride 1, 1 to 4 gathered channels, k 3 or 5,
    /// more than 8 outputs; 32 columns per block up to 32, 64 past that; one block per two
    /// output tiles up to C4_MAX_BLOCKS, and static shared memory only.
    #[test]
    fn c4_applies_to_the_first_and_last_layers() {
        for (n, cs, k, stride, applies) in [
            (64, 3, 5, 1, true),
            (32, 3, 5, 1, true),
            (64, 4, 3, 1, true),
            (9, 1, 3, 1, true),
            (8, 3, 5, 1, false),
            (64, 5, 5, 1, false),
            (64, 3, 7, 1, false),
            (64, 3, 5, 2, false),
        ] {
            for (batch, blocks) in [(3, 14), (200, 900), (300, 1024)] {
                let p = gemm_17x33(batch, cs, n, k, stride);
                for adjoint in [false, true] {
                    let c4 = c4_kernel(&p, adjoint);
                    assert_eq!(c4.is_some(), applies, "{n} {cs} {k} {stride}");
                    if let Some((name, cfg)) = c4 {
                        // 9 tiles of 8 × 16 pixels per image.
                        let cols = (n as u32).div_ceil(if n <= 32 { 32 } else { 64 });
                        assert_eq!(cfg.grid_dim, (blocks, cols, 1), "{name}");
                        assert_eq!(cfg.shared_mem_bytes, 0, "{name}");
                        assert_eq!(name.contains("n32"), n <= 32, "{name}");
                        assert_eq!(name.contains("adjoint"), adjoint, "{name}");
                        assert!(name.contains(&format!("k{k}_")), "{name}");
                        assert!(!LARGE_SHARED.iter().any(|(l, _)| *l == name), "{name}");
                    }
                }
            }
        }
    }

    /// The 32-channel version 5 tiles: at most 128 pixels, and a block's shared memory within
    /// 48 KiB (no opt-in) for every grid up to 160 wide; the fewest tiles per image.
    #[test]
    fn v5_c32_tiles_fit_48_kib() {
        assert_eq!(v5_c32_tile(35, 35), (7, 18));
        assert_eq!(v5_c32_tile(128, 128), (8, 16));
        assert_eq!(v5_c32_tile(64, 64), (8, 16));
        for hp in 1..=160 {
            for wp in 1..=160 {
                let (th, tw) = v5_c32_tile(hp, wp);
                assert!(th * tw <= 128 && (8..=24).contains(&tw), "{hp} × {wp}");
                for k in [3, 5] {
                    for nt in [32, 8] {
                        assert!(v5_shared_bytes(th, tw, k, nt, 32) <= 48 << 10);
                    }
                }
                let tiles = hp.div_ceil(th) * wp.div_ceil(tw);
                assert!(tiles <= hp.div_ceil(8) * wp.div_ceil(16), "{hp} × {wp}");
            }
        }
    }

    /// A conv takes `dw_c4` mirrored where it has at most 4 outputs from 32 or 64 inputs, and
    /// the direct form where it has at most 4 inputs.
    #[test]
    fn dwc4_mirrored_takes_the_full_decoders_last_layer() {
        assert!(dwc4_mirror_applies(&ConvGeom::same(35, 35, 32, 4, 3)));
        assert!(dwc4_mirror_applies(&ConvGeom::conv(11, 19, 64, 3, 5, 1, 1)));
        // The first encoder layer: the direct form.
        assert!(!dwc4_mirror_applies(&ConvGeom::same(35, 35, 3, 32, 5)));
        // 16 inputs, stride 2, a 1×1 kernel: neither.
        assert!(!dwc4_mirror_applies(&ConvGeom::same(35, 35, 16, 4, 3)));
        assert!(!dwc4_mirror_applies(&ConvGeom::conv(
            12, 12, 32, 4, 3, 2, 1
        )));
        assert!(!dwc4_mirror_applies(&ConvGeom::same(35, 35, 32, 4, 1)));
    }

    /// `dw_k1` takes the 64-input 1×1 weight gradients of a multiple of 64 rows only, and its
    /// chunks cover every tile once, at least 2 tiles each (but for a single tile), in about
    /// DWK1_TARGET_BLOCKS blocks over all row tiles.
    #[test]
    fn dwk1_applies_to_the_token_chains_linears_and_its_chunks_cover_the_tiles() {
        let linear = |n_in, n_out| ConvGeom::same(1, 1, n_in, n_out, 1);
        assert!(dwk1_applies(&linear(64, 64), 64, 64, false));
        assert!(dwk1_applies(&linear(64, 192), 192, 64, false));
        assert!(!dwk1_applies(&linear(64, 64), 64, 64, true));
        assert!(!dwk1_applies(&linear(32, 64), 64, 32, false));
        assert!(!dwk1_applies(&linear(64, 32), 32, 64, false));
        assert!(!dwk1_applies(
            &ConvGeom::same(8, 8, 64, 64, 3),
            64,
            64,
            false
        ));
        for row_tiles in [1, 2, 3] {
            for tiles in (1..=1500).chain([16384, 100_003]) {
                let (per, chunks) = dwk1_chunks(tiles, row_tiles);
                assert!(per >= 2, "{tiles}");
                assert!(
                    per * chunks >= tiles && per * (chunks - 1) < tiles,
                    "{tiles}"
                );
                assert!(
                    chunks * row_tiles <= DWK1_TARGET_BLOCKS.max(row_tiles),
                    "{tiles}"
                );
            }
        }
        // clevr6's tokens: a million positions, 391 blocks of 42 tiles.
        assert_eq!(dwk1_chunks(16384, 1), (42, 391));
    }

    /// `dw_c4`'s chunks cover every tile once, at least 2 tiles each (but for a single tile), in
    /// at most DWC4_TARGET_BLOCKS blocks.
    #[test]
    fn dwc4_chunks_cover_the_tiles() {
        for tiles in (1..=2000).chain([8192, 57344, 100_003]) {
            let (per, chunks) = dwc4_chunks(tiles);
            assert!(
                per >= 2 && chunks <= DWC4_TARGET_BLOCKS,
                "{tiles}: {per} × {chunks}"
            );
            assert!(
                per * chunks >= tiles && per * (chunks - 1) < tiles,
                "{tiles}"
            );
        }
        assert_eq!(dwc4_chunks(8192), (16, 512));
        assert!(
            dwc4_applies(64, 3, 5, 1) && dwc4_applies(64, 4, 3, 1) && dwc4_applies(32, 3, 5, 1)
        );
        assert!(!dwc4_applies(48, 3, 5, 1) && !dwc4_applies(64, 5, 5, 1));
        assert!(!dwc4_applies(64, 3, 7, 1) && !dwc4_applies(64, 3, 5, 2));
    }

    /// The weight-gradient split covers every position once, in k-tile multiples, and never
    /// asks for more blocks than one wave (unless the tiles alone are more).
    #[test]
    fn dw_chunks_cover_the_positions_in_one_wave() {
        for tiles in 1..=300 {
            for npos in [
                1,
                15,
                16,
                17,
                1000,
                16_384,
                4 * 35 * 35 * 64,
                448 * 128 * 128,
            ] {
                let (chunk, chunks) = dw_chunks(tiles, npos);
                assert_eq!(chunk % TC_BK, 0, "tiles {tiles}, npos {npos}");
                assert!(chunks * chunk >= npos && (chunks - 1) * chunk < npos);
                assert!(
                    tiles * chunks <= TC_DW_TARGET_BLOCKS.max(tiles),
                    "tiles {tiles}, npos {npos}: {chunks} chunks"
                );
            }
        }
        // The 64-channel 5×5 layers of clevr6 (13 column tiles) fill the wave to 260 blocks.
        assert_eq!(dw_chunks(13, 448 * 128 * 128).1, 20);
    }

    /// How often each output position of a transposed convolution is reached by the taps of
    /// `mask` over the input grid (per axis: tap ky reaches q = s·p − pad + ky).
    fn tap_coverage(g: &ConvGeom, mask: u32) -> Vec<usize> {
        let mut count = vec![0; g.h_out * g.w_out];
        for tap in (0..g.k * g.k).filter(|t| mask >> t & 1 == 1) {
            let (ky, kx) = (tap / g.k, tap % g.k);
            for py in 0..g.h_in {
                for px in 0..g.w_in {
                    let qy = (py * g.stride + ky) as isize - g.pad as isize;
                    let qx = (px * g.stride + kx) as isize - g.pad as isize;
                    if (0..g.h_out as isize).contains(&qy) && (0..g.w_out as isize).contains(&qx) {
                        count[qy as usize * g.w_out + qx as usize] += 1;
                    }
                }
            }
        }
        count
    }

    #[test]
    fn convt_covering_taps_reach_every_output_once() {
        // The decoder layers of the configs: 5×5 stride 2 (pad 2, output padding 1), 5×5 and
        // 3×3 stride 1 "same".
        let s2 = ConvGeom::transposed(8, 8, 64, 64, 5, 2, 2, 1);
        let bit = |ky: usize, kx: usize, k: usize| 1u32 << (ky * k + kx);
        assert_eq!(
            convt_covering_taps(&s2),
            Some(bit(2, 2, 5) | bit(2, 3, 5) | bit(3, 2, 5) | bit(3, 3, 5))
        );
        let s1 = ConvGeom::transposed(16, 16, 64, 64, 5, 1, 2, 0);
        assert_eq!(convt_covering_taps(&s1), Some(bit(2, 2, 5)));
        let k3 = ConvGeom::transposed(16, 16, 64, 4, 3, 1, 1, 0);
        assert_eq!(convt_covering_taps(&k3), Some(bit(1, 1, 3)));
        // Every small geometry: a mask reaches each output exactly once; None only where some
        // output phase has no single tap that reaches all of its positions.
        let (mut some, mut none) = (0, 0);
        for k in 1..=5 {
            for stride in 1..=3 {
                for pad in 0..k {
                    for out_pad in 0..stride {
                        for h_in in 1..=5 {
                            if (h_in - 1) * stride + k + out_pad <= 2 * pad {
                                continue; // no output
                            }
                            let g =
                                ConvGeom::transposed(h_in, h_in + 1, 4, 4, k, stride, pad, out_pad);
                            match convt_covering_taps(&g) {
                                Some(mask) => {
                                    some += 1;
                                    assert!(
                                        tap_coverage(&g, mask).iter().all(|&c| c == 1),
                                        "{g:?}: mask {mask:b}"
                                    );
                                }
                                None => {
                                    none += 1;
                                    // Some output row phase (or column phase) that no single
                                    // tap covers completely.
                                    let covers =
                                        |n_in: usize, n_out: usize, phase: usize, ky: usize| {
                                            (phase..n_out).step_by(stride).all(|q| {
                                                let off = (q + pad) as isize - ky as isize;
                                                off >= 0
                                                    && off as usize % stride == 0
                                                    && (off as usize / stride) < n_in
                                            })
                                        };
                                    let axis_ok = |n_in: usize, n_out: usize| {
                                        (0..stride.min(n_out))
                                            .all(|ph| (0..k).any(|ky| covers(n_in, n_out, ph, ky)))
                                    };
                                    assert!(
                                        !(axis_ok(g.h_in, g.h_out) && axis_ok(g.w_in, g.w_out)),
                                        "{g:?}: a covering tap set exists but none was found"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(
            some > 100 && none > 10,
            "{some} geometries with taps, {none} without"
        );
    }
}
