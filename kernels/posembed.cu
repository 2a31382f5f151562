// posembed.cu: soft position embedding. grid(i, j) = [u, v, 1−u, 1−v] with u = i/(h−1),
// v = j/(w−1) (computed in double, rounded to f32, as on the CPU); pos[p, c] = b[c] + Σ_q W[c,q]·grid_q(p).
//   encoder  x[n, p, c] += pos[p, c]                (in place)
//   decoder  y[n, p, c]  = z[n, c] + pos[p, c]       (broadcast, overwritten)
//   backward dW[c, q] += Σ_{n,p} dy·grid_q(p);  db[c] += Σ_{n,p} dy  (block partials, added in order);
//            decoder also dz[n, c] += Σ_p dy[n, p, c].
// FLOPs ≈ 9 per element forward, 6·h·w·c + B·h·w·c backward. Compulsory bytes: 4 · 2·|x| forward
// (4 · (|y| + |z|) decoder); 4 · |dy| (+ 4 · |dz|) backward.
// Backward kernels ACCUMULATE (+=), like the CPU reference.

// grid_val and pos_val (the embedding of one pixel) are in common.cuh: tokens.cu uses them too.

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

// Position-embedding parameters, first half, over the rows (n, p) [r0, r0 + chunk) of dy
// [nimg·h·w, c]: pw[blockIdx.x][ch·4 + q] = Σ dy·grid_q(p), pb[blockIdx.x][ch] = Σ dy
// (overwritten); sum_partials_f32 (linear.cu) adds them in block order. Block 256: lane ↔ channel
// of a 32-wide strip, warp ↔ every 8th row (coalesced row reads).
extern "C" __global__ void posembed_params_partial_f32(int m, int h, int w, int c, int chunk,
                                                       const float* __restrict__ dy, float* __restrict__ pw,
                                                       float* __restrict__ pb) {
    __shared__ float sh[8][33];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int hw = h * w;
    const int r0 = blockIdx.x * chunk, r1 = min(r0 + chunk, m);
    for (int c0 = 0; c0 < c; c0 += 32) {
        const int ch = c0 + lane;
        float a[5] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        if (ch < c)
            for (int r = r0 + warp; r < r1; r += 8) {
                const float d = dy[r * c + ch];
                const int p = r % hw;
                for (int q = 0; q < 4; ++q) a[q] += d * grid_val(q, p, h, w);
                a[4] += d;
            }
        for (int q = 0; q < 5; ++q) {
            const float s = column_sum_8warps(a[q], sh);
            if (warp == 0 && ch < c) {
                if (q < 4) pw[blockIdx.x * c * 4 + ch * 4 + q] = s;
                else pb[blockIdx.x * c + ch] = s;
            }
        }
    }
}

// One block (256 threads) per image: dz[img, ch] += Σ_p dy[img, p, ch], lane ↔ channel of a
// 32-wide strip, warp ↔ every 8th pixel (coalesced row reads).
extern "C" __global__ void broadcast_pos_bwd_dz_f32(int hw, int c, const float* __restrict__ dy,
                                                    float* __restrict__ dz) {
    __shared__ float sh[8][33];
    const int img = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int c0 = 0; c0 < c; c0 += 32) {
        const int ch = c0 + lane;
        float acc = 0.0f;
        if (ch < c)
            for (int p = warp; p < hw; p += 8) acc += dy[(img * hw + p) * c + ch];
        const float s = column_sum_8warps(acc, sh);
        if (warp == 0 && ch < c) dz[img * c + ch] += s;
    }
}
