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

// Zc[s][cls][o] = Σ_c Wc[cls][o][c]·z[s][c]. One thread per element (S·k²·O).
extern "C" __global__ void bconv_slot_classes_f32(int slots, int n_out, int n_in, int ncls, const float* __restrict__ wc,
                                                  const float* __restrict__ z, float* __restrict__ zc) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= slots * ncls * n_out) return;
    const int o = e % n_out, cls = (e / n_out) % ncls, s = e / (n_out * ncls);
    const float* wr = wc + (cls * n_out + o) * n_in;
    const float* zr = z + s * n_in;
    float acc = 0.0f;
    for (int c = 0; c < n_in; ++c) acc += wr[c] * zr[c];
    zc[e] = acc;
}

// y[s][py][px][o] = act(Zc[s][cls(py, px)][o] + P[py][px][o]). One thread per element of y.
extern "C" __global__ void bconv_out_f32(int slots, int h, int w, int n_out, int k, int pad, int relu,
                                         const float* __restrict__ zc, const float* __restrict__ pimg,
                                         float* __restrict__ y) {
    const long long total = (long long)slots * h * w * n_out;
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= total) return;
    const int o = (int)(e % n_out);
    const long long pix = e / n_out;
    const int px = (int)(pix % w), py = (int)((pix / w) % h), s = (int)(pix / ((long long)w * h));
    const int cls = bc_class(py, h, pad) * k + bc_class(px, w, pad);
    float v = zc[((long long)s * k * k + cls) * n_out + o] + pimg[((long long)py * w + px) * n_out + o];
    if (relu && v < 0.0f) v = 0.0f;
    y[e] = v;
}

// g = dy through the ReLU (y > 0) when relu.
static __device__ __forceinline__ float bc_grad(const float* y, const float* dy, long long i, int relu) {
    return (!relu || y[i] > 0.0f) ? dy[i] : 0.0f;
}

// dZc[s][cls][o] = Σ_{pixels of cls} g[s][p][o] (rows, then columns, in order). One thread per
// element (S·k²·O); a warp's threads take consecutive o (coalesced reads).
extern "C" __global__ void bconv_bwd_classes_f32(int slots, int h, int w, int n_out, int k, int pad, int relu,
                                                 const float* __restrict__ y, const float* __restrict__ dy,
                                                 float* __restrict__ dzc) {
    const int ncls = k * k;
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= slots * ncls * n_out) return;
    const int o = e % n_out, cls = (e / n_out) % ncls, s = e / (n_out * ncls);
    const int cy = cls / k, cx = cls % k;
    const int y0 = bc_first(cy, h, pad), ny = bc_count(cy, h, pad);
    const int x0 = bc_first(cx, w, pad), nx = bc_count(cx, w, pad);
    float acc = 0.0f;
    for (int py = y0; py < y0 + ny; ++py)
#pragma unroll 4
        for (int px = x0; px < x0 + nx; ++px)
            acc += bc_grad(y, dy, (((long long)s * h + py) * w + px) * n_out + o, relu);
    dzc[e] = acc;
}

// dP[p][o] = Σ_s g[s][p][o], slots in order. One thread per element (H·W·O).
extern "C" __global__ void bconv_bwd_pos_f32(int slots, int hw, int n_out, int relu, const float* __restrict__ y,
                                             const float* __restrict__ dy, float* __restrict__ dp) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= hw * n_out) return;
    float acc = 0.0f;
#pragma unroll 8
    for (int s = 0; s < slots; ++s) acc += bc_grad(y, dy, (long long)s * hw * n_out + e, relu);
    dp[e] = acc;
}

// dz[s][c] += Σ_cls Σ_o Wc[cls][o][c]·dZc[s][cls][o]. One thread per element of dz (S·C).
extern "C" __global__ void bconv_bwd_dz_f32(int slots, int n_out, int n_in, int ncls, const float* __restrict__ wc,
                                            const float* __restrict__ dzc, float* __restrict__ dz) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= slots * n_in) return;
    const int c = e % n_in, s = e / n_in;
    const float* g = dzc + (long long)s * ncls * n_out;
    float acc = 0.0f;
    for (int j = 0; j < ncls * n_out; ++j) acc += wc[j * n_in + c] * g[j];
    dz[e] += acc;
}

// dWc[cls][o][c] = Σ_s dZc[s][cls][o]·z[s][c], slots in order. One thread per element (k²·O·C).
extern "C" __global__ void bconv_bwd_dwc_f32(int slots, int n_out, int n_in, int ncls, const float* __restrict__ dzc,
                                             const float* __restrict__ z, float* __restrict__ dwc) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= ncls * n_out * n_in) return;
    const int c = e % n_in, co = e / n_in;  // co = cls·O + o
    float acc = 0.0f;
    for (int s = 0; s < slots; ++s) acc += dzc[(long long)s * ncls * n_out + co] * z[s * n_in + c];
    dwc[e] = acc;
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
