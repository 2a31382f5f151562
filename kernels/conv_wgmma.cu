// conv_wgmma.cu: version 7 of the activation passes, on Hopper's warpgroup MMA (wgmma.cuh; sm_90a
// only): the 5×5 passes of 64 gathered channels into 64 outputs at stride 1, clevr6's largest
// (version 6 there: 51 % of the mma.sync peak, its shared-memory pipe 61 % busy with 6 KB of
// fragment loads per 64 KFLOP).
//
// The GEMM transposed: D^T (64 output channels × 128 pixels) = W_tap (64 × 64 channels) ·
// X_tapᵀ, summed over the taps, one wgmma m64n128k8 per tap and 8 channels. A = the
// weights, in registers, each warp's 16 output channels loaded straight from global memory (L2)
// one tap ahead; B = the block's 16 × 8 output pixels at the tap's offset in the halo, read by
// the tensor cores from shared memory. Per 64 KFLOP the shared memory serves 2 KB (the pixels'
// 8 channels), and the loop has no barrier: the halo is staged once, then 200 wgmma run with
// the weights' loads in flight beside them.
//
// The halo, (16 + 4) × (8 + 4) pixels, is stored as 16 planes of 4 channels (wgmma.cuh's
// K-major core matrices: 8 consecutive pixels of a halo row × 16 bytes): the k8 step s takes
// channels 8s..8s+3 from plane s (k = 0..3) and 8s+4..8s+7 from plane 8 + s (k = 4..7). The
// weights come as conv_w_nk_tf32 permutes them for mma.sync's B pairs (each 8 channels as
// k0 k4 k1 k5 …), so a thread's A registers for k = q and q + 4 of a weight row are one
// 8-byte load. Tile row i of the output is the wgmma's N rows
// 8i..8i+7 (a halo row, SBO = 12 pixels · 16 bytes); the two K halves are LBO = 8 planes apart.
// Planes are a number of pixels ≡ 1 mod 8 apart (≡ 16 bytes mod 128), so that the 8 threads
// storing one pixel's octets hit 8 different bank groups.
//
// Stride 2, by phases as version 5's `v5s2`, each of 3 × 3, 3 × 2, 2 × 3 or 2 × 2 of the 25 taps
// from a halo of the source at the phase's resolution, (16 + 2) × (8 + 2) pixels. The adjoint
// gather (a stride-2 transposed convolution's forward: the CLEVR decoder's upsampling layers)
// takes one output phase (oy mod 2, ox mod 2) per blockIdx.z; the direct one (their dx) runs
// the four source phases in turn into the same accumulators, the halo staged again for each
// once the last one's products have completed.
//
// Below them, the 5×5 weight gradients in units of 32 on wgmma (`dw_wgmma`, at the end of the
// file).
#include "conv_tc.cuh"
#include "wgmma.cuh"

#define WG_THREADS 128
#define WG_TH 16  // output tile rows (of the phase, at stride 2): N = 16 × 8 pixels
#define WG_TW 8   // output tile columns: one wgmma row group

// The halo of a stride-STRIDE pass: rows, columns (its pitch: SBO = 16 bytes per column), and
// the words of a plane (pixels ≡ 1 mod 8).
template <int STRIDE>
struct WgHalo {
    static constexpr int KH = STRIDE == 1 ? 5 : 3;  // the most taps per axis (of a phase)
    static constexpr int ROWS = WG_TH + KH - 1, COLS = WG_TW + KH - 1;
    static constexpr int PLANE = ((ROWS * COLS + 7) / 8 * 8 + 1) * 4;
    static constexpr int BYTES = 16 * 4 * PLANE;
};

// grid (batch · ⌈gh/16⌉ · ⌈gw/8⌉, 1, z), block WG_THREADS, dynamic shared memory
// WgHalo<STRIDE>::BYTES; (gh, gw, z) = (⌈hp/2⌉, ⌈wp/2⌉, 4) for the adjoint gather at stride 2,
// (hp, wp, 1) otherwise; p.cs == 64, p.n == 64, p.k == 5, p.stride == STRIDE. Arguments as
// conv_igemm_v5 (th and tw: 16 and 8).
template <bool ADJOINT, int STRIDE>
static __device__ void conv_igemm_wg(const ConvGemm& p, const float* __restrict__ src,
                                     const float* __restrict__ mask_y, int masked, const unsigned* __restrict__ wt,
                                     const float* __restrict__ bias, int relu, int accumulate,
                                     float* __restrict__ out) {
    constexpr int K = 5, KK = K * K, CS = 64, KDIM = KK * CS;
    constexpr bool ADJ_S2 = STRIDE == 2 && ADJOINT, DIR_S2 = STRIDE == 2 && !ADJOINT;
    using H = WgHalo<STRIDE>;
    extern __shared__ uint4 wg_smem[];
    unsigned* halo = (unsigned*)wg_smem;
    const int tid = threadIdx.x, w = tid / 32, g = tid % 32 / 4, q = tid % 4;
    // The tiles cover the output grid, or for the adjoint gather at stride 2 output phase
    // (0, 0)'s, the largest.
    const int gh = ADJ_S2 ? (p.hp + 1) / 2 : p.hp, gw = ADJ_S2 ? (p.wp + 1) / 2 : p.wp;
    const int tiles_x = (gw + WG_TW - 1) / WG_TW, tiles_y = (gh + WG_TH - 1) / WG_TH;
    const int img = blockIdx.x / (tiles_x * tiles_y), tile = blockIdx.x % (tiles_x * tiles_y);
    const int oy0 = (tile / tiles_x) * WG_TH, ox0 = (tile % tiles_x) * WG_TW;
    // A phase of the gather (conv_tc.cuh's conv_phase): the adjoint gather at stride 2 takes
    // output phase blockIdx.z; the direct one runs the four source phases in turn, into the same
    // accumulators.
    using Phase = ConvPhase;
    const int oqy = ADJ_S2 ? (int)blockIdx.z >> 1 : 0, oqx = ADJ_S2 ? (int)blockIdx.z & 1 : 0;
    auto phase = [&](int ph) { return conv_phase<ADJOINT, K, STRIDE>(p, ph, oy0, ox0, oqy, oqx); };
    // The halo of phase f: pixel e / 8, channel octet e % 8 (of the phase's source rows
    // 2u + qy for the direct gather at stride 2); zero outside the image, through the ReLU
    // mask for a gradient, rounded to TF32; its first 4 channels to plane o, the others to
    // plane 8 + o.
    const size_t img_base = (size_t)img * p.hs * p.ws;
    auto stage_halo = [&](const Phase& f) {
#pragma unroll 4
        for (int e = tid; e < H::ROWS * H::COLS * 8; e += WG_THREADS) {
            const int px = e / 8, o = e % 8;
            const int sy = DIR_S2 ? 2 * (f.sy0 + px / H::COLS) + f.qy : f.sy0 + px / H::COLS;
            const int sx = DIR_S2 ? 2 * (f.sx0 + px % H::COLS) + f.qx : f.sx0 + px % H::COLS;
            float4 lo = make_float4(0.0f, 0.0f, 0.0f, 0.0f), hi = lo;
            if ((unsigned)sy < (unsigned)p.hs && (unsigned)sx < (unsigned)p.ws) {
                const size_t idx = (img_base + (size_t)sy * p.ws + sx) * CS + 8 * o;
                lo = ld_f4(src + idx);
                hi = ld_f4(src + idx + 4);
                if (masked) {
                    lo = relu_masked(lo, mask_y + idx);
                    hi = relu_masked(hi, mask_y + idx + 4);
                }
            }
            *(uint4*)&halo[o * H::PLANE + 4 * px] = tf32x4(lo);
            *(uint4*)&halo[(8 + o) * H::PLANE + 4 * px] = tf32x4(hi);
        }
        fence_proxy_async();
        __syncthreads();
    };
    // This thread's weight rows (output channels m0 and m0 + 8) at channels q and q + 4 of each
    // octet: tap t, step s: a = {W[m0][8s+q], W[m0+8][8s+q], W[m0][8s+q+4], W[m0+8][8s+q+4]},
    // words 2q and 2q + 1 of the octet in wt (pre-rounded TF32, [n][tap][c] with each octet
    // ordered c0 c4 c1 c5 c2 c6 c3 c7).
    const int m0 = 16 * w + g;
    const unsigned* w0 = wt + (size_t)m0 * KDIM + 2 * q;
    const unsigned* w1 = w0 + 8 * KDIM;
    auto load_a = [&](unsigned (&a)[8][4], int t) {
#pragma unroll
        for (int s = 0; s < 8; ++s) {
            const uint2 u0 = ld_u2(w0 + t * CS + 8 * s), u1 = ld_u2(w1 + t * CS + 8 * s);
            a[s][0] = u0.x;
            a[s][2] = u0.y;
            a[s][1] = u1.x;
            a[s][3] = u1.y;
        }
    };
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    // Phase f's tap t < ny·nx, (a, b) = (t / nx, t % nx): the weights' tap, and its 8 products as
    // one commit group with B from the halo at the tap's offset.
    auto weight_tap = [&](const Phase& f, int t) {
        return (f.ky0 + STRIDE * (t / f.nx)) * K + f.kx0 + STRIDE * (t % f.nx);
    };
    auto run_tap = [&](const Phase& f, const unsigned (&a)[8][4], int t) {
        const int ta = t / f.nx, tb = t % f.nx;
        const int ty = ADJOINT ? f.ny - 1 - ta : ta, tx = ADJOINT ? f.nx - 1 - tb : tb;
        const unsigned* base = halo + 4 * (ty * H::COLS + tx);
        wgmma_fence();
#pragma unroll
        for (int s = 0; s < 8; ++s)
            wgmma_m64n128k8_rs(acc, a[s], wgmma_desc(base + s * H::PLANE, 8 * H::PLANE * 4, H::COLS * 16), 1);
        wgmma_commit();
    };
    // Two register sets of weights, by the tap's parity: tap t + 1's load is issued once tap
    // t − 1's group (which read the same registers) has completed, while tap t's runs. A new
    // phase's halo is staged once every product of the last one has completed (wait_group 0)
    // and every thread is past it.
    unsigned a0[8][4], a1[8][4];
    for (int ph = 0; ph < (DIR_S2 ? 4 : 1); ++ph) {
        const Phase f = phase(ph);
        if (ph > 0) {
            wgmma_wait<0>();
            __syncthreads();
        }
        stage_halo(f);
        const int taps = f.ny * f.nx;
        load_a(a0, weight_tap(f, 0));
        for (int t = 0; t < taps; t += 2) {
            run_tap(f, a0, t);
            wgmma_wait<1>();
            if (t + 1 < taps) {
                load_a(a1, weight_tap(f, t + 1));
                run_tap(f, a1, t + 1);
                wgmma_wait<1>();
                if (t + 2 < taps) load_a(a0, weight_tap(f, t + 2));
            }
        }
    }
    wgmma_wait<0>();
    // acc[4j + c] = D^T[m0][8j + 2q + c], acc[4j + 2 + c] = D^T[m0 + 8][8j + 2q + c]: tile
    // position (j, 2q + c), output pixel (oy0 + j, ox0 + 2q + c) (the adjoint gather at stride
    // 2: of its output phase).
#pragma unroll
    for (int j = 0; j < WG_TH; ++j) {
        const int oy = ADJ_S2 ? 2 * (oy0 + j) + oqy : oy0 + j;
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            const int ox = ADJ_S2 ? 2 * (ox0 + 2 * q + c) + oqx : ox0 + 2 * q + c;
            if (oy >= p.hp || ox >= p.wp) continue;
            const size_t m = ((size_t)img * p.hp + oy) * p.wp + ox;
            tc_epilogue(&out[m * 64 + m0], acc[4 * j + c], bias, m0, relu, accumulate);
            tc_epilogue(&out[m * 64 + m0 + 8], acc[4 * j + 2 + c], bias, m0 + 8, relu, accumulate);
        }
    }
}

// Three blocks per SM (62 KB of shared memory each at stride 1, 46 KB at stride 2), at most 168
// registers per thread.
#define WG_ENTRY(NAME, ADJ, STRIDE)                                                                          \
    extern "C" __global__ void __launch_bounds__(WG_THREADS, 3)                                            \
        NAME(ConvGemm p, int th, int tw, const float* __restrict__ src, const float* __restrict__ mask_y,   \
             int masked, const unsigned* __restrict__ wt, const float* __restrict__ bias, int relu,          \
             int accumulate, float* __restrict__ out) {                                                     \
        conv_igemm_wg<ADJ, STRIDE>(p, src, mask_y, masked, wt, bias, relu, accumulate, out);                 \
    }
WG_ENTRY(conv_igemm_direct_wg5_tf32, false, 1)
WG_ENTRY(conv_igemm_adjoint_wg5_tf32, true, 1)
WG_ENTRY(conv_igemm_adjoint_wg5s2_tf32, true, 2)
WG_ENTRY(conv_igemm_direct_wg5s2_tf32, false, 2)

// ---- The weight gradients on wgmma: `conv_dw_partial_wg5s{1,2}{,t}_tf32` (fast path `dw_wgmma`) ----
// Version 5 of the weight-gradient partials (`v5k5s1`, conv_tc.cu) takes clevr6's 5×5 stride-1
// weight gradients at ~42 % of the mma.sync peak: each warp loads its A fragments and B words
// from shared memory for every mma (2.4–2.6 wavefronts per mma). The same blocks (64 rows × one
// row ky of 5 taps × 32 channels), units (32 positions of a grid row) and chunks, with the GEMM
// on wgmma: per unit 4 products m64n160k8, N = the 5 taps kx × 32 channels.
// - A (64 rows × the unit's positions) from registers, straight from global memory (L1/L2):
//   thread (w, g, q) holds rows ra = i0 + 16w + 2g and ra + 1 (the fragment's rows 16w + g and
//   16w + g + 8: the GEMM's rows permuted so that each thread's two are adjacent, one 8-byte
//   load) at positions 8q..8q + 7 of the unit. The k8 step t's k = q and q + 4 are positions
//   2t + 8q and 2t + 1 + 8q: the GEMM's positions permuted so that a thread's are consecutive.
// - B (the taps' source pixels) from shared memory: the unit's strip of 32 + 4 pixels, staged
//   as rows j < 12 of 4 pixels j, j + 8, j + 16, j + 24 (K-major core matrices: 8 channels ×
//   those 4 pixels, 16 bytes each). Step t's k = m (m < 4) and 4 + m are pixels 2t + 8m and
//   2t + 1 + 8m, rows 2t and 2t + 1; tap kx's pixel is kx further, row 2t + kx + (k ≥ 4). So
//   one descriptor covers the 5 taps: N row (kx, c) at row 2t + kx, octet c / 8, with the
//   channel octets SBO = 144 bytes apart (128 + 16: the staging stores conflict-free) and the
//   rows LBO = 4 · SBO apart, which is also the K step's second half. Rows 8..11 repeat rows 0..3
//   one pixel group on (a tap's shift past row 7 would otherwise move the pixel group within a
//   16-byte core matrix row): 1.5 × the strip's 4.6 KB per unit.
// - Stride 2 (`wg5s2`: the CLEVR decoder's upsampling layers' weight gradients, version 4's
//   `v4k5s2u32`): pixel 2P + kx for position P, so rows j < 19 of pixels j, j + 16, j + 32,
//   j + 48: step t's halves are rows 4t and 4t + 2 (LBO = 2 rows), tap kx still row + kx.
//   Generally rows j < 7S + 5 of pixels j + 8S·m, step t at row 2S·t, LBO S rows.
// - Per unit: 4 wgmma (327 KFMA) read 20 KB of B; the strip's staging stores 6 KB (stride 2:
//   9.5 KB); no fragment loads (version 5: 80 mma per warp, ~2 KB of fragment loads per
//   mma·warp-k-step).
// - Three strip stages: unit u + 1's strip is stored while unit u's products run, into the
//   stage unit u − 2 read, which every warp retired (wgmma_wait<1> in the last unit) before the
//   last barrier: one barrier per unit. The A registers: two sets, unit u + 1's loaded once
//   wgmma_wait<1> has retired unit u − 1's products (which read that set).
// CONVT: the transposed convolution's form (A = x, unmasked, B = g through its ReLU mask, the
// sums of B for db: sums_of 0 or 2); otherwise the convolution's (A = dy through its mask, B = x
// unmasked, the sums of A: sums_of 0 or 1). The partials, the sums and their layout are version
// 4's: partial[z][i][(ky·5 + kx)·cs + c], sums as conv_dw_partial_v4 writes them.
#define DWG_THREADS 128
#define DWG_U 32                    // positions per unit
#define DWG_SBO 144                 // bytes between a strip row's channel octets
#define DWG_ROW (4 * DWG_SBO)       // bytes between strip rows (32 channels)
#define DWG_ROWS(S) (7 * (S) + 5)   // strip rows j (pixels j + 8S·m, m < 4): 12 or 19
#define DWG_STAGE(S) (DWG_ROWS(S) * DWG_ROW)  // bytes of a strip stage: 6912 or 10 944
#define DWG_STAGES 3
template <bool CONVT, int S>
static __device__ void conv_dw_partial_wg(const ConvDwGemm& p, const float* __restrict__ a_src,
                                          const float* __restrict__ a_mask, int a_masked,
                                          const float* __restrict__ b_src, const float* __restrict__ b_mask,
                                          int b_masked, float* __restrict__ partial, int sums_of, unsigned sum_kys,
                                          float* __restrict__ sums) {
    constexpr int K = 5, U = DWG_U;
    extern __shared__ uint4 dwg_smem[];
    unsigned* const stages = (unsigned*)dwg_smem;  // [DWG_STAGES][DWG_STAGE(S) / 4]
    const int tid = threadIdx.x, w = tid / 32, g = tid % 32 / 4, q = tid % 4;
    const int N = K * K * p.cs;
    const int cblocks = p.cs / 32;
    const int ky = blockIdx.y / cblocks, cb = 32 * (blockIdx.y % cblocks);
    const int i0 = 64 * blockIdx.x, ra = i0 + 16 * w + 2 * g;
    const int segs = (p.wp + U - 1) / U, units = p.batch * p.hp * segs;
    const int ubeg = blockIdx.z * p.chunk, uend = min(ubeg + p.chunk, units);
    const int ntiles = max(uend - ubeg, 0);
    const bool mask_a = !CONVT && a_masked, mask_b = CONVT && b_masked;
    // (The sums' blocks; a block without units writes zeros.)
    const bool sum_a = !CONVT && sums_of == 1 && blockIdx.y == 0;
    const bool sum_b = CONVT && sums_of == 2 && blockIdx.x == 0 && ((sum_kys >> ky) & 1u);
    const bool add_a = sum_a && ntiles > 0, add_b = sum_b && ntiles > 0;
    // The unit in flight, as (n, py, seg).
    int ln, lpy, lseg;
    dw4_unit_at(p, segs, min(ubeg, max(units - 1, 0)), ln, lpy, lseg);
    // The A registers of a unit: a[t] = {A[ra][p0], A[ra + 1][p0], A[ra][p1], A[ra + 1][p1]} with
    // p0 = 8q + 2t, p1 = p0 + 1 (zero past the grid row), through the mask, added to the sums (f32,
    // as loaded), rounded to TF32.
    float2 osum_a = make_float2(0.0f, 0.0f);
    const int rows = p.rows;
    auto load_a = [&](unsigned (&a)[4][4]) {
        const int left = p.wp - U * lseg - 8 * q;
        // (One 64-bit offset per unit; the positions' are 32-bit multiples of rows.)
        const size_t base = (size_t)((ln * p.hp + lpy) * p.wp + U * lseg + 8 * q) * rows + ra;
        const unsigned* ap = (const unsigned*)a_src + base;
        const unsigned* mp = (const unsigned*)a_mask + base;
#pragma unroll
        for (int e = 0; e < 8; ++e, ap += rows, mp += rows) {
            float2 v = make_float2(0.0f, 0.0f);
            if (e < left) {
                const uint2 u = ld_u2(ap);
                v = make_float2(__uint_as_float(u.x), __uint_as_float(u.y));
                if (mask_a) {
                    const uint2 mk = ld_u2(mp);
                    if (!(__uint_as_float(mk.x) > 0.0f)) v.x = 0.0f;
                    if (!(__uint_as_float(mk.y) > 0.0f)) v.y = 0.0f;
                }
            }
            if (add_a) {
                osum_a.x += v.x;
                osum_a.y += v.y;
            }
            a[e / 2][2 * (e & 1)] = to_tf32(v.x);
            a[e / 2][2 * (e & 1) + 1] = to_tf32(v.y);
        }
    };
    // The strip of a unit into stage st: thread (j, cq) = (e / 8, e % 8) for e = tid (and e =
    // tid + 128 at stride 2, rows 16..18), j < 7S + 5, loads channels cb + 4cq.. of pixels
    // j + 8S·m (source column 32S·seg − pad + j + 8S·m; zero outside the source), masks them,
    // sums those it owns and stores channel 4cq + r's four pixels as one 16-byte core-matrix
    // row. The sums count pixel j + 8S·m of [own, own + 32S) (own = min(pad, 5 − S), as version
    // 4's) once: from rows j < 8S, and from the rows past them only at m = 3.
    float4 osum_b = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const int cq = tid % 8;
    const int own = min(p.pad, K - S);
    auto stage_strip = [&](int st) {
        // (Stride 1: one row per thread; stride 2: a second for 24 threads. Not unrolled, the
        // loop kept 8 bytes on the stack at stride 2.)
#pragma unroll
        for (int r = 0; r < (DWG_ROWS(S) + 15) / 16; ++r) {
            const int sj = tid / 8 + 16 * r;
            if (sj >= DWG_ROWS(S)) break;
            const int sy = lpy * S - p.pad + ky, sx0 = U * S * lseg - p.pad + sj;
            const bool row_ok = (unsigned)sy < (unsigned)p.hs;
            // (One 64-bit offset per unit, of pixel sx0 (which may lie outside the row: only the
            // pixels inside are read); the pixels' are 32-bit multiples of 8S · cs.)
            const long long base = (((long long)ln * p.hs + sy) * p.ws + sx0) * p.cs + cb + 4 * cq;
            const float* bp = b_src + base;
            const float* mp = b_mask + base;
            const int step = 8 * S * p.cs;
            float4 v[4];
#pragma unroll
            for (int m = 0; m < 4; ++m, bp += step, mp += step) {
                const int px = sj + 8 * S * m;
                v[m] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                if (row_ok && (unsigned)(sx0 + 8 * S * m) < (unsigned)p.ws) {
                    v[m] = ld_f4(bp);
                    if (mask_b) v[m] = relu_masked(v[m], mp);
                }
                if (add_b && px >= own && px < own + U * S && (sj < 8 * S || m == 3))
                    osum_b = add4(osum_b, v[m]);
            }
            unsigned char* row = (unsigned char*)stages + st * DWG_STAGE(S) + sj * DWG_ROW +
                                 (cq / 2) * DWG_SBO + (cq % 2) * 64;
            *(uint4*)(row + 0) = make_uint4(to_tf32(v[0].x), to_tf32(v[1].x), to_tf32(v[2].x), to_tf32(v[3].x));
            *(uint4*)(row + 16) = make_uint4(to_tf32(v[0].y), to_tf32(v[1].y), to_tf32(v[2].y), to_tf32(v[3].y));
            *(uint4*)(row + 32) = make_uint4(to_tf32(v[0].z), to_tf32(v[1].z), to_tf32(v[2].z), to_tf32(v[3].z));
            *(uint4*)(row + 48) = make_uint4(to_tf32(v[0].w), to_tf32(v[1].w), to_tf32(v[2].w), to_tf32(v[3].w));
        }
    };
    float acc[80];
#pragma unroll
    for (int e = 0; e < 80; ++e) acc[e] = 0.0f;
    // Unit u's products, one commit group: step t's B at strip row 2S·t, its second half S rows
    // on.
    // (The descriptors: stage 0's, plus the start's offset in 16-byte units.)
    const WgmmaDesc desc0 = wgmma_desc(stages, S * DWG_ROW, DWG_SBO);
    auto run_unit = [&](const unsigned (&a)[4][4], int st) {
        wgmma_fence();
#pragma unroll
        for (int t = 0; t < 4; ++t)
            wgmma_m64n160k8_rs(acc, a[t], desc0 + (st * DWG_STAGE(S) + 2 * S * t * DWG_ROW) / 16, 1);
        wgmma_commit();
    };
    // The next unit's A registers into a and its strip into stage st.
    auto next_unit = [&](unsigned (&a)[4][4], int st) {
        dw4_unit_next(p, segs, ln, lpy, lseg);
        load_a(a);
        stage_strip(st);
        fence_proxy_async();
    };
    // The first unit, loaded even by a block without units (the unit clamped into the grid, its
    // values summed by no one): with the loads under `ntiles > 0`, ptxas 13.0 serialized every
    // wgmma of the kernel (C7515: "non wgmma instructions defining accumulator registers").
    unsigned a0[4][4], a1[4][4];
    load_a(a0);
    stage_strip(0);
    fence_proxy_async();
    __syncthreads();
    // Units in pairs, so that each register set is named by a constant (the sets by the unit's
    // parity, the strip stages by u % 3).
    for (int tt = 0; tt < ntiles; tt += 2) {
        run_unit(a0, tt % DWG_STAGES);
        wgmma_wait<1>();
        if (tt + 1 < ntiles) next_unit(a1, (tt + 1) % DWG_STAGES);
        __syncthreads();
        if (tt + 1 < ntiles) {
            run_unit(a1, (tt + 1) % DWG_STAGES);
            wgmma_wait<1>();
            if (tt + 2 < ntiles) next_unit(a0, (tt + 2) % DWG_STAGES);
            __syncthreads();
        }
    }
    wgmma_wait<0>();
    // acc[4J + c] = D[16w + g][8J + 2q + c] (row ra), acc[4J + 2 + c] = D[16w + g + 8][…] (row
    // ra + 1); column 8J + 2q + c is tap kx = J / 4, channel cb + 8·(J % 4) + 2q + c.
    float* out = partial + (size_t)blockIdx.z * p.rows * N;
#pragma unroll
    for (int J = 0; J < 20; ++J) {
        const int col = (ky * K + J / 4) * p.cs + cb + 8 * (J % 4) + 2 * q;
        *(float2*)&out[(size_t)ra * N + col] = make_float2(acc[4 * J], acc[4 * J + 1]);
        *(float2*)&out[(size_t)(ra + 1) * N + col] = make_float2(acc[4 * J + 2], acc[4 * J + 3]);
    }
    // The operand sums in a fixed order: A's rows over the q lanes (lane q = 0 holds rows ra and
    // ra + 1); B's channels over the strip rows, within each warp by shuffles, then the warps'
    // through the (no longer read) first stage.
    if (sum_a) {  // (uniform over the block)
#pragma unroll
        for (int o = 1; o < 4; o *= 2) {
            osum_a.x += __shfl_xor_sync(0xffffffffu, osum_a.x, o);
            osum_a.y += __shfl_xor_sync(0xffffffffu, osum_a.y, o);
        }
        if (q == 0) *(float2*)&sums[(size_t)blockIdx.z * p.rows + ra] = osum_a;
    }
    if (sum_b) {  // (uniform over the block)
        float* red = (float*)stages;  // [4 warps][32 channels]
#pragma unroll
        for (int o = 8; o < 32; o *= 2) {
            osum_b.x += __shfl_xor_sync(0xffffffffu, osum_b.x, o);
            osum_b.y += __shfl_xor_sync(0xffffffffu, osum_b.y, o);
            osum_b.z += __shfl_xor_sync(0xffffffffu, osum_b.z, o);
            osum_b.w += __shfl_xor_sync(0xffffffffu, osum_b.w, o);
        }
        __syncthreads();  // (every warp's products have completed: the stages are free)
        if (tid % 32 < 8) *(float4*)&red[w * 32 + 4 * cq] = osum_b;
        __syncthreads();
        if (tid < 32)
            sums[(size_t)blockIdx.z * N + (ky * K) * p.cs + cb + tid] =
                red[tid] + red[32 + tid] + red[64 + tid] + red[96 + tid];
    }
}

// grid (rows / 64, 5 · cs / 32, chunks of p.chunk units of 32 positions), block DWG_THREADS,
// dynamic shared memory DWG_STAGES · DWG_STAGE(S) (20 736 bytes at stride 1, 32 832 at stride
// 2); rows % 64 == 0, cs % 32 == 0, k = 5, p.stride == S, grid rows a multiple of 32 wide (as
// version 4's units of 32). `…t`: the transposed convolution's form (a_masked 0), the other
// the convolution's (b_masked 0). Three blocks per SM, at most 168 registers.
#define DWG_ENTRY(NAME, CONVT, S)                                                                            \
    extern "C" __global__ void __launch_bounds__(DWG_THREADS, 3)                                            \
        NAME(ConvDwGemm p, const float* __restrict__ a_src, const float* __restrict__ a_mask, int a_masked,    \
             const float* __restrict__ b_src, const float* __restrict__ b_mask, int b_masked,                \
             float* __restrict__ partial, int sums_of, unsigned sum_kys, float* __restrict__ sums) {       \
        conv_dw_partial_wg<CONVT, S>(p, a_src, a_mask, a_masked, b_src, b_mask, b_masked, partial, sums_of,      \
                                  sum_kys, sums);                                                           \
    }
DWG_ENTRY(conv_dw_partial_wg5s1_tf32, false, 1)
DWG_ENTRY(conv_dw_partial_wg5s1t_tf32, true, 1)
DWG_ENTRY(conv_dw_partial_wg5s2_tf32, false, 2)
DWG_ENTRY(conv_dw_partial_wg5s2t_tf32, true, 2)
