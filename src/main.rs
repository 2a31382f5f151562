//! The `slotfix` command line.

use clap::{Args, Parser, Subcommand};
use slotfix::backend::{Backend, SizeCounter};
use slotfix::checkpoint::Checkpoint;
use slotfix::config::Config;
use slotfix::cpu::Cpu;
use slotfix::data::Split;
use slotfix::device::{self, Chosen};
use slotfix::train::{self, MemoryPlan, Session, TrainOptions};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "slotfix",
    version,
    about = "Slot Attention object discovery with implicit differentiation",
    long_about = "Slot Attention object discovery (Locatello et al. 2020) trained with implicit \
differentiation (Chang et al. 2022).\n\nThe configuration is a YAML file with Model, Training and \
Testing sections (see configs/ and the README). `slotfix --cfg FILE` is short for \
`slotfix train --cfg FILE`.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    train: Option<TrainArgs>,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (checkpoints, metrics.jsonl, pictures and curves go to Training.save_dir).
    Train(TrainArgs),
    /// Evaluate a checkpoint on the test split: MSE and FG-ARI, as a table and as JSON.
    Eval {
        /// The YAML config.
        #[arg(long, value_name = "FILE")]
        cfg: PathBuf,
        /// A checkpoint (ckpt_*.safetensors of a run's save_dir).
        #[arg(long, value_name = "FILE")]
        ckpt: PathBuf,
        /// Slot-attention cell applications (default: Testing.iters, else as in training).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        iters: Option<u32>,
        /// Also write the result as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Draw input, reconstruction, slots and segmentation of test examples into a PNG.
    Render {
        /// The YAML config.
        #[arg(long, value_name = "FILE")]
        cfg: PathBuf,
        /// A checkpoint (ckpt_*.safetensors of a run's save_dir).
        #[arg(long, value_name = "FILE")]
        ckpt: PathBuf,
        #[arg(long, value_name = "FILE", default_value = "render.png")]
        out: PathBuf,
        /// Number of test examples.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
        n: u32,
        /// Slot-attention cell applications (default: Testing.iters, else as in training).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        iters: Option<u32>,
    },
    /// Write one training step (inputs, noise, dropout masks, parameters, loss, gradients) to a
    /// safetensors file, to replay it in another framework.
    DumpStep {
        /// The YAML config (its Training section picks the batch: data, seed, batch size).
        #[arg(long, value_name = "FILE")]
        cfg: PathBuf,
        /// Parameters to start from (default: the seeded initialisation).
        #[arg(long, value_name = "FILE")]
        ckpt: Option<PathBuf>,
        /// The safetensors file to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Override Training.batch_size (a few images are enough to compare a step).
        #[arg(long, value_name = "N")]
        batch_size: Option<usize>,
    },
    /// Time the training step of a config (forward + backward + Adam) on random batches.
    Bench {
        /// The YAML config.
        #[arg(long, value_name = "FILE")]
        cfg: PathBuf,
        /// Timed steps (after 2 warm-up steps).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
        steps: u32,
        /// Override Training.batch_size (e.g. to compare with a figure at another batch size).
        #[arg(long, value_name = "N")]
        batch_size: Option<usize>,
        /// Then time every kernel launch of a few more (eager) steps and print where the
        /// device time goes, kernel by kernel (CUDA backend).
        #[arg(long)]
        kernels: bool,
    },
    /// Compile every CUDA kernel with NVRTC into the kernel cache for a GPU architecture. Needs
    /// libnvrtc only, no GPU: on a cluster's login node, say, so that the GPU job's first
    /// command starts without compiling (minutes of one core). The cache is the one every
    /// command uses: $SLOTFIX_KERNEL_CACHE, else ~/.cache/slotfix/kernels.
    CompileKernels {
        /// The GPU's architecture: sm_ and its compute capability, e.g. sm_80 (A100), sm_86
        /// (RTX 30), sm_89 (L4, RTX 40), sm_90 (H100, H200).
        #[arg(long, value_name = "ARCH", default_value = "sm_90")]
        arch: String,
    },
    /// Load and validate a config, print it with every default filled in.
    Check {
        /// The YAML config.
        #[arg(long, value_name = "FILE")]
        cfg: PathBuf,
        /// Print the model's parameter tensors (checkpoint names, shapes) instead.
        #[arg(long)]
        params: bool,
    },
}

#[derive(Args)]
struct TrainArgs {
    /// The YAML config.
    #[arg(long, value_name = "FILE")]
    cfg: PathBuf,
    /// Continue from the newest readable checkpoint in Training.save_dir.
    #[arg(long)]
    resume: bool,
    /// Delete an earlier run's checkpoints and metrics in Training.save_dir and start again.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Override Training.max_steps.
    #[arg(long, value_name = "N")]
    max_steps: Option<usize>,
}

/// `cfg` with Training.batch_size replaced by a command's `--batch-size`, validated again.
fn with_batch_size(mut cfg: Config, batch_size: Option<usize>) -> Result<Config, String> {
    if let Some(b) = batch_size {
        cfg.training.batch_size = b;
        cfg.validate().map_err(|e| format!("--batch-size: {e}"))?;
    }
    Ok(cfg)
}

fn load_config(path: &Path) -> Result<Config, String> {
    let cfg = Config::load(path).map_err(|e| e.to_string())?;
    for note in cfg.notes() {
        eprintln!("note: {note}");
    }
    Ok(cfg)
}

/// One command with its config loaded, ready to run on a backend.
enum Job {
    Train(TrainOptions),
    Eval {
        ckpt: PathBuf,
        iters: Option<usize>,
        json: Option<PathBuf>,
    },
    Render {
        ckpt: PathBuf,
        out: PathBuf,
        n: usize,
        iters: Option<usize>,
    },
    DumpStep {
        ckpt: Option<PathBuf>,
        out: PathBuf,
    },
    Bench {
        steps: usize,
        kernels: bool,
    },
}

/// Pick the backend the config asks for and run the job on it.
fn dispatch(cfg: &Config, job: Job) -> Result<ExitCode, String> {
    let (chosen, note) = device::select(cfg.training.device)?;
    if let Some(n) = note {
        eprintln!("{n}");
    }
    // `auto` falls back to the CPU when the CUDA backend cannot open on the GPU it found (an
    // older GPU than the kernels need, a broken libnvrtc); `cuda` stops with the reason.
    let cuda = match chosen {
        Chosen::Cuda => {
            // A misspelt SLOTFIX_CUDA_DISABLE is an error either way, not a reason to fall back.
            let fast = slotfix::cuda::FastPaths::from_env()?;
            match device::cuda_backend(fast) {
                Ok(be) => Some(be),
                Err(e) if cfg.training.device == slotfix::config::Device::Auto => {
                    eprintln!("device: auto → cpu instead: the CUDA backend cannot be used: {e}");
                    None
                }
                Err(e) => return Err(e),
            }
        }
        Chosen::Cpu => None,
    };
    match cuda {
        None => {
            if cfg.model.precision != slotfix::config::Precision::F32 {
                eprintln!(
                    "note: Model.precision applies to the CUDA backend; the CPU computes in f32"
                );
            }
            if std::env::var_os(slotfix::cuda::fastpaths::DISABLE_ENV)
                .is_some_and(|v| !v.is_empty())
            {
                eprintln!(
                    "note: {} applies to the CUDA backend; ignored on the CPU",
                    slotfix::cuda::fastpaths::DISABLE_ENV
                );
            }
            run_job(Cpu::<f32>::new(), cfg, job)
        }
        Some(be) => {
            let be = be.with_precision(cfg.model.precision);
            eprintln!("backend: {}", be.describe());
            run_job(be, cfg, job)
        }
    }
}

/// A session on `be` with the parameters (and step) of `ckpt` if given.
fn session_from<B: Backend>(
    be: B,
    cfg: &Config,
    ckpt: Option<&Path>,
) -> Result<Session<B>, String> {
    let mut sess = Session::new(be, cfg.clone());
    if let Some(p) = ckpt {
        let c = Checkpoint::load(p)?;
        let saved = Config::from_yaml(c.meta("config")?)
            .map_err(|e| format!("{}: config: {e}", p.display()))?;
        if saved.model != cfg.model {
            return Err(format!(
                "{}: trained with a different Model section than the --cfg file",
                p.display()
            ));
        }
        sess.load_params(&c)
            .map_err(|e| format!("{}: {e}", p.display()))?;
        sess.step = c
            .meta("step")?
            .parse()
            .map_err(|e| format!("{}: step: {e}", p.display()))?;
    }
    Ok(sess)
}

fn run_job<B: Backend>(be: B, cfg: &Config, job: Job) -> Result<ExitCode, String> {
    // Stop with advice, not an allocation failure halfway in, when the buffers cannot fit.
    // (Training checks this itself, after it has opened the data.)
    let arch = slotfix::model::Arch::new(&cfg.model);
    let plan = match &job {
        Job::Train(_) => None,
        Job::Eval { .. } => Some(MemoryPlan::new(&be, &arch, 0, cfg.testing.batch_size)),
        Job::Render { n, .. } => Some(MemoryPlan::new(&be, &arch, 0, *n)),
        Job::DumpStep { .. } | Job::Bench { .. } => {
            Some(MemoryPlan::new(&be, &arch, cfg.training.batch_size, 0))
        }
    };
    if let Some(p) = plan {
        eprintln!("{}", p.check(be.memory_available())?);
    }
    match job {
        Job::Train(opts) => {
            // Ctrl-C: finish the current step, save a checkpoint, exit with 130. A second
            // interrupt quits at once, unless it comes within a second of the first: `timeout
            // -s INT` (coreutils) signals the process and then its whole process group, so one
            // timeout can deliver two SIGINTs back to back, and that must not lose the save.
            let first_interrupt = std::sync::Mutex::new(None::<std::time::Instant>);
            ctrlc::set_handler(move || {
                let mut first = first_interrupt.lock().unwrap_or_else(|e| e.into_inner());
                match *first {
                    None => {
                        *first = Some(std::time::Instant::now());
                        train::INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
                        eprintln!(
                            "\ninterrupt: saving a checkpoint after this step (Ctrl-C again to \
                             quit at once)"
                        );
                    }
                    Some(t) if t.elapsed() < std::time::Duration::from_secs(1) => {}
                    Some(_) => {
                        eprintln!("second interrupt: quitting without saving");
                        std::process::exit(130);
                    }
                }
            })
            .map_err(|e| format!("cannot install the Ctrl-C handler: {e}"))?;
            // A failure inside a step (a CUDA error, a bug) panics; say what survives it.
            let s = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                train::train(be, cfg, &opts)
            }))
            .map_err(|panic| {
                format!(
                    "training failed: {}\nthe checkpoints already in {} are intact; continue \
                     from the newest with --resume (run with RUST_BACKTRACE=1 to report this)",
                    train::panic_message(panic.as_ref()),
                    cfg.training.save_dir.display()
                )
            })??;
            if let (Some(f), Some(l)) = (s.first_loss, s.last_loss) {
                eprintln!("loss: first step {f:.5}, last step {l:.5}");
            }
            if let Some(e) = s.last_eval {
                let ari = e
                    .fg_ari
                    .map(|a| format!(", FG-ARI {:.1}%", 100.0 * a))
                    .unwrap_or_default();
                eprintln!(
                    "last evaluation on {} test images: MSE {:.5}{ari}",
                    e.images, e.mse
                );
            }
            Ok(if s.interrupted {
                ExitCode::from(130)
            } else {
                ExitCode::SUCCESS
            })
        }
        Job::Eval { ckpt, iters, json } => {
            let sess = session_from(be, cfg, Some(&ckpt))?;
            let ds = train::open_data(cfg, Split::Test)?;
            let applications = iters.unwrap_or(cfg.test_iters());
            let t = std::time::Instant::now();
            let pb = indicatif::ProgressBar::new(ds.len() as u64);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "evaluating {pos}/{len} images [{bar:30}] ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            let r = sess.evaluate_with_progress(ds.as_ref(), applications, None, Some(&pb));
            pb.finish_and_clear();
            println!("| checkpoint | step | test images | iterations | MSE | FG-ARI (%) |");
            println!("| --- | ---: | ---: | ---: | ---: | ---: |");
            let ari = r
                .fg_ari
                .map(|a| format!("{:.2}", 100.0 * a))
                .unwrap_or_else(|| "n/a (no masks)".into());
            println!(
                "| {} | {} | {} | {} | {:.6} | {ari} |",
                ckpt.display(),
                sess.step,
                r.images,
                r.iters,
                r.mse
            );
            let value = serde_json::json!({ "checkpoint": ckpt.display().to_string(), "step": sess.step,
                "result": r, "seconds": t.elapsed().as_secs_f64() });
            println!("{value}");
            if let Some(p) = json {
                slotfix::checkpoint::write_atomic(&p, format!("{value}\n").as_bytes(), None)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Job::Render {
            ckpt,
            out,
            n,
            iters,
        } => {
            let sess = session_from(be, cfg, Some(&ckpt))?;
            let ds = train::open_data(cfg, Split::Test)?;
            let applications = iters.unwrap_or(cfg.test_iters());
            slotfix::eval::render_grid(&sess.be, &sess.model, ds.as_ref(), n, applications, &out)?;
            eprintln!("wrote {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Job::DumpStep { ckpt, out } => {
            let mut sess = session_from(be, cfg, ckpt.as_deref())?;
            let ds = train::open_data(cfg, Split::Train)?;
            let c = slotfix::dump::dump_step(&mut sess, ds.as_ref())?;
            c.save(&out)?;
            eprintln!(
                "wrote {} ({} tensors, step {})",
                out.display(),
                c.tensors.len(),
                sess.step
            );
            Ok(ExitCode::SUCCESS)
        }
        Job::Bench { steps, kernels } => {
            let b = slotfix::bench::bench_step(be, cfg, steps, kernels);
            println!("{}", b.table());
            match b.kernels {
                Some(Ok(k)) => println!("\n{}", k.table()),
                Some(Err(e)) => return Err(format!("timing the kernels: {e}")),
                None if kernels => {
                    eprintln!("note: --kernels times CUDA kernels; this backend has none")
                }
                None => {}
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn run(command: Command) -> Result<ExitCode, String> {
    let (cfg_path, job) = match command {
        Command::Train(a) => {
            let job = Job::Train(TrainOptions {
                resume: a.resume,
                overwrite: a.overwrite,
                quiet: false,
            });
            let mut cfg = load_config(&a.cfg)?;
            if let Some(n) = a.max_steps {
                cfg.training.max_steps = Some(n);
                cfg.validate().map_err(|e| format!("--max-steps: {e}"))?;
            }
            return dispatch(&cfg, job);
        }
        Command::Eval {
            cfg,
            ckpt,
            iters,
            json,
        } => (
            cfg,
            Job::Eval {
                ckpt,
                iters: iters.map(|i| i as usize),
                json,
            },
        ),
        Command::Render {
            cfg,
            ckpt,
            out,
            n,
            iters,
        } => (
            cfg,
            Job::Render {
                ckpt,
                out,
                n: n as usize,
                iters: iters.map(|i| i as usize),
            },
        ),
        Command::DumpStep {
            cfg,
            ckpt,
            out,
            batch_size,
        } => {
            let c = with_batch_size(load_config(&cfg)?, batch_size)?;
            return dispatch(&c, Job::DumpStep { ckpt, out });
        }
        Command::Bench {
            cfg,
            steps,
            batch_size,
            kernels,
        } => {
            let c = with_batch_size(load_config(&cfg)?, batch_size)?;
            let steps = steps as usize;
            return dispatch(&c, Job::Bench { steps, kernels });
        }
        Command::CompileKernels { arch } => {
            use slotfix::cuda::{kcache, kernels::KERNEL_FILES, KernelCache};
            let started = std::time::Instant::now();
            let filled = kcache::fill(KERNEL_FILES, &arch, &KernelCache::from_env(), |n| {
                eprint!("compiling {n} CUDA kernel files for {arch} with NVRTC … ")
            })?;
            if filled.compiled > 0 {
                eprintln!("{:.1} s", started.elapsed().as_secs_f64());
            }
            println!(
                "kernel cache {}: the {} kernel files for {arch} ({} compiled now, {} there \
                 already)",
                filled.dir.display(),
                filled.compiled + filled.cached,
                filled.compiled,
                filled.cached
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::Check { cfg, params } => {
            let c = load_config(&cfg)?;
            if params {
                let arch = slotfix::model::Arch::new(&c.model);
                println!("| name | shape |\n| --- | --- |");
                for s in &arch.specs {
                    println!("| `{}` | {:?} |", s.name, s.shape);
                }
                println!(
                    "\n{} tensors, {} parameters",
                    arch.specs.len(),
                    arch.num_params()
                );
            } else {
                print!("{}", c.to_yaml());
                // What a training run's buffers will take (stderr: stdout stays the YAML).
                let arch = slotfix::model::Arch::new(&c.model);
                eprintln!(
                    "{}",
                    MemoryPlan::training(&SizeCounter::default(), &c, &arch).check(None)?
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    dispatch(&load_config(&cfg_path)?, job)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match (cli.command, cli.train) {
        (Some(c), _) => c,
        (None, Some(a)) => Command::Train(a),
        (None, None) => {
            eprintln!("slotfix: give a subcommand or --cfg FILE (see slotfix --help)");
            return ExitCode::from(2);
        }
    };
    match run(command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
