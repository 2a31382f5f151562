//! The `slotfix` command line.

use clap::{Args, Parser, Subcommand};
use slotfix::checkpoint::Checkpoint;
use slotfix::config::Config;
use slotfix::cpu::Cpu;
use slotfix::data::Split;
use slotfix::device::{self, Chosen};
use slotfix::train::{self, Session, TrainOptions};
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
        #[arg(long, value_name = "FILE")]
        cfg: PathBuf,
        #[arg(long, value_name = "FILE")]
        ckpt: PathBuf,
        /// Slot-attention cell applications (default: Testing.iters, else as in training).
        #[arg(long, value_name = "N")]
        iters: Option<usize>,
        /// Also write the result as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Draw input, reconstruction, slots and segmentation of test examples into a PNG.
    Render {
        #[arg(long, value_name = "FILE")]
        cfg: PathBuf,
        #[arg(long, value_name = "FILE")]
        ckpt: PathBuf,
        #[arg(long, value_name = "FILE", default_value = "render.png")]
        out: PathBuf,
        /// Number of test examples.
        #[arg(long, default_value_t = 8)]
        n: usize,
        #[arg(long, value_name = "N")]
        iters: Option<usize>,
    },
    /// Write one training step (inputs, noise, dropout masks, parameters, loss, gradients) to a
    /// safetensors file, to replay it in another framework.
    DumpStep {
        #[arg(long, value_name = "FILE")]
        cfg: PathBuf,
        /// Parameters to start from (default: the seeded initialisation).
        #[arg(long, value_name = "FILE")]
        ckpt: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Time the training step of a config (forward + backward + Adam) on random batches.
    Bench {
        #[arg(long, value_name = "FILE")]
        cfg: PathBuf,
        /// Timed steps (after 2 warm-up steps).
        #[arg(long, default_value_t = 10)]
        steps: usize,
    },
    /// Load and validate a config, print it with every default filled in.
    Check {
        #[arg(long, value_name = "FILE")]
        cfg: PathBuf,
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

fn load_config(path: &Path) -> Result<Config, String> {
    let cfg = Config::load(path).map_err(|e| e.to_string())?;
    for note in cfg.notes() {
        eprintln!("note: {note}");
    }
    Ok(cfg)
}

/// The backend for this config (the CPU is the only one in this build).
fn backend(cfg: &Config) -> Result<Cpu<f32>, String> {
    let (chosen, note) = device::select(cfg.training.device)?;
    if let Some(n) = note {
        eprintln!("{n}");
    }
    match chosen {
        Chosen::Cpu => {
            if cfg.model.precision != slotfix::config::Precision::F32 {
                eprintln!(
                    "note: Model.precision applies to the CUDA backend; the CPU computes in f32"
                );
            }
            Ok(Cpu::<f32>::new())
        }
        // Placeholder until the CUDA backend is wired into the CLI: keep training on the CPU.
        Chosen::Cuda => {
            eprintln!("note: the CUDA backend is not wired into the CLI yet; training on the CPU");
            Ok(Cpu::<f32>::new())
        }
    }
}

fn session_from(cfg: &Config, ckpt: Option<&Path>) -> Result<Session<Cpu<f32>>, String> {
    let be = backend(cfg)?;
    let mut sess = Session::new(be, cfg.clone());
    if let Some(p) = ckpt {
        let c = Checkpoint::load(p)?;
        let saved = Config::from_yaml(c.meta("config")?)
            .map_err(|e| format!("{}: config: {e}", p.display()))?;
        if saved.model != cfg.model {
            return Err(format!(
                "{}: trained with a different Model section than {}",
                p.display(),
                "--cfg"
            ));
        }
        sess.load_params(&c)?;
        sess.step = c.meta("step")?.parse().unwrap_or(0);
    }
    Ok(sess)
}

fn run_train(a: TrainArgs) -> Result<ExitCode, String> {
    let mut cfg = load_config(&a.cfg)?;
    if let Some(n) = a.max_steps {
        cfg.training.max_steps = Some(n);
        cfg.validate().map_err(|e| e.to_string())?;
    }
    let be = backend(&cfg)?;
    // Ctrl-C: finish the current step, save a checkpoint, exit with 130.
    ctrlc::set_handler(|| {
        if train::INTERRUPTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130); // a second Ctrl-C: stop now
        }
        eprintln!(
            "\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit at once)"
        );
    })
    .map_err(|e| format!("cannot install the Ctrl-C handler: {e}"))?;
    let opts = TrainOptions {
        resume: a.resume,
        overwrite: a.overwrite,
        quiet: false,
    };
    let s = train::train(be, &cfg, &opts)?;
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

fn run_eval(
    cfg: &Path,
    ckpt: &Path,
    iters: Option<usize>,
    json: Option<PathBuf>,
) -> Result<ExitCode, String> {
    let cfg = load_config(cfg)?;
    let sess = session_from(&cfg, Some(ckpt))?;
    let ds = train::open_data(&cfg, Split::Test)?;
    let applications = iters.unwrap_or(cfg.test_iters());
    let t = std::time::Instant::now();
    let r = sess.evaluate(ds.as_ref(), applications, None);
    println!("| checkpoint | step | test images | iterations | MSE | FG-ARI (%) |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| {} | {} | {} | {} | {:.6} | {} |",
        ckpt.display(),
        sess.step,
        r.images,
        r.iters,
        r.mse,
        r.fg_ari
            .map(|a| format!("{:.2}", 100.0 * a))
            .unwrap_or_else(|| "n/a (no masks)".into())
    );
    let value = serde_json::json!({ "checkpoint": ckpt.display().to_string(), "step": sess.step, "result": r,
        "seconds": t.elapsed().as_secs_f64() });
    println!("{value}");
    if let Some(p) = json {
        slotfix::checkpoint::write_atomic(&p, format!("{value}\n").as_bytes(), None)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn run_render(
    cfg: &Path,
    ckpt: &Path,
    out: &Path,
    n: usize,
    iters: Option<usize>,
) -> Result<ExitCode, String> {
    let cfg = load_config(cfg)?;
    let sess = session_from(&cfg, Some(ckpt))?;
    let ds = train::open_data(&cfg, Split::Test)?;
    let applications = iters.unwrap_or(cfg.test_iters());
    slotfix::eval::render_grid(&sess.be, &sess.model, ds.as_ref(), n, applications, out)?;
    eprintln!("wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}

fn run_dump(cfg: &Path, ckpt: Option<&Path>, out: &Path) -> Result<ExitCode, String> {
    let cfg = load_config(cfg)?;
    let mut sess = session_from(&cfg, ckpt)?;
    let ds = train::open_data(&cfg, Split::Train)?;
    let c = slotfix::dump::dump_step(&mut sess, ds.as_ref())?;
    c.save(out)?;
    eprintln!(
        "wrote {} ({} tensors, step {})",
        out.display(),
        c.tensors.len(),
        sess.step
    );
    Ok(ExitCode::SUCCESS)
}

fn run_bench(cfg: &Path, steps: usize) -> Result<ExitCode, String> {
    let cfg = load_config(cfg)?;
    let be = backend(&cfg)?;
    let r = slotfix::bench::bench_step(be, &cfg, steps);
    println!("{}", r.table());
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match (cli.command, cli.train) {
        (Some(Command::Train(a)), _) | (None, Some(a)) => run_train(a),
        (
            Some(Command::Eval {
                cfg,
                ckpt,
                iters,
                json,
            }),
            _,
        ) => run_eval(&cfg, &ckpt, iters, json),
        (
            Some(Command::Render {
                cfg,
                ckpt,
                out,
                n,
                iters,
            }),
            _,
        ) => run_render(&cfg, &ckpt, &out, n, iters),
        (Some(Command::DumpStep { cfg, ckpt, out }), _) => run_dump(&cfg, ckpt.as_deref(), &out),
        (Some(Command::Bench { cfg, steps }), _) => run_bench(&cfg, steps),
        (Some(Command::Check { cfg }), _) => load_config(&cfg).map(|c| {
            print!("{}", c.to_yaml());
            ExitCode::SUCCESS
        }),
        (None, None) => {
            eprintln!("slotfix: give a subcommand or --cfg FILE (see slotfix --help)");
            Ok(ExitCode::from(2))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
