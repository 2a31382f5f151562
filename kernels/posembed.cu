// posembed.cu: soft position embedding. grid(i, j) = [u, v, 1−u, 1−v] with u = i/(h−1),
// v = j/(w−1) (computed in double, rounded to f32, as on the CPU); pos[p, c] = b[c] + Σ_q W[c,q]·grid_q(p).
//   encoder  x[n, p, c] += pos[p, c]                (in place)
//   decoder  y[n, p, c]  = z[n, c] + pos[p, c]       (broadcast, overwritten)
//   backward s[p, c] = Σ_n dy[n, p, c];  dW[c, q] += Σ_p s·grid_q(p);  db[c] += Σ_p s;
//            decoder also dz[n, c] += Σ_p dy[n, p, c].
// FLOPs ≈ 9 per element forward, 6·h·w·c + B·h·w·c backward. Compulsory bytes: 4 · 2·|x| forward
// (4 · (|y| + |z|) decoder); 4 · |dy| (+ 4 · |dz|) backward.
// Backward kernels ACCUMULATE (+=), like the CPU reference.

// grid_q of pixel p = i·w + j of an h×w image.
static __device__ __forceinline__ float grid_val(int q, int p, int h, int w) {
    const int i = p / w, j = p % w;
    const double u = h > 1 ? (double)i / (double)(h - 1) : 0.0;
    const double v = w > 1 ? (double)j / (double)(w - 1) : 0.0;
    double g;
    switch (q) {
        case 0: g = u; break;
        case 1: g = v; break;
        case 2: g = 1.0 - u; break;
        default: g = 1.0 - v; break;
    }
    return (float)g;
}

static __device__ __forceinline__ float pos_val(int p, int ch, int h, int w, const float* wp, const float* bp) {
    float s = bp[ch];
    for (int q = 0; q < 4; ++q) s += wp[ch * 4 + q] * grid_val(q, p, h, w);
    return s;
}

// x [nimg, h, w, c] += pos; total = nimg·h·w·c.
extern "C" __global__ void softpos_add_fwd_f32(int total, int h, int w, int c, const float* __restrict__ wp,
                                               const float* __restrict__ bp, float* __restrict__ x) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int ch = i % c;
    const int p = (i / c) % (h * w);
    x[i] += pos_val(p, ch, h, w, wp, bp);
}

// y [nimg, h, w, c] = z[img, c] + pos (overwritten); total = nimg·h·w·c.
extern "C" __global__ void broadcast_pos_fwd_f32(int total, int h, int w, int c, const float* __restrict__ z,
                                                 const float* __restrict__ wp, const float* __restrict__ bp,
                                                 float* __restrict__ y) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int ch = i % c;
    const int p = (i / c) % (h * w);
    const int img = i / (h * w * c);
    y[i] = z[img * c + ch] + pos_val(p, ch, h, w, wp, bp);
}

// One block per channel ch: s[p] = Σ_n dy[n, p, ch] (batch order); dwp[ch, q] += Σ_p s·grid_q(p);
// dbp[ch] += Σ_p s.
extern "C" __global__ void posembed_bwd_params_f32(int nimg, int h, int w, int c, const float* __restrict__ dy,
                                                   float* __restrict__ dwp, float* __restrict__ dbp) {
    __shared__ float sh[32];
    const int ch = blockIdx.x;
    const int hw = h * w;
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f, ab = 0.0f;
    for (int p = threadIdx.x; p < hw; p += blockDim.x) {
        float s = 0.0f;
        for (int n = 0; n < nimg; ++n) s += dy[(n * hw + p) * c + ch];
        a0 += s * grid_val(0, p, h, w);
        a1 += s * grid_val(1, p, h, w);
        a2 += s * grid_val(2, p, h, w);
        a3 += s * grid_val(3, p, h, w);
        ab += s;
    }
    a0 = block_sum(a0, sh);
    a1 = block_sum(a1, sh);
    a2 = block_sum(a2, sh);
    a3 = block_sum(a3, sh);
    ab = block_sum(ab, sh);
    if (threadIdx.x == 0) {
        dwp[ch * 4 + 0] += a0;
        dwp[ch * 4 + 1] += a1;
        dwp[ch * 4 + 2] += a2;
        dwp[ch * 4 + 3] += a3;
        dbp[ch] += ab;
    }
}

// One block per (img, ch): dz[img, ch] += Σ_p dy[img, p, ch].
extern "C" __global__ void broadcast_pos_bwd_dz_f32(int hw, int c, const float* __restrict__ dy,
                                                    float* __restrict__ dz) {
    __shared__ float sh[32];
    const int img = blockIdx.x / c, ch = blockIdx.x % c;
    float acc = 0.0f;
    for (int p = threadIdx.x; p < hw; p += blockDim.x) acc += dy[(img * hw + p) * c + ch];
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) dz[img * c + ch] += acc;
}
