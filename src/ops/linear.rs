//! Linear layer on rows: `y[r, o] = Σ_i x[r, i] · W[o, i] + b[o]`, optional ReLU.
//! W is `[out, in]` (PyTorch's nn.Linear).

use super::{par_backward, relu_mask};
use crate::real::Real;
use rayon::prelude::*;

/// Rows per parallel work item (fixed so that reductions are deterministic).
const ROW_CHUNK: usize = 2048;

/// y `[rows, n_out]` (overwritten) = x `[rows, n_in]` · Wᵀ + b, then ReLU if asked.
#[allow(clippy::too_many_arguments)]
pub fn linear_fwd<T: Real>(
    rows: usize,
    n_in: usize,
    n_out: usize,
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    relu: bool,
    y: &mut [T],
) {
    assert_eq!(x.len(), rows * n_in);
    assert_eq!(w.len(), n_out * n_in);
    assert_eq!(y.len(), rows * n_out);
    y.par_chunks_mut(ROW_CHUNK * n_out)
        .zip(x.par_chunks(ROW_CHUNK * n_in))
        .for_each(|(yc, xc)| {
            let r = xc.len() / n_in;
            T::gemm(
                r,
                n_in,
                n_out,
                T::one(),
                xc,
                n_in as isize,
                1,
                w,
                1,
                n_in as isize,
                T::zero(),
                yc,
                n_out as isize,
                1,
            );
            for row in yc.chunks_exact_mut(n_out) {
                if let Some(b) = b {
                    row.iter_mut().zip(b).for_each(|(v, &bb)| *v += bb);
                }
                if relu {
                    row.iter_mut().for_each(|v| *v = v.max(T::zero()));
                }
            }
        });
}

/// Backward of [`linear_fwd`]: accumulates dx (if given), dw and db (if given).
/// `y` is the forward output, read only for the ReLU mask.
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd<T: Real>(
    rows: usize,
    n_in: usize,
    n_out: usize,
    x: &[T],
    w: &[T],
    y: &[T],
    relu: bool,
    dy: &[T],
    dx: Option<&mut [T]>,
    dw: &mut [T],
    db: Option<&mut [T]>,
) {
    let has_dx = dx.is_some();
    par_backward(
        rows,
        ROW_CHUNK,
        dx,
        n_in,
        dw,
        db,
        n_out,
        |first, count, dx_chunk, pw, pb| {
            let gy = relu_mask(
                &dy[first * n_out..][..count * n_out],
                &y[first * n_out..][..count * n_out],
                relu,
            );
            let xc = &x[first * n_in..][..count * n_in];
            let (ni, no) = (n_in as isize, n_out as isize);
            // dW[n_out, n_in] += gyᵀ · x
            T::gemm(
                n_out,
                count,
                n_in,
                T::one(),
                &gy,
                1,
                no,
                xc,
                ni,
                1,
                T::one(),
                pw,
                ni,
                1,
            );
            for row in gy.chunks_exact(n_out) {
                pb.iter_mut().zip(row).for_each(|(d, &v)| *d += v);
            }
            if has_dx {
                // dx[count, n_in] += gy · W
                T::gemm(
                    count,
                    n_out,
                    n_in,
                    T::one(),
                    &gy,
                    no,
                    1,
                    w,
                    ni,
                    1,
                    T::one(),
                    dx_chunk,
                    ni,
                    1,
                );
            }
        },
    );
}

/// C (+)= op(A)·op(B) for small matrices (the fold's weight products, `model.rs`): op(A) is
/// `[m][kd]` (A stored `[kd][m]` when `a_t`), op(B) `[kd][n]` (B stored `[n][kd]` when `b_t`),
/// C `[m][n]` overwritten, or added to when `accumulate`. Each element sums k in order.
#[allow(clippy::too_many_arguments)]
pub fn matmul_small<T: Real>(
    m: usize,
    n: usize,
    kd: usize,
    a: &[T],
    a_t: bool,
    b: &[T],
    b_t: bool,
    c: &mut [T],
    accumulate: bool,
) {
    assert_eq!(a.len(), m * kd);
    assert_eq!(b.len(), kd * n);
    assert_eq!(c.len(), m * n);
    for i in 0..m {
        for j in 0..n {
            let mut acc = T::zero();
            for l in 0..kd {
                let av = if a_t { a[l * m + i] } else { a[i * kd + l] };
                let bv = if b_t { b[j * kd + l] } else { b[l * n + j] };
                acc += av * bv;
            }
            let o = &mut c[i * n + j];
            *o = if accumulate { *o + acc } else { acc };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::*;

    fn run(
        rows: usize,
        ni: usize,
        no: usize,
        x: &[f64],
        w: &[f64],
        b: &[f64],
        relu: bool,
    ) -> Vec<f64> {
        let mut y = vec![f64::NAN; rows * no];
        linear_fwd(rows, ni, no, x, w, Some(b), relu, &mut y);
        y
    }

    #[test]
    fn forward_matches_naive_formula() {
        let (rows, ni, no) = (5, 4, 3);
        let x = rand_vec(rows * ni, 1, 1.0);
        let w = rand_vec(no * ni, 2, 1.0);
        let b = rand_vec(no, 3, 1.0);
        for relu in [false, true] {
            let y = run(rows, ni, no, &x, &w, &b, relu);
            for r in 0..rows {
                for o in 0..no {
                    let mut s = b[o];
                    for i in 0..ni {
                        s += x[r * ni + i] * w[o * ni + i];
                    }
                    let s = if relu { s.max(0.0) } else { s };
                    assert!((y[r * no + o] - s).abs() < 1e-14);
                }
            }
        }
        // Without bias.
        let mut y = vec![f64::NAN; rows * no];
        linear_fwd(rows, ni, no, &x, &w, None, false, &mut y);
        assert!((y[0] - (0..ni).map(|i| x[i] * w[i]).sum::<f64>()).abs() < 1e-14);
    }

    #[test]
    fn backward_matches_finite_differences() {
        // rows > ROW_CHUNK so that the chunked reduction is exercised.
        for &(rows, relu) in &[(7usize, true), (ROW_CHUNK + 3, false)] {
            let (ni, no) = (3, 2);
            let x = rand_vec(rows * ni, 4, 1.0);
            let w = rand_vec(no * ni, 5, 1.0);
            let b = rand_vec(no, 6, 1.0);
            let dy = rand_vec(rows * no, 7, 1.0);
            let y = run(rows, ni, no, &x, &w, &b, relu);
            let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; w.len()], vec![0.0; no]);
            linear_bwd(
                rows,
                ni,
                no,
                &x,
                &w,
                &y,
                relu,
                &dy,
                Some(&mut dx),
                &mut dw,
                Some(&mut db),
            );
            let h = 1e-6;
            if rows < 100 {
                let fx = fd_grad(&x, h, |x| dot(&dy, &run(rows, ni, no, x, &w, &b, relu)));
                assert_grad("dx", &dx, &fx, 1e-6);
            }
            let fw = fd_grad(&w, h, |w| dot(&dy, &run(rows, ni, no, &x, w, &b, relu)));
            let fb = fd_grad(&b, h, |b| dot(&dy, &run(rows, ni, no, &x, &w, b, relu)));
            assert_grad("dw", &dw, &fw, 1e-6);
            assert_grad("db", &db, &fb, 1e-6);
        }
    }
    #[test]
    fn matmul_small_matches_each_layout() {
        let (m, n, kd) = (3, 5, 4);
        let a = rand_vec(m * kd, 11, 1.0);
        let b = rand_vec(kd * n, 12, 1.0);
        let at: Vec<f64> = (0..kd * m).map(|e| a[(e % m) * kd + e / m]).collect();
        let bt: Vec<f64> = (0..n * kd).map(|e| b[(e % kd) * n + e / kd]).collect();
        let want: Vec<f64> = (0..m * n)
            .map(|e| {
                (0..kd)
                    .map(|l| a[(e / n) * kd + l] * b[l * n + e % n])
                    .sum()
            })
            .collect();
        for (aa, a_t) in [(&a, false), (&at, true)] {
            for (bb, b_t) in [(&b, false), (&bt, true)] {
                let mut c = vec![f64::NAN; m * n];
                matmul_small(m, n, kd, aa, a_t, bb, b_t, &mut c, false);
                assert!(rel_l2(&c, &want) < 1e-15, "a_t {a_t} b_t {b_t}");
                matmul_small(m, n, kd, aa, a_t, bb, b_t, &mut c, true);
                let twice: Vec<f64> = want.iter().map(|w| 2.0 * w).collect();
                assert!(
                    rel_l2(&c, &twice) < 1e-15,
                    "accumulate, a_t {a_t} b_t {b_t}"
                );
            }
        }
    }
}
