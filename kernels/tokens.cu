// tokens.cu: the per-token chain between the encoder's convolutions and slot attention, fused
// (shared-memory tiles of 32 tokens, widths up to 64). Two versions of the tile products:
// `*_f32` (version 1, exact f32 FMA: precision f32, and widths that are not multiples of 8) and
// `*_tf32` (version 2, TF32 mma.sync with f32 accumulation: precision tf32, every width a
// multiple of 8). Everything else (LayerNorms, ReLU masks, column sums) is f32 in both.
//
// Math (ops/tokens.rs), per token t of pixel p, e = encoder output [rows, c]:
//   x = e + pos(p)                      (soft position embedding, posembed.cu)
//   a = LN0(x);  h = relu(a·W1ᵀ + b1);  f = h·W2ᵀ + b2      (encoder MLP, 2 layers)
//   u = LN_in(f);  k = u·Wkᵀ;  v = u·Wvᵀ                     (slot attention's inputs)
// Forward writes x, a, h, f, u, k, v and both LayerNorms' mean/rstd (what the backward and the
// un-fused ops save); one read of e, one write of each output.
// Backward from dk, dv: du = dk·Wk + dv·Wv → LN_in backward → df → dh = (df·W2) ⊙ [h > 0]
// → da = dh·W1 → LN0 backward → dx (= d e: the position embedding passes it through).
// It writes df, dh (masked) and dx (all OVERWRITTEN) and reduces, per block, the column sums
// that the small parameters need (dγ, dβ of both LayerNorms, db1, db2, the position embedding's
// dW and db) into a partial row; tokens_bwd_reduce_f32 adds the rows in block order (+=).
// The four weight gradients (Σ_t outer products over 10⁶ tokens) are GEMMs: the launcher runs
// them with the linear layers' weight-gradient kernels.
//
// FLOPs (c = feat = d = 64): forward 2·64²·4 = 32.8 kFLOP per token; backward the same for the
// data path. Compulsory bytes per token: forward 4·(c + 2c + 2·feat + feat + 2d + 4) = 1.8 kB at
// 64 wide (reads e; writes x, a, h, f, u, k, v, stats); backward 4·(2d + feat + feat + c + 4
// + feat + feat + c) ≈ 1.8 kB. The weights (16 kB per matrix) are read from L2 once per tile.

#define TK_ROWS 32     // tokens per tile
#define TK_THREADS 128 // threads per block (4 warps)
#define TK_MAXD 64     // widest c, feat, d handled
#define TK_LD 68       // row stride of the shared tiles: 16-byte aligned rows for tk_gemm's reads;
                       // every other shared access runs along a row (conflict-free at any stride)

struct TokenDims {
    int rows;  // tokens: batch · h · w
    int h, w;  // the image grid (for the position embedding)
    int c, feat, d;
};

// The tile sweeps below index rows and columns without dividing by the run-time width: a
// 16-lane group per row and a float4 per lane when the width is a multiple of 4 (every width of
// version 2), a warp per row and a float per lane otherwise. (Version 2.0 split a flat index
// with `/ n` and `% n` per element, and the forward's position embedding ran two integer and two
// double divisions per element: the SASS of tokens_fwd_tf32 was mostly IMAD and ISETP.)
#define TK_QLANES 16                         // lanes per row, a float4 each (widths ≤ 64)
#define TK_QROWS (TK_THREADS / TK_QLANES)    // rows per sweep step
#define TK_WARPS (TK_THREADS / 32)

// T[r][0..n) ← src rows r0 + r (zeros past `rows`).
static __device__ void tk_load(float (*T)[TK_LD], const float* __restrict__ src, int r0, int rows, int n) {
    if ((n & 3) == 0) {
        const int l = threadIdx.x % TK_QLANES;
        if (4 * l >= n) return;
        for (int r = threadIdx.x / TK_QLANES; r < TK_ROWS; r += TK_QROWS) {
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (r0 + r < rows) v = ld_f4(src + (size_t)(r0 + r) * n + 4 * l);
            *(float4*)&T[r][4 * l] = v;
        }
        return;
    }
    const int lane = threadIdx.x & 31;
    for (int r = threadIdx.x >> 5; r < TK_ROWS; r += TK_WARPS)
        for (int col = lane; col < n; col += 32)
            T[r][col] = (r0 + r < rows) ? src[(size_t)(r0 + r) * n + col] : 0.0f;
}

// dst rows r0 + r ← T[r][0..n), valid rows only.
static __device__ void tk_store(const float (*T)[TK_LD], float* __restrict__ dst, int r0, int rows, int n) {
    if ((n & 3) == 0) {
        const int l = threadIdx.x % TK_QLANES;
        if (4 * l >= n) return;
        for (int r = threadIdx.x / TK_QLANES; r < TK_ROWS && r0 + r < rows; r += TK_QROWS)
            *(float4*)&dst[(size_t)(r0 + r) * n + 4 * l] = *(const float4*)&T[r][4 * l];
        return;
    }
    const int lane = threadIdx.x & 31;
    for (int r = threadIdx.x >> 5; r < TK_ROWS && r0 + r < rows; r += TK_WARPS)
        for (int col = lane; col < n; col += 32) dst[(size_t)(r0 + r) * n + col] = T[r][col];
}

// G[q][r] ← grid_q of the pixel of token r0 + r (grid_val), one thread per row: the forward's
// position embedding and the backward's sums for its parameters read them from here.
static __device__ void tk_pos_grid(float (*G)[TK_ROWS], int r0, int hw, int h, int w) {
    const int r = threadIdx.x;
    if (r >= TK_ROWS) return;
    const int pix = (r0 + r) % hw;
#pragma unroll
    for (int q = 0; q < 4; ++q) G[q][r] = grid_val(q, pix, h, w);
}

// A LayerNorm's per-row mean and 1/σ of the tile, to global (valid rows) and back (zeros past
// `rows`).
static __device__ void tk_store_stats(const float* mu, const float* rs, float* __restrict__ mean,
                                      float* __restrict__ rstd, int r0, int rows) {
    const int r = threadIdx.x;
    if (r < TK_ROWS && r0 + r < rows) {
        mean[r0 + r] = mu[r];
        rstd[r0 + r] = rs[r];
    }
}
static __device__ void tk_load_stats(float* mu, float* rs, const float* __restrict__ mean,
                                     const float* __restrict__ rstd, int r0, int rows) {
    const int r = threadIdx.x;
    if (r < TK_ROWS) {
        mu[r] = r0 + r < rows ? mean[r0 + r] : 0.0f;
        rs[r] = r0 + r < rows ? rstd[r0 + r] : 0.0f;
    }
}

// The weight tile B: one W [n_out][n_in] (nn.Linear's layout) at a time, laid out as the tile
// product of the version reads it. The forward's product is X·Wᵀ, B(k = i, n = j) = W[j][i];
// the backward's is X·W, B(k = j, n = i) = W[j][i].
//   v1 (FMA, tk_gemm): k-major, row stride TK_LD: B[k·TK_LD + n], rows read as float4 along n.
//   v2 (mma, tk_gemm_tc): TF32-rounded; X·Wᵀ n-major, B[n·TK_LD + k] (W's own layout); X·W
//   k-major, B[k·TK_LDK + n]. Both strides make the fragment reads conflict-free: lane (g, t)
//   reads bank 4g + t (n-major, 68 ≡ 4 mod 32) or 8t + g (k-major, 72 ≡ 8 mod 32).
// Every version reads W in order, 16 bytes per lane (n_in % 4 == 0; v1 reads one float at a time
// otherwise): coalesced. (Version 1 first read it transposed, lanes 4·n_in bytes apart: 32 sectors
// per warp load, 4096 L1 wavefronts per matrix per tile, more than its product's FMA time.)
#define TK_LDK 72
#define TK_BSIZE (TK_MAXD * TK_LDK)

// B ← tf32(x) as the float with those bits: the mma reads B's words as they are.
static __device__ __forceinline__ float tk_tf32(float x) { return __uint_as_float(to_tf32(x)); }

template <bool TC, bool TRANSPOSED>
static __device__ void tk_load_weights(float* B, const float* __restrict__ W, int n_in, int n_out) {
    if (!TC && (n_in & 3)) {  // v1 with odd widths: one float at a time, still in W's order
        for (int e = threadIdx.x; e < n_in * n_out; e += TK_THREADS) {
            const int j = e / n_in, i = e % n_in;
            B[TRANSPOSED ? i * TK_LD + j : j * TK_LD + i] = W[e];
        }
        return;
    }
    // Row j of W by the 16-lane group j % TK_QROWS, a float4 per lane.
    const int i = 4 * (threadIdx.x % TK_QLANES);
    if (i >= n_in) return;
    for (int j = threadIdx.x / TK_QLANES; j < n_out; j += TK_QROWS) {
        float4 w = ld_f4(W + j * n_in + i);
        if (TC) w = make_float4(tk_tf32(w.x), tk_tf32(w.y), tk_tf32(w.z), tk_tf32(w.w));
        const float wv[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int m = 0; m < 4; ++m) {
            const int k = TRANSPOSED ? i + m : j;  // B(k, n) = W[j][i + m]
            const int n = TRANSPOSED ? j : i + m;
            B[TC ? (TRANSPOSED ? n * TK_LD + k : k * TK_LDK + n) : k * TK_LD + n] = wv[m];
        }
    }
}

// For X·Wᵀ (the forward).
template <bool TC>
static __device__ void tk_load_wt(float* B, const float* __restrict__ W, int n_in, int n_out) {
    tk_load_weights<TC, true>(B, W, n_in, n_out);
}
// For X·W (the backward's input gradients).
template <bool TC>
static __device__ void tk_load_w(float* B, const float* __restrict__ W, int n_in, int n_out) {
    tk_load_weights<TC, false>(B, W, n_in, n_out);
}

// Y[r][n] (+)= relu?(Σ_k X[r][k]·B[k][n] + bias[n]) for n < n_out. Thread (ty, tx) = (tid/16,
// tid%16) owns rows 4ty..4ty+3 and columns 4tx..4tx+3, and takes k four at a time: a 16-byte
// read of each of its X rows (the 16 lanes of a row group read the same address: a broadcast)
// and of each of the 4 B rows (16 lanes, 256 contiguous bytes) feed 64 FMAs, 8 shared reads
// where version 1 needed 32 (it was bound by them). Each sum still runs over k in order.
// Columns past n_out are computed from unset B entries and never stored.
static __device__ void tk_gemm(const float (*X)[TK_LD], int n_k, const float* B, int n_out,
                               const float* __restrict__ bias, int relu, int accumulate, float (*Y)[TK_LD]) {
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
    float acc[4][4];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int m = 0; m < 4; ++m) acc[r][m] = 0.0f;
    const int n4 = n_k & ~3;
    for (int kk = 0; kk < n4; kk += 4) {
        float4 a[4], b[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) a[r] = *(const float4*)&X[4 * ty + r][kk];
#pragma unroll
        for (int i = 0; i < 4; ++i) b[i] = *(const float4*)&B[(kk + i) * TK_LD + 4 * tx];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const float ar[4] = {a[r].x, a[r].y, a[r].z, a[r].w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                acc[r][0] += ar[i] * b[i].x;
                acc[r][1] += ar[i] * b[i].y;
                acc[r][2] += ar[i] * b[i].z;
                acc[r][3] += ar[i] * b[i].w;
            }
        }
    }
    for (int kk = n4; kk < n_k; ++kk) {  // widths that are not multiples of 4
        float a[4], b[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) a[r] = X[4 * ty + r][kk];
#pragma unroll
        for (int m = 0; m < 4; ++m) b[m] = B[kk * TK_LD + 4 * tx + m];
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int m = 0; m < 4; ++m) acc[r][m] += a[r] * b[m];
    }
#pragma unroll
    for (int m = 0; m < 4; ++m) {
        const int n = 4 * tx + m;
        if (n >= n_out) continue;
        const float bn = bias ? bias[n] : 0.0f;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            float v = acc[r][m] + bn;
            if (relu && v < 0.0f) v = 0.0f;
            Y[4 * ty + r][n] = accumulate ? Y[4 * ty + r][n] + v : v;
        }
    }
}

// The same product on the tensor cores (version 2; n_k and n_out multiples of 8, B from
// tk_load_weights<true, …>: n-major when KMAJOR is false, k-major otherwise). Warp w computes
// rows 16·(w & 1) .. +16 and columns 32·(w >> 1) .. +32 as NT (≤ 4) 16×8 mma tiles; the X
// fragment is rounded to TF32 as it is read (X itself stays f32 for the LayerNorms). Each sum
// runs over k in steps of 8, in the mma's own order within a step. NT is a template parameter so
// that the tile loop has no branch between the mma instructions (with a run-time count the
// compiler put a WARPSYNC and a branch before each).
template <bool KMAJOR, int NT>
static __device__ __forceinline__ void tk_gemm_tc_tiles(const float (*X)[TK_LD], int n_k, const float* B, int m0,
                                                        int n0, const float* __restrict__ bias, int relu,
                                                        int accumulate, float (*Y)[TK_LD]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    float acc[NT][4];
#pragma unroll
    for (int ni = 0; ni < NT; ++ni)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[ni][q] = 0.0f;
#pragma unroll 2
    for (int k0 = 0; k0 < n_k; k0 += 8) {
        const unsigned a[4] = {to_tf32(X[m0 + g][k0 + t]), to_tf32(X[m0 + g + 8][k0 + t]),
                               to_tf32(X[m0 + g][k0 + t + 4]), to_tf32(X[m0 + g + 8][k0 + t + 4])};
#pragma unroll
        for (int ni = 0; ni < NT; ++ni) {
            const int n = n0 + 8 * ni + g;
            const unsigned b[2] = {
                __float_as_uint(KMAJOR ? B[(k0 + t) * TK_LDK + n] : B[n * TK_LD + k0 + t]),
                __float_as_uint(KMAJOR ? B[(k0 + t + 4) * TK_LDK + n] : B[n * TK_LD + k0 + t + 4])};
            mma_tf32_16x8x8(acc[ni], a, b);
        }
    }
#pragma unroll
    for (int ni = 0; ni < NT; ++ni) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int r = m0 + g + 8 * (q >> 1), n = n0 + 8 * ni + 2 * t + (q & 1);
            float v = acc[ni][q] + (bias ? bias[n] : 0.0f);
            if (relu && v < 0.0f) v = 0.0f;
            Y[r][n] = accumulate ? Y[r][n] + v : v;
        }
    }
}

template <bool KMAJOR>
static __device__ void tk_gemm_tc(const float (*X)[TK_LD], int n_k, const float* B, int n_out,
                                  const float* __restrict__ bias, int relu, int accumulate, float (*Y)[TK_LD]) {
    const int warp = threadIdx.x >> 5;
    const int m0 = 16 * (warp & 1), n0 = 32 * (warp >> 1);
    if (n0 >= n_out) return;  // whole warps: n_out ≤ 32 leaves warps 2 and 3 idle
    switch (min(4, (n_out - n0) >> 3)) {  // (the same for the whole warp)
        case 4: tk_gemm_tc_tiles<KMAJOR, 4>(X, n_k, B, m0, n0, bias, relu, accumulate, Y); break;
        case 3: tk_gemm_tc_tiles<KMAJOR, 3>(X, n_k, B, m0, n0, bias, relu, accumulate, Y); break;
        case 2: tk_gemm_tc_tiles<KMAJOR, 2>(X, n_k, B, m0, n0, bias, relu, accumulate, Y); break;
        default: tk_gemm_tc_tiles<KMAJOR, 1>(X, n_k, B, m0, n0, bias, relu, accumulate, Y); break;
    }
}

// Y (+)= relu?(X·B + bias) by the version's product: X·Wᵀ (forward, B from tk_load_wt) unless
// KMAJOR (X·W, B from tk_load_w).
template <bool TC, bool KMAJOR>
static __device__ __forceinline__ void tk_mm(const float (*X)[TK_LD], int n_k, const float* B, int n_out,
                                             const float* __restrict__ bias, int relu, int accumulate,
                                             float (*Y)[TK_LD]) {
    if (TC) tk_gemm_tc<KMAJOR>(X, n_k, B, n_out, bias, relu, accumulate, Y);
    else tk_gemm(X, n_k, B, n_out, bias, relu, accumulate, Y);
}

// LayerNorm of each tile row in place (one warp per row, as layernorm_fwd_f32); μ and 1/σ of
// row r land in mu[r], rs[r].
static __device__ void tk_layernorm(float (*T)[TK_LD], int n, const float* __restrict__ g,
                                    const float* __restrict__ b, float eps, float* mu, float* rs) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float fn = (float)n;
    for (int r = warp; r < TK_ROWS; r += TK_THREADS / 32) {
        float s = 0.0f;
        for (int i = lane; i < n; i += 32) s += T[r][i];
        const float m = warp_allsum(s) / fn;
        float q = 0.0f;
        for (int i = lane; i < n; i += 32) {
            const float dd = T[r][i] - m;
            q += dd * dd;
        }
        const float rstd = 1.0f / sqrtf(warp_allsum(q) / fn + eps);
        for (int i = lane; i < n; i += 32) T[r][i] = (T[r][i] - m) * rstd * g[i] + b[i];
        if (lane == 0) {
            mu[r] = m;
            rs[r] = rstd;
        }
    }
}

// LayerNorm backward of each tile row, in place on DY (X: the LayerNorm's input):
// DY ← r·(dy·γ − mean(dy·γ) − x̂·mean(dy·γ·x̂)), x̂ = (x − μ)·r.
static __device__ void tk_layernorm_bwd(const float (*X)[TK_LD], float (*DY)[TK_LD], int n,
                                        const float* __restrict__ g, const float* mu, const float* rs) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float fn = (float)n;
    for (int r = warp; r < TK_ROWS; r += TK_THREADS / 32) {
        float mg = 0.0f, mgx = 0.0f;
        for (int i = lane; i < n; i += 32) {
            const float gi = DY[r][i] * g[i];
            mg += gi;
            mgx += gi * (X[r][i] - mu[r]) * rs[r];
        }
        mg = warp_allsum(mg) / fn;
        mgx = warp_allsum(mgx) / fn;
        for (int i = lane; i < n; i += 32) {
            const float xh = (X[r][i] - mu[r]) * rs[r];
            DY[r][i] = rs[r] * (DY[r][i] * g[i] - mg - xh * mgx);
        }
    }
}

// Column sums over the tile's valid rows: dγ[i] += Σ dy·x̂, dβ[i] += Σ dy for i = threadIdx.x.
static __device__ void tk_layernorm_params(const float (*X)[TK_LD], const float (*DY)[TK_LD], int n, int valid,
                                           const float* mu, const float* rs, float& dg, float& db) {
    const int i = threadIdx.x;
    if (i >= n) return;
    for (int r = 0; r < valid; ++r) {
        dg += DY[r][i] * (X[r][i] - mu[r]) * rs[r];
        db += DY[r][i];
    }
}

// One block per tile of TK_ROWS tokens: grid ceil(rows / TK_ROWS), block TK_THREADS. Every output
// is overwritten. tokens_fwd_f32 / tokens_fwd_tf32 below (the _tf32 one needs c, feat and d
// multiples of 8).
template <bool TC>
static __device__ void tokens_fwd(TokenDims p, const float* __restrict__ enc, const float* __restrict__ wp,
               const float* __restrict__ bp, const float* __restrict__ g0, const float* __restrict__ be0,
               const float* __restrict__ w1, const float* __restrict__ b1, const float* __restrict__ w2,
               const float* __restrict__ b2, const float* __restrict__ gi, const float* __restrict__ bei,
               const float* __restrict__ wk, const float* __restrict__ wv, float eps, float* __restrict__ x_out,
               float* __restrict__ a_out, float* __restrict__ mean0, float* __restrict__ rstd0,
               float* __restrict__ h_out, float* __restrict__ f_out, float* __restrict__ u_out,
               float* __restrict__ mean_in, float* __restrict__ rstd_in, float* __restrict__ k_out,
               float* __restrict__ v_out) {
    __shared__ __align__(16) float X[TK_ROWS][TK_LD];
    __shared__ __align__(16) float Y[TK_ROWS][TK_LD];
    __shared__ __align__(16) float B[TK_BSIZE];
    __shared__ float mu[TK_ROWS], rs[TK_ROWS];
    __shared__ float G[4][TK_ROWS];
    const int rows = p.rows, c = p.c, feat = p.feat, d = p.d, hw = p.h * p.w;
    const int r0 = blockIdx.x * TK_ROWS;
    // x = e + pos: pos(ch) = bp[ch] + Σ_q wp[ch][q]·grid_q, summed as pos_val does.
    tk_pos_grid(G, r0, hw, p.h, p.w);
    tk_load(X, enc, r0, rows, c);
    tk_load_wt<TC>(B, w1, c, feat);
    __syncthreads();
    for (int ch = threadIdx.x & 31; ch < c; ch += 32) {  // a lane's channels, its rows inside
        const float b = bp[ch], w[4] = {wp[ch * 4], wp[ch * 4 + 1], wp[ch * 4 + 2], wp[ch * 4 + 3]};
        for (int r = threadIdx.x >> 5; r < TK_ROWS; r += TK_WARPS) {
            float pos = b;
#pragma unroll
            for (int q = 0; q < 4; ++q) pos += w[q] * G[q][r];
            float val = 0.0f;
            if (r0 + r < rows) {
                val = X[r][ch] + pos;
                x_out[(size_t)(r0 + r) * c + ch] = val;
            }
            X[r][ch] = val;
        }
    }
    __syncthreads();
    tk_layernorm(X, c, g0, be0, eps, mu, rs);
    __syncthreads();
    tk_store(X, a_out, r0, rows, c);
    tk_store_stats(mu, rs, mean0, rstd0, r0, rows);
    tk_mm<TC, false>(X, c, B, feat, b1, 1, 0, Y);
    __syncthreads();
    tk_store(Y, h_out, r0, rows, feat);
    tk_load_wt<TC>(B, w2, feat, feat);
    __syncthreads();
    tk_mm<TC, false>(Y, feat, B, feat, b2, 0, 0, X);
    __syncthreads();
    tk_store(X, f_out, r0, rows, feat);
    tk_load_wt<TC>(B, wk, feat, d);
    __syncthreads();
    tk_layernorm(X, feat, gi, bei, eps, mu, rs);
    __syncthreads();
    tk_store(X, u_out, r0, rows, feat);
    tk_store_stats(mu, rs, mean_in, rstd_in, r0, rows);
    tk_mm<TC, false>(X, feat, B, d, 0, 0, 0, Y);
    __syncthreads();
    tk_store(Y, k_out, r0, rows, d);
    tk_load_wt<TC>(B, wv, feat, d);
    __syncthreads();
    tk_mm<TC, false>(X, feat, B, d, 0, 0, 0, Y);
    __syncthreads();
    tk_store(Y, v_out, r0, rows, d);
}

#define TOKENS_FWD_ENTRY(NAME, TC)                                                                           \
    extern "C" __global__ void __launch_bounds__(TK_THREADS)                                                \
        NAME(TokenDims p, const float* __restrict__ enc, const float* __restrict__ wp,                      \
             const float* __restrict__ bp, const float* __restrict__ g0, const float* __restrict__ be0,     \
             const float* __restrict__ w1, const float* __restrict__ b1, const float* __restrict__ w2,      \
             const float* __restrict__ b2, const float* __restrict__ gi, const float* __restrict__ bei,     \
             const float* __restrict__ wk, const float* __restrict__ wv, float eps,                         \
             float* __restrict__ x_out, float* __restrict__ a_out, float* __restrict__ mean0,               \
             float* __restrict__ rstd0, float* __restrict__ h_out, float* __restrict__ f_out,               \
             float* __restrict__ u_out, float* __restrict__ mean_in, float* __restrict__ rstd_in,           \
             float* __restrict__ k_out, float* __restrict__ v_out) {                                        \
        tokens_fwd<TC>(p, enc, wp, bp, g0, be0, w1, b1, w2, b2, gi, bei, wk, wv, eps, x_out, a_out, mean0,  \
                       rstd0, h_out, f_out, u_out, mean_in, rstd_in, k_out, v_out);                         \
    }
TOKENS_FWD_ENTRY(tokens_fwd_f32, false)
TOKENS_FWD_ENTRY(tokens_fwd_tf32, true)

// The partial row of one block: [dγ_in | dβ_in | db2 | db1] (feat each), [dγ0 | dβ0] (c each),
// dW_pos [c][4], db_pos (c). 4·feat + 7·c floats.
static __device__ __forceinline__ int tk_partial_len(int c, int feat) { return 4 * feat + 7 * c; }

// Grid-stride over tiles (grid fixed by the launcher, so the block → tile map and the summation
// order do not depend on the device); block TK_THREADS. partial [gridDim.x][4·feat + 7·c]
// overwritten; df [rows, feat], dh [rows, feat], dx [rows, c] overwritten. tokens_bwd_f32 /
// tokens_bwd_tf32 below.
template <bool TC>
static __device__ void tokens_bwd(TokenDims p, const float* __restrict__ dk, const float* __restrict__ dv,
               const float* __restrict__ wk, const float* __restrict__ wv, const float* __restrict__ f,
               const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
               const float* __restrict__ gi, const float* __restrict__ w2, const float* __restrict__ h,
               const float* __restrict__ w1, const float* __restrict__ x, const float* __restrict__ mean0,
               const float* __restrict__ rstd0, const float* __restrict__ g0, float* __restrict__ df,
               float* __restrict__ dh, float* __restrict__ dx, float* __restrict__ partial) {
    __shared__ __align__(16) float X[TK_ROWS][TK_LD];
    __shared__ __align__(16) float Y[TK_ROWS][TK_LD];
    __shared__ __align__(16) float B[TK_BSIZE];
    __shared__ float mu[TK_ROWS], rs[TK_ROWS];
    __shared__ float G[4][TK_ROWS];
    const int rows = p.rows, c = p.c, feat = p.feat, d = p.d, hw = p.h * p.w;
    const int ntiles = (rows + TK_ROWS - 1) / TK_ROWS;
    const int t = threadIdx.x;
    // Thread t < width keeps column t's sums over all of this block's tiles.
    float s_gi = 0.0f, s_bi = 0.0f, s_b2 = 0.0f, s_b1 = 0.0f, s_g0 = 0.0f, s_be0 = 0.0f;
    float s_wp[4] = {0.0f, 0.0f, 0.0f, 0.0f}, s_bp = 0.0f;
    for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const int r0 = tile * TK_ROWS;
        const int valid = min(TK_ROWS, rows - r0);
        // du = dk·Wk + dv·Wv  (Y, [32 × feat]).
        tk_load(X, dk, r0, rows, d);
        tk_load_w<TC>(B, wk, feat, d);
        __syncthreads();
        tk_mm<TC, true>(X, d, B, feat, 0, 0, 0, Y);
        __syncthreads();
        tk_load(X, dv, r0, rows, d);
        tk_load_w<TC>(B, wv, feat, d);
        __syncthreads();
        tk_mm<TC, true>(X, d, B, feat, 0, 0, 1, Y);
        __syncthreads();
        // LN_in backward: X ← f; Y ← df.
        tk_load(X, f, r0, rows, feat);
        tk_load_stats(mu, rs, mean_in, rstd_in, r0, rows);
        tk_load_w<TC>(B, w2, feat, feat);
        __syncthreads();
        tk_layernorm_params(X, Y, feat, valid, mu, rs, s_gi, s_bi);
        __syncthreads();
        tk_layernorm_bwd(X, Y, feat, gi, mu, rs);
        __syncthreads();
        tk_store(Y, df, r0, rows, feat);
        if (t < feat)
            for (int r = 0; r < valid; ++r) s_b2 += Y[r][t];
        // dh = (df·W2) ⊙ [h > 0]  (X).
        tk_mm<TC, true>(Y, feat, B, feat, 0, 0, 0, X);
        __syncthreads();
        for (int r = t >> 5; r < TK_ROWS; r += TK_WARPS)
            for (int col = t & 31; col < feat; col += 32) {
                if (r < valid && h[(size_t)(r0 + r) * feat + col] > 0.0f) {
                    dh[(size_t)(r0 + r) * feat + col] = X[r][col];
                } else {
                    if (r < valid) dh[(size_t)(r0 + r) * feat + col] = 0.0f;
                    X[r][col] = 0.0f;
                }
            }
        tk_load_w<TC>(B, w1, c, feat);
        __syncthreads();
        if (t < feat)
            for (int r = 0; r < valid; ++r) s_b1 += X[r][t];
        // da = dh·W1  (Y, [32 × c]).
        tk_mm<TC, true>(X, feat, B, c, 0, 0, 0, Y);
        __syncthreads();
        // LN0 backward: X ← x; Y ← dx.
        tk_load(X, x, r0, rows, c);
        tk_load_stats(mu, rs, mean0, rstd0, r0, rows);
        tk_pos_grid(G, r0, hw, p.h, p.w);
        __syncthreads();
        tk_layernorm_params(X, Y, c, valid, mu, rs, s_g0, s_be0);
        __syncthreads();
        tk_layernorm_bwd(X, Y, c, g0, mu, rs);
        __syncthreads();
        tk_store(Y, dx, r0, rows, c);
        if (t < c) {
            for (int r = 0; r < valid; ++r) {
                const float gy = Y[r][t];
#pragma unroll
                for (int q = 0; q < 4; ++q) s_wp[q] += gy * G[q][r];
                s_bp += gy;
            }
        }
        __syncthreads();
    }
    float* row = partial + blockIdx.x * tk_partial_len(c, feat);
    if (t < feat) {
        row[t] = s_gi;
        row[feat + t] = s_bi;
        row[2 * feat + t] = s_b2;
        row[3 * feat + t] = s_b1;
    }
    if (t < c) {
        float* rc = row + 4 * feat;
        rc[t] = s_g0;
        rc[c + t] = s_be0;
        for (int q = 0; q < 4; ++q) rc[2 * c + t * 4 + q] = s_wp[q];
        rc[6 * c + t] = s_bp;
    }
}

#define TOKENS_BWD_ENTRY(NAME, TC)                                                                           \
    extern "C" __global__ void __launch_bounds__(TK_THREADS)                                                \
        NAME(TokenDims p, const float* __restrict__ dk, const float* __restrict__ dv,                       \
             const float* __restrict__ wk, const float* __restrict__ wv, const float* __restrict__ f,       \
             const float* __restrict__ mean_in, const float* __restrict__ rstd_in,                          \
             const float* __restrict__ gi, const float* __restrict__ w2, const float* __restrict__ h,       \
             const float* __restrict__ w1, const float* __restrict__ x, const float* __restrict__ mean0,    \
             const float* __restrict__ rstd0, const float* __restrict__ g0, float* __restrict__ df,         \
             float* __restrict__ dh, float* __restrict__ dx, float* __restrict__ partial) {                 \
        tokens_bwd<TC>(p, dk, dv, wk, wv, f, mean_in, rstd_in, gi, w2, h, w1, x, mean0, rstd0, g0, df, dh,   \
                       dx, partial);                                                                        \
    }
TOKENS_BWD_ENTRY(tokens_bwd_f32, false)
TOKENS_BWD_ENTRY(tokens_bwd_tf32, true)

// The sum over the nblk partial rows (rs_combine's fixed order), added (+=) into the parameter
// gradient each element belongs to. Block RS_THREADS, grid ceil(partial row length / RS_COLS).
extern "C" __global__ void __launch_bounds__(RS_THREADS)
    tokens_bwd_reduce_f32(int nblk, int c, int feat, const float* __restrict__ partial, float* __restrict__ dgi,
                          float* __restrict__ dbei, float* __restrict__ db2, float* __restrict__ db1,
                          float* __restrict__ dg0, float* __restrict__ dbe0, float* __restrict__ dwp,
                          float* __restrict__ dbp) {
    __shared__ float sh[RS_GROUPS][RS_COLS];
    const int len = tk_partial_len(c, feat);
    const int e = rs_column(), g = rs_group();
    float s = 0.0f;
    if (e < len)
#pragma unroll 8
        for (int b = g; b < nblk; b += RS_GROUPS) s += partial[(size_t)b * len + e];
    s = rs_combine(s, sh);
    if (g != 0 || e >= len) return;
    if (e < 4 * feat) {
        // (A chain, not an array of the four pointers: that array would live in local memory.)
        const int which = e / feat;
        float* dst = which == 0 ? dgi : which == 1 ? dbei : which == 2 ? db2 : db1;
        dst[e % feat] += s;
        return;
    }
    const int k = e - 4 * feat;
    if (k < c) dg0[k] += s;
    else if (k < 2 * c) dbe0[k - c] += s;
    else if (k < 6 * c) dwp[k - 2 * c] += s;
    else dbp[k - 6 * c] += s;
}
