// slotcell.cu: the per-slot work of one slot-attention cell application, around the attention,
// fused, forward and backward (version 1, exact f32). The un-fused ops launch 2 kernels before
// the attention and 8 after it (7 and ~22 in the backward), each over a few hundred rows: at the
// model's sizes (B·K = 448 rows at clevr6, 128 in the tetrominoes config) every one of them is a
// launch and a ramp, not work.
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

// ---- Backward ----
//
// From d_out, per slot row (the single ops' math, ops/slotcell.rs):
//   update:  dhid = (d_out·W2) through dropout and the ReLU (hid > 0 exactly where both let it
//            through: a dropped unit is 0), scaled by 1/(1 − p) under dropout
//            dln = dhid·W1;  dh1 = d_out + LN_m backward(dln)
//            GRU gates backward (gru.cu) → dgi, dgh, and dh1·z into d_in
//            d_upd = dgi·W_ih (overwritten);  d_in += dh1·z + dgh·W_hh
//   query:   dln_s = dq·Wq;  d_in += LN_s backward(dln_s)
// The parameter gradients are sums over the rows of outer products (and column sums): one
// thread per gradient element sums a chunk of SC_CHUNK rows in order into a partial row, and a
// second kernel adds the chunks in order (+=): deterministic, and enough threads to hide the
// loads' latency (448 rows in one loop would leave ~1 block per SM waiting on L2).

#define SC_CHUNK 32  // rows per partial sum of the parameter gradients

// acc[r] = Σ_k X[r][k]·W[k·ldw + col] over k < n_k (a multiple of 4), k in order: the product
// with W itself (not Wᵀ), whose column `col` is strided; across a warp's threads (consecutive
// columns) each read is coalesced.
template <int LD>
static __device__ __forceinline__ void sc_dots_t(const float (*X)[LD], const float* __restrict__ W, int ldw, int col,
                                                 int n_k, float acc[SC_ROWS]) {
#pragma unroll
    for (int r = 0; r < SC_ROWS; ++r) acc[r] = 0.0f;
#pragma unroll 2
    for (int k = 0; k < n_k; k += 4) {
        const float w0 = W[k * ldw + col], w1 = W[(k + 1) * ldw + col];
        const float w2 = W[(k + 2) * ldw + col], w3 = W[(k + 3) * ldw + col];
#pragma unroll
        for (int r = 0; r < SC_ROWS; ++r) {
            const float4 x = *(const float4*)&X[r][k];
            acc[r] += x.x * w0;
            acc[r] += x.y * w1;
            acc[r] += x.z * w2;
            acc[r] += x.w * w3;
        }
    }
}

// LayerNorm backward of the block's rows (warp r takes row r; layernorm_bwd_dx_f32's math):
// OUT[r][i] = rstd·(g − mean(g) − x̂·mean(g·x̂)) with g = DY[r][i]·γ[i], x̂ = (x − μ)·rstd, x the
// LayerNorm's input row r0 + r (zeros past `rows`). OUT must not be DY.
template <int LD>
static __device__ void sc_layernorm_bwd(const float (*DY)[LD], const float* __restrict__ x,
                                        const float* __restrict__ gamma, const float* __restrict__ mean,
                                        const float* __restrict__ rstd, int n, int r0, int rows, float (*OUT)[LD]) {
    const int r = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const bool valid = r0 + r < rows;
    const float mu = valid ? mean[r0 + r] : 0.0f, rs = valid ? rstd[r0 + r] : 0.0f;
    const float fn = (float)n;
    float mg = 0.0f, mgx = 0.0f;
    for (int i = lane; i < n; i += 32) {
        const float xh = valid ? (x[(r0 + r) * n + i] - mu) * rs : 0.0f;
        const float g = DY[r][i] * gamma[i];
        mg += g;
        mgx += g * xh;
    }
    mg = warp_allsum(mg) / fn;
    mgx = warp_allsum(mgx) / fn;
    for (int i = lane; i < n; i += 32) {
        const float xh = valid ? (x[(r0 + r) * n + i] - mu) * rs : 0.0f;
        OUT[r][i] = rs * (DY[r][i] * gamma[i] - mg - xh * mgx);
    }
}

// The update's data path: dln, dhid (masked), dgi, dgh (all [rows, ·], overwritten: the
// parameter kernels read them), d_upd (overwritten), d_in (+=). grid ceil(rows / SC_ROWS), block
// SC_THREADS.
extern "C" __global__ void __launch_bounds__(SC_THREADS)
slot_update_bwd_f32(SlotCellDims p, const float* __restrict__ w_ih, const float* __restrict__ w_hh,
                    const float* __restrict__ g_m, const float* __restrict__ w1, const float* __restrict__ w2,
                    const float* __restrict__ slots, const float* __restrict__ gi, const float* __restrict__ gh,
                    const float* __restrict__ h1, const float* __restrict__ mean, const float* __restrict__ rstd,
                    const float* __restrict__ hid, float drop_scale, const float* __restrict__ d_out,
                    float* __restrict__ dln, float* __restrict__ dhid, float* __restrict__ dgi,
                    float* __restrict__ dgh, float* __restrict__ d_upd, float* __restrict__ d_in) {
    __shared__ __align__(16) float DO[SC_ROWS][SC_MAXD];   // d_out
    __shared__ __align__(16) float DH1[SC_ROWS][SC_MAXD];  // dh1
    __shared__ __align__(16) float DL[SC_ROWS][SC_MAXD];   // dln
    __shared__ __align__(16) float DZ[SC_ROWS][SC_MAXD];   // dh1·z (d_in's term from the gates)
    __shared__ __align__(16) float DHID[SC_ROWS][SC_MAXH];
    __shared__ __align__(16) float G1[SC_ROWS][3 * SC_MAXD];  // gi, then dgi
    __shared__ __align__(16) float G2[SC_ROWS][3 * SC_MAXD];  // gh, then dgh
    const int rows = p.rows, d = p.d, m = p.hidden, t = threadIdx.x, d3 = 3 * d;
    const int r0 = blockIdx.x * SC_ROWS;
    sc_load(DO, d_out, r0, rows, d);
    sc_load(G1, gi, r0, rows, d3);
    sc_load(G2, gh, r0, rows, d3);
    __syncthreads();
    if (t < m) {
        float acc[SC_ROWS];
        sc_dots_t(DO, w2, m, t, d, acc);
#pragma unroll
        for (int r = 0; r < SC_ROWS; ++r) {
            const bool valid = r0 + r < rows;
            const float v = (valid && hid[(r0 + r) * m + t] > 0.0f) ? acc[r] * drop_scale : 0.0f;
            DHID[r][t] = v;
            if (valid) dhid[(r0 + r) * m + t] = v;
        }
    }
    __syncthreads();
    if (t < d) {
        float acc[SC_ROWS];
        sc_dots_t(DHID, w1, d, t, m, acc);
#pragma unroll
        for (int r = 0; r < SC_ROWS; ++r) {
            DL[r][t] = acc[r];
            if (r0 + r < rows) dln[(r0 + r) * d + t] = acc[r];
        }
    }
    __syncthreads();
    sc_layernorm_bwd(DL, h1, g_m, mean, rstd, d, r0, rows, DH1);
    __syncthreads();
    // dh1 = d_out + the LayerNorm's term; then the gates (gru_gates_bwd_f32's math), in place.
    for (int e = t; e < SC_ROWS * d; e += SC_THREADS) {
        const int r = e / d, j = e % d;
        const bool valid = r0 + r < rows;
        const float g = DO[r][j] + DH1[r][j];
        const float h = valid ? slots[(r0 + r) * d + j] : 0.0f;
        const float rg = sigmoidf_(G1[r][j] + G2[r][j]);
        const float zg = sigmoidf_(G1[r][d + j] + G2[r][d + j]);
        const float ghn = G2[r][2 * d + j];
        const float ng = tanhf(G1[r][2 * d + j] + rg * ghn);
        DZ[r][j] = g * zg;
        const float dz = g * (h - ng) * zg * (1.0f - zg);
        const float dn = g * (1.0f - zg) * (1.0f - ng * ng);
        const float dr = dn * ghn * rg * (1.0f - rg);
        G1[r][j] = dr;
        G1[r][d + j] = dz;
        G1[r][2 * d + j] = dn;
        G2[r][j] = dr;
        G2[r][d + j] = dz;
        G2[r][2 * d + j] = dn * rg;
        if (valid) {
            float* gir = dgi + (r0 + r) * d3;
            float* ghr = dgh + (r0 + r) * d3;
            gir[j] = dr;
            gir[d + j] = dz;
            gir[2 * d + j] = dn;
            ghr[j] = dr;
            ghr[d + j] = dz;
            ghr[2 * d + j] = dn * rg;
        }
    }
    __syncthreads();
    float acc[SC_ROWS];
    if (t < d) {
        sc_dots_t(G1, w_ih, d, t, d3, acc);
#pragma unroll
        for (int r = 0; r < SC_ROWS; ++r)
            if (r0 + r < rows) d_upd[(r0 + r) * d + t] = acc[r];
    } else if (t < 2 * d) {
        const int c = t - d;
        sc_dots_t(G2, w_hh, d, c, d3, acc);
#pragma unroll
        for (int r = 0; r < SC_ROWS; ++r)
            if (r0 + r < rows) d_in[(r0 + r) * d + c] += DZ[r][c] + acc[r];
    }
}

// Σ over rows [r0, r1) of A[r][a]·B[r][b] (B null: of A[r][a]), in order.
static __device__ __forceinline__ float sc_rows_dot(const float* __restrict__ A, int lda, int a,
                                                    const float* __restrict__ B, int ldb, int b, int r0, int r1) {
    float s = 0.0f;
    if (B) {
#pragma unroll 8
        for (int r = r0; r < r1; ++r) s += A[r * lda + a] * B[r * ldb + b];
    } else {
#pragma unroll 8
        for (int r = r0; r < r1; ++r) s += A[r * lda + a];
    }
    return s;
}

// Σ over rows [r0, r1) of dy[r][i]·x̂[r][i], x̂ = (x − μ)·rstd: a LayerNorm's dγ.
static __device__ __forceinline__ float sc_rows_gamma(const float* __restrict__ dy, const float* __restrict__ x,
                                                      const float* __restrict__ mean, const float* __restrict__ rstd,
                                                      int n, int i, int r0, int r1) {
    float s = 0.0f;
#pragma unroll 8
    for (int r = r0; r < r1; ++r) s += dy[r * n + i] * ((x[r * n + i] - mean[r]) * rstd[r]);
    return s;
}

// The update's parameter gradients as one index space, in the order of SlotUpdateGrads:
// W_ih [3d][d], b_ih [3d], W_hh [3d][d], b_hh [3d], γ_m [d], β_m [d], W1 [m][d], b1 [m],
// W2 [d][m], b2 [d]. Returns the segment of element e and its index i in it.
static __device__ __forceinline__ int sc_update_segment(int e, int d, int m, int& i) {
    // (Lengths by a select, not from a table: ptxas put the table in local memory.)
    const int wd = 3 * d * d, bd = 3 * d;
    int seg = 0;
#pragma unroll
    for (int s = 0; s < 9; ++s) {
        const int len = (s == 0 || s == 2) ? wd : (s == 1 || s == 3) ? bd : (s == 4 || s == 5) ? d
                      : s == 6 ? m * d : s == 7 ? m : d * m;
        if (seg == s && e >= len) {
            e -= len;
            seg = s + 1;
        }
    }
    i = e;
    return seg;
}

static __device__ __forceinline__ int sc_update_grad_len(int d, int m) { return 6 * d * d + 9 * d + 2 * m * d + m; }

// partial[chunk][e] = the sum over rows of chunk blockIdx.y (SC_CHUNK rows) of update gradient
// element e. grid (ceil(len / SC_THREADS), chunks), block SC_THREADS.
extern "C" __global__ void __launch_bounds__(SC_THREADS)
slot_update_bwd_params_partial_f32(SlotCellDims p, const float* __restrict__ upd, const float* __restrict__ slots,
                                   const float* __restrict__ h1, const float* __restrict__ mean,
                                   const float* __restrict__ rstd, const float* __restrict__ ln,
                                   const float* __restrict__ hid, const float* __restrict__ d_out,
                                   const float* __restrict__ dln, const float* __restrict__ dhid,
                                   const float* __restrict__ dgi, const float* __restrict__ dgh,
                                   float* __restrict__ partial) {
    const int d = p.d, m = p.hidden, d3 = 3 * d, len = sc_update_grad_len(d, m);
    const int e = blockIdx.x * SC_THREADS + threadIdx.x;
    if (e >= len) return;
    const int r0 = blockIdx.y * SC_CHUNK, r1 = min(r0 + SC_CHUNK, p.rows);
    int i;
    float s;
    switch (sc_update_segment(e, d, m, i)) {
        case 0: s = sc_rows_dot(dgi, d3, i / d, upd, d, i % d, r0, r1); break;
        case 1: s = sc_rows_dot(dgi, d3, i, nullptr, 0, 0, r0, r1); break;
        case 2: s = sc_rows_dot(dgh, d3, i / d, slots, d, i % d, r0, r1); break;
        case 3: s = sc_rows_dot(dgh, d3, i, nullptr, 0, 0, r0, r1); break;
        case 4: s = sc_rows_gamma(dln, h1, mean, rstd, d, i, r0, r1); break;
        case 5: s = sc_rows_dot(dln, d, i, nullptr, 0, 0, r0, r1); break;
        case 6: s = sc_rows_dot(dhid, m, i / d, ln, d, i % d, r0, r1); break;
        case 7: s = sc_rows_dot(dhid, m, i, nullptr, 0, 0, r0, r1); break;
        case 8: s = sc_rows_dot(d_out, d, i / m, hid, m, i % m, r0, r1); break;
        default: s = sc_rows_dot(d_out, d, i, nullptr, 0, 0, r0, r1); break;
    }
    partial[blockIdx.y * len + e] = s;
}

// grad += Σ_chunk partial[chunk][e], chunks in order; one thread per element.
extern "C" __global__ void __launch_bounds__(SC_THREADS)
slot_update_bwd_params_reduce_f32(SlotCellDims p, int chunks, const float* __restrict__ partial,
                                  float* __restrict__ gw_ih, float* __restrict__ gb_ih, float* __restrict__ gw_hh,
                                  float* __restrict__ gb_hh, float* __restrict__ gg, float* __restrict__ gb,
                                  float* __restrict__ gw1, float* __restrict__ gb1, float* __restrict__ gw2,
                                  float* __restrict__ gb2) {
    const int len = sc_update_grad_len(p.d, p.hidden);
    const int e = blockIdx.x * SC_THREADS + threadIdx.x;
    if (e >= len) return;
    float s = 0.0f;
    for (int c = 0; c < chunks; ++c) s += partial[c * len + e];
    int i;
    const int seg = sc_update_segment(e, p.d, p.hidden, i);
    // (A chain, not an array of the pointers: that array would live in local memory.)
    float* dst = seg == 0 ? gw_ih : seg == 1 ? gb_ih : seg == 2 ? gw_hh : seg == 3 ? gb_hh : seg == 4 ? gg
               : seg == 5 ? gb : seg == 6 ? gw1 : seg == 7 ? gb1 : seg == 8 ? gw2 : gb2;
    dst[i] += s;
}

// The query's data path: dln (overwritten; the parameter kernels read it), d_in (+=).
// grid ceil(rows / SC_ROWS), block SC_THREADS.
extern "C" __global__ void __launch_bounds__(SC_THREADS)
slot_query_bwd_f32(SlotCellDims p, const float* __restrict__ wq, const float* __restrict__ g_s,
                   const float* __restrict__ slots, const float* __restrict__ mean, const float* __restrict__ rstd,
                   const float* __restrict__ dq, float* __restrict__ dln, float* __restrict__ d_in) {
    __shared__ __align__(16) float DQ[SC_ROWS][SC_MAXD];
    __shared__ __align__(16) float DL[SC_ROWS][SC_MAXD];
    __shared__ __align__(16) float DX[SC_ROWS][SC_MAXD];
    const int rows = p.rows, d = p.d, t = threadIdx.x;
    const int r0 = blockIdx.x * SC_ROWS;
    sc_load(DQ, dq, r0, rows, d);
    __syncthreads();
    if (t < d) {
        float acc[SC_ROWS];
        sc_dots_t(DQ, wq, d, t, d, acc);
#pragma unroll
        for (int r = 0; r < SC_ROWS; ++r) {
            DL[r][t] = acc[r];
            if (r0 + r < rows) dln[(r0 + r) * d + t] = acc[r];
        }
    }
    __syncthreads();
    sc_layernorm_bwd(DL, slots, g_s, mean, rstd, d, r0, rows, DX);
    __syncthreads();
    for (int e = t; e < SC_ROWS * d; e += SC_THREADS) {
        const int r = e / d, j = e % d;
        if (r0 + r < rows) d_in[(r0 + r) * d + j] += DX[r][j];
    }
}

// The query's parameter gradients as one index space: Wq [d][d], γ_s [d], β_s [d].
// partial[chunk][e] as slot_update_bwd_params_partial_f32.
extern "C" __global__ void __launch_bounds__(SC_THREADS)
slot_query_bwd_params_partial_f32(SlotCellDims p, const float* __restrict__ slots, const float* __restrict__ mean,
                                  const float* __restrict__ rstd, const float* __restrict__ ln,
                                  const float* __restrict__ dq, const float* __restrict__ dln,
                                  float* __restrict__ partial) {
    const int d = p.d, len = d * d + 2 * d;
    const int e = blockIdx.x * SC_THREADS + threadIdx.x;
    if (e >= len) return;
    const int r0 = blockIdx.y * SC_CHUNK, r1 = min(r0 + SC_CHUNK, p.rows);
    float s;
    if (e < d * d) s = sc_rows_dot(dq, d, e / d, ln, d, e % d, r0, r1);
    else if (e < d * d + d) s = sc_rows_gamma(dln, slots, mean, rstd, d, e - d * d, r0, r1);
    else s = sc_rows_dot(dln, d, e - d * d - d, nullptr, 0, 0, r0, r1);
    partial[blockIdx.y * len + e] = s;
}

extern "C" __global__ void __launch_bounds__(SC_THREADS)
slot_query_bwd_params_reduce_f32(SlotCellDims p, int chunks, const float* __restrict__ partial,
                                 float* __restrict__ gwq, float* __restrict__ gg, float* __restrict__ gb) {
    const int d = p.d, len = d * d + 2 * d;
    const int e = blockIdx.x * SC_THREADS + threadIdx.x;
    if (e >= len) return;
    float s = 0.0f;
    for (int c = 0; c < chunks; ++c) s += partial[c * len + e];
    if (e < d * d) gwq[e] += s;
    else if (e < d * d + d) gg[e - d * d] += s;
    else gb[e - d * d - d] += s;
}
