// Shared by every kernel file: slotfix prepends this to each file before NVRTC compiles it
// (NVRTC on a user's machine has no include paths), followed by a #line directive so that
// compiler messages give the file's own line numbers.

// The per-step scalars (double[STEP_VALS_LEN], `Cuda::step_vals`): the host writes them before
// a training step and the kernels whose work depends on the step read them here instead of
// taking them as arguments, so that one captured step (a CUDA graph) replays every later step.
#define STEP_VAL_STEP 0   // the training step (the RNG counter takes its low 32 bits)
#define STEP_VAL_LR 1     // the learning rate
#define STEP_VAL_DECAY 2  // 1 − lr · weight_decay (AdamW), rounded once on the host
#define STEP_VALS_LEN 4

static __device__ __forceinline__ unsigned int step_counter(const double* step_vals) {
    return (unsigned int)(unsigned long long)step_vals[STEP_VAL_STEP];
}

// The counter-based RNG (Philox4x32-10, as src/rng.rs): words of block (index, stream, step) under
// key seed. Used by elementwise.cu (normal fills, dropout) and slotcell.cu (the MLP's dropout).
#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

static __device__ __forceinline__ void philox4x32_10(unsigned int c[4], unsigned int k0, unsigned int k1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        const unsigned int hi0 = __umulhi(PHILOX_M0, c[0]), lo0 = PHILOX_M0 * c[0];
        const unsigned int hi1 = __umulhi(PHILOX_M1, c[2]), lo1 = PHILOX_M1 * c[2];
        const unsigned int n0 = hi1 ^ c[1] ^ k0;
        const unsigned int n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0;
        c[1] = lo1;
        c[2] = n2;
        c[3] = lo0;
    }
}

static __device__ __forceinline__ void philox_words(unsigned int seed_lo, unsigned int seed_hi, unsigned int stream,
                                                    unsigned int step, unsigned long long index, unsigned int w[4]) {
    w[0] = (unsigned int)index;
    w[1] = (unsigned int)(index >> 32);
    w[2] = stream;
    w[3] = step;
    philox4x32_10(w, seed_lo, seed_hi);
}

// Dropout's keep decision for element `index`: uniform(seed, stream, step, index) >= p, the
// uniform from the top 24 bits of the first word, rounded as src/rng.rs does.
static __device__ __forceinline__ bool dropout_keep(unsigned int seed_lo, unsigned int seed_hi, unsigned int stream,
                                                    unsigned int step, unsigned long long index, double p) {
    unsigned int w[4];
    philox_words(seed_lo, seed_hi, stream, step, index, w);
    return __dmul_rn((double)(w[0] >> 8), 1.0 / 16777216.0) >= p;
}

static __device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

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

// The second pass of a two-pass sum: column sums over rows of per-block partials. A thread that
// summed ~1000 rows of one column alone waited ~1000 load latencies in a chain (tens of µs for
// a few KB of data), so each column is split over RS_GROUPS threads: group g sums the rows
// z ≡ g (mod RS_GROUPS) in order, then rs_combine adds the groups' sums in group order. A fixed
// order (deterministic), RS_GROUPS times the loads in flight. Block: RS_THREADS threads for
// RS_COLS consecutive columns (coalesced rows); grid: ceil(columns / RS_COLS).
#define RS_COLS 32
#define RS_GROUPS 8
#define RS_THREADS 256
static_assert(RS_THREADS == RS_COLS * RS_GROUPS, "a block is RS_GROUPS groups of RS_COLS threads");

// This thread's column (blockIdx.x·RS_COLS + threadIdx.x mod RS_COLS) and group.
static __device__ __forceinline__ int rs_column() { return blockIdx.x * RS_COLS + threadIdx.x % RS_COLS; }
static __device__ __forceinline__ int rs_group() { return threadIdx.x / RS_COLS; }

// The sum of the groups' sums `s` of this thread's column, in group order; complete in the
// threads of group 0. Every thread of the block must call it.
static __device__ __forceinline__ float rs_combine(float s, float (*sh)[RS_COLS]) {
    const int w = threadIdx.x % RS_COLS, g = rs_group();
    sh[g][w] = s;
    __syncthreads();
    float t = 0.0f;
    if (g == 0)
#pragma unroll
        for (int q = 0; q < RS_GROUPS; ++q) t += sh[q][w];
    return t;
}

// Sum over the warp, complete in every lane.
static __device__ __forceinline__ float warp_allsum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The soft position embedding (posembed.cu, tokens.cu): grid(i, j) = [u, v, 1−u, 1−v] with
// u = i/(h−1), v = j/(w−1), computed in double and rounded to f32, as on the CPU.
// grid_q of pixel p = i·w + j of an h×w image.
static __device__ __forceinline__ float grid_val(int q, int p, int h, int w) {
    const int i = p / w, j = p % w;
    const double u = h > 1 ? (double)i / (double)(h - 1) : 0.0;
    const double v = w > 1 ? (double)j / (double)(w - 1) : 0.0;
    double g;
    switch (q) {
        case 0: g = u; break;
        case 1: g = v; break;
        case 2: g = 1.0 - u; break;
        default: g = 1.0 - v; break;
    }
    return (float)g;
}

static __device__ __forceinline__ float pos_val(int p, int ch, int h, int w, const float* wp, const float* bp) {
    float s = bp[ch];
    for (int q = 0; q < 4; ++q) s += wp[ch * 4 + q] * grid_val(q, p, h, w);
    return s;
}

// Column sums of the 256-thread blocks laid out lane ↔ column, warp ↔ row (coalesced reads of
// channels-last rows): the sum over the 8 warps of each lane's v, complete in warp 0. `sh` holds
// [8][33]; every thread must call it. The leading barrier makes back-to-back calls safe.
static __device__ __forceinline__ float column_sum_8warps(float v, float (*sh)[33]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    sh[warp][lane] = v;
    __syncthreads();
    float s = 0.0f;
    if (warp == 0)
        for (int k = 0; k < 8; ++k) s += sh[k][lane];
    return s;
}

// x rounded to TF32 (10-bit mantissa, round to nearest), as the bit pattern the tensor cores
// read. On sm_90 cvt.rn (ties to even) is one instruction (F2FP.TF32); sm_80 has only cvt.rna
// (ties away from zero), which ptxas expands to four. They differ only on exact ties. The
// emulator rounds as sm_90 does.
static __device__ __forceinline__ unsigned to_tf32(float x) {
#ifdef CUEMU
    return cuemu_to_tf32(x);
#elif __CUDA_ARCH__ >= 900
    unsigned r;
    asm("cvt.rn.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
#else
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
#endif
}

// 16-byte loads; `p` must be 16-byte aligned (the emulator checks it, the hardware faults).
static __device__ __forceinline__ float4 ld_f4(const float* p) {
#ifdef CUEMU
    cuemu_check_align16(p);
#endif
    return *(const float4*)p;
}
static __device__ __forceinline__ uint4 ld_u4(const unsigned* p) {
#ifdef CUEMU
    cuemu_check_align16(p);
#endif
    return *(const uint4*)p;
}
// An 8-byte load; `p` must be 8-byte aligned.
static __device__ __forceinline__ uint2 ld_u2(const unsigned* p) {
#ifdef CUEMU
    cuemu_check_align8(p);
#endif
    return *(const uint2*)p;
}

// Asks for the 128-byte line holding p to be brought into L2 (prefetch.global.L2) and waits for
// nothing: no register holds the data, so a block can have all of its input on the way at once.
// p must point at f32 data the kernel reads: the emulator checks the word there (a guard zone or
// unwritten memory fails the launch; its checked build's AddressSanitizer sees anything past).
static __device__ __forceinline__ void prefetch_l2(const float* p) {
#ifdef CUEMU
    cuemu_prefetch(p);
#else
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#endif
}

// A shared-memory address for ldsm_x4: the 32-bit shared-window address on the device (so that
// constant offsets fold into the instruction), the pointer itself in the emulator.
#ifdef CUEMU
typedef const unsigned* SmemAddr;
static __device__ __forceinline__ SmemAddr smem_addr(const unsigned* p) { return p; }
#else
typedef unsigned SmemAddr;
static __device__ __forceinline__ SmemAddr smem_addr(const unsigned* p) {
    unsigned addr;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(addr) : "l"(p));
    return addr;
}
#endif

// Copies 16 bytes of global memory at src to shared memory at dst (both 16-byte aligned) without
// passing them through registers (cp.async.cg, sm_80 and later), or writes 16 zero bytes there
// when !valid (src is then not read). The copy is visible to this thread after
// cp_async_wait_all, and to the block after a barrier that follows the wait.
static __device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#ifdef CUEMU
    cuemu_cp_async16(dst, valid ? src : nullptr);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr((const unsigned*)dst)),
                 "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
#endif
}
static __device__ __forceinline__ void cp_async_wait_all() {
#ifdef CUEMU
    cuemu_cp_async_wait_all();
#else
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

// ldmatrix.x4 on 32-bit words (ldmatrix.sync.aligned.m8n8.x4.shared.b16, each word two b16):
// lane 8·j + i supplies the address (base + `words` words) of row i of matrix j (4 words,
// 16-byte aligned, in shared memory); lane L receives word L % 4 of row L / 4 of matrix j in
// r[j]. For the A fragment of mma_tf32_16x8x8 below, matrices 0–3 are rows 0–7, 8–15, 0–7, 8–15
// by words 0–3, 0–3, 4–7, 4–7 of the 16 × 8 tile: one instruction instead of four loads. Every
// lane of the warp must call it together.
static __device__ __forceinline__ void ldsm_x4(unsigned r[4], SmemAddr base, int words) {
#ifdef CUEMU
    cuemu_ldmatrix_x4(r, base + words);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(base + 4 * words));
#endif
}

// Two consecutive 32-bit words of shared memory at base + `words` words (8-byte aligned): one
// 8-byte shared load whose address is an offset from a precomputed shared-window address (a
// pointer into a __shared__ array, rebuilt in every loop trip, cost the k-loops several
// instructions).
static __device__ __forceinline__ void lds_u2(unsigned r[2], SmemAddr base, int words) {
#ifdef CUEMU
    const unsigned* p = base + words;
    cuemu_check_align8(p);
    r[0] = p[0];
    r[1] = p[1];
#else
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(base + 4 * words));
#endif
}

// Four consecutive floats of shared memory at base + `words` words (16-byte aligned), as one
// explicit 16-byte load. NVRTC 13.0 sometimes added a redundant 8- or 4-byte load beside such a
// float4 read of the attention's staged rows, differently from one compile to the next (so the
// PTX, which the kernel cache keys and checks, was not reproducible); the instruction written
// out cannot be split. (As lds_u2: a barrier or __syncwarp between the stores and it.)
static __device__ __forceinline__ float4 lds_f4(SmemAddr base, int words) {
#ifdef CUEMU
    const unsigned* p = base + words;
    cuemu_check_align16(p);
    return *(const float4*)(const void*)p;
#else
    float4 r;
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(r.x), "=f"(r.y), "=f"(r.z), "=f"(r.w)
                 : "r"(base + 4 * words));
    return r;
#endif
}

// The same as four 32-bit words (tokens.cu's B fragments: a lane's two k-steps).
static __device__ __forceinline__ uint4 lds_u4(SmemAddr base, int words) {
#ifdef CUEMU
    const unsigned* p = base + words;
    cuemu_check_align16(p);
    return *(const uint4*)(const void*)p;
#else
    uint4 r;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "r"(base + 4 * words));
    return r;
#endif
}

// d += A·B for one warp's 16×8×8 TF32 tile with f32 accumulation (PTX mma.m16n8k8, A row-major,
// B column-major). With g = lane / 4 and t = lane % 4 the fragments are
//   a = {A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4]},  b = {B[t][g], B[t+4][g]},
//   d = {D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1]}.
// Every lane of the warp must call it together.
static __device__ __forceinline__ void mma_tf32_16x8x8(float d[4], const unsigned a[4], const unsigned b[2]) {
#ifdef CUEMU
    cuemu_mma_tf32_16x8x8(d, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
