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
