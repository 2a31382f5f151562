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
                                           double step) {
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

// Reads grad_scale, bc1, bc2 from ctrl; does nothing when ctrl[CTRL_APPLY] is 0.
extern "C" __global__ void adam_f32(int n, float* __restrict__ param, const float* __restrict__ grad,
                                    float* __restrict__ m, float* __restrict__ v, double lr, double b1,
                                    double b2, double eps, double decay, const double* __restrict__ ctrl) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n || ctrl[CTRL_APPLY] == 0.0) return;
    const double grad_scale = ctrl[CTRL_GRAD_SCALE], bc1 = ctrl[CTRL_BC1], bc2 = ctrl[CTRL_BC2];
    const double g = __dmul_rn((double)grad[i], grad_scale);
    const double m1 = __dadd_rn(__dmul_rn(b1, (double)m[i]), __dmul_rn(__dadd_rn(1.0, -b1), g));
    const double v1 = __dadd_rn(__dmul_rn(b2, (double)v[i]), __dmul_rn(__dmul_rn(__dadd_rn(1.0, -b2), g), g));
    const double upd = __ddiv_rn(__dmul_rn(lr, __ddiv_rn(m1, bc1)), __dadd_rn(__dsqrt_rn(__ddiv_rn(v1, bc2)), eps));
    param[i] = (float)__dadd_rn(__dmul_rn((double)param[i], decay), -upd);
    m[i] = (float)m1;
    v[i] = (float)v1;
}

// partial[offset + blockIdx.x] = Σ over this block's grid-stride elements of x² (double).
extern "C" __global__ void sum_squares_partial_f32(int n, const float* __restrict__ x, double* __restrict__ partial,
                                                   int offset) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const double a = (double)x[i];
        acc += a * a;
    }
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) partial[offset + blockIdx.x] = acc;
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
