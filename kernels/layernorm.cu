// layernorm.cu: LayerNorm over the last dimension (one warp per row).
//
// Math: μ = mean(x), σ² = mean((x−μ)²), r = 1/sqrt(σ²+eps), y = (x−μ)·r·γ + β; saves μ, r.
//   backward with x̂ = (x−μ)·r, g = dy·γ:  dx += r·(g − mean(g) − x̂·mean(g·x̂));
//   dγ[i] += Σ_rows dy·x̂,  dβ[i] += Σ_rows dy  (one block per column, fixed-order reduction).
// FLOPs ≈ 8 · rows · dim forward, ≈ 14 · rows · dim backward. Compulsory bytes: 4 · (2·rows·dim
// + 2·rows + 2·dim) forward; 4 · (3·rows·dim + 2·rows + 3·dim) for dx, 4 · 2·rows·dim (+ stats) for dγ/dβ.
// Backward kernels ACCUMULATE (+=), like the CPU reference.

static __device__ __forceinline__ float warp_allsum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

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

// One block per column i: dgamma[i] += Σ_r dy·x̂, dbeta[i] += Σ_r dy.
extern "C" __global__ void layernorm_bwd_params_f32(int rows, int dim, const float* __restrict__ x,
                                                    const float* __restrict__ mean, const float* __restrict__ rstd,
                                                    const float* __restrict__ dy, float* __restrict__ dgamma,
                                                    float* __restrict__ dbeta) {
    __shared__ float sh[32];
    const int i = blockIdx.x;
    float ag = 0.0f, ab = 0.0f;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        const float d = dy[r * dim + i];
        const float xh = (x[r * dim + i] - mean[r]) * rstd[r];
        ag += d * xh;
        ab += d;
    }
    ag = block_sum(ag, sh);
    ab = block_sum(ab, sh);
    if (threadIdx.x == 0) {
        dgamma[i] += ag;
        dbeta[i] += ab;
    }
}
