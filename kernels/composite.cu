// composite.cu: alpha compositing of the K decoded slots and the mean squared error.
// Math per pixel: masks[s] = softmax over the K slots of alpha_s = dec[s, 3];
//   recon[c] = Σ_s masks[s] · dec[s, c] (c < 3);  loss = Σ (recon − target)² / (B·P·3).
//   backward with dr = dloss · 2/(B·P·3) · (recon − target):
//   ddec[s, c] += dr[c] · masks[s];  ddec[s, 3] += masks[s] · (g_s − Σ_s' masks[s'] g_s'),
//   g_s = Σ_c dr[c] · dec[s, c].
// The loss is reduced deterministically in two passes: the forward's blocks sum their pixels'
// squared errors, then one block sums those block sums, each in a fixed order.
// FLOPs ≈ 14·K per pixel forward, ≈ 20·K backward. Compulsory bytes: 4 · (4·B·K·P + 3·B·P
// + B·K·P + 3·B·P) forward; 4 · (2·4·B·K·P + B·K·P + 6·B·P) backward.
// The backward ACCUMULATES (+=) into ddec, like the CPU reference.

// One thread per (b, px): masks [B,K,P] and recon [B,P,3] overwritten, and the block's sum of
// its pixels' squared errors into sse_part[blockIdx.x] (block_sum: a fixed order). Every thread
// reaches the block sum (those past the last pixel add 0).
extern "C" __global__ void composite_fwd_f32(int batch, int k, int p, const float* __restrict__ dec,
                                             const float* __restrict__ target, float* __restrict__ masks,
                                             float* __restrict__ recon, float* __restrict__ sse_part) {
    __shared__ float sh[32];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    float sse = 0.0f;
    if (i < batch * p) {
        const int b = i / p, px = i % p;
        float mx = __int_as_float(0xff800000);  // -inf
        for (int s = 0; s < k; ++s) mx = fmaxf(mx, dec[((b * k + s) * p + px) * 4 + 3]);
        float z = 0.0f;
        for (int s = 0; s < k; ++s) {
            const float e = expf(dec[((b * k + s) * p + px) * 4 + 3] - mx);
            masks[(b * k + s) * p + px] = e;
            z += e;
        }
        float r0 = 0.0f, r1 = 0.0f, r2 = 0.0f;
        for (int s = 0; s < k; ++s) {
            const int mi = (b * k + s) * p + px;
            const float m = masks[mi] / z;
            masks[mi] = m;
            const float* o = dec + mi * 4;
            r0 += m * o[0];
            r1 += m * o[1];
            r2 += m * o[2];
        }
        float* rc = recon + i * 3;
        const float* tg = target + i * 3;
        rc[0] = r0;
        rc[1] = r1;
        rc[2] = r2;
        const float e0 = r0 - tg[0], e1 = r1 - tg[1], e2 = r2 - tg[2];
        sse = e0 * e0 + e1 * e1 + e2 * e2;
    }
    sse = block_sum(sse, sh);
    if (threadIdx.x == 0) sse_part[blockIdx.x] = sse;
}

// One block of COMPOSITE_LOSS_THREADS: loss[0] = (Σ sse_part) / count over composite_fwd_f32's
// `parts` block sums, thread t summing parts t, t + blockDim, … in order, then block_sum: a
// fixed order (deterministic). (Version 1 summed every pixel's squared error here: one block
// reading 4 MB took 0.33 ms of the clevr6 step, latency-bound on one SM; H200, b2e47cd.)
#define COMPOSITE_LOSS_THREADS 1024
extern "C" __global__ void __launch_bounds__(COMPOSITE_LOSS_THREADS)
    composite_loss_f32(int parts, float count, const float* __restrict__ sse_part, float* __restrict__ loss) {
    __shared__ float sh[32];
    float acc = 0.0f;
    for (int i = threadIdx.x; i < parts; i += blockDim.x) acc += sse_part[i];
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) loss[0] = acc / count;
}

// One thread per (b, px); scale = dloss · 2/(B·P·3) (computed in f32 on the host, as on the CPU).
extern "C" __global__ void composite_bwd_f32(int batch, int k, int p, const float* __restrict__ dec,
                                             const float* __restrict__ target, const float* __restrict__ masks,
                                             const float* __restrict__ recon, float scale,
                                             float* __restrict__ ddec) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= batch * p) return;
    const int b = i / p, px = i % p;
    float dr[3];
    for (int c = 0; c < 3; ++c) dr[c] = scale * (recon[i * 3 + c] - target[i * 3 + c]);
    float dot = 0.0f;
    for (int s = 0; s < k; ++s) {
        const int mi = (b * k + s) * p + px;
        const float m = masks[mi];
        const float* o = dec + mi * 4;
        float* go = ddec + mi * 4;
        float g = 0.0f;
        for (int c = 0; c < 3; ++c) {
            go[c] += dr[c] * m;
            g += dr[c] * o[c];
        }
        dot += g * m;
    }
    for (int s = 0; s < k; ++s) {
        const int mi = (b * k + s) * p + px;
        const float* o = dec + mi * 4;
        float g = 0.0f;
        for (int c = 0; c < 3; ++c) g += dr[c] * o[c];
        ddec[mi * 4 + 3] += masks[mi] * (g - dot);
    }
}
