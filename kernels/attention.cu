// attention.cu: the slot-attention step, one block per (batch, head).
// Math per head (channels h·dh .. (h+1)·dh):
//   logit[n,s] = scale · Σ_j k[n,j] q[s,j];  p[n,·] = softmax over the K slots (saved [B,H,N,K]);
//   S[s] = Σ_n (p[n,s] + eps);  w[n,s] = (p[n,s] + eps) / S[s];  upd[s,j] = Σ_n w[n,s] v[n,j]
// Backward (mirrors src/ops/attention.rs): dw[n,s] = <dU[s], v[n]>, c[s] = Σ_n dw·w, dv += Σ_s w·dU,
//   da = (dw − c)/S, dl = scale · p · (da − Σ_s da·p), dk += Σ_s dl·q, dq += Σ_n dl·k.
// FLOPs: forward ≈ 4·B·N·K·D (+ softmax), backward ≈ 10·B·N·K·D. Compulsory bytes: forward
// 4 · (2·B·N·D + 2·B·K·D + B·H·N·K); backward 4 · (2·B·N·D read, 2·B·N·D rw, B·H·N·K, 3·B·K·D)
// plus a [B,H,N,K] scratch written and read twice.
// Backward ACCUMULATES (+=) into dk, dv, dq, like the CPU reference.

struct AttnDims {
    int batch, n, k, d, heads;
    float scale, eps;
};

// grid = batch·heads, block = 256 (a multiple of 32), dynamic shared memory = (k·dh + k) floats.
// attn [B,H,N,K] and upd [B,K,D] overwritten (each block writes its head's channels of upd).
extern "C" __global__ void attention_fwd_f32(AttnDims dm, const float* __restrict__ kk,
                                             const float* __restrict__ v, const float* __restrict__ q,
                                             float* __restrict__ attn, float* __restrict__ upd) {
    extern __shared__ float smem[];
    __shared__ float red[32];
    const int n = dm.n, k = dm.k, d = dm.d, heads = dm.heads;
    const int dh = d / heads;
    const int b = blockIdx.x / heads, h = blockIdx.x % heads;
    const int tid = threadIdx.x, bd = blockDim.x;
    float* qs = smem;            // [k][dh]
    float* colsum = smem + k * dh;  // [k]
    const float* kb = kk + b * n * d;
    const float* vb = v + b * n * d;
    const float* qb = q + b * k * d;
    float* p_h = attn + (b * heads + h) * n * k;
    for (int idx = tid; idx < k * dh; idx += bd) qs[idx] = qb[(idx / dh) * d + h * dh + idx % dh];
    __syncthreads();
    // 1. logits and the softmax over slots, one token per thread.
    for (int t = tid; t < n; t += bd) {
        const float* kt = kb + t * d + h * dh;
        float* row = p_h + t * k;
        float mx = __int_as_float(0xff800000);  // -inf
        for (int s = 0; s < k; ++s) {
            float l = 0.0f;
            for (int j = 0; j < dh; ++j) l += kt[j] * qs[s * dh + j];
            l = dm.scale * l;
            row[s] = l;
            mx = fmaxf(mx, l);
        }
        float z = 0.0f;
        for (int s = 0; s < k; ++s) {
            const float e = expf(row[s] - mx);
            row[s] = e;
            z += e;
        }
        for (int s = 0; s < k; ++s) row[s] = row[s] / z;
    }
    __syncthreads();
    // 2. column sums over the inputs.
    for (int s = 0; s < k; ++s) {
        float acc = 0.0f;
        for (int t = tid; t < n; t += bd) acc += p_h[t * k + s] + dm.eps;
        acc = block_sum(acc, red);
        if (tid == 0) colsum[s] = acc;
    }
    __syncthreads();
    // 3. weighted mean of the values, one output (s, j) per thread, summed in token order.
    for (int idx = tid; idx < k * dh; idx += bd) {
        const int s = idx / dh, j = idx % dh;
        const float cs = colsum[s];
        float acc = 0.0f;
        for (int t = 0; t < n; ++t) {
            const float w = (p_h[t * k + s] + dm.eps) / cs;
            acc += w * vb[t * d + h * dh + j];
        }
        upd[(b * k + s) * d + h * dh + j] = acc;
    }
}

// grid = batch·heads, block = 256, dynamic shared memory = 2·k floats. scratch: [B,H,N,K] floats
// (holds dw, then dl; fully written before it is read).
extern "C" __global__ void attention_bwd_f32(AttnDims dm, const float* __restrict__ kk,
                                             const float* __restrict__ v, const float* __restrict__ q,
                                             const float* __restrict__ attn, const float* __restrict__ dupd,
                                             float* __restrict__ scratch, float* __restrict__ dk,
                                             float* __restrict__ dv, float* __restrict__ dq) {
    extern __shared__ float smem[];
    __shared__ float red[32];
    const int n = dm.n, k = dm.k, d = dm.d, heads = dm.heads;
    const int dh = d / heads;
    const int b = blockIdx.x / heads, h = blockIdx.x % heads;
    const int tid = threadIdx.x, bd = blockDim.x;
    const float eps = dm.eps;
    float* colsum = smem;  // [k]
    float* cc = smem + k;  // [k]
    const float* kb = kk + b * n * d;
    const float* vb = v + b * n * d;
    const float* qb = q + b * k * d;
    const float* du = dupd + b * k * d;
    const float* p_h = attn + (b * heads + h) * n * k;
    float* dws = scratch + (b * heads + h) * n * k;
    float* dkb = dk + b * n * d;
    float* dvb = dv + b * n * d;
    float* dqb = dq + b * k * d;
    // A. column sums, recomputed from the saved softmax.
    for (int s = 0; s < k; ++s) {
        float acc = 0.0f;
        for (int t = tid; t < n; t += bd) acc += p_h[t * k + s] + eps;
        acc = block_sum(acc, red);
        if (tid == 0) colsum[s] = acc;
    }
    // B. dw[t, s] = <dU[s], v[t]> (one token per thread).
    for (int t = tid; t < n; t += bd) {
        const float* vt = vb + t * d + h * dh;
        for (int s = 0; s < k; ++s) {
            const float* dus = du + s * d + h * dh;
            float g = 0.0f;
            for (int j = 0; j < dh; ++j) g += dus[j] * vt[j];
            dws[t * k + s] = g;
        }
    }
    __syncthreads();
    // c[s] = Σ_t dw[t, s] · w[t, s].
    for (int s = 0; s < k; ++s) {
        const float cs = colsum[s];
        float acc = 0.0f;
        for (int t = tid; t < n; t += bd) {
            const float w = (p_h[t * k + s] + eps) / cs;
            acc += dws[t * k + s] * w;
        }
        acc = block_sum(acc, red);
        if (tid == 0) cc[s] = acc;
    }
    __syncthreads();
    // dv[t, j] += Σ_s w[t, s] · dU[s, j] (slot order, starting from the existing value).
    for (int idx = tid; idx < n * dh; idx += bd) {
        const int t = idx / dh, j = idx % dh;
        float* o = dvb + t * d + h * dh + j;
        float acc = *o;
        for (int s = 0; s < k; ++s) {
            const float w = (p_h[t * k + s] + eps) / colsum[s];
            acc += w * du[s * d + h * dh + j];
        }
        *o = acc;
    }
    // C. through the normalisation and the softmax: dl[t, s] replaces dw[t, s] (same thread).
    for (int t = tid; t < n; t += bd) {
        const float* prow = p_h + t * k;
        float* row = dws + t * k;
        float dot = 0.0f;
        for (int s = 0; s < k; ++s) dot += ((row[s] - cc[s]) / colsum[s]) * prow[s];
        for (int s = 0; s < k; ++s) {
            const float da = (row[s] - cc[s]) / colsum[s];
            row[s] = dm.scale * prow[s] * (da - dot);
        }
    }
    __syncthreads();
    // D. dk[t, j] += Σ_s dl[t, s] · q[s, j];  dq[s, j] += Σ_t dl[t, s] · k[t, j] (token order).
    for (int idx = tid; idx < n * dh; idx += bd) {
        const int t = idx / dh, j = idx % dh;
        float* o = dkb + t * d + h * dh + j;
        float acc = *o;
        for (int s = 0; s < k; ++s) acc += dws[t * k + s] * qb[s * d + h * dh + j];
        *o = acc;
    }
    for (int idx = tid; idx < k * dh; idx += bd) {
        const int s = idx / dh, j = idx % dh;
        float* o = dqb + s * d + h * dh + j;
        float acc = *o;
        for (int t = 0; t < n; ++t) acc += dws[t * k + s] * kb[t * d + h * dh + j];
        *o = acc;
    }
}
