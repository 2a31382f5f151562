// attention.cu: the slot-attention step. Version 1: one block per (batch, head); version 2: the
// tokens split over blocks, partial sums reduced in order; version 3: version 2 with the slot
// count compiled in (k ≤ 8); version 4: version 3 for k and v one tensor (one head), each block's
// rows copied to shared memory once. Each version's layout is described where it starts.
// Math per head (channels h·dh .. (h+1)·dh):
//   logit[n,s] = scale · Σ_j k[n,j] q[s,j];  p[n,·] = softmax over the K slots (saved [B,H,N,K]);
//   S[s] = Σ_n (p[n,s] + eps);  w[n,s] = (p[n,s] + eps) / S[s];  upd[s,j] = Σ_n w[n,s] v[n,j]
// Backward (mirrors src/ops/attention.rs): dw[n,s] = <dU[s], v[n]>, c[s] = Σ_n dw·w, dv += Σ_s w·dU,
//   da = (dw − c)/S, dl = scale · p · (da − Σ_s da·p), dk += Σ_s dl·q, dq += Σ_n dl·k.
// FLOPs: forward ≈ 4·B·N·K·D (+ softmax), backward ≈ 10·B·N·K·D. Compulsory bytes: forward
// 4 · (2·B·N·D + 2·B·K·D + B·H·N·K); backward 4 · (2·B·N·D read, 2·B·N·D rw, B·H·N·K, 3·B·K·D)
// plus a [B,H,N,K] scratch written and read twice.
// Backward ACCUMULATES (+=) into dk, dv, dq, like the CPU reference. dk and dv may be the same
// buffer (k and v the same tensor: model.rs, "The fold"), so they are not __restrict__, and every
// backward adds a row's v part, then its k part, from the same thread.

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
                                             float* __restrict__ scratch, float* dk, float* dv,
                                             float* __restrict__ dq) {
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

// ---------------------------------------------------------------------------------------------
// Version 2: the token dimension split over blocks. One block of ATT_T threads takes ATT_T
// consecutive tokens of one (batch, head), one token per thread; the sums over tokens (the
// column sums S, the weighted values, c and dq) are written as per-chunk partials and summed
// over the chunks in a fixed order by a second kernel (deterministic). With a[t,s] = p[t,s] + eps:
//   upd[s,j] = (Σ_t a[t,s] v[t,j]) / S[s],  S[s] = Σ_t a[t,s];
//   c[s] = (Σ_t dw[t,s] a[t,s]) / S[s]  (the same c as above, divided once instead of per term).
// Grids: (chunks = ceil(n / ATT_T), batch·heads). Every token's row of p stays in registers:
// k ≤ ATT_MAXK (the host falls back to version 1 beyond that).
// Bytes: forward reads k and v once and writes p once (v re-read K times from L1); backward
// reads v and p twice, k once, and read-modify-writes dk and dv once.

#define ATT_T 256
#define ATT_MAXK 16

// out[s] += x[j..j+3] · m[s·dh + j..j+3] for s < k, the four terms in order (att_row_dots and
// att_row_dots_staged share it, so that both sum the same way). KMAX: the slots unrolled
// (ATT_MAXK, guarded by s < k; version 3 passes k = KMAX, so that no guard is left). m: shared
// memory, read by lds_f4 (as a plain float4 read, NVRTC's PTX for version 3 varied between
// compiles).
template <int KMAX>
static __device__ __forceinline__ void att_dot4(float4 xv, SmemAddr m, int k, int dh, int j, float out[KMAX]) {
#pragma unroll
    for (int s = 0; s < KMAX; ++s) {
        if (s < k) {
            const float4 mv = lds_f4(m, s * dh + j);
            out[s] += xv.x * mv.x;
            out[s] += xv.y * mv.y;
            out[s] += xv.z * mv.z;
            out[s] += xv.w * mv.w;
        }
    }
}

// out[s] = Σ_j x[j] · m[s·dh + j] for s < k, j in order: this thread's row x (global memory) against
// k rows m (shared memory, the same for every thread: broadcast reads). x is read once, 16 bytes
// at a time when `vec4` (dh and the row offsets multiples of 4). Every loop over the slots runs to
// the constant ATT_MAXK, guarded by s < k, so that out[] stays in registers (a loop bound known
// only at run time would put it in local memory).
static __device__ __forceinline__ void att_row_dots(const float* __restrict__ x, const float* m, int k, int dh,
                                                    bool vec4, float out[ATT_MAXK]) {
#pragma unroll
    for (int s = 0; s < ATT_MAXK; ++s) out[s] = 0.0f;
    if (vec4) {
        const SmemAddr ma = smem_addr((const unsigned*)m);
        for (int j = 0; j < dh; j += 4) {
            const float4 xv = ld_f4(x + j);
            att_dot4<ATT_MAXK>(xv, ma, k, dh, j, out);
        }
    } else {
        for (int j = 0; j < dh; ++j) {
            const float xj = x[j];
#pragma unroll
            for (int s = 0; s < ATT_MAXK; ++s)
                if (s < k) out[s] += xj * m[s * dh + j];
        }
    }
}

// A chunk's weighted column sums: out[s·C + c] = Σ_{i < valid} a[i·k + s] · x(i, c) for s < k and
// c < C, with x(i, c) = x[i·ld + c] for c < ncols and 1 past them (C = ncols + 1 then adds Σ a).
// Each thread takes one column for every slot over a group of the tokens (G groups of W
// columns side by side): x is read once, in coalesced rows, with several loads in flight, and
// the groups' sums meet in `red` (shared, ATT_T·k floats; it may be `a` itself: every thread has
// finished reading a before red is written) and are added in group order (deterministic).
// Version 1 gave each (slot, column) its own thread, which read x once per slot, one dependent
// load at a time: 0.38 ms per forward launch at clevr6's shape on the H200, ~3× the kernel's
// memory floor. UNROLL: the loads in flight per thread (registers: see the kernels). Call with
// the whole block (it has barriers); a[] must be complete.
template <int UNROLL>
static __device__ void att_chunk_sums(const float* a, int k, int valid, const float* __restrict__ x, int ld,
                                      int ncols, int C, float* red, float* __restrict__ out) {
    const int tid = threadIdx.x;
    const int W = min(C, ATT_T), G = ATT_T / W, g = tid / W, cw = tid % W;
    for (int cb = 0; cb < C; cb += W) {  // one trip unless C > ATT_T (then G = 1)
        const int c = cb + cw;
        float acc[ATT_MAXK];
#pragma unroll
        for (int s = 0; s < ATT_MAXK; ++s) acc[s] = 0.0f;
        if (g < G && c < C) {
#pragma unroll UNROLL
            for (int i = g; i < valid; i += G) {
                const float xv = c < ncols ? x[(size_t)i * ld + c] : 1.0f;
#pragma unroll
                for (int s = 0; s < ATT_MAXK; ++s)
                    if (s < k) acc[s] += a[i * k + s] * xv;
            }
        }
        if (G == 1) {  // (uniform) nothing to combine
            if (c < C) {
#pragma unroll
                for (int s = 0; s < ATT_MAXK; ++s)
                    if (s < k) out[s * C + c] = acc[s];
            }
            continue;
        }
        // G > 1: C ≤ ATT_T, so this is the only trip; red holds [G][k][W] ≤ ATT_T·k floats.
        __syncthreads();  // every thread is done reading a[] (which red may overwrite)
        if (g < G) {
#pragma unroll
            for (int s = 0; s < ATT_MAXK; ++s)
                if (s < k) red[(g * k + s) * W + cw] = acc[s];
        }
        __syncthreads();
        for (int e = tid; e < k * C; e += ATT_T) {
            const int s = e / C, cc = e % C;
            float sum = 0.0f;
            for (int gg = 0; gg < G; ++gg) sum += red[(gg * k + s) * W + cc];
            out[e] = sum;
        }
    }
}

// att_row_dots for the 32 tokens of a warp, their rows read through shared memory: a slab of
// ATT_KSLAB floats of the 32 rows at a time, loaded in coalesced 32-byte row pieces (a load
// instruction covers 16 rows, one sector each), then each lane reads its own row's slab. The
// same sums in the same order as att_row_dots (vec4). The first version of the forward read each token's row directly
// (lanes 256 bytes apart: 32 sectors per load instruction), and Nsight Compute put it at 83 % of
// L1 throughput with DRAM at 28 % (clevr6, H200, 92b00a8). rows: this warp's valid rows; x0:
// row 0 (row r at x0 + r·ld); stage: the warp's [32][ATT_KLD] floats. The whole warp calls it.
// WHOLE_SLABS: dh is a multiple of ATT_KSLAB (no slab is cut short; version 3). The guard that
// leaves a short slab's second half out made NVRTC 13.0's PTX for version 3 with KMAX = 8 differ
// from one compile to the next (a redundant 8-byte shared load there in some compiles, not in
// others), which the kernel cache's test of identical PTX caught.
#define ATT_KSLAB 8  // (16 held twice the loads in flight, and spilled under the 64-register bound)
#define ATT_KLD 12   // 48-byte rows: 8 consecutive rows' 16-byte reads hit disjoint banks
template <int KMAX, bool WHOLE_SLABS = false>
static __device__ __forceinline__ void att_row_dots_staged(const float* __restrict__ x0, int rows, int ld,
                                                           const float* m, int k, int dh, float* stage,
                                                           float out[KMAX]) {
    const int lane = threadIdx.x & 31;
    const SmemAddr row = smem_addr((const unsigned*)(stage + lane * ATT_KLD));  // this lane's row
    const SmemAddr ma = smem_addr((const unsigned*)m);
#pragma unroll
    for (int s = 0; s < KMAX; ++s) out[s] = 0.0f;
    for (int j0 = 0; j0 < dh; j0 += ATT_KSLAB) {
#pragma unroll
        for (int i = 0; i < 32 * ATT_KSLAB / 4 / 32; ++i) {
            const int e = lane + 32 * i, r = e / (ATT_KSLAB / 4), q = e % (ATT_KSLAB / 4);
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (r < rows && (WHOLE_SLABS || j0 + 4 * q < dh)) v = ld_f4(x0 + (size_t)r * ld + j0 + 4 * q);
            *(float4*)&stage[r * ATT_KLD + 4 * q] = v;
        }
        __syncwarp();
#pragma unroll
        for (int q = 0; q < ATT_KSLAB / 4; ++q) {
            const int j = j0 + 4 * q;
            if (!WHOLE_SLABS && j >= dh) break;  // (the same for the whole warp)
            const float4 xv = lds_f4(row, 4 * q);
            att_dot4<KMAX>(xv, ma, k, dh, j, out);
        }
        __syncwarp();  // the slab is read before the next one overwrites it
    }
}

// Dynamic shared memory: k·dh (q) + ATT_T·k (a) + ATT_T·ATT_KLD (the warps' k-row stages)
// floats. partial [batch·heads][chunks][k][dh + 1]: per chunk, Σ a·v (dh values) then Σ a.
// (ATT_T, 2): 128 registers at most. (ATT_T, 4) held it to 64 without spills until the shared
// reads became explicit 16-byte loads (lds_f4); then it spilled 12 bytes on sm_90 within 64, and
// 20 on sm_80 within 80. (Version 3 takes the models' shapes.)
extern "C" __global__ void __launch_bounds__(ATT_T, 2)
attention_fwd_partial_f32(AttnDims dm, const float* __restrict__ kk, const float* __restrict__ v,
                          const float* __restrict__ q, float* __restrict__ attn,
                          float* __restrict__ partial) {
    extern __shared__ float smem[];
    const int n = dm.n, k = dm.k, d = dm.d, heads = dm.heads;
    const int dh = d / heads;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int chunk = blockIdx.x, chunks = gridDim.x;
    const int tid = threadIdx.x, t0 = chunk * ATT_T, t = t0 + tid;
    float* qs = smem;          // [k][dh]
    float* as = smem + k * dh;  // [ATT_T][k]
    float* stage = as + ATT_T * k + (tid >> 5) * 32 * ATT_KLD;  // this warp's [32][ATT_KLD]
    const bool vec4 = (d & 3) == 0 && (dh & 3) == 0;
    const float* qb = q + b * k * d;
    for (int idx = tid; idx < k * dh; idx += ATT_T) qs[idx] = qb[(idx / dh) * d + h * dh + idx % dh];
    __syncthreads();
    float p[ATT_MAXK];
    if (vec4) {  // (uniform) the warp's rows through shared memory
        const int w0 = t0 + (tid & ~31);
        att_row_dots_staged<ATT_MAXK>(kk + ((size_t)b * n + w0) * d + h * dh, min(32, n - w0), d, qs, k, dh,
                                      stage, p);
    } else if (t < n) {
        att_row_dots(kk + (b * n + t) * d + h * dh, qs, k, dh, vec4, p);
    }
    if (t < n) {
        float mx = __int_as_float(0xff800000);  // -inf
#pragma unroll
        for (int s = 0; s < ATT_MAXK; ++s) {
            if (s < k) {
                p[s] *= dm.scale;
                mx = fmaxf(mx, p[s]);
            }
        }
        float z = 0.0f;
#pragma unroll
        for (int s = 0; s < ATT_MAXK; ++s) {
            if (s < k) {
                p[s] = expf(p[s] - mx);
                z += p[s];
            }
        }
        float* row = attn + ((size_t)bh * n + t) * k;
        const float rz = 1.0f / z;
#pragma unroll
        for (int s = 0; s < ATT_MAXK; ++s) {
            if (s < k) {
                const float ps = p[s] * rz;
                row[s] = ps;
                as[tid * k + s] = ps + dm.eps;
            }
        }
    } else {
        for (int s = 0; s < k; ++s) as[tid * k + s] = 0.0f;
    }
    __syncthreads();
    // Σ a·v (dh columns) and Σ a (the column of ones) per slot; as[] becomes scratch.
    const int valid = min(ATT_T, n - t0);
    float* out = partial + ((size_t)bh * chunks + chunk) * k * (dh + 1);
    att_chunk_sums<4>(as, k, valid, v + (size_t)(b * n + t0) * d + h * dh, d, dh, dh + 1, as, out);
}

// Version 3 (`attention_*_v3k<KP>_f32`, fast path `attention_v3`), for k ≤ KP ∈ {4, 8} and head
// widths dh ∈ {8, 16, 32, 64} with d % 4 == 0: version 2's grids, blocks and partial-sum
// layouts, with the slot count a compile-time constant KP. Version 2 unrolls every slot loop to
// ATT_MAXK = 16 behind an `if (s < k)`, which ptxas compiles to a branch per slot: no shared
// load is hoisted past one, and its chunk sums read a[i·k + s] one scalar at a time. Measured
// (clevr6, H200, 9d1ac3f): the forward ~7300 instructions per warp of 32 tokens, the SM issuing
// ~70 % of its cycles, L1/TEX (which carries the shared-memory pipe) 79 % busy, 2.9× its memory
// floor; the backward 3.0×. Here q's (and dU's) rows past k and the per-token weights past k are
// zeros, so that every slot loop runs KP times with no guard. Sums over tokens go by butterflies
// within a warp, then in warp order through shared memory: a fixed order (deterministic), not
// version 2's, so the results agree with it to rounding.
#define ATT_WARPS (ATT_T / 32)

// x[s] summed over the 32 lanes of the warp for s < KP (a butterfly: every lane ends with the
// same sums). The whole warp calls it.
template <int KP>
static __device__ __forceinline__ void att3_warp_sums(float x[KP]) {
#pragma unroll
    for (int s = 0; s < KP; ++s) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) x[s] += __shfl_xor_sync(0xffffffffu, x[s], off);
    }
}

// The block's `valid` rows of a token tensor (row i's dh floats at x[i·ld]) asked into L2
// (prefetch_l2: nothing waits for them), so that the loads of a later phase wait on L2 rather
// than DRAM. The block's threads share the 128-byte lines (1 or 2 per row for dh ≤ 64).
static __device__ __forceinline__ void att3_prefetch_rows(const float* x, int ld, int dh, int valid) {
    const int lines = (dh + 31) / 32;
    for (int e = threadIdx.x; e < valid * lines; e += ATT_T) {
        const int i = e / lines;
        prefetch_l2(x + (size_t)i * ld + 32 * (e - i * lines));
    }
}

// m[s·dh + j] for s < KP (shared): rows s < k from src[s·ld + j] (global), zeros past k.
template <int KP>
static __device__ __forceinline__ void att3_stage_rows(float* m, const float* __restrict__ src, int ld, int k,
                                                       int dh) {
    for (int idx = threadIdx.x; idx < KP * dh; idx += ATT_T) {
        const int s = idx / dh;
        m[idx] = s < k ? src[s * ld + idx % dh] : 0.0f;
    }
}

// A chunk's weighted column sums: out[s·C + c] = Σ_{i < valid} a[i·KP + s] · x[i·ld + c] for
// s < k, c < dh, and, when sa is given (C = dh + 1), out[s·C + dh] = Σ_w sa[w·KP + s] (the
// warps' Σ a). Thread (g, qd) holds columns 4qd .. 4qd + 3 of every slot and walks the tokens
// i ≡ g (dh / 4 threads a row, ATT_T·4 / dh groups): per token one 16-byte load of x (a
// half-warp reads a 256-byte row whole at dh = 64) and KP / 4 of the weights, for 4·KP FMAs.
// The groups' sums meet by a butterfly in the warp, then in warp order through red
// ([ATT_WARPS][KP][dh] floats; it may overlap a once every thread is past the first barrier
// here). LOADS: the loads of x in flight. EPS: the weights are a[i·KP + s] + eps (the forward
// keeps the attention itself in a[], for its coalesced store). X_SHARED: x is in shared memory
// (version 4's rows; red may overlap them too). The whole block calls it (barriers); a[]
// complete.
template <int KP, int LOADS, bool EPS = false, bool X_SHARED = false>
static __device__ void att3_chunk_sums(const float* a, int valid, const float* __restrict__ x, int ld, int dh,
                                       int k, const float* sa, float* red, float* __restrict__ out,
                                       float eps = 0.0f) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int qw = dh >> 2, groups = ATT_T / qw, g = tid / qw, qd = tid % qw;
    float acc[KP][4];
#pragma unroll
    for (int s = 0; s < KP; ++s) acc[s][0] = acc[s][1] = acc[s][2] = acc[s][3] = 0.0f;
    const float* xc = x + 4 * qd;
    const SmemAddr xs = smem_addr((const unsigned*)xc);  // (used when X_SHARED)
#pragma unroll LOADS
    for (int i = g; i < valid; i += groups) {
        const float4 xv = X_SHARED ? lds_f4(xs, i * ld) : ld_f4(xc + (size_t)i * ld);
#pragma unroll
        for (int s4 = 0; s4 < KP; s4 += 4) {
            const float4 a4 = *(const float4*)&a[i * KP + s4];
            const float av[4] = {EPS ? a4.x + eps : a4.x, EPS ? a4.y + eps : a4.y, EPS ? a4.z + eps : a4.z,
                                 EPS ? a4.w + eps : a4.w};
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                acc[s4 + u][0] += av[u] * xv.x;
                acc[s4 + u][1] += av[u] * xv.y;
                acc[s4 + u][2] += av[u] * xv.z;
                acc[s4 + u][3] += av[u] * xv.w;
            }
        }
    }
#pragma unroll
    for (int s = 0; s < KP; ++s) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            for (int off = qw; off < 32; off <<= 1) acc[s][c] += __shfl_xor_sync(0xffffffffu, acc[s][c], off);
        }
    }
    __syncthreads();  // every thread is done reading a[] (and whatever else red overlaps)
    if (lane < qw) {
#pragma unroll
        for (int s = 0; s < KP; ++s)
            *(float4*)&red[(warp * KP + s) * dh + 4 * qd] = make_float4(acc[s][0], acc[s][1], acc[s][2], acc[s][3]);
    }
    __syncthreads();
    const int C = sa ? dh + 1 : dh;
    for (int e = tid; e < k * C; e += ATT_T) {
        const int s = e / C, c = e % C;
        float sum = 0.0f;
        if (c < dh) {
            for (int w = 0; w < ATT_WARPS; ++w) sum += red[(w * KP + s) * dh + c];
        } else {
            for (int w = 0; w < ATT_WARPS; ++w) sum += sa[w * KP + s];
        }
        out[e] = sum;
    }
}

// The forward's per-token softmax over the k real slots of this thread's logits p (scaled
// here; the padded slots get -inf, so exp gives them 0 and the sums add them last, as zeros: z
// is version 2's sum exactly). The attention goes to as[tid·KP ..] (zero past k and past n),
// each warp's Σ of the weights (attention + eps) to sa[warp·KP ..], then, after a barrier, the
// block's `valid` rows of the attention to attn's rows from `first` on (one contiguous run of
// valid·k floats, stored in order; the address formed only here, after the barrier, keeps
// version 3's forward within its 80 registers on sm_80). The whole block calls it.
template <int KP>
static __device__ __forceinline__ void att3_softmax_out(const AttnDims& dm, float p[KP], int t, int valid,
                                                        float* as, float* sa, float* __restrict__ attn,
                                                        size_t first) {
    const int k = dm.k, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    float mx = __int_as_float(0xff800000);  // -inf
#pragma unroll
    for (int s = 0; s < KP; ++s) {
        p[s] = s < k ? p[s] * dm.scale : __int_as_float(0xff800000);
        mx = fmaxf(mx, p[s]);
    }
    float z = 0.0f;
#pragma unroll
    for (int s = 0; s < KP; ++s) {
        p[s] = s < k ? expf(p[s] - mx) : 0.0f;
        z += p[s];
    }
    const float rz = 1.0f / z;
    float a[KP];
#pragma unroll
    for (int s = 0; s < KP; ++s) {
        const bool real = t < dm.n && s < k;
        p[s] = real ? p[s] * rz : 0.0f;      // the attention
        a[s] = real ? p[s] + dm.eps : 0.0f;  // the weights
    }
#pragma unroll
    for (int s4 = 0; s4 < KP; s4 += 4)
        *(float4*)&as[tid * KP + s4] = make_float4(p[s4], p[s4 + 1], p[s4 + 2], p[s4 + 3]);
    att3_warp_sums<KP>(a);
    if (lane == 0) {
#pragma unroll
        for (int s = 0; s < KP; ++s) sa[warp * KP + s] = a[s];
    }
    __syncthreads();
    float* rows = attn + first * k;
    for (int e = tid; e < valid * k; e += ATT_T) {
        const int i = e / k;
        rows[e] = as[i * KP + (e - i * k)];
    }
}

// The forward. Dynamic shared memory (floats): KP·dh (q) + ATT_WARPS·KP (Σ a per warp) +
// ATT_T·KP (the attention p·rz; the weights are p·rz + eps) + ATT_T·ATT_KLD (the k-row stages);
// the column sums' red reuses those two (KP ≤ 8, dh ≤ 64: at most 4096 of their 5120 floats).
// The attention leaves through shared memory: a thread's own row of k floats, stored directly,
// put 5.5 of each 32-byte sector's bytes to use (Nsight Compute, clevr6, `916cccd`: 6.0 M
// sectors written to L2 for 0.94 M of data, L2 the busiest unit at 65 %); the block's rows are
// one contiguous run of valid·k floats, stored here in order.
// The block's k and v rows are asked into L2 first (att3_prefetch_rows, 4 prefetches per
// thread at dh = 64): the loads below then wait on L2, not DRAM. Each warp had 2 loads of 16
// bytes per lane in flight per k slab (8 slabs in a row) and 2 per thread in the v sums, 24
// warps per SM at 80 registers: Nsight Compute (clevr6, H200, 916cccd) had DRAM 41 % busy and
// 46 % of the stall cycles waiting on global loads. Resident blocks ask at most 128 KiB each (~50 MB on 132 SMs
// when the kernel starts, less later: k is read at once, v after the softmax).
template <int KP>
static __device__ void attention_fwd_partial_v3(AttnDims dm, const float* __restrict__ kk,
                                                const float* __restrict__ v, const float* __restrict__ q,
                                                float* __restrict__ attn, float* __restrict__ partial) {
    extern __shared__ float smem[];
    const int n = dm.n, k = dm.k, d = dm.d, heads = dm.heads;
    const int dh = d / heads;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int chunk = blockIdx.x, chunks = gridDim.x;
    const int tid = threadIdx.x, warp = tid >> 5, t0 = chunk * ATT_T, t = t0 + tid;
    float* qs = smem;                 // [KP][dh], rows past k zero
    float* sa = qs + KP * dh;         // [ATT_WARPS][KP]: each warp's Σ a
    float* as = sa + ATT_WARPS * KP;  // [ATT_T][KP], zero past k and past n
    float* stage = as + ATT_T * KP + warp * 32 * ATT_KLD;  // this warp's [32][ATT_KLD]
    const int valid = min(ATT_T, n - t0);
    const size_t row0 = (size_t)(b * n + t0) * d + h * dh;
    att3_prefetch_rows(kk + row0, d, dh, valid);
    if (v != kk) att3_prefetch_rows(v + row0, d, dh, valid);  // (k = v = u under the fold)
    att3_stage_rows<KP>(qs, q + b * k * d + h * dh, d, k, dh);
    __syncthreads();
    float p[KP];
    const int w0 = t0 + (tid & ~31);
    att_row_dots_staged<KP, true>(kk + ((size_t)b * n + w0) * d + h * dh, min(32, n - w0), d, qs, KP, dh, stage, p);
    att3_softmax_out<KP>(dm, p, t, valid, as, sa, attn, (size_t)bh * n + t0);
    float* out = partial + ((size_t)bh * chunks + chunk) * k * (dh + 1);
    // (Four v loads in flight spilled 32 bytes at KP = 8 within 80 registers: two there.)
    att3_chunk_sums<KP, KP == 4 ? 4 : 2, true>(as, valid, v + row0, d, dh, k, sa, as, out, dm.eps);
}

// (ATT_T, 3): 80 registers for KP's accumulators and the loads in flight.
#define ATT_FWD_V3_ENTRY(NAME, KP)                                                                 \
    extern "C" __global__ void __launch_bounds__(ATT_T, 3)                                        \
        NAME(AttnDims dm, const float* __restrict__ kk, const float* __restrict__ v,              \
             const float* __restrict__ q, float* __restrict__ attn, float* __restrict__ partial) { \
        attention_fwd_partial_v3<KP>(dm, kk, v, q, attn, partial);                                \
    }
ATT_FWD_V3_ENTRY(attention_fwd_partial_v3k4_f32, 4)
ATT_FWD_V3_ENTRY(attention_fwd_partial_v3k8_f32, 8)

// ---------------------------------------------------------------------------------------------
// Version 4 of the forward, for k and v the same tensor x (u, under model.rs's fold) and one
// head, d a multiple of 8 up to 64, k ≤ KP: the block copies its rows of x to shared memory
// once (cp.async: all of a thread's 16-byte pieces in flight together, no registers held), and
// both the logits and the weighted sums read them there. x then leaves DRAM once per launch,
// and the loads wait once per block instead of once per 8-column slab. Version 3 read k in
// slabs of 8 columns (2 loads of 16 bytes in flight per lane) and v again in the sums: on the
// H200 (clevr6, 916cccd) DRAM was 41 % busy and 46 % of the stalls waited on global loads.
// Same outputs and layouts as version 3 (the attention, and partial for
// attention_fwd_reduce_f32), the same sums in the same order.
// Dynamic shared memory (floats): KP·d (q) + ATT_WARPS·KP (Σ a per warp) + ATT_T·KP (the
// attention) + ATT_T·(d + 4) (the rows: a stride ≡ 4 mod 8 words, so 8 lanes' 16-byte reads of
// 8 rows' same columns hit disjoint banks); the column sums' red reuses the rows.
// rows[r·(d + 4) + c] ← x0[r·d + c] for the block's `valid` rows (cp.async, 16 bytes a piece, all
// of a thread's pieces in flight together); visible to the block after cp_async_wait_all and a
// barrier.
static __device__ __forceinline__ void att4_copy_rows(float* rows, const float* __restrict__ x0, int valid, int d) {
    const int qw = d >> 2, ld = d + 4;
    for (int e = threadIdx.x; e < valid * qw; e += ATT_T) {
        const int r = e / qw, c = 4 * (e - r * qw);
        cp_async16(rows + r * ld + c, x0 + (size_t)r * d + c, true);
    }
}

// out[s] = Σ_j row[j]·m[s·d + j] for this thread's row of the staged rows (none past `valid`:
// out stays zero), m shared (KP rows, zeros past k), as att_row_dots_staged sums.
template <int KP>
static __device__ __forceinline__ void att4_row_dots(const float* rows, int valid, int d, const float* m,
                                                     float out[KP]) {
#pragma unroll
    for (int s = 0; s < KP; ++s) out[s] = 0.0f;
    if (threadIdx.x >= valid) return;  // (the rows past the end were not copied)
    const SmemAddr ra = smem_addr((const unsigned*)(rows + threadIdx.x * (d + 4)));
    const SmemAddr ma = smem_addr((const unsigned*)m);
    for (int j = 0; j < d; j += 4) att_dot4<KP>(lds_f4(ra, j), ma, KP, d, j, out);
}

template <int KP>
static __device__ void attention_fwd_partial_v4(AttnDims dm, const float* __restrict__ x,
                                                const float* __restrict__ q, float* __restrict__ attn,
                                                float* __restrict__ partial) {
    extern __shared__ __align__(16) float att4_smem[];
    float* const smem = att4_smem;
    const int n = dm.n, k = dm.k, d = dm.d, ld = d + 4;
    const int b = blockIdx.y;  // (one head)
    const int chunk = blockIdx.x, chunks = gridDim.x;
    const int tid = threadIdx.x, t0 = chunk * ATT_T, t = t0 + tid;
    float* qs = smem;                 // [KP][d], rows past k zero
    float* sa = qs + KP * d;          // [ATT_WARPS][KP]: each warp's Σ a
    float* as = sa + ATT_WARPS * KP;  // [ATT_T][KP], zero past k and past n
    float* rows = as + ATT_T * KP;    // [ATT_T][ld]: the block's valid rows of x
    const int valid = min(ATT_T, n - t0);
    att4_copy_rows(rows, x + (size_t)(b * n + t0) * d, valid, d);
    att3_stage_rows<KP>(qs, q + b * k * d, d, k, d);
    cp_async_wait_all();
    __syncthreads();
    float p[KP];
    att4_row_dots<KP>(rows, valid, d, qs, p);
    // As version 3: the softmax, the attention out, each warp's Σ a; then the weighted sums
    // of the rows in shared memory.
    att3_softmax_out<KP>(dm, p, t, valid, as, sa, attn, (size_t)b * n + t0);
    float* out = partial + ((size_t)b * chunks + chunk) * k * (d + 1);
    att3_chunk_sums<KP, 4, true, true>(as, valid, rows, ld, d, k, sa, rows, out, dm.eps);
}

// (ATT_T, 2): up to 128 registers; two blocks of 80 KiB (KP = 8, d = 64) fit an SM's shared
// memory.
#define ATT_FWD_V4_ENTRY(NAME, KP)                                                                \
    extern "C" __global__ void __launch_bounds__(ATT_T, 2)                                       \
        NAME(AttnDims dm, const float* __restrict__ x, const float* __restrict__ q,              \
             float* __restrict__ attn, float* __restrict__ partial) {                            \
        attention_fwd_partial_v4<KP>(dm, x, q, attn, partial);                                   \
    }
ATT_FWD_V4_ENTRY(attention_fwd_partial_v4k4_f32, 4)
ATT_FWD_V4_ENTRY(attention_fwd_partial_v4k8_f32, 8)

// upd[b, s, h·dh + j] = (Σ_c U_c[s][j]) / (Σ_c S_c[s]) for every (batch·head, s, j < dh): one
// column per output, the chunks split over rs_combine's groups (fixed order). A thread that
// summed its output's 64 chunks alone (clevr6) waited 64 load latencies in a chain: 29 µs per
// launch for 7.5 MB, in 112 blocks (H200, 9d1ac3f). Block RS_THREADS, grid ceil(outputs / RS_COLS).
extern "C" __global__ void __launch_bounds__(RS_THREADS)
    attention_fwd_reduce_f32(AttnDims dm, int chunks, const float* __restrict__ partial, float* __restrict__ upd) {
    __shared__ float sh_u[RS_GROUPS][RS_COLS], sh_s[RS_GROUPS][RS_COLS];
    const int k = dm.k, d = dm.d, heads = dm.heads, dh = d / heads;
    const int e = rs_column(), g = rs_group();
    const bool valid = e < dm.batch * heads * k * dh;
    const int j = e % dh, s = (e / dh) % k, bh = e / (dh * k);
    float u = 0.0f, cs = 0.0f;
    if (valid) {
        const size_t stride = (size_t)k * (dh + 1);
        const float* p = partial + (size_t)bh * chunks * stride + s * (dh + 1);
        for (int c = g; c < chunks; c += RS_GROUPS) {
            u += p[c * stride + j];
            cs += p[c * stride + dh];
        }
    }
    u = rs_combine(u, sh_u);
    cs = rs_combine(cs, sh_s);
    if (g == 0 && valid) upd[((bh / heads) * k + s) * d + (bh % heads) * dh + j] = u / cs;
}


// Backward pass 1. Dynamic shared memory: k·dh (dU) + 2·ATT_T·k floats.
// stats [batch·heads][chunks][k][2]: per chunk, Σ a and Σ dw·a.
extern "C" __global__ void __launch_bounds__(ATT_T)
attention_bwd_stats_f32(AttnDims dm, const float* __restrict__ v, const float* __restrict__ attn,
                        const float* __restrict__ dupd, float* __restrict__ stats) {
    extern __shared__ float smem[];
    const int n = dm.n, k = dm.k, d = dm.d, heads = dm.heads;
    const int dh = d / heads;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int chunk = blockIdx.x, chunks = gridDim.x;
    const int tid = threadIdx.x, t0 = chunk * ATT_T, t = t0 + tid;
    float* dus = smem;                  // [k][dh]
    float* as = smem + k * dh;           // [ATT_T][k]
    float* dws = as + ATT_T * k;         // [ATT_T][k]
    const float* du = dupd + b * k * d;
    for (int idx = tid; idx < k * dh; idx += ATT_T) dus[idx] = du[(idx / dh) * d + h * dh + idx % dh];
    __syncthreads();
    if (t < n) {
        float dw[ATT_MAXK];
        att_row_dots(v + (b * n + t) * d + h * dh, dus, k, dh, (d & 3) == 0 && (dh & 3) == 0, dw);
        const float* prow = attn + ((size_t)bh * n + t) * k;
#pragma unroll
        for (int s = 0; s < ATT_MAXK; ++s) {
            if (s < k) {
                as[tid * k + s] = prow[s] + dm.eps;
                dws[tid * k + s] = dw[s];
            }
        }
    } else {
        for (int s = 0; s < k; ++s) as[tid * k + s] = dws[tid * k + s] = 0.0f;
    }
    __syncthreads();
    const int valid = min(ATT_T, n - t0);
    float* out = stats + ((size_t)bh * chunks + chunk) * k * 2;
    for (int idx = tid; idx < 2 * k; idx += ATT_T) {
        const int s = idx / 2;
        float acc = 0.0f;
        if (idx % 2 == 0) {
            for (int i = 0; i < valid; ++i) acc += as[i * k + s];
        } else {
            for (int i = 0; i < valid; ++i) acc += dws[i * k + s] * as[i * k + s];
        }
        out[idx] = acc;
    }
}

// Backward pass 2: dv and dk (+=) for this block's tokens, and the chunk's partial of dq.
// Dynamic shared memory: 2·k·dh (dU, q) + 2·k (S, c) + 2·ATT_T·k (w, dl) floats.
// dq_partial [batch·heads][chunks][k][dh].
// (No __launch_bounds__: with (ATT_T) ptxas 13.0 settled on 48 registers and spilled a few
// bytes; without, 48 and no spill. Since att_chunk_sums took over the dq sums, 71 registers
// (three blocks per SM) without, and (ATT_T, 4) caps them at 64 but spills 8 bytes on sm_90.
// `nvrtc_kernel_resources_*` checks that nothing spills.)
extern "C" __global__ void attention_bwd_main_f32(AttnDims dm, const float* __restrict__ kk,
                                                  const float* __restrict__ v, const float* __restrict__ q,
                                                  const float* __restrict__ attn, const float* __restrict__ dupd,
                                                  const float* __restrict__ stats, float* dk, float* dv,
                                                  float* __restrict__ dq_partial) {
    extern __shared__ float smem[];
    const int n = dm.n, k = dm.k, d = dm.d, heads = dm.heads;
    const int dh = d / heads;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int chunk = blockIdx.x, chunks = gridDim.x;
    const int tid = threadIdx.x, t0 = chunk * ATT_T, t = t0 + tid;
    float* dus = smem;              // [k][dh]
    float* qs = dus + k * dh;        // [k][dh]
    float* rS = qs + k * dh;         // [k]: 1 / S (one division per slot, not per token)
    float* cc = rS + k;              // [k]
    float* ws = cc + k;              // [ATT_T][k]
    float* dls = ws + ATT_T * k;     // [ATT_T][k]
    const float* du = dupd + b * k * d;
    const float* qb = q + b * k * d;
    for (int idx = tid; idx < k * dh; idx += ATT_T) {
        const int off = (idx / dh) * d + h * dh + idx % dh;
        dus[idx] = du[off];
        qs[idx] = qb[off];
    }
    if (tid < k) {
        const float* st = stats + (size_t)bh * chunks * k * 2 + tid * 2;
        float sa = 0.0f, sc = 0.0f;
        for (int c = 0; c < chunks; ++c) {
            sa += st[(size_t)c * k * 2];
            sc += st[(size_t)c * k * 2 + 1];
        }
        rS[tid] = 1.0f / sa;
        cc[tid] = sc / sa;
    }
    __syncthreads();
    if (t < n) {
        float dw[ATT_MAXK];
        att_row_dots(v + (b * n + t) * d + h * dh, dus, k, dh, (d & 3) == 0 && (dh & 3) == 0, dw);
        const float* prow = attn + ((size_t)bh * n + t) * k;
        float dot = 0.0f;
#pragma unroll
        for (int s = 0; s < ATT_MAXK; ++s)
            if (s < k) dot += ((dw[s] - cc[s]) * rS[s]) * prow[s];
#pragma unroll
        for (int s = 0; s < ATT_MAXK; ++s) {
            if (s < k) {
                const float da = (dw[s] - cc[s]) * rS[s];
                ws[tid * k + s] = (prow[s] + dm.eps) * rS[s];
                dls[tid * k + s] = dm.scale * prow[s] * (da - dot);
            }
        }
    } else {
        for (int s = 0; s < k; ++s) ws[tid * k + s] = dls[tid * k + s] = 0.0f;
    }
    __syncthreads();
    const int valid = min(ATT_T, n - t0);
    // dv[t, j] += Σ_s w[t, s] dU[s, j];  dk[t, j] += Σ_s dl[t, s] q[s, j] (coalesced over j).
    for (int idx = tid; idx < valid * dh; idx += ATT_T) {
        const int i = idx / dh, j = idx % dh;
        const size_t o = (size_t)(b * n + t0 + i) * d + h * dh + j;
        float av = 0.0f, ak = 0.0f;
        for (int s = 0; s < k; ++s) {
            av += ws[i * k + s] * dus[s * dh + j];
            ak += dls[i * k + s] * qs[s * dh + j];
        }
        dv[o] += av;
        dk[o] += ak;
    }
    // This chunk's Σ_t dl[t, s] k[t, j]; ws[] (read above) becomes scratch.
    float* out = dq_partial + ((size_t)bh * chunks + chunk) * k * dh;
    att_chunk_sums<2>(dls, k, valid, kk + (size_t)(b * n + t0) * d + h * dh, d, dh, dh, ws, out);
}

// Backward pass 1's per-chunk sums, from this thread's dots dw[s] = <dU[s], v[t]> and its row of
// the attention (prow): a = p + eps and dw·a summed over the warp, then over the warps in order
// through sums ([ATT_WARPS][2][KP]) into out (the chunk's [k][2]: Σ a, Σ dw·a). The whole block
// calls it.
template <int KP>
static __device__ __forceinline__ void att3_stats_out(const AttnDims& dm, float dw[KP], int t,
                                                      const float* __restrict__ prow, float* sums,
                                                      float* __restrict__ out) {
    const int k = dm.k, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    float a[KP];
#pragma unroll
    for (int s = 0; s < KP; ++s) {
        a[s] = (t < dm.n && s < k) ? prow[s] + dm.eps : 0.0f;
        dw[s] *= a[s];
    }
    att3_warp_sums<KP>(a);
    att3_warp_sums<KP>(dw);
    if (lane == 0) {
#pragma unroll
        for (int s = 0; s < KP; ++s) {
            sums[(warp * 2) * KP + s] = a[s];
            sums[(warp * 2 + 1) * KP + s] = dw[s];
        }
    }
    __syncthreads();
    if (tid < 2 * k) {
        const int s = tid / 2, which = tid % 2;
        float acc = 0.0f;
        for (int w = 0; w < ATT_WARPS; ++w) acc += sums[(w * 2 + which) * KP + s];
        out[tid] = acc;
    }
}

// Backward pass 1, version 3. Dynamic shared memory (floats): KP·dh (dU) + ATT_T·ATT_KLD (the
// v-row stages) + ATT_WARPS·2·KP (each warp's Σ a and Σ dw·a). stats as version 2's.
template <int KP>
static __device__ void attention_bwd_stats_v3(AttnDims dm, const float* __restrict__ v,
                                              const float* __restrict__ attn, const float* __restrict__ dupd,
                                              float* __restrict__ stats) {
    extern __shared__ float smem[];
    const int n = dm.n, k = dm.k, d = dm.d, heads = dm.heads;
    const int dh = d / heads;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int chunk = blockIdx.x, chunks = gridDim.x;
    const int tid = threadIdx.x, warp = tid >> 5, t0 = chunk * ATT_T, t = t0 + tid;
    float* dus = smem;                                 // [KP][dh], rows past k zero
    float* stage = dus + KP * dh + warp * 32 * ATT_KLD;  // this warp's [32][ATT_KLD]
    float* sums = dus + KP * dh + ATT_T * ATT_KLD;     // [ATT_WARPS][2][KP]
    att3_prefetch_rows(v + (size_t)(b * n + t0) * d + h * dh, d, dh, min(ATT_T, n - t0));  // as the forward
    att3_stage_rows<KP>(dus, dupd + b * k * d + h * dh, d, k, dh);
    __syncthreads();
    float dw[KP];
    const int w0 = t0 + (tid & ~31);
    att_row_dots_staged<KP, true>(v + ((size_t)b * n + w0) * d + h * dh, min(32, n - w0), d, dus, KP, dh, stage, dw);
    att3_stats_out<KP>(dm, dw, t, attn + ((size_t)bh * n + t) * k, sums,
                       stats + ((size_t)bh * chunks + chunk) * k * 2);
}

// o[i][4qd .. 4qd + 3] += Σ_s w[i·KP + s] · m[s·dh + 4qd ..] for the tokens i ≡ g of the block's
// valid ones (s in order, as version 2): m's columns in registers, o read and written 16 bytes
// at a time (a half-warp a 256-byte row at dh = 64). Thread (g, qd) as att3_chunk_sums.
template <int KP>
static __device__ __forceinline__ void att3_rows_add(float* __restrict__ o, int ld, int valid, const float* w,
                                                     const float* m, int dh) {
    const int tid = threadIdx.x, qw = dh >> 2, groups = ATT_T / qw, g = tid / qw, qd = tid % qw;
    // (Shared reads as lds_f4: a plain float4 read here gave NVRTC 13.0 two PTX variants of
    // attention_bwd_main_v{3,4}k8_f32 over 16 compiles, one with a redundant 4-byte load.)
    const SmemAddr ms = smem_addr((const unsigned*)m), wsa = smem_addr((const unsigned*)w);
    float mc[KP][4];
#pragma unroll
    for (int s = 0; s < KP; ++s) {
        const float4 m4 = lds_f4(ms, s * dh + 4 * qd);
        mc[s][0] = m4.x;
        mc[s][1] = m4.y;
        mc[s][2] = m4.z;
        mc[s][3] = m4.w;
    }
    float* oc = o + 4 * qd;
#pragma unroll 2
    for (int i = g; i < valid; i += groups) {
        float4 acc = ld_f4(oc + (size_t)i * ld);
#pragma unroll
        for (int s4 = 0; s4 < KP; s4 += 4) {
            const float4 w4 = lds_f4(wsa, i * KP + s4);
            const float wv[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                acc.x += wv[u] * mc[s4 + u][0];
                acc.y += wv[u] * mc[s4 + u][1];
                acc.z += wv[u] * mc[s4 + u][2];
                acc.w += wv[u] * mc[s4 + u][3];
            }
        }
        *(float4*)(oc + (size_t)i * ld) = acc;
    }
}

// Pass 2's per-slot factors: 1 / S and c / S of slot `warp` (< KP) from the chunks' stats
// (st: this batch·head's [chunks][k][2]), rS and cc zero past k. Lane l sums the chunks ≡ l
// (mod 32) in order, then a butterfly (a fixed order; every block computes the same values). One
// thread per slot summing 64 chunks alone waited 64 load latencies in a chain before anything
// else. Visible to the block after a barrier.
template <int KP>
static __device__ __forceinline__ void att3_slot_norms(int k, int chunks, const float* __restrict__ st,
                                                       float* rS, float* cc) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (warp >= KP) return;
    float sa = 0.0f, sc = 0.0f;
    if (warp < k) {
        for (int ch = lane; ch < chunks; ch += 32) {
            sa += st[(size_t)ch * k * 2 + warp * 2];
            sc += st[(size_t)ch * k * 2 + warp * 2 + 1];
        }
    }
    sa = warp_allsum(sa);
    sc = warp_allsum(sc);
    if (lane == 0) {
        rS[warp] = warp < k ? 1.0f / sa : 0.0f;
        cc[warp] = warp < k ? sc / sa : 0.0f;
    }
}

// Pass 2's per-token weights of this thread's token t, from its dots dw[s] = <dU[s], v[t]> and its
// row of the attention (prow): w = (p + eps) / S (v's gradient) into ws[tid·KP ..] and
// dl = scale·p·(da − Σ da·p) (the logits' gradient) into dls[tid·KP ..], zero past k and past n;
// then a barrier. The whole block calls it.
template <int KP>
static __device__ __forceinline__ void att3_token_weights(const AttnDims& dm, const float dw[KP], int t,
                                                          const float* __restrict__ prow, const float* rS,
                                                          const float* cc, float* ws, float* dls) {
    const int k = dm.k, tid = threadIdx.x;
    float p[KP];
#pragma unroll
    for (int s = 0; s < KP; ++s) p[s] = (t < dm.n && s < k) ? prow[s] : 0.0f;
    float dot = 0.0f;
#pragma unroll
    for (int s = 0; s < KP; ++s) dot += ((dw[s] - cc[s]) * rS[s]) * p[s];
    float w[KP], dl[KP];
#pragma unroll
    for (int s = 0; s < KP; ++s) {
        const bool real = t < dm.n && s < k;
        const float da = (dw[s] - cc[s]) * rS[s];
        w[s] = real ? (p[s] + dm.eps) * rS[s] : 0.0f;
        dl[s] = real ? dm.scale * p[s] * (da - dot) : 0.0f;
    }
#pragma unroll
    for (int s4 = 0; s4 < KP; s4 += 4) {
        *(float4*)&ws[tid * KP + s4] = make_float4(w[s4], w[s4 + 1], w[s4 + 2], w[s4 + 3]);
        *(float4*)&dls[tid * KP + s4] = make_float4(dl[s4], dl[s4 + 1], dl[s4 + 2], dl[s4 + 3]);
    }
    __syncthreads();
}

// Backward pass 2, version 3: dv and dk (+=) for the block's tokens and the chunk's partial of
// dq, as version 2. Dynamic shared memory (floats): 2·KP·dh (dU, q) + 2·KP (1 / S, c) +
// 2·ATT_T·KP (w, dl) + ATT_T·ATT_KLD (the v-row stages); dq's red reuses w, dl and the stages.
// Its row phases wait on memory as the forward's did (2 loads in flight per thread in the v
// slabs, the dv and dk row updates and the k sums): the block's v rows are asked into L2 first,
// and its dv, dk and k rows once its warps are past their v rows (192 KiB a block; asked later
// to hold less of L2 at once).
template <int KP>
static __device__ void attention_bwd_main_v3(AttnDims dm, const float* __restrict__ kk, const float* __restrict__ v,
                                             const float* __restrict__ q, const float* __restrict__ attn,
                                             const float* __restrict__ dupd, const float* __restrict__ stats,
                                             float* dk, float* dv, float* __restrict__ dq_partial) {
    extern __shared__ float smem[];
    const int n = dm.n, k = dm.k, d = dm.d, heads = dm.heads;
    const int dh = d / heads;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int chunk = blockIdx.x, chunks = gridDim.x;
    const int tid = threadIdx.x, warp = tid >> 5, t0 = chunk * ATT_T, t = t0 + tid;
    float* dus = smem;            // [KP][dh], rows past k zero
    float* qs = dus + KP * dh;    // [KP][dh], rows past k zero
    float* rS = qs + KP * dh;     // [KP]: 1 / S, zero past k
    float* cc = rS + KP;          // [KP], zero past k
    float* ws = cc + KP;          // [ATT_T][KP], zero past k and past n
    float* dls = ws + ATT_T * KP;  // [ATT_T][KP], zero past k and past n
    float* stage = dls + ATT_T * KP + warp * 32 * ATT_KLD;  // this warp's [32][ATT_KLD]
    const int valid = min(ATT_T, n - t0);
    const size_t row0 = (size_t)(b * n + t0) * d + h * dh;
    att3_prefetch_rows(v + row0, d, dh, valid);  // as the forward; dv, dk and k after the v rows
    att3_stage_rows<KP>(dus, dupd + b * k * d + h * dh, d, k, dh);
    att3_stage_rows<KP>(qs, q + b * k * d + h * dh, d, k, dh);
    att3_slot_norms<KP>(k, chunks, stats + (size_t)bh * chunks * k * 2, rS, cc);
    __syncthreads();
    float dw[KP];
    const int w0 = t0 + (tid & ~31);
    att_row_dots_staged<KP, true>(v + ((size_t)b * n + w0) * d + h * dh, min(32, n - w0), d, dus, KP, dh, stage, dw);
    att3_prefetch_rows(dv + row0, d, dh, valid);
    if (dk != dv) att3_prefetch_rows(dk + row0, d, dh, valid);  // (one buffer under the fold,
    if (kk != v) att3_prefetch_rows(kk + row0, d, dh, valid);   // and k = v = u)
    att3_token_weights<KP>(dm, dw, t, attn + ((size_t)bh * n + t) * k, rS, cc, ws, dls);
    att3_rows_add<KP>(dv + row0, d, valid, ws, dus, dh);  // dv[t] += Σ_s w[t, s] dU[s]
    att3_rows_add<KP>(dk + row0, d, valid, dls, qs, dh);  // dk[t] += Σ_s dl[t, s] q[s]
    // This chunk's Σ_t dl[t, s] k[t, j]; red over w, dl and the stages.
    float* out = dq_partial + ((size_t)bh * chunks + chunk) * k * dh;
    att3_chunk_sums<KP, 2>(dls, valid, kk + row0, d, dh, k, nullptr, ws, out);
}

// MINB: blocks per SM. Three (80 registers) as the forward, but two (128) for k = 8, which
// spilled 16–36 bytes within 80. One kernel per macro: the emulator lists a macro's kernel under
// its first argument.
#define ATT_BWD_STATS_V3_ENTRY(NAME, KP, MINB)                                            \
    extern "C" __global__ void __launch_bounds__(ATT_T, MINB)                            \
        NAME(AttnDims dm, const float* __restrict__ v, const float* __restrict__ attn,   \
             const float* __restrict__ dupd, float* __restrict__ stats) {                \
        attention_bwd_stats_v3<KP>(dm, v, attn, dupd, stats);                            \
    }
#define ATT_BWD_MAIN_V3_ENTRY(NAME, KP, MINB)                                                                \
    extern "C" __global__ void __launch_bounds__(ATT_T, MINB)                                               \
        NAME(AttnDims dm, const float* __restrict__ kk, const float* __restrict__ v,                        \
             const float* __restrict__ q, const float* __restrict__ attn, const float* __restrict__ dupd,   \
             const float* __restrict__ stats, float* dk, float* dv, float* __restrict__ dq_partial) {      \
        attention_bwd_main_v3<KP>(dm, kk, v, q, attn, dupd, stats, dk, dv, dq_partial);                     \
    }
ATT_BWD_STATS_V3_ENTRY(attention_bwd_stats_v3k4_f32, 4, 3)
ATT_BWD_STATS_V3_ENTRY(attention_bwd_stats_v3k8_f32, 8, 2)
ATT_BWD_MAIN_V3_ENTRY(attention_bwd_main_v3k4_f32, 4, 3)
ATT_BWD_MAIN_V3_ENTRY(attention_bwd_main_v3k8_f32, 8, 2)

// Version 4 of the backward, for k and v the same tensor x (one head, d a multiple of 8 up to
// 64, k ≤ KP), as version 4 of the forward: each pass copies the block's rows of x to shared
// memory once (att4_copy_rows) and reads them there, for the dots with dU and, in the second
// pass, dq's sums. dx gets v's part and then k's (version 3's two row updates on the one buffer).
// Pass 1's dynamic shared memory (floats): KP·d (dU) + ATT_WARPS·2·KP (each warp's two sums) +
// ATT_T·(d + 4) (the rows); stats as version 3's.
template <int KP>
static __device__ void attention_bwd_stats_v4(AttnDims dm, const float* __restrict__ x,
                                              const float* __restrict__ attn, const float* __restrict__ dupd,
                                              float* __restrict__ stats) {
    extern __shared__ __align__(16) float att4_smem[];
    const int n = dm.n, k = dm.k, d = dm.d;
    const int b = blockIdx.y;  // (one head)
    const int chunk = blockIdx.x, chunks = gridDim.x;
    const int t0 = chunk * ATT_T, t = t0 + threadIdx.x;
    float* dus = att4_smem;                  // [KP][d], rows past k zero
    float* sums = dus + KP * d;              // [ATT_WARPS][2][KP]
    float* rows = sums + ATT_WARPS * 2 * KP;  // [ATT_T][d + 4]
    const int valid = min(ATT_T, n - t0);
    att4_copy_rows(rows, x + (size_t)(b * n + t0) * d, valid, d);
    att3_stage_rows<KP>(dus, dupd + b * k * d, d, k, d);
    cp_async_wait_all();
    __syncthreads();
    float dw[KP];
    att4_row_dots<KP>(rows, valid, d, dus, dw);
    att3_stats_out<KP>(dm, dw, t, attn + ((size_t)b * n + t) * k, sums,
                       stats + ((size_t)b * chunks + chunk) * k * 2);
}

// Pass 2, version 4. Dynamic shared memory (floats): 2·KP·d (dU, q) + 2·KP (1 / S, c) +
// 2·ATT_T·KP (w, dl) + ATT_T·(d + 4) (the rows); dq's red reuses w and dl (and the rows).
template <int KP>
static __device__ void attention_bwd_main_v4(AttnDims dm, const float* __restrict__ x, const float* __restrict__ q,
                                             const float* __restrict__ attn, const float* __restrict__ dupd,
                                             const float* __restrict__ stats, float* __restrict__ dx,
                                             float* __restrict__ dq_partial) {
    extern __shared__ __align__(16) float att4_smem[];
    const int n = dm.n, k = dm.k, d = dm.d;
    const int b = blockIdx.y;  // (one head)
    const int chunk = blockIdx.x, chunks = gridDim.x;
    const int t0 = chunk * ATT_T, t = t0 + threadIdx.x;
    float* dus = att4_smem;         // [KP][d], rows past k zero
    float* qs = dus + KP * d;       // [KP][d], rows past k zero
    float* rS = qs + KP * d;        // [KP]: 1 / S, zero past k
    float* cc = rS + KP;            // [KP], zero past k
    float* ws = cc + KP;            // [ATT_T][KP], zero past k and past n
    float* dls = ws + ATT_T * KP;   // [ATT_T][KP], zero past k and past n
    float* rows = dls + ATT_T * KP;  // [ATT_T][d + 4]
    const int valid = min(ATT_T, n - t0);
    const size_t row0 = (size_t)(b * n + t0) * d;
    att4_copy_rows(rows, x + row0, valid, d);
    att3_prefetch_rows(dx + row0, d, d, valid);  // (its read-modify-write comes last)
    att3_stage_rows<KP>(dus, dupd + b * k * d, d, k, d);
    att3_stage_rows<KP>(qs, q + b * k * d, d, k, d);
    att3_slot_norms<KP>(k, chunks, stats + (size_t)b * chunks * k * 2, rS, cc);
    cp_async_wait_all();
    __syncthreads();
    float dw[KP];
    att4_row_dots<KP>(rows, valid, d, dus, dw);
    att3_token_weights<KP>(dm, dw, t, attn + ((size_t)b * n + t) * k, rS, cc, ws, dls);
    att3_rows_add<KP>(dx + row0, d, valid, ws, dus, d);   // dx[t] += Σ_s w[t, s] dU[s]  (v's part)
    att3_rows_add<KP>(dx + row0, d, valid, dls, qs, d);   // dx[t] += Σ_s dl[t, s] q[s]  (k's part)
    // This chunk's Σ_t dl[t, s] x[t, j], from the rows; red over w and dl.
    float* out = dq_partial + ((size_t)b * chunks + chunk) * k * d;
    att3_chunk_sums<KP, 2, false, true>(dls, valid, rows, d + 4, d, k, nullptr, ws, out);
}

#define ATT_BWD_STATS_V4_ENTRY(NAME, KP)                                                  \
    extern "C" __global__ void __launch_bounds__(ATT_T, 2)                               \
        NAME(AttnDims dm, const float* __restrict__ x, const float* __restrict__ attn,   \
             const float* __restrict__ dupd, float* __restrict__ stats) {                \
        attention_bwd_stats_v4<KP>(dm, x, attn, dupd, stats);                            \
    }
#define ATT_BWD_MAIN_V4_ENTRY(NAME, KP)                                                                     \
    extern "C" __global__ void __launch_bounds__(ATT_T, 2)                                                 \
        NAME(AttnDims dm, const float* __restrict__ x, const float* __restrict__ q,                        \
             const float* __restrict__ attn, const float* __restrict__ dupd, const float* __restrict__ stats, \
             float* __restrict__ dx, float* __restrict__ dq_partial) {                                     \
        attention_bwd_main_v4<KP>(dm, x, q, attn, dupd, stats, dx, dq_partial);                            \
    }
ATT_BWD_STATS_V4_ENTRY(attention_bwd_stats_v4k4_f32, 4)
ATT_BWD_STATS_V4_ENTRY(attention_bwd_stats_v4k8_f32, 8)
ATT_BWD_MAIN_V4_ENTRY(attention_bwd_main_v4k4_f32, 4)
ATT_BWD_MAIN_V4_ENTRY(attention_bwd_main_v4k8_f32, 8)

// dq[b, s, h·dh + j] += Σ_c dq_partial for every (batch·head, s, j < dh), as
// attention_fwd_reduce_f32 (the chunks split over rs_combine's groups, in a fixed order).
extern "C" __global__ void __launch_bounds__(RS_THREADS)
    attention_bwd_dq_reduce_f32(AttnDims dm, int chunks, const float* __restrict__ dq_partial,
                                float* __restrict__ dq) {
    __shared__ float sh[RS_GROUPS][RS_COLS];
    const int k = dm.k, d = dm.d, heads = dm.heads, dh = d / heads;
    const int e = rs_column(), g = rs_group();
    const bool valid = e < dm.batch * heads * k * dh;
    const int j = e % dh, s = (e / dh) % k, bh = e / (dh * k);
    float acc = 0.0f;
    if (valid) {
        const size_t stride = (size_t)k * dh;
        const float* p = dq_partial + (size_t)bh * chunks * stride + s * dh + j;
        for (int c = g; c < chunks; c += RS_GROUPS) acc += p[c * stride];
    }
    acc = rs_combine(acc, sh);
    if (g == 0 && valid) dq[((bh / heads) * k + s) * d + (bh % heads) * dh + j] += acc;
}
