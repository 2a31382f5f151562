// slotcell.cu: the per-slot work of one slot-attention cell application, around the attention,
// fused (version 1, exact f32). The un-fused ops launch 2 kernels before the attention and 8
// after it, each over a few hundred rows: at the model's sizes (B·K = 448 rows at clevr6, 128 in
// the tetrominoes config) every one of them is a launch and a ramp, not work.
//
// Math (ops/slotcell.rs), per slot row, d wide, MLP hidden width m:
//   query:   ls = LN_s(s);  q = ls·Wqᵀ
//   update:  gi = u·W_ihᵀ + b_ih;  gh = s·W_hhᵀ + b_hh         (u: the attention's update; 3d each)
//            h1 = GRUCell gates (gru.cu);  lm = LN_m(h1)
//            hid = dropout(relu(lm·W1ᵀ + b1));  out = (hid·W2ᵀ + b2) + h1
// Every output is the tape the backward reads, written as the un-fused ops write it.
// FLOPs per row (d = 64, m = 128): query 2·64² = 8.2 k; update 2·(2·3·64² + 2·64·m) = 82 k.
// Compulsory bytes: the weights (16 kB query, 164 kB update) once per block, from L2; per row
// 4·(d + 2d + 2) query, 4·(2d + 6d + 2d + 2 + m + d) update (2.8 kB).
// Layout: a block takes SC_ROWS rows (in shared memory) and thread t computes output column t
// of every one of them: it reads row t of the weight (nn.Linear's [n_out][n_in], contiguous in
// k, 16 bytes at a time) once, and the rows' k-slices are broadcast reads. Each dot product runs
// over k in order.

#define SC_ROWS 8      // slot rows per block (one warp per row for the LayerNorms)
#define SC_THREADS 256 // 8 warps
#define SC_MAXD 64     // widest d (3d ≤ SC_THREADS output columns for the GRU's products)
#define SC_MAXH 256    // widest MLP hidden layer
static_assert(SC_THREADS / 32 == SC_ROWS, "the LayerNorms take one warp per row");

struct SlotCellDims {
    int rows;    // slots: batch · K
    int d;       // slot width, a multiple of 4
    int hidden;  // MLP hidden width, a multiple of 4
};

// T[r][0..n) ← src rows r0 + r (zeros past `rows`).
template <int LD>
static __device__ void sc_load(float (*T)[LD], const float* __restrict__ src, int r0, int rows, int n) {
    for (int e = threadIdx.x; e < SC_ROWS * n; e += SC_THREADS) {
        const int r = e / n, col = e % n;
        T[r][col] = (r0 + r < rows) ? src[(r0 + r) * n + col] : 0.0f;
    }
}

// acc[r] = Σ_k X[r][k]·w[k] over k < n_k (a multiple of 4; w 16-byte aligned), k in order.
template <int LD>
static __device__ __forceinline__ void sc_dots(const float (*X)[LD], const float* __restrict__ w, int n_k,
                                               float acc[SC_ROWS]) {
#pragma unroll
    for (int r = 0; r < SC_ROWS; ++r) acc[r] = 0.0f;
#pragma unroll 4
    for (int k = 0; k < n_k; k += 4) {
        const float4 wk = ld_f4(w + k);
#pragma unroll
        for (int r = 0; r < SC_ROWS; ++r) {
            const float4 x = *(const float4*)&X[r][k];
            acc[r] += x.x * wk.x;
            acc[r] += x.y * wk.y;
            acc[r] += x.z * wk.z;
            acc[r] += x.w * wk.w;
        }
    }
}

// LayerNorm of the block's rows in place (warp r takes row r; the math of layernorm_fwd_f32),
// written to y, mean, rstd for the valid rows too.
template <int LD>
static __device__ void sc_layernorm(float (*T)[LD], int n, const float* __restrict__ g, const float* __restrict__ b,
                                    float eps, int r0, int rows, float* __restrict__ y, float* __restrict__ mean,
                                    float* __restrict__ rstd) {
    const int r = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float fn = (float)n;
    float s = 0.0f;
    for (int i = lane; i < n; i += 32) s += T[r][i];
    const float mu = warp_allsum(s) / fn;
    float v = 0.0f;
    for (int i = lane; i < n; i += 32) {
        const float dd = T[r][i] - mu;
        v += dd * dd;
    }
    const float rs = 1.0f / sqrtf(warp_allsum(v) / fn + eps);
    const bool valid = r0 + r < rows;
    for (int i = lane; i < n; i += 32) {
        const float val = (T[r][i] - mu) * rs * g[i] + b[i];
        T[r][i] = val;
        if (valid) y[(r0 + r) * n + i] = val;
    }
    if (valid && lane == 0) {
        mean[r0 + r] = mu;
        rstd[r0 + r] = rs;
    }
}

// Before the attention: ls (with its mean and 1/σ) and q. grid ceil(rows / SC_ROWS), block
// SC_THREADS; every output overwritten.
extern "C" __global__ void __launch_bounds__(SC_THREADS)
slot_query_fwd_f32(SlotCellDims p, const float* __restrict__ slots, const float* __restrict__ g,
                   const float* __restrict__ b, const float* __restrict__ wq, float eps, float* __restrict__ ls,
                   float* __restrict__ mean, float* __restrict__ rstd, float* __restrict__ q) {
    __shared__ __align__(16) float S[SC_ROWS][SC_MAXD];
    const int rows = p.rows, d = p.d, t = threadIdx.x;
    const int r0 = blockIdx.x * SC_ROWS;
    sc_load(S, slots, r0, rows, d);
    __syncthreads();
    sc_layernorm(S, d, g, b, eps, r0, rows, ls, mean, rstd);
    __syncthreads();
    if (t < d) {
        float acc[SC_ROWS];
        sc_dots(S, wq + t * d, d, acc);
#pragma unroll
        for (int r = 0; r < SC_ROWS; ++r)
            if (r0 + r < rows) q[(r0 + r) * d + t] = acc[r];
    }
}

// After the attention: gi, gh, h1, lm (with its mean and 1/σ), hid and out. Dropout on hid when
// `dropout` (element index row·hidden + column, the counter of step_vals; as dropout_f32).
// grid ceil(rows / SC_ROWS), block SC_THREADS; every output overwritten.
extern "C" __global__ void __launch_bounds__(SC_THREADS)
slot_update_fwd_f32(SlotCellDims p, const float* __restrict__ upd, const float* __restrict__ slots,
                    const float* __restrict__ w_ih, const float* __restrict__ b_ih, const float* __restrict__ w_hh,
                    const float* __restrict__ b_hh, const float* __restrict__ g, const float* __restrict__ b,
                    const float* __restrict__ w1, const float* __restrict__ b1, const float* __restrict__ w2,
                    const float* __restrict__ b2, float eps, int dropout, unsigned int seed_lo, unsigned int seed_hi,
                    unsigned int stream, const double* __restrict__ step_vals, double drop_p, float drop_scale,
                    float* __restrict__ gi, float* __restrict__ gh, float* __restrict__ h1,
                    float* __restrict__ lm, float* __restrict__ mean, float* __restrict__ rstd,
                    float* __restrict__ hid, float* __restrict__ out) {
    __shared__ __align__(16) float U[SC_ROWS][SC_MAXD];      // u, then lm
    __shared__ __align__(16) float S[SC_ROWS][SC_MAXD];      // s
    __shared__ __align__(16) float H1[SC_ROWS][SC_MAXD];     // h1
    __shared__ float GI[SC_ROWS][3 * SC_MAXD], GH[SC_ROWS][3 * SC_MAXD];
    __shared__ __align__(16) float HID[SC_ROWS][SC_MAXH];
    const int rows = p.rows, d = p.d, m = p.hidden, t = threadIdx.x;
    const int r0 = blockIdx.x * SC_ROWS;
    sc_load(U, upd, r0, rows, d);
    sc_load(S, slots, r0, rows, d);
    __syncthreads();
    // The GRU's two products: thread t < 3d takes column t of both.
    if (t < 3 * d) {
        float ai[SC_ROWS], ah[SC_ROWS];
        sc_dots(U, w_ih + t * d, d, ai);
        sc_dots(S, w_hh + t * d, d, ah);
        const float bi = b_ih[t], bh = b_hh[t];
#pragma unroll
        for (int r = 0; r < SC_ROWS; ++r) {
            const float vi = ai[r] + bi, vh = ah[r] + bh;
            GI[r][t] = vi;
            GH[r][t] = vh;
            if (r0 + r < rows) {
                gi[(r0 + r) * 3 * d + t] = vi;
                gh[(r0 + r) * 3 * d + t] = vh;
            }
        }
    }
    __syncthreads();
    // The gates (gru_gates_fwd_f32's math).
    for (int e = t; e < SC_ROWS * d; e += SC_THREADS) {
        const int r = e / d, j = e % d;
        const float rg = sigmoidf_(GI[r][j] + GH[r][j]);
        const float zg = sigmoidf_(GI[r][d + j] + GH[r][d + j]);
        const float ng = tanhf(GI[r][2 * d + j] + rg * GH[r][2 * d + j]);
        const float h = (1.0f - zg) * ng + zg * S[r][j];
        H1[r][j] = h;
        U[r][j] = h;
        if (r0 + r < rows) h1[(r0 + r) * d + j] = h;
    }
    __syncthreads();
    sc_layernorm(U, d, g, b, eps, r0, rows, lm, mean, rstd);
    __syncthreads();
    // The MLP's hidden layer: thread t < m takes column t.
    if (t < m) {
        float acc[SC_ROWS];
        sc_dots(U, w1 + t * d, d, acc);
        const float bt = b1[t];
        const unsigned int step = dropout ? step_counter(step_vals) : 0u;
#pragma unroll
        for (int r = 0; r < SC_ROWS; ++r) {
            float v = acc[r] + bt;
            if (v < 0.0f) v = 0.0f;
            const unsigned long long idx = (unsigned long long)(r0 + r) * m + t;
            if (dropout) v = dropout_keep(seed_lo, seed_hi, stream, step, idx, drop_p) ? v * drop_scale : 0.0f;
            HID[r][t] = v;
            if (r0 + r < rows) hid[idx] = v;
        }
    }
    __syncthreads();
    // The MLP's output and the residual: thread t < d takes column t.
    if (t < d) {
        float acc[SC_ROWS];
        sc_dots(HID, w2 + t * m, m, acc);
        const float bt = b2[t];
#pragma unroll
        for (int r = 0; r < SC_ROWS; ++r)
            if (r0 + r < rows) out[(r0 + r) * d + t] = (acc[r] + bt) + H1[r][t];
    }
}
