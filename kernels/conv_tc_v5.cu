// conv_tc_v5.cu: the entry points of version 5 (conv_tc_v5.cuh).
#include "conv_tc_v5.cuh"

// As conv_igemm_{direct,adjoint}_v3_tf32 (no split-K) for stride 1 and k = 3 or 5, with two more
// arguments, the output tile th × tw: `v5k3`, `v5k5`, 64 gathered channels (8 × 16 tiles);
// `v5n8`: at most 8 output channels; `v5c32`: 32 gathered channels and at most 32 output
// channels; `v5c32n8`: 32 gathered channels, at most 8 outputs; `v5s2`: stride 2, 64 channels,
// more than 32 outputs. Grid as conv_igemm_v5 says (z: the output phases of the adjoint gather
// with stride 2), block 256, dynamic shared memory as conv_igemm_v5 says.
#define V5_ENTRY(NAME, ADJ, K, NT, CS, S)                                                                    \
    extern "C" __global__ void __launch_bounds__(V3_THREADS, 2)                                            \
        NAME(ConvGemm p, int th, int tw, const float* __restrict__ src, const float* __restrict__ mask_y,   \
             int masked, const unsigned* __restrict__ wt, const float* __restrict__ bias, int relu,          \
             int accumulate, float* __restrict__ out) {                                                     \
        conv_igemm_v5<ADJ, K, NT, CS, S>(p, th, tw, src, mask_y, masked, wt, bias, relu, accumulate, out);  \
    }
V5_ENTRY(conv_igemm_direct_v5k3_tf32, false, 3, 64, 64, 1)
V5_ENTRY(conv_igemm_adjoint_v5k3_tf32, true, 3, 64, 64, 1)
V5_ENTRY(conv_igemm_direct_v5k5_tf32, false, 5, 64, 64, 1)
V5_ENTRY(conv_igemm_adjoint_v5k5_tf32, true, 5, 64, 64, 1)
V5_ENTRY(conv_igemm_direct_v5n8k3_tf32, false, 3, 8, 64, 1)
V5_ENTRY(conv_igemm_adjoint_v5n8k3_tf32, true, 3, 8, 64, 1)
V5_ENTRY(conv_igemm_direct_v5n8k5_tf32, false, 5, 8, 64, 1)
V5_ENTRY(conv_igemm_adjoint_v5n8k5_tf32, true, 5, 8, 64, 1)
V5_ENTRY(conv_igemm_direct_v5c32k3_tf32, false, 3, 32, 32, 1)
V5_ENTRY(conv_igemm_adjoint_v5c32k3_tf32, true, 3, 32, 32, 1)
V5_ENTRY(conv_igemm_direct_v5c32k5_tf32, false, 5, 32, 32, 1)
V5_ENTRY(conv_igemm_adjoint_v5c32k5_tf32, true, 5, 32, 32, 1)
V5_ENTRY(conv_igemm_direct_v5c32n8k3_tf32, false, 3, 8, 32, 1)
V5_ENTRY(conv_igemm_adjoint_v5c32n8k3_tf32, true, 3, 8, 32, 1)
V5_ENTRY(conv_igemm_direct_v5c32n8k5_tf32, false, 5, 8, 32, 1)
V5_ENTRY(conv_igemm_adjoint_v5c32n8k5_tf32, true, 5, 8, 32, 1)
V5_ENTRY(conv_igemm_adjoint_v5s2k3_tf32, true, 3, 64, 64, 2)
V5_ENTRY(conv_igemm_adjoint_v5s2k5_tf32, true, 5, 64, 64, 2)
V5_ENTRY(conv_igemm_direct_v5s2k3_tf32, false, 3, 64, 64, 2)
V5_ENTRY(conv_igemm_direct_v5s2k5_tf32, false, 5, 64, 64, 2)
