// conv_tc.cu: the tensor-core convolutions' activation passes of versions 2 and 3 and c4, and
// their weight gradients. What they compute and share: conv_tc.cuh. Versions 5 and 6 (halo
// tiles): conv_tc_v5.cu and conv_tc_v6.cu.
#include "conv_tc.cuh"

template <bool ADJOINT>
static __device__ void conv_igemm(const ConvGemm& p, const float* __restrict__ src,
                                  const float* __restrict__ mask_y, int masked, const float* __restrict__ w,
                                  const float* __restrict__ bias, int relu, int accumulate,
                                  float* __restrict__ out) {
    __shared__ unsigned As[TC_BM][TC_LD];
    __shared__ unsigned Bs[TC_BN][TC_LD];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;
    const int M = p.batch * p.hp * p.wp, N = p.n, K = p.k * p.k * p.cs;
    const int m0 = blockIdx.x * TC_BM, n0 = blockIdx.y * TC_BN;
    // This thread loads column kq of each k-tile, for rows r0 + 8j (j < 8) of both tiles.
    const int kq = tid & 15, r0 = tid >> 4;
    int row_n[8], row_y[8], row_x[8];  // the positions of its A rows (row_n = −1: past M)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int m = m0 + r0 + 8 * j;
        row_n[j] = -1;
        row_y[j] = row_x[j] = 0;
        if (m < M) {
            row_x[j] = m % p.wp;
            const int t = m / p.wp;
            row_y[j] = t % p.hp;
            row_n[j] = t / p.hp;
        }
    }
    float acc[2][4][4];
    zero_acc(acc);
    const int bdim = p.w_nc ? p.cs : N;  // second dimension of W
    for (int k0 = 0; k0 < K; k0 += TC_BK) {
        const int kk = k0 + kq;
        const bool kvalid = kk < K;
        int c = 0, ky = 0, kx = 0;
        if (kvalid) split_k(kk, p.cs, p.k, c, ky, kx);
        float av[8], bv[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            float v = 0.0f;
            if (kvalid && row_n[j] >= 0) {
                int sy, sx;
                bool ok;
                if (ADJOINT) {
                    const int ty = row_y[j] + p.pad - ky, tx = row_x[j] + p.pad - kx;
                    ok = ty >= 0 && tx >= 0 && ty % p.stride == 0 && tx % p.stride == 0;
                    sy = ty / p.stride;
                    sx = tx / p.stride;
                    ok = ok && sy < p.hs && sx < p.ws;
                } else {
                    sy = row_y[j] * p.stride - p.pad + ky;
                    sx = row_x[j] * p.stride - p.pad + kx;
                    ok = sy >= 0 && sy < p.hs && sx >= 0 && sx < p.ws;
                }
                if (ok) {
                    const int idx = ((row_n[j] * p.hs + sy) * p.ws + sx) * p.cs + c;
                    v = src[idx];
                    if (masked && !(mask_y[idx] > 0.0f)) v = 0.0f;
                }
            }
            av[j] = v;
            const int nn = n0 + r0 + 8 * j;
            float wv = 0.0f;
            if (kvalid && nn < N) {
                const int a = p.w_nc ? nn : c, b = p.w_nc ? c : nn;
                wv = w[((a * bdim + b) * p.k + ky) * p.k + kx];
            }
            bv[j] = wv;
        }
        __syncthreads();  // every warp has read the previous tile
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            As[r0 + 8 * j][kq] = to_tf32(av[j]);
            Bs[r0 + 8 * j][kq] = to_tf32(bv[j]);
        }
        __syncthreads();
        tc_tile_mma<TC_LD, TC_LD>(As, Bs, wm, wn, lane, acc);
    }
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int m = m0 + wm * 32 + mi * 16 + g + (r >= 2 ? 8 : 0);
                const int nn = n0 + wn * 32 + ni * 8 + 2 * t + (r & 1);
                if (m < M && nn < N) tc_epilogue(&out[m * N + nn], acc[mi][ni][r], bias, nn, relu, accumulate);
            }
}

// grid (ceil(M/64), ceil(N/64)), block 128. `masked`: zero src where mask_y <= 0 (g = relu'd dy).
// accumulate = 0: out = relu?(acc + bias); 1: out += acc; 2: out = relu?(acc) (bias unused in 1
// and 2). A linear layer runs here as a 1×1 convolution over one-pixel images.
extern "C" __global__ void __launch_bounds__(TC_THREADS)
conv_igemm_direct_tf32(ConvGemm p, const float* __restrict__ src, const float* __restrict__ mask_y,
                       int masked, const float* __restrict__ w, const float* __restrict__ bias, int relu,
                       int accumulate, float* __restrict__ out) {
    conv_igemm<false>(p, src, mask_y, masked, w, bias, relu, accumulate, out);
}

extern "C" __global__ void __launch_bounds__(TC_THREADS)
conv_igemm_adjoint_tf32(ConvGemm p, const float* __restrict__ src, const float* __restrict__ mask_y,
                        int masked, const float* __restrict__ w, const float* __restrict__ bias, int relu,
                        int accumulate, float* __restrict__ out) {
    conv_igemm<true>(p, src, mask_y, masked, w, bias, relu, accumulate, out);
}

// ---- Version 3 of the activation passes: taken when cs is a multiple of 16 ----
// Then a k-tile (BK = 16 or 32 consecutive k, BK dividing cs) lies within one tap and covers BK
// consecutive channels, so a thread computes each of its rows' source address once per k-tile
// and loads 4 channels at a time (16-byte loads). The weights are permuted once per call into
// wt[N][K] (conv_w_nk_tf32: K tap-major, channel fastest, already rounded to TF32), so a B row
// of a k-tile is 4·BK contiguous bytes instead of BK loads 4·k² bytes apart. Two shared-memory
// stages: the next k-tile's global loads are issued before the current tile's mma and stored
// after it, with one barrier per k-tile.
// BK = 32 (`*_v3_k32_*`, cs a multiple of 32: every 64-channel layer) makes a row of a k-tile
// one 128-byte line: a warp's gather of 4 such rows costs half the L1 wavefronts of 8 rows of
// 64 bytes, for the same bytes, and a pass has half the barriers. Its two stages take 56 KiB,
// past the 48 KiB a launch gets without opting in: the stages are dynamic shared memory, and
// the backend raises the kernels' limit once when it loads them (conv.rs, LARGE_SHARED).

// wt[nn][pair((ky·k + kx)·cs + c)] = tf32(W[nn][c][ky][kx]) (w_nc = 1) or tf32(W[c][nn][ky][kx])
// (w_nc = 0), for nn < n, c < cs, where pair() orders each 8 consecutive k as k0 k4 k1 k5 k2 k6
// k3 k7 (K is a multiple of 16 here): the mma's B fragment pairs, side by side (tc_tile_mma_v3).
// One thread per element of wt (writes coalesced within each 8).
extern "C" __global__ void conv_w_nk_tf32(int n, int cs, int k, int w_nc, const float* __restrict__ w,
                                          unsigned* __restrict__ wt) {
    const int K = k * k * cs;
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n * K) return;
    const int nn = e / K, kk = e % K;
    int c, ky, kx;
    split_k(kk, cs, k, c, ky, kx);
    const int a = w_nc ? nn : c, b = w_nc ? c : nn;
    const int bdim = w_nc ? cs : n;
    const int pos = (kk & ~7) | ((kk & 3) << 1) | ((kk >> 2) & 1);
    wt[nn * K + pos] = to_tf32(w[((a * bdim + b) * k + ky) * k + kx]);
}

// The adjoint gather with stride s > 1 touches, for an output position (oy, ox), only the taps
// with ky ≡ oy + pad and kx ≡ ox + pad (mod s): 1/s² of them (with k = 5, s = 2: 4, 6 or 9 of 25).
// Version 3 therefore splits the output positions into the s² phases (oy mod s, ox mod s),
// blockIdx.z = phase, and runs each phase's GEMM over its own taps only, so no tensor-core work
// is spent on taps that are zero (v2 multiplies them: 4× the work of a stride-2 convT forward).
// Without phases (direct gathers, stride 1) this is the plain GEMM: one phase, every tap.
struct V3Phase {
    int s;        // phase stride (1: no phases)
    int qy, qx;   // this block's phase
    int hq, wq;   // the phase's grid of output positions
    int ky0, kx0; // its first tap in each direction; taps step by s
    int ntx;      // its taps along x
    int ntiles;   // its k-tiles: taps · cs / BK
};

template <int BK>
static __device__ __forceinline__ V3Phase v3_phase(const ConvGemm& p, bool phased) {
    V3Phase f;
    f.s = phased ? p.stride : 1;
    f.qy = phased ? (int)blockIdx.z / p.stride : 0;
    f.qx = phased ? (int)blockIdx.z % p.stride : 0;
    f.hq = (p.hp - f.qy + f.s - 1) / f.s;
    f.wq = (p.wp - f.qx + f.s - 1) / f.s;
    f.ky0 = phased ? (f.qy + p.pad) % p.stride : 0;
    f.kx0 = phased ? (f.qx + p.pad) % p.stride : 0;
    const int nty = (p.k - f.ky0 + f.s - 1) / f.s;
    f.ntx = (p.k - f.kx0 + f.s - 1) / f.s;
    f.ntiles = nty * f.ntx * (p.cs / BK);
    return f;
}

// Where a k-tile of the phase's GEMM reads: tap (ky, kx), the offsets (oy_, ox_) that map a row's
// base position to its source pixel, and the tile's first channel. Stepped from one k-tile to the
// next by additions (v3_next): the k-loop has no integer division.
//   direct gather:  source = base + (ky, kx) with base = (oy·s − pad, ox·s − pad);
//   adjoint gather: source = base − (ty, tx) with base = (ry + ⌊(qy + pad)/s⌋, rx + ...), (ty, tx)
//                   the phase's tap indices, ky = ky0 + s·ty (exact: the phase's taps divide).
// The k-tile's element offsets are kept too and stepped by the k-tile's width; they are worked
// out again (two multiply-adds each) only when the tap changes, every cs / BK k-tiles: the SASS
// had recomputed both, and the weights' 64-bit address, in every k-tile.
struct V3Tap {
    int ky, kx;    // the tap
    int ty, tx;    // its index among the phase's taps
    int c0;        // first channel of the k-tile
    int dy, dx;    // the source pixel's offset from a row's base position
    int aoff;      // the k-tile's offset from a row's base in src: (dy·ws + dx)·cs + c0
    int woff;      // the k-tile's offset from a B row's base in wt: (ky·k + kx)·cs + c0
};

template <bool ADJOINT>
static __device__ __forceinline__ void v3_offsets(const ConvGemm& p, V3Tap& tp) {
    tp.dy = ADJOINT ? -tp.ty : tp.ky;
    tp.dx = ADJOINT ? -tp.tx : tp.kx;
    tp.aoff = (tp.dy * p.ws + tp.dx) * p.cs + tp.c0;
    tp.woff = (tp.ky * p.k + tp.kx) * p.cs + tp.c0;
}

template <bool ADJOINT, int BK>
static __device__ __forceinline__ void v3_next(const ConvGemm& p, const V3Phase& f, V3Tap& tp) {
    tp.c0 += BK;
    tp.aoff += BK;
    tp.woff += BK;
    if (tp.c0 == p.cs) {
        tp.c0 = 0;
        ++tp.tx;
        tp.kx += f.s;
        if (tp.tx == f.ntx) {
            tp.tx = 0;
            tp.kx = f.kx0;
            ++tp.ty;
            tp.ky += f.s;
        }
        v3_offsets<ADJOINT>(p, tp);
    }
}

// The k-tile t of the phase's GEMM (the state v3_next reaches from tile 0 after t steps): the
// first tile of a split-K block. (A phase without taps has ntx = 0 and no tiles: tile 0.)
template <bool ADJOINT, int BK>
static __device__ __forceinline__ V3Tap v3_tap_at(const ConvGemm& p, const V3Phase& f, int t) {
    const int per_tap = p.cs / BK, tap = t / per_tap;
    V3Tap tp;
    tp.c0 = (t % per_tap) * BK;
    tp.ty = f.ntx > 0 ? tap / f.ntx : 0;
    tp.tx = f.ntx > 0 ? tap % f.ntx : 0;
    tp.ky = f.ky0 + f.s * tp.ty;
    tp.kx = f.kx0 + f.s * tp.tx;
    v3_offsets<ADJOINT>(p, tp);
    return tp;
}

// A row of the phase's GEMM: its base position (the source pixel of tap offset 0) and that
// pixel's index in src, so that a k-tile's gather is base + the tap's offset, after a bounds test.
struct V3Row {
    int by, bx;  // (−2^30 when there is no row: then every bounds test fails)
    int base;    // the index of (by, bx, channel 4q) in src: (n·hs·ws + by·ws + bx)·cs + 4q, q the
                 // thread's channel quad
};

// This thread's part of k-tile `tp`: 4 channels (quad q) of its AJ A rows and, when has_b, of
// its BJ B rows (wrow[j]: the row's index of (row, k = 4q) in wt).
template <bool ADJOINT, int AJ, int BJ>
static __device__ __forceinline__ void v3_load(const ConvGemm& p, const float* __restrict__ src,
                                               const float* __restrict__ mask_y, int masked,
                                               const unsigned* __restrict__ wt, const V3Tap& tp,
                                               const V3Row rows[AJ], float4 av[AJ], bool has_b, const int wrow[BJ],
                                               uint4 bv[BJ]) {
#pragma unroll
    for (int j = 0; j < AJ; ++j) {
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        const int sy = rows[j].by + tp.dy, sx = rows[j].bx + tp.dx;
        // (Unsigned: a negative coordinate fails the same test as one past the edge.)
        if ((unsigned)sy < (unsigned)p.hs && (unsigned)sx < (unsigned)p.ws) {
            const int idx = rows[j].base + tp.aoff;
            v = ld_f4(src + idx);
            if (masked) v = relu_masked(v, mask_y + idx);
        }
        av[j] = v;
    }
    if (has_b) {
#pragma unroll
        for (int j = 0; j < BJ; ++j) bv[j] = ld_u4(wt + wrow[j] + tp.woff);
    }
}

// The output row of the phase's GEMM row m (−1: past the phase's positions), its position, and
// its position in the phase's grid.
static __device__ __forceinline__ int v3_row(const ConvGemm& p, const V3Phase& f, int m, int& oy, int& ox, int& ry,
                                             int& rx) {
    oy = ox = ry = rx = 0;
    if (m >= p.batch * f.hq * f.wq) return -1;
    rx = m % f.wq;
    const int t = m / f.wq;
    ry = t % f.hq;
    const int n = t / f.hq;
    oy = f.qy + f.s * ry;
    ox = f.qx + f.s * rx;
    return n;
}

// The A row of GEMM row m (see V3Tap for the base positions).
template <bool ADJOINT>
static __device__ __forceinline__ V3Row v3_a_row(const ConvGemm& p, const V3Phase& f, int m) {
    int oy, ox, ry, rx;
    const int n = v3_row(p, f, m, oy, ox, ry, rx);
    V3Row r;
    if (ADJOINT) {
        r.by = ry + (f.qy + p.pad) / f.s;
        r.bx = rx + (f.qx + p.pad) / f.s;
    } else {
        r.by = oy * p.stride - p.pad;
        r.bx = ox * p.stride - p.pad;
    }
    r.base = ((n * p.hs + r.by) * p.ws + r.bx) * p.cs;
    if (n < 0) r.by = r.bx = -(1 << 30);
    return r;
}

// The rows of A and B a thread of warp w loads and stores in each k-tile: with BK = 16, a
// warp covers 8 rows × 4 channel quads per round, and the rows are dealt to its lanes so that
// the 8 lanes of each quarter-warp phase of a 16-byte shared store write two rows 16 banks apart:
// rows ra and ra + 4 of A (row length 20 words) and rb and rb + 2 of B (24 words). (Dealt in
// order, lane / 4, each phase's two rows overlapped in 4 (A) or 8 (B) banks: 8 shared wavefronts
// per store instead of 4.) With BK = 32 a warp covers 4 rows × 8 quads, and each phase writes
// one whole row: 32 consecutive words, conflict-free in any order.
template <int BK>
static __device__ __forceinline__ void v3_lane_rows(int warp, int lane, int& q, int& ra, int& rb) {
    if (BK == 16) {
        const int ph = lane >> 3, hi = (lane >> 2) & 1;
        q = lane & 3;
        ra = 8 * warp + ph + 4 * hi;
        rb = 8 * warp + (ph & 1) + 2 * hi + 4 * (ph >> 1);
    } else {
        q = lane & 7;
        ra = rb = 4 * warp + (lane >> 3);
    }
}

// Bytes of dynamic shared memory of conv_igemm_v3<., WN, BK> (the backend's launch gives
// exactly this; conv.rs v3_shared_bytes).
template <int WN, int BK>
struct V3Smem {
    static constexpr int BN = 32 * WN, BM = 256 / WN;
    static constexpr int LDA = BK + 4;  // ≡ 4 (mod 8): conflict-free ldmatrix rows
    static constexpr int LDB = BK + 8;  // ≡ 8 (mod 16): B's fragments are read in pairs
    static constexpr int BYTES = 4 * (2 * BM * LDA + 2 * BN * LDB);
};

template <bool ADJOINT, int WN, int BK>
static __device__ void conv_igemm_v3(const ConvGemm& p, const float* __restrict__ src,
                                     const float* __restrict__ mask_y, int masked, const unsigned* __restrict__ wt,
                                     const float* __restrict__ bias, int relu, int accumulate, int splits,
                                     float* __restrict__ out) {
    using S = V3Smem<WN, BK>;
    constexpr int BN = S::BN, BM = S::BM, LDA = S::LDA, LDB = S::LDB;
    constexpr int ROUND = 8 * (128 / BK);           // rows the 8 warps cover per round of loads
    constexpr int AJ = BM / ROUND;                  // A rows per thread
    constexpr int BJ = (BN + ROUND - 1) / ROUND;    // B rows per thread (BN < ROUND: some have none)
    // The two stages of A, then of B, in dynamic shared memory (uint4: 16-byte aligned).
    extern __shared__ uint4 v3_smem[];
    unsigned(*As)[BM][LDA] = (unsigned(*)[BM][LDA])v3_smem;
    unsigned(*Bs)[BN][LDB] = (unsigned(*)[BN][LDB])((unsigned*)v3_smem + 2 * BM * LDA);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / WN, wn = warp % WN;
    const int N = p.n, K = p.k * p.k * p.cs;
    const V3Phase f = v3_phase<BK>(p, ADJOINT && p.stride > 1);
    // Split-K (splits > 1; unphased passes only, blockIdx.z is then the split): this block runs
    // k-tiles [t0, t1) and writes its raw products to out = partial[split][row][n], which
    // conv_splitk_reduce_f32 sums. A one-image convolution has a few row blocks of ~100 k-tiles
    // each: without the split, a few SMs work through them one load latency at a time.
    const int split = splits > 1 ? (int)blockIdx.z : 0;
    const int t0 = (int)((long long)split * f.ntiles / splits);
    const int t1 = (int)((long long)(split + 1) * f.ntiles / splits);
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    int q, ra, rb;
    v3_lane_rows<BK>(warp, lane, q, ra, rb);
    const bool has_b = rb < BN;  // this thread loads B rows
    // Its rows of the permuted weights, at its 4 columns of a k-tile; past n, the last row: it
    // feeds only output columns that are never stored. (wt has n·K ≤ 2^31 elements: the weights
    // of one layer.)
    int wrow[BJ];
#pragma unroll
    for (int j = 0; j < BJ; ++j) wrow[j] = min(n0 + rb + ROUND * j, N - 1) * K + 4 * q;
    V3Row rows[AJ];  // its A rows
#pragma unroll
    for (int j = 0; j < AJ; ++j) {
        rows[j] = v3_a_row<ADJOINT>(p, f, m0 + ra + ROUND * j);
        rows[j].base += 4 * q;
    }
    V3Tap tp = v3_tap_at<ADJOINT, BK>(p, f, t0);  // the k-tile to load next
    float acc[2][4][4];
    zero_acc(acc);
    float4 av[AJ];
    uint4 bv[BJ];
#pragma unroll
    for (int j = 0; j < BJ; ++j) bv[j] = make_uint4(0u, 0u, 0u, 0u);
    if (t0 < t1) v3_load<ADJOINT, AJ, BJ>(p, src, mask_y, masked, wt, tp, rows, av, has_b, wrow, bv);
    SmemAddr a_row, b_pair;
    tc_v3_lane_addrs<LDA, LDB>(As[0], Bs[0], wm, wn, lane, a_row, b_pair);
    // Unrolled by the two stages, so that each trip's stage is a constant.
#pragma unroll 2
    for (int i = 0; i < t1 - t0; ++i) {
        const int t = t0 + i;
        // Store the loaded tile into stage (t − t0) % 2. Every warp finished reading that stage
        // (tile t − 2) before the barrier that ended iteration t − 1.
        const int st = i & 1;
#pragma unroll
        for (int j = 0; j < AJ; ++j)
            *(uint4*)&As[st][ra + ROUND * j][4 * q] =
                make_uint4(to_tf32(av[j].x), to_tf32(av[j].y), to_tf32(av[j].z), to_tf32(av[j].w));
        if (has_b) {
#pragma unroll
            for (int j = 0; j < BJ; ++j) *(uint4*)&Bs[st][rb + ROUND * j][4 * q] = bv[j];
        }
        __syncthreads();
        // The next tile's loads are in flight while the tensor cores work on this one.
        if (t + 1 < t1) {
            v3_next<ADJOINT, BK>(p, f, tp);
            v3_load<ADJOINT, AJ, BJ>(p, src, mask_y, masked, wt, tp, rows, av, has_b, wrow, bv);
        }
        tc_tile_mma_v3<BK, 16 * LDA, LDB, 2, 4>(a_row, st * BM * LDA, b_pair, st * BN * LDB, acc);
    }
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int r2 = 0; r2 < 2; ++r2) {
            int oy, ox, ry, rx;
            const int n = v3_row(p, f, m0 + wm * 32 + mi * 16 + g + 8 * r2, oy, ox, ry, rx);
            if (n < 0) continue;
            const int m = (n * p.hp + oy) * p.wp + ox;  // the row of `out`
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int r1 = 0; r1 < 2; ++r1) {
                    const int nn = n0 + wn * 32 + ni * 8 + 2 * t + r1;
                    if (nn < N) {
                        const float v = acc[mi][ni][2 * r2 + r1];
                        if (splits > 1)
                            out[((size_t)split * p.batch * p.hp * p.wp + m) * N + nn] = v;
                        else
                            tc_epilogue(&out[m * N + nn], v, bias, nn, relu, accumulate);
                    }
                }
        }
}

// As conv_igemm_{direct,adjoint}_tf32, with cs % 16 == 0 and the weights as wt from
// conv_w_nk_tf32; block 256, dynamic shared memory V3Smem<WN, BK>::BYTES. `*_v3_*`: 128 × 64
// tiles, grid (ceil(M / 128), ceil(n / 64), 1); `*_v3n32_*` (n ≤ 32): 256 × 32 tiles, grid
// (ceil(M / 256), 1, 1). `*_v3_k32_*`: 128 × 64 tiles with k-tiles of 32 (cs % 32 == 0);
// the others have k-tiles of 16. (256 × 32 tiles with k-tiles of 32 would hold 8 A rows per
// thread in flight: 156 registers, one block per SM.) The adjoint ones with
// stride s > 1 count M per phase, M = batch · ceil(hp/s) · ceil(wp/s), and have s² in z.
// splits > 1 (unphased only): `splits` in z, and out is the [splits][batch·hp·wp][n] partial
// products (bias, relu and accumulate are then conv_splitk_reduce_f32's).
#define V3_ENTRY(NAME, ADJ, WN, BK)                                                                          \
    extern "C" __global__ void __launch_bounds__(V3_THREADS)                                               \
        NAME(ConvGemm p, const float* __restrict__ src, const float* __restrict__ mask_y, int masked,      \
             const unsigned* __restrict__ wt, const float* __restrict__ bias, int relu, int accumulate,      \
             int splits, float* __restrict__ out) {                                                        \
        conv_igemm_v3<ADJ, WN, BK>(p, src, mask_y, masked, wt, bias, relu, accumulate, splits, out);     \
    }
V3_ENTRY(conv_igemm_direct_v3_tf32, false, 2, 16)
V3_ENTRY(conv_igemm_adjoint_v3_tf32, true, 2, 16)
V3_ENTRY(conv_igemm_direct_v3n32_tf32, false, 1, 16)
V3_ENTRY(conv_igemm_adjoint_v3n32_tf32, true, 1, 16)
V3_ENTRY(conv_igemm_direct_v3_k32_tf32, false, 2, 32)
V3_ENTRY(conv_igemm_adjoint_v3_k32_tf32, true, 2, 32)

// ---- Version 5 for at most 4 gathered channels (`c4`): two taps per k-step ----
// The first encoder layer gathers the image's 3 channels and the input gradient of the decoders'
// last layer gathers its 4 (RGB + alpha): not multiples of 16, so version 2 took them, ~2.5 ms
// of the clevr6 step for ~44 GFLOP (its dW aside). Here a source pixel's channels, padded to 4,
// are one 16-byte row of the halo, and one k-step of the mma (8 deep) is two taps: the lanes
// that address ldmatrix's matrices 0–1 (k 0–3) point at their pixel under tap 2j, those of
// matrices 2–3 (k 4–7) under tap 2j + 1 (a lane supplies its own row's address; 8 consecutive
// pixels are 128 contiguous bytes, conflict-free). An odd tap count pads the last step with
// zero weights (its A lanes read tap 0). Every tap's weights fit in shared memory (NT × 104
// words at 5×5) and are staged once per block, TF32-rounded from W itself (no conv_w_nk_tf32
// pass: K = k²·cs is no multiple of 8 here); the block then walks output tiles of 8 × 16
// pixels, the next tile's halo (one pixel per thread) loading while the current one computes.
// Stride 1; the adjoint gather as a direct one mirrored, as in version 5.
template <int K>
struct C4Smem {
    static constexpr int HH = V5_TH + K - 1, HW = V5_TW + K - 1;  // the halo
    static constexpr int STEPS = (K * K + 1) / 2;                 // k-steps of two taps
    static constexpr int LDB = 8 * STEPS;  // ≡ 8 (mod 16) at K = 3 (40) and 5 (104): conflict-free B pairs
};

// The source pixel (sy, sx) of image img of src [batch, hs, ws, cs] (cs ≤ 4), its channels
// padded to 4 with zeros (also outside the image), through the ReLU mask for a gradient.
static __device__ __forceinline__ float4 c4_pixel(const float* __restrict__ src, const float* __restrict__ mask_y,
                                                  int masked, int hs, int ws, int cs, int img, int sy, int sx) {
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if ((unsigned)sy >= (unsigned)hs || (unsigned)sx >= (unsigned)ws) return v;
    const size_t idx = (((size_t)img * hs + sy) * ws + sx) * cs;
    if (cs == 4) {
        v = ld_f4(src + idx);
        return masked ? relu_masked(v, mask_y + idx) : v;
    }
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int ch = 0; ch < 3; ++ch)
        if (ch < cs) c[ch] = masked && !(mask_y[idx + ch] > 0.0f) ? 0.0f : src[idx + ch];
    return make_float4(c[0], c[1], c[2], c[3]);
}

// grid (g, ⌈n/NT⌉) for any g ≤ tiles = batch · ⌈hp/8⌉ · ⌈wp/16⌉ (the blocks stride over the
// output tiles), block 256; p.cs ≤ 4, p.stride == 1, p.k == K, NT = 64 (n > 32) or 32. W raw
// (p.w_nc as for conv_w_nk_tf32). Other arguments as conv_igemm_v5 (conv_tc_v5.cuh).
template <bool ADJOINT, int K, int NT>
static __device__ void conv_igemm_c4(const ConvGemm& p, const float* __restrict__ src,
                                     const float* __restrict__ mask_y, int masked, const float* __restrict__ w,
                                     const float* __restrict__ bias, int relu, int accumulate,
                                     float* __restrict__ out) {
    using S = C4Smem<K>;
    constexpr int KK = K * K, LDB = S::LDB, HALO_PX = S::HH * S::HW;
    constexpr int MI = NT == 64 ? 2 : 1, NI = 4;  // a warp's m16 and n8 tiles
    static_assert(HALO_PX <= V3_THREADS, "one halo pixel per thread");
    __shared__ __align__(16) unsigned halo[HALO_PX * 4];
    __shared__ __align__(16) unsigned Bs[NT * LDB];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    // NT 64: tile rows 2·wm, 2·wm + 1, channels wn·32..; NT 32: tile row wm, channels 0..31.
    const int wm = NT == 64 ? warp >> 1 : warp, wn = NT == 64 ? warp & 1 : 0;
    const int N = p.n, n0 = blockIdx.y * NT;
    // The weights, once: word 8·j + 2·c + h of column row nn is tap 2j + h (a halo offset;
    // mirrored for the adjoint gather), channel c: k slot 4h + c of step j in the pair order of
    // tc_tile_mma_v3 (k0 k4 k1 k5 …). Zero past the taps, the channels and the columns.
    for (int e = tid; e < NT * LDB; e += V3_THREADS) {
        const int nn = n0 + e / LDB, pos = e % LDB;
        const int t = 2 * (pos >> 3) + (pos & 1), c = (pos >> 1) & 3;
        float v = 0.0f;
        if (t < KK && c < p.cs && nn < N) {
            const int tap = ADJOINT ? KK - 1 - t : t;
            const int a = p.w_nc ? nn : c, b = p.w_nc ? c : nn, bdim = p.w_nc ? p.cs : N;
            v = w[(a * bdim + b) * KK + tap];
        }
        Bs[e] = to_tf32(v);
    }
    const int tiles_x = (p.wp + V5_TW - 1) / V5_TW, tiles_y = (p.hp + V5_TH - 1) / V5_TH;
    const int per_img = tiles_x * tiles_y, tiles = p.batch * per_img;
    const int pad = ADJOINT ? K - 1 - p.pad : p.pad;
    // This thread's halo pixel of a tile (row-major over HH × HW), if any.
    const bool has_px = tid < HALO_PX;
    const int hy = tid / S::HW, hx = tid % S::HW;
    auto load_px = [&](int tile) {
        const int img = tile / per_img, r = tile % per_img;
        const int sy = (r / tiles_x) * V5_TH - pad + hy, sx = (r % tiles_x) * V5_TW - pad + hx;
        return c4_pixel(src, mask_y, masked, p.hs, p.ws, p.cs, img, sy, sx);
    };
    float4 next = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (has_px && (int)blockIdx.x < tiles) next = load_px(blockIdx.x);
    // The lane's ldmatrix row at tap offset 0: pixel (MI·wm, lane & 15) of the tile (mi = 1 is
    // the next tile row, HW pixels on); lanes 16–31 (k 4–7) add the odd tap's offset below.
    const SmemAddr a_row = smem_addr(&halo[((MI * wm) * S::HW + (lane & 15)) * 4]);
    const SmemAddr b_pair = smem_addr(&Bs[(wn * 32 + (lane >> 2)) * LDB + 2 * (lane & 3)]);
    const int odd = lane >> 4;
    const int g = lane >> 2, tq = lane & 3;
    const bool even_n = (N & 1) == 0;  // column pairs (2·tq, 2·tq + 1) stored as one float2
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        __syncthreads();  // the previous tile's fragment loads are done (the first time: nothing)
        if (has_px) *(uint4*)&halo[tid * 4] = tf32x4(next);
        __syncthreads();  // the halo (and the first time, the weights) is staged
        if (has_px && tile + (int)gridDim.x < tiles) next = load_px(tile + gridDim.x);
        float acc[MI][NI][4];
        zero_acc(acc);
#pragma unroll
        for (int j = 0; j < S::STEPS; ++j) {
            // This lane's tap; the padding tap of an odd count reads tap 0 (its weights are 0).
            const int t = 2 * j + odd < KK ? 2 * j + odd : 0;
            const int a_off = ((t / K) * S::HW + t % K) * 4;
            unsigned a[MI][4], b[NI][2];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) ldsm_x4(a[mi], a_row, a_off + mi * S::HW * 4);
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) lds_u2(b[ni], b_pair, ni * 8 * LDB + 8 * j);
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) mma_tf32_16x8x8(acc[mi][ni], a[mi], b[ni]);
        }
        const int img = tile / per_img, r = tile % per_img;
        const int oy0 = (r / tiles_x) * V5_TH, ox0 = (r % tiles_x) * V5_TW;
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int r2 = 0; r2 < 2; ++r2) {
                const int oy = oy0 + MI * wm + mi, ox = ox0 + g + 8 * r2;
                if (oy >= p.hp || ox >= p.wp) continue;
                const size_t m = ((size_t)img * p.hp + oy) * p.wp + ox;  // the row of `out`
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) {
                    const int nn = n0 + wn * 32 + ni * 8 + 2 * tq;
                    const float v0 = acc[mi][ni][2 * r2], v1 = acc[mi][ni][2 * r2 + 1];
                    if (even_n && nn < N) {
                        tc_epilogue_pair(&out[m * N + nn], v0, v1, bias, nn, relu, accumulate);
                    } else {
                        if (nn < N) tc_epilogue(&out[m * N + nn], v0, bias, nn, relu, accumulate);
                        if (nn + 1 < N) tc_epilogue(&out[m * N + nn + 1], v1, bias, nn + 1, relu, accumulate);
                    }
                }
            }
    }
}

// As conv_igemm_{direct,adjoint}_tf32 (version 2, same arguments: W raw) for stride 1, at most 4
// gathered channels and k = 3 or 5; `c4n32`: at most 32 output channels per block. Grid
// (at most batch · ⌈hp/8⌉ · ⌈wp/16⌉: the blocks stride over the output tiles, ⌈n/NT⌉), block 256, static shared memory.
#define C4_ENTRY(NAME, ADJ, K, NT)                                                                           \
    extern "C" __global__ void __launch_bounds__(V3_THREADS)                                               \
        NAME(ConvGemm p, const float* __restrict__ src, const float* __restrict__ mask_y, int masked,      \
             const float* __restrict__ w, const float* __restrict__ bias, int relu, int accumulate,         \
             float* __restrict__ out) {                                                                     \
        conv_igemm_c4<ADJ, K, NT>(p, src, mask_y, masked, w, bias, relu, accumulate, out);                  \
    }
C4_ENTRY(conv_igemm_direct_c4k3_tf32, false, 3, 64)
C4_ENTRY(conv_igemm_adjoint_c4k3_tf32, true, 3, 64)
C4_ENTRY(conv_igemm_direct_c4k5_tf32, false, 5, 64)
C4_ENTRY(conv_igemm_adjoint_c4k5_tf32, true, 5, 64)
C4_ENTRY(conv_igemm_direct_c4n32k3_tf32, false, 3, 32)
C4_ENTRY(conv_igemm_adjoint_c4n32k3_tf32, true, 3, 32)
C4_ENTRY(conv_igemm_direct_c4n32k5_tf32, false, 5, 32)
C4_ENTRY(conv_igemm_adjoint_c4n32k5_tf32, true, 5, 32)

// Split-K's second pass: for e < len = rows·n, s = Σ_z partial[z·len + e] (z < splits, in
// order), then out[e] = relu?(s + bias[e mod n]) (accumulate 0), relu?(s) (2) or out[e] += s
// (1): the epilogue the v3 pass applies when it is not split. One thread per element.
extern "C" __global__ void conv_splitk_reduce_f32(int splits, int len, int n, const float* __restrict__ partial,
                                                  const float* __restrict__ bias, int relu, int accumulate,
                                                  float* __restrict__ out) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= len) return;
    float s = 0.0f;
    for (int z = 0; z < splits; ++z) s += partial[(size_t)z * len + e];
    tc_epilogue(&out[e], s, bias, e % n, relu, accumulate);
}

// The weight-gradient GEMM (ConvDwGemm, conv_tc.cuh), version 1.
// grid (ceil(rows/64), ceil(k·k·cs/64), chunks), block 128: partial[z][i][kk] = the sum over
// chunk z (overwritten; every element is written).
extern "C" __global__ void __launch_bounds__(TC_THREADS)
conv_dw_partial_tf32(ConvDwGemm p, const float* __restrict__ a_src, const float* __restrict__ a_mask,
                     int a_masked, const float* __restrict__ b_src, const float* __restrict__ b_mask,
                     int b_masked, float* __restrict__ partial) {
    __shared__ unsigned As[TC_BM][TC_LD];
    __shared__ unsigned Bs[TC_BN][TC_LD];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;
    const int R = p.rows, N = p.k * p.k * p.cs, npos = p.batch * p.hp * p.wp;
    const int m0 = blockIdx.x * TC_BM, n0 = blockIdx.y * TC_BN;
    const int kbeg = blockIdx.z * p.chunk;
    const int kend = min(kbeg + p.chunk, npos);
    // This thread loads row q of both tiles (i = m0 + q of A, kk = n0 + q of B), for the
    // reduction columns mq0 + 2j (j < 8).
    const int q = tid & 63, mq0 = tid >> 6;
    const int i = m0 + q, kk = n0 + q;
    int c = 0, ky = 0, kx = 0;
    if (kk < N) split_k(kk, p.cs, p.k, c, ky, kx);
    float acc[2][4][4];
    zero_acc(acc);
    for (int k0 = kbeg; k0 < kend; k0 += TC_BK) {
        float av[8], bv[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int m = k0 + mq0 + 2 * j;
            float a = 0.0f, b = 0.0f;
            if (m < kend) {
                if (i < R) {
                    const int idx = m * R + i;
                    a = a_src[idx];
                    if (a_masked && !(a_mask[idx] > 0.0f)) a = 0.0f;
                }
                if (kk < N) {
                    const int px = m % p.wp;
                    const int t = m / p.wp;
                    const int py = t % p.hp, n = t / p.hp;
                    const int sy = py * p.stride - p.pad + ky, sx = px * p.stride - p.pad + kx;
                    if (sy >= 0 && sy < p.hs && sx >= 0 && sx < p.ws) {
                        const int idx = ((n * p.hs + sy) * p.ws + sx) * p.cs + c;
                        b = b_src[idx];
                        if (b_masked && !(b_mask[idx] > 0.0f)) b = 0.0f;
                    }
                }
            }
            av[j] = a;
            bv[j] = b;
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            As[q][mq0 + 2 * j] = to_tf32(av[j]);
            Bs[q][mq0 + 2 * j] = to_tf32(bv[j]);
        }
        __syncthreads();
        tc_tile_mma<TC_LD, TC_LD>(As, Bs, wm, wn, lane, acc);
    }
    store_dw_partial<false>(acc, partial + (size_t)blockIdx.z * R * N, R, N, m0 + wm * 32, n0 + wn * 32, lane);
}

// Version 3 of the weight-gradient partials, taken when rows and cs are multiples of 4. Blocks
// of 8 warps of 32 × 32, WM of them along the rows: WM = 2 gives 64 rows × 128 columns (two
// taps of a 64-channel layer), WM = 1 gives 32 × 256 for layers of at most 32 rows (the small
// models, which would leave half of a 64-row tile's tensor-core work on zero rows). Every column
// block reads all of its chunk's A rows (dy or x), so wide column tiles read A fewer times
// (12.5× instead of 25× for a 64-channel 5×5 layer), and neighbouring taps' B gathers overlap in
// L1. The stages are kept transposed in shared memory (reduction index first; row lengths ≡ 8
// mod 32 keep the fragment loads free of bank conflicts), so that both operands load 4
// consecutive rows i / columns kk with one 16-byte load; each thread's column group lies in one
// tap, fixed for the whole block. Two stages with the next k-tile's loads in flight during the
// mma, as conv_igemm_v3.
#define DW3_THREADS 256

template <int WM>
struct Dw3 {
    static constexpr int BM = 32 * WM, BN = 256 / WM;  // the block's tile
    static constexpr int LDA = BM + 8, LDB = BN + 8;    // shared-memory row lengths
    static constexpr int GA = BM / 4, GB = BN / 4;      // 4-wide row / column groups
    static constexpr int MA = DW3_THREADS / GA;         // A loaders per k-tile (the first 16 load)
    static constexpr int MB = DW3_THREADS / GB;         // B loaders per group; each loads BJ positions
    static constexpr int BJ = TC_BK / MB;
};

// A reduction position m of the dW GEMM and its (n, py, px) on the grid, stepped by TC_BK per
// k-tile with additions where the grid is at least TC_BK wide (one wrap at most), by division
// otherwise (e.g. a linear layer's 1×1 grid).
struct DwPos {
    int m, n, py, px;
};

static __device__ __forceinline__ DwPos dw_pos(const ConvDwGemm& p, int m) {
    DwPos q;
    q.m = m;
    q.px = m % p.wp;
    const int t = m / p.wp;
    q.py = t % p.hp;
    q.n = t / p.hp;
    return q;
}

static __device__ __forceinline__ void dw_pos_next(const ConvDwGemm& p, DwPos& q) {
    if (p.wp < TC_BK) {
        q = dw_pos(p, q.m + TC_BK);
        return;
    }
    q.m += TC_BK;
    q.px += TC_BK;
    if (q.px >= p.wp) {
        q.px -= p.wp;
        if (++q.py == p.hp) {
            q.py = 0;
            ++q.n;
        }
    }
}

// This thread's part of a k-tile at reduction position k0: A rows i..i+3 at position k0 + ma
// (when has_a), B columns kk..kk+3 (channel c of tap (ky, kx)) at the BJ consecutive positions
// from q (k0 + BJ·mb). When they lie in one row of the grid (all but the k-tiles that wrap; the
// same for a whole warp, whose threads share mb), their source pixels share a row and step by
// the stride: one address and one row test for all of them. Otherwise each position is
// stepped from q.
template <int WM>
static __device__ __forceinline__ void dw3_load(const ConvDwGemm& p, const float* __restrict__ a_src,
                                                const float* __restrict__ a_mask, int a_masked,
                                                const float* __restrict__ b_src, const float* __restrict__ b_mask,
                                                int b_masked, int k0, int kend, bool has_a, int ma, int i,
                                                const DwPos& q, int kk, int c, int ky, int kx, float4& av,
                                                float4 bv[]) {
    using T = Dw3<WM>;
    const int R = p.rows, N = p.k * p.k * p.cs;
    float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const int m = k0 + ma;
    if (has_a && m < kend && i < R) {
        const int idx = m * R + i;
        a = ld_f4(a_src + idx);
        if (a_masked) a = relu_masked(a, a_mask + idx);
    }
    av = a;
    if (q.px + T::BJ <= p.wp) {
        const int sy = q.py * p.stride - p.pad + ky, sx0 = q.px * p.stride - p.pad + kx;
        // (Unsigned: a negative coordinate fails the same test as one past the edge.)
        const bool row_ok = kk < N && (unsigned)sy < (unsigned)p.hs;
        const int idx0 = ((q.n * p.hs + sy) * p.ws + sx0) * p.cs + c;
#pragma unroll
        for (int j = 0; j < T::BJ; ++j) {
            float4 b = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (row_ok && q.m + j < kend && (unsigned)(sx0 + j * p.stride) < (unsigned)p.ws) {
                const int idx = idx0 + j * p.stride * p.cs;
                b = ld_f4(b_src + idx);
                if (b_masked) b = relu_masked(b, b_mask + idx);
            }
            bv[j] = b;
        }
        return;
    }
#pragma unroll
    for (int j = 0; j < T::BJ; ++j) {
        DwPos r = q;
        r.px += j;
        while (r.px >= p.wp) {  // (once at most unless the grid is narrower than BJ)
            r.px -= p.wp;
            if (++r.py == p.hp) {
                r.py = 0;
                ++r.n;
            }
        }
        float4 b = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (q.m + j < kend && kk < N) {
            const int sy = r.py * p.stride - p.pad + ky, sx = r.px * p.stride - p.pad + kx;
            if ((unsigned)sy < (unsigned)p.hs && (unsigned)sx < (unsigned)p.ws) {
                const int idx = ((r.n * p.hs + sy) * p.ws + sx) * p.cs + c;
                b = ld_f4(b_src + idx);
                if (b_masked) b = relu_masked(b, b_mask + idx);
            }
        }
        bv[j] = b;
    }
}

// acc += the warp's tile over one k-tile of the transposed stages (At[k][row], Bt[k][col]).
// The mma's rows g and g + 8 are the tile's rows 2g and 2g + 1 (store_dw_partial<true> writes
// them back there), so a lane's a0, a1 (and a2, a3) lie side by side: one 8-byte shared load
// each, in the register order mma takes. With LDA ≡ 8 (mod 32) a half-warp's 8-byte loads cover
// the 32 banks once.
// The lane's A fragments (g = lane / 4, t = lane % 4) of the warp's two m16 tiles, rows from
// wm·32, at k-step ks of the transposed stage At[k][row] (paired rows, as above); weight
// gradient versions 3 and 4.
template <int LDA>
static __device__ __forceinline__ void a_frags_paired(const unsigned (*At)[LDA], int ks, int wm, int g, int t,
                                                      unsigned a[2][4]) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
        const int r = wm * 32 + mi * 16 + 2 * g;
        const uint2 lo = *(const uint2*)&At[ks + t][r];
        const uint2 hi = *(const uint2*)&At[ks + t + 4][r];
        a[mi][0] = lo.x;
        a[mi][1] = lo.y;
        a[mi][2] = hi.x;
        a[mi][3] = hi.y;
    }
}

template <int LDA, int LDB>
static __device__ __forceinline__ void tc_tile_mma_t(const unsigned (*At)[LDA], const unsigned (*Bt)[LDB], int wm,
                                                     int wn, int lane, float acc[2][4][4]) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int ks = 0; ks < TC_BK; ks += 8) {
        unsigned a[2][4], b[4][2];
        a_frags_paired<LDA>(At, ks, wm, g, t, a);
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
            const int c = wn * 32 + ni * 8 + g;
            b[ni][0] = Bt[ks + t][c];
            b[ni][1] = Bt[ks + t + 4][c];
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) mma_tf32_16x8x8(acc[mi][ni], a[mi], b[ni]);
    }
}


// Sums over one chunk's positions of the block's A rows (sums_of == 1: into sums[z][R], by the
// blocks of the first column tile) or B columns (sums_of == 2: into sums[z][N], by the blocks of
// the first row tile), in f32 from the values as loaded (masked, not yet rounded to TF32); none
// when sums_of == 0. A bias
// gradient is such a sum (conv: of the A rows, dy; convT: of the B columns of the taps that
// reach every output once), so it costs no pass over dy of its own. The per-thread sums meet in
// shared memory (the stages, no longer needed) and are added in a fixed order.
template <int WM>
static __device__ __forceinline__ void dw3_operand_sums(const ConvDwGemm& p, unsigned* stage_a, unsigned* stage_b,
                                                        float4 as, float4 bs, bool has_a, int ma, int ga, int mb,
                                                        int gb, int m0, int n0, int sums_of,
                                                        float* __restrict__ sums) {
    using T = Dw3<WM>;
    const int R = p.rows, N = p.k * p.k * p.cs, tid = threadIdx.x;
    const bool do_a = sums_of == 1 && blockIdx.y == 0, do_b = sums_of == 2 && blockIdx.x == 0;
    if (!do_a && !do_b) return;  // uniform over the block
    __syncthreads();              // every warp is done with the stages
    float* red_a = (float*)stage_a;  // [TC_BK][BM]
    float* red_b = (float*)stage_b;  // [MB][BN]
    if (do_a && has_a) *(float4*)&red_a[ma * T::BM + 4 * ga] = as;
    if (do_b) *(float4*)&red_b[mb * T::BN + 4 * gb] = bs;
    __syncthreads();
    if (do_a && tid < T::BM && m0 + tid < R) {
        float s = 0.0f;
        for (int j = 0; j < TC_BK; ++j) s += red_a[j * T::BM + tid];
        sums[(size_t)blockIdx.z * R + m0 + tid] = s;
    }
    if (do_b && tid < T::BN && n0 + tid < N) {
        float s = 0.0f;
        for (int j = 0; j < T::MB; ++j) s += red_b[j * T::BN + tid];
        sums[(size_t)blockIdx.z * N + n0 + tid] = s;
    }
}

// DEPTH k-tiles of operands are loaded into registers ahead of the mma: the loads of k-tile
// t + DEPTH are issued right after k-tile t is stored. Unlike the activation passes, whose
// gathers mostly hit L1 (neighbouring taps of one output tile), every k-tile here is a new
// stretch of positions read from L2. (Measured on the H200: 95 → 90 ms of the clevr6 step's
// dW with DEPTH 2; the profile then showed those launches running in two waves, see
// dw_chunks in conv.rs, and latency-bound within a wave: L1TEX scoreboard stalls, 16 warps
// per SM.) With DEPTH = 2 the stage written in k-tile t is still t % 2, so the barrier protocol
// is unchanged; the loop is unrolled by DEPTH so that the register sets and stages are
// compile-time indices.
template <int WM, int DEPTH>
static __device__ void conv_dw_partial_v3(const ConvDwGemm& p, const float* __restrict__ a_src,
                                          const float* __restrict__ a_mask, int a_masked,
                                          const float* __restrict__ b_src, const float* __restrict__ b_mask,
                                          int b_masked, float* __restrict__ partial, int sums_of,
                                          float* __restrict__ sums) {
    using T = Dw3<WM>;
    static_assert(DEPTH == 1 || DEPTH == 2, "stage t % 2 must be free when k-tile t is stored");
    __shared__ __align__(16) unsigned At[2][TC_BK][T::LDA];
    __shared__ __align__(16) unsigned Bt[2][TC_BK][T::LDB];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / (8 / WM), wn = warp % (8 / WM);
    const int R = p.rows, N = p.k * p.k * p.cs, npos = p.batch * p.hp * p.wp;
    const int m0 = blockIdx.x * T::BM, n0 = blockIdx.y * T::BN;
    const int kbeg = blockIdx.z * p.chunk;
    const int kend = min(kbeg + p.chunk, npos);
    const int ga = tid % T::GA, ma = tid / T::GA, gb = tid % T::GB, mb = tid / T::GB;
    const bool has_a = ma < TC_BK;
    const int i = m0 + 4 * ga, kk = n0 + 4 * gb;
    int c = 0, ky = 0, kx = 0;
    if (kk < N) split_k(kk, p.cs, p.k, c, ky, kx);
    float acc[2][4][4];
    zero_acc(acc);
    const int ntiles = (kend - kbeg + TC_BK - 1) / TC_BK;
    // Register set s holds k-tile t with t % DEPTH == s; bq is the B position of the k-tile
    // loaded last (tiles are loaded in order).
    float4 av[DEPTH], bv[DEPTH][T::BJ];
    DwPos bq = dw_pos(p, kbeg + T::BJ * mb);
#pragma unroll
    for (int s = 0; s < DEPTH; ++s) {
        if (s > 0) dw_pos_next(p, bq);
        if (s < ntiles)
            dw3_load<WM>(p, a_src, a_mask, a_masked, b_src, b_mask, b_masked, kbeg + s * TC_BK, kend, has_a, ma, i,
                         bq, kk, c, ky, kx, av[s], bv[s]);
    }
    // The operand sums (see dw3_operand_sums), only in the blocks that write them: a uniform
    // branch, not 12 adds per k-tile in every block.
    const bool sum_a = sums_of == 1 && blockIdx.y == 0, sum_b = sums_of == 2 && blockIdx.x == 0;
    float4 as = make_float4(0.0f, 0.0f, 0.0f, 0.0f), bs = as;
    for (int t0 = 0; t0 < ntiles; t0 += DEPTH) {
#pragma unroll
        for (int s = 0; s < DEPTH; ++s) {
            const int t = t0 + s;
            if (t >= ntiles) break;  // (uniform over the block)
            // Stage t % 2 was last read in k-tile t − 2, before the barrier of k-tile t − 1.
            const int st = DEPTH == 2 ? s : (t & 1);
            if (sum_a) as = add4(as, av[s]);
            if (sum_b) {
#pragma unroll
                for (int j = 0; j < T::BJ; ++j) bs = add4(bs, bv[s][j]);
            }
            if (has_a) *(uint4*)&At[st][ma][4 * ga] = tf32x4(av[s]);
#pragma unroll
            for (int j = 0; j < T::BJ; ++j) *(uint4*)&Bt[st][T::BJ * mb + j][4 * gb] = tf32x4(bv[s][j]);
            __syncthreads();
            if (t + DEPTH < ntiles) {
                dw_pos_next(p, bq);
                dw3_load<WM>(p, a_src, a_mask, a_masked, b_src, b_mask, b_masked, kbeg + (t + DEPTH) * TC_BK, kend,
                             has_a, ma, i, bq, kk, c, ky, kx, av[s], bv[s]);
            }
            tc_tile_mma_t<T::LDA, T::LDB>(At[st], Bt[st], wm, wn, lane, acc);
        }
    }
    store_dw_partial<true>(acc, partial + (size_t)blockIdx.z * R * N, R, N, m0 + wm * 32, n0 + wn * 32, lane);
    dw3_operand_sums<WM>(p, &At[0][0][0], &Bt[0][0][0], as, bs, has_a, ma, ga, mb, gb, m0, n0, sums_of, sums);
}

// As conv_dw_partial_tf32 (same output), with rows % 4 == 0 and cs % 4 == 0; block 256; plus
// the operand sums of dw3_operand_sums (sums_of: 0 none, 1 A rows, 2 B columns).
// `conv_dw_partial_v3_tf32`: 64 × 128 tiles, grid (ceil(rows / 64), ceil(k·k·cs / 128), chunks);
// `conv_dw_partial_v3r32_tf32` (rows ≤ 32): 32 × 256 tiles, grid (1, ceil(k·k·cs / 256), chunks).
#define DW3_ENTRY(NAME, WM, DEPTH)                                                                           \
    extern "C" __global__ void __launch_bounds__(DW3_THREADS)                                               \
        NAME(ConvDwGemm p, const float* __restrict__ a_src, const float* __restrict__ a_mask, int a_masked,    \
             const float* __restrict__ b_src, const float* __restrict__ b_mask, int b_masked,                \
             float* __restrict__ partial, int sums_of, float* __restrict__ sums) {                        \
        conv_dw_partial_v3<WM, DEPTH>(p, a_src, a_mask, a_masked, b_src, b_mask, b_masked, partial, sums_of, sums); \
    }
DW3_ENTRY(conv_dw_partial_v3_tf32, 2, 2)
DW3_ENTRY(conv_dw_partial_v3r32_tf32, 1, 2)

// ---- Version 4 of the weight-gradient partials: one row of taps per block ----
// Taken when rows % 32 == 0, cs % 32 == 0, k is 3 or 5 and the stride 1 or 2 (every 64-channel
// layer of the CLEVR model but the first and last, every 32-channel one of the small models). A
// block computes RM rows (64, or 32 when rows % 64 != 0: `v4r32`, 128 threads) × (the k taps
// (ky, 0..k−1) of one ky × 32 channels), and its k-tiles are "units": 16 consecutive positions
// px0..px0+15 of one grid row (n, py). The k taps of a unit read source pixels sx = (px0 + j)·s − pad + kx of one
// source row: together a strip of L = 15·s + k pixels, which the block loads once and reads
// each tap's B tile from at an offset (row kx + s·j of the strip). Version 3 loaded each tap's
// pixels separately: per 16 positions, 64 × 128 MACs for 12 KB of loads, here 64 × 32k MACs
// for 4 KB of A and 0.6–1.1 KB per tap of strip (k = 5, s = 1: 25 MACs per byte against 11),
// with a quarter of the load instructions per MAC. Two register sets of loads in flight, as
// in version 3.
// Operand sums for the bias gradient (dw3_operand_sums' job): sums_of 1, the A rows (conv: dy),
// by the blocks of blockIdx.y 0; sums_of 2 (convT: the sum of g over the whole output), by the
// blocks whose ky is in sum_kys (rows covering every output row once, from conv.rs): each
// channel summed over the strip pixels p in [own, own + 16·s), a range that the units of a grid
// row tile without overlap, into sums[z][(ky·k)·cs + c] (tap (ky, 0); conv_dw_reduce_f32 is
// given those taps).
// Each warp computes 32 rows × k n8 tiles whichever RM is: 4·RM threads (8 warps for 64 rows, 4
// for 32), so that the 32-row blocks keep the 64-row ones' work per warp and registers, and
// four of them share an SM where two 64-row blocks would.


// Strip elements (16-byte quads) each of THREADS threads loads: a strip of L pixels × 32
// channels is 8·L quads, L = (U − 1)·S + K for units of U positions.
template <int K, int S, int THREADS, int U = 16>
struct Dw4Strip {
    static constexpr int len = (U - 1) * S + K;
    static constexpr int loads = (8 * len + THREADS - 1) / THREADS;
};

// A quads each of THREADS = 4·RM threads loads for a unit of U positions × RM rows (U·RM/4
// quads): positions j, j + 16, … of the thread's row quad. And the mask registers a unit needs:
// B's per strip quad, or A's per A quad.
template <int K, int S, int RM, int U>
struct Dw4Unit {
    static constexpr int a_loads = (U + 15) / 16;
    static constexpr int strip_loads = Dw4Strip<K, S, 4 * RM, U>::loads;
    static constexpr int masks = a_loads > strip_loads ? a_loads : strip_loads;
};


// This thread's loads for the unit (n, py, px0 = U·seg): A positions j = tid / (RM / 4) + 16·r,
// rows i..i+3 (zero past the grid row's end or the unit); strip elements e = tid + 4·RM·r
// (pixel e / 8, channel quad e % 8, zero outside the source or past the strip).
// The ReLU masks are loaded here and applied when the unit is stored (dw4_apply_masks), a unit
// later: applied here, each masked load's value was needed at once and the warp waited out the
// load's whole latency right after the barrier, every unit (Nsight Compute, 92b00a8: 3.4 of the
// 9.7 cycles between a warp's instructions waiting on global loads). mq holds the masks of the
// one masked operand: B's element r in mq[r] when b_masked, else A's quad r in mq[r] when
// a_masked (conv_dw masks dy, which is A or B, never both; were both set, A is masked here at
// once).
template <int K, int S, int RM, int U>
static __device__ __forceinline__ void dw4_load(const ConvDwGemm& p, const float* __restrict__ a_src,
                                                const float* __restrict__ a_mask, int a_masked,
                                                const float* __restrict__ b_src, const float* __restrict__ b_mask,
                                                int b_masked, int n, int py, int seg, int i, int ky, int cb,
                                                float4 av[Dw4Unit<K, S, RM, U>::a_loads],
                                                float4 bv[Dw4Unit<K, S, RM, U>::strip_loads],
                                                float4 mq[Dw4Unit<K, S, RM, U>::masks]) {
    using Strip = Dw4Strip<K, S, 4 * RM, U>;
    const int tid = threadIdx.x, px0 = U * seg;
#pragma unroll
    for (int r = 0; r < Dw4Unit<K, S, RM, U>::a_loads; ++r) {
        const int j = tid / (RM / 4) + 16 * r;
        float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (!b_masked) mq[r] = a;
        if ((U % 16 == 0 || j < U) && px0 + j < p.wp) {  // (j < U: a unit of 40's last 8)
            const int idx = ((n * p.hp + py) * p.wp + px0 + j) * p.rows + i;
            a = ld_f4(a_src + idx);
            if (a_masked) {
                if (b_masked)
                    a = relu_masked(a, a_mask + idx);
                else
                    mq[r] = ld_f4(a_mask + idx);
            }
        }
        av[r] = a;
    }
    const int sy = py * S - p.pad + ky;
    const bool row_ok = (unsigned)sy < (unsigned)p.hs;
#pragma unroll
    for (int r = 0; r < Strip::loads; ++r) {
        const int e = tid + 4 * RM * r, px = e >> 3;
        const int sx = px0 * S - p.pad + px;
        float4 b = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (b_masked) mq[r] = b;
        if (row_ok && px < Strip::len && (unsigned)sx < (unsigned)p.ws) {
            const int idx = ((n * p.hs + sy) * p.ws + sx) * p.cs + cb + 4 * (e & 7);
            b = ld_f4(b_src + idx);
            if (b_masked) mq[r] = ld_f4(b_mask + idx);
        }
        bv[r] = b;
    }
}

// The masks dw4_load deferred, applied to a unit's operands before they are summed and stored.
template <int A_LOADS, int LOADS, int MASKS>
static __device__ __forceinline__ void dw4_apply_masks(int a_masked, int b_masked, float4 av[A_LOADS],
                                                       float4 bv[LOADS], const float4 mq[MASKS]) {
    if (b_masked) {
#pragma unroll
        for (int r = 0; r < LOADS; ++r) bv[r] = mask_by(bv[r], mq[r]);
    } else if (a_masked) {
#pragma unroll
        for (int r = 0; r < A_LOADS; ++r) av[r] = mask_by(av[r], mq[r]);
    }
}

// Versions 4 and 5 share what surrounds their loops: the first unit of a chunk, which strip
// elements count in the operand sums, the partials' store and the sums' reduction (the units
// themselves: conv_tc.cuh's dw4_unit_at and dw4_unit_next).

// The strip pixels whose sums count (sum_b), [own, own + U·s) with own = min(pad, k − s), a range
// that the units of a grid row tile without overlap: bit r says whether this thread's strip
// element r (pixel tid / 8 + r·THREADS / 8) lies in it. All of a thread's elements are one
// channel quad, so one accumulator sums them.
template <int K, int S, int THREADS, int U>
static __device__ __forceinline__ unsigned dw4_own_bits(int pad) {
    const int own = min(pad, K - S);
    unsigned bits = 0;
#pragma unroll
    for (int r = 0; r < Dw4Strip<K, S, THREADS, U>::loads; ++r) {
        const int px = ((int)threadIdx.x >> 3) + r * (THREADS / 8);
        if (px >= own && px < own + U * S && px < Dw4Strip<K, S, THREADS, U>::len) bits |= 1u << r;
    }
    return bits;
}

// A warp's partials, acc[mi][kx] for its MI m16 tiles × the K taps of its n8 column: the mma's
// rows g and g + 8 are the tile's rows 2g and 2g + 1 (the paired A loads), from row0 + 16·mi;
// columns 2t and 2t + 1 of channels cb + 8·wn.. of tap (ky, kx). out: the chunk's [rows][N].
template <int K, int MI>
static __device__ __forceinline__ void dw4_store_partials(const float (&acc)[MI][K][4], float* __restrict__ out,
                                                          int N, int cs, int ky, int cb, int row0, int wn,
                                                          int g, int t) {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int kx = 0; kx < K; ++kx) {
            const int nn = (ky * K + kx) * cs + cb + 8 * wn + 2 * t;
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int ii = row0 + mi * 16 + 2 * g + (r >= 2);
                out[ii * N + nn + (r & 1)] = acc[mi][kx][r];
            }
        }
}

// The block's operand sums in a fixed order: each thread's osum meets the others' in shared memory
// no longer read (red: sum_a's [THREADS / (RM / 4)][RM], a thread's float4 at its position row;
// redb: sum_b's [THREADS / 8][32 channels]), and the first threads add them up into sums_a[0..RM)
// or sums_b[0..32). Called by every thread of the block.
template <int RM, int THREADS>
static __device__ __forceinline__ void dw4_reduce_sums(float* red, float* redb, float4 osum, bool sum_a, bool sum_b,
                                                       float* __restrict__ sums_a, float* __restrict__ sums_b) {
    constexpr int QPR = RM / 4, ROWS = THREADS / QPR;
    const int tid = threadIdx.x;
    if (sum_a) *(float4*)&red[(tid / QPR) * RM + 4 * (tid % QPR)] = osum;
    if (sum_b) *(float4*)&redb[(tid >> 3) * 32 + 4 * (tid & 7)] = osum;
    __syncthreads();
    if (sum_a && tid < RM) {
        float v = 0.0f;
        for (int j = 0; j < ROWS; ++j) v += red[j * RM + tid];
        sums_a[tid] = v;
    }
    if (sum_b && tid < 32) {
        float v = 0.0f;
        for (int r = 0; r < THREADS / 8; ++r) v += redb[r * 32 + tid];
        sums_b[tid] = v;
    }
}

// grid (rows / RM, k · cs / 32, chunks), block 4·RM; p.chunk counts units (U positions of one
// grid row each: 16; 32 for 64-row blocks over rows a multiple of 32 wide, `u32`; 40 for
// 32-row blocks over rows 33 to 40 wide at stride 1, `u40`). partial[z][i][(ky·k + kx)·cs + c] as conv_dw_partial_v3 writes it. The
// stride S is a template parameter so that the strip's row length and each B fragment's offset
// in it are constants (with both at run time, the SASS of the loop spent 61 LEA and 86 IMAD on
// those addresses per 40 HMMA).
template <int K, int S, int RM, int DEPTH, int U = 16>
static __device__ void conv_dw_partial_v4(const ConvDwGemm& p, const float* __restrict__ a_src,
                                          const float* __restrict__ a_mask, int a_masked,
                                          const float* __restrict__ b_src, const float* __restrict__ b_mask,
                                          int b_masked, float* __restrict__ partial, int sums_of, unsigned sum_kys,
                                          float* __restrict__ sums) {
    static_assert(DEPTH == 1 || DEPTH == 2, "stage t % 2 must be free when unit t is stored");
    static_assert(S == 1 || S == 2, "strips of at most 35 pixels");
    static_assert(RM == 64 || RM == 32, "a warp's 32 rows, one or two warp rows");
    static_assert(U % 8 == 0 && U >= 16, "whole k-steps; the operand sums' 16 thread rows");
    constexpr int THREADS = 4 * RM, QPR = RM / 4;  // QPR: A quads per position (one thread each)
    using Strip = Dw4Strip<K, S, THREADS, U>;
    using Unit = Dw4Unit<K, S, RM, U>;
    constexpr int LDA = RM + 8;  // ≡ 8 (mod 32): the paired A fragment loads are conflict-free
    // Strip rows of 40 words (stride 1: the B fragment loads of lanes (g, t) hit banks 8t + g)
    // or 36 (stride 2: rows kx + 2t, banks 8t + g again).
    constexpr int ldb = S == 2 ? 36 : 40;
    constexpr int s = S, strip_len = Strip::len;
    __shared__ __align__(16) unsigned At[2][U][LDA];
    __shared__ __align__(16) unsigned Bs[2][strip_len * ldb];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp >> 2, wn = warp & 3;  // rows wm·32.., channels 8·wn.. of every tap
    const int N = K * K * p.cs;
    const int cblocks = p.cs / 32;
    const int ky = blockIdx.y / cblocks, cb = 32 * (blockIdx.y % cblocks);
    const int i0 = RM * blockIdx.x, i = i0 + 4 * (tid % QPR);
    const int segs = (p.wp + U - 1) / U, units = p.batch * p.hp * segs;
    const int ubeg = blockIdx.z * p.chunk, uend = min(ubeg + p.chunk, units);
    const int ntiles = max(uend - ubeg, 0);
    float acc[2][K][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int j = 0; j < K; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[mi][j][r] = 0.0f;
    // The unit loaded last, as (n, py, seg).
    int ln, lpy, lseg;
    dw4_unit_at(p, segs, min(ubeg, max(units - 1, 0)), ln, lpy, lseg);
    float4 av[DEPTH][Unit::a_loads], bv[DEPTH][Strip::loads], mq[DEPTH][Unit::masks];
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
        if (d > 0) dw4_unit_next(p, segs, ln, lpy, lseg);
        if (d < ntiles)
            dw4_load<K, S, RM, U>(p, a_src, a_mask, a_masked, b_src, b_mask, b_masked, ln, lpy, lseg, i, ky,
                               cb, av[d], bv[d], mq[d]);
    }
    const bool sum_a = sums_of == 1 && blockIdx.y == 0;
    const bool sum_b = sums_of == 2 && blockIdx.x == 0 && ((sum_kys >> ky) & 1u);
    // The strip elements whose sums count (sum_b); one accumulator serves the A sums or the B sums.
    const unsigned own_bits = dw4_own_bits<K, S, THREADS, U>(p.pad);
    float4 osum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    // This warp's n8 tiles: taps kx = 0..K−1, each over channels 8·wn..8·wn + 7 of the block's
    // 32, so that its B fragments are one base (lane and warp) plus constants (kx, k-step). (The
    // first mapping, tiles wn·K..wn·K + K − 1 of the 4K, gave each tile its own tap and channel
    // group at run time: ~45 instructions of addresses per unit and warp, recomputed in every
    // unit, 9.7 instructions per HMMA in all.)
    const int b_lane = s * t * ldb + 8 * wn + g;
    for (int t0 = 0; t0 < ntiles; t0 += DEPTH) {
#pragma unroll
        for (int d = 0; d < DEPTH; ++d) {
            const int tt = t0 + d;
            if (tt >= ntiles) break;  // (uniform over the block)
            const int st = DEPTH == 2 ? d : (tt & 1);
            dw4_apply_masks<Unit::a_loads, Strip::loads, Unit::masks>(a_masked, b_masked, av[d], bv[d], mq[d]);
            if (sum_a)
#pragma unroll
                for (int r = 0; r < Unit::a_loads; ++r) osum = add4(osum, av[d][r]);
            if (sum_b)
#pragma unroll
                for (int r = 0; r < Strip::loads; ++r)
                    if ((own_bits >> r) & 1u) osum = add4(osum, bv[d][r]);
#pragma unroll
            for (int r = 0; r < Unit::a_loads; ++r) {
                const int j = tid / QPR + 16 * r;
                if (U % 16 == 0 || j < U) *(uint4*)&At[st][j][4 * (tid % QPR)] = tf32x4(av[d][r]);
            }
#pragma unroll
            for (int r = 0; r < Strip::loads; ++r) {
                const int e = tid + THREADS * r, px = e >> 3;
                if (px < strip_len) *(uint4*)&Bs[st][px * ldb + 4 * (e & 7)] = tf32x4(bv[d][r]);
            }
            __syncthreads();
            if (tt + DEPTH < ntiles) {
                dw4_unit_next(p, segs, ln, lpy, lseg);
                dw4_load<K, S, RM, U>(p, a_src, a_mask, a_masked, b_src, b_mask, b_masked, ln, lpy, lseg, i,
                                   ky, cb, av[d], bv[d], mq[d]);
            }
#pragma unroll
            for (int ks = 0; ks < U; ks += 8) {
                unsigned a[2][4];
                a_frags_paired<LDA>(At[st], ks, wm, g, t, a);
#pragma unroll
                for (int kx = 0; kx < K; ++kx) {
                    unsigned b[2];
                    b[0] = Bs[st][b_lane + (kx + s * ks) * ldb];
                    b[1] = Bs[st][b_lane + (kx + s * (ks + 4)) * ldb];
#pragma unroll
                    for (int mi = 0; mi < 2; ++mi) mma_tf32_16x8x8(acc[mi][kx], a[mi], b);
                }
            }
        }
    }
    // (wm is 0 when RM is 32.)
    dw4_store_partials<K, 2>(acc, partial + (size_t)blockIdx.z * p.rows * N, N, p.cs, ky, cb, i0 + wm * 32, wn, g,
                             t);
    // The operand sums, through the (no longer needed) stages once every warp is done with them.
    if (!sum_a && !sum_b) return;  // uniform over the block
    __syncthreads();
    static_assert(THREADS / 8 * 32 <= 2 * strip_len * ldb, "sum_b's rows fit the stages");
    dw4_reduce_sums<RM, THREADS>((float*)&At[0][0][0] /* [16][RM] */, (float*)&Bs[0][0], osum, sum_a, sum_b,
                                 sums + (size_t)blockIdx.z * p.rows + i0,
                                 sums + (size_t)blockIdx.z * N + (ky * K) * p.cs + cb);
}

// As conv_dw_partial_v3_tf32 for k = 3 or 5 and stride 1 or 2 (`v4k<k>s<stride>`),
// rows % 64 == 0, cs % 32 == 0; block 256, grid (rows / 64, k · cs / 32, chunks of p.chunk
// units). sum_kys: the ky whose blocks sum g for sums_of 2 (a bit mask).
// (Two blocks per SM: sm_80's compiler took 159 registers for k = 5 without the bound, sm_90's
// 128 with or without it.)
#define DW4_THREADS 256
#define DW4_ENTRY(NAME, K, S)                                                                                \
    extern "C" __global__ void __launch_bounds__(DW4_THREADS, 2)                                            \
        NAME(ConvDwGemm p, const float* __restrict__ a_src, const float* __restrict__ a_mask, int a_masked,    \
             const float* __restrict__ b_src, const float* __restrict__ b_mask, int b_masked,                \
             float* __restrict__ partial, int sums_of, unsigned sum_kys, float* __restrict__ sums) {       \
        conv_dw_partial_v4<K, S, 64, 2>(p, a_src, a_mask, a_masked, b_src, b_mask, b_masked, partial, sums_of,   \
                                        sum_kys, sums);                                                     \
    }
DW4_ENTRY(conv_dw_partial_v4k3s1_tf32, 3, 1)
DW4_ENTRY(conv_dw_partial_v4k3s2_tf32, 3, 2)
DW4_ENTRY(conv_dw_partial_v4k5s1_tf32, 5, 1)
DW4_ENTRY(conv_dw_partial_v4k5s2_tf32, 5, 2)

// The 64-row blocks with units of 32 positions (`v4k<k>s<stride>u32`) for grid rows a multiple
// of 32 wide (clevr6's 128-wide layers and its decoder's 32- and 64-wide inputs): half the
// barriers of units of 16, and at stride 2 a strip of 67 pixels per 32 positions instead of
// 2 × 35. One set of loads in flight (DEPTH 1), as for units of 40: a unit's 40 mma per warp
// cover the next unit's loads as two units of 16 did. SASS (sm_90) of the loop, per 40 mma:
// k = 5 stride 1, 374 instructions (units of 16: 371); stride 2, 398 (512).
#define DW4U32_ENTRY(NAME, K, S)                                                                             \
    extern "C" __global__ void __launch_bounds__(DW4_THREADS, 2)                                            \
        NAME(ConvDwGemm p, const float* __restrict__ a_src, const float* __restrict__ a_mask, int a_masked,    \
             const float* __restrict__ b_src, const float* __restrict__ b_mask, int b_masked,                \
             float* __restrict__ partial, int sums_of, unsigned sum_kys, float* __restrict__ sums) {       \
        conv_dw_partial_v4<K, S, 64, 1, 32>(p, a_src, a_mask, a_masked, b_src, b_mask, b_masked, partial,       \
                                            sums_of, sum_kys, sums);                                        \
    }
DW4U32_ENTRY(conv_dw_partial_v4k3s1u32_tf32, 3, 1)
DW4U32_ENTRY(conv_dw_partial_v4k3s2u32_tf32, 3, 2)
DW4U32_ENTRY(conv_dw_partial_v4k5s1u32_tf32, 5, 1)
DW4U32_ENTRY(conv_dw_partial_v4k5s2u32_tf32, 5, 2)

// ---- Version 5 of the weight-gradient partials: warps of 64 rows, operands by cp.async ----
// Version 4 with units of 32 (`u32`: clevr6's 64-channel 5×5 layers, a quarter of its step)
// runs 8 warps of 32 rows × 5 n8 tiles: per k-step a warp loads 4 × 8 bytes of A fragments a
// lane and 9 distinct B words for 10 mma, 1.7 shared-memory wavefronts per mma (Nsight Compute,
// 65f2d71: L1 66 % busy, SM 42 %, 25 % occupancy held by 126 registers). Version 5 gives each of
// 4 warps all 64 rows: 8 × 8 bytes and the same 9 words for 20 mma, 1.25 wavefronts per mma,
// and twice the independent mma per k-step. The 40 more accumulators do not fit beside version
// 4's loads in flight (168 registers spilled 100–160 bytes), so the next unit's operands go to
// shared memory by cp.async instead of through registers: each thread copies its own quads
// (and the ReLU masks of the masked operand, into a mask stage) while the block computes the
// unit before, then waits for them, masks, sums and rounds them in place, and the barrier
// publishes them. Units, chunks, the partials' layout and the operand sums are version 4's.
// Counted with the copies and that in-place pass, version 5 moves more through shared memory
// than version 4 (2.6 or 2.4 wavefronts per mma against 2.0, benches/NOTES.md); measured on an
// H200 it is 7.4 % faster at stride 1, from its independent mma.
#define DW5_THREADS 128
template <int K, int S>
static __device__ void conv_dw_partial_v5(const ConvDwGemm& p, const float* __restrict__ a_src,
                                          const float* __restrict__ a_mask, int a_masked,
                                          const float* __restrict__ b_src, const float* __restrict__ b_mask,
                                          int b_masked, float* __restrict__ partial, int sums_of, unsigned sum_kys,
                                          float* __restrict__ sums) {
    constexpr int RM = 64, U = 32, THREADS = DW5_THREADS;
    constexpr int QPR = RM / 4, PP = THREADS / QPR;  // A quads per position; positions per pass (8)
    constexpr int A_LOADS = U / PP;
    using Strip = Dw4Strip<K, S, THREADS, U>;
    constexpr int LDA = RM + 8;  // as version 4: the paired A fragment loads are conflict-free
    constexpr int ldb = S == 2 ? 36 : 40;
    constexpr int s = S, strip_len = Strip::len;
    // The masks of the masked operand, in its stage's layout (one stage: a thread reads only the
    // words its own copies wrote, before the barrier after which it copies the next unit's).
    constexpr int MASK_WORDS = U * LDA > strip_len * ldb ? U * LDA : strip_len * ldb;
    __shared__ __align__(16) unsigned At[2][U][LDA];
    __shared__ __align__(16) unsigned Bs[2][strip_len * ldb];
    __shared__ __align__(16) float Mk[MASK_WORDS];
    const int tid = threadIdx.x, lane = tid & 31, wn = tid >> 5;  // warp wn: channels 8·wn.. of every tap
    const int g = lane >> 2, t = lane & 3;
    const int N = K * K * p.cs;
    const int cblocks = p.cs / 32;
    const int ky = blockIdx.y / cblocks, cb = 32 * (blockIdx.y % cblocks);
    const int i0 = RM * blockIdx.x, i = i0 + 4 * (tid % QPR);
    const int segs = (p.wp + U - 1) / U, units = p.batch * p.hp * segs;
    const int ubeg = blockIdx.z * p.chunk, uend = min(ubeg + p.chunk, units);
    const int ntiles = max(uend - ubeg, 0);
    // conv_tc_dw masks dy, which is A or B, never both; were both set, A would be masked from
    // global memory in `settle` (correct, slow).
    const bool mask_a = a_masked && !b_masked, mask_b = b_masked;
    const bool sum_a = sums_of == 1 && blockIdx.y == 0;
    const bool sum_b = sums_of == 2 && blockIdx.x == 0 && ((sum_kys >> ky) & 1u);
    const unsigned own_bits = dw4_own_bits<K, S, THREADS, U>(p.pad);  // (sum_b, as version 4)
    float4 osum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    // The unit in flight, as (n, py, seg).
    int ln, lpy, lseg;
    dw4_unit_at(p, segs, min(ubeg, max(units - 1, 0)), ln, lpy, lseg);
    // Copies of unit (ln, lpy, lseg) into stage st: A positions j = tid / QPR + PP·r, rows i..i+3
    // (zero past the grid row's end); strip elements e = tid + THREADS·r (pixel e / 8, channel
    // quad e % 8; zero outside the source).
    auto issue = [&](int st) {
        const int px0 = U * lseg;
#pragma unroll
        for (int r = 0; r < A_LOADS; ++r) {
            const int j = tid / QPR + PP * r;
            const bool ok = px0 + j < p.wp;
            const int idx = ok ? ((ln * p.hp + lpy) * p.wp + px0 + j) * p.rows + i : 0;
            cp_async16(&At[st][j][4 * (tid % QPR)], a_src + idx, ok);
            if (mask_a) cp_async16(&Mk[j * LDA + 4 * (tid % QPR)], a_mask + idx, ok);
        }
        const int sy = lpy * S - p.pad + ky;
        const bool row_ok = (unsigned)sy < (unsigned)p.hs;
#pragma unroll
        for (int r = 0; r < Strip::loads; ++r) {
            const int e = tid + THREADS * r, px = e >> 3;
            const int sx = px0 * S - p.pad + px;
            if (px < strip_len) {
                const bool ok = row_ok && (unsigned)sx < (unsigned)p.ws;
                const int idx = ok ? ((ln * p.hs + sy) * p.ws + sx) * p.cs + cb + 4 * (e & 7) : 0;
                cp_async16(&Bs[st][px * ldb + 4 * (e & 7)], b_src + idx, ok);
                if (mask_b) cp_async16(&Mk[px * ldb + 4 * (e & 7)], b_mask + idx, ok);
            }
        }
    };
    // This thread's copies into stage st, once they land: masked, added to the operand sums (in
    // f32, as loaded), rounded to TF32 in place.
    auto settle = [&](int st) {
        cp_async_wait_all();
        const int px0 = U * lseg;
#pragma unroll
        for (int r = 0; r < A_LOADS; ++r) {
            const int j = tid / QPR + PP * r;
            unsigned* q = &At[st][j][4 * (tid % QPR)];
            float4 v = *(const float4*)q;
            if (mask_a)
                v = mask_by(v, *(const float4*)&Mk[j * LDA + 4 * (tid % QPR)]);
            else if (a_masked && px0 + j < p.wp)
                v = relu_masked(v, a_mask + ((ln * p.hp + lpy) * p.wp + px0 + j) * p.rows + i);
            if (sum_a) osum = add4(osum, v);
            *(uint4*)q = tf32x4(v);
        }
#pragma unroll
        for (int r = 0; r < Strip::loads; ++r) {
            const int e = tid + THREADS * r, px = e >> 3;
            if (px < strip_len) {
                unsigned* q = &Bs[st][px * ldb + 4 * (e & 7)];
                float4 v = *(const float4*)q;
                if (mask_b) v = mask_by(v, *(const float4*)&Mk[px * ldb + 4 * (e & 7)]);
                if (sum_b && ((own_bits >> r) & 1u)) osum = add4(osum, v);
                *(uint4*)q = tf32x4(v);
            }
        }
    };
    float acc[4][K][4];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int j = 0; j < K; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[mi][j][r] = 0.0f;
    if (ntiles > 0) {
        issue(0);
        settle(0);
    }
    __syncthreads();
    // As version 4: the warp's B fragments are one base plus constants (kx, k-step).
    const int b_lane = s * t * ldb + 8 * wn + g;
    for (int tt = 0; tt < ntiles; ++tt) {
        const int st = tt & 1;
        const bool more = tt + 1 < ntiles;  // (uniform over the block)
        // Stage st ^ 1 was last read in unit tt − 1, before the barrier that ended it.
        if (more) {
            dw4_unit_next(p, segs, ln, lpy, lseg);
            issue(st ^ 1);
        }
#pragma unroll
        for (int ks = 0; ks < U; ks += 8) {
            unsigned a[2][2][4];  // rows 32h.. of the block in a[h] (a_frags_paired's wm = h)
            a_frags_paired<LDA>(At[st], ks, 0, g, t, a[0]);
            a_frags_paired<LDA>(At[st], ks, 1, g, t, a[1]);
#pragma unroll
            for (int kx = 0; kx < K; ++kx) {
                unsigned b[2];
                b[0] = Bs[st][b_lane + (kx + s * ks) * ldb];
                b[1] = Bs[st][b_lane + (kx + s * (ks + 4)) * ldb];
#pragma unroll
                for (int mi = 0; mi < 4; ++mi) mma_tf32_16x8x8(acc[mi][kx], a[mi >> 1][mi & 1], b);
            }
        }
        if (more) settle(st ^ 1);
        __syncthreads();
    }
    dw4_store_partials<K, 4>(acc, partial + (size_t)blockIdx.z * p.rows * N, N, p.cs, ky, cb, i0, wn, g, t);
    // The operand sums, through the stages (every read of them ended at the loop's last barrier).
    if (!sum_a && !sum_b) return;  // uniform over the block
    static_assert(THREADS / 8 * 32 <= 2 * strip_len * ldb, "sum_b's rows fit the stages");
    dw4_reduce_sums<RM, THREADS>((float*)&At[0][0][0] /* [PP][RM] */, (float*)&Bs[0][0], osum, sum_a, sum_b,
                                 sums + (size_t)blockIdx.z * p.rows + i0,
                                 sums + (size_t)blockIdx.z * N + (ky * K) * p.cs + cb);
}

// `conv_dw_partial_v5k5s1_tf32`: as `conv_dw_partial_v4k5s1u32_tf32` (rows % 64 == 0, cs % 32 ==
// 0, grid rows a multiple of 32 wide; grid (rows / 64, 5 · cs / 32, chunks of p.chunk units of
// 32)), block DW5_THREADS. Stride 1 only: at stride 2 (clevr6's decoder, strips of 67 pixels)
// version 5 measured 2.8 % slower than `v4k5s2u32` (H200, b2e47cd: 4.340 against 4.224 ms per
// step), at stride 1 7.4 % faster (15.710 against 16.972).
#define DW5_ENTRY(NAME, K, S)                                                                                \
    extern "C" __global__ void __launch_bounds__(DW5_THREADS, 3)                                            \
        NAME(ConvDwGemm p, const float* __restrict__ a_src, const float* __restrict__ a_mask, int a_masked,    \
             const float* __restrict__ b_src, const float* __restrict__ b_mask, int b_masked,                \
             float* __restrict__ partial, int sums_of, unsigned sum_kys, float* __restrict__ sums) {       \
        conv_dw_partial_v5<K, S>(p, a_src, a_mask, a_masked, b_src, b_mask, b_masked, partial, sums_of,       \
                                 sum_kys, sums);                                                            \
    }
DW5_ENTRY(conv_dw_partial_v5k5s1_tf32, 5, 1)

// The same with 32-row blocks (`v4r32k<k>s<stride>`, rows % 32 == 0): block 128, grid
// (rows / 32, k · cs / 32, chunks). Four blocks per SM at stride 1 (128 registers, as the
// 64-row blocks); three at stride 2, whose three strip quads per thread and stage spilled 8
// bytes on sm_80 within 128.
#define DW4R32_THREADS 128
#define DW4R32_ENTRY(NAME, K, S, MIN_BLOCKS)                                                                 \
    extern "C" __global__ void __launch_bounds__(DW4R32_THREADS, MIN_BLOCKS)                                \
        NAME(ConvDwGemm p, const float* __restrict__ a_src, const float* __restrict__ a_mask, int a_masked,    \
             const float* __restrict__ b_src, const float* __restrict__ b_mask, int b_masked,                \
             float* __restrict__ partial, int sums_of, unsigned sum_kys, float* __restrict__ sums) {       \
        conv_dw_partial_v4<K, S, 32, 2>(p, a_src, a_mask, a_masked, b_src, b_mask, b_masked, partial, sums_of,   \
                                        sum_kys, sums);                                                     \
    }
DW4R32_ENTRY(conv_dw_partial_v4r32k3s1_tf32, 3, 1, 4)
DW4R32_ENTRY(conv_dw_partial_v4r32k3s2_tf32, 3, 2, 3)
DW4R32_ENTRY(conv_dw_partial_v4r32k5s1_tf32, 5, 1, 4)
DW4R32_ENTRY(conv_dw_partial_v4r32k5s2_tf32, 5, 2, 3)

// The 32-row blocks with units of 40 positions (`v4r32k<k>s1u40`, stride 1): for grids 33 to
// 40 wide (the small models' 35 × 35), which units of 16 cover in 3 (48 positions, 73 % used,
// three barriers per grid row), units of 40 in 1 (88 %, one barrier). A unit holds 5 k-steps
// (50 mma per warp between barriers, 20 with 16), so one set of loads in flight (DEPTH 1) hides
// as much latency as two of 16; two would not fit 128 registers (3 A + 3 strip quads a set).
// Block 128, grid (rows / 32, k · cs / 32, chunks of p.chunk units of 40).
#define DW4U40_ENTRY(NAME, K)                                                                                \
    extern "C" __global__ void __launch_bounds__(DW4R32_THREADS, 4)                                        \
        NAME(ConvDwGemm p, const float* __restrict__ a_src, const float* __restrict__ a_mask, int a_masked,    \
             const float* __restrict__ b_src, const float* __restrict__ b_mask, int b_masked,                \
             float* __restrict__ partial, int sums_of, unsigned sum_kys, float* __restrict__ sums) {       \
        conv_dw_partial_v4<K, 1, 32, 1, 40>(p, a_src, a_mask, a_masked, b_src, b_mask, b_masked, partial,       \
                                            sums_of, sum_kys, sums);                                        \
    }
DW4U40_ENTRY(conv_dw_partial_v4r32k3s1u40_tf32, 3)
DW4U40_ENTRY(conv_dw_partial_v4r32k5s1u40_tf32, 5)

// ---- Weight gradients for at most 4 gathered channels (`dw_c4`), on the CUDA cores ----
// The first encoder layer's dW gathers the image's 3 channels: a GEMM of 64 rows × 75 columns
// over a million positions (10 GFLOP). The decoders' last layer, a 3×3 transposed convolution
// to RGB + alpha, has the same shape in the transposed form (A = x over the input grid, 64
// rows; B = the gathered g, 4 channels): 64 × 36 over 7.3 M positions in the clevr6 step. Too
// narrow for the mma tiles to pay, so in f32 FMAs. A block walks its chunk of 8 × 16 position
// tiles, staging each tile's A rows ([128][ROWS]) and the halo of its source pixels (stride 1).
// Version 2 (this one): warp (half, ky) owns rows 32·half.. + 32 and the k taps of row ky; lane
// (pg, rq) = (lane / 8, lane % 8) owns rows 4·rq.. + 4 of them, and takes the tile's positions
// pg, pg + 4, … So per 4 positions a warp reads one float4 of A per lane (8 lanes of a phase:
// 128 contiguous bytes) and k float4 of the halo (each phase one pixel, a broadcast), for 16·k
// FMAs per lane; the 4 position groups' sums are added across lanes at the end (a fixed order).
// Version 1 gave a lane one row and a tap group: per position one A word and a float4 of halo
// per tap for 4 FMAs; a 16-byte load is served a quarter-warp at a time even when every lane
// reads the same address, so its shared-memory wavefronts (~13 per position and warp) bounded
// it: 2.76 ms for the clevr6 layer against ~0.9 ms of FMA issue (H200, 92b00a8).
// Block 32·(ROWS/32)·K (dwc4_threads), grid (chunks): block z sums tiles [z·chunk, (z + 1)·chunk)
// of the batch · ⌈hp/8⌉ · ⌈wp/16⌉ tiles into partial[z][n][tap·cs + c] (every element written);
// p.rows == ROWS, p.cs ≤ 4, p.stride == 1, p.k == K. sums_of 1: the A-row sums into sums[z][n]
// (conv: db); 0: none.
#define DWC4_MAX_THREADS 320  // 64 rows, k = 5
template <int K, int ROWS>
static __device__ void conv_dw_partial_c4(const ConvDwGemm& p, const float* __restrict__ a_src,
                                          const float* __restrict__ a_mask, int a_masked,
                                          const float* __restrict__ b_src, const float* __restrict__ b_mask,
                                          int b_masked, float* __restrict__ partial, int sums_of,
                                          float* __restrict__ sums) {
    constexpr int HH = V5_TH + K - 1, HW = V5_TW + K - 1, HALO_PX = HH * HW;
    constexpr int THREADS = 32 * (ROWS / 32) * K, TILE = V5_TH * V5_TW, QR = ROWS / 4;
    static_assert(THREADS <= DWC4_MAX_THREADS, "the entry's launch bound");
    __shared__ __align__(16) float As[TILE * ROWS];
    __shared__ __align__(16) float4 halo[HALO_PX];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int half = warp / K, ky = warp % K, pg = lane >> 3, rq = lane & 7;
    const int n0 = 32 * half + 4 * rq;  // this lane's rows n0..n0 + 3
    float acc[K][4][4];  // [kx][row][channel]
#pragma unroll
    for (int kx = 0; kx < K; ++kx)
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[kx][r][c] = 0.0f;
    float4 a_sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const bool sum_a = sums_of == 1 && ky == 0;
    const int tiles_x = (p.wp + V5_TW - 1) / V5_TW, tiles_y = (p.hp + V5_TH - 1) / V5_TH;
    const int per_img = tiles_x * tiles_y, tiles = p.batch * per_img;
    const int t_end = min((int)blockIdx.x * p.chunk + p.chunk, tiles);
    for (int tile = blockIdx.x * p.chunk; tile < t_end; ++tile) {
        const int img = tile / per_img, r = tile % per_img;
        const int py0 = (r / tiles_x) * V5_TH, px0 = (r % tiles_x) * V5_TW;
        __syncthreads();  // the previous tile's reads are done
        // A: position pp of the tile (row-major, 8 × 16), its ROWS values; zero past the grid.
        for (int e = tid; e < TILE * QR; e += THREADS) {
            const int pp = e / QR, q = e % QR;
            const int py = py0 + pp / V5_TW, px = px0 + pp % V5_TW;
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (py < p.hp && px < p.wp) {
                const size_t idx = (((size_t)img * p.hp + py) * p.wp + px) * ROWS + 4 * q;
                v = ld_f4(a_src + idx);
                if (a_masked) v = relu_masked(v, a_mask + idx);
            }
            *(float4*)&As[pp * ROWS + 4 * q] = v;
        }
        for (int e = tid; e < HALO_PX; e += THREADS)
            halo[e] = c4_pixel(b_src, b_mask, b_masked, p.hs, p.ws, p.cs, img, py0 - p.pad + e / HW,
                               px0 - p.pad + e % HW);
        __syncthreads();
        // A tile row at a time; the lane's positions in it, pg + 4·j, unrolled: its A reads and
        // halo reads take constant offsets from two addresses worked out once per row.
#pragma unroll 1
        for (int py = 0; py < V5_TH; ++py) {
            const float* a_row = As + (py * V5_TW + pg) * ROWS + n0;
            const float4* h_row = halo + (py + ky) * HW + pg;
#pragma unroll
            for (int j = 0; j < V5_TW / 4; ++j) {
                const float4 a = *(const float4*)(a_row + 4 * j * ROWS);
                if (sum_a) a_sum = add4(a_sum, a);
                const float av[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
                for (int kx = 0; kx < K; ++kx) {
                    const float4 x = h_row[4 * j + kx];
#pragma unroll
                    for (int rr = 0; rr < 4; ++rr) {
                        acc[kx][rr][0] += av[rr] * x.x;
                        acc[kx][rr][1] += av[rr] * x.y;
                        acc[kx][rr][2] += av[rr] * x.z;
                        acc[kx][rr][3] += av[rr] * x.w;
                    }
                }
            }
        }
    }
    // The four position groups' sums: lanes pg = 0..3 of a row quad are 8 apart.
#pragma unroll
    for (int kx = 0; kx < K; ++kx)
#pragma unroll
        for (int rr = 0; rr < 4; ++rr)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                float v = acc[kx][rr][c];
                v += __shfl_xor_sync(0xffffffffu, v, 8);
                v += __shfl_xor_sync(0xffffffffu, v, 16);
                acc[kx][rr][c] = v;
            }
    float sa[4] = {a_sum.x, a_sum.y, a_sum.z, a_sum.w};
#pragma unroll
    for (int rr = 0; rr < 4; ++rr) {
        sa[rr] += __shfl_xor_sync(0xffffffffu, sa[rr], 8);
        sa[rr] += __shfl_xor_sync(0xffffffffu, sa[rr], 16);
    }
    if (pg != 0) return;
#pragma unroll
    for (int rr = 0; rr < 4; ++rr) {
        float* out = partial + ((size_t)blockIdx.x * ROWS + n0 + rr) * K * K * p.cs;
#pragma unroll
        for (int kx = 0; kx < K; ++kx)
#pragma unroll
            for (int c = 0; c < 4; ++c)
                if (c < p.cs) out[(ky * K + kx) * p.cs + c] = acc[kx][rr][c];
        if (sum_a) sums[(size_t)blockIdx.x * ROWS + n0 + rr] = sa[rr];
    }
}

// As conv_dw_partial_v3_tf32 (same arguments; sums_of 2 is not taken) for rows 64 (`c4k<k>`)
// or 32 (`c4r32k<k>`), at most 4 gathered channels, stride 1 and k = 3 or 5; block
// 32·(rows/32)·k, grid (chunks of p.chunk tiles of 8 × 16 positions).
#define DWC4_ENTRY(NAME, K, ROWS)                                                                            \
    extern "C" __global__ void __launch_bounds__(DWC4_MAX_THREADS)                                         \
        NAME(ConvDwGemm p, const float* __restrict__ a_src, const float* __restrict__ a_mask, int a_masked,    \
             const float* __restrict__ b_src, const float* __restrict__ b_mask, int b_masked,                \
             float* __restrict__ partial, int sums_of, float* __restrict__ sums) {                         \
        conv_dw_partial_c4<K, ROWS>(p, a_src, a_mask, a_masked, b_src, b_mask, b_masked, partial, sums_of,     \
                                    sums);                                                                  \
    }
DWC4_ENTRY(conv_dw_partial_c4k3_f32, 3, 64)
DWC4_ENTRY(conv_dw_partial_c4k5_f32, 5, 64)
DWC4_ENTRY(conv_dw_partial_c4r32k3_f32, 3, 32)
DWC4_ENTRY(conv_dw_partial_c4r32k5_f32, 5, 32)

// ---- Weight gradients for at most 4 gathered channels, version 3: on the tensor cores ----
// (`dw_c4_tc`.) The same GEMM as conv_dw_partial_c4 (rows n of A over the positions, columns
// (tap, channel) of the gathered halo), but as TF32 mma: M = ROWS, N = the k² taps × 4
// channels in n8 tiles of two taps, K = the positions. The FMAs bounded version 2: the clevr6
// decoder's last layer (64 × 36 over 7.3 M positions) took 1.52 ms against its x's 1.88 GB
// (0.45 ms at the H200's copy rate; H200, b2e47cd); its 34 GFLOP are ~0.11 ms of mma. So the
// kernel is built to stream A: a block walks its chunk of 8 × 16 position tiles with the next
// tile's A rows (and, for a conv's masked dy, its mask) on the way by cp.async while the warps
// multiply the current one; the halo (≤ 240 pixels of ≤ 4 channels) goes through registers
// a tile ahead, as c4_pixel reads it (masked or not, 3 or 4 channels).
// Block 128: warp (pgp, rg) = (warp / RG, warp % RG) for RG = ROWS / 32 row groups owns rows
// 32·rg.. + 32 (two m16 tiles) and every column tile, over the k-steps s ≡ pgp (mod PG) of
// each tile (PG = 4 / RG position groups; k-step s = positions 8s..8s + 7 of the tile, half a
// tile row). The position groups' sums are added in a fixed order at the end.
// Shared memory (dynamic, dwc4tc_shared_bytes on the host): A [2][128][ROWS + 4] (a position's
// ROWS values, 4 words of pad: the fragment loads' 32 lanes fall on 32 banks), the halo
// [2][4 channel planes of PL words][HH rows of HWP], and the mask [2][128][ROWS + 4] when
// a_masked. The halo's row stride HWP = 20 ≡ 4 (mod 8) words and plane stride PL ≡ 8 or 24
// (mod 32): a B fragment load (lanes t: 4 positions, g % 4: the plane, g / 4: the tile's two
// taps) falls on 32 banks when its two taps are a halo row apart or 4 columns apart, which is
// how dwc4tc_tap pairs them (one pair per k, in the last tap row, is 1 column apart: 2-way).
#define DWC4TC_THREADS 128
template <int K>
struct Dwc4tcHalo {
    static constexpr int HH = V5_TH + K - 1;  // halo rows
    static constexpr int HW = V5_TW + K - 1;  // halo pixels per row
    static constexpr int HWP = 20;            // words per halo row of a plane
    static constexpr int PL = K == 3 ? 200 : 248;  // words per channel plane
    static constexpr int WORDS = 4 * PL;
    static constexpr int PX = HH * HW;  // pixels staged per tile
    static constexpr int NT8 = (K * K + 1) / 2;  // n8 column tiles: two taps each
    static_assert(HW <= HWP && HWP % 8 == 4 && HH * HWP <= PL && (PL % 32 == 8 || PL % 32 == 24),
                  "the halo's strides");
    static_assert(PX <= 2 * DWC4TC_THREADS, "two halo pixels per thread");
};

// The taps of column tile j (second: its columns 4..7; −1 for none, whose lanes read the first
// tap again and whose sums are dropped). Tap rows 2i and 2i + 1 pair column by column (a halo
// row apart); the last tap row (k odd) pairs kx = 0 with 4 (k = 5), then neighbours.
static __device__ __forceinline__ constexpr int dwc4tc_tap(int k, int j, int second) {
    return j < (k / 2) * k ? (j / k) * 2 * k + j % k + (second ? k : 0)
           : k == 3        ? (j == 3 ? (second ? 7 : 6) : (second ? -1 : 8))
           : j == 10       ? (second ? 24 : 20)
           : j == 11       ? (second ? 22 : 21)
                           : (second ? -1 : 23);
}

// Issues the cp.async copies of tile `tile`'s A rows (and mask) into buffer `dst` (mask_dst when
// masked): position pp's ROWS values at pp·(ROWS + 4); zeros past the grid.
template <int ROWS>
static __device__ __forceinline__ void dwc4tc_copy_a(const ConvDwGemm& p, const float* __restrict__ a_src,
                                                     const float* __restrict__ a_mask, int a_masked, int tile,
                                                     float* dst, float* mask_dst) {
    constexpr int QR = ROWS / 4, LDA = ROWS + 4, TILE = V5_TH * V5_TW;
    static_assert(DWC4TC_THREADS % QR == 0, "a thread's quad of rows is fixed");
    const int tiles_x = (p.wp + V5_TW - 1) / V5_TW, per_img = tiles_x * ((p.hp + V5_TH - 1) / V5_TH);
    const int img = tile / per_img, r = tile % per_img;
    const int py0 = (r / tiles_x) * V5_TH, px0 = (r % tiles_x) * V5_TW;
    const int q = threadIdx.x % QR;
#pragma unroll 4
    for (int pp = threadIdx.x / QR; pp < TILE; pp += DWC4TC_THREADS / QR) {
        const int py = py0 + pp / V5_TW, px = px0 + pp % V5_TW;
        const bool inside = py < p.hp && px < p.wp;
        const size_t idx = inside ? (((size_t)img * p.hp + py) * p.wp + px) * ROWS + 4 * q : 0;
        cp_async16(dst + pp * LDA + 4 * q, a_src + idx, inside);
        if (a_masked) cp_async16(mask_dst + pp * LDA + 4 * q, a_mask + idx, inside);
    }
}

// This thread's halo pixels of tile `tile` (pixel e = threadIdx.x + 128·i, row-major over
// HH × HW), as c4_pixel reads them.
template <int K>
static __device__ __forceinline__ void dwc4tc_load_halo(const ConvDwGemm& p, const float* __restrict__ b_src,
                                                        const float* __restrict__ b_mask, int b_masked, int tile,
                                                        float4 hv[2]) {
    using H = Dwc4tcHalo<K>;
    const int tiles_x = (p.wp + V5_TW - 1) / V5_TW, per_img = tiles_x * ((p.hp + V5_TH - 1) / V5_TH);
    const int img = tile / per_img, r = tile % per_img;
    const int py0 = (r / tiles_x) * V5_TH, px0 = (r % tiles_x) * V5_TW;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int e = threadIdx.x + DWC4TC_THREADS * i;
        hv[i] = e < H::PX ? c4_pixel(b_src, b_mask, b_masked, p.hs, p.ws, p.cs, img, py0 - p.pad + e / H::HW,
                                     px0 - p.pad + e % H::HW)
                          : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
}

// Stores them into halo buffer `dst`: channel c of pixel (hy, hx) at c·PL + hy·HWP + hx.
template <int K>
static __device__ __forceinline__ void dwc4tc_store_halo(const float4 hv[2], float* dst) {
    using H = Dwc4tcHalo<K>;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int e = threadIdx.x + DWC4TC_THREADS * i;
        if (e < H::PX) {
            float* at = dst + (e / H::HW) * H::HWP + e % H::HW;
            at[0] = hv[i].x;
            at[H::PL] = hv[i].y;
            at[2 * H::PL] = hv[i].z;
            at[3 * H::PL] = hv[i].w;
        }
    }
}

// The A fragments of k-step s (positions 8s..8s + 7 of a tile staged as [position][LDA]) for
// a warp's two m16 tiles: As and Ms point at the lane's word (position t, row g of the warp's
// 32); through the ReLU mask when a_masked; added to the A-row sums (f32, unrounded) when
// sum_a; rounded to TF32.
template <int LDA>
static __device__ __forceinline__ void dwtc_a_fragments(const float* As, const float* Ms, int a_masked, bool sum_a,
                                                        int s, float (&a_sum)[2][2], unsigned (&a)[2][4]) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            // r: rows + 8·(r & 1), positions + 4·(r >> 1)
            const int at = 8 * s * LDA + 4 * (r >> 1) * LDA + 16 * mi + 8 * (r & 1);
            float v = As[at];
            if (a_masked && !(Ms[at] > 0.0f)) v = 0.0f;
            if (sum_a) a_sum[mi][r & 1] += v;
            a[mi][r] = to_tf32(v);
        }
}

// The sums of the position groups of conv_dw_partial_c4tc and _k1tc: the A-row sums first
// over a row's 4 lanes (t), then warp (pgp, rg) of PG × RG adds its accumulators and A-row sums
// into warp (0, rg)'s, pairwise in a fixed order through `red` (shared memory, free by now, of
// at least 2·32·(8·NT8 + 4) floats): [slot][value][lane].
template <int NT8, int RG, int PG>
static __device__ __forceinline__ void dwtc_sum_position_groups(float (&acc)[2][NT8][4], float (&a_sum)[2][2],
                                                                float* red_base, int pgp, int rg, int lane) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float v = a_sum[mi][h];
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            a_sum[mi][h] = v;
        }
    constexpr int NRED = 2 * NT8 * 4 + 4;
#pragma unroll 1
    for (int span = PG / 2; span >= 1; span /= 2) {
        __syncthreads();
        if (pgp >= span && pgp < 2 * span) {
            float* red = red_base + ((pgp - span) * RG + rg) * NRED * 32 + lane;
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
                for (int j = 0; j < NT8; ++j)
#pragma unroll
                    for (int r = 0; r < 4; ++r) red[((mi * NT8 + j) * 4 + r) * 32] = acc[mi][j][r];
                red[(2 * NT8 * 4 + 2 * mi) * 32] = a_sum[mi][0];
                red[(2 * NT8 * 4 + 2 * mi + 1) * 32] = a_sum[mi][1];
            }
        }
        __syncthreads();
        if (pgp < span) {
            const float* red = red_base + (pgp * RG + rg) * NRED * 32 + lane;
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
                for (int j = 0; j < NT8; ++j)
#pragma unroll
                    for (int r = 0; r < 4; ++r) acc[mi][j][r] += red[((mi * NT8 + j) * 4 + r) * 32];
                a_sum[mi][0] += red[(2 * NT8 * 4 + 2 * mi) * 32];
                a_sum[mi][1] += red[(2 * NT8 * 4 + 2 * mi + 1) * 32];
            }
        }
    }
}

// Arguments and output as conv_dw_partial_c4 (grid (chunks of p.chunk tiles of 8 × 16
// positions), partial[z][n][tap·cs + c], every element written; sums_of 1: the A-row sums in
// f32, unrounded, into sums[z][n]); block DWC4TC_THREADS, dwc4tc_shared_bytes(ROWS, K,
// a_masked) of dynamic shared memory.
template <int K, int ROWS>
static __device__ void conv_dw_partial_c4tc(const ConvDwGemm& p, const float* __restrict__ a_src,
                                            const float* __restrict__ a_mask, int a_masked,
                                            const float* __restrict__ b_src, const float* __restrict__ b_mask,
                                            int b_masked, float* __restrict__ partial, int sums_of,
                                            float* __restrict__ sums) {
    using H = Dwc4tcHalo<K>;
    constexpr int LDA = ROWS + 4, TILE = V5_TH * V5_TW, A_WORDS = TILE * LDA, NT8 = H::NT8;
    constexpr int RG = ROWS / 32, PG = 4 / RG, STEPS = TILE / 8;
    static_assert(RG * PG * 32 == DWC4TC_THREADS, "4 warps");
    extern __shared__ __align__(16) float dwc4tc_smem[];
    float* const a_buf = dwc4tc_smem;                     // [2][A_WORDS]
    float* const h_buf = dwc4tc_smem + 2 * A_WORDS;       // [2][H::WORDS]
    float* const m_buf = h_buf + 2 * H::WORDS;            // [2][A_WORDS], when a_masked
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3, rg = warp % RG, pgp = warp / RG;
    // This lane's B words per column tile: plane g % 4, tap (g < 4 ? first : second), from the
    // halo position of the k-step's first pixel.
    int b_off[NT8];
#pragma unroll
    for (int j = 0; j < NT8; ++j) {
        const int hi = dwc4tc_tap(K, j, 1);
        const int tap = g >= 4 && hi >= 0 ? hi : dwc4tc_tap(K, j, 0);
        b_off[j] = (g & 3) * H::PL + (tap / K) * H::HWP + tap % K + t;
    }
    // A words of this lane: rows 32·rg + g (+8, +16, +24), positions t and t + 4 of a k-step.
    const int a_off = t * LDA + 32 * rg + g;
    float acc[2][NT8][4];
    zero_acc(acc);
    float a_sum[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};  // [mi][rows g, g + 8]
    const bool sum_a = sums_of == 1;
    const int tiles = p.batch * ((p.wp + V5_TW - 1) / V5_TW) * ((p.hp + V5_TH - 1) / V5_TH);
    const int t_first = blockIdx.x * p.chunk, t_end = min(t_first + p.chunk, tiles);
    float4 hv[2];
    if (t_first < t_end) {
        dwc4tc_copy_a<ROWS>(p, a_src, a_mask, a_masked, t_first, a_buf, m_buf);
        dwc4tc_load_halo<K>(p, b_src, b_mask, b_masked, t_first, hv);
        dwc4tc_store_halo<K>(hv, h_buf);
    }
    int buf = 0;
    for (int tile = t_first; tile < t_end; ++tile, buf ^= 1) {
        cp_async_wait_all();
        __syncthreads();  // this tile's A, mask and halo are in buffer buf; buffer buf ^ 1 is free
        const bool next = tile + 1 < t_end;
        if (next) {
            dwc4tc_copy_a<ROWS>(p, a_src, a_mask, a_masked, tile + 1, a_buf + (buf ^ 1) * A_WORDS,
                                m_buf + (buf ^ 1) * A_WORDS);
            dwc4tc_load_halo<K>(p, b_src, b_mask, b_masked, tile + 1, hv);
        }
        const float* As = a_buf + buf * A_WORDS + a_off;
        const float* Ms = m_buf + buf * A_WORDS + a_off;
        const float* Hs = h_buf + buf * H::WORDS;
#pragma unroll 2
        for (int s = pgp; s < STEPS; s += PG) {
            // k-step s: positions 8s.. of the tile, tile row s / 2, columns 8·(s % 2)..
            unsigned a[2][4];
            dwtc_a_fragments<LDA>(As, Ms, a_masked, sum_a, s, a_sum, a);
            const float* hs = Hs + (s >> 1) * H::HWP + 8 * (s & 1);
#pragma unroll
            for (int j = 0; j < NT8; ++j) {
                const unsigned b[2] = {to_tf32(hs[b_off[j]]), to_tf32(hs[b_off[j] + 4])};
                mma_tf32_16x8x8(acc[0][j], a[0], b);
                mma_tf32_16x8x8(acc[1][j], a[1], b);
            }
        }
        if (next) dwc4tc_store_halo<K>(hv, h_buf + (buf ^ 1) * H::WORDS);
    }
    static_assert(2 * 32 * (8 * NT8 + 4) <= 2 * A_WORDS, "the sums fit in the A buffers");
    dwtc_sum_position_groups<NT8, RG, PG>(acc, a_sum, a_buf, pgp, rg, lane);
    if (pgp != 0) return;
    // acc[mi][j][r]: row 32·rg + 16·mi + g + 8·(r >> 1), column 2t + (r & 1) of tile j: tap
    // (t < 2 ? first : second), channel 2·(t & 1) + (r & 1).
    const int cols = K * K * p.cs;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
        const int n = 32 * rg + 16 * mi + g;
        float* out = partial + ((size_t)blockIdx.x * ROWS + n) * cols;
#pragma unroll
        for (int j = 0; j < NT8; ++j) {
            const int tap = dwc4tc_tap(K, j, t >= 2);
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int c = 2 * (t & 1) + (r & 1);
                if (tap >= 0 && c < p.cs) out[(r >> 1) * 8 * cols + tap * p.cs + c] = acc[mi][j][r];
            }
        }
        if (sum_a && t == 0) {
            sums[(size_t)blockIdx.x * ROWS + n] = a_sum[mi][0];
            sums[(size_t)blockIdx.x * ROWS + n + 8] = a_sum[mi][1];
        }
    }
}

// As conv_dw_partial_c4*_f32 (same arguments) for rows 64 (`c4tck<k>`) or 32 (`c4tcr32k<k>`);
// block DWC4TC_THREADS, dynamic shared memory dwc4tc_shared_bytes. (A macro of its own: the
// emulator reads a kernel's launch bound from its entry macro's text, a number or a #define.)
#define DWC4TC_ENTRY(NAME, K, ROWS)                                                                          \
    extern "C" __global__ void __launch_bounds__(DWC4TC_THREADS)                                           \
        NAME(ConvDwGemm p, const float* __restrict__ a_src, const float* __restrict__ a_mask, int a_masked,    \
             const float* __restrict__ b_src, const float* __restrict__ b_mask, int b_masked,                \
             float* __restrict__ partial, int sums_of, float* __restrict__ sums) {                         \
        conv_dw_partial_c4tc<K, ROWS>(p, a_src, a_mask, a_masked, b_src, b_mask, b_masked, partial, sums_of,   \
                                      sums);                                                                \
    }
DWC4TC_ENTRY(conv_dw_partial_c4tck3_tf32, 3, 64)
DWC4TC_ENTRY(conv_dw_partial_c4tck5_tf32, 5, 64)
DWC4TC_ENTRY(conv_dw_partial_c4tcr32k3_tf32, 3, 32)
DWC4TC_ENTRY(conv_dw_partial_c4tcr32k5_tf32, 5, 32)

// ---- Weight gradients of 1×1 layers on the tensor cores, streamed (`dw_k1`) ----
// The linear layers' dW under TF32 run as 1×1 convolutions; the token chain's four (w_k, w_v
// and the MLP's two: 64 × 64 over every token, 1 M of them in the clevr6 step) took 1.47 ms on
// version 3 against the 2.15 GB their operands are (0.50 ms; H200, b2e47cd). This kernel is
// conv_dw_partial_c4tc with the halo replaced by B's own rows: a block walks its chunk of tiles
// of DWK1_TILE consecutive positions with both operands' next tile (and A's ReLU mask) on their
// way by cp.async while the warps multiply the current one. Warp (pgp, rg) = (warp / 2, warp %
// 2): rows 32·rg.. + 32 of the block's 64 (two m16 tiles) × all 64 columns (8 n8 tiles), over
// the k-steps s ≡ pgp (mod 2) of each tile. Both operands' rows are padded to 68 words: A and B
// fragment loads fall on 32 banks.
// grid (chunks of p.chunk tiles, p.rows / 64), block DWC4TC_THREADS, dynamic shared memory
// dwk1tc_shared_bytes on the host: A and B [2][DWK1_TILE][68], A's mask [2][DWK1_TILE][68] when
// a_masked. p.k == 1, p.stride == 1, p.pad == 0, p.cs == 64, p.rows a multiple of 64; the
// positions are the batch · hp · wp rows of both a_src ([position][p.rows]) and b_src
// ([position][64]); B is never masked (b_mask, b_masked unused: the host takes this kernel for
// a convolution's dW only, whose B is x). Output as conv_dw_partial_c4tc: partial[z][n][c] for
// the block's 64 rows n (every element written); sums_of 1: the A-row sums into sums[z][n].
#define DWK1_TILE 64
#define DWK1_LD 68

// Issues the cp.async copies of columns col0.. col0 + 63 of positions pos0.. pos0 + DWK1_TILE − 1
// of src ([position][ld]; zeros from position npos on) into dst: position pp at pp·DWK1_LD.
static __device__ __forceinline__ void dwk1_copy(const float* __restrict__ src, int ld, int col0, int pos0,
                                                 int npos, float* dst) {
    const int q = threadIdx.x % 16;
#pragma unroll
    for (int pp = threadIdx.x / 16; pp < DWK1_TILE; pp += DWC4TC_THREADS / 16) {
        const bool inside = pos0 + pp < npos;
        const size_t idx = inside ? (size_t)(pos0 + pp) * ld + col0 + 4 * q : 0;
        cp_async16(dst + pp * DWK1_LD + 4 * q, src + idx, inside);
    }
}

extern "C" __global__ void __launch_bounds__(DWC4TC_THREADS)
    conv_dw_partial_k1tc_tf32(ConvDwGemm p, const float* __restrict__ a_src, const float* __restrict__ a_mask,
                              int a_masked, const float* __restrict__ b_src, const float* __restrict__ b_mask,
                              int b_masked, float* __restrict__ partial, int sums_of, float* __restrict__ sums) {
    constexpr int RG = 2, PG = 2, NT8 = 8, STEPS = DWK1_TILE / 8, WORDS = DWK1_TILE * DWK1_LD;
    static_assert(RG * PG * 32 == DWC4TC_THREADS, "4 warps");
    extern __shared__ __align__(16) float dwk1_smem[];
    float* const a_buf = dwk1_smem;           // [2][WORDS]
    float* const b_buf = a_buf + 2 * WORDS;   // [2][WORDS]
    float* const m_buf = b_buf + 2 * WORDS;   // [2][WORDS], when a_masked
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3, rg = warp % RG, pgp = warp / RG;
    const int npos = p.batch * p.hp * p.wp, tiles = (npos + DWK1_TILE - 1) / DWK1_TILE;
    const int row0 = 64 * blockIdx.y;
    float acc[2][NT8][4];
    zero_acc(acc);
    float a_sum[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
    const bool sum_a = sums_of == 1;
    const int t_first = blockIdx.x * p.chunk, t_end = min(t_first + p.chunk, tiles);
    if (t_first < t_end) {
        dwk1_copy(a_src, p.rows, row0, t_first * DWK1_TILE, npos, a_buf);
        if (a_masked) dwk1_copy(a_mask, p.rows, row0, t_first * DWK1_TILE, npos, m_buf);
        dwk1_copy(b_src, 64, 0, t_first * DWK1_TILE, npos, b_buf);
    }
    int buf = 0;
    for (int tile = t_first; tile < t_end; ++tile, buf ^= 1) {
        cp_async_wait_all();
        __syncthreads();  // this tile's operands are in buffer buf; buffer buf ^ 1 is free
        if (tile + 1 < t_end) {
            const int pos0 = (tile + 1) * DWK1_TILE, nb = (buf ^ 1) * WORDS;
            dwk1_copy(a_src, p.rows, row0, pos0, npos, a_buf + nb);
            if (a_masked) dwk1_copy(a_mask, p.rows, row0, pos0, npos, m_buf + nb);
            dwk1_copy(b_src, 64, 0, pos0, npos, b_buf + nb);
        }
        const int lane_a = buf * WORDS + t * DWK1_LD + 32 * rg + g;
        const float* As = a_buf + lane_a;
        const float* Ms = m_buf + lane_a;
        const float* Bs = b_buf + buf * WORDS + t * DWK1_LD + g;  // position t, column g
#pragma unroll 2
        for (int s = pgp; s < STEPS; s += PG) {
            unsigned a[2][4];
            dwtc_a_fragments<DWK1_LD>(As, Ms, a_masked, sum_a, s, a_sum, a);
#pragma unroll
            for (int j = 0; j < NT8; ++j) {
                const unsigned b[2] = {to_tf32(Bs[8 * s * DWK1_LD + 8 * j]),
                                       to_tf32(Bs[(8 * s + 4) * DWK1_LD + 8 * j])};
                mma_tf32_16x8x8(acc[0][j], a[0], b);
                mma_tf32_16x8x8(acc[1][j], a[1], b);
            }
        }
    }
    static_assert(2 * 32 * (8 * NT8 + 4) <= 2 * WORDS, "the sums fit in the A buffers");
    dwtc_sum_position_groups<NT8, RG, PG>(acc, a_sum, a_buf, pgp, rg, lane);
    if (pgp != 0) return;
    // acc[mi][j][r]: row row0 + 32·rg + 16·mi + g + 8·(r >> 1), column 8j + 2t + (r & 1).
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
        const int n = row0 + 32 * rg + 16 * mi + g;
        float* out = partial + ((size_t)blockIdx.x * p.rows + n) * 64 + 2 * t;
#pragma unroll
        for (int j = 0; j < NT8; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) out[(r >> 1) * 8 * 64 + 8 * j + (r & 1)] = acc[mi][j][r];
        if (sum_a && t == 0) {
            sums[(size_t)blockIdx.x * p.rows + n] = a_sum[mi][0];
            sums[(size_t)blockIdx.x * p.rows + n + 8] = a_sum[mi][1];
        }
    }
}

// One column per weight: dW[i][c][ky][kx] += Σ_z partial[z][i][(ky·k + kx)·cs + c]. Then, when
// db_len > 0, one column per channel of the bias gradient from the operand sums of
// conv_dw_partial_v3_* (in the same launch: one fewer per layer): db[c] += Σ_z Σ_{tap in taps}
// sums[z][tap·db_len + c], taps in increasing order within each z. conv: the A-row sums
// (sums_len = db_len = rows, taps = 1); convT: the B-column sums (sums_len = k·k·cs, taps = the
// bit mask of the taps that reach every output position once). The z are split over rs_combine's
// groups (fixed order: deterministic). Block RS_THREADS, grid ceil((rows·k·k·cs + db_len) / RS_COLS).
// mirror: the partials are a convolution's weight gradient computed in the transposed form (rows
// its c_in, columns tap·c_out + c, the taps mirrored): dW[c][i][k−1−ky][k−1−kx] instead.
extern "C" __global__ void __launch_bounds__(RS_THREADS)
    conv_dw_reduce_f32(int chunks, int rows, int cs, int k, int mirror, const float* __restrict__ partial,
                       float* __restrict__ dw, int sums_len, int db_len, unsigned taps,
                       const float* __restrict__ sums, float* __restrict__ db) {
    __shared__ float sh[RS_GROUPS][RS_COLS];
    const int N = k * k * cs;
    const int e = rs_column(), g = rs_group();
    const int c = e - rows * N;  // the bias channel, when e is past the weights
    float s = 0.0f;
    if (e < rows * N) {
#pragma unroll 8
        for (int z = g; z < chunks; z += RS_GROUPS) s += partial[(size_t)z * rows * N + e];
    } else if (c < db_len) {
        for (int z = g; z < chunks; z += RS_GROUPS)
            for (int tap = 0; tap < 32; ++tap)
                if ((taps >> tap) & 1u) s += sums[(size_t)z * sums_len + tap * db_len + c];
    }
    s = rs_combine(s, sh);
    if (g != 0) return;
    if (e < rows * N) {
        const int i = e / N, kk = e % N;
        const int cc = kk % cs, tap = kk / cs;
        if (mirror)
            dw[((cc * rows + i) * k + k - 1 - tap / k) * k + k - 1 - tap % k] += s;
        else
            dw[((i * cs + cc) * k + tap / k) * k + tap % k] += s;
    } else if (c < db_len) {
        db[c] += s;
    }
}
