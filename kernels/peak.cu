// peak.cu: a tensor-core throughput probe for the kernel benchmark's "% of peak" column. Each
// warp runs `iters` rounds of 8 independent TF32 mma.m16n8k8 chains on registers (no memory
// traffic) and writes one sum per thread so that nothing is optimised away.
// FLOPs = blocks · (blockDim / 32) · iters · 8 · (2·16·8·8).
extern "C" __global__ void mma_peak_tf32(int iters, float* __restrict__ out) {
    const unsigned lane = threadIdx.x & 31;
    unsigned a[4], b[2];
    for (int i = 0; i < 4; ++i) a[i] = to_tf32(1.0f + 0.001f * (float)(lane + i));
    b[0] = to_tf32(0.5f);
    b[1] = to_tf32(0.25f);
    float acc[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[j][r] = 0.0f;
    for (int it = 0; it < iters; ++it)
#pragma unroll
        for (int j = 0; j < 8; ++j) mma_tf32_16x8x8(acc[j], a, b);
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) s += acc[j][r];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
