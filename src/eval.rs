//! Evaluation (MSE and FG-ARI over a test split) and the picture grids.

use crate::backend::Backend;
use crate::data::{self, Dataset};
use crate::metrics;
use crate::model::{Model, Pass, SlotsFrom, Workspace};
use serde::Serialize;
use std::path::Path;

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct EvalResult {
    /// Mean squared error per pixel and channel, images in [-1, 1].
    pub mse: f64,
    /// Mean foreground ARI in [−1, 1] (None without ground-truth masks).
    pub fg_ari: Option<f64>,
    pub images: usize,
    /// Images that counted for FG-ARI (those with at least 2 foreground pixels).
    pub fg_ari_images: usize,
    /// Cell applications used.
    pub iters: usize,
}

/// Run the eval forward for the images in `ws.image`.
fn eval_forward<B: Backend>(
    be: &B,
    model: &Model<B>,
    ws: &mut Workspace<B::Buf>,
    applications: usize,
) {
    // A fixed step for the slot noise, so evaluation is deterministic.
    model.forward(
        be,
        ws,
        Pass::Eval {
            applications,
            step: 0,
        },
        SlotsFrom::Noise,
    );
}

/// MSE and FG-ARI over the first `limit` (default all) examples of `ds`.
pub fn evaluate<B: Backend>(
    be: &B,
    model: &Model<B>,
    ds: &dyn Dataset,
    batch_size: usize,
    applications: usize,
    limit: Option<usize>,
    progress: Option<&indicatif::ProgressBar>,
) -> EvalResult {
    let n = limit.map_or(ds.len(), |l| l.min(ds.len()));
    let (k, p) = (model.arch.k, model.arch.pixels());
    let mut ws: Option<Workspace<B::Buf>> = None;
    let (mut sse, mut ari_sum, mut ari_n) = (0.0, 0.0, 0usize);
    let mut start = 0;
    while start < n {
        let b = batch_size.min(n - start);
        if ws.as_ref().map(|w| w.batch) != Some(b) {
            ws = Some(model.eval_workspace(be, b));
        }
        let w = ws.as_mut().expect("set above");
        let idx: Vec<usize> = (start..start + b).collect();
        let batch = data::load_batch(ds, &idx, true);
        be.upload_f32(&batch.images, &mut w.image);
        eval_forward(be, model, w, applications);
        sse += model.loss(be, w) * b as f64;
        if let Some(truth) = &batch.masks {
            let masks = be.download_f32(&w.masks);
            let (s, c) = metrics::fg_ari_batch(&masks, truth, b, k, p);
            ari_sum += s;
            ari_n += c;
        }
        start += b;
        if let Some(pb) = progress {
            pb.inc(b as u64);
        }
    }
    EvalResult {
        mse: sse / n.max(1) as f64,
        fg_ari: (ari_n > 0).then(|| ari_sum / ari_n as f64),
        images: n,
        fg_ari_images: ari_n,
        iters: applications,
    }
}

/// Write a PNG grid (input, reconstruction, each slot, segmentation) for the first `n` examples.
pub fn render_grid<B: Backend>(
    be: &B,
    model: &Model<B>,
    ds: &dyn Dataset,
    n: usize,
    applications: usize,
    path: &Path,
) -> Result<(), String> {
    let n = n.min(ds.len());
    let (k, res) = (model.arch.k, model.arch.res);
    let p = res * res;
    let mut ws = model.eval_workspace(be, n);
    let idx: Vec<usize> = (0..n).collect();
    let batch = data::load_batch(ds, &idx, false);
    be.upload_f32(&batch.images, &mut ws.image);
    eval_forward(be, model, &mut ws, applications);
    let dec = be.download_f32(ws.dec_act.last().ok_or("model has no decoder")?);
    // Decoder output is [n, K, P, 4]: rgb in the first three channels.
    let slot_rgb: Vec<f32> = dec
        .chunks_exact(4)
        .flat_map(|c| [c[0], c[1], c[2]])
        .collect();
    debug_assert_eq!(slot_rgb.len(), n * k * p * 3);
    let recon = be.download_f32(&ws.recon);
    let masks = be.download_f32(&ws.masks);
    crate::render::example_grid(path, &batch.images, &recon, &slot_rgb, &masks, n, k, res)
}
