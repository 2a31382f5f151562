//! `slotfix bench`: the time of one training step of a config, on random batches.

use crate::backend::{Backend, KernelProfile};
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
    /// Device time per kernel, when asked for and the backend has kernels (`--kernels`); Err
    /// when the timings could not be read.
    pub kernels: Option<Result<StepKernels, String>>,
}

/// Where the device time of a training step goes, kernel by kernel: eager steps with every
/// launch bracketed by timing events.
#[derive(Clone, Debug)]
pub struct StepKernels {
    /// Steps timed.
    pub steps: usize,
    /// Wall time per timed step (eager, with the events), ms.
    pub step_ms: f64,
    /// Summed over the timed steps, slowest first.
    pub profile: KernelProfile,
}

impl StepKernels {
    /// A Markdown table, per step: launches and milliseconds of each kernel and its share of
    /// the kernels' time, then how that time compares with the step's.
    pub fn table(&self) -> String {
        let n = self.steps.max(1) as f64;
        let kernels = &self.profile.kernels;
        let total: f64 = kernels.iter().map(|k| k.ms).sum();
        let launches: u64 = kernels.iter().map(|k| k.launches).sum();
        let mut s = String::from(
            "| kernel | launches / step | ms / step | share |\n| --- | ---: | ---: | ---: |\n",
        );
        for k in kernels {
            s += &format!(
                "| {} | {} | {:.3} | {:.1} % |\n",
                k.name,
                k.launches as f64 / n,
                k.ms / n,
                100.0 * k.ms / total.max(f64::MIN_POSITIVE)
            );
        }
        s += &format!(
            "| all kernels | {} | {:.3} | |\n\n{} eager steps with every launch timed{}: {:.3} ms of \
             kernel time per step in {:.3} ms of wall time per step (the rest: gaps between \
             launches, copies and memsets, the host, and the events themselves)",
            launches as f64 / n,
            total / n,
            self.steps,
            if self.profile.host_clock {
                " (by the host's clock: an emulator, not a GPU)"
            } else {
                ""
            },
            total / n,
            self.step_ms
        );
        s
    }
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
/// so a step's time is its execution, not just its queueing. With `kernels`, up to 5 more
/// steps then run eagerly with each kernel launch timed ([`StepKernels`]), where the backend
/// has kernels.
pub fn bench_step<B: Backend>(be: B, cfg: &Config, steps: usize, kernels: bool) -> StepBench {
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
    let graph = sess.replaying();
    let device_mem = sess.be.device_memory_used();
    let kernels = (kernels && sess.be.profile_kernels(false)).then(|| {
        sess.run_eagerly();
        // One eager step untimed: the first after replays.
        sess.train_step(&images);
        sess.opt_report();
        let n = steps.clamp(1, 5);
        sess.be.profile_kernels(true);
        let t = Instant::now();
        for _ in 0..n {
            sess.train_step(&images);
            sess.opt_report();
        }
        let step_ms = t.elapsed().as_secs_f64() * 1000.0 / n as f64;
        sess.be.profile_kernels(false);
        sess.be.kernel_profile().map(|profile| StepKernels {
            steps: n,
            step_ms,
            profile,
        })
    });
    StepBench {
        backend: describe,
        batch: b,
        resolution: res,
        slots: cfg.model.num_slots,
        iters: cfg.model.max_iter_fwd,
        implicit: cfg.model.implicit_diff,
        graph,
        median_ms: ms[ms.len() / 2],
        min_ms: ms[0],
        max_ms: ms[ms.len() - 1],
        steps: ms.len(),
        peak_rss: peak_rss(),
        device_mem,
        planned_bytes: MemoryPlan::new(&sess.be, &sess.model.arch, b, 0).total(),
        kernels,
    }
}
