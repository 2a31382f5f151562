#!/usr/bin/env bash
# The CUDA issue's GPU work, sized to the device lease: 15 minutes of device time per session
# (the machine's start, a minute or more, included), at most 10 minutes per command, at most
# 8 files back from $OUT, and the machine stays warm for only 30 s after a call.
#
# Build and stage first, on the development machine, with the kernels compiled there for
# sm_90 (H100 and H200; the device's own NVRTC would spend a minute or more of the lease on
# conv_tc*.cu):
#   bash tools/gpu_prepare.sh
# then, through the device tool (carry [".gpu"], timeout_s 600), from the crate root:
#   bash tools/gpu_session.sh session          # call 1: every step below in priority order
#   bash tools/gpu_session.sh session more     # call 2, at once if device time is left
#   SESSION_SECONDS=200 bash tools/gpu_session.sh session short
#                     # a few minutes left: check, step benches, tetrominoes training, an ncu
#                     # profile of the clevr6 convolutions, memcheck
# A session runs its steps against one deadline (SESSION_SECONDS, default 560 s, under the
# 600-s command limit): each step's time limit is cut to what is left, a step with too little
# left is skipped and listed as skipped, and what has been done is packed into $OUT after every
# step, so a command stopped at its limit still brings back what it did.
#   call 1: check (the GPU tests; each failure run again alone) → step benches (tetrominoes and
#           clevr6 at B = 64) → torch (PyTorch's step on this device) → ablate (each fast path
#           switched off in turn) → memcheck → profile (Nsight Compute on clevr6's
#           convolutions, attention and token kernels) → replay (a step of the CPU, the GPU in
#           f32 and TF32, replayed by PyTorch in float64) → kernels (the kernel table) → loader
#           (images/s on this machine's CPU). The step's speed and the kernels' correctness
#           come first: they are what the performance bar and the parity tests ask.
#   call 2: racecheck → synccheck → torch compile (clevr6) → train tetrominoes (150 s, eval,
#           render) → train multi_dsprites (240 s). Give it SESSION_SECONDS = the device time
#           left less ~30 s, so that it packs before the lease ends.
# Any steps in any order, with the same deadline and packing (e.g. after a session whose tests
# passed, only what changed): SESSION_STEPS="check steps kernels ablate sanitize:racecheck"
# bash tools/gpu_session.sh session (a step's arguments after colons); ABLATE_PATHS="none
# conv_v6 all" limits the ablation to those rows.
# One step alone (same deadline logic, 590 s):
#   bash tools/gpu_session.sh check [all] | steps | kernels | bench | replay | loader | ablate | profile
#                             | torch [compile]
#                             | sanitize [memcheck racecheck synccheck] | train NAME [SECONDS]
#
# What comes back ($OUT; at most 8 files): SUMMARY.md (one line per step), BENCHMARKS.md,
# REPLAY.md, ABLATION.md and session.tar.gz (every log, eval JSON, metrics and picture; no
# checkpoints). Work files stay in $SESSION_WORK (default .gpu/work).
# If a fast kernel fails its parity test, the other steps can run without it:
# SLOTFIX_CUDA_DISABLE=NAME,... bash tools/gpu_session.sh session (names: README, "CUDA fast
# paths"). A dry run on a machine without a GPU: SLOTFIX_SESSION_DEVICE=cpu (the GPU tests then
# skip, and the configs run on the CPU).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/.gpu/out}
work=${SESSION_WORK:-$root/.gpu/work}
mkdir -p "$out" "$work"
bin=$root/.gpu/bin/slotfix
[ -x "$bin" ] || { echo "no .gpu/bin/slotfix: run tools/gpu_prepare.sh first"; exit 2; }

device=${SLOTFIX_SESSION_DEVICE:-cuda}
require_gpu=1
[ "$device" = cpu ] && require_gpu=0
export SLOTFIX_REQUIRE_GPU=$require_gpu CARGO_MANIFEST_DIR=$root
# The kernels compiled before the session (above), if they were; a key that does not match
# (another NVRTC version or architecture) only means one compile here.
[ -d "$root/.gpu/kernel-cache" ] && export SLOTFIX_KERNEL_CACHE=${SLOTFIX_KERNEL_CACHE:-$root/.gpu/kernel-cache}
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64"

# --- time: every step's limit is cut to the deadline, less what packing needs -------------
deadline=$(( $(date +%s) + ${SESSION_SECONDS:-590} ))
reserve=15
# Seconds a step may take: at most $1, and no more than is left before the deadline.
cap() {
  local c=$1 l=$(( deadline - $(date +%s) - reserve ))
  [ "$l" -lt "$c" ] && c=$l
  [ "$c" -lt 0 ] && c=0
  echo "$c"
}
# A step that needs at least $2 seconds to be worth starting: false (and noted) when less is left.
enough() {
  [ "$(cap "$2")" -ge "$2" ] && return 0
  note "$1: skipped, $(( deadline - $(date +%s) )) s left before the deadline"
  return 1
}

# --- what comes back ------------------------------------------------------------------------
note() { echo "- $*" | tee -a "$work/SUMMARY.md"; }
pack() {
  for f in SUMMARY.md BENCHMARKS.md REPLAY.md ABLATION.md; do
    [ -f "$work/$f" ] && cp "$work/$f" "$out/"
  done
  tar -czf "$out/session.tar.gz.part" -C "$work" --exclude='*.safetensors' . 2>/dev/null \
    && mv "$out/session.tar.gz.part" "$out/session.tar.gz"
}

# configs/NAME.yaml with device: cuda (cpu in a dry run) and save_dir under $work.
cuda_config() {
  local name=$1 dst=$work/$1.cuda.yaml
  sed -e "s|^\(\s*\)device:.*|\1device: $device|" \
      -e "s|^\(\s*\)save_dir:.*|\1save_dir: $work/runs/$name|" "configs/$name.yaml" > "$dst"
  echo "$dst"
}

# configs/NAME.yaml for a dump-step, written to DST: device DEV, the precision PREC if given,
# and clevr6's CLEVR data replaced by generated multi_dsprites images at the same shape (the
# CLEVR files are not on the GPU machine).
dump_config() {
  local name=$1 dev=$2 dst=$3 prec=${4:-}
  local set_prec=(-e "s|^\(\s*\)device:.*|\1device: $dev|")
  [ -n "$prec" ] && set_prec+=(-e "/^\s*precision:/d" -e "s|^Model:.*|Model:\n    precision: $prec|")
  sed "${set_prec[@]}" -e "s|^\(\s*\)data_type: CLEVR|\1data_type: multi_dsprites|" \
      -e "/^\s*data_root:/d" "configs/$name.yaml" > "$dst"
}

# PyTorch for tools/replay_step.py ($PYTHON, default python3), and where it should run: py and
# pydev set, or a non-zero status when torch is missing.
py=${PYTHON:-python3}
torch_device() {
  pydev=$("$py" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null)
  [ -n "$pydev" ]
}

cuda_tests() {
  ls -1 .gpu/test-cuda-* 2>/dev/null | head -1
}

# --- the steps ------------------------------------------------------------------------------
step_check() {
  nvidia-smi > "$work/nvidia-smi.txt" 2>&1
  note "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
  enough check 60 || return
  local t log
  if [ "${1:-}" = all ]; then
    # Every test executable, as .gpu/run tests does (GPU tests forced on).
    for t in .gpu/test-*; do
      log="$work/$(basename "$t").log"
      timeout "$(cap 300)" "$t" > "$log" 2>&1
      note "check $(basename "$t"): exit $? ($(grep -h "^test result" "$log" | head -1))"
    done
  else
    # The GPU's own tests: the CPU, emulator and NVRTC tests already ran in CI.
    t=$(cuda_tests)
    [ -n "$t" ] || { note "check: no .gpu/test-cuda-*: run tools/gpu_prepare.sh first"; return; }
    log="$work/$(basename "$t").log"
    timeout "$(cap 240)" "$t" gpu_ device_selection > "$log" 2>&1
    note "check: exit $? ($(grep -h "^test result" "$log" | head -1))"
  fi
  grep -hE "^test |test result|SKIPPED|panicked" "$work"/test-*.log > "$work/tests.txt"
  # The tests of one process share the device's primary context, and a CUDA error such as an
  # illegal address is sticky: every test after it fails too. Each failed test runs again
  # alone, in a process of its own (the kernel cache makes that quick), to tell the failures
  # that are its own from the ones it only inherited.
  local name n=0
  for log in "$work"/test-*.log; do
    t=.gpu/$(basename "$log" .log)
    for name in $(sed -n 's/^test \([^ ]*\) \.\.\. FAILED$/\1/p' "$log"); do
      n=$((n + 1))
      enough "alone: $name" 20 || break 2
      if timeout "$(cap 60)" "$t" --exact "$name" --test-threads 1 > "$work/isolated-$name.txt" 2>&1; then
        note "failed: $name (passes alone: inherited from another test)"
      else
        note "failed: $name (FAILS alone: isolated-$name.txt)"
      fi
    done
  done
  [ "$n" = 0 ] && note "check: no test failed"
}

step_steps() {
  # At performance.md's batch sizes (B = 64 for both).
  local c
  for c in tetrominoes clevr6; do
    enough "step bench $c" 30 || return
    timeout "$(cap 120)" "$bin" bench --cfg "$(cuda_config $c)" --steps 20 --batch-size 64 --kernels \
      > "$work/bench-$c.txt" 2>&1
    note "step bench $c: exit $?; $(grep -E "^\| (cuda|cpu)" "$work/bench-$c.txt" | head -1)"
  done
}

step_torch() {
  # PyTorch's step on this very device (tools/torch_step_bench.py: the replay's model in f32
  # with TF32, fused Adam), beside slotfix's step bench: performance.md's figures are for an
  # H100, and a session may get another card. "$1" = compile: torch.compile too (clevr6 only;
  # compiling takes a minute or more).
  torch_device || { note "torch: no PyTorch"; return; }
  [ "$pydev" = cuda ] || [ "$device" = cpu ] || { note "torch: PyTorch sees no GPU"; return; }
  local c cfg dump
  for c in tetrominoes clevr6; do
    [ "${1:-}" = compile ] && [ "$c" != clevr6 ] && continue
    enough "torch $c" 30 || return
    cfg=$work/$c.torch.yaml
    dump_config "$c" "$device" "$cfg"
    dump=$work/dump-$c-b64.safetensors
    timeout "$(cap 90)" "$bin" dump-step --cfg "$cfg" --batch-size 64 --out "$dump" > "$work/dump-$c-b64.txt" 2>&1
    local rc=$?
    if [ "$rc" != 0 ]; then
      note "torch $c: dump-step exit $rc (124: time limit): $(tail -1 "$work/dump-$c-b64.txt")"
      continue
    fi
    if [ "${1:-}" = compile ]; then
      timeout "$(cap 240)" "$py" tools/torch_step_bench.py "$dump" --device "$pydev" --compile \
        > "$work/torch-$c-compile.txt" 2>&1
      note "torch $c compile: exit $?; $(tail -1 "$work/torch-$c-compile.txt")"
    else
      timeout "$(cap 90)" "$py" tools/torch_step_bench.py "$dump" --device "$pydev" > "$work/torch-$c.txt" 2>&1
      note "torch $c: exit $?; $(tail -1 "$work/torch-$c.txt")"
    fi
    rm -f "$dump"
  done
}

step_kernels() {
  enough "kernel table" 60 || return
  timeout "$(cap 200)" "$root"/.gpu/bench-kernels --reps 10 > "$work/bench-kernels.txt" 2>&1
  note "kernel table: exit $? ($(grep -c '^| ' "$work/bench-kernels.txt") rows)"
}

step_loader() {
  enough loader 20 || return
  timeout "$(cap 60)" "$root"/.gpu/bench-loader --bench > "$work/bench-loader.txt" 2>&1
  note "loader: exit $?; $(grep -m1 tetrominoes "$work/bench-loader.txt")"
}

# BENCHMARKS.md from whatever the bench steps left.
write_benchmarks() {
  local c gpu driver
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
  {
    echo "# Benchmarks"
    echo
    echo "Measured $(date -u +%Y-%m-%d) on ${gpu:-(no GPU found)}, driver ${driver:-?},"
    echo "slotfix $(cat .gpu/commit 2>/dev/null || echo '(commit not recorded)'), with \`bash tools/gpu_session.sh session\`."
    echo
    echo "## Training step (\`slotfix bench --cfg configs/NAME.yaml --steps 20 --batch-size 64 --kernels\`, device: cuda)"
    echo
    for c in tetrominoes clevr6; do
      [ -f "$work/bench-$c.txt" ] || continue
      grep -E "^\|" "$work/bench-$c.txt" | head -3 | { [ "$c" = tetrominoes ] && cat || tail -n +3; }
    done
    # PyTorch on this device (step_torch), same columns.
    cat "$work"/torch-*.txt 2>/dev/null | grep -E "^\| PyTorch"
    echo
    echo "PyTorch 2.11 on an H100 80GB HBM3 (shared/reference/performance.md): 128×128, K = 7,"
    echo "B = 64, TF32: eager 91.7 ms / step (698 images/s, 42.3 GiB), torch.compile 80.5 ms"
    echo "(795 images/s, 42.0 GiB). Small model (35×35, K = 4, B = 64): eager 9.3–14.5 ms,"
    echo "torch.compile with CUDA graphs 3.0 ms."
    echo
    if [ -f "$work/bench-loader.txt" ]; then
      echo "## Data loader on the same machine's CPU (\`cargo bench --bench loader\`)"
      echo
      grep -E "^\||^rayon" "$work/bench-loader.txt"
      echo
    fi
    for c in tetrominoes clevr6; do
      [ -f "$work/bench-$c.txt" ] || continue
      echo "## Where the $c step's device time goes (eager steps, each launch timed)"
      echo
      sed -n '/^| kernel | launches/,$p' "$work/bench-$c.txt"
      echo
    done
    if [ -f "$work/bench-kernels.txt" ]; then
      echo "## Kernels (\`cargo bench --bench kernels\`)"
      echo
      cat "$work/bench-kernels.txt"
    fi
  } > "$work/BENCHMARKS.md"
}

step_replay() {
  # The same function as an implementation that shares no code with slotfix: one training
  # step (from the seeded initialisation) dumped by `slotfix dump-step` and replayed by
  # PyTorch autograd in float64 (tools/replay_step.py; only torch is needed). Three dumps per
  # shape: the CPU (the reference), the GPU with exact f32 kernels, the GPU under TF32. The
  # GPU's f32 errors should be of the CPU's size (f32 rounding; at initialisation the encoder's
  # small gradients are ill-conditioned: ~3e-4 on the CPU at the tetrominoes shape, measured),
  # its TF32 errors about 10× that. clevr6's shape (128², K = 7, the broadcast decoder) runs on
  # generated multi_dsprites images: the CLEVR files are not on the GPU machine.
  torch_device || { note "replay: no PyTorch for $py"; return; }
  local c run dev prec cfg dump tol ctl
  for c in tetrominoes clevr6; do
    for run in cuda-f32 cuda-tf32 cpu-f32; do
      enough "replay $c $run" 20 || break 2
      dev=${run%-*} prec=${run#*-}
      [ "$device" = cpu ] && dev=cpu   # (a dry run)
      cfg=$work/$c.$run.yaml
      dump_config "$c" "$dev" "$cfg" "$prec"
      dump=$work/dump-$c-$run.safetensors
      # TF32: PyTorch's own TF32 step is the yardstick too (replay_step.py --control).
      tol=1e-3 ctl=(); [ "$prec" = tf32 ] && tol=5e-2 ctl=(--control tf32)
      if timeout "$(cap 90)" "$bin" dump-step --cfg "$cfg" --batch-size 2 --out "$dump" > "$work/dump-$c-$run.txt" 2>&1; then
        timeout "$(cap 90)" "$py" tools/replay_step.py "$dump" --tol "$tol" "${ctl[@]}" --device "$pydev" > "$work/replay-$c-$run.txt" 2>&1
        note "replay $c $run: exit $? (tolerance $tol); $(tail -1 "$work/replay-$c-$run.txt")"
      else
        note "replay $c $run: dump-step failed: $(tail -1 "$work/dump-$c-$run.txt")"
      fi
      rm -f "$dump"
    done
  done
  {
    echo "## One training step against PyTorch autograd in float64 (\`bash tools/gpu_session.sh replay\`, B = 2, seeded initialisation)"
    echo
    echo "| shape | slotfix | loss, relative error | worst gradient, relative L2 error | verdict |"
    echo "| --- | --- | ---: | ---: | --- |"
    local f loss worst verdict
    for c in tetrominoes clevr6; do
      for run in cpu-f32 cuda-f32 cuda-tf32; do
        f=$work/replay-$c-$run.txt
        loss=$(sed -n 's/^| loss ([^)]*) | \([^ |]*\).*/\1/p' "$f" 2>/dev/null)
        worst=$(sed -n 's/^worst relative gradient error \([^;]*\);.*/\1/p' "$f" 2>/dev/null)
        verdict=$(sed -n 's/.*; \(AGREE\|DISAGREE\) at tolerance \(.*\)/\1 at \2/p' "$f" 2>/dev/null)
        echo "| $c | $run | ${loss:-not run} | ${worst:-not run} | ${verdict:-see replay-$c-$run.txt} |"
      done
    done
  } > "$work/REPLAY.md"
}

step_ablate() {
  # One slotfix process per row (the kernels come from the kernel cache), 10 timed steps each.
  # ABLATE_CONFIGS / ABLATE_BATCH change the configs and batch size (e.g. for a dry run).
  local configs=${ABLATE_CONFIGS:-tetrominoes clevr6} batch=${ABLATE_BATCH:-64}
  # ABLATE_PATHS: the rows to time (none = everything on), e.g. only the paths that changed.
  local paths=${ABLATE_PATHS:-none conv_v3 conv_v5 conv_v6 conv_wgmma conv_c4 conv_n8s conv_k32 dw_v3 dw_v4 dw_units dw_v5 dw_wgmma dw_c4 dw_c4_tc dw_k1 attention_v2 attention_v3 attention_v4 tokens tokens_v3 kv_fold slot_cell bcast_split conv_splitk all}
  local c cfg off v
  for c in $configs; do
    cfg=$(cuda_config "$c")
    for off in $paths; do
      enough "ablate $c $off" 15 || break 2
      v=$off; [ "$off" = none ] && v=
      SLOTFIX_CUDA_DISABLE=$v timeout "$(cap 60)" "$bin" bench --cfg "$cfg" --steps 10 --batch-size "$batch" \
        > "$work/ablate-$c-$off.txt" 2>&1
    done
  done
  # ms / step: the third column of slotfix bench's table.
  ms() { grep -E "^\| (cuda|cpu)" "$work/ablate-$1-$2.txt" 2>/dev/null | head -1 | awk -F'|' '{gsub(/ /, "", $4); print $4}'; }
  rel() { [ -n "$1" ] && [ -n "$2" ] && awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.1f %%", 100 * (a / b - 1) }'; }
  {
    echo "## Fast paths switched off one at a time (\`bash tools/gpu_session.sh ablate\`: SLOTFIX_CUDA_DISABLE, B = $batch, median of 10 steps)"
    echo
    local head="| switched off |" rule="| --- |" row t t0
    for c in $configs; do head="$head $c ms / step | vs all on |"; rule="$rule ---: | ---: |"; done
    echo "$head"; echo "$rule"
    for off in $paths; do
      row="| $off |"
      for c in $configs; do
        t=$(ms "$c" "$off"); t0=$(ms "$c" none)
        row="$row ${t:-not run} | $(rel "$t" "$t0") |"
      done
      echo "$row"
    done
  } > "$work/ABLATION.md"
  note "ablate: $(grep -c '| [0-9]' "$work/ABLATION.md") rows timed (ABLATION.md)"
}

step_profile() {
  # Nsight Compute on the clevr6 step's convolution kernels (the first launches of the forward
  # and the adjoint pass, versions 3 (16- or 32-wide k-tiles), 5 (stride 1 and 2), 6 (stride 1)
  # and the 4-channel c4, 7 (wgmma, wg5), and of the weight-gradient GEMM, versions 3, 4 (units
  # of 16 or 32), 5, its wgmma form (wg5s1) and c4), its attention and its token kernels: why
  # they run where they do against the tensor-core peak or the memory floor (throughputs,
  # occupancy, warp stall reasons).
  command -v ncu > /dev/null || { note "profile: no ncu"; return; }
  enough profile 40 || return
  timeout "$(cap 90)" ncu -k 'regex:conv_(igemm_direct|igemm_adjoint)_(v3|v3_k32|v[56]k[35]|wg5|v5s2k[35]|c4k[35]|n8sk[35])_tf32|conv_dw_partial_(v3|v4k[35]s[12](u32)?|v5k5s1|wg5s[12]t?)_tf32|conv_dw_partial_c4k[35]_f32|conv_dw_partial_(c4tck[35]|k1tc)_tf32|attention_(fwd_partial|bwd_stats|bwd_main)(_v[34]k[48])?_f32|tokens_(fwd|bwd)(_v3)?_tf32' -c 32 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
    --section MemoryWorkloadAnalysis "$bin" bench --cfg "$(cuda_config clevr6)" --steps 1 --batch-size 64 \
    > "$work/ncu-clevr6.txt" 2>&1
  note "profile: exit $?; $(grep -cE '(conv_.*_(v[3456]|wg5|c4|n8s|k1tc).*_(tf|f)32|attention_.*_f32|tokens_.*_tf32) \(' "$work/ncu-clevr6.txt") kernel reports in ncu-clevr6.txt"
  # The details, in a second report so that an option this ncu lacks costs only this one: every
  # stall reason, the instruction mix, the shared-memory table (bank conflicts per store and
  # load) and the source counters of the first direct and weight-gradient launches.
  enough "profile details" 30 || return
  timeout "$(cap 60)" ncu -k 'regex:conv_igemm_direct_(v3|v3_k32|v[56]k[35]|wg5)_tf32|conv_dw_partial_(v3|v4k[35]s[12](u32)?|v5k5s1|wg5s[12]t?)_tf32' -c 8 --print-details all \
    --section WarpStateStats --section InstructionStats --section MemoryWorkloadAnalysis_Tables \
    --section SourceCounters "$bin" bench --cfg "$(cuda_config clevr6)" --steps 1 --batch-size 64 \
    > "$work/ncu-clevr6-details.txt" 2>&1
  note "profile details: exit $?; $(grep -cE 'conv_.*_(v[3456]|wg5).*_tf32' "$work/ncu-clevr6-details.txt") kernel reports in ncu-clevr6-details.txt"
  # The same details of the token and attention kernels (in step order: tokens_fwd, the four
  # attention forwards, the attention backward's two passes, tokens_bwd).
  enough "profile details, tokens and attention" 30 || return
  timeout "$(cap 60)" ncu -k 'regex:attention_(fwd_partial|bwd_stats|bwd_main)(_v[34]k[48])?_f32|tokens_(fwd|bwd)(_v3)?_tf32' -c 8 \
    --print-details all --section WarpStateStats --section InstructionStats \
    --section MemoryWorkloadAnalysis_Tables --section SourceCounters --section LaunchStats \
    "$bin" bench --cfg "$(cuda_config clevr6)" --steps 1 --batch-size 64 > "$work/ncu-clevr6-tokens-attention.txt" 2>&1
  note "profile details, tokens and attention: exit $?; $(grep -cE '(attention|tokens)_.*_(tf|f)32 \(' "$work/ncu-clevr6-tokens-attention.txt") kernel reports"
}

step_sanitize() {
  # What the emulator cannot show: out-of-bounds device accesses, shared-memory races between
  # threads, barrier misuse. The per-op tests only: whole training steps (the train, dump-step,
  # fast-path and graph tests) run the same kernels and are slow under the tools; racecheck
  # did not get through the first of them in 200 s (92b00a8).
  local t tool
  t=$(cuda_tests)
  [ -n "$t" ] || { note "sanitize: no .gpu/test-cuda-*"; return; }
  command -v compute-sanitizer > /dev/null || { note "sanitize: no compute-sanitizer"; return; }
  for tool in "$@"; do
    enough "$tool" 40 || return
    timeout "$(cap 200)" compute-sanitizer --tool "$tool" --error-exitcode 9 "$t" gpu_ --skip train \
      --skip dump_step --skip each_fast_path --skip graph_steps --test-threads 1 > "$work/sanitize-$tool.txt" 2>&1
    note "$tool: exit $? (0: clean, 9: errors found, 124: time limit); $(grep -m1 -E '(ERROR|RACECHECK) SUMMARY' "$work/sanitize-$tool.txt")"
  done
}

step_train() {
  local name=$1 seconds=$2 cfg start ckpt dump last
  enough "train $name" 60 || return
  cfg=$(cuda_config "$name")
  # Leave ~40 s for eval, render and the replay after it.
  seconds=$(cap "$seconds"); seconds=$(( seconds > 80 ? seconds - 40 : 40 ))
  start=$(date +%s)
  # SIGINT is slotfix's Ctrl-C: it finishes the step, saves a checkpoint and exits 130.
  timeout -s INT "$seconds" "$bin" train --cfg "$cfg" --overwrite > "$work/train-$name.txt" 2>&1
  local rc=$?
  [ "$rc" = 124 ] && rc="124, stopped at its time limit"
  note "train $name: exit $rc after $(( $(date +%s) - start )) s; $(grep -E '^step|it/s|images/s' "$work/train-$name.txt" | tail -1)"
  ckpt=$(ls -1 "$work/runs/$name"/ckpt_*.safetensors 2>/dev/null | sort | tail -1)
  [ -n "$ckpt" ] || { note "train $name: no checkpoint written"; return; }
  timeout "$(cap 60)" "$bin" eval --cfg "$cfg" --ckpt "$ckpt" --json "$work/eval-$name.json" > "$work/eval-$name.txt" 2>&1
  note "eval $name: exit $?; $(tail -1 "$work/eval-$name.txt")"
  timeout "$(cap 30)" "$bin" render --cfg "$cfg" --ckpt "$ckpt" --out "$work/render-$name.png" > "$work/render-$name.txt" 2>&1
  # The trained parameters' step, replayed by PyTorch in float64 (as the replay step does at
  # the seeded initialisation; TF32, the config's precision, so a TF32 tolerance, and PyTorch's
  # own TF32 step as the yardstick: trained parameters can amplify TF32 rounding far past it).
  if torch_device && [ "$(cap 30)" -ge 30 ]; then
    dump=$work/dump-$name-trained.safetensors
    timeout "$(cap 60)" "$bin" dump-step --cfg "$cfg" --ckpt "$ckpt" --batch-size 2 --out "$dump" > "$work/dump-$name-trained.txt" 2>&1
    timeout "$(cap 60)" "$py" tools/replay_step.py "$dump" --tol 5e-2 --control tf32 --device "$pydev" > "$work/replay-$name-trained.txt" 2>&1
    note "replay of the trained $name step: exit $?; $(tail -1 "$work/replay-$name-trained.txt")"
    rm -f "$dump"
  fi
  cp "$work/runs/$name/metrics.jsonl" "$work/metrics-$name.jsonl" 2>/dev/null
  cp "$work/runs/$name/curves.png" "$work/curves-$name.png" 2>/dev/null
  last=$(ls -1 "$work/runs/$name/images"/*.png 2>/dev/null | sort | tail -1)
  [ -n "$last" ] && cp "$last" "$work/grid-$name.png"
  rm -rf "$work/runs"   # checkpoints are large; the logs, metrics and pictures above stay
}

# Runs one step, then packs what there is, so that a command stopped at its limit still brings
# back everything done before the step it was in.
run_step() {
  local s=$1; shift
  echo "== $s $* ($(( deadline - $(date +%s) )) s left)"
  "step_$s" "$@"
  ls "$work"/bench-*.txt > /dev/null 2>&1 && write_benchmarks
  pack
}

case ${1:-session} in
  session)
    deadline=$(( $(date +%s) + ${SESSION_SECONDS:-560} ))
    echo "# GPU session $(date -u '+%Y-%m-%d %H:%M') UTC, slotfix $(cat .gpu/commit 2>/dev/null || echo '?'), part ${2:-1}" >> "$work/SUMMARY.md"
    if [ -n "${SESSION_STEPS:-}" ]; then
      # Another order, e.g. SESSION_STEPS="check steps kernels sanitize:racecheck": each word a
      # step, its arguments after colons.
      for s in $SESSION_STEPS; do
        IFS=: read -r -a words <<< "$s"
        run_step "${words[@]}"
      done
    elif [ "${2:-}" = more ]; then
      run_step sanitize racecheck synccheck
      run_step torch compile
      run_step train tetrominoes 150
      run_step train multi_dsprites 240
    elif [ "${2:-}" = short ]; then
      run_step check
      run_step steps
      run_step train tetrominoes 120
      run_step profile
      run_step sanitize memcheck
    else
      run_step check
      run_step steps
      run_step torch
      run_step ablate
      run_step sanitize memcheck
      run_step profile
      run_step replay
      run_step kernels
      run_step loader
    fi
    echo
    cat "$work/SUMMARY.md"
    ;;
  check) run_step check "${2:-}" ;;
  steps | kernels | loader | replay | ablate | profile) run_step "$1" ;;
  torch) run_step torch "${2:-}" ;;
  bench) run_step steps; run_step loader; run_step kernels ;;
  sanitize) shift; [ $# -gt 0 ] || set -- memcheck racecheck synccheck; run_step sanitize "$@" ;;
  train) run_step train "${2:?config name, e.g. tetrominoes}" "${3:-500}" ;;
  *)
    echo "usage: bash tools/gpu_session.sh session [more|short] | check [all] | steps | kernels | bench | replay"
    echo "       | loader | ablate | profile | torch [compile] | sanitize [TOOL...] | train NAME [SECONDS]"
    exit 2
    ;;
esac
