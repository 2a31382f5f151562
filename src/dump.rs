//! `slotfix dump-step`: one training step written out so it can be replayed elsewhere.
//!
//! Names: every parameter under its checkpoint (PyTorch) name, its gradient under
//! `grad.<name>`, and `input.images` `[B, H, W, 3]` (channels-last; permute to NCHW for
//! PyTorch), `input.slot_noise` `[B, K, D]`, `input.dropout_mask.<i>` `[B·K, hidden]` for cell
//! application i (the multiplier: 0 or 1/(1−p)), `output.loss` `[1]`, `output.recon`
//! `[B, H, W, 3]`, `output.masks` `[B, K, H, W]`.

use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::data::{self, Dataset};
use crate::train::{batch_indices, steps_per_epoch, Session};

pub fn dump_step<B: Backend>(
    sess: &mut Session<B>,
    ds: &dyn Dataset,
) -> Result<Checkpoint, String> {
    let cfg = sess.cfg.clone();
    let batch = cfg.training.batch_size;
    let spe = steps_per_epoch(ds.len(), batch);
    if spe == 0 {
        return Err(format!(
            "Training.batch_size = {batch}: larger than the training set ({})",
            ds.len()
        ));
    }
    let step = sess.step;
    let order = data::epoch_order(ds.len(), cfg.training.seed, (step / spe as u64) as u32);
    let images = data::load_batch(ds, &batch_indices(&order, batch, step, spe), false).images;
    let (loss, stats) = sess.forward_backward(&images);
    let a = sess.model.arch.clone();
    let (res, k, d) = (a.res, a.k, a.d);
    let mut c = Checkpoint::default();
    c.insert("input.images", vec![batch, res, res, 3], images);
    let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    c.insert(
        "input.slot_noise",
        vec![batch, k, d],
        f32s(sess.model.noise(&sess.be, sess_ws(sess))),
    );
    let applications = a.train_applications();
    for app in 0..applications {
        if let Some(mask) = sess.model.dropout_mask(step, app) {
            let n = batch * k * a.mlp_hidden;
            let scale = mask.scale() as f32;
            let m: Vec<f32> = (0..n)
                .map(|i| if mask.keep(i) { scale } else { 0.0 })
                .collect();
            c.insert(
                format!("input.dropout_mask.{app}"),
                vec![batch * k, a.mlp_hidden],
                m,
            );
        }
    }
    for (i, s) in a.specs.iter().enumerate() {
        c.insert(
            s.name.clone(),
            s.shape.clone(),
            sess.be.download_f32(&sess.model.params[i]),
        );
        c.insert(
            format!("grad.{}", s.name),
            s.shape.clone(),
            sess.be.download_f32(&sess.model.grads[i]),
        );
    }
    c.insert("output.loss", vec![1], vec![loss as f32]);
    let ws = sess_ws(sess);
    c.insert(
        "output.recon",
        vec![batch, res, res, 3],
        sess.be.download_f32(&ws.recon),
    );
    c.insert(
        "output.masks",
        vec![batch, k, res, res],
        sess.be.download_f32(&ws.masks),
    );
    c.meta.insert("step".into(), step.to_string());
    c.meta.insert("seed".into(), cfg.training.seed.to_string());
    c.meta.insert("loss".into(), format!("{loss:.9e}"));
    c.meta
        .insert("cell_applications".into(), applications.to_string());
    c.meta
        .insert("fwd_iters_run".into(), stats.iters_run.to_string());
    c.meta.insert("config".into(), cfg.to_yaml());
    // Which implementation computed the step (e.g. the CUDA backend, its device and precision).
    c.meta.insert("backend".into(), sess.be.describe());
    c.meta.insert(
        "layout".into(),
        "images channels-last [B,H,W,3] in [-1,1]; parameters in PyTorch layouts; grad.<name> = d(loss)/d(name); \
         with implicit_diff the recorded application is the last one (index max_iter_fwd)"
            .into(),
    );
    Ok(c)
}

fn sess_ws<B: Backend>(sess: &Session<B>) -> &crate::model::Workspace<B::Buf> {
    sess.workspace().expect("forward_backward ran")
}
