//! `slotfix bench`: the time of one training step of a config, on random batches.

use crate::backend::Backend;
use crate::config::Config;
use crate::rng::{stream, Philox};
use crate::train::{MemoryPlan, Session};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct StepBench {
    pub backend: String,
    pub batch: usize,
    pub resolution: usize,
    pub slots: usize,
    pub iters: usize,
    pub implicit: bool,
    /// The timed steps were replays of a captured step (a CUDA graph).
    pub graph: bool,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub steps: usize,
    /// Peak resident memory of the process (Linux VmHWM), bytes.
    pub peak_rss: Option<u64>,
    /// Device memory in use after the timed steps (every training buffer is allocated once,
    /// before the second step), bytes; None on the CPU.
    pub device_mem: Option<u64>,
    /// The buffers of the session and its workspace, as `MemoryPlan` predicts them, bytes.
    pub planned_bytes: u64,
}

impl StepBench {
    pub fn images_per_s(&self) -> f64 {
        self.batch as f64 / (self.median_ms / 1000.0)
    }
    pub fn table(&self) -> String {
        format!(
            "| backend | config | ms / step (median of {}) | min | max | images / s | peak memory |\n\
             | --- | --- | ---: | ---: | ---: | ---: | ---: |\n\
             | {} | {}×{}, K={}, B={}, {} iterations, {} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            self.steps,
            if self.graph {
                format!("{}, CUDA graph", self.backend)
            } else {
                self.backend.clone()
            },
            self.resolution,
            self.resolution,
            self.slots,
            self.batch,
            self.iters,
            if self.implicit { "implicit" } else { "BPTT" },
            self.median_ms,
            self.min_ms,
            self.max_ms,
            self.images_per_s(),
            {
                let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
                let measured = match (self.device_mem, self.peak_rss) {
                    (Some(d), _) => format!("{:.2} GiB on the device", gib(d)),
                    (None, Some(b)) => format!("{:.2} GiB RSS", gib(b)),
                    (None, None) => "n/a".into(),
                };
                format!("{measured} ({:.2} GiB planned)", gib(self.planned_bytes))
            }
        )
    }
}

/// Peak resident set size from /proc (None elsewhere).
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Time `steps` training steps (after 2 warm-up steps, the second of which is captured when
/// the step runs as a CUDA graph) of `cfg` on random images in [-1, 1].
/// Each timed step ends with a read of the optimizer's bookkeeping, which waits for the device,
/// so a step's time is its execution, not just its queueing.
pub fn bench_step<B: Backend>(be: B, cfg: &Config, steps: usize) -> StepBench {
    let describe = be.describe();
    let mut sess = Session::new(be, cfg.clone());
    let (b, res) = (cfg.training.batch_size, cfg.model.resolution);
    let rng = Philox::new(cfg.training.seed);
    let images: Vec<f32> = (0..b * res * res * 3)
        .map(|i| (2.0 * rng.uniform(stream::RANDOM_BATCH, 0, i as u64) - 1.0) as f32)
        .collect();
    for _ in 0..2 {
        sess.train_step(&images);
    }
    sess.opt_report();
    let mut ms: Vec<f64> = (0..steps.max(1))
        .map(|_| {
            let t = Instant::now();
            sess.train_step(&images);
            sess.opt_report();
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    StepBench {
        backend: describe,
        batch: b,
        resolution: res,
        slots: cfg.model.num_slots,
        iters: cfg.model.max_iter_fwd,
        implicit: cfg.model.implicit_diff,
        graph: sess.replaying(),
        median_ms: ms[ms.len() / 2],
        min_ms: ms[0],
        max_ms: ms[ms.len() - 1],
        steps: ms.len(),
        peak_rss: peak_rss(),
        device_mem: sess.be.device_memory_used(),
        planned_bytes: MemoryPlan::new(&sess.be, &sess.model.arch, b, 0).total(),
    }
}
