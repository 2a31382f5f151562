// conv.cu: direct 2-D convolution and transposed convolution (version 1: one thread per output
// element, no tiling). Channels-last activations [B, H, W, C]; PyTorch weights.
//
// Math (stride s, padding p, kernel k; g = dy, zeroed where y <= 0 when the layer has a ReLU):
//   conv   y[n,oy,ox,co] = relu?(b[co] + Σ_{ci,ky,kx} W[co,ci,ky,kx] · x[n, oy·s−p+ky, ox·s−p+kx, ci])
//   convT  y[n,oy,ox,co] = relu?(b[co] + Σ_{ci,ky,kx : oy = iy·s−p+ky, ox = ix·s−p+kx} W[ci,co,ky,kx] · x[n,iy,ix,ci])
//   db[co] += Σ_{n,pos} g;  dW += Σ_{n,pos} g · x (one block per weight element, fixed-order tree
//   reduction, no atomics: deterministic);  dx += the adjoint gather (one thread per dx element).
// FLOPs per pass (forward, dx, dW alike): 2 · B · Ho·Wo · Co · Ci · k² (conv; for convT the same
// with Hi·Wi in place of Ho·Wo). Compulsory bytes: 4 · (|x| + |y| + |W|) forward,
// 4 · (|dy| + |y| + |dx| + |W|) for dx, 4 · (|dy| + |y| + |x| + |W|) for dW.
// Every backward kernel ACCUMULATES (+=) into its output, like the CPU reference.

struct ConvGeom {
    int h_in, w_in, c_in, h_out, w_out, c_out, k, stride, pad;
};

static __device__ __forceinline__ float masked_grad(const float* dy, const float* y, int i, int relu) {
    // The CPU's relu_mask: keep dy where y > 0.
    float g = dy[i];
    return (relu && !(y[i] > 0.0f)) ? 0.0f : g;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); the result is valid in thread 0.
// `sh` holds at least 32 floats.
// One thread per element of y [batch, h_out, w_out, c_out] (overwritten).
extern "C" __global__ void conv2d_fwd_f32(ConvGeom g, int batch, const float* __restrict__ x,
                                          const float* __restrict__ w, const float* __restrict__ b,
                                          int relu, float* __restrict__ y) {
    const int total = batch * g.h_out * g.w_out * g.c_out;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int co = i % g.c_out;
    int t = i / g.c_out;
    const int ox = t % g.w_out;
    t /= g.w_out;
    const int oy = t % g.h_out;
    const int n = t / g.h_out;
    const float* xn = x + n * (g.h_in * g.w_in * g.c_in);
    const float* wc = w + co * (g.c_in * g.k * g.k);
    float acc = 0.0f;
    for (int ky = 0; ky < g.k; ++ky) {
        const int iy = oy * g.stride - g.pad + ky;
        if (iy < 0 || iy >= g.h_in) continue;
        for (int kx = 0; kx < g.k; ++kx) {
            const int ix = ox * g.stride - g.pad + kx;
            if (ix < 0 || ix >= g.w_in) continue;
            const float* xp = xn + (iy * g.w_in + ix) * g.c_in;
            for (int ci = 0; ci < g.c_in; ++ci) acc += wc[(ci * g.k + ky) * g.k + kx] * xp[ci];
        }
    }
    acc += b[co];
    if (relu && acc < 0.0f) acc = 0.0f;
    y[i] = acc;
}

// dx [batch, h_in, w_in, c_in] += Σ_{co,ky,kx} W[co,ci,ky,kx] · g[n, oy, ox, co] with iy = oy·s−p+ky.
extern "C" __global__ void conv2d_bwd_dx_f32(ConvGeom g, int batch, const float* __restrict__ w,
                                             const float* __restrict__ y, const float* __restrict__ dy,
                                             int relu, float* __restrict__ dx) {
    const int total = batch * g.h_in * g.w_in * g.c_in;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int ci = i % g.c_in;
    int t = i / g.c_in;
    const int ix = t % g.w_in;
    t /= g.w_in;
    const int iy = t % g.h_in;
    const int n = t / g.h_in;
    float acc = 0.0f;
    for (int ky = 0; ky < g.k; ++ky) {
        const int ty = iy + g.pad - ky;
        if (ty < 0 || ty % g.stride != 0) continue;
        const int oy = ty / g.stride;
        if (oy >= g.h_out) continue;
        for (int kx = 0; kx < g.k; ++kx) {
            const int tx = ix + g.pad - kx;
            if (tx < 0 || tx % g.stride != 0) continue;
            const int ox = tx / g.stride;
            if (ox >= g.w_out) continue;
            const int base = ((n * g.h_out + oy) * g.w_out + ox) * g.c_out;
            for (int co = 0; co < g.c_out; ++co)
                acc += w[((co * g.c_in + ci) * g.k + ky) * g.k + kx] * masked_grad(dy, y, base + co, relu);
        }
    }
    dx[i] += acc;
}

// One block per weight element W[co, ci, ky, kx]: dW += Σ_{n,oy,ox} g[n,oy,ox,co] · x[n,iy,ix,ci].
extern "C" __global__ void conv2d_bwd_dw_f32(ConvGeom g, int batch, const float* __restrict__ x,
                                             const float* __restrict__ y, const float* __restrict__ dy,
                                             int relu, float* __restrict__ dw) {
    __shared__ float sh[32];
    const int widx = blockIdx.x;
    const int kx = widx % g.k;
    const int ky = (widx / g.k) % g.k;
    const int ci = (widx / (g.k * g.k)) % g.c_in;
    const int co = widx / (g.k * g.k * g.c_in);
    const int npos = g.h_out * g.w_out;
    const int m = batch * npos;
    float acc = 0.0f;
    for (int j = threadIdx.x; j < m; j += blockDim.x) {
        const int n = j / npos;
        const int pos = j % npos;
        const int oy = pos / g.w_out, ox = pos % g.w_out;
        const int iy = oy * g.stride - g.pad + ky;
        const int ix = ox * g.stride - g.pad + kx;
        if (iy < 0 || iy >= g.h_in || ix < 0 || ix >= g.w_in) continue;
        acc += masked_grad(dy, y, j * g.c_out + co, relu) *
               x[((n * g.h_in + iy) * g.w_in + ix) * g.c_in + ci];
    }
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) dw[widx] += acc;
}

// Bias gradient, first half: partial[blockIdx.x][col] = Σ over the rows [r0, r0 + chunk) of
// g[row, col], g = dy masked by y > 0 when relu (overwritten). Shared by conv, transposed conv
// and the linear layers (all outputs are [rows, n], channels last). Block 256 = 8 warps: lane ↔
// column of a 32-wide strip, warp ↔ every 8th row, so a warp reads one row's strip contiguously
// (v1 ran one block per column with a stride of n between threads: 32 sectors per warp load,
// and only n blocks). sum_partials_f32 (linear.cu) adds the partials in block order into db.
extern "C" __global__ void col_sum_partial_f32(int m, int n, int chunk, const float* __restrict__ y,
                                               const float* __restrict__ dy, int relu,
                                               float* __restrict__ partial) {
    __shared__ float sh[8][33];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r0 = blockIdx.x * chunk, r1 = min(r0 + chunk, m);
    for (int c0 = 0; c0 < n; c0 += 32) {
        const int col = c0 + lane;
        float acc = 0.0f;
        if (col < n)
            for (int r = r0 + warp; r < r1; r += 8) acc += masked_grad(dy, y, r * n + col, relu);
        const float s = column_sum_8warps(acc, sh);
        if (warp == 0 && col < n) partial[blockIdx.x * n + col] = s;
    }
}

// Transposed conv, one thread per element of y [batch, h_out, w_out, c_out] (overwritten):
// gathers the inputs whose scatter footprint covers (oy, ox).
extern "C" __global__ void conv_t2d_fwd_f32(ConvGeom g, int batch, const float* __restrict__ x,
                                            const float* __restrict__ w, const float* __restrict__ b,
                                            int relu, float* __restrict__ y) {
    const int total = batch * g.h_out * g.w_out * g.c_out;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int co = i % g.c_out;
    int t = i / g.c_out;
    const int ox = t % g.w_out;
    t /= g.w_out;
    const int oy = t % g.h_out;
    const int n = t / g.h_out;
    const float* xn = x + n * (g.h_in * g.w_in * g.c_in);
    float acc = 0.0f;
    for (int ky = 0; ky < g.k; ++ky) {
        const int ty = oy + g.pad - ky;
        if (ty < 0 || ty % g.stride != 0) continue;
        const int iy = ty / g.stride;
        if (iy >= g.h_in) continue;
        for (int kx = 0; kx < g.k; ++kx) {
            const int tx = ox + g.pad - kx;
            if (tx < 0 || tx % g.stride != 0) continue;
            const int ix = tx / g.stride;
            if (ix >= g.w_in) continue;
            const float* xp = xn + (iy * g.w_in + ix) * g.c_in;
            for (int ci = 0; ci < g.c_in; ++ci)
                acc += w[((ci * g.c_out + co) * g.k + ky) * g.k + kx] * xp[ci];
        }
    }
    acc += b[co];
    if (relu && acc < 0.0f) acc = 0.0f;
    y[i] = acc;
}

// dx [batch, h_in, w_in, c_in] += Σ_{co,ky,kx} W[ci,co,ky,kx] · g[n, iy·s−p+ky, ix·s−p+kx, co].
extern "C" __global__ void conv_t2d_bwd_dx_f32(ConvGeom g, int batch, const float* __restrict__ w,
                                               const float* __restrict__ y, const float* __restrict__ dy,
                                               int relu, float* __restrict__ dx) {
    const int total = batch * g.h_in * g.w_in * g.c_in;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int ci = i % g.c_in;
    int t = i / g.c_in;
    const int ix = t % g.w_in;
    t /= g.w_in;
    const int iy = t % g.h_in;
    const int n = t / g.h_in;
    float acc = 0.0f;
    for (int ky = 0; ky < g.k; ++ky) {
        const int oy = iy * g.stride - g.pad + ky;
        if (oy < 0 || oy >= g.h_out) continue;
        for (int kx = 0; kx < g.k; ++kx) {
            const int ox = ix * g.stride - g.pad + kx;
            if (ox < 0 || ox >= g.w_out) continue;
            const int base = ((n * g.h_out + oy) * g.w_out + ox) * g.c_out;
            for (int co = 0; co < g.c_out; ++co)
                acc += w[((ci * g.c_out + co) * g.k + ky) * g.k + kx] * masked_grad(dy, y, base + co, relu);
        }
    }
    dx[i] += acc;
}

// One block per weight element W[ci, co, ky, kx]: dW += Σ_{n,iy,ix} x[n,iy,ix,ci] · g[n, iy·s−p+ky, ix·s−p+kx, co].
extern "C" __global__ void conv_t2d_bwd_dw_f32(ConvGeom g, int batch, const float* __restrict__ x,
                                               const float* __restrict__ y, const float* __restrict__ dy,
                                               int relu, float* __restrict__ dw) {
    __shared__ float sh[32];
    const int widx = blockIdx.x;
    const int kx = widx % g.k;
    const int ky = (widx / g.k) % g.k;
    const int co = (widx / (g.k * g.k)) % g.c_out;
    const int ci = widx / (g.k * g.k * g.c_out);
    const int npos = g.h_in * g.w_in;
    const int m = batch * npos;
    float acc = 0.0f;
    for (int j = threadIdx.x; j < m; j += blockDim.x) {
        const int n = j / npos;
        const int pos = j % npos;
        const int iy = pos / g.w_in, ix = pos % g.w_in;
        const int oy = iy * g.stride - g.pad + ky;
        const int ox = ix * g.stride - g.pad + kx;
        if (oy < 0 || oy >= g.h_out || ox < 0 || ox >= g.w_out) continue;
        acc += x[j * g.c_in + ci] *
               masked_grad(dy, y, ((n * g.h_out + oy) * g.w_out + ox) * g.c_out + co, relu);
    }
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) dw[widx] += acc;
}
