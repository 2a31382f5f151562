//! Whole-model gradient checks in f64: the hand-written backward of every parameter tensor
//! against central finite differences of the loss, in both gradient modes, with one and several
//! heads, with dropout, and for both decoder kinds; plus the semantics of implicit
//! differentiation (equal to BPTT through one step from the same fixed slots; no gradient for
//! mu / log_sigma; saved memory independent of the iteration count). And the fold (slot attention
//! on u with Wk, Wv folded into the cell's weights, as the CUDA backend runs it): the same loss
//! and gradients as the plain model, and its own gradients against finite differences.

use slotfix::backend::Backend;
use slotfix::config::{Config, ModelConfig};
use slotfix::cpu::Cpu;
use slotfix::model::{Model, Pass, SlotsFrom, Workspace};
use slotfix::rng::Philox;

type Be = Cpu<f64>;

/// A tiny model: 8×8 images, 2 encoder convs, K = 3, D = 4, broadcast decoder 2 → 4 → 8;
/// `edit` changes it, and the result is validated like a user's config.
fn tiny(edit: impl FnOnce(&mut ModelConfig)) -> ModelConfig {
    let yaml = "Model:\n  num_slots: 3\n  num_heads: 1\n  num_layers: 2\n  feat_size: 6\n  slot_size: 4\n  \
         mlp_hidden_size: 5\n  max_iter_fwd: 2\n  resolution: 8\n  encoder_channels: [3, 4]\n  \
         decoder: broadcast\n  decoder_init_size: 2\n  decoder_channels: [4, 3, 3]\n\
         Training:\n  data_type: tetrominoes\n";
    let mut cfg = Config::from_yaml(yaml).unwrap_or_else(|e| panic!("{e}"));
    edit(&mut cfg.model);
    cfg.validate().unwrap_or_else(|e| panic!("{e}"));
    cfg.model
}

const BATCH: usize = 2;
const STEP: u64 = 5;
/// Relative L2 error allowed per parameter tensor (see the choice of h in `check_model`).
const TOL: f64 = 1e-5;

fn setup(cfg: &ModelConfig) -> (Be, Model<Be>, Workspace<Vec<f64>>) {
    setup_on(Be::new(), cfg)
}

fn setup_on(be: Be, cfg: &ModelConfig) -> (Be, Model<Be>, Workspace<Vec<f64>>) {
    let mut model = Model::new(&be, cfg, 11);
    // Biases start at zero, which puts the pre-activations of dead regions exactly on a ReLU
    // kink, where finite differences are meaningless. Move every tensor off its initial value.
    let jitter = Philox::new(12);
    for (t, p) in model.params.iter_mut().enumerate() {
        for (i, v) in p.iter_mut().enumerate() {
            *v += 0.1 * (2.0 * jitter.uniform(7, t as u32, i as u64) - 1.0);
        }
    }
    let mut ws = model.workspace(&be, BATCH);
    let rng = Philox::new(3);
    let n = be.len(&ws.image);
    let img: Vec<f64> = (0..n)
        .map(|i| 2.0 * rng.uniform(50, 0, i as u64) - 1.0)
        .collect();
    be.upload_f64(&img, &mut ws.image);
    (be, model, ws)
}

fn loss_at(be: &Be, model: &Model<Be>, ws: &mut Workspace<Vec<f64>>, init: SlotsFrom) -> f64 {
    model.forward(be, ws, Pass::Train { step: STEP }, init);
    model.loss(be, ws)
}

/// Analytic gradients (from the ordinary forward with slot noise) against finite differences of
/// the function they are the gradient of: the full loss for BPTT; the loss with the detached
/// slots held fixed for implicit differentiation.
fn check_model(cfg: &ModelConfig, tol: f64) {
    check_model_on(Be::new(), cfg, tol)
}

fn check_model_on(be: Be, cfg: &ModelConfig, tol: f64) {
    let (be, mut model, mut ws) = setup_on(be, cfg);
    model.forward(&be, &mut ws, Pass::Train { step: STEP }, SlotsFrom::Noise);
    model.zero_grads(&be);
    model.backward(&be, &mut ws, STEP, SlotsFrom::Noise);
    let analytic: Vec<Vec<f64>> = model.grads.iter().map(|g| be.download(g)).collect();
    let init = if cfg.implicit_diff {
        let fixed = model.detached_slots(&be, &ws);
        model.set_initial_slots(&be, &mut ws, &fixed);
        SlotsFrom::Detached
    } else {
        SlotsFrom::Noise
    };
    // h balances truncation (∝ h²) and ReLU kinks within ±h (more likely as h grows) against
    // rounding (∝ 1/h): at 3e-6 the rounding error of a loss of order 1 in f64 is about 1e-11,
    // i.e. ~1e-6 relative for the smallest gradients here; hence the whole-model tolerance 1e-5
    // (each op alone is checked to 1e-6 in its own tests).
    let h = 3e-6;
    let pick = Philox::new(77);
    let specs = model.arch.specs.clone();
    let mut worst = (0.0f64, String::new());
    for (t, spec) in specs.iter().enumerate() {
        let n = spec.numel();
        // Every element of small tensors, 24 random ones of large tensors.
        let idx: Vec<usize> = if n <= 24 {
            (0..n).collect()
        } else {
            (0..24)
                .map(|j| pick.below(1, t as u32, j, n as u64) as usize)
                .collect()
        };
        let mut fd = Vec::new();
        let mut an = Vec::new();
        for &i in &idx {
            let orig = model.params[t][i];
            model.params[t][i] = orig + h;
            let lp = loss_at(&be, &model, &mut ws, init);
            model.params[t][i] = orig - h;
            let lm = loss_at(&be, &model, &mut ws, init);
            model.params[t][i] = orig;
            fd.push((lp - lm) / (2.0 * h));
            an.push(analytic[t][i]);
        }
        let num: f64 = fd
            .iter()
            .zip(&an)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let den: f64 = fd.iter().map(|a| a * a).sum::<f64>().sqrt();
        assert!(num.is_finite(), "{}: NaN", spec.name);
        let is_slot_prior = spec.name.contains("slots_mu") || spec.name.contains("slots_log_sigma");
        if cfg.implicit_diff && is_slot_prior {
            assert!(
                an.iter().all(|&g| g == 0.0),
                "{}: implicit mode must give exactly zero",
                spec.name
            );
            assert!(
                den == 0.0,
                "{}: the surrogate loss does not depend on it",
                spec.name
            );
            continue;
        }
        let an_max = an.iter().fold(0.0f64, |m, g| m.max(g.abs()));
        if den < 1e-9 && an_max < 1e-9 {
            // A true zero: e.g. the bias of the slot LayerNorm shifts every slot's query by the
            // same vector, to which the softmax over slots is invariant.
            continue;
        }
        if num / den > worst.0 {
            worst = (num / den, spec.name.clone());
        }
        assert!(
            num / den < tol,
            "{}: relative error {:.3e} (|fd| {den:.3e})",
            spec.name,
            num / den
        );
    }
    eprintln!(
        "worst relative error {:.2e} ({}) over {} tensors",
        worst.0,
        worst.1,
        specs.len()
    );
}

#[test]
fn gradcheck_bptt_one_head() {
    check_model(&tiny(|m| m.implicit_diff = false), TOL);
}

#[test]
fn gradcheck_implicit_one_head() {
    check_model(&tiny(|m| m.implicit_diff = true), TOL);
}

#[test]
fn gradcheck_bptt_two_heads_dropout() {
    check_model(
        &tiny(|m| {
            m.implicit_diff = false;
            m.num_heads = 2;
            m.dropout = 0.3;
        }),
        TOL,
    );
}

#[test]
fn gradcheck_implicit_two_heads_dropout() {
    check_model(
        &tiny(|m| {
            m.implicit_diff = true;
            m.num_heads = 2;
            m.dropout = 0.3;
        }),
        TOL,
    );
}

#[test]
fn gradcheck_full_decoder_both_modes() {
    let full = |m: &mut ModelConfig| {
        m.decoder = slotfix::config::DecoderKind::Full;
        m.decoder_channels = Some(vec![3, 4]);
    };
    check_model(
        &tiny(|m| {
            full(m);
            m.implicit_diff = true;
            m.dropout = 0.2;
        }),
        TOL,
    );
    check_model(
        &tiny(|m| {
            full(m);
            m.implicit_diff = false;
            m.num_layers = 1;
        }),
        TOL,
    );
}

/// A tiny model the fold applies to: one head, feat = d = 6.
fn tiny_foldable(implicit: bool, dropout: f64) -> ModelConfig {
    tiny(|m| {
        m.slot_size = 6;
        m.implicit_diff = implicit;
        m.dropout = dropout;
    })
}

#[test]
fn gradcheck_folded_attention_both_modes() {
    for implicit in [true, false] {
        check_model_on(Be::new().folding_kv(), &tiny_foldable(implicit, 0.2), TOL);
    }
}

/// The fold computes the same function: loss, masks and every parameter gradient (accumulated
/// by two backward passes) of a second training step, and an evaluation pass, agree with the plain model's to rounding (f64), in both
/// gradient modes, with dropout; and the folded workspace holds no k, v or their gradients.
#[test]
fn folded_attention_equals_the_plain_model() {
    for implicit in [true, false] {
        let cfg = tiny_foldable(implicit, 0.2);
        let (pbe, mut plain, mut pws) = setup(&cfg);
        let (fbe, mut folded, mut fws) = setup_on(Be::new().folding_kv(), &cfg);
        let run = |be: &Be, m: &mut Model<Be>, ws: &mut Workspace<Vec<f64>>| {
            m.forward(be, ws, Pass::Train { step: STEP }, SlotsFrom::Noise);
            m.zero_grads(be);
            // Twice: a backward accumulates (gradient accumulation), the fold's included.
            m.backward(be, ws, STEP, SlotsFrom::Noise);
            m.backward(be, ws, STEP, SlotsFrom::Noise);
            let loss = m.loss(be, ws);
            let masks = ws.masks.clone();
            m.forward(
                be,
                ws,
                Pass::Eval {
                    applications: 4,
                    step: STEP,
                },
                SlotsFrom::Noise,
            );
            (loss, masks, ws.masks.clone(), m.grads.clone())
        };
        // (A first step on each: the second finds the workspaces as a step leaves them.)
        run(&pbe, &mut plain, &mut pws);
        run(&fbe, &mut folded, &mut fws);
        let (lp, mp, ep, gp) = run(&pbe, &mut plain, &mut pws);
        let (lf, mf, ef, gf) = run(&fbe, &mut folded, &mut fws);
        // L2 distance and norm.
        let dist = |a: &[f64], b: &[f64]| {
            let sq: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
            sq.sqrt()
        };
        let norm = |b: &[f64]| b.iter().map(|y| y * y).sum::<f64>().sqrt();
        let mode = if implicit { "implicit" } else { "BPTT" };
        assert!(
            (lp - lf).abs() <= 1e-13 * lp.abs(),
            "{mode}: loss {lp} vs {lf}"
        );
        assert!(dist(&mf, &mp) < 1e-12 * norm(&mp), "{mode}: masks");
        assert!(
            dist(&ef, &ep) < 1e-12 * norm(&ep),
            "{mode}: evaluation masks"
        );
        for (spec, (a, b)) in plain.arch.specs.iter().zip(gf.iter().zip(&gp)) {
            let (diff, norm) = (dist(a, b), norm(b));
            // (Relative, with a floor for the true zeros: the slot LayerNorm's bias moves every
            // query alike, to which the softmax over slots is blind; its gradient is ~1e-21.)
            assert!(
                diff <= 1e-11 * norm + 1e-18,
                "{mode}: {} off by {diff:.3e} (|g| {norm:.3e})",
                spec.name
            );
        }
        let bytes = |fold: bool| {
            let be = if fold {
                Be::new().folding_kv()
            } else {
                Be::new()
            };
            plain.arch.workspace_bytes(&be, BATCH, true)
        };
        assert!(bytes(true) < bytes(false), "{mode}: no k, v under the fold");
    }
}

#[test]
fn implicit_gradient_equals_one_step_bptt_from_the_same_slots() {
    let implicit = tiny(|m| {
        m.implicit_diff = true;
        m.max_iter_fwd = 3;
    });
    let (be, mut m_imp, mut ws_imp) = setup(&implicit);
    m_imp.forward(
        &be,
        &mut ws_imp,
        Pass::Train { step: STEP },
        SlotsFrom::Noise,
    );
    m_imp.zero_grads(&be);
    m_imp.backward(&be, &mut ws_imp, STEP, SlotsFrom::Noise);
    let fixed = m_imp.detached_slots(&be, &ws_imp);

    let mut one_step = implicit.clone();
    one_step.implicit_diff = false;
    one_step.max_iter_fwd = 1;
    let (be, mut m_bptt, mut ws_bptt) = setup(&one_step);
    m_bptt.set_initial_slots(&be, &mut ws_bptt, &fixed);
    m_bptt.forward(
        &be,
        &mut ws_bptt,
        Pass::Train { step: STEP },
        SlotsFrom::Given,
    );
    m_bptt.zero_grads(&be);
    m_bptt.backward(&be, &mut ws_bptt, STEP, SlotsFrom::Given);

    assert_eq!(m_imp.loss(&be, &ws_imp), m_bptt.loss(&be, &ws_bptt));
    for (t, spec) in m_imp.arch.specs.iter().enumerate() {
        let (a, b) = (&m_imp.grads[t], &m_bptt.grads[t]);
        let num: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            .sqrt();
        let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
        if spec.name.contains("slots_mu") || spec.name.contains("slots_log_sigma") {
            assert!(a.iter().all(|&g| g == 0.0), "{}", spec.name);
            continue;
        }
        assert!(
            num <= 1e-12 * den.max(1e-30),
            "{}: {num:e} vs {den:e}",
            spec.name
        );
    }
}

#[test]
fn bptt_gives_mu_and_log_sigma_gradients() {
    let (be, mut model, mut ws) = setup(&tiny(|m| m.implicit_diff = false));
    model.forward(&be, &mut ws, Pass::Train { step: STEP }, SlotsFrom::Noise);
    model.zero_grads(&be);
    model.backward(&be, &mut ws, STEP, SlotsFrom::Noise);
    let a = &model.arch;
    assert!(model.grads[a.mu].iter().any(|&g| g != 0.0));
    assert!(model.grads[a.log_sigma].iter().any(|&g| g != 0.0));
}

#[test]
fn implicit_memory_does_not_grow_with_iterations() {
    let bytes = |implicit: bool, t: usize| {
        let c = tiny(|m| {
            m.implicit_diff = implicit;
            m.max_iter_fwd = t;
        });
        let (be, model, ws) = setup(&c);
        model.slot_saved_bytes(&be, &ws, 4)
    };
    let (i3, i30) = (bytes(true, 3), bytes(true, 30));
    assert_eq!(i3, i30, "implicit: saved bytes must not depend on T");
    // BPTT: one tape per iteration plus the scratch tape, so T = 3 holds 4 tapes, T = 30 holds 31.
    let (b3, b30) = (bytes(false, 3), bytes(false, 30));
    let tape = (b30 - b3) / 27;
    assert_eq!(b3, 4 * tape);
    assert_eq!(i3, 2 * tape, "implicit: one recorded tape plus the scratch");
}

#[test]
fn fwd_tol_stops_early_and_reports_the_residual() {
    let run = |max_iter: usize, tol: Option<f64>| {
        let c = tiny(|m| {
            m.implicit_diff = true;
            m.max_iter_fwd = max_iter;
            m.fwd_tol = tol;
        });
        let (be, model, mut ws) = setup(&c);
        let stats = model.forward(&be, &mut ws, Pass::Train { step: STEP }, SlotsFrom::Noise);
        (stats, model.detached_slots(&be, &ws))
    };
    // The residual of iteration t, from runs of exactly t iterations (a tolerance never met).
    let residuals: Vec<f64> = (1..=8)
        .map(|t| run(t, Some(1e-300)).0.last_residual.unwrap())
        .collect();
    // Pick the first iteration j > 1 whose residual is below all earlier ones and a tolerance
    // between the two: the run must stop exactly after iteration j.
    let j = (1..residuals.len())
        .find(|&j| residuals[j] < residuals[..j].iter().cloned().fold(f64::INFINITY, f64::min))
        .expect("the residual decreases at some point")
        + 1;
    let earlier_min = residuals[..j - 1]
        .iter()
        .cloned()
        .fold(f64::INFINITY, f64::min);
    let tol = 0.5 * (residuals[j - 1] + earlier_min);
    let (stats, early) = run(200, Some(tol));
    assert_eq!(
        stats.iters_run, j,
        "residuals {residuals:?}, tolerance {tol}"
    );
    assert_eq!(stats.last_residual, Some(residuals[j - 1]));
    // Stopping early changes nothing else: the same slots as a run of exactly j iterations,
    // which computes no residual at all without fwd_tol.
    let (stats, exact) = run(j, None);
    assert_eq!(stats.last_residual, None);
    assert_eq!(early, exact);
}
