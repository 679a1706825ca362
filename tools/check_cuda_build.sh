#!/usr/bin/env bash
# Rehearses the CUDA build of depthvid._C, on a machine without a GPU too: builds the extension with
# its CUDA kernels (DEPTHVID_FORCE_CUDA=1) against a CUDA build of torch in a throwaway venv outside
# the checkout, then runs tools/check_cuda_build.py there (the .so links and holds a cubin per arch,
# ptxas spills nothing, the ops register CUDA kernels, the fake kernels trace on CUDA fake tensors;
# with a GPU, each op against the torch backend). Not part of CI: about 4 minutes on 2 cores the
# first time (measured: 1.8 min torch install, 1.8 min build), 2 minutes or less after a kernel change.
#
# Usage: tools/check_cuda_build.sh [WORK_DIR]
#   WORK_DIR (default ~/.cache/depthvid/cuda-build) keeps the venv and the build tree between runs,
#   so a rerun compiles only what changed; delete it for a build from scratch.
# Environment: DEPTHVID_CUDA_TORCH (default torch==2.14.1: the CUDA 13.0 build matching nvcc 13.0),
#   TORCH_CUDA_ARCH_LIST (default 8.0;9.0), MAX_JOBS (default 1: ~0.7 GB peak).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/depthvid/cuda-build}"
mkdir -p "$WORK" && WORK="$(cd "$WORK" && pwd)"
export DEPTHVID_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" MAX_JOBS="${MAX_JOBS:-1}"
command -v nvcc > /dev/null || { echo "check_cuda_build: nvcc not found: install the CUDA toolkit" >&2; exit 2; }

[ -x "$WORK/venv/bin/python" ] || python3 -m venv "$WORK/venv"
if ! "$WORK/venv/bin/pip" install "${DEPTHVID_CUDA_TORCH:-torch==2.14.1}" setuptools wheel ninja numpy pytest \
        > "$WORK/pip.log" 2>&1; then
    tail -20 "$WORK/pip.log" >&2
    echo "check_cuda_build: installing torch failed; full log: $WORK/pip.log" >&2
    exit 1
fi

# The checkout's files (tracked and untracked-not-ignored) into $WORK/src, mtimes kept so that ninja
# rebuilds only what changed; src/build (pip's in-tree build, ninja's objects) survives.
mkdir -p "$WORK/src"
find "$WORK/src" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
(cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$WORK/src"

start=$(date +%s)
if ! (cd "$WORK/src" && "$WORK/venv/bin/pip" install --no-build-isolation --no-deps -v .) > "$WORK/build.log" 2>&1; then
    grep -E "error|Error" "$WORK/build.log" | grep -v "^WARNING" | head -40 >&2
    echo "check_cuda_build: the build failed; full log: $WORK/build.log" >&2
    exit 1
fi
echo "check_cuda_build: built in $(( $(date +%s) - start )) s (log: $WORK/build.log)"
cd "$WORK" && exec "$WORK/venv/bin/python" "$ROOT/tools/check_cuda_build.py" --build-log "$WORK/build.log"
