// conv_tc_v5.cu: the entry points of version 5 (conv_tc_v5.cuh).
#include "conv_tc_v5.cuh"

// As conv_igemm_{direct,adjoint}_v3_tf32 (no split-K) for stride 1 and k = 3 or 5, with two more
// arguments, the output tile th × tw: `v5k3`, `v5k5`, 64 gathered channels (8 × 16 tiles);
// `v5n8`: at most 8 output channels; `v5c32`: 32 gathered channels and at most 32 output
// channels; `v5c32n8`: 32 gathered channels, at most 8 outputs; `v5s2`: stride 2, 64 channels,
// more than 32 outputs. Grid as conv_igemm_v5 says (z: the output phases of the adjoint gather
// with stride 2), block 256, dynamic shared memory as conv_igemm_v5 says.
#define V5_ENTRY(NAME, ADJ, K, NT, CS, S)                                                                    \
    extern "C" __global__ void __launch_bounds__(V3_THREADS, 2)                                            \
        NAME(ConvGemm p, int th, int tw, const float* __restrict__ src, const float* __restrict__ mask_y,   \
             int masked, const unsigned* __restrict__ wt, const float* __restrict__ bias, int relu,          \
             int accumulate, float* __restrict__ out) {                                                     \
        conv_igemm_v5<ADJ, K, NT, CS, S>(p, th, tw, src, mask_y, masked, wt, bias, relu, accumulate, out);  \
    }
V5_ENTRY(conv_igemm_direct_v5k3_tf32, false, 3, 64, 64, 1)
V5_ENTRY(conv_igemm_adjoint_v5k3_tf32, true, 3, 64, 64, 1)
V5_ENTRY(conv_igemm_direct_v5k5_tf32, false, 5, 64, 64, 1)
V5_ENTRY(conv_igemm_adjoint_v5k5_tf32, true, 5, 64, 64, 1)
V5_ENTRY(conv_igemm_direct_v5n8k3_tf32, false, 3, 8, 64, 1)
V5_ENTRY(conv_igemm_adjoint_v5n8k3_tf32, true, 3, 8, 64, 1)
V5_ENTRY(conv_igemm_direct_v5n8k5_tf32, false, 5, 8, 64, 1)
V5_ENTRY(conv_igemm_adjoint_v5n8k5_tf32, true, 5, 8, 64, 1)
V5_ENTRY(conv_igemm_direct_v5c32k3_tf32, false, 3, 32, 32, 1)
V5_ENTRY(conv_igemm_adjoint_v5c32k3_tf32, true, 3, 32, 32, 1)
V5_ENTRY(conv_igemm_direct_v5c32k5_tf32, false, 5, 32, 32, 1)
V5_ENTRY(conv_igemm_adjoint_v5c32k5_tf32, true, 5, 32, 32, 1)
V5_ENTRY(conv_igemm_direct_v5c32n8k3_tf32, false, 3, 8, 32, 1)
V5_ENTRY(conv_igemm_adjoint_v5c32n8k3_tf32, true, 3, 8, 32, 1)
V5_ENTRY(conv_igemm_direct_v5c32n8k5_tf32, false, 5, 8, 32, 1)
V5_ENTRY(conv_igemm_adjoint_v5c32n8k5_tf32, true, 5, 8, 32, 1)
V5_ENTRY(conv_igemm_adjoint_v5s2k3_tf32, true, 3, 64, 64, 2)
V5_ENTRY(conv_igemm_adjoint_v5s2k5_tf32, true, 5, 64, 64, 2)
V5_ENTRY(conv_igemm_direct_v5s2k3_tf32, false, 3, 64, 64, 2)
V5_ENTRY(conv_igemm_direct_v5s2k5_tf32, false, 5, 64, 64, 2)

// ---- Version 5 for at most 8 outputs, streamed (`conv_n8s`) ----
// The decoders' last layer (64 channels into RGB + alpha) is one pass that reads its whole
// input once: clevr6's transposed 3×3 forward reads 1.88 GB (0.44 ms at the H200's copy rate)
// for 34 GFLOP (~0.2 ms of mma at n8, half of it padding). Version 5 (`v5n8k3`) took 1.19 ms
// (H200, b2e47cd): one block per 8 × 16 tile stages its halo through registers before its taps,
// so the loads of a block are in flight only while it is not multiplying. Here a block walks a
// chunk of 4 × 16 output tiles (row-major over the images) with the next tile's halo on its way
// by cp.async while the warps multiply the current one; each thread rounds the quads it copied
// to TF32 in place after the wait (each value once; the tensor cores would truncate). All k²
// taps' weights (8 rows, permuted as for version 3, rows past n repeat row n − 1 and are never
// stored) are staged once per block. Warp w owns tile row w: one m16 × n8 fragment, tap after
// tap with no barrier between them (tc_tile_mma_v3, as version 5 reads its halo).
// grid (chunks of `chunk` tiles of 4 × 16), block 128, dynamic shared memory
// 4 · (2 · (4 + K − 1) · (16 + K − 1) · 68 + K² · 8 · 72) bytes (conv_n8s_shared_bytes on the
// host); p.cs == 64, p.n ≤ 8, p.stride == 1, p.k == K; the source is not masked. Other arguments
// as conv_igemm_v5.
#define N8S_THREADS 128
#define N8S_TH 4
#define N8S_TW 16
template <bool ADJOINT, int K>
static __device__ void conv_igemm_n8s(const ConvGemm& p, int chunk, const float* __restrict__ src,
                                      const unsigned* __restrict__ wt, const float* __restrict__ bias, int relu,
                                      int accumulate, float* __restrict__ out) {
    constexpr int CS = 64, LDH = CS + 4, LDB = CS + 8, NT = 8, KK = K * K, Q = CS / 4;
    constexpr int HH = N8S_TH + K - 1, HW = N8S_TW + K - 1, H_WORDS = HH * HW * LDH;
    extern __shared__ uint4 n8s_smem[];
    unsigned* const halo = (unsigned*)n8s_smem;  // [2][H_WORDS]
    unsigned* const ws = halo + 2 * H_WORDS;      // [KK][NT][LDB]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int N = p.n;
    // Every tap's weights, once.
    for (int e = tid; e < KK * NT * Q; e += N8S_THREADS) {
        const int tap = e / (NT * Q), n = (e / Q) % NT, q = e % Q;
        *(uint4*)&ws[(tap * NT + n) * LDB + 4 * q] = ld_u4(wt + (size_t)min(n, N - 1) * KK * CS + tap * CS + 4 * q);
    }
    const int tiles_x = (p.wp + N8S_TW - 1) / N8S_TW, per_img = tiles_x * ((p.hp + N8S_TH - 1) / N8S_TH);
    const int tiles = p.batch * per_img;
    // The halo's first source pixel is the tile's origin less `off` (the adjoint gather: the
    // direct one mirrored, as in version 5).
    const int off = ADJOINT ? K - 1 - p.pad : p.pad;
    // Issues the copies of tile `tile`'s halo into buffer `buf` (zeros outside the source), or,
    // with `settle`, rounds the quads this thread copied there to TF32 in place: the same loop,
    // so that each thread touches only its own copies.
    auto halo_quads = [&](int tile, int buf, bool settle) {
        const int img = tile / per_img, r = tile % per_img;
        const int sy0 = (r / tiles_x) * N8S_TH - off, sx0 = (r % tiles_x) * N8S_TW - off;
        unsigned* h = halo + buf * H_WORDS;
#pragma unroll 4
        for (int e = tid; e < HH * HW * Q; e += N8S_THREADS) {
            const int px = e / Q, q = e % Q;
            unsigned* dst = h + px * LDH + 4 * q;
            if (settle) {
                const uint4 v = *(const uint4*)dst;
                *(uint4*)dst = tf32x4(make_float4(__uint_as_float(v.x), __uint_as_float(v.y), __uint_as_float(v.z),
                                                  __uint_as_float(v.w)));
                continue;
            }
            const int sy = sy0 + px / HW, sx = sx0 + px % HW;
            const bool inside = (unsigned)sy < (unsigned)p.hs && (unsigned)sx < (unsigned)p.ws;
            const size_t idx = inside ? (((size_t)img * p.hs + sy) * p.ws + sx) * CS + 4 * q : 0;
            cp_async16(dst, src + idx, inside);
        }
    };
    // The lane's ldmatrix row (tile row `warp`, pixel lane & 15, channels (lane / 16)·4.. at
    // tap offset (0, 0) of buffer 0) and B pair (row g, words 2t, 2t + 1), as version 5's.
    const SmemAddr a_row = smem_addr(&halo[(warp * HW + (lane & 15)) * LDH + ((lane >> 4) << 2)]);
    const SmemAddr b_pair = smem_addr(&ws[(lane >> 2) * LDB + 2 * (lane & 3)]);
    const int t_first = blockIdx.x * chunk, t_end = min(t_first + chunk, tiles);
    if (t_first < t_end) halo_quads(t_first, 0, false);
    const int g = lane >> 2, tq = lane & 3;
    int buf = 0;
    for (int tile = t_first; tile < t_end; ++tile, buf ^= 1) {
        cp_async_wait_all();
        halo_quads(tile, buf, true);
        __syncthreads();  // this tile's halo (and the weights) are in; buffer buf ^ 1 is free
        if (tile + 1 < t_end) halo_quads(tile + 1, buf ^ 1, false);
        float acc[1][1][4] = {{{0.0f, 0.0f, 0.0f, 0.0f}}};
#pragma unroll
        for (int t = 0; t < KK; ++t) {
            const int ty = ADJOINT ? K - 1 - t / K : t / K, tx = ADJOINT ? K - 1 - t % K : t % K;
            tc_tile_mma_v3<CS, 0, LDB, 1, 1>(a_row, buf * H_WORDS + (ty * HW + tx) * LDH, b_pair, t * NT * LDB, acc);
        }
        // Rows g and g + 8 of the fragment: pixels (warp, g) and (warp, g + 8) of the tile.
        const int img = tile / per_img, r = tile % per_img;
        const int oy = (r / tiles_x) * N8S_TH + warp;
#pragma unroll
        for (int r2 = 0; r2 < 2; ++r2) {
            const int ox = (r % tiles_x) * N8S_TW + g + 8 * r2;
            if (oy >= p.hp || ox >= p.wp) continue;
            const size_t m = ((size_t)img * p.hp + oy) * p.wp + ox;
#pragma unroll
            for (int r1 = 0; r1 < 2; ++r1) {
                const int nn = 2 * tq + r1;
                if (nn < N) tc_epilogue(&out[m * N + nn], acc[0][0][2 * r2 + r1], bias, nn, relu, accumulate);
            }
        }
    }
}

// conv_igemm_n8s for the direct and the adjoint gather, k = 3 or 5: arguments as the v5
// entries with the tile shape replaced by the tiles per block.
#define N8S_ENTRY(NAME, ADJ, K)                                                                             \
    extern "C" __global__ void __launch_bounds__(N8S_THREADS)                                              \
        NAME(ConvGemm p, int chunk, const float* __restrict__ src, const unsigned* __restrict__ wt,          \
             const float* __restrict__ bias, int relu, int accumulate, float* __restrict__ out) {            \
        conv_igemm_n8s<ADJ, K>(p, chunk, src, wt, bias, relu, accumulate, out);                             \
    }
N8S_ENTRY(conv_igemm_direct_n8sk3_tf32, false, 3)
N8S_ENTRY(conv_igemm_adjoint_n8sk3_tf32, true, 3)
N8S_ENTRY(conv_igemm_direct_n8sk5_tf32, false, 5)
N8S_ENTRY(conv_igemm_adjoint_n8sk5_tf32, true, 5)
