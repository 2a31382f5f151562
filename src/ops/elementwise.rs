//! Small elementwise ops: slot initialisation, dropout, residual add.

use crate::real::Real;
use crate::rng::Philox;
use rayon::prelude::*;

/// slots `[n, D]` = mu + exp(log_sigma) ⊙ noise (mu, log_sigma `[D]`, shared by all slots).
pub fn slot_init_fwd<T: Real>(d: usize, mu: &[T], log_sigma: &[T], noise: &[T], slots: &mut [T]) {
    slots
        .par_chunks_mut(d)
        .zip(noise.par_chunks(d))
        .for_each(|(s, nz)| {
            for j in 0..d {
                s[j] = mu[j] + log_sigma[j].exp() * nz[j];
            }
        });
}

/// Backward: accumulates dmu and dlog_sigma.
pub fn slot_init_bwd<T: Real>(
    d: usize,
    log_sigma: &[T],
    noise: &[T],
    dslots: &[T],
    dmu: &mut [T],
    dlog_sigma: &mut [T],
) {
    for (g, nz) in dslots.chunks_exact(d).zip(noise.chunks_exact(d)) {
        for j in 0..d {
            dmu[j] += g[j];
            dlog_sigma[j] += g[j] * log_sigma[j].exp() * nz[j];
        }
    }
}

/// Where dropout's randomness comes from: element i is kept when
/// `uniform(seed, stream, step, i) >= p`. Nothing is stored; backward draws the same mask again.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutMask {
    pub rng: Philox,
    pub stream: u32,
    pub step: u32,
    pub p: f64,
}

impl DropoutMask {
    pub fn keep(&self, i: usize) -> bool {
        self.rng.uniform(self.stream, self.step, i as u64) >= self.p
    }
    /// What a kept element is multiplied by: 1 / (1 − p).
    pub fn scale(&self) -> f64 {
        1.0 / (1.0 - self.p)
    }
}

/// In place: x = x · keep / (1 − p).
pub fn dropout_fwd<T: Real>(mask: &DropoutMask, x: &mut [T]) {
    let scale = T::from_f64c(mask.scale());
    x.par_iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = if mask.keep(i) { *v * scale } else { T::zero() });
}

/// In place on the gradient: the same scaling (dropout is linear in x).
pub fn dropout_bwd<T: Real>(mask: &DropoutMask, dx: &mut [T]) {
    dropout_fwd(mask, dx);
}

/// y += x.
pub fn add_assign<T: Real>(y: &mut [T], x: &[T]) {
    assert_eq!(y.len(), x.len());
    y.par_iter_mut()
        .zip(x.par_iter())
        .for_each(|(a, &b)| *a += b);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::*;

    #[test]
    fn slot_init_forward_and_backward() {
        let (n, d) = (3, 4);
        let mu = rand_vec(d, 1, 1.0);
        let ls = rand_vec(d, 2, 1.0);
        let noise = rand_vec(n * d, 3, 1.0);
        let run = |mu: &[f64], ls: &[f64]| {
            let mut s = vec![f64::NAN; n * d];
            slot_init_fwd(d, mu, ls, &noise, &mut s);
            s
        };
        let s = run(&mu, &ls);
        assert!((s[5] - (mu[1] + ls[1].exp() * noise[5])).abs() < 1e-15);
        let ds = rand_vec(n * d, 4, 1.0);
        let (mut dmu, mut dls) = (vec![0.0; d], vec![0.0; d]);
        slot_init_bwd(d, &ls, &noise, &ds, &mut dmu, &mut dls);
        assert_grad(
            "dmu",
            &dmu,
            &fd_grad(&mu, 1e-6, |x| dot(&ds, &run(x, &ls))),
            1e-6,
        );
        assert_grad(
            "dlog_sigma",
            &dls,
            &fd_grad(&ls, 1e-6, |x| dot(&ds, &run(&mu, x))),
            1e-6,
        );
    }

    #[test]
    fn dropout_keeps_the_expected_fraction_and_replays() {
        let mask = DropoutMask {
            rng: Philox::new(3),
            stream: 9,
            step: 1,
            p: 0.25,
        };
        let mut x = vec![1.0f64; 100_000];
        dropout_fwd(&mask, &mut x);
        let kept = x.iter().filter(|&&v| v != 0.0).count() as f64 / x.len() as f64;
        assert!((kept - 0.75).abs() < 0.01, "kept {kept}");
        assert!(x
            .iter()
            .all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-15));
        // Backward applies exactly the same mask.
        let mut g = vec![1.0f64; 100_000];
        dropout_bwd(&mask, &mut g);
        assert_eq!(x, g);
    }
}
