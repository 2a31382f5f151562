//! The floating-point types the CPU reference runs in: f32 for training, f64 for gradient checks.

use std::fmt::{Debug, Display};
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

/// A real number type the CPU backend computes in, with its matrix product.
pub trait Real:
    num_traits::Float
    + num_traits::FromPrimitive
    + num_traits::ToPrimitive
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
    + Default
    + Debug
    + Display
    + Send
    + Sync
    + 'static
{
    const NAME: &'static str;

    /// C = alpha·A·B + beta·C for strided row/column-major matrices (A: m×k, B: k×n, C: m×n);
    /// `rs*`/`cs*` are the row and column strides in elements.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: &[Self],
        rsa: isize,
        csa: isize,
        b: &[Self],
        rsb: isize,
        csb: isize,
        beta: Self,
        c: &mut [Self],
        rsc: isize,
        csc: isize,
    );

    fn from_f64c(x: f64) -> Self {
        <Self as num_traits::FromPrimitive>::from_f64(x).unwrap()
    }
    fn to_f64c(self) -> f64 {
        num_traits::ToPrimitive::to_f64(&self).unwrap()
    }
}

/// The extent of a strided matrix in its buffer, for bounds checks before the unsafe call.
fn extent(rows: usize, cols: usize, rs: isize, cs: isize) -> usize {
    if rows == 0 || cols == 0 {
        return 0;
    }
    ((rows - 1) as isize * rs + (cols - 1) as isize * cs) as usize + 1
}

macro_rules! impl_real {
    ($t:ty, $name:expr, $gemm:path) => {
        impl Real for $t {
            const NAME: &'static str = $name;
            fn gemm(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: &[Self],
                rsa: isize,
                csa: isize,
                b: &[Self],
                rsb: isize,
                csb: isize,
                beta: Self,
                c: &mut [Self],
                rsc: isize,
                csc: isize,
            ) {
                assert!(rsa >= 0 && csa >= 0 && rsb >= 0 && csb >= 0 && rsc >= 0 && csc >= 0);
                assert!(a.len() >= extent(m, k, rsa, csa), "gemm: A too short");
                assert!(b.len() >= extent(k, n, rsb, csb), "gemm: B too short");
                assert!(c.len() >= extent(m, n, rsc, csc), "gemm: C too short");
                // SAFETY: the three extents were checked above; C does not alias A or B because
                // it is a distinct &mut borrow.
                unsafe {
                    $gemm(
                        m,
                        k,
                        n,
                        alpha,
                        a.as_ptr(),
                        rsa,
                        csa,
                        b.as_ptr(),
                        rsb,
                        csb,
                        beta,
                        c.as_mut_ptr(),
                        rsc,
                        csc,
                    )
                }
            }
        }
    };
}

impl_real!(f32, "f32", matrixmultiply::sgemm);
impl_real!(f64, "f64", matrixmultiply::dgemm);
