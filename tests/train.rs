//! Training end to end on the CPU: the loss falls, runs resume bit for bit, bad steps stop the
//! run without touching the last good checkpoint, and the command line behaves.

use slotfix::checkpoint::{self, Checkpoint};
use slotfix::config::{Config, NonFinite};
use slotfix::cpu::Cpu;
use slotfix::train::{self, TrainOptions};
use std::path::Path;
use std::process::Command;

/// A tiny tetrominoes model (16×16, K = 4, D = 16) that trains at ~100 steps/s.
fn tiny_cfg(save_dir: &Path, max_steps: usize) -> Config {
    let yaml = format!(
        "Model:
  num_slots: 4
  slot_size: 16
  mlp_hidden_size: 32
  max_iter_fwd: 2
  resolution: 16
  encoder_channels: [8, 8]
  feat_size: 16
  decoder: full
  decoder_channels: [8, 8]
  dropout: 0.1
Training:
  data_type: tetrominoes
  num_train: 2000
  batch_size: 8
  max_steps: {max_steps}
  lr: 0.002
  warmup_steps: 10
  log_interval: 50
  save_interval: 100
  save_dir: {}
  device: cpu
Testing:
  batch_size: 16
  num_test: 16
",
        save_dir.display()
    );
    Config::from_yaml(&yaml).unwrap()
}

fn quiet() -> TrainOptions {
    TrainOptions {
        quiet: true,
        ..Default::default()
    }
}

/// Mean of the "loss" field of the metrics lines.
fn logged_losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// The stated factor: the loss of the last 50 of 300 steps is below half the first step's.
/// (Measured: 0.694 → 0.324. In 300 steps the model learns the black background and the rough
/// colour layout; the sharp per-object segmentation comes thousands of steps later.)
#[test]
fn loss_falls_by_a_factor_of_two_in_300_steps() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_cfg(dir.path(), 300);
    let s = train::train(Cpu::<f32>::new(), &cfg, &quiet()).unwrap();
    assert_eq!(s.steps, 300);
    let losses = logged_losses(dir.path());
    assert_eq!(losses.len(), 6);
    let (first, last) = (s.first_loss.unwrap(), *losses.last().unwrap());
    eprintln!(
        "first-step loss {first:.4}, mean loss of steps 251-300 {last:.4}, logged {losses:?}"
    );
    assert!(last * 2.0 < first, "loss fell from {first} only to {last}");
    // Pictures, curves and checkpoints are there.
    assert!(dir.path().join("images/step_00000300.png").exists());
    assert!(dir.path().join("curves.png").exists());
    assert!(s.last_eval.unwrap().fg_ari.is_some());
    let steps: Vec<u64> = checkpoint::list(dir.path())
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, vec![100, 200, 300]);
}

#[test]
fn interrupted_and_resumed_run_equals_an_uninterrupted_one_bit_for_bit() {
    // 100 examples at batch 8: 12 steps per epoch, so both halves cross epoch boundaries.
    let cfg = |dir: &Path, steps: usize| {
        let mut c = tiny_cfg(dir, steps);
        c.training.num_train = Some(100);
        c.training.save_interval = 10;
        c.training.log_interval = 5;
        c
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train::train(Cpu::<f32>::new(), &cfg(a.path(), 40), &quiet()).unwrap();
    train::train(Cpu::<f32>::new(), &cfg(b.path(), 25), &quiet()).unwrap();
    // As if killed after logging step 25 but before saving it: the newest checkpoint is 20.
    std::fs::remove_file(checkpoint::path_for_step(b.path(), 25)).unwrap();
    let resumed = TrainOptions {
        resume: true,
        quiet: true,
        ..Default::default()
    };
    let s = train::train(Cpu::<f32>::new(), &cfg(b.path(), 40), &resumed).unwrap();
    assert_eq!(s.steps, 40);
    let ca = Checkpoint::load(&checkpoint::path_for_step(a.path(), 40)).unwrap();
    let cb = Checkpoint::load(&checkpoint::path_for_step(b.path(), 40)).unwrap();
    assert_eq!(ca.tensors.len(), cb.tensors.len());
    for (name, (shape, va)) in &ca.tensors {
        let (sb, vb) = &cb.tensors[name];
        assert_eq!(shape, sb);
        let bits_a: Vec<u32> = va.iter().map(|x| x.to_bits()).collect();
        let bits_b: Vec<u32> = vb.iter().map(|x| x.to_bits()).collect();
        assert_eq!(bits_a, bits_b, "{name} differs after resume");
    }
    assert_eq!(ca.meta("step").unwrap(), "40");
    // The metrics of the resumed run have each step once, in order (step 25 was logged twice).
    let steps: Vec<u64> = std::fs::read_to_string(b.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![5, 10, 15, 20, 25, 30, 35, 40]);
}

#[test]
fn resume_refuses_a_changed_data_setup() {
    let dir = tempfile::tempdir().unwrap();
    train::train(Cpu::<f32>::new(), &tiny_cfg(dir.path(), 4), &quiet()).unwrap();
    let resumed = TrainOptions {
        resume: true,
        quiet: true,
        ..Default::default()
    };
    let mut cfg = tiny_cfg(dir.path(), 8);
    cfg.training.seed = 99;
    cfg.training.batch_size = 4;
    let e = train::train(Cpu::<f32>::new(), &cfg, &resumed).unwrap_err();
    assert!(
        e.contains("Training.seed = 99") && e.contains("Training.batch_size = 4"),
        "{e}"
    );
    // Changing the schedule or the step budget is fine.
    let mut cfg = tiny_cfg(dir.path(), 8);
    cfg.training.lr = 1e-4;
    assert_eq!(
        train::train(Cpu::<f32>::new(), &cfg, &resumed)
            .unwrap()
            .steps,
        8
    );
}

#[test]
fn a_second_run_in_the_same_save_dir_needs_resume_or_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    train::train(Cpu::<f32>::new(), &tiny_cfg(dir.path(), 3), &quiet()).unwrap();
    let e = train::train(Cpu::<f32>::new(), &tiny_cfg(dir.path(), 3), &quiet()).unwrap_err();
    assert!(e.contains("--resume") && e.contains("--overwrite"), "{e}");
    let o = TrainOptions {
        overwrite: true,
        quiet: true,
        ..Default::default()
    };
    assert_eq!(
        train::train(Cpu::<f32>::new(), &tiny_cfg(dir.path(), 3), &o)
            .unwrap()
            .steps,
        3
    );
    let e = train::train(
        Cpu::<f32>::new(),
        &tiny_cfg(&dir.path().join("empty"), 3),
        &TrainOptions {
            resume: true,
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.contains("no readable checkpoint"), "{e}");
}

/// A run whose buffers cannot fit stops with the numbers and the advice before it allocates
/// them, and before `--overwrite` deletes the run already in save_dir.
#[test]
fn a_run_too_large_for_memory_stops_before_touching_save_dir() {
    use slotfix::backend::Backend;
    if Cpu::<f32>::new().memory_available().is_none() {
        eprintln!("SKIPPED: no /proc/meminfo here, so the host's free memory is unknown");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    train::train(Cpu::<f32>::new(), &tiny_cfg(dir.path(), 3), &quiet()).unwrap();
    let mut huge = tiny_cfg(dir.path(), 3);
    // ~25 TB of activations (the data is procedural: nothing is generated up front).
    huge.training.num_train = Some(100_000_000);
    huge.training.batch_size = 50_000_000;
    let o = TrainOptions {
        overwrite: true,
        quiet: true,
        ..Default::default()
    };
    let e = train::train(Cpu::<f32>::new(), &huge, &o).unwrap_err();
    assert!(
        e.contains("not enough host memory") && e.contains("lower Training.batch_size"),
        "{e}"
    );
    assert_eq!(
        checkpoint::list(dir.path()).len(),
        1,
        "the earlier run was deleted"
    );
}

#[test]
fn non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_cfg(dir.path(), 10);
    cfg.training.save_interval = 2;
    train::train(Cpu::<f32>::new(), &cfg, &quiet()).unwrap();
    let good = checkpoint::path_for_step(dir.path(), 10);
    let before = std::fs::read(&good).unwrap();
    // An absurd learning rate makes the parameters, then the loss, blow up.
    cfg.training.max_steps = Some(60);
    cfg.training.lr = 1e30;
    cfg.training.warmup_steps = 0;
    let resumed = TrainOptions {
        resume: true,
        quiet: true,
        ..Default::default()
    };
    let e = train::train(Cpu::<f32>::new(), &cfg, &resumed).unwrap_err();
    assert!(e.contains("non-finite") && e.contains("step "), "{e}");
    let step: u64 = e
        .split("step ")
        .nth(1)
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(step >= 10, "{e}");
    // No checkpoint was written after the failure point, and the last good one is untouched.
    assert!(checkpoint::list(dir.path()).iter().all(|(s, _)| *s <= step));
    assert_eq!(std::fs::read(&good).unwrap(), before);

    // With on_nonfinite: skip the run goes on (every step is skipped once it has diverged), and
    // the end-of-run checkpoint is still written.
    cfg.training.on_nonfinite = NonFinite::Skip;
    let s = train::train(Cpu::<f32>::new(), &cfg, &resumed).unwrap();
    assert!(s.skipped_steps > 0);
    assert_eq!(s.steps, 60);
    assert!(checkpoint::path_for_step(dir.path(), 60).exists());
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_slotfix"))
}

fn write_cfg(dir: &Path, cfg: &Config) -> std::path::PathBuf {
    let p = dir.join("cfg.yaml");
    std::fs::write(&p, cfg.to_yaml()).unwrap();
    p
}

/// Runs `cmd` and checks that it succeeded (failing with its stderr otherwise).
fn succeed(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn cli_train_short_form_eval_render_and_dump_step() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_cfg(&dir.path().join("run"), 20);
    let cfg_path = write_cfg(dir.path(), &cfg);
    // `slotfix --cfg FILE` is `slotfix train --cfg FILE`.
    succeed(bin().arg("--cfg").arg(&cfg_path));
    let ckpt = checkpoint::path_for_step(&dir.path().join("run"), 20);
    assert!(ckpt.exists());

    // `slotfix ARGS --cfg CFG --ckpt CKPT`, for the commands that read the checkpoint.
    let on_ckpt = |args: &[&str]| {
        let mut cmd = bin();
        cmd.args(args)
            .arg("--cfg")
            .arg(&cfg_path)
            .arg("--ckpt")
            .arg(&ckpt);
        cmd
    };
    let json = dir.path().join("eval.json");
    let out = succeed(on_ckpt(&["eval", "--iters", "5"]).arg("--json").arg(&json));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("| FG-ARI (%) |"), "{table}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["result"]["iters"], 5);
    assert_eq!(v["result"]["images"], 16);
    assert!(v["result"]["fg_ari"].as_f64().is_some());

    let png = dir.path().join("r.png");
    succeed(on_ckpt(&["render", "--n", "3"]).arg("--out").arg(&png));
    assert!(image::open(&png).is_ok());

    let dump = dir.path().join("step.safetensors");
    succeed(on_ckpt(&["dump-step"]).arg("--out").arg(&dump));
    let d = Checkpoint::load(&dump).unwrap();
    assert_eq!(d.tensor("input.images").unwrap().0, vec![8, 16, 16, 3]);
    assert_eq!(d.tensor("input.slot_noise").unwrap().0, vec![8, 4, 16]);
    // dropout 0.1 with implicit differentiation: T + 1 = 3 cell applications, one mask each.
    for app in 0..3 {
        assert_eq!(
            d.tensor(&format!("input.dropout_mask.{app}")).unwrap().0,
            vec![32, 32]
        );
    }
    assert!(
        d.tensor("encoder.convs.0.weight").is_ok()
            && d.tensor("grad.encoder.convs.0.weight").is_ok()
    );
    assert!(d.tensor("output.loss").unwrap().1[0].is_finite());
    // Parameters in the dump are the checkpoint's.
    let c = Checkpoint::load(&ckpt).unwrap();
    assert_eq!(
        c.tensor("decoder.pos.weight").unwrap(),
        d.tensor("decoder.pos.weight").unwrap()
    );
    assert!(d.meta("backend").unwrap().starts_with("cpu ("));

    // --batch-size: a dump of a smaller batch.
    let small = dir.path().join("small.safetensors");
    succeed(
        on_ckpt(&["dump-step", "--batch-size", "2"])
            .arg("--out")
            .arg(&small),
    );
    let s = Checkpoint::load(&small).unwrap();
    assert_eq!(s.tensor("input.images").unwrap().0, vec![2, 16, 16, 3]);
    assert_eq!(s.tensor("input.slot_noise").unwrap().0, vec![2, 4, 16]);
}

#[test]
fn cli_errors_are_messages_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "Model:\n  num_slots: 0\nTraining:\n  data_type: tetrominoes\n",
    )
    .unwrap();
    let out = bin().arg("train").arg("--cfg").arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("Model.num_slots = 0") && !err.contains("panicked"),
        "{err}"
    );

    let mut cfg = tiny_cfg(&dir.path().join("run"), 2);
    cfg.training.device = slotfix::config::Device::Cuda;
    let p = write_cfg(dir.path(), &cfg);
    let out = bin().arg("--cfg").arg(&p).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("Training.device = cuda") && !err.contains("panicked"),
        "{err}"
    );

    cfg.training.device = slotfix::config::Device::Cpu;
    let p = write_cfg(dir.path(), &cfg);
    let out = bin()
        .args(["eval", "--cfg"])
        .arg(&p)
        .args(["--ckpt", "/nonexistent/ckpt.safetensors"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("/nonexistent/ckpt.safetensors"), "{err}");

    // A zero count or batch is refused, not rounded up to one.
    let out = bin()
        .args(["bench", "--steps", "0", "--cfg"])
        .arg(&p)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--steps"), "{err}");
    let out = bin()
        .args([
            "dump-step",
            "--batch-size",
            "0",
            "--out",
            "/nonexistent/d",
            "--cfg",
        ])
        .arg(&p)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("--batch-size: Training.batch_size = 0"),
        "{err}"
    );

    // compile-kernels: an architecture the kernels cannot run on, and no cache to fill.
    let out = bin()
        .args(["compile-kernels", "--arch", "sm_75"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("--arch \"sm_75\"") && err.contains("8.0"),
        "{err}"
    );
    let out = bin()
        .arg("compile-kernels")
        .env("SLOTFIX_KERNEL_CACHE", "off")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("no kernel cache to fill"), "{err}");

    let out = bin()
        .args([
            "check",
            "--cfg",
            concat!(env!("CARGO_MANIFEST_DIR"), "/configs/baseline.yaml"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("feat_size: 256"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("memory: buffers") && err.contains("at batch size 64"),
        "{err}"
    );
}

/// Starts a training run at `batch_size`, waits until it trains, sends it SIGINT once per entry
/// of `gaps_ms` (each after that many milliseconds), and checks that it saved a checkpoint and
/// exited with 130.
fn interrupt_training(batch_size: usize, gaps_ms: &[u64]) {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut cfg = tiny_cfg(&run, 100_000);
    cfg.training.log_interval = 5;
    cfg.training.save_interval = 100_000;
    cfg.training.batch_size = batch_size;
    let p = write_cfg(dir.path(), &cfg);
    let child = bin()
        .arg("train")
        .arg("--cfg")
        .arg(&p)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it has really started training (a metrics line is written).
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl"))
        .map(|s| s.is_empty())
        .unwrap_or(true)
    {
        assert!(t0.elapsed().as_secs() < 60, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for &gap in gaps_ms {
        std::thread::sleep(std::time::Duration::from_millis(gap));
        let status = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted at step"), "{err}");
    let (_, ckpt) =
        checkpoint::latest_readable(&run, &mut Vec::new()).expect("a checkpoint was saved");
    assert!(ckpt.meta("step").unwrap().parse::<u64>().unwrap() >= 5);
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_cleanly() {
    interrupt_training(8, &[0]);
}

/// `timeout -s INT` signals the process and then its process group: two SIGINTs a moment
/// apart (here 30 ms, so that the kernel does not merge them into one, inside a step made
/// ~10× longer by the batch size). The first GPU session's timed multi_dsprites run lost its
/// final checkpoint this way: the second one was taken for a deliberate second Ctrl-C.
#[test]
fn two_interrupts_a_moment_apart_still_save_a_checkpoint() {
    interrupt_training(256, &[0, 30]);
}
