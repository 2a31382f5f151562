//! The YAML configuration: `Model`, `Training` and `Testing` sections.
//!
//! Every key has an effect documented in the README (section "Configuration reference"). Unknown keys
//! and wrong types are rejected by serde (`deny_unknown_fields`), ranges by [`Config::validate`];
//! errors name the key as a path (`Model.num_heads`), the value and what is allowed, and errors
//! found while parsing keep serde_yaml's line and column.

use serde::{Deserialize, Serialize};
use std::fmt::Display;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(rename = "Model")]
    pub model: ModelConfig,
    #[serde(rename = "Training")]
    pub training: TrainingConfig,
    #[serde(rename = "Testing", default)]
    pub testing: TestingConfig,
}

/// Which spatial broadcast decoder (model.md): `broadcast` tiles each slot to
/// `decoder_init_size`² and upsamples with stride-2 transposed convs (the official CLEVR
/// decoder); `full` tiles to the full resolution and uses stride-1 convs (small images).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecoderKind {
    Broadcast,
    Full,
}

/// How parameters are initialised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitScheme {
    /// The official TF code: glorot-uniform weights, zero biases.
    Official,
    /// PyTorch's defaults: U(±1/sqrt(fan_in)) for Linear and Conv weights and biases (fan_in of
    /// a ConvTranspose2d from its weight's dim 1, as PyTorch computes it), U(±1/sqrt(D)) for the
    /// GRUCell.
    Pytorch,
}

/// Numeric precision of the matrix products on the GPU. The CPU always computes in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    F32,
    Tf32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// K, the number of slots.
    #[serde(default = "d::num_slots")]
    pub num_slots: usize,
    /// Attention heads in slot attention (slot_size must be divisible by it).
    #[serde(default = "d::num_heads")]
    pub num_heads: usize,
    /// Linear layers of the encoder's per-token MLP (official: 2), ReLU between them.
    #[serde(default = "d::num_layers")]
    pub num_layers: usize,
    /// Width of the encoder's per-token MLP = size of the features slot attention reads.
    #[serde(default = "d::feat_size")]
    pub feat_size: usize,
    /// Dropout probability on the hidden layer of the slot MLP, training only.
    #[serde(default)]
    pub dropout: f64,
    /// true: T gradient-free iterations + 1 differentiable one; false: BPTT through all T.
    #[serde(default = "d::implicit_diff")]
    pub implicit_diff: bool,
    /// T, the number of slot-attention iterations.
    #[serde(default = "d::max_iter_fwd")]
    pub max_iter_fwd: usize,
    /// Stop the gradient-free iterations early when ||Δslots|| / ||slots|| (L2 over the batch) falls below it.
    /// Only with `implicit_diff: true` (BPTT differentiates all T iterations).
    #[serde(default)]
    pub fwd_tol: Option<f64>,
    /// Square image side in pixels.
    #[serde(default = "d::resolution")]
    pub resolution: usize,
    /// Output channels of the encoder's 5×5 convs (one entry per layer).
    #[serde(default = "d::encoder_channels")]
    pub encoder_channels: Vec<usize>,
    /// `broadcast` (official CLEVR decoder, resolution = decoder_init_size · 2^n) or `full`.
    #[serde(default = "d::decoder")]
    pub decoder: DecoderKind,
    /// Channels of the decoder's hidden layers; default depends on `decoder`
    /// (broadcast: [64, 64, 64, 64, 64], full: [32, 32, 32]).
    #[serde(default)]
    pub decoder_channels: Option<Vec<usize>>,
    /// Side of the broadcast grid for `decoder: broadcast`.
    #[serde(default = "d::decoder_init_size")]
    pub decoder_init_size: usize,
    /// D, the size of a slot.
    #[serde(default = "d::slot_size")]
    pub slot_size: usize,
    /// Hidden width of the residual slot MLP.
    #[serde(default = "d::mlp_hidden_size")]
    pub mlp_hidden_size: usize,
    /// Added to the attention weights before the normalisation over inputs.
    #[serde(default = "d::eps")]
    pub eps: f64,
    /// Matrix-product precision of the CUDA backend (`tf32` or `f32`); the CPU always uses f32.
    #[serde(default = "d::precision")]
    pub precision: Precision,
    /// Parameter initialisation: `official` (glorot-uniform weights, zero biases) or `pytorch`
    /// (PyTorch's default initialisers of each layer type).
    #[serde(default = "d::init")]
    pub init: InitScheme,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataType {
    /// CLEVR v1.0 PNGs under `data_root` (official preprocessing).
    #[serde(rename = "CLEVR", alias = "clevr")]
    Clevr,
    /// A folder `images/*.png` with optional `masks/*.png`.
    #[serde(rename = "folder")]
    Folder,
    /// Embedded procedural Tetrominoes.
    #[serde(rename = "tetrominoes")]
    Tetrominoes,
    /// Embedded procedural Multi-dSprites.
    #[serde(rename = "multi_dsprites")]
    MultiDsprites,
}

impl DataType {
    /// Generated in memory (no files, `data_root` ignored).
    pub fn is_embedded(self) -> bool {
        matches!(self, DataType::Tetrominoes | DataType::MultiDsprites)
    }

    /// The name used in the YAML.
    pub fn name(self) -> &'static str {
        match self {
            DataType::Clevr => "CLEVR",
            DataType::Folder => "folder",
            DataType::Tetrominoes => "tetrominoes",
            DataType::MultiDsprites => "multi_dsprites",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    Auto,
    Cpu,
    Cuda,
}

/// What to do when the loss or a gradient is NaN or infinite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonFinite {
    Stop,
    Skip,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Where the training images come from (required).
    pub data_type: DataType,
    /// Root folder of CLEVR / folder data (ignored, with a note, by embedded data).
    #[serde(default)]
    pub data_root: Option<PathBuf>,
    /// Training examples drawn from the data (embedded: generated; files: the first n).
    #[serde(default)]
    pub num_train: Option<usize>,
    /// Maximum objects per scene (tetrominoes: exactly this many, at most 6; multi_dsprites:
    /// 2..=n sprites; CLEVR: keep only scenes with at most this many objects, 6 = CLEVR6).
    #[serde(default)]
    pub max_objects: Option<usize>,
    /// Images per training step.
    #[serde(default = "d::batch_size")]
    pub batch_size: usize,
    /// Threads that decode and preprocess images (0 = all cores).
    #[serde(default = "d::num_workers")]
    pub num_workers: usize,
    /// Passes over the training data; ignored when `max_steps` is set.
    #[serde(default = "d::num_epochs")]
    pub num_epochs: usize,
    /// Step budget; when set it overrides num_epochs.
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// Peak learning rate (reached after `warmup_steps`).
    #[serde(default = "d::lr")]
    pub lr: f64,
    /// Decoupled (AdamW) weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// Linear warm-up length: lr · min(step / warmup_steps, 1); 0 = none.
    #[serde(default = "d::warmup_steps")]
    pub warmup_steps: usize,
    /// Exponential decay: the lr is multiplied by decay_rate^(step / decay_steps).
    #[serde(default = "d::decay_rate")]
    pub decay_rate: f64,
    /// Steps over which the lr is multiplied by `decay_rate` once.
    #[serde(default = "d::decay_steps")]
    pub decay_steps: usize,
    /// Adam β1.
    #[serde(default = "d::adam_beta1")]
    pub adam_beta1: f64,
    /// Adam β2.
    #[serde(default = "d::adam_beta2")]
    pub adam_beta2: f64,
    /// Adam ε.
    #[serde(default = "d::adam_eps")]
    pub adam_eps: f64,
    /// Clip the global gradient norm to this value.
    #[serde(default)]
    pub grad_clip: Option<f64>,
    /// Print the loss every this many steps.
    #[serde(default = "d::log_interval")]
    pub log_interval: usize,
    /// Write a checkpoint every this many steps.
    #[serde(default = "d::save_interval")]
    pub save_interval: usize,
    /// Folder for checkpoints and logs.
    #[serde(default = "d::save_dir")]
    pub save_dir: PathBuf,
    /// `auto` (CUDA when available, else CPU), `cpu` or `cuda`.
    #[serde(default = "d::device")]
    pub device: Device,
    /// Seed of every random number (initialisation, slot noise, dropout, data order, generated
    /// data).
    #[serde(default)]
    pub seed: u64,
    /// `stop` or `skip` the step when the loss or a gradient is NaN or infinite.
    #[serde(default = "d::on_nonfinite")]
    pub on_nonfinite: NonFinite,
    /// CUDA backend: capture the training step into a CUDA graph once and replay it (one
    /// launch per step). Ignored on the CPU and when `Model.fwd_tol` is set.
    #[serde(default = "d::cuda_graph")]
    pub cuda_graph: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestingConfig {
    /// Defaults to the training data type.
    #[serde(default)]
    pub data_type: Option<DataType>,
    /// Defaults to the training data root.
    #[serde(default)]
    pub data_root: Option<PathBuf>,
    /// Images per evaluation batch.
    #[serde(default = "d::batch_size")]
    pub batch_size: usize,
    /// Threads that decode and preprocess images (0 = all cores).
    #[serde(default = "d::num_workers")]
    pub num_workers: usize,
    /// Test images (the papers use 320).
    #[serde(default = "d::num_test")]
    pub num_test: usize,
    /// Slot iterations at test time (default: max_iter_fwd).
    #[serde(default)]
    pub iters: Option<usize>,
}

impl Default for TestingConfig {
    fn default() -> Self {
        Self {
            data_type: None,
            data_root: None,
            batch_size: d::batch_size(),
            num_workers: d::num_workers(),
            num_test: d::num_test(),
            iters: None,
        }
    }
}

/// Defaults: the official object-discovery setup (model.md).
mod d {
    use super::*;
    pub fn num_slots() -> usize {
        7
    }
    pub fn num_heads() -> usize {
        1
    }
    pub fn num_layers() -> usize {
        2
    }
    pub fn feat_size() -> usize {
        64
    }
    pub fn implicit_diff() -> bool {
        true
    }
    pub fn max_iter_fwd() -> usize {
        3
    }
    pub fn resolution() -> usize {
        128
    }
    pub fn encoder_channels() -> Vec<usize> {
        vec![64; 4]
    }
    pub fn decoder() -> DecoderKind {
        DecoderKind::Broadcast
    }
    pub fn decoder_init_size() -> usize {
        8
    }
    pub fn slot_size() -> usize {
        64
    }
    pub fn mlp_hidden_size() -> usize {
        128
    }
    pub fn eps() -> f64 {
        1e-8
    }
    pub fn precision() -> Precision {
        Precision::Tf32
    }
    pub fn init() -> InitScheme {
        InitScheme::Official
    }
    pub fn batch_size() -> usize {
        64
    }
    pub fn num_workers() -> usize {
        0
    }
    pub fn num_epochs() -> usize {
        100
    }
    pub fn lr() -> f64 {
        4e-4
    }
    pub fn warmup_steps() -> usize {
        10_000
    }
    pub fn decay_rate() -> f64 {
        0.5
    }
    pub fn decay_steps() -> usize {
        100_000
    }
    pub fn adam_beta1() -> f64 {
        0.9
    }
    pub fn adam_beta2() -> f64 {
        0.999
    }
    pub fn adam_eps() -> f64 {
        1e-8
    }
    pub fn log_interval() -> usize {
        100
    }
    pub fn save_interval() -> usize {
        1000
    }
    pub fn save_dir() -> PathBuf {
        PathBuf::from("./checkpoints")
    }
    pub fn device() -> Device {
        Device::Auto
    }
    pub fn on_nonfinite() -> NonFinite {
        NonFinite::Stop
    }
    pub fn cuda_graph() -> bool {
        true
    }
    pub fn num_test() -> usize {
        320
    }
}

/// Largest `num_slots` accepted.
pub const MAX_SLOTS: usize = 64;
/// Accepted image sides: `MIN_RESOLUTION..=MAX_RESOLUTION`.
pub const MIN_RESOLUTION: usize = 8;
pub const MAX_RESOLUTION: usize = 1024;
/// Most tetrominoes the embedded generator can place without overlap in a 35×35 scene.
pub const MAX_TETROMINOES: usize = 6;

impl ModelConfig {
    /// Hidden channels of the decoder, with the kind-dependent default filled in.
    pub fn decoder_channels(&self) -> Vec<usize> {
        match (&self.decoder_channels, self.decoder) {
            (Some(c), _) => c.clone(),
            (None, DecoderKind::Broadcast) => vec![64; 5],
            (None, DecoderKind::Full) => vec![32; 3],
        }
    }

    /// Number of stride-2 layers of the broadcast decoder: log2(resolution / init size),
    /// rounded up (a `decoder_init_size` of 0 counts as 1, so this always terminates).
    pub fn decoder_upsamplings(&self) -> usize {
        let mut n = 0;
        let mut s = self.decoder_init_size.max(1);
        while s < self.resolution {
            s = s.saturating_mul(2);
            n += 1;
        }
        n
    }

    /// Iterations of the slot-attention cell per forward pass: T + 1 with implicit
    /// differentiation (T without gradient, one with), T with BPTT.
    pub fn cell_applications(&self) -> usize {
        self.max_iter_fwd + usize::from(self.implicit_diff)
    }
}

/// Where `data_type: CLEVR` is read from when `data_root` is not set.
pub const DEFAULT_CLEVR_ROOT: &str = "./data/CLEVR_v1.0";

/// A configuration error: names the key, the value and what is allowed.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for ConfigError {}

impl Config {
    /// Parse and validate YAML text.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let cfg: Config = serde_yaml::from_str(text).map_err(|e| explain_yaml_error(&e, text))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read, parse and validate a YAML file; errors name the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config {}: {e}", path.display())))?;
        Self::from_yaml(&text).map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
    }

    /// The configuration as YAML (all keys, defaults filled in), e.g. to store in a checkpoint;
    /// [`Config::from_yaml`] reads it back to an equal `Config`. Paths that are not valid UTF-8
    /// are stored lossily.
    pub fn to_yaml(&self) -> String {
        let mut c = self.clone();
        fn lossy(p: &Path) -> PathBuf {
            PathBuf::from(p.to_string_lossy().into_owned())
        }
        c.training.save_dir = lossy(&c.training.save_dir);
        c.training.data_root = c.training.data_root.as_deref().map(lossy);
        c.testing.data_root = c.testing.data_root.as_deref().map(lossy);
        serde_yaml::to_string(&c).expect("a Config with UTF-8 paths always serializes to YAML")
    }

    /// Data type of the test set: `Testing.data_type`, else `Training.data_type`.
    pub fn test_data_type(&self) -> DataType {
        self.testing.data_type.unwrap_or(self.training.data_type)
    }

    /// Data root of the test set: `Testing.data_root`, else `Training.data_root`.
    pub fn test_data_root(&self) -> Option<&Path> {
        self.testing
            .data_root
            .as_deref()
            .or(self.training.data_root.as_deref())
    }

    /// Cell applications at test time: `Testing.iters`, else the number a training forward
    /// makes ([`ModelConfig::cell_applications`]: T + 1 implicit, T BPTT).
    pub fn test_iters(&self) -> usize {
        self.testing.iters.unwrap_or(self.model.cell_applications())
    }

    /// Remarks that do not stop a run but that a user may want to see (printed at start-up):
    /// ignored keys, a missing data folder, fewer slots than entities.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        let t = &self.training;
        for (section, dt, root) in [
            ("Training", t.data_type, t.data_root.as_deref()),
            (
                "Testing",
                self.test_data_type(),
                self.testing.data_root.as_deref(),
            ),
        ] {
            if dt.is_embedded() {
                if let Some(root) = root {
                    notes.push(format!(
                        "{section}.data_root = {}: ignored, data_type {} is generated in memory",
                        root.display(),
                        dt.name()
                    ));
                }
            }
        }
        for (section, dt, root) in [
            ("Training", t.data_type, t.data_root.as_deref()),
            ("Testing", self.test_data_type(), self.test_data_root()),
        ] {
            if dt == DataType::Clevr && root.is_none() {
                notes.push(format!(
                    "{section}.data_root is not set: CLEVR is read from the default {}",
                    DEFAULT_CLEVR_ROOT
                ));
            } else if !dt.is_embedded() && root.is_none() {
                notes.push(format!(
                    "{section}.data_root is not set: data_type {} reads images from it, \
                     the data loader will need it",
                    dt.name()
                ));
            }
        }
        if let Some(m) = t.max_objects {
            if self.model.num_slots <= m {
                notes.push(format!(
                    "Model.num_slots = {}: fewer slots than objects + background \
                     (Training.max_objects = {m}); the papers use max_objects + 1",
                    self.model.num_slots
                ));
            }
        }
        notes
    }

    /// Check every range and cross-key constraint. All problems are reported at once, one per
    /// line, each as `Section.key = value: what is allowed`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut c = Checker::default();
        self.validate_model(&mut c);
        self.validate_training(&mut c);
        self.validate_testing(&mut c);
        match c.errors.len() {
            0 => Ok(()),
            1 => Err(ConfigError(c.errors.remove(0))),
            n => Err(ConfigError(format!(
                "{n} problems in the config:\n  - {}",
                c.errors.join("\n  - ")
            ))),
        }
    }

    fn validate_model(&self, c: &mut Checker) {
        let m = &self.model;
        c.int_between("Model.num_slots", m.num_slots, 1, MAX_SLOTS);
        if m.num_heads == 0 {
            c.fail(
                "Model.num_heads",
                0,
                "must be >= 1 (1 = the official single head)",
            );
        } else if m.slot_size >= 1 && m.slot_size % m.num_heads != 0 {
            let divisors: Vec<String> = (1..=m.slot_size)
                .filter(|h| m.slot_size % h == 0)
                .map(|h| h.to_string())
                .collect();
            c.fail(
                "Model.num_heads",
                m.num_heads,
                format!(
                    "slot_size ({}) must be divisible by num_heads; allowed: {}",
                    m.slot_size,
                    divisors.join(", ")
                ),
            );
        }
        c.at_least("Model.num_layers", m.num_layers, 1);
        c.at_least("Model.feat_size", m.feat_size, 1);
        c.real(
            "Model.dropout",
            m.dropout,
            (0.0..1.0).contains(&m.dropout),
            "in [0, 1) (0 = no dropout)",
        );
        c.at_least("Model.max_iter_fwd", m.max_iter_fwd, 1);
        if let Some(tol) = m.fwd_tol {
            if !m.implicit_diff {
                c.fail(
                    "Model.fwd_tol",
                    tol,
                    "only allowed with implicit_diff: true; it stops the gradient-free \
                     iterations early, and with implicit_diff: false every one of the \
                     max_iter_fwd iterations is back-propagated through, so none can be \
                     skipped (remove fwd_tol or set implicit_diff: true)",
                );
            } else {
                c.real("Model.fwd_tol", tol, tol > 0.0, "> 0 (or left out)");
            }
        }
        c.int_between(
            "Model.resolution",
            m.resolution,
            MIN_RESOLUTION,
            MAX_RESOLUTION,
        );
        if m.encoder_channels.is_empty() {
            c.fail(
                "Model.encoder_channels",
                "[]",
                "must list at least one conv layer, e.g. [64, 64, 64, 64]",
            );
        }
        c.list_positive("Model.encoder_channels", &m.encoder_channels);
        let dec = m.decoder_channels();
        c.list_positive("Model.decoder_channels", &dec);
        match m.decoder {
            DecoderKind::Full => {
                if dec.is_empty() {
                    c.fail(
                        "Model.decoder_channels",
                        "[]",
                        "decoder: full needs at least one hidden layer, e.g. [32, 32, 32]",
                    );
                }
            }
            DecoderKind::Broadcast => self.validate_broadcast(c, &dec),
        }
        c.at_least("Model.slot_size", m.slot_size, 1);
        c.at_least("Model.mlp_hidden_size", m.mlp_hidden_size, 1);
        c.real("Model.eps", m.eps, m.eps > 0.0, "> 0 (official: 1e-8)");
    }

    fn validate_broadcast(&self, c: &mut Checker, dec: &[usize]) {
        let m = &self.model;
        if m.decoder_init_size == 0 {
            c.fail(
                "Model.decoder_init_size",
                0,
                "must be >= 1 (official: 8) with decoder: broadcast",
            );
            return;
        }
        if !(MIN_RESOLUTION..=MAX_RESOLUTION).contains(&m.resolution) {
            return; // already reported; the checks below would only repeat it
        }
        let init = m.decoder_init_size;
        let n = m.decoder_upsamplings();
        let reachable = init.checked_shl(n as u32) == Some(m.resolution);
        if !reachable {
            let allowed = if m.resolution < init {
                format!(
                    "the resolution must be at least decoder_init_size ({init}); nearest allowed: {init}"
                )
            } else {
                format!(
                    "the resolution must be decoder_init_size ({init}) × 2^n; nearest allowed: {} or {}",
                    init << (n - 1),
                    init << n
                )
            };
            c.fail(
                "Model.resolution",
                m.resolution,
                format!(
                    "with decoder: broadcast {allowed} (or set decoder: full, which works at \
                     any resolution)"
                ),
            );
            return;
        }
        if dec.len() < n {
            c.fail(
                "Model.decoder_channels",
                format!("{dec:?}"),
                format!(
                    "decoder: broadcast from {init}×{init} to {r}×{r} needs {n} stride-2 layers, \
                     so at least {n} entries (the first {n} upsample, any further ones are \
                     stride 1)",
                    r = m.resolution
                ),
            );
        } else if dec.is_empty() {
            c.fail(
                "Model.decoder_channels",
                "[]",
                "decoder: broadcast needs at least one hidden layer",
            );
        }
    }

    fn validate_training(&self, c: &mut Checker) {
        let t = &self.training;
        if let Some(n) = t.num_train {
            c.at_least("Training.num_train", n, 1);
        }
        if let Some(n) = t.max_objects {
            if t.data_type == DataType::Tetrominoes {
                c.int_between_why(
                    "Training.max_objects",
                    n,
                    1,
                    MAX_TETROMINOES,
                    "for tetrominoes (pieces that do not overlap in a 35×35 scene; the \
                     DeepMind set has 3)",
                );
            } else {
                c.at_least("Training.max_objects", n, 1);
            }
        }
        c.at_least("Training.batch_size", t.batch_size, 1);
        match t.max_steps {
            Some(s) => c.at_least("Training.max_steps", s, 1),
            None => {
                if t.num_epochs == 0 {
                    c.fail(
                        "Training.num_epochs",
                        0,
                        "must be >= 1 (or set max_steps, which then overrides num_epochs)",
                    );
                }
            }
        }
        c.real("Training.lr", t.lr, t.lr > 0.0, "> 0 (official: 0.0004)");
        c.real(
            "Training.weight_decay",
            t.weight_decay,
            t.weight_decay >= 0.0,
            ">= 0 (0 = none, the official setting)",
        );
        c.real(
            "Training.decay_rate",
            t.decay_rate,
            t.decay_rate > 0.0 && t.decay_rate <= 1.0,
            "in (0, 1] (1 = no decay; official: 0.5)",
        );
        c.at_least("Training.decay_steps", t.decay_steps, 1);
        for (key, b) in [
            ("Training.adam_beta1", t.adam_beta1),
            ("Training.adam_beta2", t.adam_beta2),
        ] {
            c.real(key, b, (0.0..1.0).contains(&b), "in [0, 1)");
        }
        c.real(
            "Training.adam_eps",
            t.adam_eps,
            t.adam_eps > 0.0,
            "> 0 (official: 1e-8)",
        );
        if let Some(g) = t.grad_clip {
            c.real(
                "Training.grad_clip",
                g,
                g > 0.0,
                "> 0 (or left out: no clipping)",
            );
        }
        c.at_least("Training.log_interval", t.log_interval, 1);
        c.at_least("Training.save_interval", t.save_interval, 1);
    }

    fn validate_testing(&self, c: &mut Checker) {
        let t = &self.testing;
        c.at_least("Testing.batch_size", t.batch_size, 1);
        c.at_least("Testing.num_test", t.num_test, 1);
        if let Some(i) = t.iters {
            c.at_least("Testing.iters", i, 1);
        }
    }
}

/// Collects validation errors, each as `key = value: must be ...`.
#[derive(Default)]
struct Checker {
    errors: Vec<String>,
}

impl Checker {
    fn fail(&mut self, key: &str, value: impl Display, allowed: impl Display) {
        self.errors.push(format!("{key} = {value}: {allowed}"));
    }

    fn at_least(&mut self, key: &str, v: usize, lo: usize) {
        if v < lo {
            self.fail(key, v, format!("must be >= {lo}"));
        }
    }

    fn int_between(&mut self, key: &str, v: usize, lo: usize, hi: usize) {
        if !(lo..=hi).contains(&v) {
            self.fail(key, v, format!("must be between {lo} and {hi}"));
        }
    }

    fn int_between_why(&mut self, key: &str, v: usize, lo: usize, hi: usize, why: &str) {
        if !(lo..=hi).contains(&v) {
            self.fail(key, v, format!("must be between {lo} and {hi} {why}"));
        }
    }

    /// A float: finite, and `ok` (the range check) described by `allowed`.
    fn real(&mut self, key: &str, v: f64, ok: bool, allowed: &str) {
        if !v.is_finite() || !ok {
            self.fail(key, v, format!("must be a finite number {allowed}"));
        }
    }

    fn list_positive(&mut self, key: &str, list: &[usize]) {
        if let Some(i) = list.iter().position(|&c| c == 0) {
            self.fail(
                &format!("{key}[{i}]"),
                0,
                format!("every entry of {key} must be >= 1 (channels of a layer)"),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parse errors: serde_yaml 0.9 already prefixes most messages with the path of the value
// (`Model.num_slots: invalid type: ...`), but not for unknown or missing keys, and it speaks in
// Rust types (`expected usize`). `explain_yaml_error` rewrites the message into
// `Section.key = value: what is allowed` form and keeps the line and column.

/// The keys of a section, as serde sees them (renamed), read from the derived `Deserialize`.
pub fn section_keys<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    probe::fields::<T>()
}

/// The allowed values of an enum key, as written in the YAML (aliases included).
pub fn enum_values<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    probe::variants::<T>()
}

mod probe {
    //! A Deserializer that only records the field (or variant) names that a derived
    //! `Deserialize` asks for, then stops.
    use serde::de::{self, Deserialize, Visitor};
    use serde::forward_to_deserialize_any;

    type Names = Option<&'static [&'static str]>;

    struct Probe<'a>(&'a mut Names);

    fn stop<T>() -> Result<T, de::value::Error> {
        Err(de::Error::custom("probe"))
    }

    impl<'de> de::Deserializer<'de> for Probe<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            stop()
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = Some(fields);
            stop()
        }

        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _: &'static str,
            variants: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = Some(variants);
            stop()
        }

        forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map identifier
            ignored_any
        }
    }

    fn names<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
        let mut names = None;
        let _ = T::deserialize(Probe(&mut names));
        names.unwrap_or(&[])
    }

    pub fn fields<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
        names::<T>()
    }

    pub fn variants<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
        names::<T>()
    }
}

const SECTIONS: [&str; 3] = ["Model", "Training", "Testing"];

fn keys_of(section: &str) -> &'static [&'static str] {
    match section {
        "Model" => section_keys::<ModelConfig>(),
        "Training" => section_keys::<TrainingConfig>(),
        "Testing" => section_keys::<TestingConfig>(),
        _ => &[],
    }
}

/// Allowed values of an enum-valued key, by its last path component.
fn enum_values_of(key: &str) -> Option<&'static [&'static str]> {
    Some(match key {
        "decoder" => enum_values::<DecoderKind>(),
        "precision" => enum_values::<Precision>(),
        "data_type" => enum_values::<DataType>(),
        "device" => enum_values::<Device>(),
        "on_nonfinite" => enum_values::<NonFinite>(),
        _ => return None,
    })
}

fn join_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// Names between backticks: "expected one of `a`, `b`" -> [a, b].
fn backticked(s: &str) -> Vec<&str> {
    s.split('`').skip(1).step_by(2).collect()
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// " (did you mean `x`?)" for a near miss, or where the key belongs when it is in another
/// section.
fn key_hint(key: &str, section: &str, allowed: &[&str]) -> String {
    let lower = key.to_ascii_lowercase();
    let best = allowed
        .iter()
        .map(|a| {
            let a_lower = a.to_ascii_lowercase();
            let d = if a_lower == lower || (lower.len() >= 3 && a_lower.starts_with(&lower)) {
                0
            } else {
                levenshtein(&lower, &a_lower)
            };
            (d, *a)
        })
        .min();
    if let Some((d, a)) = best {
        if d <= 2.max(key.len() / 4) {
            return format!(" (did you mean `{a}`?)");
        }
    }
    let elsewhere: Vec<&str> = SECTIONS
        .iter()
        .copied()
        .filter(|s| *s != section && keys_of(s).contains(&key))
        .collect();
    if elsewhere.is_empty() {
        String::new()
    } else if section.is_empty() {
        format!(
            " (`{key}` is a key of {}: indent it under that section)",
            elsewhere.join(" and ")
        )
    } else {
        format!(" (`{key}` belongs in {})", elsewhere.join(" or "))
    }
}

/// "integer `-3`" -> ("-3", "a negative integer"), "string \"x\"" -> ("\"x\"", "a string").
fn describe_value(desc: &str) -> (String, String) {
    let ticked = backticked(desc);
    if let Some(v) = ticked.first() {
        let kind = if desc.starts_with("integer") {
            if v.starts_with('-') {
                "a negative integer"
            } else if desc.contains(" as u128") || desc.contains(" as i128") {
                "an integer too large"
            } else {
                "an integer"
            }
        } else if desc.starts_with("floating point") {
            "a number with a fraction"
        } else if desc.starts_with("boolean") {
            "a boolean"
        } else {
            "a value"
        };
        return (v.to_string(), kind.to_string());
    }
    if let Some(s) = desc.strip_prefix("string ") {
        return (s.to_string(), "a string".into());
    }
    match desc {
        "unit value" => ("(empty)".into(), "no value".into()),
        "map" => ("{...}".into(), "a mapping".into()),
        "sequence" => ("[...]".into(), "a list".into()),
        other => (other.to_string(), other.to_string()),
    }
}

/// What a Rust-type expectation means in YAML terms.
fn describe_expected(exp: &str, key: &str) -> String {
    let last = key.rsplit('.').next().unwrap_or(key);
    let last = last.split('[').next().unwrap_or(last);
    if let Some(values) = enum_values_of(last) {
        if !key.contains('[') {
            return format!("one of {}", values.join(", "));
        }
    }
    match exp {
        "usize" | "u64" | "u32" => "a non-negative integer".into(),
        "f64" | "f32" => "a number, e.g. 0.0004".into(),
        "a boolean" => "true or false".into(),
        "a sequence" => "a list of integers, e.g. [64, 64, 64, 64]".into(),
        "struct Config" => {
            "a mapping with the sections Model, Training (required) and Testing".into()
        }
        "struct ModelConfig" | "struct TrainingConfig" | "struct TestingConfig" => {
            format!("a mapping of its keys ({})", keys_of(key).join(", "))
        }
        other => other.to_string(),
    }
}

/// Rewrite a serde_yaml error: key path first, then the value, then what is allowed; the
/// line and column (when serde_yaml has them) stay at the end.
fn explain_yaml_error(e: &serde_yaml::Error, text: &str) -> ConfigError {
    let full = e.to_string();
    let (msg, at) = match e.location() {
        Some(loc) => {
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            match full.strip_suffix(&suffix) {
                Some(m) => (m.to_string(), suffix),
                None => (full.clone(), String::new()),
            }
        }
        None => (full.clone(), String::new()),
    };
    // serde_yaml writes "path: message"; a path has no spaces or backticks.
    let (path, body) = match msg.split_once(": ") {
        Some((p, b)) if !p.is_empty() && !p.contains([' ', '`', '"']) => (p.to_string(), b),
        _ => (String::new(), msg.as_str()),
    };
    let out = if let Some(rest) = body.strip_prefix("unknown field `") {
        let key = rest.split('`').next().unwrap_or("");
        let allowed = backticked(rest.split_once(", expected").map_or("", |x| x.1));
        if path.is_empty() {
            format!(
                "{key}: unknown section; allowed sections: {}{}",
                allowed.join(", "),
                key_hint(key, "", &allowed)
            )
        } else {
            format!(
                "{}: unknown key in {path}; allowed keys: {}{}",
                join_path(&path, key),
                allowed.join(", "),
                key_hint(key, &path, &allowed)
            )
        }
    } else if let Some(rest) = body.strip_prefix("missing field `") {
        let key = rest.trim_end_matches('`');
        let full_key = join_path(&path, key);
        match (path.as_str(), key) {
            ("", "Model") if is_empty_document(text) => {
                return ConfigError(
                    "the config is empty: it needs the sections Model and Training (Testing \
                     is optional), e.g.\nModel: {}\nTraining:\n  data_type: tetrominoes"
                        .to_string(),
                );
            }
            ("", "Model") => "Model: missing section; it is required (write `Model: {}` to \
                use the official defaults for every key)"
                .to_string(),
            ("", "Training") => format!(
                "Training: missing section; it is required and needs at least data_type \
                 (one of {})",
                enum_values::<DataType>().join(", ")
            ),
            (_, k) => match enum_values_of(k) {
                Some(v) => format!(
                    "{full_key}: missing required key; allowed values: {}",
                    v.join(", ")
                ),
                None => format!("{full_key}: missing required key"),
            },
        }
    } else if let Some(rest) = body.strip_prefix("duplicate field `") {
        let key = rest.trim_end_matches('`');
        format!(
            "{}: given twice; each key may appear only once",
            join_path(&path, key)
        )
    } else if let Some(rest) = body.strip_prefix("unknown variant `") {
        let (value, allowed) = rest.split_once('`').unwrap_or((rest, ""));
        let allowed = backticked(allowed);
        let key = if path.is_empty() { "value" } else { &path };
        format!(
            "{key} = {value}: unknown value; allowed values: {}",
            allowed.join(", ")
        )
    } else if let Some((what, rest)) = body
        .strip_prefix("invalid type: ")
        .map(|r| ("wrong type", r))
        .or_else(|| {
            body.strip_prefix("invalid value: ")
                .map(|r| ("invalid value", r))
        })
    {
        let (desc, exp) = rest.rsplit_once(", expected ").unwrap_or((rest, ""));
        let (value, kind) = describe_value(desc);
        let what = if kind.starts_with("a negative") || kind.ends_with("too large") {
            "out of range"
        } else {
            what
        };
        let expected = describe_expected(exp, &path);
        if path.is_empty() {
            format!("the config is {kind} ({value}); expected {expected}")
        } else {
            format!("{path} = {value}: {what} ({kind}); expected {expected}")
        }
    } else if path.is_empty() {
        format!("invalid YAML: {msg}")
    } else {
        msg.clone()
    };
    ConfigError(format!("{out}{at}"))
}

fn is_empty_document(text: &str) -> bool {
    matches!(
        serde_yaml::from_str::<serde_yaml::Value>(text),
        Ok(serde_yaml::Value::Null)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIGS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/configs");
    /// The key table of the README; `config_reference_documents_every_key` checks it.
    const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");

    fn config_file(name: &str) -> PathBuf {
        Path::new(CONFIGS).join(name)
    }

    /// A config with the given `key: value` lines in Model and Training (data_type tetrominoes
    /// unless overridden) and an optional Testing section.
    fn yaml(model: &[&str], training: &[&str], testing: &[&str]) -> String {
        let mut s = String::from("Model:\n");
        if model.is_empty() {
            s = String::from("Model: {}\n");
        }
        for l in model {
            s += &format!("  {l}\n");
        }
        s += "Training:\n";
        if !training.iter().any(|l| l.starts_with("data_type:")) {
            s += "  data_type: tetrominoes\n";
        }
        for l in training {
            s += &format!("  {l}\n");
        }
        if !testing.is_empty() {
            s += "Testing:\n";
            for l in testing {
                s += &format!("  {l}\n");
            }
        }
        s
    }

    #[track_caller]
    fn error_of(text: &str) -> String {
        match Config::from_yaml(text) {
            Ok(c) => panic!("expected an error for\n{text}\ngot {c:?}"),
            Err(e) => e.0,
        }
    }

    #[track_caller]
    fn assert_contains_all(msg: &str, parts: &[&str]) {
        for p in parts {
            assert!(msg.contains(p), "error {msg:?}\ndoes not contain {p:?}");
        }
    }

    #[track_caller]
    fn assert_rejected(model: &[&str], training: &[&str], testing: &[&str], parts: &[&str]) {
        let text = yaml(model, training, testing);
        assert_contains_all(&error_of(&text), parts);
    }

    fn official_model() -> ModelConfig {
        ModelConfig {
            num_slots: 7,
            num_heads: 1,
            num_layers: 2,
            feat_size: 64,
            dropout: 0.0,
            implicit_diff: true,
            max_iter_fwd: 3,
            fwd_tol: None,
            resolution: 128,
            encoder_channels: vec![64; 4],
            decoder: DecoderKind::Broadcast,
            decoder_channels: None,
            decoder_init_size: 8,
            slot_size: 64,
            mlp_hidden_size: 128,
            eps: 1e-8,
            precision: Precision::Tf32,
            init: InitScheme::Official,
        }
    }

    fn official_training(data_type: DataType) -> TrainingConfig {
        TrainingConfig {
            data_type,
            data_root: None,
            num_train: None,
            max_objects: None,
            batch_size: 64,
            num_workers: 0,
            num_epochs: 100,
            max_steps: None,
            lr: 4e-4,
            weight_decay: 0.0,
            warmup_steps: 10_000,
            decay_rate: 0.5,
            decay_steps: 100_000,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            grad_clip: None,
            log_interval: 100,
            save_interval: 1000,
            save_dir: PathBuf::from("./checkpoints"),
            device: Device::Auto,
            seed: 0,
            on_nonfinite: NonFinite::Stop,
            cuda_graph: true,
        }
    }

    fn all_config_files() -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(CONFIGS)
            .expect("configs/ exists")
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        files.sort();
        files
    }

    // ---- the shipped files ------------------------------------------------------------------

    #[test]
    fn every_config_file_loads_and_validates() {
        let files = all_config_files();
        for name in [
            "baseline.yaml",
            "clevr6.yaml",
            "tetrominoes.yaml",
            "multi_dsprites.yaml",
            "quickstart.yaml",
        ] {
            assert!(
                files.contains(&config_file(name)),
                "configs/{name} is missing"
            );
        }
        for f in &files {
            let cfg = Config::load(f).unwrap_or_else(|e| panic!("{e}"));
            cfg.validate().unwrap();
        }
    }

    #[test]
    fn baseline_has_exactly_the_given_values() {
        let cfg = Config::load(&config_file("baseline.yaml")).unwrap();
        let expected = Config {
            model: ModelConfig {
                num_slots: 4,
                num_heads: 4,
                num_layers: 2,
                feat_size: 256,
                dropout: 0.1,
                implicit_diff: true,
                max_iter_fwd: 10,
                ..official_model()
            },
            training: TrainingConfig {
                batch_size: 64,
                num_workers: 4,
                num_epochs: 100,
                lr: 0.0001,
                weight_decay: 0.0001,
                log_interval: 100,
                save_interval: 1000,
                save_dir: PathBuf::from("./checkpoints"),
                device: Device::Cuda,
                ..official_training(DataType::Clevr)
            },
            testing: TestingConfig {
                data_type: Some(DataType::Clevr),
                batch_size: 64,
                num_workers: 4,
                ..TestingConfig::default()
            },
        };
        assert_eq!(cfg, expected);
        // CLEVR without data_root validates; the loader is told later (and notes() says so).
        assert!(cfg.training.data_root.is_none());
        assert!(cfg
            .notes()
            .iter()
            .any(|n| n.contains("Training.data_root is not set")));
    }

    #[test]
    fn clevr6_is_the_official_setup() {
        let cfg = Config::load(&config_file("clevr6.yaml")).unwrap();
        let m = &cfg.model;
        assert_eq!(
            ModelConfig {
                decoder_channels: None,
                ..m.clone()
            },
            official_model()
        );
        assert_eq!(m.decoder_channels(), vec![64; 5]);
        assert_eq!(m.decoder_upsamplings(), 4);
        assert_eq!(m.cell_applications(), 4);
        let t = &cfg.training;
        assert_eq!(
            TrainingConfig {
                data_root: None,
                max_objects: None,
                max_steps: None,
                save_interval: 1000,
                save_dir: PathBuf::from("./checkpoints"),
                ..t.clone()
            },
            official_training(DataType::Clevr)
        );
        assert_eq!(t.data_root.as_deref(), Some(Path::new("./data/CLEVR_v1.0")));
        assert_eq!(t.max_steps, Some(500_000));
        assert_eq!(t.max_objects, Some(6));
        assert!(cfg.notes().is_empty(), "{:?}", cfg.notes());
    }

    #[test]
    fn small_image_configs_have_the_requested_shapes() {
        let q = Config::load(&config_file("quickstart.yaml")).unwrap();
        assert_eq!(q.training.data_type, DataType::Tetrominoes);
        assert_eq!(q.model.resolution, 35);
        assert_eq!(q.model.decoder, DecoderKind::Full);
        assert_eq!(q.model.decoder_channels(), vec![16; 3]);
        assert_eq!((q.model.num_slots, q.model.slot_size), (4, 32));
        assert_eq!(q.model.mlp_hidden_size, 64);
        assert_eq!(q.training.batch_size, 16);
        assert!((100..=600).contains(&q.training.max_steps.unwrap()));
        assert_eq!(q.training.warmup_steps, 100);
        assert_eq!(
            (q.training.log_interval, q.training.save_interval),
            (20, 100)
        );
        assert_eq!(q.training.num_train, Some(60_000));
        assert_eq!(q.training.device, Device::Auto);

        let t = Config::load(&config_file("tetrominoes.yaml")).unwrap();
        assert_eq!(t.model.encoder_channels, vec![32; 4]);
        assert_eq!(t.model.decoder_channels(), vec![32; 3]);
        assert_eq!((t.model.num_slots, t.model.slot_size), (4, 64));
        assert_eq!(t.training.save_dir, PathBuf::from("./runs/tetrominoes"));
        assert_eq!(t.test_data_type(), DataType::Tetrominoes);

        let d = Config::load(&config_file("multi_dsprites.yaml")).unwrap();
        assert_eq!(d.model.resolution, 64);
        assert_eq!(d.model.num_slots, 6);
        assert_eq!(d.training.data_type, DataType::MultiDsprites);
        assert_eq!(d.training.max_objects, Some(5));
        assert_eq!(d.training.save_dir, PathBuf::from("./runs/multi_dsprites"));
        for c in [&q, &t, &d] {
            assert!(c.notes().is_empty(), "{:?}", c.notes());
        }
    }

    // ---- defaults -------------------------------------------------------------------------------

    #[test]
    fn omitted_keys_give_the_official_setup() {
        let expected = Config {
            model: official_model(),
            training: official_training(DataType::Tetrominoes),
            testing: TestingConfig::default(),
        };
        for text in [
            "Model: {}\nTraining: {data_type: tetrominoes}\n",
            "Model:\nTraining:\n  data_type: tetrominoes\n",
            "Model: {}\nTraining:\n  data_type: tetrominoes\nTesting: {}\n",
            "Model: {}\nTraining:\n  data_type: tetrominoes\nTesting:\n",
        ] {
            assert_eq!(Config::from_yaml(text).unwrap(), expected, "{text}");
        }
        let t = TestingConfig::default();
        assert_eq!((t.batch_size, t.num_test, t.num_workers), (64, 320, 0));
        assert_eq!(
            expected.test_iters(),
            4,
            "T + 1 with implicit differentiation"
        );
        assert_eq!(expected.test_data_type(), DataType::Tetrominoes);
        assert_eq!(official_model().decoder_channels(), vec![64; 5]);
        let full = ModelConfig {
            decoder: DecoderKind::Full,
            ..official_model()
        };
        assert_eq!(full.decoder_channels(), vec![32; 3]);
    }

    #[test]
    fn booleans_and_aliases_in_yaml_spellings() {
        let c = Config::from_yaml(&yaml(&["implicit_diff: False"], &["data_type: clevr"], &[]))
            .unwrap();
        assert!(!c.model.implicit_diff);
        assert_eq!(c.training.data_type, DataType::Clevr);
        assert_eq!(c.model.cell_applications(), 3);
    }

    #[test]
    fn testing_falls_back_to_training() {
        let c = Config::from_yaml(&yaml(
            &["max_iter_fwd: 5"],
            &["data_type: folder", "data_root: /data/x"],
            &["batch_size: 8"],
        ))
        .unwrap();
        assert_eq!(c.test_data_type(), DataType::Folder);
        assert_eq!(c.test_data_root(), Some(Path::new("/data/x")));
        assert_eq!(c.test_iters(), 6);
        let c = Config::from_yaml(&yaml(
            &[],
            &["data_type: folder", "data_root: /a"],
            &["data_root: /b", "iters: 7"],
        ))
        .unwrap();
        assert_eq!(c.test_data_root(), Some(Path::new("/b")));
        assert_eq!(c.test_iters(), 7);
    }

    // ---- to_yaml ----------------------------------------------------------------------------

    #[test]
    fn to_yaml_round_trips() {
        let mut configs: Vec<Config> = all_config_files()
            .iter()
            .map(|f| Config::load(f).unwrap())
            .collect();
        configs.push(Config::from_yaml("Model:\nTraining: {data_type: CLEVR}\n").unwrap());
        configs.push(
            Config::from_yaml(&yaml(
                &["fwd_tol: 0.001", "decoder: full", "precision: f32"],
                &[
                    "data_type: folder",
                    "data_root: \"dir with: colon/#x\"",
                    "grad_clip: 1.5",
                    "on_nonfinite: skip",
                    "seed: 18446744073709551615",
                    "lr: 3.0e-7",
                ],
                &["data_type: multi_dsprites", "iters: 5"],
            ))
            .unwrap(),
        );
        for c in configs {
            let text = c.to_yaml();
            let back = Config::from_yaml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(back, c, "{text}");
        }
    }

    #[test]
    fn to_yaml_writes_every_key() {
        let text = Config::load(&config_file("quickstart.yaml"))
            .unwrap()
            .to_yaml();
        for (section, keys) in [
            ("Model", section_keys::<ModelConfig>()),
            ("Training", section_keys::<TrainingConfig>()),
            ("Testing", section_keys::<TestingConfig>()),
        ] {
            assert!(text.contains(&format!("{section}:\n")), "{text}");
            for k in keys {
                assert!(
                    text.contains(&format!("\n  {k}:")),
                    "{k} missing in\n{text}"
                );
            }
        }
    }

    // ---- parse errors -----------------------------------------------------------------------

    #[test]
    fn unknown_keys_name_the_path_and_the_allowed_keys() {
        let e = error_of("Model:\n  num_slot: 4\nTraining:\n  data_type: CLEVR\n");
        assert_contains_all(
            &e,
            &[
                "Model.num_slot: unknown key in Model",
                "allowed keys: num_slots, num_heads",
                "did you mean `num_slots`?",
                "at line 2 column 3",
            ],
        );
        let e = error_of("Model: {}\nTraining:\n  data_type: CLEVR\n  bach_size: 3\n");
        assert_contains_all(
            &e,
            &[
                "Training.bach_size: unknown key in Training",
                "batch_size",
                "did you mean `batch_size`?",
                "line 4",
            ],
        );
        assert_rejected(
            &[],
            &[],
            &["iter: 3"],
            &[
                "Testing.iter: unknown key in Testing",
                "did you mean `iters`?",
            ],
        );
        assert_rejected(
            &["batch_size: 3"],
            &[],
            &[],
            &["Model.batch_size", "belongs in Training or Testing"],
        );
        let e = error_of("Model: {}\nTraining:\n  data_type: CLEVR\nTest: {}\n");
        assert_contains_all(
            &e,
            &[
                "Test: unknown section",
                "allowed sections: Model, Training, Testing",
                "did you mean `Testing`?",
                "at line 4 column 1",
            ],
        );
        let e = error_of("model: {}\nTraining:\n  data_type: CLEVR\n");
        assert_contains_all(&e, &["model: unknown section", "did you mean `Model`?"]);
        let e = error_of("Model: {}\nTraining:\n  data_type: CLEVR\nnum_slots: 3\n");
        assert_contains_all(&e, &["num_slots: unknown section", "key of Model"]);
    }

    #[test]
    fn wrong_types_name_the_path_the_value_and_the_type() {
        let e = error_of("Model:\n  num_slots: four\nTraining:\n  data_type: CLEVR\n");
        assert_eq!(
            e,
            "Model.num_slots = \"four\": wrong type (a string); expected a non-negative \
             integer at line 2 column 14"
        );
        assert_rejected(
            &["num_slots: 4.5"],
            &[],
            &[],
            &["Model.num_slots = 4.5", "expected a non-negative integer"],
        );
        assert_rejected(
            &[],
            &["lr: fast"],
            &[],
            &["Training.lr = \"fast\"", "expected a number"],
        );
        assert_rejected(
            &["implicit_diff: yes"],
            &[],
            &[],
            &["Model.implicit_diff = \"yes\"", "expected true or false"],
        );
        assert_rejected(
            &["encoder_channels: 64"],
            &[],
            &[],
            &["Model.encoder_channels = 64", "expected a list"],
        );
        assert_rejected(
            &["encoder_channels: [64, x]"],
            &[],
            &[],
            &["Model.encoder_channels[1] = \"x\"", "non-negative integer"],
        );
        assert_rejected(
            &["num_slots:"],
            &[],
            &[],
            &["Model.num_slots = (empty)", "non-negative integer"],
        );
        let e = error_of("Model: {}\nTraining: CLEVR\n");
        assert_contains_all(
            &e,
            &["Training = \"CLEVR\"", "a mapping of its keys (data_type"],
        );
        let e = error_of("hello");
        assert_contains_all(&e, &["the config is a string", "sections Model, Training"]);
    }

    #[test]
    fn negative_integers_are_out_of_range() {
        let e = error_of("Model: {}\nTraining:\n  data_type: CLEVR\n  batch_size: -3\n");
        assert_eq!(
            e,
            "Training.batch_size = -3: out of range (a negative integer); expected a \
             non-negative integer at line 4 column 15"
        );
        assert_rejected(
            &[],
            &["seed: -1"],
            &[],
            &["Training.seed = -1", "out of range"],
        );
        assert_rejected(
            &["num_slots: 99999999999999999999999"],
            &[],
            &[],
            &["Model.num_slots = 99999999999999999999999", "out of range"],
        );
    }

    #[test]
    fn unknown_enum_values_list_the_allowed_ones() {
        let cases: [(&[&str], &[&str], &[&str]); 6] = [
            (
                &["decoder: conv"],
                &[],
                &[
                    "Model.decoder = conv",
                    "allowed values: broadcast, full",
                    "line 2",
                ],
            ),
            (
                &["precision: fp16"],
                &[],
                &["Model.precision = fp16", "allowed values: f32, tf32"],
            ),
            (
                &[],
                &["device: gpu"],
                &["Training.device = gpu", "allowed values: auto, cpu, cuda"],
            ),
            (
                &[],
                &["data_type: clevr6"],
                &[
                    "Training.data_type = clevr6",
                    "CLEVR",
                    "folder",
                    "tetrominoes",
                    "multi_dsprites",
                ],
            ),
            (
                &[],
                &["on_nonfinite: ignore"],
                &[
                    "Training.on_nonfinite = ignore",
                    "allowed values: stop, skip",
                ],
            ),
            (
                &["decoder: {full: 1}"],
                &[],
                &["Model.decoder", "expected one of broadcast, full"],
            ),
        ];
        for (model, training, parts) in cases {
            assert_rejected(model, training, &[], parts);
        }
        let e = error_of("Model: {}\nTraining:\n  data_type: CLEVR\nTesting:\n  data_type: x\n");
        assert_contains_all(&e, &["Testing.data_type = x", "tetrominoes", "line 5"]);
    }

    #[test]
    fn missing_sections_and_keys() {
        let e = error_of("Training:\n  data_type: CLEVR\n");
        assert_contains_all(&e, &["Model: missing section", "Model: {}"]);
        let e = error_of("Model: {}\n");
        assert_contains_all(
            &e,
            &["Training: missing section", "data_type", "tetrominoes"],
        );
        let e = error_of("Model: {}\nTraining: {}\n");
        assert_contains_all(
            &e,
            &[
                "Training.data_type: missing required key",
                "CLEVR",
                "multi_dsprites",
            ],
        );
        for empty in ["", "# only a comment\n"] {
            assert_contains_all(
                &error_of(empty),
                &["the config is empty", "Model", "Training"],
            );
        }
        let e = error_of("Model: {}\nModel: {}\nTraining:\n  data_type: CLEVR\n");
        assert_contains_all(&e, &["Model: given twice"]);
        let e = error_of("Model:\n\tnum_slots: 4\n");
        assert_contains_all(&e, &["invalid YAML", "line 2"]);
    }

    // ---- validation -------------------------------------------------------------------------

    #[test]
    #[rustfmt::skip]
    fn validation_errors_name_key_value_and_range() {
        // (Model lines, Training lines, Testing lines, parts the error must contain)
        let bad = assert_rejected;
        bad(&["num_slots: 0"], &[], &[], &["Model.num_slots = 0: must be between 1 and 64"]);
        bad(&["num_slots: 65"], &[], &[], &["Model.num_slots = 65", "between 1 and 64"]);
        bad(&["num_heads: 0"], &[], &[], &["Model.num_heads = 0: must be >= 1"]);
        bad(&["num_heads: 3"], &[], &[], &["Model.num_heads = 3: slot_size (64) must be divisible by num_heads", "allowed: 1, 2, 4, 8, 16, 32, 64"]);
        bad(&["num_layers: 0"], &[], &[], &["Model.num_layers = 0: must be >= 1"]);
        bad(&["feat_size: 0"], &[], &[], &["Model.feat_size = 0: must be >= 1"]);
        bad(&["dropout: 1.5"], &[], &[], &["Model.dropout = 1.5: must be", "in [0, 1)"]);
        bad(&["dropout: 1.0"], &[], &[], &["Model.dropout = 1:", "in [0, 1)"]);
        bad(&["dropout: -0.1"], &[], &[], &["Model.dropout = -0.1"]);
        bad(&["dropout: .nan"], &[], &[], &["Model.dropout = NaN", "finite"]);
        bad(&["max_iter_fwd: 0"], &[], &[], &["Model.max_iter_fwd = 0: must be >= 1"]);
        bad(&["implicit_diff: false", "fwd_tol: 0.001"], &[], &[], &["Model.fwd_tol = 0.001", "only allowed with implicit_diff: true", "back-propagated"]);
        bad(&["fwd_tol: 0"], &[], &[], &["Model.fwd_tol = 0", "> 0"]);
        bad(&["fwd_tol: .inf"], &[], &[], &["Model.fwd_tol = inf", "finite"]);
        bad(&["resolution: 4", "decoder: full"], &[], &[], &["Model.resolution = 4: must be between 8 and 1024"]);
        bad(&["resolution: 2048"], &[], &[], &["Model.resolution = 2048", "1024"]);
        bad(&["resolution: 100"], &[], &[], &["Model.resolution = 100", "decoder_init_size (8) × 2^n", "nearest allowed: 64 or 128", "decoder: full"]);
        bad(&["resolution: 35"], &[], &[], &["Model.resolution = 35", "nearest allowed: 32 or 64"]);
        bad(&["resolution: 8", "decoder_init_size: 16"], &[], &[], &["Model.resolution = 8", "at least decoder_init_size (16)"]);
        bad(&["decoder_init_size: 0"], &[], &[], &["Model.decoder_init_size = 0: must be >= 1"]);
        bad(&["encoder_channels: []"], &[], &[], &["Model.encoder_channels = []", "at least one"]);
        bad(&["encoder_channels: [64, 0, 64]"], &[], &[], &["Model.encoder_channels[1] = 0", ">= 1"]);
        bad(&["decoder_channels: [64, 64, 64]"], &[], &[], &["Model.decoder_channels = [64, 64, 64]", "needs 4 stride-2 layers", "at least 4 entries"]);
        bad(&["decoder: full", "decoder_channels: []"], &[], &[], &["Model.decoder_channels = []", "decoder: full", "at least one"]);
        bad(&["decoder_channels: [64, 64, 0, 64, 64]"], &[], &[], &["Model.decoder_channels[2] = 0"]);
        bad(&["slot_size: 0"], &[], &[], &["Model.slot_size = 0: must be >= 1"]);
        bad(&["mlp_hidden_size: 0"], &[], &[], &["Model.mlp_hidden_size = 0"]);
        bad(&["eps: 0"], &[], &[], &["Model.eps = 0: must be a finite number > 0"]);
        bad(&["eps: -.inf"], &[], &[], &["Model.eps = -inf"]);
        bad(&[], &["batch_size: 0"], &[], &["Training.batch_size = 0: must be >= 1"]);
        bad(&[], &["num_epochs: 0"], &[], &["Training.num_epochs = 0", "or set max_steps"]);
        bad(&[], &["max_steps: 0"], &[], &["Training.max_steps = 0: must be >= 1"]);
        bad(&[], &["lr: .nan"], &[], &["Training.lr = NaN: must be a finite number > 0"]);
        bad(&[], &["lr: .inf"], &[], &["Training.lr = inf"]);
        bad(&[], &["lr: 0"], &[], &["Training.lr = 0", "> 0"]);
        bad(&[], &["weight_decay: -1"], &[], &["Training.weight_decay = -1", ">= 0"]);
        bad(&[], &["decay_rate: 0"], &[], &["Training.decay_rate = 0", "in (0, 1]"]);
        bad(&[], &["decay_rate: 1.5"], &[], &["Training.decay_rate = 1.5"]);
        bad(&[], &["decay_steps: 0"], &[], &["Training.decay_steps = 0: must be >= 1"]);
        bad(&[], &["adam_beta1: 1"], &[], &["Training.adam_beta1 = 1", "in [0, 1)"]);
        bad(&[], &["adam_beta2: -0.5"], &[], &["Training.adam_beta2 = -0.5"]);
        bad(&[], &["adam_eps: 0"], &[], &["Training.adam_eps = 0", "> 0"]);
        bad(&[], &["grad_clip: 0"], &[], &["Training.grad_clip = 0", "> 0"]);
        bad(&[], &["grad_clip: .nan"], &[], &["Training.grad_clip = NaN"]);
        bad(&[], &["log_interval: 0"], &[], &["Training.log_interval = 0: must be >= 1"]);
        bad(&[], &["save_interval: 0"], &[], &["Training.save_interval = 0: must be >= 1"]);
        bad(&[], &["num_train: 0"], &[], &["Training.num_train = 0: must be >= 1"]);
        bad(&[], &["max_objects: 0"], &[], &["Training.max_objects = 0"]);
        bad(&[], &["max_objects: 7"], &[], &["Training.max_objects = 7", "between 1 and 6", "tetrominoes"]);
        bad(&[], &[], &["batch_size: 0"], &["Testing.batch_size = 0: must be >= 1"]);
        bad(&[], &[], &["num_test: 0"], &["Testing.num_test = 0: must be >= 1"]);
        bad(&[], &[], &["iters: 0"], &["Testing.iters = 0: must be >= 1"]);
    }

    #[test]
    fn valid_edge_values_are_accepted() {
        let ok = |m: &[&str], t: &[&str]| {
            let text = yaml(m, t, &[]);
            Config::from_yaml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        };
        ok(
            &[
                "num_slots: 1",
                "num_heads: 64",
                "dropout: 0.0",
                "fwd_tol: 0.01",
            ],
            &[],
        );
        ok(
            &["num_slots: 64", "dropout: 0.99"],
            &["num_epochs: 0", "max_steps: 1"],
        );
        ok(&["resolution: 8"], &[]); // broadcast with no upsampling
        ok(
            &["resolution: 1024", "decoder: full"],
            &["decay_rate: 1", "adam_beta1: 0"],
        );
        ok(
            &[
                "resolution: 1024",
                "decoder_channels: [4, 4, 4, 4, 4, 4, 4]",
            ],
            &[],
        );
        ok(&["resolution: 35", "decoder: full"], &["max_objects: 6"]);
        ok(
            &[
                "resolution: 64",
                "decoder_init_size: 4",
                "decoder_channels: [8, 8, 8, 8]",
            ],
            &[],
        );
        ok(
            &[],
            &[
                "data_type: multi_dsprites",
                "max_objects: 20",
                "warmup_steps: 0",
            ],
        );
        ok(
            &[],
            &["data_type: CLEVR", "max_objects: 10", "grad_clip: 1"],
        );
    }

    #[test]
    fn all_problems_are_reported_together() {
        let e = error_of(&yaml(&["num_slots: 0", "dropout: 2"], &["lr: -1"], &[]));
        assert_contains_all(
            &e,
            &[
                "3 problems",
                "Model.num_slots = 0",
                "Model.dropout = 2",
                "Training.lr = -1",
            ],
        );
        assert_eq!(e.lines().count(), 4, "{e}");
    }

    #[test]
    fn decoder_upsamplings_terminates_on_bad_input() {
        let m = ModelConfig {
            decoder_init_size: 0,
            ..official_model()
        };
        assert_eq!(m.decoder_upsamplings(), 7); // counted from 1
        let m = ModelConfig {
            resolution: usize::MAX,
            ..official_model()
        };
        assert!(m.decoder_upsamplings() < 64);
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, yaml(&["dropout: 1.5"], &[], &[])).unwrap();
        let e = Config::load(&path).unwrap_err().0;
        assert!(
            e.starts_with(&format!("{}: Model.dropout = 1.5", path.display())),
            "{e}"
        );
        let e = Config::load(&dir.path().join("missing.yaml"))
            .unwrap_err()
            .0;
        assert_contains_all(&e, &["cannot read config", "missing.yaml"]);
    }

    #[test]
    fn notes_report_ignored_and_missing_things() {
        let c = Config::from_yaml(&yaml(
            &["num_slots: 3"],
            &["data_root: ./x", "max_objects: 3"],
            &[],
        ))
        .unwrap();
        let notes = c.notes().join("\n");
        assert_contains_all(
            &notes,
            &[
                "Training.data_root = ./x: ignored",
                "Model.num_slots = 3: fewer slots",
            ],
        );
    }

    #[test]
    fn key_and_enum_lists_come_from_the_schema() {
        assert_eq!(section_keys::<ModelConfig>().len(), 18);
        assert_eq!(section_keys::<TrainingConfig>().len(), 24);
        assert_eq!(section_keys::<TestingConfig>().len(), 6);
        assert_eq!(section_keys::<Config>(), &SECTIONS[..]);
        assert_eq!(enum_values::<Device>(), &["auto", "cpu", "cuda"]);
    }

    #[test]
    fn config_reference_documents_every_key() {
        let doc = std::fs::read_to_string(REFERENCE).unwrap_or_else(|e| panic!("{REFERENCE}: {e}"));
        for (section, keys) in [
            ("Model", section_keys::<ModelConfig>()),
            ("Training", section_keys::<TrainingConfig>()),
            ("Testing", section_keys::<TestingConfig>()),
        ] {
            let start = doc
                .find(&format!("## {section}"))
                .unwrap_or_else(|| panic!("no `## {section}` heading"));
            let body = &doc[start..];
            let body = &body[..body[3..].find("\n## ").map_or(body.len(), |i| i + 3)];
            for k in keys {
                assert!(
                    body.contains(&format!("| `{k}` |")),
                    "{section}.{k} not documented"
                );
            }
        }
    }
}
