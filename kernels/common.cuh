// Shared by every kernel file: slotfix prepends this to each file before NVRTC compiles it
// (NVRTC on a user's machine has no include paths), followed by a #line directive so that
// compiler messages give the file's own line numbers.

// Sum over the 32 lanes of a warp; the result is complete in lane 0. Call with the whole warp.
template <typename T>
static __device__ __forceinline__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); the result is complete in
// thread 0. `sh` holds at least blockDim.x / 32 values; the leading barrier makes back-to-back
// calls with the same buffer safe. Every thread of the block must call it.
template <typename T>
static __device__ T block_sum(T v, T* sh) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    const int nw = blockDim.x >> 5;
    v = (threadIdx.x < nw) ? sh[threadIdx.x] : T(0);
    if (wid == 0) v = warp_sum(v);
    return v;
}
