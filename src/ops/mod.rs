//! Every op of the model, forward and backward, on the CPU: the reference every CUDA kernel is
//! tested against. One file per op: its math, its CPU code, and its tests (forward against a
//! naive formula, backward against central finite differences in f64).
//!
//! Conventions: activations are channels-last (`[batch, h, w, c]`, `[rows, features]`);
//! parameters use PyTorch's layouts; every backward ACCUMULATES into its gradient outputs
//! (`+=`), so the caller zeroes them once per step and shared tensors just add up.

pub mod attention;
pub mod bcastconv;
pub mod composite;
pub mod conv;
pub mod elementwise;
pub mod gru;
pub mod layernorm;
pub mod linear;
pub mod posembed;
pub mod slotcell;
pub mod tokens;

#[cfg(test)]
pub mod testutil;

use crate::real::Real;
use rayon::prelude::*;

/// Images (or rows) per parallel work item when a backward pass reduces a weight gradient.
/// Fixed, not derived from the thread count, so the summation order — and so the result, bit
/// for bit — does not depend on the number of threads or their schedule. (Across different CPUs
/// results can still differ in the last bits: the GEMM picks its SIMD kernel at run time.)
pub const REDUCE_CHUNK: usize = 4;

/// Runs `work(first, count, out_chunk, partial)` over chunks of `n` items in parallel. Each chunk
/// gets its own slice of `out` (`out_per_item` elements per item; pass an empty slice and 0 when
/// there is no per-item output) and its own zeroed partial buffer of `grad.len()`; the partials
/// are then added into `grad` in chunk order, so the result does not depend on the schedule.
pub fn par_chunks_reduce<T: Real>(
    n: usize,
    chunk: usize,
    out: &mut [T],
    out_per_item: usize,
    grad: &mut [T],
    work: impl Fn(usize, usize, &mut [T], &mut [T]) + Sync + Send,
) {
    let grad_len = grad.len();
    let nchunks = n.div_ceil(chunk);
    let run = |c: usize, out_chunk: &mut [T]| {
        let mut p = vec![T::zero(); grad_len];
        let first = c * chunk;
        work(first, chunk.min(n - first), out_chunk, &mut p);
        p
    };
    let partials: Vec<Vec<T>> = if out_per_item > 0 {
        assert_eq!(out.len(), n * out_per_item);
        out.par_chunks_mut(chunk * out_per_item)
            .enumerate()
            .map(|(c, o)| run(c, o))
            .collect()
    } else {
        (0..nchunks)
            .into_par_iter()
            .map(|c| run(c, &mut []))
            .collect()
    };
    for p in partials {
        for (g, v) in grad.iter_mut().zip(p) {
            *g += v;
        }
    }
}

/// The common frame of a backward pass that writes per-item input gradients and reduces a
/// weight gradient: runs `work(first, count, dx_chunk, dw_partial, db_partial)` over chunks of
/// `n` items with [`par_chunks_reduce`] (`dx_chunk` is empty when `dx` is None) and adds the
/// reduced partials into `dw` and `db`.
#[allow(clippy::too_many_arguments)]
pub fn par_backward<T: Real>(
    n: usize,
    chunk: usize,
    dx: Option<&mut [T]>,
    dx_per_item: usize,
    dw: &mut [T],
    db: Option<&mut [T]>,
    n_bias: usize,
    work: impl Fn(usize, usize, &mut [T], &mut [T], &mut [T]) + Sync + Send,
) {
    let wl = dw.len();
    let mut grads = vec![T::zero(); wl + n_bias];
    let mut empty: [T; 0] = [];
    let (out, per) = match dx {
        Some(d) => (d, dx_per_item),
        None => (&mut empty[..], 0),
    };
    par_chunks_reduce(
        n,
        chunk,
        out,
        per,
        &mut grads,
        |first, count, dx_chunk, part| {
            let (pw, pb) = part.split_at_mut(wl);
            work(first, count, dx_chunk, pw, pb)
        },
    );
    dw.iter_mut().zip(&grads[..wl]).for_each(|(d, &v)| *d += v);
    if let Some(db) = db {
        db.iter_mut().zip(&grads[wl..]).for_each(|(d, &v)| *d += v);
    }
}

/// Apply the ReLU derivative: a copy of `dy` zeroed where the forward output `y` was not positive.
pub fn relu_mask<T: Real>(dy: &[T], y: &[T], relu: bool) -> Vec<T> {
    if relu {
        dy.iter()
            .zip(y)
            .map(|(&g, &v)| if v > T::zero() { g } else { T::zero() })
            .collect()
    } else {
        dy.to_vec()
    }
}
