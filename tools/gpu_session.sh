#!/usr/bin/env bash
# A GPU session's work in phases that each fit the device tool's 10-minute command limit.
# Build and stage first, on the development machine:
#   ../shared/gpu/bundle && git describe --always --dirty > .gpu/commit
# then, through the device tool (carry [".gpu"]), from the crate root:
#   bash tools/gpu_session.sh check [all]        # driver, then the GPU tests (gpu_*; they must not
#                                                 # skip); `all`: every test executable
#   bash tools/gpu_session.sh bench              # kernel table, then the step benches, put
#                                                 # together with date, device and commit as
#                                                 # $OUT/BENCHMARKS.md (review it, then commit it)
#   bash tools/gpu_session.sh sanitize           # compute-sanitizer memcheck, racecheck and
#                                                 # synccheck over the per-op GPU parity tests
#   bash tools/gpu_session.sh ablate             # the step of tetrominoes and clevr6 with each
#                                                 # fast path switched off in turn
#                                                 # (SLOTFIX_CUDA_DISABLE): $OUT/ABLATION.md
#   bash tools/gpu_session.sh replay             # one training step of the GPU (f32 and tf32) and
#                                                 # of the CPU, each replayed by PyTorch autograd in
#                                                 # float64 (tools/replay_step.py): $OUT/REPLAY.md
#   bash tools/gpu_session.sh train tetrominoes 8   # train configs/NAME.yaml on the GPU for N
#                                                 # minutes (Ctrl-C-style stop: a checkpoint is
#                                                 # saved), then eval + render the checkpoint
# Everything lands in $OUT (or .gpu/out): logs, metrics.jsonl, eval JSON, pictures. Each phase
# is its own device call, so that one that runs long does not cost the others' results.
# If a fast kernel fails its parity test, the other phases can still run without it:
# SLOTFIX_CUDA_DISABLE=NAME,... bash tools/gpu_session.sh bench (names: README, "CUDA fast paths").
#
# A session has 30 minutes of device time, start-up included, and every phase together is more
# than that, so run them in the order of what the CUDA issue still needs (estimated minutes):
#   check (2) → bench (6) → replay (2) → train tetrominoes 4 (5) → train multi_dsprites 5 (6)
#   → ablate (3) → sanitize (up to 9, each tool capped at 3).
# The first process compiles the kernels (~7 s on 16 cores) into the kernel cache; the rest
# find them there. If check fails, read tests.txt / isolated.txt and switch the failing paths
# off for the later phases rather than stopping.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/.gpu/out}
mkdir -p "$out"
bin=$root/.gpu/bin/slotfix
[ -x "$bin" ] || { echo "no .gpu/bin/slotfix: run ../shared/gpu/bundle first"; exit 2; }

# configs/NAME.yaml with device: cuda (SLOTFIX_SESSION_DEVICE=cpu for a dry run of this script
# on a machine without a GPU) and save_dir under $out.
device=${SLOTFIX_SESSION_DEVICE:-cuda}
cuda_config() {
  local name=$1 dst=$out/$1.cuda.yaml
  sed -e "s|^\(\s*\)device:.*|\1device: $device|" \
      -e "s|^\(\s*\)save_dir:.*|\1save_dir: $out/runs/$name|" "configs/$name.yaml" > "$dst"
  echo "$dst"
}

# PyTorch for tools/replay_step.py ($PYTHON, default python3), and where it should run: py and
# pydev set, or a non-zero status when torch is missing.
py=${PYTHON:-python3}
torch_device() {
  pydev=$("$py" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null)
  [ -n "$pydev" ]
}

case ${1:-check} in
  check)
    nvidia-smi | tee "$out/nvidia-smi.txt"
    if [ "${2:-}" = all ]; then
      echo "== every test (GPU tests must not skip)"
      bash .gpu/run tests 2>&1 | tee "$out/tests.txt"
    else
      # The GPU's own tests first: the CPU, emulator and NVRTC tests already ran in CI, and
      # device time is short (`check all` runs every test executable, as .gpu/run tests does).
      echo "== GPU tests (gpu_*; they must not skip)"
      t=$(ls -1 .gpu/test-cuda-* 2>/dev/null | head -1)
      [ -n "$t" ] || { echo "no .gpu/test-cuda-*: run ../shared/gpu/bundle first"; exit 2; }
      SLOTFIX_REQUIRE_GPU=1 CARGO_MANIFEST_DIR=$root LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64" \
        timeout 480 "$t" gpu_ device_selection > "$out/$(basename "$t").log" 2>&1
      echo "exit $?"
      grep -E "^test |test result|SKIPPED|panicked" "$out/$(basename "$t").log" | tee "$out/tests.txt"
    fi
    # The tests of one process share the device's primary context, and a CUDA error such as an
    # illegal address is sticky: every test after it fails too. Each failed test runs again
    # alone, in a process of its own (the kernel cache makes that quick), to tell the failures
    # that are its own from the ones it only inherited.
    export SLOTFIX_REQUIRE_GPU=1 CARGO_MANIFEST_DIR=$root LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64"
    : > "$out/isolated.txt"
    for t in .gpu/test-*; do
      log="$out/$(basename "$t").log"
      [ -f "$log" ] || continue
      for name in $(sed -n 's/^test \([^ ]*\) \.\.\. FAILED$/\1/p' "$log"); do
        if timeout 120 "$t" --exact "$name" --test-threads 1 > "$out/isolated-$name.txt" 2>&1; then
          echo "$name: passes alone (its failure was inherited from another test)" >> "$out/isolated.txt"
        else
          echo "$name: FAILS alone (see isolated-$name.txt)" >> "$out/isolated.txt"
        fi
      done
    done
    [ -s "$out/isolated.txt" ] && { echo "== failed tests, each run alone"; cat "$out/isolated.txt"; }
    ;;
  bench)
    echo "== kernel table"
    timeout 300 "$root"/.gpu/bench-kernels --reps 10 2>&1 | tee "$out/bench-kernels.txt"
    # At performance.md's batch sizes (B = 64 for both).
    for c in tetrominoes clevr6; do
      echo "== step bench $c"
      timeout 120 "$bin" bench --cfg "$(cuda_config $c)" --steps 20 --batch-size 64 --kernels 2>&1 \
        | tee "$out/bench-$c.txt"
    done
    {
      echo "# Benchmarks"
      echo
      gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
      driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
      echo "Measured $(date -u +%Y-%m-%d) on ${gpu:-(no GPU found)}, driver ${driver:-?},"
      echo "slotfix $(cat .gpu/commit 2>/dev/null || echo '(commit not recorded)'), with \`bash tools/gpu_session.sh bench\`."
      echo
      echo "## Training step (\`slotfix bench --cfg configs/NAME.yaml --steps 20 --batch-size 64 --kernels\`, device: cuda)"
      echo
      for c in tetrominoes clevr6; do
        grep -E "^\|" "$out/bench-$c.txt" | head -3 | { [ "$c" = tetrominoes ] && cat || tail -n +3; }
      done
      echo
      echo "PyTorch 2.11 on an H100 80GB HBM3 (shared/reference/performance.md): 128×128, K = 7,"
      echo "B = 64, TF32: eager 91.7 ms / step (698 images/s, 42.3 GiB), torch.compile 80.5 ms"
      echo "(795 images/s, 42.0 GiB). Small model (35×35, K = 4, B = 64): eager 9.3–14.5 ms,"
      echo "torch.compile with CUDA graphs 3.0 ms."
      echo
      for c in tetrominoes clevr6; do
        echo "## Where the $c step's device time goes (eager steps, each launch timed)"
        echo
        sed -n '/^| kernel | launches/,$p' "$out/bench-$c.txt"
        echo
      done
      echo "## Kernels (\`cargo bench --bench kernels\`)"
      echo
      cat "$out/bench-kernels.txt"
    } > "$out/BENCHMARKS.md"
    echo "== wrote $out/BENCHMARKS.md"
    ;;
  ablate)
    # One slotfix process per row (each compiles the kernels, ~10 s), 10 timed steps each.
    # ABLATE_CONFIGS / ABLATE_BATCH change the configs and batch size (e.g. for a dry run).
    configs=${ABLATE_CONFIGS:-tetrominoes clevr6}
    batch=${ABLATE_BATCH:-64}
    paths="none conv_v3 dw_v3 attention_v2 tokens slot_cell bcast_split conv_splitk all"
    for c in $configs; do
      cfg=$(cuda_config "$c")
      for off in $paths; do
        v=$off; [ "$off" = none ] && v=
        echo "== $c, fast paths off: $off"
        SLOTFIX_CUDA_DISABLE=$v timeout 100 "$bin" bench --cfg "$cfg" --steps 10 --batch-size "$batch" \
          > "$out/ablate-$c-$off.txt" 2>&1
        grep -E "^\| (cuda|cpu)" "$out/ablate-$c-$off.txt" || tail -3 "$out/ablate-$c-$off.txt"
      done
    done
    # ms / step: the third column of slotfix bench's table.
    ms() { grep -E "^\| (cuda|cpu)" "$out/ablate-$1-$2.txt" 2>/dev/null | head -1 | awk -F'|' '{gsub(/ /, "", $4); print $4}'; }
    rel() { [ -n "$1" ] && [ -n "$2" ] && awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.1f %%", 100 * (a / b - 1) }'; }
    {
      echo "## Fast paths switched off one at a time (\`bash tools/gpu_session.sh ablate\`: SLOTFIX_CUDA_DISABLE, B = $batch, median of 10 steps)"
      echo
      head="| switched off |"; rule="| --- |"
      for c in $configs; do head="$head $c ms / step | vs all on |"; rule="$rule ---: | ---: |"; done
      echo "$head"; echo "$rule"
      for off in $paths; do
        row="| $off |"
        for c in $configs; do
          t=$(ms "$c" "$off"); t0=$(ms "$c" none)
          row="$row ${t:-failed} | $(rel "$t" "$t0") |"
        done
        echo "$row"
      done
    } > "$out/ABLATION.md"
    cat "$out/ABLATION.md"
    ;;
  replay)
    # The same function as an implementation that shares no code with slotfix: one training
    # step (from the seeded initialisation) dumped by `slotfix dump-step` and replayed by
    # PyTorch autograd in float64 (tools/replay_step.py; only torch is needed). Three dumps per
    # shape: the CPU (the reference), the GPU with exact f32 kernels, the GPU under TF32. The
    # GPU's f32 errors should be of the CPU's size (f32 rounding; at initialisation the encoder's
    # small gradients are ill-conditioned: ~3e-4 on the CPU at the tetrominoes shape, measured),
    # its TF32 errors about 10× that. clevr6's shape (128², K = 7, the broadcast decoder) runs on
    # generated multi_dsprites images: the CLEVR files are not on the GPU machine.
    torch_device || { echo "no PyTorch for $py"; exit 2; }
    for c in tetrominoes clevr6; do
      for run in cpu-f32 cuda-f32 cuda-tf32; do
        dev=${run%-*} prec=${run#*-}
        [ "$device" = cpu ] && dev=cpu   # (a dry run: SLOTFIX_SESSION_DEVICE=cpu)
        cfg=$out/$c.$run.yaml
        sed -e "s|^\(\s*\)device:.*|\1device: $dev|" -e "/^\s*precision:/d" \
            -e "s|^Model:.*|Model:\n    precision: $prec|" \
            -e "s|^\(\s*\)data_type: CLEVR|\1data_type: multi_dsprites|" -e "/^\s*data_root:/d" \
            "configs/$c.yaml" > "$cfg"
        dump=$out/dump-$c-$run.safetensors
        tol=1e-3; [ "$prec" = tf32 ] && tol=5e-2
        echo "== $c, $run"
        if timeout 150 "$bin" dump-step --cfg "$cfg" --batch-size 2 --out "$dump" > "$out/dump-$c-$run.txt" 2>&1; then
          timeout 150 "$py" tools/replay_step.py "$dump" --tol "$tol" --device "$pydev" > "$out/replay-$c-$run.txt" 2>&1
          echo "exit $? (tolerance $tol)"
          tail -1 "$out/replay-$c-$run.txt"
        else
          tail -3 "$out/dump-$c-$run.txt"
        fi
        rm -f "$dump"
      done
    done
    {
      echo "## One training step against PyTorch autograd in float64 (\`bash tools/gpu_session.sh replay\`, B = 2, seeded initialisation)"
      echo
      echo "| shape | slotfix | loss, relative error | worst gradient, relative L2 error | verdict |"
      echo "| --- | --- | ---: | ---: | --- |"
      for c in tetrominoes clevr6; do
        for run in cpu-f32 cuda-f32 cuda-tf32; do
          f=$out/replay-$c-$run.txt
          loss=$(sed -n 's/^| loss ([^)]*) | \([^ |]*\).*/\1/p' "$f" 2>/dev/null)
          worst=$(sed -n 's/^worst relative gradient error \([^;]*\);.*/\1/p' "$f" 2>/dev/null)
          verdict=$(sed -n 's/.*; \(AGREE\|DISAGREE\) at tolerance \(.*\)/\1 at \2/p' "$f" 2>/dev/null)
          echo "| $c | $run | ${loss:-failed} | ${worst:-failed} | ${verdict:-see replay-$c-$run.txt} |"
        done
      done
    } > "$out/REPLAY.md"
    cat "$out/REPLAY.md"
    ;;
  sanitize)
    # What the emulator cannot show: out-of-bounds device accesses, shared-memory races between
    # threads, barrier misuse. The per-op tests only (whole training steps are slow under the
    # tools); each tool gets at most 3 minutes.
    export SLOTFIX_REQUIRE_GPU=1 CARGO_MANIFEST_DIR=$root LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64"
    t=$(ls -1 .gpu/test-cuda-* 2>/dev/null | head -1)
    [ -n "$t" ] || { echo "no .gpu/test-cuda-*: run ../shared/gpu/bundle first"; exit 2; }
    for tool in memcheck racecheck synccheck; do
      echo "== compute-sanitizer --tool $tool"
      timeout 180 compute-sanitizer --tool "$tool" --error-exitcode 9 "$t" gpu_ --skip train \
        --test-threads 1 > "$out/sanitize-$tool.txt" 2>&1
      echo "exit $? (0: clean, 9: errors found, 124: time limit)"
      grep -E "ERROR SUMMARY|test result|Invalid|Race|Barrier" "$out/sanitize-$tool.txt" | sort | uniq -c | head -20
    done
    ;;
  train)
    name=${2:?config name, e.g. tetrominoes}
    minutes=${3:-8}
    cfg=$(cuda_config "$name")
    start=$(date +%s)
    # SIGINT is slotfix's Ctrl-C: it finishes the step, saves a checkpoint and exits 130.
    timeout -s INT "$((minutes * 60))" "$bin" train --cfg "$cfg" --overwrite 2>&1 | tee "$out/train-$name.txt"
    echo "trained for $(( $(date +%s) - start )) s" | tee -a "$out/train-$name.txt"
    ckpt=$(ls -1 "$out/runs/$name"/ckpt_*.safetensors 2>/dev/null | sort | tail -1)
    [ -n "$ckpt" ] || { echo "no checkpoint written"; exit 1; }
    "$bin" eval --cfg "$cfg" --ckpt "$ckpt" --json "$out/eval-$name.json" 2>&1 | tee "$out/eval-$name.txt"
    "$bin" render --cfg "$cfg" --ckpt "$ckpt" --out "$out/render-$name.png" 2>&1 | tail -2
    # The trained parameters' step, replayed by PyTorch in float64 (as the replay phase does at
    # the seeded initialisation; TF32, the config's precision, so a TF32 tolerance).
    if torch_device; then
      dump=$out/dump-$name-trained.safetensors
      timeout 150 "$bin" dump-step --cfg "$cfg" --ckpt "$ckpt" --batch-size 2 --out "$dump" 2>&1 | tail -1
      timeout 150 "$py" tools/replay_step.py "$dump" --tol 5e-2 --device "$pydev" > "$out/replay-$name-trained.txt" 2>&1
      echo "replay of the trained step: exit $?; $(tail -1 "$out/replay-$name-trained.txt")"
      rm -f "$dump"
    fi
    cp "$out/runs/$name/metrics.jsonl" "$out/metrics-$name.jsonl" 2>/dev/null
    cp "$out/runs/$name/curves.png" "$out/curves-$name.png" 2>/dev/null
    last=$(ls -1 "$out/runs/$name/images"/*.png 2>/dev/null | sort | tail -1)
    [ -n "$last" ] && cp "$last" "$out/grid-$name.png"
    rm -rf "$out/runs"   # checkpoints are large; the logs, metrics and pictures above stay
    ;;
  *)
    echo "usage: bash tools/gpu_session.sh check | bench | replay | ablate | sanitize | train NAME [MINUTES]"
    exit 2
    ;;
esac
