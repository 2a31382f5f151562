// gru.cu: the gates of PyTorch's GRUCell (the two matrix products are linear layers).
// Math (gate order r, z, n in rows of 3D):
//   r = σ(gi_r + gh_r), z = σ(gi_z + gh_z), n = tanh(gi_n + r·gh_n), h' = (1 − z)·n + z·h
//   backward: dh += g·z; dz = g·(h − n)·z(1−z); dn = g·(1−z)(1−n²); dr = dn·gh_n·r(1−r);
//   dgi += (dr, dz, dn), dgh += (dr, dz, dn·r).
// One thread per (row, j). FLOPs ≈ 20 forward, ≈ 45 backward per element (3 exp/tanh).
// Compulsory bytes per element: 4 · 8 forward, 4 · (8 + 1 + 14) backward.
// Backward ACCUMULATES (+=), like the CPU reference. (sigmoidf_ is in common.cuh.)

// h_new [rows, d] (overwritten); total = rows·d.
extern "C" __global__ void gru_gates_fwd_f32(int total, int d, const float* __restrict__ gi,
                                             const float* __restrict__ gh, const float* __restrict__ h,
                                             float* __restrict__ h_new) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int r = i / d, j = i % d;
    const float* gir = gi + r * 3 * d;
    const float* ghr = gh + r * 3 * d;
    const float rg = sigmoidf_(gir[j] + ghr[j]);
    const float zg = sigmoidf_(gir[d + j] + ghr[d + j]);
    const float ng = tanhf(gir[2 * d + j] + rg * ghr[2 * d + j]);
    h_new[i] = (1.0f - zg) * ng + zg * h[i];
}

extern "C" __global__ void gru_gates_bwd_f32(int total, int d, const float* __restrict__ gi,
                                             const float* __restrict__ gh, const float* __restrict__ h,
                                             const float* __restrict__ dh_new, float* __restrict__ dgi,
                                             float* __restrict__ dgh, float* __restrict__ dh) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int r = i / d, j = i % d;
    const float* gir = gi + r * 3 * d;
    const float* ghr = gh + r * 3 * d;
    float* dgir = dgi + r * 3 * d;
    float* dghr = dgh + r * 3 * d;
    const float rg = sigmoidf_(gir[j] + ghr[j]);
    const float zg = sigmoidf_(gir[d + j] + ghr[d + j]);
    const float ng = tanhf(gir[2 * d + j] + rg * ghr[2 * d + j]);
    const float g = dh_new[i];
    dh[i] += g * zg;
    const float dz = g * (h[i] - ng) * zg * (1.0f - zg);
    const float dn = g * (1.0f - zg) * (1.0f - ng * ng);
    const float dr = dn * ghr[2 * d + j] * rg * (1.0f - rg);
    dgir[j] += dr;
    dghr[j] += dr;
    dgir[d + j] += dz;
    dghr[d + j] += dz;
    dgir[2 * d + j] += dn;
    dghr[2 * d + j] += dn * rg;
}
