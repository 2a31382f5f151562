// layernorm.cu: LayerNorm over the last dimension (one warp per row).
//
// Math: μ = mean(x), σ² = mean((x−μ)²), r = 1/sqrt(σ²+eps), y = (x−μ)·r·γ + β; saves μ, r.
//   backward with x̂ = (x−μ)·r, g = dy·γ:  dx += r·(g − mean(g) − x̂·mean(g·x̂));
//   dγ[i] += Σ_rows dy·x̂,  dβ[i] += Σ_rows dy  (block partials over fixed row chunks, added in order).
// FLOPs ≈ 8 · rows · dim forward, ≈ 14 · rows · dim backward. Compulsory bytes: 4 · (2·rows·dim
// + 2·rows + 2·dim) forward; 4 · (3·rows·dim + 2·rows + 3·dim) for dx, 4 · 2·rows·dim (+ stats) for dγ/dβ.
// Backward kernels ACCUMULATE (+=), like the CPU reference.

// One warp per row; blockDim.x a multiple of 32. y overwritten, mean/rstd [rows] overwritten.
extern "C" __global__ void layernorm_fwd_f32(int rows, int dim, const float* __restrict__ x,
                                             const float* __restrict__ gamma, const float* __restrict__ beta,
                                             float eps, float* __restrict__ y, float* __restrict__ mean,
                                             float* __restrict__ rstd) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;  // the whole warp leaves together
    const float* xr = x + row * dim;
    float* yr = y + row * dim;
    const float n = (float)dim;
    float s = 0.0f;
    for (int i = lane; i < dim; i += 32) s += xr[i];
    const float mu = warp_allsum(s) / n;
    float v = 0.0f;
    for (int i = lane; i < dim; i += 32) {
        const float d = xr[i] - mu;
        v += d * d;
    }
    const float var = warp_allsum(v) / n;
    const float r = 1.0f / sqrtf(var + eps);
    for (int i = lane; i < dim; i += 32) yr[i] = (xr[i] - mu) * r * gamma[i] + beta[i];
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = r;
    }
}

// dx [rows, dim] += r·(dy·γ − mean(dy·γ) − x̂·mean(dy·γ·x̂)); one warp per row.
extern "C" __global__ void layernorm_bwd_dx_f32(int rows, int dim, const float* __restrict__ x,
                                                const float* __restrict__ gamma, const float* __restrict__ mean,
                                                const float* __restrict__ rstd, const float* __restrict__ dy,
                                                float* __restrict__ dx) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float* xr = x + row * dim;
    const float* dyr = dy + row * dim;
    float* dxr = dx + row * dim;
    const float mu = mean[row], rs = rstd[row];
    const float n = (float)dim;
    float mg = 0.0f, mgx = 0.0f;
    for (int i = lane; i < dim; i += 32) {
        const float xh = (xr[i] - mu) * rs;
        const float g = dyr[i] * gamma[i];
        mg += g;
        mgx += g * xh;
    }
    mg = warp_allsum(mg) / n;
    mgx = warp_allsum(mgx) / n;
    for (int i = lane; i < dim; i += 32) {
        const float xh = (xr[i] - mu) * rs;
        dxr[i] += rs * (dyr[i] * gamma[i] - mg - xh * mgx);
    }
}

// dγ, dβ, first half: pg[blockIdx.x][i] = Σ dy·x̂, pb[blockIdx.x][i] = Σ dy over the rows
// [r0, r0 + chunk) (overwritten); sum_partials_f32 (linear.cu) adds them in block order. Block
// 256: lane ↔ column of a 32-wide strip, warp ↔ every 8th row (coalesced row reads).
extern "C" __global__ void layernorm_params_partial_f32(int rows, int dim, int chunk, const float* __restrict__ x,
                                                        const float* __restrict__ mean,
                                                        const float* __restrict__ rstd,
                                                        const float* __restrict__ dy, float* __restrict__ pg,
                                                        float* __restrict__ pb) {
    __shared__ float sh[8][33];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r0 = blockIdx.x * chunk, r1 = min(r0 + chunk, rows);
    for (int c0 = 0; c0 < dim; c0 += 32) {
        const int i = c0 + lane;
        float ag = 0.0f, ab = 0.0f;
        if (i < dim)
            for (int r = r0 + warp; r < r1; r += 8) {
                const float d = dy[r * dim + i];
                ag += d * (x[r * dim + i] - mean[r]) * rstd[r];
                ab += d;
            }
        ag = column_sum_8warps(ag, sh);
        ab = column_sum_8warps(ab, sh);
        if (warp == 0 && i < dim) {
            pg[blockIdx.x * dim + i] = ag;
            pb[blockIdx.x * dim + i] = ab;
        }
    }
}
