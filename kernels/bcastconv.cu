// bcastconv.cu: the decoder's broadcast input and first convolution, split by border classes
// (ops/bcastconv.rs). For a "same" k × k convolution (k = 2·pad + 1, stride 1) of an H × W grid
// (H, W ≥ k) whose input is z[s] at every pixel plus a position image shared by all slots:
//   y[s, p] = act(Zc[s, cls(p)] + P[p]),  Zc[s, c] = Wc[c] · z[s],  Wc[c] = Σ_{taps valid in c} W_tap
// with P = conv(pos) + b (one image, by the convolution kernels). Along an axis of n pixels the
// class of pixel y is y for y < pad, pad in the interior, and y − n + 2·pad + 1 for the last pad
// pixels; class c admits the taps lo(c)..hi(c): lo = pad − c for c < pad (else 0), hi = 3·pad − c
// for c > pad (else k − 1). k² classes in all (cls = cy·k + cx).
// Backward with g = dy through the ReLU: dZc[s, c] = Σ_{p in c} g[s, p]; dz[s] += Σ_c Wc[c]ᵀ dZc[s, c];
// dW_tap += Σ_{c admitting the tap} Σ_s dZc[s, c] ⊗ z[s]; and the position image's share through
// one single-image convolution backward of dP = Σ_s g[s].
// FLOPs at the tetrominoes shapes (S = 256 slots, 35², 64 → 32, k = 5): forward 2·S·k²·O·C =
// 26 MFLOP (was 32 GFLOP), the rest elementwise; bytes: y written once (40 MB), g read twice.

// The class of coordinate y on an axis of n, and the taps it admits.
static __device__ __forceinline__ int bc_class(int y, int n, int pad) {
    return y < pad ? y : (y >= n - pad ? y - n + 2 * pad + 1 : pad);
}
static __device__ __forceinline__ int bc_lo(int c, int pad) { return c < pad ? pad - c : 0; }
static __device__ __forceinline__ int bc_hi(int c, int pad) { return c > pad ? 3 * pad - c : 2 * pad; }
// The first pixel of class c and how many pixels it has.
static __device__ __forceinline__ int bc_first(int c, int n, int pad) {
    return c < pad ? c : (c == pad ? pad : n - 2 * pad - 1 + c);
}
static __device__ __forceinline__ int bc_count(int c, int n, int pad) { return c == pad ? n - 2 * pad : 1; }

// Wc[cls][o][c] = Σ_{ky, kx admitted} W[o][c][ky][kx]. One thread per element of Wc (k²·O·C).
extern "C" __global__ void bconv_weight_classes_f32(int n_out, int n_in, int k, int pad, const float* __restrict__ w,
                                                    float* __restrict__ wc) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= k * k * n_out * n_in) return;
    const int oc = e % (n_out * n_in), cls = e / (n_out * n_in);
    const int cy = cls / k, cx = cls % k;
    const float* wo = w + oc * k * k;  // W[o][c] (oc = o·C + c)
    float s = 0.0f;
    for (int ky = bc_lo(cy, pad); ky <= bc_hi(cy, pad); ++ky)
        for (int kx = bc_lo(cx, pad); kx <= bc_hi(cx, pad); ++kx) s += wo[ky * k + kx];
    wc[e] = s;
}

// Zc[s][cls][o] = Σ_c Wc[cls][o][c]·z[s][c], c in order. Block BC_SC_THREADS: warp j takes slot
// s0 + j, lanes along o; grid (⌈S / 8⌉, k², ⌈O / 32⌉). Wc's rows are staged through shared
// memory transposed ([c][o], padded), 64 channels at a time: read in place, a warp's lanes (32
// o) hit 32 rows of Wc 4·C bytes apart, one L1 wavefront per lane per load (~50 µs at the
// tetrominoes shapes, measured, for 13 MFLOP).
#define BC_SC_THREADS 256
#define BC_SC_SLOTS (BC_SC_THREADS / 32)
extern "C" __global__ void __launch_bounds__(BC_SC_THREADS)
    bconv_slot_classes_f32(int slots, int n_out, int n_in, int ncls, const float* __restrict__ wc,
                           const float* __restrict__ z, float* __restrict__ zc) {
    __shared__ float ws[64][33];
    __shared__ float zs[BC_SC_SLOTS][64];
    const int lane = threadIdx.x & 31, j = threadIdx.x >> 5;
    const int s0 = blockIdx.x * BC_SC_SLOTS, cls = blockIdx.y, o0 = blockIdx.z * 32;
    float acc = 0.0f;
    for (int c0 = 0; c0 < n_in; c0 += 64) {
        __syncthreads();  // the previous chunk's reads are done
        // (Consecutive threads read consecutive c of one row of Wc, and write down a column of
        // ws: rows of 33 words, so the column's 32 words are in 32 banks.)
        for (int e = threadIdx.x; e < 64 * 32; e += BC_SC_THREADS) {
            const int oo = e >> 6, cc = e & 63;
            const bool in = o0 + oo < n_out && c0 + cc < n_in;
            ws[cc][oo] = in ? wc[((size_t)cls * n_out + o0 + oo) * n_in + c0 + cc] : 0.0f;
        }
        for (int e = threadIdx.x; e < BC_SC_SLOTS * 64; e += BC_SC_THREADS) {
            const int jj = e >> 6, cc = e & 63;
            const bool in = s0 + jj < slots && c0 + cc < n_in;
            zs[jj][cc] = in ? z[(size_t)(s0 + jj) * n_in + c0 + cc] : 0.0f;
        }
        __syncthreads();
        const int cn = min(64, n_in - c0);
        for (int c = 0; c < cn; ++c) acc += ws[c][lane] * zs[j][c];
    }
    const int s = s0 + j, o = o0 + lane;
    if (s < slots && o < n_out) zc[((size_t)s * ncls + cls) * n_out + o] = acc;
}

// y[s][py][px][o] = act(Zc[s][cls(py, px)][o] + P[py][px][o]). One thread per 4 elements of y
// when O % 4 == 0 (16-byte loads and stores), else per element. 32-bit indices: the host checks
// that S·H·W·O fits (64-bit divisions made it instruction-bound: ~0.07 ms at the tetrominoes
// shapes, measured, for 40 MB written).
extern "C" __global__ void bconv_out_f32(int slots, int h, int w, int n_out, int k, int pad, int relu,
                                         const float* __restrict__ zc, const float* __restrict__ pimg,
                                         float* __restrict__ y) {
    const int vec = (n_out & 3) == 0 ? 4 : 1;
    const int e = (blockIdx.x * blockDim.x + threadIdx.x) * vec;
    if (e >= slots * h * w * n_out) return;
    const int o = e % n_out, pix = e / n_out;
    const int px = pix % w, py = (pix / w) % h, s = pix / (w * h);
    const int cls = bc_class(py, h, pad) * k + bc_class(px, w, pad);
    const float* zr = zc + (s * k * k + cls) * n_out + o;
    const float* pr = pimg + (py * w + px) * n_out + o;
    if (vec == 4) {
        const float4 a = ld_f4(zr), b = ld_f4(pr);
        float4 v = make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
        if (relu) {  // (as the scalar path: a NaN stays NaN)
            v.x = v.x < 0.0f ? 0.0f : v.x;
            v.y = v.y < 0.0f ? 0.0f : v.y;
            v.z = v.z < 0.0f ? 0.0f : v.z;
            v.w = v.w < 0.0f ? 0.0f : v.w;
        }
        *(float4*)(y + e) = v;
    } else {
        float v = *zr + *pr;
        if (relu && v < 0.0f) v = 0.0f;
        y[e] = v;
    }
}

// g = dy through the ReLU (y > 0) when relu.
static __device__ __forceinline__ float bc_grad(const float* y, const float* dy, long long i, int relu) {
    return (!relu || y[i] > 0.0f) ? dy[i] : 0.0f;
}

// dZc[s][cls][o] = Σ_{pixels of cls} g[s][p][o]. One block of BC_THREADS per slot, lanes along
// o (coalesced rows of g), warp w taking rows w, w + 32, ... of the slot's image, pad ≤ BC_MAXPAD.
// A border row is one class row: its warp writes that row's k sums itself. The interior rows
// share their k classes: each warp sums its own, and warp 0 adds the 32 partial rows in order.
// (One thread per class and channel instead left the interior class's 961 pixels to one
// thread each: latency-bound at ~0.1 ms for the tetrominoes shapes. With 8 warps per slot it
// still took 0.105 ms there, measured, for 80 MB read: 16 warps per SM kept too few loads in
// flight; 32 warps per block give an SM up to 64.)
#define BC_THREADS 1024
#define BC_MAXPAD 3
#define BC_MAXK (2 * BC_MAXPAD + 1)
extern "C" __global__ void __launch_bounds__(BC_THREADS)
bconv_bwd_classes_f32(int slots, int h, int w, int n_out, int k, int pad, int relu, const float* __restrict__ y,
                      const float* __restrict__ dy, float* __restrict__ dzc) {
    __shared__ float cls_sum[BC_MAXK * BC_MAXK][32];
    __shared__ float part[BC_THREADS / 32][BC_MAXK][32];
    const int s = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int o0 = 0; o0 < n_out; o0 += 32) {
        const int o = o0 + lane;
        const bool on = o < n_out;
        // This warp's sums over its interior rows: columns of class j, pad, pad + 1 + j.
        float int_left[BC_MAXPAD], int_right[BC_MAXPAD], int_center = 0.0f;
#pragma unroll
        for (int j = 0; j < BC_MAXPAD; ++j) int_left[j] = int_right[j] = 0.0f;
        for (int py = warp; py < h; py += BC_THREADS / 32) {
            // This lane's channel along the row (offsets in elements from the row's start).
            const long long base = (((long long)s * h + py) * w) * n_out + o;
            const float* yr = y + base;
            const float* dyr = dy + base;
            float left[BC_MAXPAD], right[BC_MAXPAD], center = 0.0f;
#pragma unroll
            for (int j = 0; j < BC_MAXPAD; ++j) {
                const bool col = on && j < pad;
                left[j] = col ? bc_grad(yr, dyr, j * n_out, relu) : 0.0f;
                right[j] = col ? bc_grad(yr, dyr, (w - pad + j) * n_out, relu) : 0.0f;
            }
            if (on) {
#pragma unroll 4
                for (int px = pad; px < w - pad; ++px) center += bc_grad(yr, dyr, px * n_out, relu);
            }
            const int cy = bc_class(py, h, pad);
            if (cy == pad) {
                int_center += center;
#pragma unroll
                for (int j = 0; j < BC_MAXPAD; ++j) {
                    int_left[j] += left[j];
                    int_right[j] += right[j];
                }
            } else {
                cls_sum[cy * k + pad][lane] = center;
#pragma unroll
                for (int j = 0; j < BC_MAXPAD; ++j) {
                    if (j < pad) {
                        cls_sum[cy * k + j][lane] = left[j];
                        cls_sum[cy * k + pad + 1 + j][lane] = right[j];
                    }
                }
            }
        }
        part[warp][pad][lane] = int_center;
#pragma unroll
        for (int j = 0; j < BC_MAXPAD; ++j) {
            if (j < pad) {
                part[warp][j][lane] = int_left[j];
                part[warp][pad + 1 + j][lane] = int_right[j];
            }
        }
        __syncthreads();
        if (warp == 0) {
            for (int cx = 0; cx < k; ++cx) {
                float t = 0.0f;
                for (int wi = 0; wi < BC_THREADS / 32; ++wi) t += part[wi][cx][lane];
                cls_sum[pad * k + cx][lane] = t;
            }
        }
        __syncthreads();
        for (int e = threadIdx.x; e < k * k * 32; e += BC_THREADS) {
            const int cls = e >> 5, l = e & 31;
            if (o0 + l < n_out) dzc[((long long)s * k * k + cls) * n_out + o0 + l] = cls_sum[cls][l];
        }
        __syncthreads();  // before the next channel chunk reuses the shared sums
    }
}

// The three long sums below (over the slots, or over the classes' channels) are column sums in
// rs_combine's form (common.cuh): RS_GROUPS threads per column, each summing every RS_GROUPS-th
// term in order, the groups then added in order (deterministic). One thread per column walking
// the whole reduction left 4–12 warps per SM with one dependent chain each: 27–41 µs at the
// tetrominoes shapes, measured, for a few MB.

// dP[p][o] = Σ_s g[s][p][o]: columns p·O + o, terms the slots. Block RS_THREADS, grid rs_grid(H·W·O).
extern "C" __global__ void __launch_bounds__(RS_THREADS)
    bconv_bwd_pos_f32(int slots, int hw, int n_out, int relu, const float* __restrict__ y,
                      const float* __restrict__ dy, float* __restrict__ dp) {
    __shared__ float sh[RS_GROUPS][RS_COLS];
    const int n = hw * n_out, e = rs_column();
    float acc = 0.0f;
    if (e < n) {
#pragma unroll 4
        for (int s = rs_group(); s < slots; s += RS_GROUPS) acc += bc_grad(y, dy, (long long)s * n + e, relu);
    }
    acc = rs_combine(acc, sh);
    if (rs_group() == 0 && e < n) dp[e] = acc;
}

// dz[s][c] += Σ_cls Σ_o Wc[cls][o][c]·dZc[s][cls][o]: per slot, columns c, terms j = cls·O + o.
// Block RS_THREADS, grid (⌈C / RS_COLS⌉, S).
extern "C" __global__ void __launch_bounds__(RS_THREADS)
    bconv_bwd_dz_f32(int slots, int n_out, int n_in, int ncls, const float* __restrict__ wc,
                     const float* __restrict__ dzc, float* __restrict__ dz) {
    __shared__ float sh[RS_GROUPS][RS_COLS];
    const int s = blockIdx.y, terms = ncls * n_out, c = rs_column();
    const float* g = dzc + (size_t)s * terms;
    float acc = 0.0f;
    if (c < n_in) {
#pragma unroll 4
        for (int j = rs_group(); j < terms; j += RS_GROUPS) acc += wc[(size_t)j * n_in + c] * g[j];
    }
    acc = rs_combine(acc, sh);
    if (rs_group() == 0 && c < n_in) dz[(size_t)s * n_in + c] += acc;
}

// dWc[cls][o][c] = Σ_s dZc[s][cls][o]·z[s][c]: columns (cls·O + o)·C + c, terms the slots. Block
// RS_THREADS, grid rs_grid(k²·O·C).
extern "C" __global__ void __launch_bounds__(RS_THREADS)
    bconv_bwd_dwc_f32(int slots, int n_out, int n_in, int ncls, const float* __restrict__ dzc,
                      const float* __restrict__ z, float* __restrict__ dwc) {
    __shared__ float sh[RS_GROUPS][RS_COLS];
    const int n = ncls * n_out * n_in, e = rs_column();
    const int c = e % n_in, co = e / n_in;  // co = cls·O + o
    float acc = 0.0f;
    if (e < n) {
#pragma unroll 4
        for (int s = rs_group(); s < slots; s += RS_GROUPS)
            acc += dzc[(size_t)s * ncls * n_out + co] * z[(size_t)s * n_in + c];
    }
    acc = rs_combine(acc, sh);
    if (rs_group() == 0 && e < n) dwc[e] = acc;
}

// dW[o][c][ky][kx] += Σ_{classes admitting (ky, kx)} dWc[cls][o][c], classes in order. One thread
// per weight.
extern "C" __global__ void bconv_bwd_dw_fold_f32(int n_out, int n_in, int k, int pad, const float* __restrict__ dwc,
                                                 float* __restrict__ dw) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n_out * n_in * k * k) return;
    const int kx = e % k, ky = (e / k) % k, oc = e / (k * k);
    float acc = 0.0f;
    for (int cy = 0; cy < k; ++cy) {
        if (ky < bc_lo(cy, pad) || ky > bc_hi(cy, pad)) continue;
        for (int cx = 0; cx < k; ++cx) {
            if (kx < bc_lo(cx, pad) || kx > bc_hi(cx, pad)) continue;
            acc += dwc[(cy * k + cx) * n_out * n_in + oc];
        }
    }
    dw[e] += acc;
}
