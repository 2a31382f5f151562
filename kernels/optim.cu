// optim.cu: Adam(W), sums of squares and the optimizer's step control, in double precision like
// the CPU reference.
// Math (optim.rs): g' = grad_scale·g; m = β1 m + (1−β1) g'; v = β2 v + (1−β2) g'²;
//   p = p·(1 − lr·wd) − lr·(m/bc1) / (sqrt(v/bc2) + eps), bc_i = 1 − β_i^t.
//   grad_scale, bc1, bc2 and whether to update at all come from the control block `ctrl`
//   (written by opt_control_f64 from the gradients, or by the host for a single update), so a
//   training step reads nothing back.
//   Every double operation is an explicitly rounded intrinsic (no FMA contraction), so the
//   result is bit-identical to the CPU's f64 arithmetic before the final rounding to f32.
//   sum_squares: Σ x² in double; diff_squares: Σ (a − b)² in double. Two passes with a fixed grid:
//   per-block partials, then one block sums them (deterministic for a given n).
// FLOPs: ~15 double ops per element (Adam), 2 per element (sums). Compulsory bytes: Adam 4 · 7
// per element (p, m, v read+write, g read); sums 4 or 8 per element.

// The control block (double[CTRL_LEN]); OptReport in optim.rs is its host image.
#define CTRL_UPDATES 0
#define CTRL_SKIPPED 1
#define CTRL_FIRST_BAD_STEP 2  // −1: none
#define CTRL_FIRST_BAD_LOSS 3
#define CTRL_FIRST_BAD_NORM 4
#define CTRL_LAST_BAD_STEP 5   // −1: none
#define CTRL_LATCHED 6
#define CTRL_LAST_LOSS 7
#define CTRL_LAST_NORM 8
#define CTRL_LOSS_SUM 9
#define CTRL_LOSS_COUNT 10
#define CTRL_APPLY 11          // this step updates (1) or not (0)
#define CTRL_GRAD_SCALE 12
#define CTRL_BC1 13
#define CTRL_BC2 14
#define CTRL_LEN 16

static __device__ bool is_finite_d(double x) { return x == x && x - x == 0.0; }

// One block of 256: the squared gradient norm is the sum of `nparts` per-block partials (fixed
// order), then thread 0 applies OptReport::decide: skip non-finite steps (latching with
// `latch`), count, and set the clip scale and bias corrections for adam_f32.
extern "C" __global__ void opt_control_f64(int nparts, const double* __restrict__ partials,
                                           const float* __restrict__ loss, double* __restrict__ ctrl,
                                           double b1, double b2, double clip, int has_clip, int latch,
                                           const double* __restrict__ step_vals) {
    const double step = step_vals[STEP_VAL_STEP];
    __shared__ double sh[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) acc += partials[i];
    acc = block_sum(acc, sh);
    if (threadIdx.x != 0) return;
    const double l = (double)loss[0];
    const double norm = __dsqrt_rn(acc);
    ctrl[CTRL_LAST_LOSS] = l;
    ctrl[CTRL_LAST_NORM] = norm;
    ctrl[CTRL_APPLY] = 0.0;
    if (!(is_finite_d(l) && is_finite_d(norm))) {
        ctrl[CTRL_SKIPPED] += 1.0;
        if (ctrl[CTRL_FIRST_BAD_STEP] < 0.0) {
            ctrl[CTRL_FIRST_BAD_STEP] = step;
            ctrl[CTRL_FIRST_BAD_LOSS] = l;
            ctrl[CTRL_FIRST_BAD_NORM] = norm;
        }
        ctrl[CTRL_LAST_BAD_STEP] = step;
        if (latch) ctrl[CTRL_LATCHED] = 1.0;
        return;
    }
    if (ctrl[CTRL_LATCHED] != 0.0) {
        ctrl[CTRL_SKIPPED] += 1.0;
        return;
    }
    const double t = ctrl[CTRL_UPDATES] + 1.0;
    ctrl[CTRL_UPDATES] = t;
    ctrl[CTRL_LOSS_SUM] = __dadd_rn(ctrl[CTRL_LOSS_SUM], l);
    ctrl[CTRL_LOSS_COUNT] += 1.0;
    ctrl[CTRL_APPLY] = 1.0;
    ctrl[CTRL_GRAD_SCALE] = (has_clip && norm > clip) ? __ddiv_rn(clip, norm) : 1.0;
    ctrl[CTRL_BC1] = __dadd_rn(1.0, -pow(b1, t));
    ctrl[CTRL_BC2] = __dadd_rn(1.0, -pow(b2, t));
}

// The AdamW update of element i, with grad_scale, bc1, bc2 from ctrl.
static __device__ __forceinline__ void adam_elem(long long i, float* __restrict__ param,
                                                 const float* __restrict__ grad, float* __restrict__ m,
                                                 float* __restrict__ v, double lr, double b1, double b2,
                                                 double eps, double decay, const double* __restrict__ ctrl) {
    const double grad_scale = ctrl[CTRL_GRAD_SCALE], bc1 = ctrl[CTRL_BC1], bc2 = ctrl[CTRL_BC2];
    const double g = __dmul_rn((double)grad[i], grad_scale);
    const double m1 = __dadd_rn(__dmul_rn(b1, (double)m[i]), __dmul_rn(__dadd_rn(1.0, -b1), g));
    const double v1 = __dadd_rn(__dmul_rn(b2, (double)v[i]), __dmul_rn(__dmul_rn(__dadd_rn(1.0, -b2), g), g));
    const double upd = __ddiv_rn(__dmul_rn(lr, __ddiv_rn(m1, bc1)), __dadd_rn(__dsqrt_rn(__ddiv_rn(v1, bc2)), eps));
    param[i] = (float)__dadd_rn(__dmul_rn((double)param[i], decay), -upd);
    m[i] = (float)m1;
    v[i] = (float)v1;
}

// One tensor; does nothing when ctrl[CTRL_APPLY] is 0.
extern "C" __global__ void adam_f32(int n, float* __restrict__ param, const float* __restrict__ grad,
                                    float* __restrict__ m, float* __restrict__ v, double lr, double b1,
                                    double b2, double eps, double decay, const double* __restrict__ ctrl) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n || ctrl[CTRL_APPLY] == 0.0) return;
    adam_elem(i, param, grad, m, v, lr, b1, b2, eps, decay, ctrl);
}

// Multi-tensor versions: one launch for every tensor of the model. tab[5·t ..] = addresses of
// tensor t's param, grad, m, v and its length; map[block] = (t << 32) | first element of the
// block's chunk of MT_CHUNK elements (built once per model by the host).
#define MT_CHUNK 4096

struct MtChunk {
    int t;
    long long start, end;
};

static __device__ __forceinline__ MtChunk mt_chunk(const unsigned long long* tab, const unsigned long long* map) {
    const unsigned long long e = map[blockIdx.x];
    MtChunk c;
    c.t = (int)(e >> 32);
    c.start = (long long)(e & 0xffffffffull);
    const long long n = (long long)tab[5 * c.t + 4];
    c.end = c.start + MT_CHUNK < n ? c.start + MT_CHUNK : n;
    return c;
}

// partials[block] = Σ grad² over the block's chunk (double). With the fixed map, the sum in
// opt_control_f64 has a fixed order: deterministic.
extern "C" __global__ void sum_squares_multi_f32(const unsigned long long* __restrict__ tab,
                                                 const unsigned long long* __restrict__ map,
                                                 double* __restrict__ partials) {
    __shared__ double sh[32];
    const MtChunk c = mt_chunk(tab, map);
    const float* g = (const float*)tab[5 * c.t + 1];
    double acc = 0.0;
    for (long long i = c.start + threadIdx.x; i < c.end; i += blockDim.x) {
        const double a = (double)g[i];
        acc += a * a;
    }
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// lr and decay from step_vals.
extern "C" __global__ void adam_multi_f32(const unsigned long long* __restrict__ tab,
                                          const unsigned long long* __restrict__ map, double b1, double b2,
                                          double eps, const double* __restrict__ ctrl,
                                          const double* __restrict__ step_vals) {
    if (ctrl[CTRL_APPLY] == 0.0) return;
    const double lr = step_vals[STEP_VAL_LR], decay = step_vals[STEP_VAL_DECAY];
    const MtChunk c = mt_chunk(tab, map);
    const unsigned long long* row = tab + 5 * c.t;
    float* param = (float*)row[0];
    const float* grad = (const float*)row[1];
    float* m = (float*)row[2];
    float* v = (float*)row[3];
    for (long long i = c.start + threadIdx.x; i < c.end; i += blockDim.x)
        adam_elem(i, param, grad, m, v, lr, b1, b2, eps, decay, ctrl);
}

// partial[blockIdx.x] = Σ over this block's grid-stride elements of x² (double).
extern "C" __global__ void sum_squares_partial_f32(int n, const float* __restrict__ x, double* __restrict__ partial) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const double a = (double)x[i];
        acc += a * a;
    }
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// partial[blockIdx.x] = Σ (a − b)² (double).
extern "C" __global__ void diff_squares_partial_f32(int n, const float* __restrict__ a, const float* __restrict__ b,
                                                    double* __restrict__ partial) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const double d = (double)a[i] - (double)b[i];
        acc += d * d;
    }
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// One block: out[0] = Σ partial[0..n).
extern "C" __global__ void sum_partials_f64(int n, const double* __restrict__ partial, double* __restrict__ out) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) out[0] = acc;
}
