// wgmma.cu: the warpgroup MMA (wgmma.cuh, sm_90a only) checked and measured on its own: a probe
// whose product the tests compare with the CPU (on the GPU it settles whether the emulator's
// reading of the PTX ISA's layouts is the hardware's; the backend also runs it once when it
// opens a 9.0 device, before any kernel relies on wgmma) and a throughput probe for the kernel
// benchmark's peaks. Both use the shape of the convolutions' wgmma pass (conv_wgmma.cu):
// m64n128k8, A in registers.
#include "wgmma.cuh"

#define WGMMA_PROBE_STEPS 4  // the most k8 steps

// The bytes a 128-row × k8 operand takes in the layout (lbo, sbo): its last element's end.
static __device__ __forceinline__ int wgmma_probe_span(int lbo, int sbo) { return 15 * sbo + 7 * 16 + lbo + 16; }

// d (64 × 128, row-major) = a · bᵀ for a (64 × 8·steps) and b (128 × 8·steps), row-major: one
// warpgroup, `steps` (at most 4) wgmma m64n128k8 steps. The operands are staged in shared
// memory, rounded to TF32, in the K-major layout (lbo, sbo) of wgmma.cuh, one k8 slice of b (and,
// with a_smem, of a) per step; each slice large enough for the descriptor's two offsets read
// either way round, so that a device reading them the other way round reads garbage, not past
// the block's shared memory. a_smem: A from shared memory (the descriptor form) instead of
// registers. swapped: the descriptors carry sbo in the leading field and lbo in the stride one
// (what the GPU test runs, when the documented reading fails, to say whether the hardware reads
// the two fields the other way round). The accumulators start as NaN: the first step's scale-d
// 0 must ignore them.
// Block 128; dynamic shared memory (1 + a_smem) · steps · max(wgmma_probe_span(lbo, sbo),
// wgmma_probe_span(sbo, lbo)) bytes.
extern "C" __global__ void __launch_bounds__(128)
    wgmma_probe_tf32(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ d, int steps,
                     int lbo, int sbo, int a_smem, int swapped) {
    extern __shared__ uint4 wgmma_smem[];
    unsigned* smem = (unsigned*)wgmma_smem;
    const int tid = threadIdx.x, w = tid / 32, g = tid % 32 / 4, q = tid % 4;
    const int kdim = 8 * steps;
    const int span = max(wgmma_probe_span(lbo, sbo), wgmma_probe_span(sbo, lbo)) / 4;  // words
    unsigned* bs = smem;                  // step s: bs + s·span
    unsigned* as = smem + steps * span;  // (a_smem) step s: as + s·span
    auto at = [&](int r, int k) {
        const int s = k / 8, kk = k % 8;
        return s * span + ((r % 8) * 16 + (r / 8) * sbo + (kk % 4) * 4 + (kk / 4) * lbo) / 4;
    };
    for (int e = tid; e < 128 * kdim; e += 128) {
        const int r = e / kdim, k = e % kdim;
        bs[at(r, k)] = to_tf32(b[e]);
        if (a_smem && r < 64) as[at(r, k)] = to_tf32(a[e]);
    }
    fence_proxy_async();
    __syncthreads();
    unsigned af[WGMMA_PROBE_STEPS][4];
#pragma unroll
    for (int s = 0; s < WGMMA_PROBE_STEPS; ++s) {
        const int r = 16 * w + g, k = 8 * min(s, steps - 1) + q;
        af[s][0] = to_tf32(a[r * kdim + k]);
        af[s][1] = to_tf32(a[(r + 8) * kdim + k]);
        af[s][2] = to_tf32(a[r * kdim + k + 4]);
        af[s][3] = to_tf32(a[(r + 8) * kdim + k + 4]);
    }
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = __int_as_float(0x7fc00000);
    const int l_field = swapped ? sbo : lbo, s_field = swapped ? lbo : sbo;
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < WGMMA_PROBE_STEPS; ++s) {
        if (s == steps) break;
        const WgmmaDesc bdesc = wgmma_desc(bs + s * span, l_field, s_field);
        if (a_smem)
            wgmma_m64n128k8_ss(acc, wgmma_desc(as + s * span, l_field, s_field), bdesc, s > 0);
        else
            wgmma_m64n128k8_rs(acc, af[s], bdesc, s > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        const int r = 16 * w + g, c = 8 * j + 2 * q;
        d[r * 128 + c] = acc[4 * j];
        d[r * 128 + c + 1] = acc[4 * j + 1];
        d[(r + 8) * 128 + c] = acc[4 * j + 2];
        d[(r + 8) * 128 + c + 1] = acc[4 * j + 3];
    }
}

// The TF32 throughput of wgmma m64n128k8 with A in registers and B from shared memory, for the
// kernel benchmark's peaks: each warpgroup runs `iters` rounds of 8 products into one
// accumulator tile, one group in flight while the next is issued, and each thread writes one
// sum. Block 256 (2 warpgroups); dynamic shared memory 4096 bytes.
// FLOPs = blocks · 2 · iters · 8 · (2·64·128·8).
extern "C" __global__ void __launch_bounds__(256) wgmma_peak_tf32(int iters, float* __restrict__ out) {
    extern __shared__ uint4 wgmma_smem[];
    unsigned* bs = (unsigned*)wgmma_smem;
    const int tid = threadIdx.x;
    for (int e = tid; e < 1024; e += 256) bs[e] = to_tf32(0.001f * (float)(e % 7));
    fence_proxy_async();
    __syncthreads();
    unsigned a[4];
    for (int i = 0; i < 4; ++i) a[i] = to_tf32(1.0f + 0.001f * (float)(tid % 32 + i));
    const WgmmaDesc bdesc = wgmma_desc(bs, 128, 256);
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    for (int it = 0; it < iters; ++it) {
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < 8; ++j) wgmma_m64n128k8_rs(acc, a, bdesc, 1);
        wgmma_commit();
        wgmma_wait<1>();
    }
    wgmma_wait<0>();
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 64; ++i) s += acc[i];
    out[blockIdx.x * blockDim.x + tid] = s;
}
