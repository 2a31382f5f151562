// peak.cu: a tensor-core throughput probe for the kernel benchmark's "% of peak" column (and, at
// the end, an L2 read-bandwidth probe). Each warp runs `iters` rounds of 8 independent TF32
// mma.m16n8k8 chains on registers (no memory traffic) and writes one sum per thread so that
// nothing is optimised away.
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

// A float4 from global memory through L2 only (ld.global.cg: not kept in L1), 16-byte aligned.
static __device__ __forceinline__ float4 ld_cg_f4(const float4* p) {
#ifdef CUEMU
    cuemu_check_align16(p);
    return *p;
#else
    float4 v;
    asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "l"(p));
    return v;
#endif
}

// l2_read_peak_f32: the read bandwidth of the L2 cache, for the kernel benchmark's header (the
// weight-gradient and activation passes on wgmma read their operands from L2 at several TB/s;
// benches/NOTES.md). Thread e = blockIdx.x·blockDim.x + threadIdx.x reads `iters` float4s of
// buf (n4 of them, a power of two, few enough for L2 to hold) at (e + it·S) mod n4, S = the
// grid's threads, through L2 only, and writes ((Σx + Σy) + Σz) + Σw. A warp's reads are 512
// contiguous bytes; bytes read = 16 · threads · iters.
extern "C" __global__ void l2_read_peak_f32(int iters, const float4* __restrict__ buf, int n4,
                                            float* __restrict__ out) {
    const unsigned e = blockIdx.x * blockDim.x + threadIdx.x, stride = gridDim.x * blockDim.x;
    unsigned i = e & (unsigned)(n4 - 1);
    float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 8
    for (int it = 0; it < iters; ++it) {
        const float4 v = ld_cg_f4(buf + i);
        s.x += v.x;
        s.y += v.y;
        s.z += v.z;
        s.w += v.w;
        i = (i + stride) & (unsigned)(n4 - 1);
    }
    out[e] = ((s.x + s.y) + s.z) + s.w;
}
