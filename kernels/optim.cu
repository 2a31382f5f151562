// optim.cu: Adam(W) and sums of squares, in double precision like the CPU reference.
// Math (optim.rs): g' = grad_scale·g; m = β1 m + (1−β1) g'; v = β2 v + (1−β2) g'²;
//   p = p·(1 − lr·wd) − lr·(m/bc1) / (sqrt(v/bc2) + eps), bc_i = 1 − β_i^t (host-computed).
//   Every double operation is an explicitly rounded intrinsic (no FMA contraction), so the
//   result is bit-identical to the CPU's f64 arithmetic before the final rounding to f32.
//   sum_squares: Σ x² in double; diff_squares: Σ (a − b)² in double. Two passes with a fixed grid:
//   per-block partials, then one block sums them (deterministic for a given n).
// FLOPs: ~15 double ops per element (Adam), 2 per element (sums). Compulsory bytes: Adam 4 · 7
// per element (p, m, v read+write, g read); sums 4 or 8 per element.

extern "C" __global__ void adam_f32(int n, float* __restrict__ param, const float* __restrict__ grad,
                                    float* __restrict__ m, float* __restrict__ v, double lr, double b1,
                                    double b2, double bc1, double bc2, double eps, double decay,
                                    double grad_scale) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const double g = __dmul_rn((double)grad[i], grad_scale);
    const double m1 = __dadd_rn(__dmul_rn(b1, (double)m[i]), __dmul_rn(__dadd_rn(1.0, -b1), g));
    const double v1 = __dadd_rn(__dmul_rn(b2, (double)v[i]), __dmul_rn(__dmul_rn(__dadd_rn(1.0, -b2), g), g));
    const double upd = __ddiv_rn(__dmul_rn(lr, __ddiv_rn(m1, bc1)), __dadd_rn(__dsqrt_rn(__ddiv_rn(v1, bc2)), eps));
    param[i] = (float)__dadd_rn(__dmul_rn((double)param[i], decay), -upd);
    m[i] = (float)m1;
    v[i] = (float)v1;
}

// partial[blockIdx.x] = Σ over this block's grid-stride elements of x² (double).
extern "C" __global__ void sum_squares_partial_f32(int n, const float* __restrict__ x, double* __restrict__ partial) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const double a = (double)x[i];
        acc += a * a;
    }
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// partial[blockIdx.x] = Σ (a − b)² (double).
extern "C" __global__ void diff_squares_partial_f32(int n, const float* __restrict__ a, const float* __restrict__ b,
                                                    double* __restrict__ partial) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const double d = (double)a[i] - (double)b[i];
        acc += d * d;
    }
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// One block: out[0] = Σ partial[0..n).
extern "C" __global__ void sum_partials_f64(int n, const double* __restrict__ partial, double* __restrict__ out) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) out[0] = acc;
}
