// linear.cu: fully connected layer on rows (version 1: 16×16 shared-memory tiled SGEMM).
//
// Math: y[r,o] = relu?(Σ_i x[r,i] · W[o,i] + b[o]),  W is [n_out, n_in] (nn.Linear).
//   g = dy masked by y > 0 when relu (relu_mask_f32 writes it to a scratch buffer first);
//   dx[r,i] += Σ_o g[r,o] · W[o,i];   dW[o,i] += Σ_r g[r,o] · x[r,i] (split over fixed row chunks
//   into partials, then summed in chunk order: deterministic);   db[o] += Σ_r g[r,o] (col_sum_partial_f32 in conv.cu, then sum_partials_f32).
// FLOPs: 2 · rows · n_in · n_out for each of y, dx, dW. Compulsory bytes: 4 · (rows·(n_in+n_out)
// + n_in·n_out) per product (+ 4 · rows · n_out · 3 for the mask, + partials for dW).
// Backward kernels ACCUMULATE (+=), like the CPU reference.

#define TS 16

// block (TS, TS); grid (ceil(rows/TS), ceil(n_out/TS)) (rows on x: grid.y is limited to 65535). y [rows, n_out] overwritten.
extern "C" __global__ void linear_fwd_f32(int rows, int n_in, int n_out, const float* __restrict__ x,
                                          const float* __restrict__ w, const float* __restrict__ b,
                                          int has_bias, int relu, float* __restrict__ y) {
    __shared__ float as[TS][TS + 1];  // as[r_local][k]
    __shared__ float bs[TS][TS + 1];  // bs[k][o_local]
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int r0 = blockIdx.x * TS, o0 = blockIdx.y * TS;
    float acc = 0.0f;
    for (int k0 = 0; k0 < n_in; k0 += TS) {
        const int ra = r0 + ty, ka = k0 + tx;
        as[ty][tx] = (ra < rows && ka < n_in) ? x[ra * n_in + ka] : 0.0f;
        const int ob = o0 + ty;
        bs[tx][ty] = (ob < n_out && ka < n_in) ? w[ob * n_in + ka] : 0.0f;
        __syncthreads();
        for (int kk = 0; kk < TS; ++kk) acc += as[ty][kk] * bs[kk][tx];
        __syncthreads();
    }
    const int r = r0 + ty, o = o0 + tx;
    if (r < rows && o < n_out) {
        if (has_bias) acc += b[o];
        if (relu && acc < 0.0f) acc = 0.0f;
        y[r * n_out + o] = acc;
    }
}

// g[i] = y[i] > 0 ? dy[i] : 0 (overwritten).
extern "C" __global__ void relu_mask_f32(int n, const float* __restrict__ dy, const float* __restrict__ y,
                                         float* __restrict__ g) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) g[i] = (y[i] > 0.0f) ? dy[i] : 0.0f;
}

// dx [rows, n_in] += g [rows, n_out] · W [n_out, n_in]. block (TS, TS); grid (ceil(rows/TS), ceil(n_in/TS)).
extern "C" __global__ void linear_bwd_dx_f32(int rows, int n_in, int n_out, const float* __restrict__ g,
                                             const float* __restrict__ w, float* __restrict__ dx) {
    __shared__ float as[TS][TS + 1];  // as[r_local][k]
    __shared__ float bs[TS][TS + 1];  // bs[k][i_local]
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int r0 = blockIdx.x * TS, i0 = blockIdx.y * TS;
    float acc = 0.0f;
    for (int k0 = 0; k0 < n_out; k0 += TS) {
        const int ra = r0 + ty, ka = k0 + tx;
        as[ty][tx] = (ra < rows && ka < n_out) ? g[ra * n_out + ka] : 0.0f;
        const int kb = k0 + ty, ib = i0 + tx;
        bs[ty][tx] = (kb < n_out && ib < n_in) ? w[kb * n_in + ib] : 0.0f;
        __syncthreads();
        for (int kk = 0; kk < TS; ++kk) acc += as[ty][kk] * bs[kk][tx];
        __syncthreads();
    }
    const int r = r0 + ty, i = i0 + tx;
    if (r < rows && i < n_in) dx[r * n_in + i] += acc;
}

// partial[z, o, i] = Σ_{r in chunk z} g[r, o] · x[r, i] (overwritten), chunk z = rows
// [z·chunk, min((z+1)·chunk, rows)). block (TS, TS); grid (ceil(n_in/TS), ceil(n_out/TS), nchunks).
extern "C" __global__ void linear_bwd_dw_partial_f32(int rows, int n_in, int n_out, int chunk,
                                                     const float* __restrict__ g, const float* __restrict__ x,
                                                     float* __restrict__ partial) {
    __shared__ float as[TS][TS + 1];  // as[k = r_local][o_local]
    __shared__ float bs[TS][TS + 1];  // bs[k = r_local][i_local]
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int o0 = blockIdx.y * TS, i0 = blockIdx.x * TS;
    const int rbeg = blockIdx.z * chunk;
    const int rend = min(rbeg + chunk, rows);
    float acc = 0.0f;
    for (int k0 = rbeg; k0 < rend; k0 += TS) {
        const int r = k0 + ty;
        as[ty][tx] = (r < rend && o0 + tx < n_out) ? g[r * n_out + o0 + tx] : 0.0f;
        bs[ty][tx] = (r < rend && i0 + tx < n_in) ? x[r * n_in + i0 + tx] : 0.0f;
        __syncthreads();
        for (int kk = 0; kk < TS; ++kk) acc += as[kk][ty] * bs[kk][tx];
        __syncthreads();
    }
    const int o = o0 + ty, i = i0 + tx;
    if (o < n_out && i < n_in) partial[(blockIdx.z * n_out + o) * n_in + i] = acc;
}

// dst[e] += Σ_z partial[z, e] over the nchunks rows (rs_combine's fixed order). Block RS_THREADS,
// grid ceil(len / RS_COLS).
extern "C" __global__ void __launch_bounds__(RS_THREADS)
    sum_partials_f32(int nchunks, int len, const float* __restrict__ partial, float* __restrict__ dst) {
    __shared__ float sh[RS_GROUPS][RS_COLS];
    const int e = rs_column(), g = rs_group();
    float s = 0.0f;
    if (e < len)
#pragma unroll 8
        for (int z = g; z < nchunks; z += RS_GROUPS) s += partial[(size_t)z * len + e];
    s = rs_combine(s, sh);
    if (g == 0 && e < len) dst[e] += s;
}

// C (+)= op(A)·op(B) for the small products of the fold (model.rs: W_qk = Wkᵀ·Wq, W_vi = W_ih·Wv
// and their gradients, at most 192 × 64 × 192): op(A) [m][kd] (A stored [kd][m] when a_t),
// op(B) [kd][n] (B stored [n][kd] when b_t). A thread per element of C, k in order (the CPU
// reference's order, exact f32). Blocks of at most 256 threads, a 1-D grid over C.
extern "C" __global__ void __launch_bounds__(256)
    matmul_small_f32(int m, int n, int kd, const float* __restrict__ a, int a_t, const float* __restrict__ b,
                     int b_t, float* __restrict__ c, int accumulate) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= m * n) return;
    const int i = e / n, j = e % n;
    float acc = 0.0f;
    for (int l = 0; l < kd; ++l) {
        const float av = a_t ? a[l * m + i] : a[i * kd + l];
        const float bv = b_t ? b[j * kd + l] : b[l * n + j];
        acc += av * bv;
    }
    c[e] = accumulate ? c[e] + acc : acc;
}
