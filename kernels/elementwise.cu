// elementwise.cu: small elementwise ops and the counter-based RNG's fills (Philox4x32-10 itself is
// in common.cuh).
// Math:
//   fill_normal   out[i] = (float) normal(seed, stream, step, i), Box-Muller in double:
//                 u1 = ((w0>>8) + 1)/2^24, u2 = (w1>>8)/2^24, sqrt(−2 ln u1) · cos(2π u2)
//   dropout       x[i] = uniform(seed, stream, step, i) >= p ? x[i] · scale : 0, scale = 1/(1−p)
//                 (also the backward: the same linear map on the gradient)
//   slot_init     slots[r, j] = mu[j] + exp(log_sigma[j]) · noise[r, j]
//                 backward dmu[j] += Σ_r g;  dlog_sigma[j] += Σ_r g · exp(log_sigma[j]) · noise
//   add_assign    y += x;   scale   x *= a
// FLOPs: ~O(1) per element (fill_normal: one Philox block = 10 rounds of 2 mul.hi + log + cos in
// double). Compulsory bytes: 4 B (fill), 8 B (dropout/scale), 12 B (add) per element.
// Backward kernels ACCUMULATE (+=), like the CPU reference.


// Fills out[0..n) with standard normals (element i = normal(seed, stream, step, i)).
// step = step_counter(step_vals).
extern "C" __global__ void fill_normal_f32(int n, unsigned int seed_lo, unsigned int seed_hi,
                                           unsigned int stream, const double* __restrict__ step_vals,
                                           float* __restrict__ out) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned int w[4];
    philox_words(seed_lo, seed_hi, stream, step_counter(step_vals), (unsigned long long)i, w);
    const double u1 = __dmul_rn((double)(w[0] >> 8) + 1.0, 1.0 / 16777216.0);
    const double u2 = __dmul_rn((double)(w[1] >> 8), 1.0 / 16777216.0);
    const double tau = 6.283185307179586476925286766559;
    out[i] = (float)(sqrt(__dmul_rn(-2.0, log(u1))) * cos(__dmul_rn(tau, u2)));
}

// In place: x[i] = keep ? x[i] · scale : 0 with keep = uniform(seed, stream, step, i) >= p,
// step = step_counter(step_vals).
extern "C" __global__ void dropout_f32(int n, unsigned int seed_lo, unsigned int seed_hi, unsigned int stream,
                                       const double* __restrict__ step_vals, double p, float scale,
                                       float* __restrict__ x) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const bool keep = dropout_keep(seed_lo, seed_hi, stream, step_counter(step_vals), (unsigned long long)i, p);
    x[i] = keep ? x[i] * scale : 0.0f;
}

// slots [rows, d] (overwritten); total = rows·d.
extern "C" __global__ void slot_init_fwd_f32(int total, int d, const float* __restrict__ mu,
                                             const float* __restrict__ log_sigma, const float* __restrict__ noise,
                                             float* __restrict__ slots) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int j = i % d;
    slots[i] = mu[j] + expf(log_sigma[j]) * noise[i];
}

// One thread per j: sums over the rows in order, starting from the existing value (as the CPU).
extern "C" __global__ void slot_init_bwd_f32(int rows, int d, const float* __restrict__ log_sigma,
                                             const float* __restrict__ noise, const float* __restrict__ dslots,
                                             float* __restrict__ dmu, float* __restrict__ dlog_sigma) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    const float e = expf(log_sigma[j]);
    float am = dmu[j], al = dlog_sigma[j];
    for (int r = 0; r < rows; ++r) {
        const float g = dslots[r * d + j];
        am += g;
        al += g * e * noise[r * d + j];
    }
    dmu[j] = am;
    dlog_sigma[j] = al;
}

// y += x.
extern "C" __global__ void add_assign_f32(int n, float* __restrict__ y, const float* __restrict__ x) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += x[i];
}

// x *= a.
extern "C" __global__ void scale_f32(int n, float a, float* __restrict__ x) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= a;
}

// x[i] = value (used to poison or fill buffers).
extern "C" __global__ void fill_f32(int n, float value, float* __restrict__ x) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = value;
}
