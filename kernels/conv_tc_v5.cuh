// conv_tc_v5.cuh: the template of versions 5 and 6 of the activation passes (conv_igemm_v5), whose
// entry points are in conv_tc_v5.cu and conv_tc_v6.cu.
#include "conv_tc.cuh"

// ---- Version 5 of the activation passes: gathers of 64 or 32 channels from a halo tile ----
// Version 3 gathers every k-tile's rows from global memory: a 5×5 layer reads each source pixel
// 25 times per output tile (from L1 mostly), and every gathered row is stored to shared memory
// once per tap. Version 5 takes the stride-1 passes with 64 gathered channels (the direct gather
// with stride 1, and the adjoint gather with stride 1, which is a direct one with the taps
// mirrored: source = o + pad − t = o − (k − 1 − pad) + (k − 1 − t)) and an output tile of
// 8 × 16 pixels of one image: it stages the tile's halo, (8 + k − 1) × (16 + k − 1) pixels × 64
// channels, once, and reads each tap's A fragments from it with ldmatrix at the tap's offset
// (a lane gives ldmatrix its own row's address, so any row mapping is free). Only the weights
// stream: one tap (64 × 64) per step, two stages through registers as in version 3. Per
// 8 × 16 × 64 output tile of a 5×5 layer: 240 halo pixels gathered and stored once instead of
// 128 rows × 25 taps; the fragment loads are unchanged. Shared memory: the halo (rows of 68
// words: 16-byte aligned, ≡ 4 mod 8 so that 8 consecutive pixels' rows are conflict-free for
// ldmatrix) and two weight stages: 100 KiB (k = 5) or 84 KiB (k = 3).
// Version 5 with 32 gathered channels (`v5c32`: the small models' 32-channel layers) and at most
// 32 outputs per block (NT 32 or 8: one m16 fragment per warp) takes any output tile of th × tw
// ≤ 128 pixels, 8 ≤ tw ≤ 24, th = ⌊128 / tw⌋: fragment f's rows are the tile's pixels 16f..16f+15
// in row order, whichever tile rows they fall on (the lanes' ldmatrix addresses say where). A
// 35 × 35 image takes 7 × 18 tiles: 10 per image, 96 % of their pixels used, where 8 × 16 tiles
// would use 64 %. The 64-channel kernels keep 8 × 16 (their warps' two fragments are consecutive
// tile rows). Stride 2 (64 channels) runs as stride-1 gathers by phases: see conv_igemm_v5.

// Version 6: version 5 (the same tiles, halo and weight stages: the template's WIDE) with 4
// warps per block, each with twice version 5's pixels. `v6c32`: warps of 32 pixels × 32
// channels instead of 8 of 16 × 32; per k-step a warp loads 2 A fragments and 4 B pairs for 8
// mma, where v5c32's loads 1 and 4 for 4: the shared-memory wavefronts per mma fall from 3 to 2,
// and each warp runs 32 mma per tap between two barriers instead of 16. `v6k5` (64 channels,
// stride 1): warps of 4 tile rows × 32 channels, 1.5 wavefronts per mma instead of 2.
#define V6_THREADS 128

// NT: the block's output channels, 64 (8 warps of 32 × 32: 2 tile rows × 32 channels each), 32
// (8 warps of 16 × 32: 16 tile pixels each) or 8 (8 warps of 16 × 8), for layers of at most 8
// outputs (the decoders' last, RGB + alpha), where 64 columns would be 7/8 padding and the
// fragment loads of version 3's 32 columns 3/4. WIDE (version 6, NT 64 or 32): 4 warps, each
// with twice those pixels, block V6_THREADS. CS: the gathered channels, 64 or 32; the halo's
// rows are CS + 4 words (16-byte aligned, ≡ 4 mod 8: conflict-free for ldmatrix), the weights'
// CS + 8 (≡ 8 mod 16: conflict-free B pairs).

// grid (batch · ⌈gh/th⌉ · ⌈gw/tw⌉, ⌈n/NT⌉, z), block 256, with (gh, gw, z) = (⌈hp/2⌉, ⌈wp/2⌉, 4)
// for the adjoint gather with stride 2 and (hp, wp, 1) otherwise; dynamic shared memory
// 4 · ((th + KH − 1) · (tw + KH − 1) · (CS + 4) + 2 · NT · (CS + 8)) bytes with KH = K (stride
// 1) or ⌈K/2⌉ (stride 2); p.cs == CS, p.stride == STRIDE, p.k == K; th × tw = 8 × 16 for NT
// 64. Arguments as conv_igemm_v3 (no split-K).
// STRIDE 2 splits the gather into stride-1 gathers by phases, each with its own halo:
// - the adjoint gather (a transposed convolution's forward): output phase (qy, qx) = (oy mod 2,
//   ox mod 2), blockIdx.z = 2·qy + qx, takes the taps ky ≡ qy + pad (mod 2): output (2i + qy, ·)
//   reads source row i + (qy + pad − ky)/2. The tile is th × tw positions (i, j) of the phase;
//   tap (a, b) of the phase's ny × nx, ky = ky0 + 2a, reads the halo at row ny − 1 − a.
// - the direct gather (a transposed convolution's dx, a strided convolution's forward): output
//   i reads source row 2i − pad + ky, of parity py ≡ ky − pad. The block runs the four source
//   phases (py, px) in turn, into the same accumulators: phase py is the source's rows 2u + py,
//   and its taps ky = ky0 + 2a with ky0 ≡ py + pad read u = i + a + (ky0 − pad − py)/2, halo
//   row a.
// Either way a phase has at most ⌈K/2⌉ taps per axis, and the halo th + ⌈K/2⌉ − 1 rows.
template <bool ADJOINT, int K, int NT, int CS, int STRIDE = 1, bool WIDE = false>
static __device__ void conv_igemm_v5(const ConvGemm& p, int th, int tw, const float* __restrict__ src,
                                     const float* __restrict__ mask_y, int masked, const unsigned* __restrict__ wt,
                                     const float* __restrict__ bias, int relu, int accumulate,
                                     float* __restrict__ out) {
    constexpr int LDH = CS + 4, LDB = CS + 8, Q = CS / 4;  // Q: 16-byte quads per pixel row
    constexpr int KK = K * K, KDIM = KK * CS;               // the GEMM's K
    static_assert(!WIDE || ((NT == 64 || NT == 32) && STRIDE == 1), "version 6: NT 64 or 32, stride 1");
    constexpr int THREADS = WIDE ? V6_THREADS : V3_THREADS;
    // A warp's m16 and n8 tiles: version 6 (WIDE) doubles version 5's m16 tiles.
    constexpr int MI = (NT == 64 ? 2 : 1) * (WIDE ? 2 : 1), NI = NT == 8 ? 1 : 4;
    // Version 6 with NT 32: a warp's two m16 tiles are 16 pixels apart in any tile shape, each
    // with a row address of its own (NT 64's are whole tile rows, hw pixels apart).
    constexpr bool ROWS2 = WIDE && NT == 32;
    constexpr int WJ = (NT * Q + THREADS - 1) / THREADS;                // weight quads per thread
    static_assert(WJ == 1 || NT * Q % THREADS == 0, "has_w holds for every j or none");
    extern __shared__ uint4 v5_smem[];
    constexpr bool ADJ_S2 = STRIDE == 2 && ADJOINT, DIR_S2 = STRIDE == 2 && !ADJOINT;
    constexpr int KH = STRIDE == 1 ? K : (K + 1) / 2;  // the most taps per axis of a phase
    const int hh = th + KH - 1, hw = tw + KH - 1;     // the halo
    constexpr int HW64 = V5_TW + KH - 1;  // hw of the 8 × 16 tiles (NT 64: tile mi is mi·hw pixels on)
    unsigned* halo = (unsigned*)v5_smem;
    unsigned(*Bs)[NT][LDB] = (unsigned(*)[NT][LDB])(halo + hh * hw * LDH);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    // NT 64: tile rows MI·wm.. (2, or 4 for WIDE), channels wn·32..; NT 32 and 8: tile pixels
    // 16·MI·wm.., all NT channels.
    const int wm = NT == 64 ? warp >> 1 : warp, wn = NT == 64 ? warp & 1 : 0;
    const int N = p.n;
    // The tiles cover the output grid, or (adjoint, stride 2) output phase (0, 0)'s, the largest.
    const int gh = ADJ_S2 ? (p.hp + 1) / 2 : p.hp, gw = ADJ_S2 ? (p.wp + 1) / 2 : p.wp;
    const int tiles_x = (gw + tw - 1) / tw, tiles_y = (gh + th - 1) / th;
    const int img = blockIdx.x / (tiles_x * tiles_y), tile = blockIdx.x % (tiles_x * tiles_y);
    const int oy0 = (tile / tiles_x) * th, ox0 = (tile % tiles_x) * tw;
    const int n0 = blockIdx.y * NT;
    // The output phase of the adjoint gather at stride 2 (blockIdx.z); output pixel
    // (OS·(oy0 + r) + oqy, …).
    constexpr int OS = ADJ_S2 ? 2 : 1;
    const int oqy = ADJ_S2 ? (int)blockIdx.z >> 1 : 0, oqx = ADJ_S2 ? (int)blockIdx.z & 1 : 0;
    // A phase of the gather (conv_tc.cuh's conv_phase); the direct gather at stride 2 runs the
    // four source phases in turn.
    using Phase = ConvPhase;
    auto phase = [&](int ph) { return conv_phase<ADJOINT, K, STRIDE>(p, ph, oy0, ox0, oqy, oqx); };
    // This thread's weight rows (WJ of the NT, Q quads each: element e = tid + THREADS·j is row
    // e / Q, quad e % Q, when e < NT·Q); past n, the last row (its columns are never stored).
    const bool has_w = tid < NT * Q;
    int wrow[WJ];
#pragma unroll
    for (int j = 0; j < WJ; ++j) wrow[j] = min(n0 + (tid + THREADS * j) / Q, N - 1) * KDIM + 4 * (tid % Q);
    // The weights of tap (a, b) of phase f (stride 1: tap t = a·K + b), into wv.
    uint4 wv[WJ];
    auto load_w = [&](const Phase& f, int a, int b, int t) {
        const int tap = STRIDE == 1 ? t : (f.ky0 + STRIDE * a) * K + f.kx0 + STRIDE * b;
#pragma unroll
        for (int j = 0; j < WJ; ++j) wv[j] = has_w ? ld_u4(wt + wrow[j] + tap * CS) : make_uint4(0u, 0u, 0u, 0u);
    };
    // The halo of phase f: pixel e / Q (row-major over hh × hw), channel quad e % Q; zero
    // outside the source image; through the ReLU mask for a gradient; rounded to TF32.
    // Unrolled 8 times for version 6 and the 64-output tiles, so that 8 loads per thread are in
    // flight at once (4 before: a 64-channel halo of 12 × 20 pixels is 30 quads per thread of
    // version 6, 8 round trips to memory at the start of each block; the accumulators are not
    // live yet, so the registers are there: unchanged counts, no spills, sm_90). The others
    // keep 4: unrolled 8, they took 80 registers instead of 62–68, a block fewer per SM for some.
    constexpr int HALO_UNROLL = WIDE || NT == 64 ? 8 : 4;
    auto stage_halo = [&](const Phase& f) {
        const size_t img_base = (size_t)img * p.hs * p.ws;
        const int halo_f4 = hh * hw * Q;
#pragma unroll HALO_UNROLL
        for (int e = tid; e < halo_f4; e += THREADS) {
            const int px = e / Q, q = e % Q;
            const int sy = DIR_S2 ? 2 * (f.sy0 + px / hw) + f.qy : f.sy0 + px / hw;
            const int sx = DIR_S2 ? 2 * (f.sx0 + px % hw) + f.qx : f.sx0 + px % hw;
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if ((unsigned)sy < (unsigned)p.hs && (unsigned)sx < (unsigned)p.ws) {
                const size_t idx = (img_base + (size_t)sy * p.ws + sx) * CS + 4 * q;
                v = ld_f4(src + idx);
                if (masked) v = relu_masked(v, mask_y + idx);
            }
            *(uint4*)&halo[px * LDH + 4 * q] = tf32x4(v);
        }
    };
    auto store_w = [&](int stage) {
        if (has_w) {
#pragma unroll
            for (int j = 0; j < WJ; ++j) {
                const int e = tid + THREADS * j;
                *(uint4*)&Bs[stage][e / Q][4 * (e % Q)] = wv[j];
            }
        }
    };
    Phase f = phase(0);
    load_w(f, 0, 0, 0);
    stage_halo(f);
    store_w(0);
    __syncthreads();
    // The lane's ldmatrix row for halo offset (0, 0): tile pixel 16·MI·wm + (lane & 15)
    // (row-major over th × tw; with NT 64, tile mi is mi tile rows on, mi·hw pixels), channel
    // (lane / 16)·4; past the tile's th·tw pixels, pixel 0 (its products are never stored). Its
    // B pair as in version 3. ROWS2: mi = 1 is tile pixel 16 on, a row of its own (a_row1).
    int a_px = 16 * MI * wm + (lane & 15);
    if (a_px >= th * tw) a_px = 0;
    const SmemAddr a_row = smem_addr(&halo[((a_px / tw) * hw + a_px % tw) * LDH + ((lane >> 4) << 2)]);
    SmemAddr a_row1 = a_row;
    if (ROWS2) {
        int px1 = 16 * MI * wm + 16 + (lane & 15);
        if (px1 >= th * tw) px1 = 0;
        a_row1 = smem_addr(&halo[((px1 / tw) * hw + px1 % tw) * LDH + ((lane >> 4) << 2)]);
    }
    const SmemAddr b_pair = smem_addr(&Bs[0][wn * 32 + (lane >> 2)][2 * (lane & 3)]);
    float acc[MI][NI][4];
    zero_acc(acc);
    // One loop over every tap of the block, phase after phase (a cursor (ph, a, b)): the
    // next tap's weights load while this one's products run, and a new phase's halo is staged
    // between two barriers.
    const int taps = DIR_S2 ? KK : f.ny * f.nx;
    int ph = 0, a = 0, b = 0;  // (the direct gather at stride 2: its cursor over the phases)
    for (int t = 0; t < taps; ++t) {
        // This tap (a, b) and the next (a_n, b_n, of phase fn): one phase, t = a·nx + b;
        // several, the cursor steps through each phase's taps in turn.
        Phase fn = f;
        int ph_n = ph, a_n, b_n;
        if (DIR_S2) {
            a_n = a;
            b_n = b + 1;
            if (b_n == f.nx) {
                b_n = 0;
                if (++a_n == f.ny) {
                    a_n = 0;
                    fn = phase(++ph_n);
                }
            }
        } else {
            a = t / f.nx;
            b = t - a * f.nx;
            a_n = (t + 1) / f.nx;
            b_n = t + 1 - a_n * f.nx;
        }
        if (t + 1 < taps) load_w(fn, a_n, b_n, t + 1);
        const int ty = ADJOINT ? f.ny - 1 - a : a, tx = ADJOINT ? f.nx - 1 - b : b;
        const int a_tap = (ty * hw + tx) * LDH, b_stage = (t & 1) * NT * LDB;
        if (ROWS2)
            tc_tile_mma_rows2<CS, LDB, NI>(a_row, a_row1, a_tap, b_pair, b_stage, acc);
        else
            tc_tile_mma_v3<CS, HW64 * LDH, LDB, MI, NI>(a_row, a_tap, b_pair, b_stage, acc);
        // Stage (t + 1) % 2 was last read in step t − 1, before the barrier that ended it.
        if (t + 1 < taps) store_w((t + 1) & 1);
        __syncthreads();
        if (DIR_S2) {
            if (ph_n != ph && t + 1 < taps) {
                stage_halo(fn);  // (every read of the last phase's halo ended at the barrier above)
                __syncthreads();
            }
            f = fn;
            ph = ph_n;
            a = a_n;
            b = b_n;
        }
    }
    const int g = lane >> 2, tq = lane & 3;
    // Fragment mi's rows: its accumulators are passed by constant index (in a loop over mi the
    // direct stride-2 kernel's larger body kept the loop rolled, and the accumulators with it in
    // local memory).
    auto store_rows = [&](const float (&am)[NI][4], int mi) {
#pragma unroll
        for (int r2 = 0; r2 < 2; ++r2) {
            const int px = 16 * (MI * wm + mi) + g + 8 * r2;  // the tile pixel of this row
            const int oy = OS * (oy0 + px / tw) + oqy, ox = OS * (ox0 + px % tw) + oqx;
            if (px >= th * tw || oy >= p.hp || ox >= p.wp) continue;
            const int m = (img * p.hp + oy) * p.wp + ox;  // the row of `out`
#pragma unroll
            for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                for (int r1 = 0; r1 < 2; ++r1) {
                    const int nn = n0 + wn * 32 + ni * 8 + 2 * tq + r1;
                    if (nn < N) tc_epilogue(&out[(size_t)m * N + nn], am[ni][2 * r2 + r1], bias, nn, relu, accumulate);
                }
        }
    };
    store_rows(acc[0], 0);
    if (MI >= 2) store_rows(acc[MI >= 2 ? 1 : 0], 1);
    if (MI == 4) {
        store_rows(acc[MI == 4 ? 2 : 0], 2);
        store_rows(acc[MI == 4 ? 3 : 0], 3);
    }
}
