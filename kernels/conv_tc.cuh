// conv_tc.cuh: what the convolutions on the tensor cores (`precision: tf32`) share. Their kernels:
// conv_tc.cu (versions 2 and 3 of the activation passes, c4, the weight gradients), conv_tc_v5.cu
// and conv_tc_v6.cu (versions 5 and 6, from the template of conv_tc_v5.cuh): three NVRTC programs,
// which compile in parallel. (src/cuda/kernels.rs pastes a header of kernels/ in place of its
// #include, once per program: NVRTC is given one source.)
//
// Every pass of a convolution or transposed convolution is an implicit GEMM whose operands are
// gathered from the channels-last activations on the fly (nothing is unrolled into memory),
// multiplied with TF32 mma.sync (m16n8k8) and accumulated in f32.
//
// With a "direct" gather  S(n,py,px ; ky,kx,c) = src[n, py·s−p+ky, px·s−p+kx, c]   and an
//      "adjoint" gather   S(n,py,px ; ky,kx,c) = src[n, (py+p−ky)/s, (px+p−kx)/s, c] (only where
//                          the division is exact and in range), the six passes are:
//   conv  fwd   y [n,oy,ox ; co] = Σ_{ky,kx,ci} direct(x)  · W[co,ci,ky,kx]   (+ b, ReLU)
//   conv  dx    dx[n,iy,ix ; ci] += Σ_{ky,kx,co} adjoint(g) · W[co,ci,ky,kx]
//   convT fwd   y [n,oy,ox ; co] = Σ_{ky,kx,ci} adjoint(x) · W[ci,co,ky,kx]   (+ b, ReLU)
//   convT dx    dx[n,iy,ix ; ci] += Σ_{ky,kx,co} direct(g)  · W[ci,co,ky,kx]
//   conv  dW    dW[co ; ky,kx,ci] += Σ_{n,oy,ox} g[.., co] · direct(x) over the Ho×Wo grid
//   convT dW    dW[ci ; ky,kx,co] += Σ_{n,iy,ix} x[.., ci] · direct(g) over the Hi×Wi grid
// (g = dy with the ReLU mask of y applied while loading). The first four run in
// conv_igemm_{direct,adjoint}_tf32, the weight gradients in conv_dw_partial_tf32 (split over the
// reduction into fixed chunks) + conv_dw_reduce_f32 (sums the chunks in order: deterministic).
//
// Tiling: 64×64 output tile per block of 128 threads (4 warps, 2×2, each 32×32 = 2×4 mma tiles),
// k-tiles of 16, shared-memory rows padded to 20 words so that the fragment loads are free of
// bank conflicts. Version 2 (conv_igemm_*_tf32, any channel count): single-buffered, every
// element gathered with its own index arithmetic. Version 3 (conv_igemm_*_v3_tf32, gathered
// channels a multiple of 16, i.e. every 64-channel layer): 16-byte loads, weights pre-permuted,
// two stages, B fragments read in pairs (below). Weight gradients: conv_dw_partial_tf32 (version 2) and, when the rows
// and gathered channels are multiples of 4, conv_dw_partial_v3_tf32 (16-byte loads, two stages),
// which also sums the bias gradient from its loaded operands (conv_dw_reduce_f32 adds it up)
// and reads its A fragments in pairs. The loops' instruction counts (tools/kernel_sass.py) and
// the reasons for each layout are in benches/NOTES.md.

#define TC_BM 64
#define TC_BN 64
#define TC_BK 16
#define TC_LD (TC_BK + 4)
#define TC_THREADS 128

// acc[mi][ni] += (this warp's 32 rows of As) · (its 32 rows of Bs)ᵀ over the TC_BK columns.
// Rows of TC_LD = 20 words keep the 4-byte fragment loads free of bank conflicts.
template <int LDA, int LDB>
static __device__ __forceinline__ void tc_tile_mma(const unsigned (*As)[LDA], const unsigned (*Bs)[LDB], int wm,
                                                   int wn, int lane, float acc[2][4][4]) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int ks = 0; ks < TC_BK; ks += 8) {
        unsigned a[2][4], b[4][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
            const int r = wm * 32 + mi * 16 + g;
            a[mi][0] = As[r][ks + t];
            a[mi][1] = As[r + 8][ks + t];
            a[mi][2] = As[r][ks + t + 4];
            a[mi][3] = As[r + 8][ks + t + 4];
        }
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
            const int c = wn * 32 + ni * 8 + g;
            b[ni][0] = Bs[c][ks + t];
            b[ni][1] = Bs[c][ks + t + 4];
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) mma_tf32_16x8x8(acc[mi][ni], a[mi], b[ni]);
    }
}

// The same product for versions 3 and 5 over a k-tile of BK columns and a warp tile of MI m16
// by NI n8 tiles, from the lane's shared-memory addresses (tc_v3_lane_addrs) and the offsets in
// words of the k-tile's A rows and B stage (constants once the loop around is unrolled, so they
// fold into the load instructions). A_MI: the words from one m16 tile's rows to the next's
// (version 3: 16 rows of LDA; version 5: one tile row of its halo).
// A: each fragment is one ldmatrix.x4 (ldsm_x4) instead of four 4-byte loads; its rows must be
// 16-byte aligned (20 or 36 words are), and the 8 rows of each of its matrices then start in 8
// different 4-bank groups (LDA ≡ 4 mod 8 words): conflict-free. B: each 8 columns of Bs are in the order k0 k4 k1 k5
// k2 k6 k3 k7 (conv_w_nk_tf32 writes the weights so), so a lane's two B values for k slots t and
// t + 4 lie side by side and come in one 8-byte load, already in the register order mma wants;
// rows of LDB ≡ 8 (mod 16) words keep those loads free of bank conflicts. (A cannot be paired
// this way: its fragment's register order runs over rows first.)
template <int BK, int A_MI, int LDB, int MI = 2, int NI = 4>
static __device__ __forceinline__ void tc_tile_mma_v3(SmemAddr a_row, int a_stage, SmemAddr b_pair, int b_stage,
                                                      float acc[MI][NI][4]) {
#pragma unroll
    for (int ks = 0; ks < BK; ks += 8) {
        unsigned a[MI][4], b[NI][2];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) ldsm_x4(a[mi], a_row, a_stage + mi * A_MI + ks);
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) lds_u2(b[ni], b_pair, b_stage + ni * 8 * LDB + ks);
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) mma_tf32_16x8x8(acc[mi][ni], a[mi], b[ni]);
    }
}

// tc_tile_mma_v3 for a warp of two m16 fragments whose rows need not be a constant distance
// apart (version 6: 32 pixels of a tile of any width, which may wrap a tile row): each lane
// gives ldmatrix its own row address in either fragment.
template <int BK, int LDB, int NI>
static __device__ __forceinline__ void tc_tile_mma_rows2(SmemAddr a_row0, SmemAddr a_row1, int a_off,
                                                         SmemAddr b_pair, int b_stage, float acc[2][NI][4]) {
#pragma unroll
    for (int ks = 0; ks < BK; ks += 8) {
        unsigned a[2][4], b[NI][2];
        ldsm_x4(a[0], a_row0, a_off + ks);
        ldsm_x4(a[1], a_row1, a_off + ks);
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) lds_u2(b[ni], b_pair, b_stage + ni * 8 * LDB + ks);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) mma_tf32_16x8x8(acc[mi][ni], a[mi], b[ni]);
    }
}

// The lane's addresses for tc_tile_mma_v3 in stage 0 of As and Bs: the row it supplies to
// ldsm_x4 (row lane & 7 of matrix lane / 8 of its warp's first A fragment) and its B pair
// (row wn·32 + g, words 2t and 2t + 1).
template <int LDA, int LDB>
static __device__ __forceinline__ void tc_v3_lane_addrs(const unsigned (*As)[LDA], const unsigned (*Bs)[LDB],
                                                        int wm, int wn, int lane, SmemAddr& a_row,
                                                        SmemAddr& b_pair) {
    a_row = smem_addr(&As[wm * 32 + (lane & 7) + (lane & 8)][(lane >> 4) << 2]);
    b_pair = smem_addr(&Bs[wn * 32 + (lane >> 2)][2 * (lane & 3)]);
}

// The activation passes' epilogue for one output o of column nn: accumulate 1: *o += v;
// 0: *o = relu?(v + bias[nn]); 2: *o = relu?(v) (bias is not read unless accumulate is 0).
static __device__ __forceinline__ void tc_epilogue(float* o, float v, const float* __restrict__ bias, int nn,
                                                   int relu, int accumulate) {
    if (accumulate == 1) {
        *o += v;
        return;
    }
    if (accumulate == 0) v += bias[nn];
    if (relu && v < 0.0f) v = 0.0f;
    *o = v;
}

// tc_epilogue for the columns nn and nn + 1 (nn even, both < n, o 8-byte aligned): one 8-byte
// access instead of two 4-byte ones.
static __device__ __forceinline__ void tc_epilogue_pair(float* o, float v0, float v1,
                                                        const float* __restrict__ bias, int nn, int relu,
                                                        int accumulate) {
#ifdef CUEMU
    cuemu_check_align8(o);
#endif
    float2* o2 = (float2*)o;
    if (accumulate == 1) {
        const float2 was = *o2;
        *o2 = make_float2(was.x + v0, was.y + v1);
        return;
    }
    if (accumulate == 0) {
        v0 += bias[nn];
        v1 += bias[nn + 1];
    }
    if (relu && v0 < 0.0f) v0 = 0.0f;  // (as tc_epilogue: a NaN stays NaN)
    if (relu && v1 < 0.0f) v1 = 0.0f;
    *o2 = make_float2(v0, v1);
}

// The warp's MI × NI accumulator tiles, zeroed.
template <int MI, int NI>
static __device__ __forceinline__ void zero_acc(float (&acc)[MI][NI][4]) {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0.0f;
}

// GEMM column kk (tap-major, channel fastest) as channel c of tap (ky, kx).
static __device__ __forceinline__ void split_k(int kk, int cs, int k, int& c, int& ky, int& kx) {
    c = kk % cs;
    const int tap = kk / cs;
    ky = tap / k;
    kx = tap % k;
}

// The epilogue of the weight-gradient partials: out[ii][nn] (R × N) = the warp's accumulators,
// whose 32 × 32 tile starts at row r0 and column c0 (fragment layout of mma_tf32_16x8x8).
// ROWS_PAIRED: the mma's rows g and g + 8 are the tile's rows 2g and 2g + 1 (tc_tile_mma_t).
template <bool ROWS_PAIRED>
static __device__ __forceinline__ void store_dw_partial(const float acc[2][4][4], float* __restrict__ out, int R,
                                                        int N, int r0, int c0, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int ii = r0 + mi * 16 + (ROWS_PAIRED ? 2 * g + (r >= 2) : g + (r >= 2 ? 8 : 0));
                const int nn = c0 + ni * 8 + 2 * t + (r & 1);
                if (ii < R && nn < N) out[ii * N + nn] = acc[mi][ni][r];
            }
}

// The GEMM of the four activation passes: M = batch·hp·wp output positions, N = n channels,
// K = k·k·cs (tap-major, channel fastest).
struct ConvGemm {
    int batch;
    int hp, wp;      // the output grid (one GEMM row per position)
    int hs, ws, cs;  // the gathered source [batch, hs, ws, cs]
    int n;           // output channels
    int k, stride, pad;
    int w_nc;        // 1: weights W[n][c][ky][kx]; 0: W[c][n][ky][kx]
};

// A phase of an activation pass's gather (versions 5 and 7, conv_tc_v5.cuh and conv_wgmma.cu):
// its taps (ky0 + STRIDE·a, kx0 + STRIDE·b) for a < ny, b < nx, and its halo's first pixel
// (sy0, sx0) for the output tile at (oy0, ox0) (of the phase's source rows 2u + qy for the
// direct gather at stride 2). Tap (a, b) reads the halo at (a, b), or at (ny − 1 − a, nx − 1 − b)
// for the adjoint gather.
// - Stride 1: one phase, every tap; the adjoint gather is the direct one mirrored, its origin
//   K − 1 − pad before the tile's.
// - Stride 2, adjoint (a transposed convolution's forward): output phase (oqy, oqx), its taps
//   ky ≡ oqy + pad (mod 2); output (2i + oqy, ·) reads source row i + (oqy + pad − ky)/2, from
//   the smallest offset (oqy + pad − ky_last)/2.
// - Stride 2, direct (a transposed convolution's dx, a strided one's forward): source phase
//   ph = 2·qy + qx of the four the block runs in turn, its taps ky ≡ qy + pad (mod 2); output i
//   reads u = i + a + (ky0 − pad − qy)/2.
struct ConvPhase {
    int qy, qx, ky0, kx0, ny, nx, sy0, sx0;
};
template <bool ADJOINT, int K, int STRIDE>
static __device__ __forceinline__ ConvPhase conv_phase(const ConvGemm& p, int ph, int oy0, int ox0, int oqy,
                                                       int oqx) {
    constexpr bool ADJ_S2 = STRIDE == 2 && ADJOINT, DIR_S2 = STRIDE == 2 && !ADJOINT;
    ConvPhase f;
    f.qy = ADJ_S2 ? oqy : DIR_S2 ? ph >> 1 : 0;
    f.qx = ADJ_S2 ? oqx : DIR_S2 ? ph & 1 : 0;
    f.ky0 = STRIDE == 2 ? (f.qy + p.pad) & 1 : 0;
    f.kx0 = STRIDE == 2 ? (f.qx + p.pad) & 1 : 0;
    f.ny = (K - f.ky0 + STRIDE - 1) / STRIDE;
    f.nx = (K - f.kx0 + STRIDE - 1) / STRIDE;
    if (ADJ_S2) {
        f.sy0 = oy0 + (f.qy + p.pad - f.ky0 - 2 * (f.ny - 1)) / 2;
        f.sx0 = ox0 + (f.qx + p.pad - f.kx0 - 2 * (f.nx - 1)) / 2;
    } else if (DIR_S2) {
        f.sy0 = oy0 + (f.ky0 - p.pad - f.qy) / 2;
        f.sx0 = ox0 + (f.kx0 - p.pad - f.qx) / 2;
    } else {
        f.sy0 = oy0 - (ADJOINT ? K - 1 - p.pad : p.pad);
        f.sx0 = ox0 - (ADJOINT ? K - 1 - p.pad : p.pad);
    }
    return f;
}

// The weight-gradient GEMM: rows i < rows (dW's first index), columns kk < k·k·cs (tap-major,
// channel fastest), reduction over the positions m of a batch × hp × wp grid:
//   A(i, m) = a_src[m·rows + i],  B(m, kk) = direct gather of b_src [batch, hs, ws, cs].
struct ConvDwGemm {
    int rows;
    int batch, hp, wp;  // the reduction grid
    int hs, ws, cs;     // b_src's shape
    int k, stride, pad;
    int chunk;          // positions per blockIdx.z (a multiple of TC_BK)
};

// The units of positions of the weight-gradient partials (versions 4, 5 and the wgmma one): the
// next unit, the next segment of the grid row, then of the next row.
static __device__ __forceinline__ void dw4_unit_next(const ConvDwGemm& p, int segs, int& n, int& py, int& seg) {
    if (++seg == segs) {
        seg = 0;
        if (++py == p.hp) {
            py = 0;
            ++n;
        }
    }
}

// Unit u (U positions of one grid row; segs of them per row) as (n, py, seg).
static __device__ __forceinline__ void dw4_unit_at(const ConvDwGemm& p, int segs, int u, int& n, int& py,
                                                   int& seg) {
    seg = u % segs;
    py = (u / segs) % p.hp;
    n = u / (segs * p.hp);
}

static __device__ __forceinline__ float4 add4(float4 a, float4 b) {
    return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}

// v with the components zeroed where the ReLU output mk is not positive (relu_masked's rule;
// relu_masked does not call this: written so, ptxas 13.0 gave the v3 and v4 weight-gradient
// loops 16 more IMAD, 371 → 387 instructions per 40 HMMA for v4k5s1).
static __device__ __forceinline__ float4 mask_by(float4 v, float4 mk) {
    if (!(mk.x > 0.0f)) v.x = 0.0f;
    if (!(mk.y > 0.0f)) v.y = 0.0f;
    if (!(mk.z > 0.0f)) v.z = 0.0f;
    if (!(mk.w > 0.0f)) v.w = 0.0f;
    return v;
}
// Version 3 tiles: 8 warps of 32 × 32 (as in v2), WN of them side by side along the channels.
// WN = 2: 128 output rows × 64 channels; every block reads the whole permuted weight matrix from
// L2 (410 KB for a 64-channel 5×5 layer), so twice v2's rows per block halves that traffic, the
// largest of the pass. WN = 1: 256 rows × 32 channels, for layers of at most 32 channels (the
// small models), which would leave half of a 64-wide tile's tensor-core work on zero columns.
#define V3_THREADS 256

// v with the lanes zeroed where the mask (y of a ReLU layer) is not positive: dy through the
// ReLU, as v2 applies it element by element.
static __device__ __forceinline__ float4 relu_masked(float4 v, const float* mask) {
    const float4 mk = ld_f4(mask);
    if (!(mk.x > 0.0f)) v.x = 0.0f;
    if (!(mk.y > 0.0f)) v.y = 0.0f;
    if (!(mk.z > 0.0f)) v.z = 0.0f;
    if (!(mk.w > 0.0f)) v.w = 0.0f;
    return v;
}

static __device__ __forceinline__ uint4 tf32x4(float4 v) {
    return make_uint4(to_tf32(v.x), to_tf32(v.y), to_tf32(v.z), to_tf32(v.w));
}

// Version 5's output tile for 64 channels (conv_tc_v5.cuh), also c4's and its weight
// gradient's (conv_tc.cu).
#define V5_TH 8   // output tile rows (NT 64)
#define V5_TW 16  // output tile columns (NT 64)
