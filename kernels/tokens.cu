// tokens.cu: the per-token chain between the encoder's convolutions and slot attention, fused
// (widths up to 64). Three versions: `*_f32` (version 1, shared-memory tiles of 32 tokens, exact
// f32 FMA: precision f32, and widths that are not multiples of 8); `*_tf32` (version 2, the same
// tiles, TF32 mma.sync with f32 accumulation: precision tf32, every width a multiple of 8); and
// `*_v3*_tf32` (version 3, below: the same products with the whole chain in registers, a warp
// per 16 tokens; the default where version 2 applies). Everything else (LayerNorms, ReLU masks,
// column sums) is f32 in all three.
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
    int kv;    // 1: the chain ends with k and v; 0: at u (model.rs, "The fold"): no k, v
               // written, and the backward reads d u [rows, feat] through its dk pointer
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
    if (!p.kv) return;  // (uniform over the grid)
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

// ---------------------------------------------------------------------------------------------
// Version 3 of the forward (`tokens_fwd_v3*_tf32`; TF32, every width a multiple of 8 and ≤ 64):
// the chain in registers, a warp per 16 tokens, no barrier after the start.
//
// Why: version 2 runs a block per 32 tokens that restages all four weight matrices (64 KB per
// tile at 64 wide) and passes each activation through shared memory between 12 barriers; the
// H200 profile (`65f2d71`) shows L1 71 % busy, shared stores with 24 % bank conflicts, 24 warps
// per SM, and 1.34 ms for clevr6's 10⁶ tokens against a 0.5 ms memory floor.
//
// How: a persistent block (TK3_WARPS warps, as many blocks as fit on the device at once) stages
// the four weight matrices once, TF32-rounded, in mma-fragment order; each warp then walks its
// own tiles of 16 tokens. A product's result stays in the registers of the mma's accumulator
// layout, and that layout is the next product's A operand if the k index is permuted: lane
// (g, t) holds columns 8j + 2t and 8j + 2t + 1 of rows g and g + 8, so k-step j takes column
// 8j + 2t as the mma's k slot t and 8j + 2t + 1 as slot t + 4, and the weights are staged with
// the same permutation (a sum over k does not depend on the order the slots name). The
// LayerNorms' row sums are the lane's values plus two quad shuffles. Every output is written
// from registers, a float2 per (row, 8 columns): 8 full 32-byte sectors per warp store.
// Every width is padded to 8·NJ (NJ = 8, or 4 when all are ≤ 32) with zero weights, biases, γ
// and β, so the padding stays zero through the chain and every loop is unrolled without a
// branch (with run-time trip counts ptxas emitted ~400 branches per tile and spilled).
// Same math as version 2: the position embedding as pos_val sums it, the LayerNorm's two-pass
// mean and variance, the A operand rounded to TF32 as the mma reads it. Sums run in another
// order (quad shuffles, the mma's k slots), so results agree with version 2 to f32 rounding.
#define TK3_THREADS 256
#define TK3_WARPS (TK3_THREADS / 32)
#define TK3_ROWS 16  // tokens per warp tile (the mma's m)

// Dynamic shared memory (floats), P = 8·NJ: the weights in fragment order, P × P each (w1, w2,
// wk, wv), then the vectors, P each: wp (4P: [ch][4]), bp, g0, be0, b1, b2, gi, bei. The
// launcher's size: tokens.rs, tk3_shared_bytes.
template <int NJ>
struct Tk3Smem {
    float* w[4];
    float *wp, *bp, *g0, *be0, *b1, *b2, *gi, *bei;
    __device__ explicit Tk3Smem(float* at) {
        const int P = 8 * NJ;
        for (int m = 0; m < 4; ++m) w[m] = at + m * P * P;
        at += 4 * P * P;
        wp = at, at += 4 * P;
        bp = at, at += P;
        g0 = at, at += P;
        be0 = at, at += P;
        b1 = at, at += P;
        b2 = at, at += P;
        gi = at, at += P;
        bei = at;
    }
};

// F ← the B fragments of X·Wᵀ (TRANSPOSED false: B(k, n) = W[n][k]) or of X·W (true: B(k, n)
// = W[k][n]) with the permuted k, W [n_out][n_in] in nn.Linear's layout, zero past n_in or
// n_out: for k-steps j = 2s + h, F[((nt·NJ/2 + s)·32 + lane)·4 + 2h + q] = tf32(B(8j + 2t + q,
// 8nt + g)), lane = 4g + t. A lane's fragments of two k-steps are one aligned float4; a warp's
// 32 of them, 512 contiguous bytes (conflict-free). W read in order, a float per thread.
template <int NJ, bool TRANSPOSED>
static __device__ void tk3_stage_frag(float* F, const float* __restrict__ W, int n_in, int n_out) {
    const int P = 8 * NJ;
    for (int e = threadIdx.x; e < P * P; e += TK3_THREADS) {
        const int row = e / P, col = e % P;  // W's (row, column): consecutive threads, consecutive W
        const float w = row < n_out && col < n_in ? W[row * n_in + col] : 0.0f;
        const int k = TRANSPOSED ? row : col, n = TRANSPOSED ? col : row;
        const int j = k >> 3, lane = 4 * (n & 7) + ((k & 7) >> 1);
        F[4 * (((n >> 3) * (NJ / 2) + (j >> 1)) * 32 + lane) + 2 * (j & 1) + (k & 1)] = tk_tf32(w);
    }
}

// Shared-memory vector reads as explicit instructions (lds_u2, lds_u4, lds_f4 of common.cuh):
// NVRTC 13.0 added a redundant load beside some of the plain vector reads here, differently
// from one compile to the next (the PTX, which the kernel cache keys and checks, was not
// reproducible), as it once did in attention.cu.
static __device__ __forceinline__ float2 tk3_lds_f2(const float* p, int words) {
    unsigned r[2];
    lds_u2(r, smem_addr((const unsigned*)p), words);
    return make_float2(__uint_as_float(r[0]), __uint_as_float(r[1]));
}

// dst[0 .. P) ← src[0 .. n), zeros past n.
static __device__ void tk3_stage_vec(float* dst, const float* __restrict__ src, int n, int P) {
    for (int e = threadIdx.x; e < P; e += TK3_THREADS) dst[e] = e < n ? src[e] : 0.0f;
}

// v ← rows ra, rb of src [rows, n] (zeros past n and for invalid rows), in the accumulator layout.
template <int NJ>
static __device__ __forceinline__ void tk3_load(float (&v)[NJ][4], const float* __restrict__ src, int n, int ra,
                                                bool va, int rb, bool vb) {
    const int t = threadIdx.x & 3;
    const unsigned* const sa = (const unsigned*)src + ra * n + 2 * t;
    const unsigned* const sb = (const unsigned*)src + rb * n + 2 * t;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
        const bool in = 8 * j < n;  // (as tk3_store)
        uint2 a = make_uint2(0u, 0u), b = make_uint2(0u, 0u);
        if (va && in) a = ld_u2(sa + 8 * j);
        if (vb && in) b = ld_u2(sb + 8 * j);
        v[j][0] = __uint_as_float(a.x), v[j][1] = __uint_as_float(a.y);
        v[j][2] = __uint_as_float(b.x), v[j][3] = __uint_as_float(b.y);
    }
}

// dst rows ra, rb (where valid) ← the tile's first n = 8·nj columns (v[j] = {(g, 8j+2t),
// (g, 8j+2t+1), (g+8, 8j+2t), (g+8, 8j+2t+1)}: the accumulator layout).
template <int NJ>
static __device__ __forceinline__ void tk3_store(float* __restrict__ dst, const float (&v)[NJ][4], int n, int ra,
                                                 bool va, int rb, bool vb) {
    // (Row addresses and constant offsets, column tests 8j < n: ptxas keeps no per-j value live
    // through the tile loop, where it spilled them. Offsets in int: the launcher checks that
    // rows · width fits, and 32-bit offsets take half the registers.)
    const int t = threadIdx.x & 3;
    float* const da = dst + ra * n + 2 * t;
    float* const db = dst + rb * n + 2 * t;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
        const bool in = 8 * j < n;
        if (va && in) *(float2*)&da[8 * j] = make_float2(v[j][0], v[j][1]);
        if (vb && in) *(float2*)&db[8 * j] = make_float2(v[j][2], v[j][3]);
    }
}

// The sum over a row's values: the lane's own, then over the quad (lanes 4g .. 4g + 3).
static __device__ __forceinline__ float tk3_quad_sum(float s) {
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    return s;
}

// LayerNorm of the tile's rows (n columns, the padding zero) in place, as tk_layernorm: two-pass
// mean and variance, (x − μ)·r·γ + β (γ, β zero in the padding, which so stays zero). μ and r of
// rows g and g + 8 returned in mu[2], rs[2].
template <int NJ>
static __device__ __forceinline__ void tk3_layernorm(float (&v)[NJ][4], int n, const float* gam, const float* bet,
                                                     float eps, float mu[2], float rs[2]) {
    const int t = threadIdx.x & 3;
    const float fn = (float)n;
    float sa = 0.0f, sb = 0.0f;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
        sa += v[j][0] + v[j][1];
        sb += v[j][2] + v[j][3];
    }
    const float ma = tk3_quad_sum(sa) / fn, mb = tk3_quad_sum(sb) / fn;
    float qa = 0.0f, qb = 0.0f;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
        if (8 * j >= n) continue;  // (the padding is x = 0, not x = μ)
        const float d0 = v[j][0] - ma, d1 = v[j][1] - ma, d2 = v[j][2] - mb, d3 = v[j][3] - mb;
        qa += d0 * d0 + d1 * d1;
        qb += d2 * d2 + d3 * d3;
    }
    const float ra = 1.0f / sqrtf(tk3_quad_sum(qa) / fn + eps), rb = 1.0f / sqrtf(tk3_quad_sum(qb) / fn + eps);
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
        const float2 gg = tk3_lds_f2(gam, 8 * j + 2 * t), bb = tk3_lds_f2(bet, 8 * j + 2 * t);
        v[j][0] = (v[j][0] - ma) * ra * gg.x + bb.x;
        v[j][1] = (v[j][1] - ma) * ra * gg.y + bb.y;
        v[j][2] = (v[j][2] - mb) * rb * gg.x + bb.x;
        v[j][3] = (v[j][3] - mb) * rb * gg.y + bb.y;
    }
    mu[0] = ma, mu[1] = mb, rs[0] = ra, rs[1] = rb;
}

// xr ← tf32(v), the A operand of the next product.
template <int NJ>
static __device__ __forceinline__ void tk3_round(unsigned (&xr)[NJ][4], const float (&v)[NJ][4]) {
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) xr[j][q] = to_tf32(v[j][q]);
}
// In place, as floats with those bits (the backward: one array fewer).
template <int NJ>
static __device__ __forceinline__ void tk3_round(float (&v)[NJ][4]) {
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) v[j][q] = tk_tf32(v[j][q]);
}

// acc += X·B with X the tile as the TF32 bits xr, B the fragments F (tk3_stage_frag: X·Wᵀ,
// or X·W when TRANSPOSED).
static __device__ __forceinline__ unsigned tk3_bits(unsigned u) { return u; }
static __device__ __forceinline__ unsigned tk3_bits(float x) { return __float_as_uint(x); }

template <int NJ, typename T>
static __device__ __forceinline__ void tk3_mma_acc(float (&acc)[NJ][4], const T (&xr)[NJ][4], const float* F) {
    const int lane = threadIdx.x & 31;
    const SmemAddr fb = smem_addr((const unsigned*)F);
#pragma unroll
    for (int s = 0; s < NJ / 2; ++s) {
#pragma unroll
        for (int n = 0; n < NJ; ++n) {
            const uint4 b4 = lds_u4(fb, 4 * ((n * (NJ / 2) + s) * 32 + lane));
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int j = 2 * s + h;
                // k slot t ↔ column 8j + 2t (rows g, g + 8: [j][0], [j][2]); t + 4 ↔ 8j + 2t + 1.
                const unsigned a[4] = {tk3_bits(xr[j][0]), tk3_bits(xr[j][2]), tk3_bits(xr[j][1]),
                                       tk3_bits(xr[j][3])};
                const unsigned b[2] = {h ? b4.z : b4.x, h ? b4.w : b4.y};
                mma_tf32_16x8x8(acc[n], a, b);
            }
        }
    }
}

// acc ← X·B (+ bias, ReLU), as tk3_mma_acc.
template <int NJ, typename T>
static __device__ __forceinline__ void tk3_mm(float (&acc)[NJ][4], const T (&xr)[NJ][4], const float* F,
                                              const float* bias, bool relu) {
    const int t = threadIdx.x & 3;
#pragma unroll
    for (int n = 0; n < NJ; ++n)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[n][q] = 0.0f;
    tk3_mma_acc<NJ>(acc, xr, F);
    if (!bias) return;
#pragma unroll
    for (int n = 0; n < NJ; ++n) {
        const float2 bb = tk3_lds_f2(bias, 8 * n + 2 * t);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            float y = acc[n][q] + ((q & 1) ? bb.y : bb.x);
            if (relu && y < 0.0f) y = 0.0f;
            acc[n][q] = y;
        }
    }
}

// Block TK3_THREADS, dynamic shared memory tk3_shared_bytes(NJ), any grid (warp w of all walks
// tiles w, w + all warps, …). Every output overwritten, as tokens_fwd.
template <int NJ>
static __device__ void tokens_fwd_v3(TokenDims p, const float* __restrict__ enc, const float* __restrict__ wp,
               const float* __restrict__ bp, const float* __restrict__ g0, const float* __restrict__ be0,
               const float* __restrict__ w1, const float* __restrict__ b1, const float* __restrict__ w2,
               const float* __restrict__ b2, const float* __restrict__ gi, const float* __restrict__ bei,
               const float* __restrict__ wk, const float* __restrict__ wv, float eps, float* __restrict__ x_out,
               float* __restrict__ a_out, float* __restrict__ mean0, float* __restrict__ rstd0,
               float* __restrict__ h_out, float* __restrict__ f_out, float* __restrict__ u_out,
               float* __restrict__ mean_in, float* __restrict__ rstd_in, float* __restrict__ k_out,
               float* __restrict__ v_out) {
    extern __shared__ __align__(16) float tk3_smem[];
    const int P = 8 * NJ;
    const int rows = p.rows, c = p.c, feat = p.feat, d = p.d, hw = p.h * p.w;
    const Tk3Smem<NJ> s(tk3_smem);
    tk3_stage_frag<NJ, false>(s.w[0], w1, c, feat);
    tk3_stage_frag<NJ, false>(s.w[1], w2, feat, feat);
    tk3_stage_frag<NJ, false>(s.w[2], wk, feat, d);
    tk3_stage_frag<NJ, false>(s.w[3], wv, feat, d);
    tk3_stage_vec(s.wp, wp, 4 * c, 4 * P);
    tk3_stage_vec(s.bp, bp, c, P);
    tk3_stage_vec(s.g0, g0, c, P);
    tk3_stage_vec(s.be0, be0, c, P);
    tk3_stage_vec(s.b1, b1, feat, P);
    tk3_stage_vec(s.b2, b2, feat, P);
    tk3_stage_vec(s.gi, gi, feat, P);
    tk3_stage_vec(s.bei, bei, feat, P);
    __syncthreads();

    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int ntiles = (rows + TK3_ROWS - 1) / TK3_ROWS;
    const int stride = gridDim.x * TK3_WARPS;
    for (int tile = blockIdx.x * TK3_WARPS + (threadIdx.x >> 5); tile < ntiles; tile += stride) {
        const int ra = tile * TK3_ROWS + g, rb = ra + 8;
        const bool va = ra < rows, vb = rb < rows;
        float v[NJ][4], acc[NJ][4];
        unsigned xr[NJ][4];
        // x = e + pos: pos(ch) = bp[ch] + Σ_q wp[ch][q]·grid_q, summed as pos_val does (zero
        // in the padding; rows past the end hold pos, never stored).
        float ga[4], gb[4];
        const int pa = (va ? ra : 0) % hw, pb = (vb ? rb : 0) % hw;
#pragma unroll
        for (int q = 0; q < 4; ++q) ga[q] = grid_val(q, pa, p.h, p.w), gb[q] = grid_val(q, pb, p.h, p.w);
        tk3_load<NJ>(v, enc, c, ra, va, rb, vb);
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            const int ch = 8 * j + 2 * t;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int cc = ch + (q & 1);
                const float4 w = lds_f4(smem_addr((const unsigned*)s.wp), 4 * cc);
                const float* gr = (q & 2) ? gb : ga;
                float pos = s.bp[cc];
                pos += w.x * gr[0];
                pos += w.y * gr[1];
                pos += w.z * gr[2];
                pos += w.w * gr[3];
                v[j][q] += pos;
            }
        }
        tk3_store<NJ>(x_out, v, c, ra, va, rb, vb);
        // a = LN0(x).
        float mu[2], rs[2];
        tk3_layernorm<NJ>(v, c, s.g0, s.be0, eps, mu, rs);
        tk3_store<NJ>(a_out, v, c, ra, va, rb, vb);
        if (t == 0) {
            if (va) mean0[ra] = mu[0], rstd0[ra] = rs[0];
            if (vb) mean0[rb] = mu[1], rstd0[rb] = rs[1];
        }
        // h = relu(a·W1ᵀ + b1); f = h·W2ᵀ + b2.
        tk3_round<NJ>(xr, v);
        tk3_mm<NJ>(acc, xr, s.w[0], s.b1, true);
        tk3_store<NJ>(h_out, acc, feat, ra, va, rb, vb);
        tk3_round<NJ>(xr, acc);
        tk3_mm<NJ>(v, xr, s.w[1], s.b2, false);
        tk3_store<NJ>(f_out, v, feat, ra, va, rb, vb);
        // u = LN_in(f); k = u·Wkᵀ; v = u·Wvᵀ.
        tk3_layernorm<NJ>(v, feat, s.gi, s.bei, eps, mu, rs);
        tk3_store<NJ>(u_out, v, feat, ra, va, rb, vb);
        if (t == 0) {
            if (va) mean_in[ra] = mu[0], rstd_in[ra] = rs[0];
            if (vb) mean_in[rb] = mu[1], rstd_in[rb] = rs[1];
        }
        if (!p.kv) continue;  // (uniform over the grid)
        tk3_round<NJ>(xr, v);
        tk3_mm<NJ>(acc, xr, s.w[2], nullptr, false);
        tk3_store<NJ>(k_out, acc, d, ra, va, rb, vb);
        tk3_mm<NJ>(acc, xr, s.w[3], nullptr, false);
        tk3_store<NJ>(v_out, acc, d, ra, va, rb, vb);
    }
}

// NJ = 8: widths up to 64; NJ = 4 (`w32`): every width up to 32.
#define TOKENS_FWD_V3_ENTRY(NAME, NJ)                                                                        \
    extern "C" __global__ void __launch_bounds__(TK3_THREADS, 2)                                            \
        NAME(TokenDims p, const float* __restrict__ enc, const float* __restrict__ wp,                      \
             const float* __restrict__ bp, const float* __restrict__ g0, const float* __restrict__ be0,     \
             const float* __restrict__ w1, const float* __restrict__ b1, const float* __restrict__ w2,      \
             const float* __restrict__ b2, const float* __restrict__ gi, const float* __restrict__ bei,     \
             const float* __restrict__ wk, const float* __restrict__ wv, float eps,                         \
             float* __restrict__ x_out, float* __restrict__ a_out, float* __restrict__ mean0,               \
             float* __restrict__ rstd0, float* __restrict__ h_out, float* __restrict__ f_out,               \
             float* __restrict__ u_out, float* __restrict__ mean_in, float* __restrict__ rstd_in,           \
             float* __restrict__ k_out, float* __restrict__ v_out) {                                        \
        tokens_fwd_v3<NJ>(p, enc, wp, bp, g0, be0, w1, b1, w2, b2, gi, bei, wk, wv, eps, x_out, a_out, mean0, \
                          rstd0, h_out, f_out, u_out, mean_in, rstd_in, k_out, v_out);                      \
    }
TOKENS_FWD_V3_ENTRY(tokens_fwd_v3_tf32, 8)
TOKENS_FWD_V3_ENTRY(tokens_fwd_v3w32_tf32, 4)

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
        // du = dk·Wk + dv·Wv, or given (the fold)  (Y, [32 × feat]).
        if (p.kv) {
            tk_load(X, dk, r0, rows, d);
            tk_load_w<TC>(B, wk, feat, d);
            __syncthreads();
            tk_mm<TC, true>(X, d, B, feat, 0, 0, 0, Y);
            __syncthreads();
            tk_load(X, dv, r0, rows, d);
            tk_load_w<TC>(B, wv, feat, d);
            __syncthreads();
            tk_mm<TC, true>(X, d, B, feat, 0, 0, 1, Y);
        } else {
            tk_load(Y, dk, r0, rows, feat);
        }
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

// ---------------------------------------------------------------------------------------------
// Version 3 of the backward (`tokens_bwd_v3*_tf32`): version 3's layout (persistent blocks, the
// weights staged once in fragment order, a warp per 16 tokens, the chain in registers) for the
// data path of tokens_bwd; the products are X·W (tk3_stage_frag<NJ, true>). The column sums
// the small parameters need (11 per column at most: dγ, dβ of both LayerNorms, db2, db1, the position
// embedding's 4 dW and db) are summed over a tile's 16 rows through a per-warp scratch
// (tk3_colsum: each lane's two rows, then 8 lanes' partials read down a column) into the
// warp's running sums in shared memory; at the end a block adds its warps' sums in warp order
// into its partial row (tokens_bwd's layout), and tokens_bwd_reduce_f32 adds the rows. The grid is
// derived from the sizes only (the launcher's TK3_BWD_BLOCKS), so which tiles a warp sums, and
// so the result bit for bit, is the same on every GPU.

// Per-warp scratch of tk3_colsum: 8 rows of P + 8 floats (the row stride ≡ 8 mod 32 words, so
// that a half-warp's float2 stores hit 32 distinct banks).
#define TK3_SCRATCH(NJ) (8 * (8 * (NJ) + 8))

// tot[col] += the sum over the tile's rows of column col, where this lane holds part[j][q]: its
// rows' sum of column 8j + 2t + q. S: the warp's scratch; tot: the warp's running sums (in
// shared memory: 22 registers more spilled), lane l adding columns l and l + 32.
template <int NJ>
static __device__ __forceinline__ void tk3_colsum(float* S, const float (&part)[NJ][2], float* tot) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, LD = 8 * NJ + 8;
    // (One address per lane and constant offsets: with the index computed per j, ptxas kept 8
    // addresses live through the loop and spilled them.)
    float* const sw = S + g * LD + 2 * t;
    const float* const sr = S + lane;
    __syncwarp();  // (the last call's reads are done)
#pragma unroll
    for (int j = 0; j < NJ; ++j) *(float2*)&sw[8 * j] = make_float2(part[j][0], part[j][1]);
    __syncwarp();
#pragma unroll
    for (int m = 0; m < NJ / 4; ++m) {
        float s = 0.0f;
#pragma unroll
        for (int r = 0; r < 8; ++r) s += sr[r * LD + 32 * m];
        tot[lane + 32 * m] += s;
    }
}

// The column sums of one tile row pair: part[j][q] = Σ over rows g, g + 8 of f(value).
template <int NJ>
static __device__ __forceinline__ void tk3_sum_rows(float (&part)[NJ][2], const float (&v)[NJ][4]) {
#pragma unroll
    for (int j = 0; j < NJ; ++j) part[j][0] = v[j][0] + v[j][2], part[j][1] = v[j][1] + v[j][3];
}

// LayerNorm backward of the tile's rows, in place on dy (x̂ in xh, γ from shared memory, the
// padding's γ zero), as tk_layernorm_bwd: dy ← r·(dy·γ − mean(dy·γ) − x̂·mean(dy·γ·x̂)); n
// columns; padded columns set to zero.
template <int NJ>
static __device__ __forceinline__ void tk3_layernorm_bwd(float (&dy)[NJ][4], const float (&xh)[NJ][4], int n,
                                                         const float* gam, const float rs[2]) {
    const int t = threadIdx.x & 3;
    const float fn = (float)n;
    float mga = 0.0f, mgb = 0.0f, mxa = 0.0f, mxb = 0.0f;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
        const float2 gg = tk3_lds_f2(gam, 8 * j + 2 * t);
        const float g0 = dy[j][0] * gg.x, g1 = dy[j][1] * gg.y, g2 = dy[j][2] * gg.x, g3 = dy[j][3] * gg.y;
        mga += g0 + g1;
        mgb += g2 + g3;
        mxa += g0 * xh[j][0] + g1 * xh[j][1];
        mxb += g2 * xh[j][2] + g3 * xh[j][3];
    }
    mga = tk3_quad_sum(mga) / fn, mgb = tk3_quad_sum(mgb) / fn;
    mxa = tk3_quad_sum(mxa) / fn, mxb = tk3_quad_sum(mxb) / fn;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
        const float2 gg = tk3_lds_f2(gam, 8 * j + 2 * t);
        const bool in = 8 * j < n;
        dy[j][0] = in ? rs[0] * (dy[j][0] * gg.x - mga - xh[j][0] * mxa) : 0.0f;
        dy[j][1] = in ? rs[0] * (dy[j][1] * gg.y - mga - xh[j][1] * mxa) : 0.0f;
        dy[j][2] = in ? rs[1] * (dy[j][2] * gg.x - mgb - xh[j][2] * mxb) : 0.0f;
        dy[j][3] = in ? rs[1] * (dy[j][3] * gg.y - mgb - xh[j][3] * mxb) : 0.0f;
    }
}

// x ← x̂ = (x − μ)·r of rows g (mu[0], rs[0]) and g + 8, and the column sums of a LayerNorm's
// parameters: tot_g += Σ dy·x̂, tot_b += Σ dy.
template <int NJ>
static __device__ __forceinline__ void tk3_layernorm_params(float (&x)[NJ][4], const float (&dy)[NJ][4],
                                                            const float mu[2], const float rs[2], float* S,
                                                            float* tot_g, float* tot_b) {
    float part[NJ][2];
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
#pragma unroll
        for (int q = 0; q < 4; ++q) x[j][q] = (x[j][q] - mu[q >> 1]) * rs[q >> 1];
        part[j][0] = dy[j][0] * x[j][0] + dy[j][2] * x[j][2];
        part[j][1] = dy[j][1] * x[j][1] + dy[j][3] * x[j][3];
    }
    tk3_colsum<NJ>(S, part, tot_g);
    tk3_sum_rows<NJ>(part, dy);
    tk3_colsum<NJ>(S, part, tot_b);
}

// Block TK3_THREADS, dynamic shared memory tk3_bwd_shared_bytes(8·NJ), grid fixed by the
// launcher. partial [gridDim.x][4·feat + 7·c] overwritten (tokens_bwd's layout); df, dh, dx
// overwritten.
template <int NJ>
static __device__ void tokens_bwd_v3(TokenDims p, const float* __restrict__ dk, const float* __restrict__ dv,
               const float* __restrict__ wk, const float* __restrict__ wv, const float* __restrict__ f,
               const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
               const float* __restrict__ gi, const float* __restrict__ w2, const float* __restrict__ h,
               const float* __restrict__ w1, const float* __restrict__ xin, const float* __restrict__ mean0,
               const float* __restrict__ rstd0, const float* __restrict__ g0, float* __restrict__ df,
               float* __restrict__ dh, float* __restrict__ dx, float* __restrict__ partial) {
    extern __shared__ __align__(16) float tk3_smem[];
    const int P = 8 * NJ;
    const int rows = p.rows, c = p.c, feat = p.feat, d = p.d, hw = p.h * p.w;
    float* const fk = tk3_smem;  // weights in fragment order, P × P each
    float* const fv = fk + P * P;
    float* const f2 = fv + P * P;
    float* const f1 = f2 + P * P;
    float* const sgi = f1 + P * P;  // γ_in, γ0 (zero in the padding)
    float* const sg0 = sgi + P;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    float* const S = sg0 + P + warp * TK3_SCRATCH(NJ);
    // The warp's running column sums, [11][P]: dγ_in, dβ_in, db2, db1, dγ0, dβ0, dWpos[q] for
    // q = 0..3, dbpos.
    float* const tot_all = sg0 + P + TK3_WARPS * TK3_SCRATCH(NJ);
    float* const tot = tot_all + warp * 11 * P;
    for (int e = lane; e < 11 * P; e += 32) tot[e] = 0.0f;
    tk3_stage_frag<NJ, true>(fk, wk, feat, d);
    tk3_stage_frag<NJ, true>(fv, wv, feat, d);
    tk3_stage_frag<NJ, true>(f2, w2, feat, feat);
    tk3_stage_frag<NJ, true>(f1, w1, c, feat);
    tk3_stage_vec(sgi, gi, feat, P);
    tk3_stage_vec(sg0, g0, c, P);
    __syncthreads();

    const int ntiles = (rows + TK3_ROWS - 1) / TK3_ROWS;
    for (int tile = blockIdx.x * TK3_WARPS + warp; tile < ntiles; tile += gridDim.x * TK3_WARPS) {
        const int ra = tile * TK3_ROWS + g, rb = ra + 8;
        const bool va = ra < rows, vb = rb < rows;
        // Two tiles of registers, x and y, take turns as a product's A operand (rounded in
        // place) and its result (with a third, ptxas spilled at 128 registers).
        float x[NJ][4], y[NJ][4], part[NJ][2];
        // du = dk·Wk + dv·Wv, or given (the fold) (y).
        if (p.kv) {
            tk3_load<NJ>(x, dk, d, ra, va, rb, vb);
            tk3_round<NJ>(x);
            tk3_mm<NJ>(y, x, fk, nullptr, false);
            tk3_load<NJ>(x, dv, d, ra, va, rb, vb);
            tk3_round<NJ>(x);
            tk3_mma_acc<NJ>(y, x, fv);
        } else {
            tk3_load<NJ>(y, dk, feat, ra, va, rb, vb);
        }
        // LN_in backward: x ← x̂_in, y ← df.
        float mu[2], rs[2];
        mu[0] = va ? mean_in[ra] : 0.0f, rs[0] = va ? rstd_in[ra] : 0.0f;
        mu[1] = vb ? mean_in[rb] : 0.0f, rs[1] = vb ? rstd_in[rb] : 0.0f;
        tk3_load<NJ>(x, f, feat, ra, va, rb, vb);
        tk3_layernorm_params<NJ>(x, y, mu, rs, S, tot, tot + P);
        tk3_layernorm_bwd<NJ>(y, x, feat, sgi, rs);
        tk3_store<NJ>(df, y, feat, ra, va, rb, vb);
        tk3_sum_rows<NJ>(part, y);
        tk3_colsum<NJ>(S, part, tot + 2 * P);
        // dh = (df·W2) ⊙ [h > 0] (x; h's signs loaded first, as one bit each).
        tk3_load<NJ>(x, h, feat, ra, va, rb, vb);
        unsigned live = 0;
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) live |= (x[j][q] > 0.0f ? 1u : 0u) << (4 * j + q);
        tk3_round<NJ>(y);
        tk3_mm<NJ>(x, y, f2, nullptr, false);
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) x[j][q] = (live >> (4 * j + q)) & 1u ? x[j][q] : 0.0f;
        tk3_store<NJ>(dh, x, feat, ra, va, rb, vb);
        tk3_sum_rows<NJ>(part, x);
        tk3_colsum<NJ>(S, part, tot + 3 * P);
        // da = dh·W1 (y); LN0 backward: x ← x̂0, y ← dx.
        tk3_round<NJ>(x);
        tk3_mm<NJ>(y, x, f1, nullptr, false);
        mu[0] = va ? mean0[ra] : 0.0f, rs[0] = va ? rstd0[ra] : 0.0f;
        mu[1] = vb ? mean0[rb] : 0.0f, rs[1] = vb ? rstd0[rb] : 0.0f;
        tk3_load<NJ>(x, xin, c, ra, va, rb, vb);
        tk3_layernorm_params<NJ>(x, y, mu, rs, S, tot + 4 * P, tot + 5 * P);
        tk3_layernorm_bwd<NJ>(y, x, c, sg0, rs);
        tk3_store<NJ>(dx, y, c, ra, va, rb, vb);
        // The position embedding's dW (Σ dx·grid_q) and db (Σ dx); rows past the end are zero.
        float ga[4], gb[4];
        const int pa = (va ? ra : 0) % hw, pb = (vb ? rb : 0) % hw;
#pragma unroll
        for (int q = 0; q < 4; ++q) ga[q] = grid_val(q, pa, p.h, p.w), gb[q] = grid_val(q, pb, p.h, p.w);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                part[j][0] = y[j][0] * ga[q] + y[j][2] * gb[q];
                part[j][1] = y[j][1] * ga[q] + y[j][3] * gb[q];
            }
            tk3_colsum<NJ>(S, part, tot + (6 + q) * P);
        }
        tk3_sum_rows<NJ>(part, y);
        tk3_colsum<NJ>(S, part, tot + 10 * P);
    }
    // The block's partial row (tokens_bwd's layout): its warps' sums, added in warp order.
    __syncthreads();
    const int len = tk_partial_len(c, feat);
    for (int e = threadIdx.x; e < len; e += TK3_THREADS) {
        int k, col;
        if (e < 4 * feat) {
            k = e / feat, col = e % feat;
        } else {
            const int i = e - 4 * feat;
            if (i < 2 * c) k = 4 + i / c, col = i % c;
            else if (i < 6 * c) k = 6 + (i - 2 * c) % 4, col = (i - 2 * c) / 4;
            else k = 10, col = i - 6 * c;
        }
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < TK3_WARPS; ++w) s += tot_all[(w * 11 + k) * P + col];
        partial[(size_t)blockIdx.x * len + e] = s;
    }
}

#define TOKENS_BWD_V3_ENTRY(NAME, NJ)                                                                        \
    extern "C" __global__ void __launch_bounds__(TK3_THREADS, 2)                                            \
        NAME(TokenDims p, const float* __restrict__ dk, const float* __restrict__ dv,                       \
             const float* __restrict__ wk, const float* __restrict__ wv, const float* __restrict__ f,       \
             const float* __restrict__ mean_in, const float* __restrict__ rstd_in,                          \
             const float* __restrict__ gi, const float* __restrict__ w2, const float* __restrict__ h,       \
             const float* __restrict__ w1, const float* __restrict__ x, const float* __restrict__ mean0,    \
             const float* __restrict__ rstd0, const float* __restrict__ g0, float* __restrict__ df,         \
             float* __restrict__ dh, float* __restrict__ dx, float* __restrict__ partial) {                 \
        tokens_bwd_v3<NJ>(p, dk, dv, wk, wv, f, mean_in, rstd_in, gi, w2, h, w1, x, mean0, rstd0, g0, df, dh, \
                          dx, partial);                                                                     \
    }
TOKENS_BWD_V3_ENTRY(tokens_bwd_v3_tf32, 8)
TOKENS_BWD_V3_ENTRY(tokens_bwd_v3w32_tf32, 4)

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
