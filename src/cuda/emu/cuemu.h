// CUDA C on the CPU, for slotfix's kernel emulator (tests only; see src/cuda/emu.rs).
//
// Every kernel file is compiled by the host C++ compiler with this header in front. Each CUDA
// thread of a block becomes a fiber; `__syncthreads` and every warp-wide operation (shuffles,
// `__syncwarp`, the tensor-core `mma` emulation) switch back to a scheduler that releases the
// fibers once all of them have arrived. `__shared__` variables are thread_local statics: the
// fibers of one block share an OS thread, and blocks running in parallel each have their own.
#pragma once
#define CUEMU 1
#include <math.h>
#include <stdint.h>
#include <string.h>

struct uint3 {
    unsigned x, y, z;
};
// The 16-byte vector types (4-byte aligned here; `ld_f4` / `ld_u4` in common.cuh check the
// 16-byte alignment the hardware requires).
struct float4 {
    float x, y, z, w;
};
struct uint4 {
    unsigned x, y, z, w;
};
struct float2 {  // 8 bytes (tc_epilogue_pair checks the 8-byte alignment the hardware requires)
    float x, y;
};
struct uint2 {  // 8 bytes (the hardware requires 8-byte alignment: tc_tile_mma's offsets are even)
    unsigned x, y;
};
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
static inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
extern "C" void cuemu_fault(const char* msg);
static inline void cuemu_check_align16(const void* p) {
    if ((uintptr_t)p & 15) cuemu_fault("misaligned address: a 16-byte load from an address not a multiple of 16");
}
static inline void cuemu_check_align8(const void* p) {
    if ((uintptr_t)p & 7) cuemu_fault("misaligned address: an 8-byte load from an address not a multiple of 8");
}
// prefetch_l2 (common.cuh) of f32 data: the word there must be one a kernel may read. The
// emulator's guard zones, and scratch nothing has written yet, hold the signalling NaN
// 0x7fa5a5a5 (Elem::poison in src/cuda/mod.rs), which arithmetic never produces; past the guard
// zones the checked build's AddressSanitizer sees the read.
static inline void cuemu_prefetch(const void* p) {
    uint32_t w;
    memcpy(&w, p, 4);
    if (w == 0x7fa5a5a5u) cuemu_fault("prefetch_l2 of a buffer's guard zone or of memory nothing wrote");
}

// A copy cp_async16 (common.cuh) has issued and cp_async_wait_all has not yet performed.
struct CuemuCpAsync {
    void* dst;
    const void* src;  // nullptr: 16 zero bytes
};
#define CUEMU_CP_ASYNC_MAX 32

struct CuemuThread {
    uint3 tid;
    int linear;  // threadIdx.x + blockDim.x · (threadIdx.y + blockDim.y · threadIdx.z)
    int cp_pending;  // copies in cp[] not yet waited for
    CuemuCpAsync cp[CUEMU_CP_ASYNC_MAX];
};

extern thread_local CuemuThread* cuemu_cur;
// Set per launch: TF32 conversions and tensor-core products keep full f32 operands, so that a
// tensor-core kernel can be compared with the f32 reference at f32 tolerances (its indexing
// checked apart from its rounding).
extern thread_local int cuemu_exact_tf32;
extern thread_local uint3 cuemu_block_idx, cuemu_block_dim, cuemu_grid_dim;

#define threadIdx (cuemu_cur->tid)
#define blockIdx cuemu_block_idx
#define blockDim cuemu_block_dim
#define gridDim cuemu_grid_dim
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static thread_local
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

// A warp-wide operation: each lane passes a payload; once every lane of the warp has arrived,
// the runtime calls fn(payloads, lanes) once, then resumes the lanes. fn == nullptr: a plain
// warp barrier.
typedef void (*CuemuWarpFn)(void** payloads, int lanes);
extern "C" void cuemu_warp_op(CuemuWarpFn fn, void* payload, unsigned mask);
extern "C" void cuemu_syncthreads();
// A warpgroup-wide operation: the same for the 128 threads of 4 consecutive warps (wgmma).
extern "C" void cuemu_warpgroup_op(CuemuWarpFn fn, void* payload);
extern "C" void* cuemu_dyn_smem();
// Called right after each static __shared__ declaration (the emulator's translation units add
// the call): the first thread of a block to reach it fills the variable with 0xff bytes (NaN
// as a float, a NaN bit pattern as a TF32 word), as the dynamic shared memory is, so that a read
// of shared memory this block never wrote shows, instead of the previous block's values.
extern "C" void cuemu_smem_fresh(void* p, unsigned long bytes);

// cp.async: the copy lands when the thread waits for it (cp_async_wait_all), not before, so that a
// read of the destination without the wait sees what was there before, as it may on the
// hardware; and a barrier with copies not yet waited for faults (this crate's kernels wait for
// their copies before the barrier that publishes them: one that did not would let other threads
// read shared memory the copies have not yet reached).
static inline void cuemu_cp_async16(void* dst, const void* src) {
    cuemu_check_align16(dst);
    if (src) cuemu_check_align16(src);
    if (cuemu_cur->cp_pending == CUEMU_CP_ASYNC_MAX) {
        cuemu_fault("more cp.async copies in flight than the emulator keeps");
        return;
    }
    cuemu_cur->cp[cuemu_cur->cp_pending++] = CuemuCpAsync{dst, src};
}
static inline void cuemu_cp_async_wait_all() {
    for (int i = 0; i < cuemu_cur->cp_pending; ++i) {
        const CuemuCpAsync& c = cuemu_cur->cp[i];
        if (c.src)
            memcpy(c.dst, c.src, 16);
        else
            memset(c.dst, 0, 16);
    }
    cuemu_cur->cp_pending = 0;
}
static inline void __syncthreads() {
    if (cuemu_cur->cp_pending) cuemu_fault("__syncthreads with cp.async copies not waited for");
    cuemu_syncthreads();
}
static inline void __syncwarp(unsigned mask = 0xffffffffu) { cuemu_warp_op(nullptr, nullptr, mask); }
static inline int cuemu_lane() { return cuemu_cur->linear & 31; }

struct CuemuShfl {
    uint64_t value;
    int src;  // lane to read from (absolute lane in the warp)
    uint64_t result;
};

// The emulator's own warp-wide operations that only move the lanes' payloads (copies of their
// registers, made by the lanes themselves in the kernels' checked code) go unchecked in a
// checked build: a sanitizer there would only slow every shuffle and mma several-fold.
#define CUEMU_UNCHECKED __attribute__((no_sanitize("address", "undefined")))

CUEMU_UNCHECKED static void cuemu_shfl_apply(void** p, int lanes) {
    for (int l = 0; l < lanes; ++l) {
        CuemuShfl* s = (CuemuShfl*)p[l];
        s->result = (s->src >= 0 && s->src < lanes) ? ((CuemuShfl*)p[s->src])->value : s->value;
    }
}

template <typename T>
static inline T cuemu_shfl(unsigned mask, T v, int src) {
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
    CuemuShfl s;
    s.value = 0;
    memcpy(&s.value, &v, sizeof(T));
    s.src = src;
    cuemu_warp_op(cuemu_shfl_apply, &s, mask);
    T r;
    memcpy(&r, &s.result, sizeof(T));
    return r;
}

template <typename T>
static inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    const int lane = cuemu_lane();
    return cuemu_shfl(mask, v, (lane & ~(width - 1)) + (src_lane & (width - 1)));
}
template <typename T>
static inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const int lane = cuemu_lane();
    const int src = ((lane & (width - 1)) + (int)delta < width) ? lane + (int)delta : lane;
    return cuemu_shfl(mask, v, src);
}
template <typename T>
static inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const int lane = cuemu_lane();
    const int src = ((lane & (width - 1)) >= (int)delta) ? lane - (int)delta : lane;
    return cuemu_shfl(mask, v, src);
}
template <typename T>
static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    const int lane = cuemu_lane();
    const int src = lane ^ lane_mask;
    return cuemu_shfl(mask, v, ((src & ~(width - 1)) == (lane & ~(width - 1))) ? src : lane);
}

// Arithmetic intrinsics. The emulator is compiled with -ffp-contract=off, so these round as the
// device's explicitly rounded versions do.
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline double __dsqrt_rn(double a) { return sqrt(a); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fdividef(float a, float b) { return a / b; }
#define __expf expf  // glibc declares its own __expf / __logf
#define __logf logf
static inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
static inline float __int_as_float(int a) { float r; memcpy(&r, &a, 4); return r; }
static inline float __uint_as_float(unsigned a) { float r; memcpy(&r, &a, 4); return r; }
static inline int __float_as_int(float a) { int r; memcpy(&r, &a, 4); return r; }
static inline unsigned __float_as_uint(float a) { unsigned r; memcpy(&r, &a, 4); return r; }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
template <typename T>
static inline T __ldg(const T* p) { return *p; }

// cvt.rn.tf32.f32 (sm_90): keep 10 mantissa bits, rounding to nearest with ties to even
// (sign-magnitude: add just under half a TF32 ulp, plus one when the kept part is odd, and
// truncate; a carry into the exponent is the correct rounding up). Inf and NaN pass.
static inline unsigned cuemu_to_tf32(float x) {
    unsigned u = __float_as_uint(x);
    if (cuemu_exact_tf32 || (u & 0x7f800000u) == 0x7f800000u) return u;
    return (u + 0xfffu + ((u >> 13) & 1u)) & 0xffffe000u;
}

struct CuemuMma {  // a lane's fragments, copied in and out by the lane (cuemu_mma_tf32_16x8x8)
    unsigned a[4], b[2];
    float d[4];
};

// The tensor core's m16n8k8 TF32 product for a whole warp, from the fragments as the PTX ISA lays
// them out (see mma_tf32_16x8x8 in common.cuh). The operands' low 13 bits are ignored, as on the
// hardware; products of TF32 values are exact in f32 and are summed in k order.
CUEMU_UNCHECKED static void cuemu_mma_apply(void** p, int lanes) {
    float A[16][8], B[8][8], D[16][8];
    // A partial warp leaves entries unset: NaN, so that the result shows it.
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 8; ++j) A[i][j] = B[i % 8][j] = D[i][j] = NAN;
    const unsigned keep = cuemu_exact_tf32 ? 0xffffffffu : 0xffffe000u;
#define v(u) __builtin_bit_cast(float, (unsigned)((u) & keep))
    for (int lane = 0; lane < lanes; ++lane) {
        const CuemuMma* m = (const CuemuMma*)p[lane];
        const int g = lane >> 2, t = lane & 3;
        A[g][t] = v(m->a[0]);
        A[g + 8][t] = v(m->a[1]);
        A[g][t + 4] = v(m->a[2]);
        A[g + 8][t + 4] = v(m->a[3]);
        B[t][g] = v(m->b[0]);
        B[t + 4][g] = v(m->b[1]);
        D[g][2 * t] = m->d[0];
        D[g][2 * t + 1] = m->d[1];
        D[g + 8][2 * t] = m->d[2];
        D[g + 8][2 * t + 1] = m->d[3];
    }
#undef v
    // Each D[i][j] adds its eight products in k order; the j loop innermost (eight independent
    // sums) lets the compiler vectorise it without changing any sum.
    for (int i = 0; i < 16; ++i)
        for (int k = 0; k < 8; ++k)
            for (int j = 0; j < 8; ++j) D[i][j] += A[i][k] * B[k][j];
    for (int lane = 0; lane < lanes; ++lane) {
        CuemuMma* m = (CuemuMma*)p[lane];
        const int g = lane >> 2, t = lane & 3;
        m->d[0] = D[g][2 * t];
        m->d[1] = D[g][2 * t + 1];
        m->d[2] = D[g + 8][2 * t];
        m->d[3] = D[g + 8][2 * t + 1];
    }
}

struct CuemuLdsm {
    const unsigned* row;  // the row this lane supplies (16 bytes)
    unsigned r[4];
};

// ldmatrix.sync.aligned.m8n8.x4.shared.b16 on 32-bit words (two b16 each), as the PTX ISA lays
// it out: lane 8·j + i supplies the address of row i of matrix j; lane L receives word L % 4 of
// row L / 4 of matrix j in register j. A partial warp is a fault (the instruction is .aligned).
static void cuemu_ldsm_apply(void** p, int lanes) {
    if (lanes != 32) cuemu_fault("ldmatrix by a partial warp");
    for (int l = 0; l < 32; ++l) {
        CuemuLdsm* s = (CuemuLdsm*)p[l];
        for (int j = 0; j < 4; ++j) s->r[j] = ((const CuemuLdsm*)p[8 * j + l / 4])->row[l % 4];
    }
}

static inline void cuemu_ldmatrix_x4(unsigned r[4], const unsigned* row) {
    cuemu_check_align16(row);
    CuemuLdsm s;
    s.row = row;
    cuemu_warp_op(cuemu_ldsm_apply, &s, 0xffffffffu);
    for (int j = 0; j < 4; ++j) r[j] = s.r[j];
}

static inline void cuemu_mma_tf32_16x8x8(float d[4], const unsigned a[4], const unsigned b[2]) {
    CuemuMma m{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {d[0], d[1], d[2], d[3]}};
    cuemu_warp_op(cuemu_mma_apply, &m, 0xffffffffu);
    for (int i = 0; i < 4; ++i) d[i] = m.d[i];
}

// wgmma.mma_async.sync.aligned.m64nNk8.f32.tf32.tf32 (sm_90a), as one thread issues it; the
// runtime gathers the warpgroup's 128 and runs the product when a wgmma.wait_group retires it
// (runtime.cpp: wgmma_execute has the fragment layouts). The descriptors' start addresses are
// offsets into the block's dynamic shared memory (wgmma_desc in wgmma.cuh).
struct CuemuWgmma {
    int n;          // N: a multiple of 8, 8..256
    int a_in_regs;  // A from a[] (the register form) or from adesc
    int scale_d;    // 0: D = A·B; 1: D += A·B
    int group;      // the issuing thread's warpgroup (set by cuemu_wgmma_issue)
    uint64_t adesc, bdesc;
    unsigned a[4];
    // The registers a[] was copied from: they must still hold it when the product runs (the
    // hardware may read them until then).
    const unsigned* a_src;
    float* d;  // the thread's n / 2 accumulators, read and written when the product runs
};
extern "C" void cuemu_wgmma_issue(CuemuWgmma* c);
extern "C" void cuemu_wgmma_fence();
extern "C" void cuemu_wgmma_commit();
extern "C" void cuemu_wgmma_wait(int pending);
extern "C" void cuemu_fence_proxy_async();
