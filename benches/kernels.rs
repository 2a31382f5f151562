//! CUDA kernel benchmark: every heavy kernel at the shapes of `configs/clevr6.yaml` (B = 64,
//! 128×128, 64 channels, K = 7, D = 64; the decoder at B·K = 448 slot images), then whole
//! training steps. Each op is first spot-checked against the CPU on the first image of the batch
//! (fresh random inputs, outputs poisoned with NaN), then timed with CUDA events (mean of
//! `--reps` runs after a warm-up), and set against the device's measured peaks: the bandwidth of
//! a device-to-device copy and the TF32 `mma.sync` throughput of `kernels/peak.cu`. The header
//! also reports the `wgmma` TF32 peak (on Hopper) and the L2 cache's read bandwidth.
//!
//! `cargo bench --bench kernels` on a GPU machine (`bash .gpu/run benches`). Without a GPU it
//! says so and exits 0 (1 under SLOTFIX_REQUIRE_GPU=1). `-- --emulate` runs the same code at
//! tiny shapes in the kernel emulator: checks only, no timing (what CI-less machines can do).

use slotfix::backend::Backend;
use slotfix::config::{Config, Precision};
use slotfix::cpu::Cpu;
use slotfix::cuda::{Buf, Cuda, FastPaths};
use slotfix::ops::attention::AttnDims;
use slotfix::ops::conv::ConvGeom;
use slotfix::ops::elementwise::DropoutMask;
use slotfix::ops::slotcell::{self, SlotCellDims};
use slotfix::ops::tokens::{
    tokens_bwd_by_ops, tokens_fwd_by_ops, TokenActs, TokenDims, TokenGradActs, TokenGrads,
    TokenOutGrads, TokenParams,
};
use slotfix::rng::Philox;

/// Nominal FP32 (CUDA-core) peak of an H100 SXM, TFLOP/s, for the f32 kernels' column.
const FP32_NOMINAL_TFLOPS: f64 = 67.0;

struct Bench {
    g: Cuda,
    c: Cpu<f32>,
    emulated: bool,
    reps: usize,
    /// Measured peaks: copy bandwidth (GB/s) and TF32 mma throughput (TFLOP/s).
    bw: Option<f64>,
    tf32: Option<f64>,
}

fn rand(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let r = Philox::new(seed);
    (0..n)
        .map(|i| (2.0 * r.uniform(11, 0, i as u64) - 1.0) as f32 * scale)
        .collect()
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

impl Bench {
    fn up(&self, v: &[f32]) -> Buf {
        let mut b = self.g.alloc(v.len());
        self.g.upload_f32(v, &mut b);
        b
    }
    fn poisoned(&self, n: usize) -> Buf {
        let mut b = self.g.alloc(n);
        self.g.fill_value(&mut b, f32::NAN);
        b
    }
    fn rand_buf(&self, n: usize, seed: u64, scale: f32) -> Buf {
        self.up(&rand(n, seed, scale))
    }
    /// Standard normal values generated on the device (the large activations: generating
    /// hundreds of millions of values on the host would dominate the run).
    fn normal_buf(&self, n: usize, seed: u64) -> Buf {
        let mut b = self.g.alloc(n);
        self.g.fill_normal(Philox::new(seed), 12, 0, &mut b);
        b
    }

    /// Compare the first `want.len()` elements of `got` with the CPU; NaN or an error above
    /// `tol` aborts the benchmark (a wrong kernel is not timed).
    fn check(&self, what: &str, got: &Buf, want: &[f32], tol: f64) -> f64 {
        let all = self.g.download_f32(got);
        let head = &all[..want.len()];
        if let Some(i) = all.iter().position(|v| !v.is_finite()) {
            panic!(
                "{what}: element {i} is {} (unwritten or overflowed)",
                all[i]
            );
        }
        let e = rel_err(head, want);
        assert!(
            e <= tol,
            "{what}: relative L2 error {e:.2e} against the CPU > {tol:e}"
        );
        e
    }

    fn time(&self, f: impl FnMut()) -> Option<f64> {
        if self.emulated {
            let mut f = f;
            f();
            return None;
        }
        Some(
            self.g
                .time_ms(self.reps, f)
                .unwrap_or_else(|e| panic!("{e}")),
        )
    }

    /// One table row. `flops` decides the peak it is measured against: TF32 or FP32 compute
    /// when set, else bandwidth.
    #[allow(clippy::too_many_arguments)]
    fn row(
        &self,
        op: &str,
        shape: &str,
        err: Option<f64>,
        ms: Option<f64>,
        flops: f64,
        bytes: f64,
        tf32: bool,
    ) {
        let err = err.map_or("(tests)".into(), |e| format!("{e:.1e}"));
        let Some(ms) = ms else {
            println!("| {op} | {shape} | {err} | emulated | | | |");
            return;
        };
        let (tflops, gbs) = (flops / ms / 1e9, bytes / ms / 1e6);
        let pct = if flops > 0.0 {
            let peak = if tf32 {
                self.tf32.unwrap_or(f64::NAN)
            } else {
                FP32_NOMINAL_TFLOPS
            };
            format!(
                "{:.0} % of {} peak",
                100.0 * tflops / peak,
                if tf32 { "TF32" } else { "FP32 (nominal)" }
            )
        } else {
            format!(
                "{:.0} % of copy bandwidth",
                100.0 * gbs / self.bw.unwrap_or(f64::NAN)
            )
        };
        let tf = if flops > 0.0 {
            format!("{tflops:.1}")
        } else {
            String::new()
        };
        println!("| {op} | {shape} | {err} | {ms:.3} | {tf} | {gbs:.0} | {pct} |");
    }

    fn conv(
        &self,
        name: &str,
        geom: ConvGeom,
        batch: usize,
        transposed: bool,
        precision: Precision,
    ) {
        let g = &self.g;
        let tf32 = precision == Precision::Tf32;
        let tol = if tf32 { 1e-3 } else { 1e-5 };
        let xg = self.normal_buf(batch * geom.in_len(), 1);
        let x0 = g.download_f32(&xg)[..geom.in_len()].to_vec();
        let w = rand(geom.weight_len(), 2, 0.1);
        let b = rand(geom.c_out, 3, 0.1);
        let (wg, bg) = (self.up(&w), self.up(&b));
        let mut yg = self.poisoned(batch * geom.out_len());
        let fwd = |y: &mut Buf| {
            if transposed {
                g.conv_t2d_fwd(&geom, batch, &xg, &wg, &bg, true, y)
            } else {
                g.conv2d_fwd(&geom, batch, &xg, &wg, &bg, true, y)
            }
        };
        fwd(&mut yg);
        // The CPU on image 0.
        let mut y0 = vec![0.0f32; geom.out_len()];
        if transposed {
            self.c.conv_t2d_fwd(&geom, 1, &x0, &w, &b, true, &mut y0);
        } else {
            self.c.conv2d_fwd(&geom, 1, &x0, &w, &b, true, &mut y0);
        }
        let e = self.check(&format!("{name} fwd"), &yg, &y0, tol);
        let positions = if transposed {
            geom.h_in * geom.w_in
        } else {
            geom.h_out * geom.w_out
        };
        let flops = 2.0 * (batch * positions * geom.c_in * geom.c_out * geom.k * geom.k) as f64;
        let bytes = 4.0 * (batch * (geom.in_len() + geom.out_len()) + geom.weight_len()) as f64;
        let shape = format!(
            "B={batch} {}×{}×{} → {}×{}×{}, k{} s{}",
            geom.h_in,
            geom.w_in,
            geom.c_in,
            geom.h_out,
            geom.w_out,
            geom.c_out,
            geom.k,
            geom.stride
        );
        let ms = self.time(|| fwd(&mut yg));
        let p = match (tf32, g.conv_tc_version()) {
            (true, v) => format!("tf32 v{v}"),
            (false, _) => "f32".into(),
        };
        self.row(
            &format!("{name} fwd ({p})"),
            &shape,
            Some(e),
            ms,
            flops,
            bytes,
            tf32,
        );
        if !tf32 && !self.emulated {
            // v1's weight-gradient kernels take seconds at these shapes (benches/NOTES.md).
            println!(
                "| {name} bwd (f32) | {shape} | | not timed: v1 dW is one block per weight | | | |"
            );
            return;
        }
        // Backward: dx checked on image 0 (it depends on that image only), dW and db by the
        // parity tests.
        let y0c = g.download_f32(&yg)[..geom.out_len()].to_vec();
        let dyg = self.normal_buf(batch * geom.out_len(), 4);
        let dy0 = g.download_f32(&dyg)[..geom.out_len()].to_vec();
        let mut dxg = g.alloc(batch * geom.in_len());
        let (mut dwg, mut dbg) = (g.alloc(w.len()), g.alloc(b.len()));
        let bwd = |dx: &mut Buf, dw: &mut Buf, db: &mut Buf| {
            if transposed {
                g.conv_t2d_bwd(&geom, batch, &xg, &wg, &yg, true, &dyg, Some(dx), dw, db)
            } else {
                g.conv2d_bwd(&geom, batch, &xg, &wg, &yg, true, &dyg, Some(dx), dw, db)
            }
        };
        bwd(&mut dxg, &mut dwg, &mut dbg);
        let mut dx0 = vec![0.0f32; geom.in_len()];
        let (mut dw0, mut db0) = (vec![0.0f32; w.len()], vec![0.0f32; b.len()]);
        if transposed {
            self.c.conv_t2d_bwd(
                &geom,
                1,
                &x0,
                &w,
                &y0c,
                true,
                &dy0,
                Some(&mut dx0),
                &mut dw0,
                &mut db0,
            );
        } else {
            self.c.conv2d_bwd(
                &geom,
                1,
                &x0,
                &w,
                &y0c,
                true,
                &dy0,
                Some(&mut dx0),
                &mut dw0,
                &mut db0,
            );
        }
        let e = self.check(&format!("{name} dx"), &dxg, &dx0, tol);
        let ms = self.time(|| bwd(&mut dxg, &mut dwg, &mut dbg));
        let bytes = 4.0 * (batch * (2 * geom.in_len() + 3 * geom.out_len())) as f64;
        self.row(
            &format!("{name} bwd dx+dW+db ({p})"),
            &shape,
            Some(e),
            ms,
            2.0 * flops,
            bytes,
            tf32,
        );
    }

    fn linear_layernorm(&self, rows: usize, d: usize) {
        let g = &self.g;
        let check_rows = rows.min(4096);
        let x = rand(rows * d, 5, 1.0);
        let w = rand(d * d, 6, 0.2);
        let b = rand(d, 7, 0.1);
        let (xg, wg, bg) = (self.up(&x), self.up(&w), self.up(&b));
        let mut yg = self.poisoned(rows * d);
        g.linear_fwd(rows, d, d, &xg, &wg, Some(&bg), true, &mut yg);
        let mut y0 = vec![0.0f32; check_rows * d];
        self.c.linear_fwd(
            check_rows,
            d,
            d,
            &x[..check_rows * d].to_vec(),
            &w,
            Some(&b),
            true,
            &mut y0,
        );
        let e = self.check("linear fwd", &yg, &y0, 1e-5);
        let shape = format!("{rows} rows, {d}→{d}");
        let flops = 2.0 * (rows * d * d) as f64;
        let ms = self.time(|| g.linear_fwd(rows, d, d, &xg, &wg, Some(&bg), true, &mut yg));
        self.row(
            "linear fwd + ReLU (f32)",
            &shape,
            Some(e),
            ms,
            flops,
            8.0 * (rows * d) as f64,
            false,
        );
        let dyg = self.rand_buf(rows * d, 8, 1.0);
        let (mut dxg, mut dwg, mut dbg) = (g.alloc(rows * d), g.alloc(d * d), g.alloc(d));
        let ms = self.time(|| {
            g.linear_bwd(
                rows,
                d,
                d,
                &xg,
                &wg,
                &yg,
                true,
                &dyg,
                Some(&mut dxg),
                &mut dwg,
                Some(&mut dbg),
            )
        });
        self.row(
            "linear bwd dx+dW+db (f32)",
            &shape,
            None,
            ms,
            2.0 * flops,
            16.0 * (rows * d) as f64,
            false,
        );
        let gamma = self.rand_buf(d, 9, 1.0);
        let (mut mean, mut rstd) = (g.alloc(rows), g.alloc(rows));
        let mut lg = self.poisoned(rows * d);
        let ones = vec![1.0f32; d];
        let zeros = vec![0.0f32; d];
        g.layernorm_fwd(
            rows,
            d,
            &xg,
            &self.up(&ones),
            &self.up(&zeros),
            &mut lg,
            &mut mean,
            &mut rstd,
        );
        let (mut l0, mut m0, mut r0) = (
            vec![0.0f32; check_rows * d],
            vec![0.0f32; check_rows],
            vec![0.0f32; check_rows],
        );
        self.c.layernorm_fwd(
            check_rows,
            d,
            &x[..check_rows * d].to_vec(),
            &ones,
            &zeros,
            &mut l0,
            &mut m0,
            &mut r0,
        );
        let e = self.check("layernorm fwd", &lg, &l0, 1e-5);
        let shape = format!("{rows} × {d}");
        let ms =
            self.time(|| g.layernorm_fwd(rows, d, &xg, &gamma, &bg, &mut lg, &mut mean, &mut rstd));
        self.row(
            "layernorm fwd (f32)",
            &shape,
            Some(e),
            ms,
            0.0,
            8.0 * (rows * d) as f64,
            false,
        );
        let (mut dgam, mut dbet) = (g.alloc(d), g.alloc(d));
        let ms = self.time(|| {
            g.layernorm_bwd(
                rows, d, &xg, &gamma, &mean, &rstd, &dyg, &mut dxg, &mut dgam, &mut dbet,
            )
        });
        self.row(
            "layernorm bwd (f32)",
            &shape,
            None,
            ms,
            0.0,
            16.0 * (rows * d) as f64,
            false,
        );
    }

    /// The slot cell's per-slot work around the attention (LayerNorm + q; GRU, LayerNorm,
    /// residual MLP with dropout): the fused kernels against the same ops run one by one.
    fn slot_cell(&self, rows: usize, d: usize, hidden: usize) {
        let g = &self.g;
        let dims = SlotCellDims { rows, d, hidden };
        let host: Vec<Vec<f32>> = slotcell::param_lens(&dims)
            .iter()
            .enumerate()
            .map(|(i, &n)| rand(n, 60 + i as u64, 0.3))
            .collect();
        let dev: Vec<Buf> = host.iter().map(|v| self.up(v)).collect();
        let mask = DropoutMask {
            rng: Philox::new(61),
            stream: 7,
            step: 3,
            p: 0.1,
        };
        let (slots, upd) = (rand(rows * d, 62, 1.0), rand(rows * d, 63, 1.0));
        let (slots_g, upd_g) = (self.up(&slots), self.up(&upd));
        let lens = slotcell::out_lens(&dims);
        let mut got: Vec<Buf> = lens.iter().map(|&n| self.poisoned(n)).collect();
        let mut want: Vec<Vec<f32>> = lens.iter().map(|&n| vec![0.0; n]).collect();
        let m = Some(&mask);
        let run = |by_ops: bool, o: &mut [Buf]| {
            slotcell::slot_cell_fwd_flat(g, by_ops, &dims, &dev, &slots_g, &upd_g, m, o)
        };
        run(false, &mut got);
        slotcell::slot_cell_fwd_flat(&self.c, false, &dims, &host, &slots, &upd, m, &mut want);
        let e = self.check("slot cell out", &got[11], &want[11], 1e-5);
        let shape = format!("{rows} slots, d {d}, hidden {hidden}");
        let fl = 2.0 * (rows * (d * d + 6 * d * d + 2 * d * hidden)) as f64;
        let weights: usize = slotcell::param_lens(&dims).iter().sum();
        let by = 4.0 * (lens.iter().sum::<usize>() + 2 * rows * d + weights) as f64;
        let ms = self.time(|| run(false, &mut got));
        let name = "slot cell q + update, fused (f32)";
        self.row(name, &shape, Some(e), ms, fl, by, false);
        let ms = self.time(|| run(true, &mut got));
        let name = "slot cell q + update, op by op";
        self.row(name, &shape, None, ms, fl, by, false);
        // Backward, from the forward's outputs, into zeroed gradients.
        let (d_out_h, dq_h) = (rand(rows * d, 64, 1.0), rand(rows * d, 65, 1.0));
        let (d_out, dq) = (self.up(&d_out_h), self.up(&dq_h));
        let sl = slotcell::scratch_lens(&dims);
        let mut scratch: Vec<Buf> = sl.iter().map(|&n| g.alloc(n)).collect();
        let (mut d_upd, mut d_in) = (self.poisoned(rows * d), g.alloc(rows * d));
        let pl = slotcell::param_lens(&dims);
        let mut grads: Vec<Buf> = pl.iter().map(|&n| g.alloc(n)).collect();
        let bwd = |by_ops: bool,
                   scratch: &mut [Buf],
                   d_upd: &mut Buf,
                   d_in: &mut Buf,
                   grads: &mut [Buf]| {
            slotcell::slot_cell_bwd_flat(
                g, by_ops, &dims, &dev, &got, &slots_g, &upd_g, m, &d_out, &dq, scratch, d_upd,
                d_in, grads,
            )
        };
        bwd(false, &mut scratch, &mut d_upd, &mut d_in, &mut grads);
        let mut sc: Vec<Vec<f32>> = sl.iter().map(|&n| vec![0.0; n]).collect();
        let (mut d_upd_h, mut d_in_h) = (vec![0.0; rows * d], vec![0.0; rows * d]);
        let mut grads_h: Vec<Vec<f32>> = pl.iter().map(|&n| vec![0.0; n]).collect();
        slotcell::slot_cell_bwd_flat(
            &self.c,
            false,
            &dims,
            &host,
            &want,
            &slots,
            &upd,
            m,
            &d_out_h,
            &dq_h,
            &mut sc,
            &mut d_upd_h,
            &mut d_in_h,
            &mut grads_h,
        );
        let e = [
            self.check("slot cell bwd d_upd", &d_upd, &d_upd_h, 1e-5),
            self.check("slot cell bwd d_in", &d_in, &d_in_h, 1e-5),
            self.check("slot cell bwd dW_ih", &grads[3], &grads_h[3], 1e-5),
        ]
        .into_iter()
        .fold(0.0, f64::max);
        let (bfl, bby) = (2.0 * fl, 2.0 * by);
        let ms = self.time(|| bwd(false, &mut scratch, &mut d_upd, &mut d_in, &mut grads));
        let name = "slot cell bwd (update + q), fused (f32)";
        self.row(name, &shape, Some(e), ms, bfl, bby, false);
        let ms = self.time(|| bwd(true, &mut scratch, &mut d_upd, &mut d_in, &mut grads));
        let name = "slot cell bwd (update + q), op by op";
        self.row(name, &shape, None, ms, bfl, bby, false);
    }

    /// The per-token chain (position embedding, LayerNorm, 2-layer MLP, LayerNorm, k and v):
    /// the fused kernels against the same chain run op by op on the same device, at the
    /// backend's precision (the fused version: 2 under TF32, 1 under f32).
    /// The token chain fused and op by op; with a `note` (e.g. ", dw_k1 off": a fast path of
    /// the rows' backend switched off) the fused rows only, labelled with it. With `kv` false
    /// the chain ends at u (the fold: no k, v; the backward from d u).
    fn tokens(&self, batch: usize, res: usize, ch: usize, kv: bool, note: &str) {
        let g = &self.g;
        let (version, tol) = match g.precision() {
            Precision::F32 => ("v1 (f32)", 1e-5),
            Precision::Tf32 => ("v2 (tf32)", 1e-3),
        };
        // The "of peak" column: TF32 for the tensor-core version.
        let tc = g.precision() == Precision::Tf32;
        // (Version 3 replaces version 2 unless `tokens_v3` is off.)
        let version = if tc && g.fast_paths().tokens_v3 {
            format!("v3 (tf32){note}")
        } else {
            format!("{version}{note}")
        };
        let dims = TokenDims {
            batch,
            h: res,
            w: res,
            c: ch,
            feat: ch,
            d: ch,
            kv,
        };
        let (rows, c, f, d) = (dims.rows(), ch, ch, ch);
        let outs = if kv { 2 } else { 0 };
        let lens = [4 * c, c, c, c, f * c, f, f * f, f, f, f, d * f, d * f];
        let host: Vec<Vec<f32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| rand(n, 40 + i as u64, if i >= 4 { 0.2 } else { 1.0 }))
            .collect();
        let dev: Vec<Buf> = host.iter().map(|v| self.up(v)).collect();
        let pg = TokenParams::from_flat(&dev, c, f);
        // Spot check on the first image (the chain is per token: its rows need nothing else).
        let one = TokenDims { batch: 1, ..dims };
        let head = |b: &Buf, n: usize| g.download_f32(b)[..n].to_vec();
        let enc = self.normal_buf(rows * c, 51);
        let enc0 = head(&enc, one.rows() * c);
        let mut acts = TokenActs::new(g, &dims, 2);
        g.fill_value(&mut acts.v, f32::NAN);
        g.fill_value(&mut acts.ln_in, f32::NAN);
        g.tokens_fwd(&dims, &pg, &enc, &mut acts);
        let mut want = TokenActs::new(&self.c, &one, 2);
        self.c
            .tokens_fwd(&one, &TokenParams::from_flat(&host, c, f), &enc0, &mut want);
        let e = if kv {
            self.check("tokens fwd v", &acts.v, &want.v, tol)
        } else {
            self.check("tokens fwd u", &acts.ln_in, &want.ln_in, tol)
        };
        let shape = if kv {
            format!("{rows} tokens, {c}→{f}→{f}→2×{d}")
        } else {
            format!("{rows} tokens, {c}→{f}→{f}, u only")
        };
        let fl = 2.0 * (rows * (c * f + f * f + outs * f * d)) as f64;
        let by = 4.0 * (rows * (3 * c + 3 * f + outs * d + 4)) as f64;
        let ms = self.time(|| g.tokens_fwd(&dims, &pg, &enc, &mut acts));
        self.row(
            &format!("tokens fwd, fused {version}"),
            &shape,
            Some(e),
            ms,
            fl,
            by,
            tc,
        );
        if note.is_empty() {
            let ms = self.time(|| tokens_fwd_by_ops(g, &dims, &pg, &enc, &mut acts));
            let name = format!("tokens fwd, op by op ({:?})", g.precision());
            self.row(&name, &shape, None, ms, fl, by, tc);
        }
        // Backward (from d k and d v, or d u).
        let dk = self.normal_buf(rows * if kv { d } else { f }, 52);
        let dv = self.normal_buf(if kv { rows * d } else { 0 }, 53);
        let up = |dk, dv| match kv {
            true => TokenOutGrads::Kv { dk, dv },
            false => TokenOutGrads::U(dk),
        };
        let mut gd: Vec<Buf> = lens.iter().map(|&n| g.alloc(n)).collect();
        let mut da = TokenGradActs::new(g, &dims, 2, true);
        g.fill_value(&mut da.d_enc_pos, f32::NAN);
        g.tokens_bwd(
            &dims,
            &pg,
            &acts,
            up(&dk, &dv),
            &mut da,
            &mut TokenGrads::from_flat(&mut gd),
        );
        let saved = TokenActs {
            enc_pos: head(&acts.enc_pos, one.rows() * c),
            ln0: head(&acts.ln0, one.rows() * c),
            ln0_mean: head(&acts.ln0_mean, one.rows()),
            ln0_rstd: head(&acts.ln0_rstd, one.rows()),
            mlp_act: acts
                .mlp_act
                .iter()
                .map(|b| head(b, one.rows() * f))
                .collect(),
            ln_in: head(&acts.ln_in, one.rows() * f),
            ln_in_mean: head(&acts.ln_in_mean, one.rows()),
            ln_in_rstd: head(&acts.ln_in_rstd, one.rows()),
            k: head(&acts.k, one.rows() * d * outs / 2),
            v: head(&acts.v, one.rows() * d * outs / 2),
        };
        let mut gh: Vec<Vec<f32>> = lens.iter().map(|&n| vec![0.0; n]).collect();
        let mut dc = TokenGradActs::new(&self.c, &one, 2, true);
        let (dk0, dv0) = (
            head(&dk, one.rows() * if kv { d } else { f }),
            head(&dv, one.rows() * d * outs / 2),
        );
        self.c.tokens_bwd(
            &one,
            &TokenParams::from_flat(&host, c, f),
            &saved,
            match kv {
                true => TokenOutGrads::Kv { dk: &dk0, dv: &dv0 },
                false => TokenOutGrads::U(&dk0),
            },
            &mut dc,
            &mut TokenGrads::from_flat(&mut gh),
        );
        let e = self.check("tokens bwd d enc", &da.d_enc_pos, &dc.d_enc_pos, tol);
        let ms = self.time(|| {
            g.tokens_bwd(
                &dims,
                &pg,
                &acts,
                up(&dk, &dv),
                &mut da,
                &mut TokenGrads::from_flat(&mut gd),
            )
        });
        self.row(
            &format!("tokens bwd, fused {version} + dW GEMMs"),
            &shape,
            Some(e),
            ms,
            2.0 * fl,
            by,
            tc,
        );
        if !note.is_empty() {
            return;
        }
        let ms = self.time(|| {
            tokens_bwd_by_ops(
                g,
                &dims,
                &pg,
                &acts,
                up(&dk, &dv),
                &mut da,
                &mut TokenGrads::from_flat(&mut gd),
            )
        });
        self.row(
            &format!("tokens bwd, op by op ({:?})", g.precision()),
            &shape,
            None,
            ms,
            2.0 * fl,
            by,
            tc,
        );
    }

    /// The attention step's kernels at one shape; `version` labels the rows (the backend's fast
    /// paths choose what runs). Then the same with k and v one tensor (u, under the fold),
    /// labelled `kv_version`; with `kv_only`, those rows alone.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        version: &str,
        kv_version: &str,
        kv_only: bool,
        batch: usize,
        n: usize,
        k: usize,
        d: usize,
    ) {
        let g = &self.g;
        let dm = AttnDims {
            batch,
            n,
            k,
            d,
            heads: 1,
            scale: 1.0 / (d as f64).sqrt(),
            eps: 1e-8,
        };
        let kk = rand(batch * n * d, 10, 1.0);
        let v = rand(batch * n * d, 11, 1.0);
        let q = rand(batch * k * d, 12, 1.0);
        let (kg, vg, qg) = (self.up(&kk), self.up(&v), self.up(&q));
        let mut attn = self.poisoned(dm.attn_len());
        let mut upd = self.poisoned(batch * k * d);
        let d1 = AttnDims { batch: 1, ..dm };
        let (mut a0, mut u0) = (vec![0.0f32; d1.attn_len()], vec![0.0f32; k * d]);
        let shape = format!("B={batch} N={n} K={k} D={d}");
        let dupd = self.rand_buf(batch * k * d, 13, 1.0);
        let (mut dk, mut dv, mut dq) = (g.alloc(kk.len()), g.alloc(v.len()), g.alloc(q.len()));
        if !kv_only {
            g.attention_fwd(&dm, &kg, &vg, &qg, &mut attn, &mut upd);
            self.c.attention_fwd(
                &d1,
                &kk[..n * d].to_vec(),
                &v[..n * d].to_vec(),
                &q[..k * d].to_vec(),
                &mut a0,
                &mut u0,
            );
            let e = self.check(&format!("attention fwd upd ({version})"), &upd, &u0, 1e-5);
            let bytes = 4.0 * (2 * batch * n * d + dm.attn_len()) as f64;
            let ms = self.time(|| g.attention_fwd(&dm, &kg, &vg, &qg, &mut attn, &mut upd));
            self.row(
                &format!("attention fwd (f32 {version})"),
                &shape,
                Some(e),
                ms,
                0.0,
                bytes,
                false,
            );
            let ms = self.time(|| {
                g.attention_bwd(&dm, &kg, &vg, &qg, &attn, &dupd, &mut dk, &mut dv, &mut dq)
            });
            self.row(
                &format!("attention bwd (f32 {version})"),
                &shape,
                None,
                ms,
                0.0,
                2.0 * bytes + 8.0 * (batch * n * d) as f64,
                false,
            );
        }
        // k and v the same tensor (u, under the fold): one tensor's bytes read, and the
        // backward's d k + d v into one.
        g.fill_value(&mut upd, f32::NAN);
        g.attention_fwd(&dm, &kg, &kg, &qg, &mut attn, &mut upd);
        let k0 = kk[..n * d].to_vec();
        self.c
            .attention_fwd(&d1, &k0, &k0, &q[..k * d].to_vec(), &mut a0, &mut u0);
        let e = self.check(
            &format!("attention fwd upd, k = v ({kv_version})"),
            &upd,
            &u0,
            1e-5,
        );
        let bytes = 4.0 * (batch * n * d + dm.attn_len()) as f64;
        let ms = self.time(|| g.attention_fwd(&dm, &kg, &kg, &qg, &mut attn, &mut upd));
        self.row(
            &format!("attention fwd (f32 {kv_version}), k = v"),
            &shape,
            Some(e),
            ms,
            0.0,
            bytes,
            false,
        );
        let ms =
            self.time(|| g.attention_bwd_same_kv(&dm, &kg, &qg, &attn, &dupd, &mut dk, &mut dq));
        self.row(
            &format!("attention bwd (f32 {kv_version}), k = v"),
            &shape,
            None,
            ms,
            0.0,
            2.0 * bytes + 4.0 * (batch * n * d) as f64,
            false,
        );
    }

    /// The whole training step of a config; `graph` sets `Training.cuda_graph`.
    /// The training step of a config, at batch size `batch` (default: the config's); with
    /// `kernels`, then where its device time goes, kernel by kernel.
    fn step(&self, cfg_path: &str, batch: Option<usize>, steps: usize, graph: bool, kernels: bool) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(cfg_path);
        let mut cfg = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        cfg.training.cuda_graph = graph;
        if let Some(b) = batch {
            cfg.training.batch_size = b;
        }
        if self.emulated {
            cfg.training.batch_size = 2;
        }
        let be = if self.emulated {
            Cuda::emulated()
        } else {
            Cuda::new(0)
        }
        .unwrap_or_else(|e| panic!("{e}"))
        .with_precision(cfg.model.precision)
        // As `slotfix bench` does: SLOTFIX_CUDA_DISABLE switches fast paths off.
        .with_fast_paths(FastPaths::from_env().unwrap_or_else(|e| panic!("{e}")));
        if self.emulated {
            // One step of the real config is hours in the emulator: the tiny config only.
            if cfg.model.resolution > 16 {
                println!("\n(whole step of {cfg_path}: not run in the emulator)");
                return;
            }
        }
        let r = slotfix::bench::bench_step(be, &cfg, steps, kernels);
        println!("\n{cfg_path}:\n{}", r.table());
        match r.kernels {
            Some(Ok(k)) => println!("\n{}", k.table()),
            Some(Err(e)) => println!("\n(kernel times not read: {e})"),
            None => {}
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let emulated = args.iter().any(|a| a == "--emulate");
    let reps = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let g = if emulated {
        Cuda::emulated()
    } else {
        Cuda::new(0)
    };
    let g = match g {
        Ok(g) => g,
        Err(e) => {
            println!("kernel benchmark: no CUDA device ({e}); nothing timed");
            let required = std::env::var("SLOTFIX_REQUIRE_GPU").is_ok_and(|v| v == "1");
            std::process::exit(if required { 1 } else { 0 });
        }
    };
    let mut b = Bench {
        g,
        c: Cpu::new(),
        emulated,
        reps,
        bw: None,
        tf32: None,
    };
    // (Hopper's wgmma peak, the ceiling of the wgmma convolutions and weight gradients; and what
    // L2 serves the SMs, which those passes read their weights or operands from at several
    // TB/s: the bound benches/NOTES.md expects for them.)
    let (mut wgmma, mut l2) = (None, None);
    if !emulated {
        let n = 1usize << 28; // 1 GiB of f32
        let (src, mut dst) = (b.g.alloc(n), b.g.alloc(n));
        // A peak that cannot be measured leaves its "of peak" column empty; the table goes on.
        let report = |what: &str, e: String| println!("({what} not measured: {e})");
        b.bw = match b.g.time_ms(reps, || b.g.copy(&src, &mut dst)) {
            Ok(ms) => Some(2.0 * 4.0 * n as f64 / ms / 1e6),
            Err(e) => {
                report("copy bandwidth", e);
                None
            }
        };
        b.tf32 =
            b.g.measure_tf32_peak()
                .map_err(|e| report("TF32 peak", e))
                .ok();
        wgmma =
            b.g.measure_wgmma_tf32_peak()
                .map_err(|e| report("TF32 wgmma peak", e))
                .ok();
        l2 =
            b.g.measure_l2_read_bw()
                .map_err(|e| report("L2 read bandwidth", e))
                .ok();
    }
    println!(
        "CUDA kernels on {} ({}); measured peaks: copy {} GB/s, TF32 mma.sync {} TFLOP/s (TF32 \
         wgmma m64n128k8: {} TFLOP/s; L2 reads {} GB/s); mean of {reps} runs\n",
        b.g.device_name(),
        b.g.arch(),
        b.bw.map_or("-".into(), |v| format!("{v:.0}")),
        b.tf32.map_or("-".into(), |v| format!("{v:.0}")),
        wgmma.map_or("-".into(), |v| format!("{v:.0}")),
        l2.map_or("-".into(), |v| format!("{v:.0}")),
    );
    println!(
        "(\"tf32 v3\": every fast path of the tensor-core convolutions on (versions 3, 4 and 5 and \
         `conv_c4` where the channel counts allow them, version 2 elsewhere); \"tf32 v2\": \
         version 2 everywhere)\n"
    );
    println!("| kernel | shape | check vs CPU | ms | TFLOP/s | GB/s | of peak |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | --- |");
    // (batch, resolution, channels, decoder images, tokens)
    let (batch, res, ch, dec_imgs) = if emulated {
        (2, 16, 8, 3)
    } else {
        (64, 128, 64, 448)
    };
    // The convolutions of the 128² model: TF32 with version 3 of the tensor-core passes (the
    // default), then version 2; the exact-f32 kernels (the slowest) come last, so that a time
    // limit cuts them rather than the rest of the table.
    // A second backend with another precision (and version of the tensor-core convolutions).
    let bench_with = |precision: Precision, version: u8| {
        let g = if emulated {
            Cuda::emulated()
        } else {
            Cuda::new(0)
        }
        .unwrap();
        Bench {
            g: g.with_precision(precision).with_conv_tc_version(version),
            c: Cpu::new(),
            emulated,
            reps,
            bw: b.bw,
            tf32: b.tf32,
        }
    };
    // A conv row again with some fast paths off (`off`, a SLOTFIX_CUDA_DISABLE list; TF32,
    // version 3 only), beside the row with every path on: e.g. `conv_wgmma` off, version 6's
    // (or at stride 2 `v5s2`'s) mma.sync against version 7's wgmma.
    let conv_off_row = |precision: Precision,
                        version: u8,
                        name: &str,
                        off: &str,
                        geom: ConvGeom,
                        imgs,
                        transposed: bool| {
        if precision != Precision::Tf32 || version != 3 {
            return;
        }
        let name = format!("{name}, {} off", off.replace(',', " and "));
        guarded(&name, || {
            let bp = bench_with(precision, version);
            let fast = FastPaths::all_but(off).unwrap();
            Bench {
                g: bp.g.with_fast_paths(fast),
                ..bp
            }
            .conv(&name, geom, imgs, transposed, precision)
        });
    };
    let conv_v6_row =
        |precision: Precision, version: u8, name: &str, geom: ConvGeom, imgs, transposed| {
            conv_off_row(
                precision,
                version,
                name,
                "conv_wgmma",
                geom,
                imgs,
                transposed,
            )
        };
    let conv_rows = |precision: Precision, version: u8| {
        let bp = bench_with(precision, version);
        guarded(&format!("encoder conv ({precision:?} v{version})"), || {
            bp.conv(
                "encoder conv",
                ConvGeom::same(res, res, ch, ch, 5),
                batch,
                false,
                precision,
            )
        });
        conv_v6_row(
            precision,
            version,
            "encoder conv",
            ConvGeom::same(res, res, ch, ch, 5),
            batch,
            false,
        );
        // (Its weight gradient on version 5's mma.sync: `dw_wgmma` off.)
        conv_off_row(
            precision,
            version,
            "encoder conv",
            "dw_wgmma",
            ConvGeom::same(res, res, ch, ch, 5),
            batch,
            false,
        );
        guarded(
            &format!("decoder convT s2 ({precision:?} v{version})"),
            || {
                bp.conv(
                    "decoder convT s2",
                    ConvGeom::transposed(res / 2, res / 2, ch, ch, 5, 2, 2, 1),
                    dec_imgs,
                    true,
                    precision,
                )
            },
        );
        conv_v6_row(
            precision,
            version,
            "decoder convT s2",
            ConvGeom::transposed(res / 2, res / 2, ch, ch, 5, 2, 2, 1),
            dec_imgs,
            true,
        );
        guarded(
            &format!("decoder convT s1 ({precision:?} v{version})"),
            || {
                bp.conv(
                    "decoder convT s1",
                    ConvGeom::transposed(res, res, ch, ch, 5, 1, 2, 0),
                    dec_imgs,
                    true,
                    precision,
                )
            },
        );
        conv_v6_row(
            precision,
            version,
            "decoder convT s1",
            ConvGeom::transposed(res, res, ch, ch, 5, 1, 2, 0),
            dec_imgs,
            true,
        );
        conv_off_row(
            precision,
            version,
            "decoder convT s1",
            "dw_wgmma",
            ConvGeom::transposed(res, res, ch, ch, 5, 1, 2, 0),
            dec_imgs,
            true,
        );
        // The first and last layers of the 128² model, whose gathers have 3 and 4 channels
        // (version 5 with two taps per k-step, `conv_c4`, where version 3 applies): the
        // encoder's first conv (its dx is timed too, though training never computes it), and
        // the decoder's 3×3 convT to RGB + alpha.
        guarded(
            &format!("encoder first conv ({precision:?} v{version})"),
            || {
                bp.conv(
                    "encoder first conv",
                    ConvGeom::same(res, res, 3, ch, 5),
                    batch,
                    false,
                    precision,
                )
            },
        );
        // The first layer's dW and the last layer's forward and dW as before `dw_c4_tc` and
        // `conv_n8s` (f32 FMAs, version 5's `v5n8`), beside the rows with them on.
        conv_off_row(
            precision,
            version,
            "encoder first conv",
            "dw_c4_tc",
            ConvGeom::same(res, res, 3, ch, 5),
            batch,
            false,
        );
        guarded(
            &format!("decoder last convT ({precision:?} v{version})"),
            || {
                bp.conv(
                    "decoder last convT",
                    ConvGeom::transposed(res, res, ch, 4, 3, 1, 1, 0),
                    dec_imgs,
                    true,
                    precision,
                )
            },
        );
        conv_off_row(
            precision,
            version,
            "decoder last convT",
            "conv_n8s,dw_c4_tc",
            ConvGeom::transposed(res, res, ch, 4, 3, 1, 1, 0),
            dec_imgs,
            true,
        );
        // The small model's 32-channel decoder conv (35×35, B·K = 64·4 slot images): the
        // narrow tiles.
        let (small_res, small_imgs) = if emulated { (9, 2) } else { (35, 256) };
        guarded(
            &format!("small decoder conv 32ch ({precision:?} v{version})"),
            || {
                bp.conv(
                    "small decoder conv 32ch",
                    ConvGeom::same(small_res, small_res, 32, 32, 5),
                    small_imgs,
                    false,
                    precision,
                )
            },
        );
        conv_off_row(
            precision,
            version,
            "small decoder conv 32ch",
            "conv_v6,dw_units",
            ConvGeom::same(small_res, small_res, 32, 32, 5),
            small_imgs,
            false,
        );
    };
    conv_rows(Precision::Tf32, 3);
    conv_rows(Precision::Tf32, 2);
    guarded("linear + LayerNorm", || {
        b.linear_layernorm(batch * res * res, ch)
    });
    // The token chain's tile products: version 3 on the TF32 tensor cores (the default
    // precision) and version 1 (exact f32), each beside the same chain op by op.
    guarded("tokens (tf32)", || {
        bench_with(Precision::Tf32, 3).tokens(batch, res, ch, true, "")
    });
    // Under the fold (`kv_fold`, the default where the model allows it) the chain ends at u.
    guarded("tokens (tf32), u only", || {
        bench_with(Precision::Tf32, 3).tokens(batch, res, ch, false, ", u only (kv_fold)")
    });
    // The fused rows again with one path off: `dw_k1` (its four weight gradients on version 3,
    // as before it), `tokens_v3` (version 2, which version 3 replaced).
    for off in ["dw_k1", "tokens_v3"] {
        guarded(&format!("tokens (tf32), {off} off"), || {
            let bp = bench_with(Precision::Tf32, 3);
            Bench {
                g: bp.g.with_fast_paths(FastPaths::all_but(off).unwrap()),
                ..bp
            }
            .tokens(batch, res, ch, true, &format!(", {off} off"))
        });
    }
    guarded("tokens (f32)", || b.tokens(batch, res, ch, true, ""));
    // Version 3 (the slot count compiled in; the default) and version 2, both checked first.
    guarded("attention v3", || {
        b.attention("v3", "v4", false, batch, res * res, 7, ch)
    });
    // k = v on version 3 (version 4 off), then version 2 (both off).
    for (off, version, kv_only) in [
        ("attention_v4", "v3", true),
        ("attention_v3,attention_v4", "v2", false),
    ] {
        guarded(&format!("attention {version}"), || {
            let bp = bench_with(Precision::F32, 3);
            Bench {
                g: bp.g.with_fast_paths(FastPaths::all_but(off).unwrap()),
                ..bp
            }
            .attention(version, version, kv_only, batch, res * res, 7, ch)
        });
    }
    // The slot cell at clevr6's B·K = 448 slots (the small model: 256) of width 64, MLP 128.
    let (slot_rows, slot_d) = if emulated { (21, 8) } else { (batch * 7, 64) };
    guarded("slot cell", || b.slot_cell(slot_rows, slot_d, 2 * slot_d));
    // The small model with and without the captured step (what the graph saves in launches),
    // at performance.md's B = 64.
    let small_steps = if emulated { 1 } else { 20 };
    guarded("tetrominoes step", || {
        b.step(
            "configs/tetrominoes.yaml",
            Some(64),
            small_steps,
            false,
            false,
        )
    });
    guarded("tetrominoes step, CUDA graph", || {
        b.step(
            "configs/tetrominoes.yaml",
            Some(64),
            small_steps,
            true,
            true,
        )
    });
    guarded("clevr6 step", || {
        b.step("configs/clevr6.yaml", None, 10, true, true)
    });
    conv_rows(Precision::F32, 3);
}

/// Run one part of the table; if it panics (a kernel that fails its check against the CPU, or a
/// CUDA error), print a FAILED row and go on, so that one broken kernel does not cost the rest of
/// the table. (After a CUDA error the context may be unusable: the later parts then fail too,
/// each with its own row.)
fn guarded(what: &str, f: impl FnOnce()) {
    if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into());
        let msg = msg.replace('|', "/").replace('\n', " ");
        println!("| {what} | FAILED: {msg} | | | | | |");
    }
}
