//! CPU op benchmark: each op at a representative shape of the official model, validated (f32
//! against f64, relative L2 error) before it is timed; median of several runs; GFLOP/s.
//! `cargo bench --bench ops` (add `-- --quick` for fewer repetitions).

use slotfix::ops::attention::{attention_bwd, attention_fwd, AttnDims};
use slotfix::ops::conv::{conv2d_bwd, conv2d_fwd, conv_t2d_bwd, conv_t2d_fwd, ConvGeom};
use slotfix::ops::layernorm::{layernorm_bwd, layernorm_fwd};
use slotfix::ops::linear::{linear_bwd, linear_fwd};
use slotfix::rng::Philox;
use std::time::Instant;

fn rand(n: usize, seed: u64) -> Vec<f64> {
    let r = Philox::new(seed);
    (0..n)
        .map(|i| 2.0 * r.uniform(1, 0, i as u64) - 1.0)
        .collect()
}
fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}
fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}
fn median_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}
fn row(name: &str, shape: &str, err: f64, ms: f64, flops: f64) {
    assert!(
        err < 1e-5 && err.is_finite(),
        "{name}: f32 vs f64 relative error {err:e}"
    );
    println!(
        "| {name} | {shape} | {err:.1e} | {ms:.2} | {:.1} |",
        flops / ms / 1e6
    );
}

fn main() {
    let reps = if std::env::args().any(|a| a == "--quick") {
        3
    } else {
        7
    };
    println!(
        "CPU ops, {} threads, median of {reps}\n",
        rayon::current_num_threads()
    );
    println!(
        "| op | shape | f32 vs f64 error | ms | GFLOP/s |\n| --- | --- | ---: | ---: | ---: |"
    );

    // Encoder conv: 64 → 64 channels, 5×5, 'same', 64×64 pixels, batch 2.
    let (b, g) = (2, ConvGeom::same(64, 64, 64, 64, 5));
    let (x, w, bias) = (
        rand(b * g.in_len(), 1),
        rand(g.weight_len(), 2),
        rand(64, 3),
    );
    let (x32, w32, b32) = (f32s(&x), f32s(&w), f32s(&bias));
    let mut y64 = vec![0.0; b * g.out_len()];
    conv2d_fwd(&g, b, &x, &w, &bias, true, &mut y64);
    let mut y = vec![0f32; b * g.out_len()];
    conv2d_fwd(&g, b, &x32, &w32, &b32, true, &mut y);
    let err = rel_err(&y, &y64);
    let fl = 2.0 * (b * g.macs()) as f64;
    row(
        "conv2d_fwd",
        "B2 64×64 64→64 k5",
        err,
        median_ms(reps, || conv2d_fwd(&g, b, &x32, &w32, &b32, true, &mut y)),
        fl,
    );
    let dy = f32s(&rand(y.len(), 4));
    let (mut dx, mut dw, mut db) = (vec![0f32; x.len()], vec![0f32; w.len()], vec![0f32; 64]);
    let ms = median_ms(reps, || {
        conv2d_bwd(
            &g,
            b,
            &x32,
            &w32,
            &y,
            true,
            &dy,
            Some(&mut dx),
            &mut dw,
            &mut db,
        )
    });
    row("conv2d_bwd", "B2 64×64 64→64 k5", err, ms, 2.0 * fl);

    // Decoder transposed conv: 64 → 64, 5×5 stride 2, 32×32 → 64×64, batch 2 slots.
    let g = ConvGeom::transposed(32, 32, 64, 64, 5, 2, 2, 1);
    let (x, w) = (rand(b * g.in_len(), 5), rand(g.weight_len(), 6));
    let (x32, w32) = (f32s(&x), f32s(&w));
    let mut y64 = vec![0.0; b * g.out_len()];
    conv_t2d_fwd(&g, b, &x, &w, &bias, true, &mut y64);
    let mut y = vec![0f32; b * g.out_len()];
    conv_t2d_fwd(&g, b, &x32, &w32, &b32, true, &mut y);
    let err = rel_err(&y, &y64);
    let fl = 2.0 * (b * g.macs_transposed()) as f64;
    row(
        "conv_t2d_fwd",
        "B2 32→64 s2 64→64 k5",
        err,
        median_ms(reps, || conv_t2d_fwd(&g, b, &x32, &w32, &b32, true, &mut y)),
        fl,
    );
    let dy = f32s(&rand(y.len(), 7));
    let (mut dx, mut dw) = (vec![0f32; x.len()], vec![0f32; w.len()]);
    let ms = median_ms(reps, || {
        conv_t2d_bwd(
            &g,
            b,
            &x32,
            &w32,
            &y,
            true,
            &dy,
            Some(&mut dx),
            &mut dw,
            &mut db,
        )
    });
    row("conv_t2d_bwd", "B2 32→64 s2 64→64 k5", err, ms, 2.0 * fl);

    // Token MLP layer: 2 × 4096 tokens, 64 → 64.
    let (rows, n) = (8192, 64);
    let (x, w) = (rand(rows * n, 8), rand(n * n, 9));
    let (x32, w32) = (f32s(&x), f32s(&w));
    let mut y64 = vec![0.0; rows * n];
    linear_fwd(rows, n, n, &x, &w, Some(&bias), true, &mut y64);
    let mut y = vec![0f32; rows * n];
    linear_fwd(rows, n, n, &x32, &w32, Some(&b32), true, &mut y);
    let err = rel_err(&y, &y64);
    let fl = 2.0 * (rows * n * n) as f64;
    row(
        "linear_fwd",
        "8192×64→64",
        err,
        median_ms(reps, || {
            linear_fwd(rows, n, n, &x32, &w32, Some(&b32), true, &mut y)
        }),
        fl,
    );
    let dy = f32s(&rand(y.len(), 10));
    let (mut dx, mut dw, mut dbb) = (vec![0f32; x.len()], vec![0f32; w.len()], vec![0f32; n]);
    let ms = median_ms(reps, || {
        linear_bwd(
            rows,
            n,
            n,
            &x32,
            &w32,
            &y,
            true,
            &dy,
            Some(&mut dx),
            &mut dw,
            Some(&mut dbb),
        )
    });
    row("linear_bwd", "8192×64→64", err, ms, 2.0 * fl);

    // LayerNorm over 8192 rows of 64.
    let (g64, be64) = (rand(n, 11), rand(n, 12));
    let (gg, bb) = (f32s(&g64), f32s(&be64));
    let (mut m64, mut r64) = (vec![0.0; rows], vec![0.0; rows]);
    layernorm_fwd(rows, n, &x, &g64, &be64, &mut y64, &mut m64, &mut r64);
    let (mut m, mut r) = (vec![0f32; rows], vec![0f32; rows]);
    layernorm_fwd(rows, n, &x32, &gg, &bb, &mut y, &mut m, &mut r);
    let err = rel_err(&y, &y64);
    let fl = 8.0 * (rows * n) as f64;
    row(
        "layernorm_fwd",
        "8192×64",
        err,
        median_ms(reps, || {
            layernorm_fwd(rows, n, &x32, &gg, &bb, &mut y, &mut m, &mut r)
        }),
        fl,
    );
    let (mut dgg, mut dbb2) = (vec![0f32; n], vec![0f32; n]);
    let ms = median_ms(reps, || {
        layernorm_bwd(
            rows, n, &x32, &gg, &m, &r, &dy, &mut dx, &mut dgg, &mut dbb2,
        )
    });
    row("layernorm_bwd", "8192×64", err, ms, 2.0 * fl);

    // Slot-attention step: B 2, N 4096, K 7, D 64, 1 head.
    let dm = AttnDims {
        batch: 2,
        n: 4096,
        k: 7,
        d: 64,
        heads: 1,
        scale: 0.125,
        eps: 1e-8,
    };
    let (k, v, q) = (
        rand(2 * 4096 * 64, 13),
        rand(2 * 4096 * 64, 14),
        rand(2 * 7 * 64, 15),
    );
    let (k32, v32, q32) = (f32s(&k), f32s(&v), f32s(&q));
    let (mut a64, mut u64_) = (vec![0.0; dm.attn_len()], vec![0.0; 2 * 7 * 64]);
    attention_fwd(&dm, &k, &v, &q, &mut a64, &mut u64_);
    let (mut a, mut u) = (vec![0f32; dm.attn_len()], vec![0f32; 2 * 7 * 64]);
    attention_fwd(&dm, &k32, &v32, &q32, &mut a, &mut u);
    let err = rel_err(&u, &u64_);
    let fl = 4.0 * (2 * 4096 * 7 * 64) as f64;
    row(
        "attention_fwd",
        "B2 N4096 K7 D64",
        err,
        median_ms(reps, || {
            attention_fwd(&dm, &k32, &v32, &q32, &mut a, &mut u)
        }),
        fl,
    );
    let du = f32s(&rand(u.len(), 16));
    let (mut dk, mut dv, mut dq) = (
        vec![0f32; k.len()],
        vec![0f32; v.len()],
        vec![0f32; q.len()],
    );
    let ms = median_ms(reps, || {
        attention_bwd(&dm, &k32, &v32, &q32, &a, &du, &mut dk, &mut dv, &mut dq)
    });
    row("attention_bwd", "B2 N4096 K7 D64", err, ms, 2.0 * fl);
}
