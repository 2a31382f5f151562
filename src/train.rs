//! Training: data in, Adam steps, metrics, pictures and checkpoints out.
//!
//! A run is deterministic given the config: the data order of step s, the slot noise and the
//! dropout masks are all functions of (seed, s), and the checkpoint holds the parameters, the
//! Adam moments and s, so a resumed run continues bit for bit.

use crate::backend::{Alloc, Backend};
use crate::checkpoint::{self, Checkpoint};
use crate::config::{Config, DataType, NonFinite};
use crate::data::{self, DataSpec, Dataset, Source, Split};
use crate::eval::{self, EvalResult};
use crate::model::{Arch, ForwardStats, Model, Pass, SlotsFrom, Workspace};
use crate::optim::{learning_rate, OptHyper, OptReport};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Instant;

/// Set by the Ctrl-C handler; the loop saves a checkpoint and stops at the next step boundary.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Checkpoints kept in `save_dir` (older ones are deleted after each save).
pub const KEEP_CHECKPOINTS: usize = 3;
/// Test images used for the FG-ARI and the pictures written at every log interval.
pub const LOG_EVAL_IMAGES: usize = 32;
/// Examples drawn in each picture grid.
pub const GRID_EXAMPLES: usize = 4;

pub fn source_of(dt: DataType) -> Source {
    match dt {
        DataType::Clevr => Source::Clevr,
        DataType::Folder => Source::Folder,
        DataType::Tetrominoes => Source::Tetrominoes,
        DataType::MultiDsprites => Source::MultiDsprites,
    }
}

/// Open the training or test split described by the config.
pub fn open_data(cfg: &Config, split: Split) -> Result<Box<dyn Dataset>, String> {
    let t = &cfg.training;
    let (dt, root, num, workers) = match split {
        Split::Train => (t.data_type, t.data_root.clone(), t.num_train, t.num_workers),
        Split::Test => (
            cfg.test_data_type(),
            cfg.test_data_root().map(Path::to_path_buf),
            Some(cfg.testing.num_test),
            cfg.testing.num_workers,
        ),
    };
    let mut spec = DataSpec::new(source_of(dt), split, cfg.model.resolution);
    spec.root = root.or_else(|| {
        (dt == DataType::Clevr).then(|| PathBuf::from(crate::config::DEFAULT_CLEVR_ROOT))
    });
    spec.num = num;
    spec.max_objects = t.max_objects;
    spec.seed = t.seed;
    spec.num_workers = workers;
    spec.cache_dir = (!dt.is_embedded()).then(|| t.save_dir.join("cache"));
    let ds = data::open(&spec).map_err(|e| format!("{} data: {e}", split.name()))?;
    if ds.resolution() != cfg.model.resolution {
        return Err(format!(
            "{} data is {}×{} but Model.resolution = {}",
            split.name(),
            ds.resolution(),
            ds.resolution(),
            cfg.model.resolution
        ));
    }
    Ok(ds)
}

/// Model + optimizer state + the step counter: everything a checkpoint holds.
pub struct Session<B: Backend> {
    /// Eager steps, or a captured one replayed. A captured step refers to the buffers below by
    /// address: they are allocated once and written in place (checkpoint loads upload into
    /// them), never replaced. (First, so that it is dropped before the backend's kernels.)
    mode: StepMode<B::StepGraph>,
    pub be: B,
    pub cfg: Config,
    pub model: Model<B>,
    pub adam_m: Vec<B::Buf>,
    pub adam_v: Vec<B::Buf>,
    /// Completed training steps (skipped ones included: they consumed their data and noise).
    pub step: u64,
    /// The optimizer's bookkeeping (Adam's update count, non-finite steps, losses), kept by the
    /// backend beside the parameters: read it with [`Session::opt_report`].
    opt: B::OptState,
    /// Training buffers, allocated on the first training step (evaluation does not need them).
    ws: Option<Workspace<B::Buf>>,
}

/// How [`Session::train_step`] queues a step.
enum StepMode<G> {
    /// Queue every step op by op.
    Eager,
    /// The next step runs eagerly and allocates what a step needs; the one after is captured.
    WarmUp,
    /// Capture the next step.
    Capture,
    /// Replay the captured step (its forward statistics are those of every step).
    Replay { graph: G, stats: ForwardStats },
}

/// Training keys that decide which data and noise each step sees: a resumed run must keep them,
/// or it would silently become a different run.
fn data_keys(cfg: &Config) -> [(&'static str, String); 6] {
    let t = &cfg.training;
    [
        ("data_type", format!("{:?}", t.data_type)),
        ("data_root", format!("{:?}", t.data_root)),
        ("num_train", format!("{:?}", t.num_train)),
        ("max_objects", format!("{:?}", t.max_objects)),
        ("batch_size", t.batch_size.to_string()),
        ("seed", t.seed.to_string()),
    ]
}

/// What one training step queued. Its loss, gradient norm and whether it updated are in
/// [`Session::opt_report`] (a host read, made only when needed).
#[derive(Clone, Copy, Debug)]
pub struct StepOutcome {
    pub lr: f64,
    pub fwd_iters: usize,
    pub residual: Option<f64>,
}

impl<B: Backend> Session<B> {
    pub fn new(be: B, cfg: Config) -> Self {
        let model = Model::new(&be, &cfg.model, cfg.training.seed);
        Self::with_model(be, cfg, model)
    }

    fn with_model(be: B, cfg: Config, model: Model<B>) -> Self {
        let adam_m = model
            .arch
            .specs
            .iter()
            .map(|s| be.alloc(s.numel()))
            .collect();
        let adam_v = model
            .arch
            .specs
            .iter()
            .map(|s| be.alloc(s.numel()))
            .collect();
        let opt = be.opt_state(&model.arch.grad_lens(), &OptReport::starting_at(0));
        Self {
            be,
            cfg,
            model,
            adam_m,
            adam_v,
            step: 0,
            opt,
            ws: None,
            mode: StepMode::WarmUp,
        }
    }

    /// Whether training steps are captured and replayed: wanted by the config, possible on
    /// the backend, and every step the same work (`fwd_tol` decides on the host when to stop).
    fn captures_steps(&self) -> bool {
        self.cfg.training.cuda_graph && self.model.arch.fwd_tol.is_none() && self.be.can_capture()
    }

    /// Run the following steps eagerly, dropping a captured step if there is one (`slotfix
    /// bench --kernels` times each launch, which a replay does not show).
    pub fn run_eagerly(&mut self) {
        self.mode = StepMode::Eager;
    }

    /// Whether the steps are now replays of a captured one.
    pub fn replaying(&self) -> bool {
        matches!(self.mode, StepMode::Replay { .. })
    }

    /// The optimizer's bookkeeping as of the last step (a host read: waits for the queued work).
    pub fn opt_report(&self) -> OptReport {
        self.be.opt_report(&self.opt)
    }

    /// Everything needed to continue the run: parameters (PyTorch names), Adam moments, step,
    /// seed and the config.
    pub fn to_checkpoint(&self) -> Checkpoint {
        let mut c = Checkpoint::default();
        for (i, s) in self.model.arch.specs.iter().enumerate() {
            c.insert(
                s.name.clone(),
                s.shape.clone(),
                self.be.download_f32(&self.model.params[i]),
            );
            c.insert(
                format!("optim.exp_avg.{}", s.name),
                s.shape.clone(),
                self.be.download_f32(&self.adam_m[i]),
            );
            c.insert(
                format!("optim.exp_avg_sq.{}", s.name),
                s.shape.clone(),
                self.be.download_f32(&self.adam_v[i]),
            );
        }
        c.meta.insert("step".into(), self.step.to_string());
        c.meta
            .insert("seed".into(), self.cfg.training.seed.to_string());
        // The generator is counter-based: its whole state is the seed and the step.
        c.meta.insert(
            "rng".into(),
            format!(
                "philox4x32-10 seed={} step={}",
                self.cfg.training.seed, self.step
            ),
        );
        c.meta
            .insert("adam_updates".into(), self.opt_report().updates.to_string());
        c.meta.insert("config".into(), self.cfg.to_yaml());
        c
    }

    /// Rebuild a session from a checkpoint to continue its run. The Model section and the
    /// Training keys that decide the data and noise of each step (`data_keys`) must equal the
    /// checkpoint's; the schedule, step budget, intervals and the like may change.
    pub fn from_checkpoint(be: B, cfg: Config, ckpt: &Checkpoint) -> Result<Self, String> {
        let saved = Config::from_yaml(ckpt.meta("config")?)
            .map_err(|e| format!("checkpoint config: {e}"))?;
        if saved.model != cfg.model {
            return Err(format!(
                "the checkpoint was trained with a different Model section:\n{}",
                serde_yaml::to_string(&saved.model).unwrap_or_default()
            ));
        }
        let changed: Vec<String> = data_keys(&saved)
            .into_iter()
            .zip(data_keys(&cfg))
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, b)| {
                format!(
                    "Training.{} = {} (the checkpoint's run used {})",
                    b.0, b.1, a.1
                )
            })
            .collect();
        if !changed.is_empty() {
            return Err(format!(
                "cannot resume: these keys decide the data and noise of every step and differ from \
                 the checkpoint's run: {}; restore them, or start a new run in another save_dir",
                changed.join("; ")
            ));
        }
        let mut model = Model::new(&be, &cfg.model, cfg.training.seed);
        let load = |be: &B, name: &str, shape: &[usize], dst: &mut B::Buf| -> Result<(), String> {
            let (s, v) = ckpt.tensor(name)?;
            if s != shape {
                return Err(format!(
                    "tensor {name}: shape {s:?} in the checkpoint, {shape:?} in the model"
                ));
            }
            be.upload_f32(v, dst);
            Ok(())
        };
        let specs = model.arch.specs.clone();
        for (i, s) in specs.iter().enumerate() {
            load(&be, &s.name, &s.shape, &mut model.params[i])?;
        }
        let mut sess = Self::with_model(be, cfg, model);
        for (i, s) in specs.iter().enumerate() {
            load(
                &sess.be,
                &format!("optim.exp_avg.{}", s.name),
                &s.shape,
                &mut sess.adam_m[i],
            )?;
            load(
                &sess.be,
                &format!("optim.exp_avg_sq.{}", s.name),
                &s.shape,
                &mut sess.adam_v[i],
            )?;
        }
        sess.step = ckpt
            .meta("step")?
            .parse()
            .map_err(|e| format!("checkpoint step: {e}"))?;
        let updates = match ckpt.meta("adam_updates") {
            Ok(u) => u
                .parse()
                .map_err(|e| format!("checkpoint adam_updates: {e}"))?,
            Err(_) => sess.step,
        };
        let lens = sess.model.arch.grad_lens();
        sess.opt = sess.be.opt_state(&lens, &OptReport::starting_at(updates));
        Ok(sess)
    }

    /// The buffers of the last step (loss, masks, recon, noise).
    pub fn workspace(&self) -> Option<&Workspace<B::Buf>> {
        self.ws.as_ref()
    }

    /// Load parameters only (for evaluation, rendering, dump-step).
    pub fn load_params(&mut self, ckpt: &Checkpoint) -> Result<(), String> {
        let specs = self.model.arch.specs.clone();
        for (i, s) in specs.iter().enumerate() {
            let (shape, v) = ckpt.tensor(&s.name)?;
            if shape != &s.shape {
                return Err(format!(
                    "tensor {}: shape {shape:?} in the checkpoint, {:?} in the model",
                    s.name, s.shape
                ));
            }
            self.be.upload_f32(v, &mut self.model.params[i]);
        }
        Ok(())
    }

    pub fn lr(&self) -> f64 {
        let t = &self.cfg.training;
        learning_rate(t.lr, t.warmup_steps, t.decay_rate, t.decay_steps, self.step)
    }

    /// Forward + backward for `images` (`[B, H, W, 3]` in [-1, 1]) at the current step, without
    /// the update. Gradients are left in `model.grads`.
    pub fn forward_backward(&mut self, images: &[f32]) -> (f64, ForwardStats) {
        let stats = self.queue_forward_backward(images);
        let ws = self.ws.as_ref().expect("allocated by the pass");
        (self.model.loss(&self.be, ws), stats)
    }

    /// Forward and backward on `images` with nothing read back (except the fixed-point residual
    /// when `fwd_tol` asks for it); the loss stays in the workspace.
    fn queue_forward_backward(&mut self, images: &[f32]) -> ForwardStats {
        self.upload_batch(images);
        self.queue_forward_backward_of_batch()
    }

    /// Copy `images` into the workspace (allocated on first use).
    fn upload_batch(&mut self, images: &[f32]) {
        let (be, model) = (&self.be, &mut self.model);
        let ws = self
            .ws
            .get_or_insert_with(|| model.workspace(be, self.cfg.training.batch_size));
        be.upload_f32(images, &mut ws.image);
    }

    /// [`Session::queue_forward_backward`] of the batch already uploaded.
    fn queue_forward_backward_of_batch(&mut self) -> ForwardStats {
        let (be, model) = (&self.be, &mut self.model);
        let ws = self.ws.as_mut().expect("allocated by upload_batch");
        let pass = Pass::Train { step: self.step };
        let stats = model.forward(be, ws, pass, SlotsFrom::Noise);
        model.zero_grads(be);
        model.backward(be, ws, self.step, SlotsFrom::Noise);
        stats
    }

    /// One training step on `images`: forward, backward and the optimizer step (gradient norm,
    /// non-finite check, clipping, AdamW), all queued on the backend with no host read. A
    /// non-finite step makes no update (and with `on_nonfinite: stop` neither does any later
    /// one); [`Session::opt_report`] says what happened.
    ///
    /// With `cuda_graph` on a backend that can capture, the second step of the session is
    /// captured and every later one replays it (`StepMode`); the results are the same.
    pub fn train_step(&mut self, images: &[f32]) -> StepOutcome {
        let t = &self.cfg.training;
        let h = OptHyper {
            lr: self.lr(),
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_eps,
            weight_decay: t.weight_decay,
            grad_clip: t.grad_clip,
            latch: t.on_nonfinite == NonFinite::Stop,
            step: self.step,
        };
        self.be.begin_step(&h);
        let mode = std::mem::replace(&mut self.mode, StepMode::Eager);
        // The batch goes in before any capture (a host-to-device copy cannot be captured).
        self.upload_batch(images);
        let stats = match mode {
            StepMode::Replay { graph, stats } => {
                self.be
                    .replay(&graph)
                    .unwrap_or_else(|e| panic!("replaying the captured training step: {e}"));
                self.mode = StepMode::Replay { graph, stats };
                stats
            }
            StepMode::Capture => match self.capture_step(&h) {
                Ok((graph, stats)) => {
                    self.be
                        .replay(&graph)
                        .unwrap_or_else(|e| panic!("running the captured training step: {e}"));
                    self.mode = StepMode::Replay { graph, stats };
                    stats
                }
                Err(e) => {
                    eprintln!("note: {e}; training steps run without a CUDA graph");
                    self.queue_step_of_batch(&h)
                }
            },
            warm_up_or_eager => {
                if matches!(warm_up_or_eager, StepMode::WarmUp) && self.captures_steps() {
                    self.mode = StepMode::Capture;
                }
                self.queue_step_of_batch(&h)
            }
        };
        self.step += 1;
        StepOutcome {
            lr: h.lr,
            fwd_iters: stats.iters_run,
            residual: stats.last_residual,
        }
    }

    /// Forward, backward and the optimizer step on the uploaded batch, queued op by op.
    fn queue_step_of_batch(&mut self, h: &OptHyper) -> ForwardStats {
        let stats = self.queue_forward_backward_of_batch();
        let ws = self.ws.as_ref().expect("allocated by the pass");
        self.be.opt_step(
            h,
            &ws.loss,
            &mut self.model.params,
            &self.model.grads,
            &mut self.adam_m,
            &mut self.adam_v,
            &mut self.opt,
        );
        stats
    }

    /// Capture [`Session::queue_step_of_batch`] (nothing runs). An Err leaves nothing queued:
    /// also when queueing panicked inside the capture (say, a driver refusing an operation
    /// there), so that the run goes on eagerly instead of dying on an optimisation.
    fn capture_step(&mut self, h: &OptHyper) -> Result<(B::StepGraph, ForwardStats), String> {
        self.be
            .capture_begin()
            .map_err(|e| format!("cannot start a CUDA graph capture ({e})"))?;
        let queued =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.queue_step_of_batch(h)));
        let graph = self.be.capture_end();
        let stats = queued.map_err(|panic| {
            format!(
                "queueing the step inside the CUDA graph capture failed ({})",
                panic_message(panic.as_ref())
            )
        })?;
        let graph = graph.map_err(|e| format!("the CUDA graph capture failed ({e})"))?;
        Ok((graph, stats))
    }

    /// Evaluate on `ds` (MSE, FG-ARI) with `applications` cell applications.
    pub fn evaluate(
        &self,
        ds: &dyn Dataset,
        applications: usize,
        limit: Option<usize>,
    ) -> EvalResult {
        self.evaluate_with_progress(ds, applications, limit, None)
    }

    /// [`Session::evaluate`], advancing `progress` by the images done.
    pub fn evaluate_with_progress(
        &self,
        ds: &dyn Dataset,
        applications: usize,
        limit: Option<usize>,
        progress: Option<&ProgressBar>,
    ) -> EvalResult {
        let b = self.cfg.testing.batch_size;
        eval::evaluate(&self.be, &self.model, ds, b, applications, limit, progress)
    }
}

/// The memory a job's buffers take, predicted from the architecture before any of them is
/// allocated (the kernels' scratch and the CUDA context come on top).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryPlan {
    /// The training workspace (activations and their gradients) and its batch size; 0 and 0
    /// for a job that does not train.
    pub train_bytes: u64,
    pub train_batch: usize,
    /// The largest evaluation workspace the job makes, next to the training one.
    pub eval_bytes: u64,
    /// Parameters, gradients and Adam's moments (allocated with the session).
    pub state_bytes: u64,
}

impl MemoryPlan {
    /// For a training workspace at batch size `train_batch` and an evaluation one at
    /// `eval_batch` (0: none), as `be` allocates them (a backend, or a
    /// [`SizeCounter`](crate::backend::SizeCounter) for the backends' defaults).
    pub fn new<A: Alloc>(be: &A, arch: &Arch, train_batch: usize, eval_batch: usize) -> Self {
        MemoryPlan {
            train_bytes: if train_batch > 0 {
                arch.workspace_bytes(be, train_batch, true)
            } else {
                0
            },
            train_batch,
            eval_bytes: if eval_batch > 0 {
                arch.workspace_bytes(be, eval_batch, false)
            } else {
                0
            },
            state_bytes: arch.train_state_bytes(),
        }
    }

    /// For a training run: its steps, and the evaluation and pictures at every log interval.
    pub fn training<A: Alloc>(be: &A, cfg: &Config, arch: &Arch) -> Self {
        // The evaluation (at most LOG_EVAL_IMAGES per batch) and then the picture grid.
        let eval_batch = cfg.testing.batch_size.clamp(GRID_EXAMPLES, LOG_EVAL_IMAGES);
        Self::new(be, arch, cfg.training.batch_size, eval_batch)
    }

    /// Bytes of all the buffers.
    pub fn total(&self) -> u64 {
        self.train_bytes + self.eval_bytes + self.state_bytes
    }

    /// A line for the log: what the buffers take and, when known, what is free. Err when the
    /// buffers cannot fit in `available` bytes, saying what to change.
    pub fn check(&self, available: Option<(u64, &str)>) -> Result<String, String> {
        let gib = |b: u64| {
            if b >= 1 << 30 {
                format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
            } else {
                format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
            }
        };
        let mut parts = Vec::new();
        if self.train_batch > 0 {
            parts.push(format!(
                "training {} at batch size {}",
                gib(self.train_bytes),
                self.train_batch
            ));
        }
        if self.eval_bytes > 0 {
            parts.push(format!("evaluation {}", gib(self.eval_bytes)));
        }
        parts.push(format!(
            "parameters and optimizer {}",
            gib(self.state_bytes)
        ));
        let need = self.total();
        let what = format!("buffers {} ({})", gib(need), parts.join(", "));
        let Some((free, place)) = available else {
            return Ok(format!("memory: {what}"));
        };
        if need > free {
            let advice = if self.train_batch > 0 {
                format!(
                    "lower Training.batch_size (the training buffers take about {} per image)",
                    gib(self.train_bytes / self.train_batch as u64)
                )
            } else {
                "lower Testing.batch_size (or the number of images asked for)".to_string()
            };
            return Err(format!(
                "not enough {place} memory: {what}, but {} is free; {advice}",
                gib(free)
            ));
        }
        // The kernels' scratch pools are not counted above: warn when they may not fit.
        let tight = if need > free / 10 * 9 {
            " (tight: the kernels' scratch needs some more)"
        } else {
            ""
        };
        Ok(format!(
            "memory: {what}; {} free on the {place}{tight}",
            gib(free)
        ))
    }
}

/// The message of a caught panic.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// Training steps per epoch: full batches only (the last partial batch of an epoch is dropped,
/// as with PyTorch's drop_last).
pub fn steps_per_epoch(n_train: usize, batch: usize) -> usize {
    n_train / batch
}

/// Example indices of training step `step`.
pub fn batch_indices(order: &[usize], batch: usize, step: u64, spe: usize) -> Vec<usize> {
    let j = (step % spe as u64) as usize;
    order[j * batch..(j + 1) * batch].to_vec()
}

/// Options of `slotfix train` beyond the config.
#[derive(Clone, Debug, Default)]
pub struct TrainOptions {
    pub resume: bool,
    /// Delete the checkpoints and metrics of an earlier run in save_dir instead of refusing.
    pub overwrite: bool,
    /// No progress bar and no log lines (tests).
    pub quiet: bool,
}

/// What a finished (or interrupted) run reports.
#[derive(Clone, Debug, Default)]
pub struct TrainSummary {
    pub steps: u64,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub interrupted: bool,
    pub last_checkpoint: Option<PathBuf>,
    pub last_eval: Option<EvalResult>,
    pub seconds: f64,
    pub skipped_steps: u64,
}

/// What the training loop knows of the optimizer's bookkeeping between host reads.
struct Reads {
    /// The report at the last read.
    seen: OptReport,
    last_grad_norm: f64,
    /// Sum and count of the losses of updating steps since the last log line.
    interval_loss: f64,
    interval_n: u64,
}

/// Take in a fresh read `r` of the optimizer's bookkeeping: report non-finite steps since the
/// last read (an `Err` stops the run under `on_nonfinite: stop`), write the pending checkpoint
/// if no non-finite step came after it, and add up the losses.
fn absorb(
    r: OptReport,
    reads: &mut Reads,
    pending: &mut Option<(u64, Checkpoint)>,
    summary: &mut TrainSummary,
    cfg: &Config,
    dir: &Path,
    log: &dyn Fn(&str),
) -> Result<(), String> {
    let seen = reads.seen;
    if r.skipped > seen.skipped {
        let (bad_step, loss, norm) = r.first_bad.unwrap_or((0, f64::NAN, f64::NAN));
        let what = if loss.is_finite() {
            format!("gradient norm {norm}")
        } else {
            format!("loss {loss}")
        };
        match cfg.training.on_nonfinite {
            NonFinite::Stop => {
                // No update was made from that step on, and `pending` (if any) holds a state
                // that led to it: neither is written.
                pending.take();
                let kept = checkpoint::list(dir)
                    .last()
                    .map(|(_, p)| format!("the last good checkpoint, {}, is kept", p.display()))
                    .unwrap_or_else(|| "no checkpoint had been written".into());
                return Err(format!(
                    "step {bad_step}: non-finite {what}; stopping ({kept}; set \
                     Training.on_nonfinite: skip to skip such steps instead)"
                ));
            }
            NonFinite::Skip => {
                let n = r.skipped - seen.skipped;
                let last = r.last_bad_step.unwrap_or(bad_step);
                let first = if seen.skipped == 0 {
                    format!("the first at step {bad_step}: non-finite {what}; ")
                } else {
                    String::new()
                };
                log(&format!(
                    "{n} non-finite step(s) skipped without an update ({first}the last at step \
                     {last})"
                ));
                summary.skipped_steps = r.skipped;
            }
        }
    }
    // The state saved at the last save_interval is written once the step it started has proved
    // finite, so a checkpoint is never the state a divergence came from.
    if let Some((saved_at, c)) = pending.take() {
        if r.last_bad_step.is_some_and(|b| b >= saved_at) {
            log(&format!(
                "the checkpoint of step {saved_at} is not written: a non-finite step followed it"
            ));
        } else {
            summary.last_checkpoint = Some(write_checkpoint(&c, dir)?);
        }
    }
    if r.loss_count > seen.loss_count {
        summary.first_loss.get_or_insert(r.last_loss);
        reads.interval_loss += r.loss_sum - seen.loss_sum;
        reads.interval_n += r.loss_count - seen.loss_count;
    }
    if r.last_loss.is_finite() {
        summary.last_loss = Some(r.last_loss);
    }
    reads.last_grad_norm = r.last_grad_norm;
    reads.seen = r;
    Ok(())
}

/// Total steps of the run: max_steps, else num_epochs × steps per epoch.
pub fn total_steps(cfg: &Config, spe: usize) -> u64 {
    cfg.training
        .max_steps
        .map(|s| s as u64)
        .unwrap_or((cfg.training.num_epochs * spe) as u64)
}

/// Write `c` (made by [`Session::to_checkpoint`]) into `dir` and delete all but the newest.
fn write_checkpoint(c: &Checkpoint, dir: &Path) -> Result<PathBuf, String> {
    let step: u64 = c
        .meta("step")?
        .parse()
        .map_err(|e| format!("checkpoint step: {e}"))?;
    let path = checkpoint::path_for_step(dir, step);
    c.save(&path)?;
    checkpoint::prune(dir, KEEP_CHECKPOINTS, &path);
    Ok(path)
}

/// Keep only the lines of a metrics file whose step is at most `step`.
fn truncate_metrics(path: &Path, step: u64) -> Result<(), String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(()); // no metrics yet
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if kept.len() != text.len() {
        checkpoint::write_atomic(path, kept.as_bytes(), None)?;
    }
    Ok(())
}

/// Prepare save_dir: refuse to mix two runs unless told to resume or overwrite.
fn prepare_save_dir<B: Backend>(
    be: B,
    cfg: &Config,
    opts: &TrainOptions,
    say: &dyn Fn(&str),
) -> Result<Session<B>, String> {
    let dir = &cfg.training.save_dir;
    std::fs::create_dir_all(dir).map_err(|e| {
        format!(
            "Training.save_dir = {}: cannot create it: {e}",
            dir.display()
        )
    })?;
    let existing = checkpoint::list(dir);
    if opts.resume {
        let mut skipped = Vec::new();
        let found = checkpoint::latest_readable(dir, &mut skipped);
        for s in &skipped {
            say(&format!("warning: skipping unreadable checkpoint: {s}"));
        }
        let (path, ckpt) = found
            .ok_or_else(|| format!("--resume: no readable checkpoint in {}", dir.display()))?;
        let sess = Session::from_checkpoint(be, cfg.clone(), &ckpt)?;
        say(&format!(
            "resuming from {} (step {})",
            path.display(),
            sess.step
        ));
        return Ok(sess);
    }
    if let Some((step, _)) = existing.last() {
        if !opts.overwrite {
            return Err(format!(
                "Training.save_dir = {} already holds checkpoints of a run (newest: step {step}); \
                 pass --resume to continue it, --overwrite to start again (deletes them), or choose another save_dir",
                dir.display()
            ));
        }
        for (_, p) in existing {
            std::fs::remove_file(&p).map_err(|e| format!("deleting {}: {e}", p.display()))?;
        }
        let _ = std::fs::remove_file(dir.join("metrics.jsonl"));
    }
    Ok(Session::new(be, cfg.clone()))
}

/// Run training as configured, on backend `be`.
pub fn train<B: Backend>(be: B, cfg: &Config, opts: &TrainOptions) -> Result<TrainSummary, String> {
    let quiet = opts.quiet;
    let say = |s: &str| {
        if !quiet {
            eprintln!("{s}");
        }
    };
    let t0 = Instant::now();
    let train_ds = open_data(cfg, Split::Train)?;
    let test_ds = open_data(cfg, Split::Test)?;
    say(&format!("train data: {}", train_ds.describe()));
    say(&format!("test data: {}", test_ds.describe()));
    let batch = cfg.training.batch_size;
    let spe = steps_per_epoch(train_ds.len(), batch);
    if spe == 0 {
        return Err(format!(
            "Training.batch_size = {batch}: larger than the training set ({} examples)",
            train_ds.len()
        ));
    }
    let total = total_steps(cfg, spe);
    // Before anything in save_dir is touched (--overwrite deletes an earlier run).
    let memory =
        MemoryPlan::training(&be, cfg, &Arch::new(&cfg.model)).check(be.memory_available())?;
    let mut sess = prepare_save_dir(be, cfg, opts, &say)?;
    say(&format!(
        "model: {} parameters, K = {}, D = {}, {} iterations ({}), backend {}",
        sess.model.arch.num_params(),
        sess.model.arch.k,
        sess.model.arch.d,
        cfg.model.max_iter_fwd,
        if cfg.model.implicit_diff {
            "implicit differentiation"
        } else {
            "BPTT"
        },
        sess.be.describe()
    ));
    say(&memory);
    let dir = cfg.training.save_dir.clone();
    let metrics_path = dir.join("metrics.jsonl");
    if opts.resume {
        // Lines logged after the checkpoint we resume from (a run killed between a log line and
        // its next save) are about to be logged again.
        truncate_metrics(&metrics_path, sess.step)?;
    }
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| format!("cannot open {}: {e}", metrics_path.display()))?;
    std::fs::create_dir_all(dir.join("images"))
        .map_err(|e| format!("cannot create {}/images: {e}", dir.display()))?;

    // Batches are produced on another thread, one step ahead of the trainer.
    let (tx, rx) = mpsc::sync_channel::<(u64, Vec<f32>)>(2);
    let start_step = sess.step;
    let seed = cfg.training.seed;
    let n_train = train_ds.len();
    let train_ds: std::sync::Arc<dyn Dataset> = std::sync::Arc::from(train_ds);
    let loader_ds = train_ds.clone();
    let loader = std::thread::spawn(move || {
        let mut cached: Option<(u64, Vec<usize>)> = None;
        for step in start_step..total {
            let epoch = step / spe as u64;
            if cached.as_ref().map(|c| c.0) != Some(epoch) {
                cached = Some((epoch, data::epoch_order(n_train, seed, epoch as u32)));
            }
            let order = &cached.as_ref().expect("set above").1;
            let idx = batch_indices(order, batch, step, spe);
            let b = data::load_batch(loader_ds.as_ref(), &idx, false);
            if tx.send((step, b.images)).is_err() {
                return; // the trainer stopped early
            }
        }
    });

    let pb = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_position(sess.step);
    let log = |s: &str| {
        if quiet {
        } else if pb.is_hidden() {
            eprintln!("{s}");
        } else {
            pb.println(s);
        }
    };
    let mut summary = TrainSummary::default();
    // A checkpoint taken at a save interval (with its step), written once the next step proved
    // it finite.
    let mut pending: Option<(u64, Checkpoint)> = None;
    let mut reads = Reads {
        seen: sess.opt_report(),
        last_grad_norm: f64::NAN,
        interval_loss: 0.0,
        interval_n: 0,
    };
    let mut interval_t = Instant::now();
    let applications = cfg.test_iters();
    let log_every = cfg.training.log_interval as u64;
    let save_every = cfg.training.save_interval as u64;
    while sess.step < total {
        if INTERRUPTED.load(Ordering::SeqCst) {
            summary.interrupted = true;
            break;
        }
        let (step, images) = rx
            .recv()
            .map_err(|_| "the data loader thread stopped unexpectedly".to_string())?;
        debug_assert_eq!(step, sess.step);
        let out = sess.train_step(&images);
        let done = sess.step;
        // The host reads the optimizer's bookkeeping only when it needs it: at log intervals,
        // after the first step, on the step after a save (to prove that checkpoint) and at the
        // end. Between reads the GPU runs ahead with nothing to wait for.
        let log_now = done % log_every == 0 || done == total;
        if log_now || done == start_step + 1 || pending.is_some() || done % save_every == 0 {
            let r = sess.opt_report();
            if let Err(e) = absorb(r, &mut reads, &mut pending, &mut summary, cfg, &dir, &log) {
                pb.abandon();
                return Err(e);
            }
        }
        pb.set_position(done);
        if log_now && reads.interval_n > 0 {
            let (interval_loss, interval_n) = (reads.interval_loss, reads.interval_n);
            let secs = interval_t.elapsed().as_secs_f64();
            let ips = (interval_n as usize * batch) as f64 / secs.max(1e-9);
            let mean_loss = interval_loss / interval_n as f64;
            let ev = sess.evaluate(test_ds.as_ref(), applications, Some(LOG_EVAL_IMAGES));
            let grid = dir.join("images").join(format!("step_{done:08}.png"));
            let pic = eval::render_grid(
                &sess.be,
                &sess.model,
                test_ds.as_ref(),
                GRID_EXAMPLES,
                applications,
                &grid,
            );
            let mut line = serde_json::json!({
                "step": done, "loss": mean_loss, "lr": out.lr, "grad_norm": reads.last_grad_norm,
                "images_per_s": ips, "elapsed_s": t0.elapsed().as_secs_f64(), "eval_mse": ev.mse,
                "fwd_iters": out.fwd_iters, "skipped_steps": summary.skipped_steps,
            });
            if let Some(a) = ev.fg_ari {
                line["fg_ari"] = a.into();
            }
            if let Some(r) = out.residual {
                line["fwd_residual"] = r.into();
            }
            writeln!(metrics, "{line}")
                .map_err(|e| format!("writing {}: {e}", metrics_path.display()))?;
            let _ = metrics.flush();
            let _ = crate::render::plot_curves(&metrics_path, &dir.join("curves.png"));
            let ari = ev
                .fg_ari
                .map(|a| format!(" fg-ari {:.3}", a))
                .unwrap_or_default();
            log(&format!(
                "step {done:>7}  loss {mean_loss:.5}  eval mse {:.5}{ari}  lr {:.2e}  |g| {:.3}  {ips:.1} img/s",
                ev.mse, out.lr, reads.last_grad_norm
            ));
            if let Err(e) = pic {
                log(&format!("warning: could not write {}: {e}", grid.display()));
            }
            pb.set_message(format!(
                "loss {mean_loss:.4} lr {:.1e} {ips:.1} img/s",
                out.lr
            ));
            summary.last_eval = Some(ev);
            reads.interval_loss = 0.0;
            reads.interval_n = 0;
            interval_t = Instant::now();
        }
        if done % save_every == 0 && done < total {
            pending = Some((done, sess.to_checkpoint()));
        }
    }
    drop(rx);
    let _ = loader.join();
    // The steps since the last read (an interrupt can come between reads).
    absorb(
        sess.opt_report(),
        &mut reads,
        &mut pending,
        &mut summary,
        cfg,
        &dir,
        &log,
    )?;
    // Final (or interrupt) checkpoint, after any pending one.
    if let Some((_, c)) = pending.take() {
        summary.last_checkpoint = Some(write_checkpoint(&c, &dir)?);
    }
    if sess.step > start_step || summary.interrupted {
        summary.last_checkpoint = Some(write_checkpoint(&sess.to_checkpoint(), &dir)?);
    }
    pb.finish_and_clear();
    summary.steps = sess.step;
    summary.seconds = t0.elapsed().as_secs_f64();
    if summary.interrupted {
        say(&format!(
            "interrupted at step {}: saved {}",
            sess.step,
            summary
                .last_checkpoint
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ));
    } else {
        say(&format!(
            "done: {} steps in {:.1} s; checkpoint {}; metrics {}; pictures in {}",
            sess.step,
            summary.seconds,
            summary
                .last_checkpoint
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            metrics_path.display(),
            dir.join("images").display()
        ));
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const GIB: u64 = 1 << 30;

    fn plan() -> MemoryPlan {
        MemoryPlan {
            train_bytes: 12 * GIB,
            train_batch: 64,
            eval_bytes: GIB,
            state_bytes: GIB / 2,
        }
    }

    #[test]
    fn memory_check_refuses_what_cannot_fit_and_says_what_to_change() {
        let e = plan().check(Some((10 * GIB, "GPU"))).unwrap_err();
        for part in [
            "not enough GPU memory",
            "buffers 13.50 GiB",
            "training 12.00 GiB at batch size 64",
            "10.00 GiB is free",
            "lower Training.batch_size",
            "192.0 MiB per image",
        ] {
            assert!(e.contains(part), "{part:?} missing from: {e}");
        }
        let eval_only = MemoryPlan {
            train_bytes: 0,
            train_batch: 0,
            ..plan()
        };
        let e = eval_only.check(Some((GIB, "host"))).unwrap_err();
        assert!(
            e.contains("host memory") && e.contains("Testing.batch_size"),
            "{e}"
        );
    }

    #[test]
    fn memory_check_passes_what_fits_and_warns_when_tight() {
        let ok = plan().check(Some((80 * GIB, "GPU"))).unwrap();
        assert!(
            ok.contains("80.00 GiB free on the GPU") && !ok.contains("tight"),
            "{ok}"
        );
        let tight = plan().check(Some((14 * GIB, "GPU"))).unwrap();
        assert!(tight.contains("tight"), "{tight}");
        let unknown = plan().check(None).unwrap();
        assert!(
            unknown.contains("buffers 13.50 GiB") && !unknown.contains("free"),
            "{unknown}"
        );
    }

    /// The plan of the benchmark shape (clevr6: 128×128, K = 7, B = 64, implicit),
    /// against the figure counted on the CPU backend with a counting allocator (13.76 GiB,
    /// benches/NOTES.md).
    #[test]
    fn memory_plan_of_clevr6_matches_the_counted_workspace() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/clevr6.yaml");
        let cfg = Config::load(std::path::Path::new(path)).unwrap();
        let p = MemoryPlan::training(
            &crate::backend::SizeCounter::default(),
            &cfg,
            &Arch::new(&cfg.model),
        );
        let gib = p.train_bytes as f64 / GIB as f64;
        assert!((gib - 13.76).abs() < 0.005, "{gib} GiB");
        assert_eq!(p.train_batch, 64);
        // No gradient buffers in an evaluation workspace: far less per image than training.
        let per_image_eval = p.eval_bytes as f64 / LOG_EVAL_IMAGES as f64;
        assert!(per_image_eval < 0.6 * p.train_bytes as f64 / 64.0);
    }
}
