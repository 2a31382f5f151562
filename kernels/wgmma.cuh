// wgmma.cuh: Hopper's warpgroup MMA (wgmma.mma_async, sm_90a only) for TF32 with f32 accumulation:
// one instruction per warpgroup (4 consecutive warps, 128 threads) computes a 64 × N × 8 product
// with B (and optionally A) read by the tensor cores from shared memory through a descriptor,
// instead of mma.sync's 16 × 8 × 8 per warp with both operands passed through registers.
// Only files compiled for sm_90a include it (KernelFile::sm90a); the emulator runs it as the PTX
// ISA describes it (src/cuda/emu/runtime.cpp: wgmma_execute, deferred to the wait_group).
//
// Operand layout (shared memory, no swizzling): TF32 words, K-major, in core matrices of 8 rows ×
// 16 bytes (4 words), each contiguous; element (r, k) of a k8 step sits at byte
//   (r % 8)·16 + (r / 8)·SBO + (k % 4)·4 + (k / 4)·LBO
// from the descriptor's start: LBO ("leading dimension byte offset") between the two core
// matrices adjacent in K, SBO ("stride dimension byte offset") between those adjacent in M or N.
// Register fragments, thread t of the warpgroup, w = t / 32, g = t % 32 / 4, q = t % 4:
//   A (register form): a = {A[16w+g][q], A[16w+g+8][q], A[16w+g][q+4], A[16w+g+8][q+4]} (each
//     warp's 16 rows as mma_tf32_16x8x8's A fragment);
//   D: d[4j..4j+3] = D[16w+g][8j+2q], D[16w+g][8j+2q+1], D[16w+g+8][8j+2q], D[16w+g+8][8j+2q+1].
// Ordering: wgmma_fence() before the first wgmma of a batch (and after any other access to its
// accumulators or A registers); wgmma_commit() closes a group, wgmma_wait<N>() waits until at
// most N groups are in flight; until then neither the accumulators, the A registers nor the
// shared memory the group reads may be written (nor the accumulators read). Shared memory written by ordinary stores needs
// fence_proxy_async() by the writing threads before the barrier that publishes it to wgmma.
#if !defined(CUEMU) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "wgmma.cuh needs sm_90a: compile for compute_90a"
#endif

typedef unsigned long long WgmmaDesc;

// The descriptor of a K-major operand at p (dynamic shared memory, 16-byte aligned) with the
// layout's LBO and SBO (bytes, multiples of 16, below 256 KiB).
static __device__ __forceinline__ WgmmaDesc wgmma_desc(const unsigned* p, int lbo, int sbo) {
#ifdef CUEMU
    cuemu_check_align16(p);
    const long long off = (const char*)p - (const char*)cuemu_dyn_smem();
    if (off < 0 || off >= (1 << 18)) cuemu_fault("wgmma_desc of memory outside the dynamic shared memory");
    const unsigned addr = (unsigned)off;
#else
    const unsigned addr = smem_addr(p);
#endif
    return (WgmmaDesc)((addr & 0x3ffffu) >> 4) | ((WgmmaDesc)(((unsigned)lbo >> 4) & 0x3fffu) << 16) |
           ((WgmmaDesc)(((unsigned)sbo >> 4) & 0x3fffu) << 32);
}

static __device__ __forceinline__ void wgmma_fence() {
#ifdef CUEMU
    cuemu_wgmma_fence();
#else
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}

static __device__ __forceinline__ void wgmma_commit() {
#ifdef CUEMU
    cuemu_wgmma_commit();
#else
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#endif
}

template <int N>
static __device__ __forceinline__ void wgmma_wait() {
#ifdef CUEMU
    cuemu_wgmma_wait(N);
#else
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
#endif
}

// Makes this thread's ordinary (generic-proxy) shared-memory stores visible to wgmma's reads
// (the async proxy); a barrier after it publishes them to the warpgroup.
static __device__ __forceinline__ void fence_proxy_async() {
#ifdef CUEMU
    cuemu_fence_proxy_async();
#else
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

// The 64 accumulators of an m64n128k8 product, as asm operands %0..%63.
#define WGMMA_D64                                                                                         \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),        \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),          \
        "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),        \
        "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),        \
        "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),        \
        "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),        \
        "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),        \
        "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),        \
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define WGMMA_D64_LIST                                                                                    \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, "   \
    "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, "     \
    "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, "     \
    "%59, %60, %61, %62, %63}"

#ifdef CUEMU
// The emulator's form of every product below: this thread's part of an m64nNk8 wgmma, A from
// the registers a (whose source the emulator checks again when the product runs) or, without
// them, from shared memory through adesc.
static __device__ __forceinline__ void wgmma_emu_issue(int n, float* d, const unsigned* a, WgmmaDesc adesc,
                                                       WgmmaDesc bdesc, int scale_d) {
    CuemuWgmma c{};
    c.n = n;
    c.a_in_regs = a != nullptr;
    c.scale_d = scale_d;
    c.adesc = adesc;
    c.bdesc = bdesc;
    if (a) {
        for (int i = 0; i < 4; ++i) c.a[i] = a[i];
        c.a_src = a;
    }
    c.d = d;
    cuemu_wgmma_issue(&c);
}
#endif

// D(64 × 128) = A·B (scale_d 0) or D + A·B (scale_d 1), A (64 × 8) from the registers a, B (128
// rows (N) × 8, K-major) from shared memory through bdesc. Issued by the whole warpgroup.
static __device__ __forceinline__ void wgmma_m64n128k8_rs(float (&d)[64], const unsigned a[4], WgmmaDesc bdesc,
                                                          int scale_d) {
#ifdef CUEMU
    wgmma_emu_issue(128, d, a, 0, bdesc, scale_d);
#else
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 " WGMMA_D64_LIST
        ", {%64, %65, %66, %67}, %68, p, 1, 1;\n}\n"
        : WGMMA_D64
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(bdesc), "r"(scale_d));
#endif
}

// As wgmma_m64n128k8_rs with A (64 rows × 8, K-major) from shared memory through adesc.
static __device__ __forceinline__ void wgmma_m64n128k8_ss(float (&d)[64], WgmmaDesc adesc, WgmmaDesc bdesc,
                                                          int scale_d) {
#ifdef CUEMU
    wgmma_emu_issue(128, d, nullptr, adesc, bdesc, scale_d);
#else
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 " WGMMA_D64_LIST ", %64, %65, p, 1, 1;\n}\n"
        : WGMMA_D64
        : "l"(adesc), "l"(bdesc), "r"(scale_d));
#endif
}

// The 80 accumulators of an m64n160k8 product, as asm operands %0..%79.
#define WGMMA_D80 \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), \
        "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), \
        "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), \
        "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), \
        "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), \
        "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), \
        "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), \
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), \
        "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), \
        "+f"(d[78]), "+f"(d[79])
#define WGMMA_D80_LIST \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
    "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, " \
    "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, " \
    "%59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, " \
    "%78, %79}"

// D(64 × 160) = A·B (scale_d 0) or D + A·B (scale_d 1), A (64 × 8) from the registers a, B (160
// rows (N) × 8, K-major) from shared memory through bdesc: d[4j..4j+3] as for N = 128, j < 20.
static __device__ __forceinline__ void wgmma_m64n160k8_rs(float (&d)[80], const unsigned a[4], WgmmaDesc bdesc,
                                                          int scale_d) {
#ifdef CUEMU
    wgmma_emu_issue(160, d, a, 0, bdesc, scale_d);
#else
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %85, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n160k8.f32.tf32.tf32 " WGMMA_D80_LIST
        ", {%80, %81, %82, %83}, %84, p, 1, 1;\n}\n"
        : WGMMA_D80
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(bdesc), "r"(scale_d));
#endif
}
