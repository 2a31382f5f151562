// conv_tc_v6.cu: the entry points of version 6 (conv_tc_v5.cuh's template with WIDE).
#include "conv_tc_v5.cuh"

// As conv_igemm_{direct,adjoint}_v5c32k{3,5}_tf32 (same arguments, grid and dynamic shared
// memory), with block 128: version 6. (sm_90: 95 registers, so five blocks per SM, which the
// 35 × 35 model's 7 × 18 tiles' 44 KiB of shared memory allow too: 20 warps, v5c32's 24.)
#define V6_ENTRY(NAME, ADJ, K)                                                                               \
    extern "C" __global__ void __launch_bounds__(V6_THREADS, 4)                                            \
        NAME(ConvGemm p, int th, int tw, const float* __restrict__ src, const float* __restrict__ mask_y,   \
             int masked, const unsigned* __restrict__ wt, const float* __restrict__ bias, int relu,          \
             int accumulate, float* __restrict__ out) {                                                     \
        conv_igemm_v5<ADJ, K, 32, 32, 1, true>(p, th, tw, src, mask_y, masked, wt, bias, relu, accumulate, out); \
    }
V6_ENTRY(conv_igemm_direct_v6c32k3_tf32, false, 3)
V6_ENTRY(conv_igemm_adjoint_v6c32k3_tf32, true, 3)
V6_ENTRY(conv_igemm_direct_v6c32k5_tf32, false, 5)
V6_ENTRY(conv_igemm_adjoint_v6c32k5_tf32, true, 5)

// As conv_igemm_{direct,adjoint}_v5k5_tf32 (same arguments, grid and dynamic shared memory),
// with block 128: version 6 for 64 gathered channels into more than 32 outputs, stride 1. 4
// warps of 4 tile rows (64 pixels) × 32 channels instead of 8 of 2 × 32: per k-step a warp
// loads 4 A fragments and 4 B pairs for 16 mma, 1.5 shared-memory wavefronts per mma against 2
// (Nsight Compute, `9d1ac3f`: `v5k5` at 74 % of the shared pipe's wavefronts, L1 89 % busy).
// Two blocks per SM, as version 5 (its shared memory allows two): 8 warps instead of 16, each
// with twice the independent mma. 5×5 only (the CLEVR model's 64-channel layers): each of these
// takes ptxas 10–20 s, and 3×3 would add four. Stride 2 (`v6s2k5`) measured 9–22 % slower than
// `v5s2k5` (clevr6, H200, 916cccd; Nsight Compute: 8 warps per SM against 16, SM throughput 30 %
// against 38 %) and was dropped.
#define V6_64_ENTRY(NAME, ADJ, K)                                                                            \
    extern "C" __global__ void __launch_bounds__(V6_THREADS, 2)                                            \
        NAME(ConvGemm p, int th, int tw, const float* __restrict__ src, const float* __restrict__ mask_y,   \
             int masked, const unsigned* __restrict__ wt, const float* __restrict__ bias, int relu,          \
             int accumulate, float* __restrict__ out) {                                                     \
        conv_igemm_v5<ADJ, K, 64, 64, 1, true>(p, th, tw, src, mask_y, masked, wt, bias, relu, accumulate, out); \
    }
V6_64_ENTRY(conv_igemm_direct_v6k5_tf32, false, 5)
V6_64_ENTRY(conv_igemm_adjoint_v6k5_tf32, true, 5)
