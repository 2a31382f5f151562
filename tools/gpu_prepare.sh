#!/usr/bin/env bash
# Stage what a GPU session carries (`carry: [".gpu"]`), on the development machine (no GPU
# needed): the release binaries, test and bench executables and configs (../shared/gpu/bundle),
# the commit they were built from, and every kernel compiled by NVRTC for sm_90 (H100 and H200)
# into .gpu/kernel-cache, which tools/gpu_session.sh hands to the backend: the device's first
# command then loads the PTX instead of spending minutes of the lease compiling conv_tc*.cu.
# Usage, from anywhere:   bash tools/gpu_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
../shared/gpu/bundle
git describe --always --dirty > .gpu/commit
nvrtc_dir="${SLOTFIX_NVRTC_DIR:-$HOME/.cache/slotfix/nvrtc-13.0.88}"
if [ ! -e "$nvrtc_dir/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$nvrtc_dir" nvidia-cuda-nvrtc==13.0.88
fi
LD_LIBRARY_PATH="$nvrtc_dir/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  SLOTFIX_KERNEL_CACHE="$PWD/.gpu/kernel-cache" .gpu/bin/slotfix compile-kernels --arch sm_90
# The device tool carries at most 64 MiB.
size=$(du -sm .gpu | cut -f1)
echo ".gpu: $size MiB ($(cat .gpu/commit))"
[ "$size" -lt 64 ] || { echo "over the 64 MiB that a run carries" >&2; exit 1; }
