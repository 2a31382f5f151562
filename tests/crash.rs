//! A training process killed with SIGKILL at arbitrary moments (here: while it writes a
//! checkpoint every step) never leaves a checkpoint that cannot be read, and the run resumes.
//! The slot MLP is made huge so that writing the checkpoint takes most of each step and the
//! kills land in the middle of saves (a non-atomic writer fails this test).

use slotfix::checkpoint;
use slotfix::config::Config;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn sigkill_during_training_never_leaves_an_unreadable_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let yaml = format!(
        "Model:
  num_slots: 3
  slot_size: 8
  mlp_hidden_size: 65536  # ~1M parameters: 12 MB checkpoints, so most of the time goes to saving
  max_iter_fwd: 1
  resolution: 12
  encoder_channels: [4]
  feat_size: 8
  decoder: full
  decoder_channels: [4]
Training:
  data_type: tetrominoes
  max_objects: 1
  num_train: 64
  batch_size: 4
  max_steps: 1000000
  log_interval: 100000
  save_interval: 1
  save_dir: {}
  device: cpu
Testing:
  num_test: 4
  batch_size: 4
",
        run.display()
    );
    Config::from_yaml(&yaml).unwrap();
    let cfg = dir.path().join("cfg.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let newest = || checkpoint::list(&run).last().map(|(s, _)| *s).unwrap_or(0);
    let mut last_step = 0;
    // Kill points spread over the save-every-step cycle (tens of milliseconds).
    let delays_ms = [
        0u64, 45, 90, 20, 130, 70, 10, 160, 35, 110, 55, 5, 80, 25, 140, 60,
    ];
    for (round, delay_ms) in delays_ms.into_iter().enumerate() {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_slotfix"));
        cmd.arg("train")
            .arg("--cfg")
            .arg(&cfg)
            .stderr(Stdio::null());
        if round > 0 {
            cmd.arg("--resume");
        }
        let mut child = cmd.spawn().unwrap();
        // Wait until this process has saved something new, then kill it a little later.
        let t0 = std::time::Instant::now();
        while newest() <= last_step {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "round {round}: nothing saved"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL: no handler runs
        child.wait().unwrap();
        let mut unreadable = Vec::new();
        let (_, c) =
            checkpoint::latest_readable(&run, &mut unreadable).expect("a checkpoint survives");
        assert!(unreadable.is_empty(), "round {round}: {unreadable:?}");
        let step: u64 = c.meta("step").unwrap().parse().unwrap();
        assert!(
            step > last_step,
            "round {round}: no progress from {last_step} ({step})"
        );
        last_step = step;
    }
    assert!(last_step > 0);
}
