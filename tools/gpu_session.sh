#!/usr/bin/env bash
# Runs depthvid's GPU checks on a CUDA machine, in stages, each under its own time limit, each
# appending its log to LOG_DIR/stages.log; prints one summary line per stage at the end. Made for
# short GPU leases: put the stages that belong together in one call, and the slow ones last.
#
# Meant for a throwaway GPU machine: `build` pip-installs depthvid (not editable) into the Python it
# runs and overwrites the checkout's depthvid/_C*.so.
#
# Usage: tools/gpu_session.sh LOG_DIR STAGE...
#   build      pip-install depthvid (no deps) with depthvid._C's CUDA kernels; the .so is copied
#              into the checkout (which python -m ... imports from the repo root) and into LOG_DIR.
#              If .gpu/_C*.so exists (from an earlier call on the same image), it is used instead.
#   ext        tools/check_cuda_build.py: the CUDA extension's build, registrations and every op
#              against the torch backend on the GPU
#   triton     tests/gpu_checks.py: the Triton kernels against the torch reference at SD sizes
#   tiny       depthvid tune + edit on the CLI, on CUDA, tiny random model, each backend
#   full       the same at full size (random SD2-depth weights, 8 x 512x512, fp16), once per backend in
#              FULL_BACKENDS (default auto), then a 2-prompt edit: step time, edit time, peak memory
#   bench      pytest --benchmark-only on each file of $BENCH (default benchmarks/bench_*.py), a
#              JSON per file into LOG_DIR
#   tests      the test suite (or the files in $TESTS), with the GPU visible
# Environment: TORCH_CUDA_ARCH_LIST (default: the visible GPU's arch), MAX_JOBS (default: nproc),
#   FULL_STEPS (default 20), STAGE_LIMIT_S (default 540 per stage; LIMIT_<stage> for one stage),
#   DEVICE (default cuda; cpu rehearses the tiny stage's plumbing with the torch backend).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
LOG_DIR="$(mkdir -p "$1" && cd "$1" && pwd)"
shift
cd "$ROOT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export DEVICE="${DEVICE:-cuda}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" PYTHON="${PYTHON:-python3}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
SUMMARY="$LOG_DIR/summary.txt"
export LOG_DIR WORK=/tmp/depthvid-gpu-session
mkdir -p "$WORK"

stage_build() {
    local carried installed
    carried=$(ls .gpu/_C*.so 2> /dev/null | head -1)
    if [ -n "$carried" ]; then
        echo "using the carried $carried: nothing compiled"
        DEPTHVID_SKIP_EXTENSION=1 "$PYTHON" -m pip install -q --no-build-isolation --no-deps . || return 1
    else
        DEPTHVID_FORCE_CUDA=1 "$PYTHON" -m pip install --no-build-isolation --no-deps -v . > "$LOG_DIR/build.log" 2>&1 \
            || { grep -E "error" "$LOG_DIR/build.log" | head -40; return 1; }
    fi
    installed=$(cd /tmp && "$PYTHON" -c "import depthvid, os; print(os.path.dirname(depthvid.__file__))")
    if [ -n "$carried" ]; then cp "$carried" "$installed/"; else cp "$installed"/_C*.so "$LOG_DIR/"; fi
    cp "$installed"/_C*.so depthvid/  # the checkout's copy is what python -m pytest / -m depthvid import here
    "$PYTHON" -c "from depthvid import extension; info = extension.build_info(); print(info); assert info['cuda'], info"
}

stage_ext() {
    local log="$LOG_DIR/build.log"
    [ -f "$log" ] || log=.gpu/build.log  # the build log of a carried .so
    "$PYTHON" tools/check_cuda_build.py $( [ -f "$log" ] && echo --build-log "$log")
}

stage_triton() {
    "$PYTHON" tests/gpu_checks.py > "$LOG_DIR/gpu_checks.jsonl"
    local status=$?
    grep -c '"ok": true' "$LOG_DIR/gpu_checks.jsonl" | sed 's/$/ tensors within tolerance/'
    grep '"ok": false' "$LOG_DIR/gpu_checks.jsonl"
    return $status
}

# tune + edit through the CLI: $1 model folder, $2 tag, then extra tune flags
cli_run() {
    local model=$1 tag=$2
    shift 2
    local run="$WORK/run-$tag" started
    rm -rf "$run"
    started=$(date +%s.%N)
    "$PYTHON" -m depthvid tune depthvid/assets/sample.mp4 --prompt "a ball rolls in front of a box" --model "$model" \
        -o "$run" --device "$DEVICE" --quiet "$@" || return 1
    "$PYTHON" - "$run" "$tag" "$started" << 'EOF'
import json, sys, time, pathlib
run, tag, started = pathlib.Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
records = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
steps = [b["seconds"] - a["seconds"] for a, b in zip(records, records[1:])]
steps.sort()
print(f"{tag} tune: {len(records)} steps, median step {steps[len(steps) // 2]:.3f} s, last loss {records[-1]['loss']:.4f}, "
      f"wall {time.time() - started:.0f} s")
EOF
}

stage_tiny() {
    local model="$WORK/tiny"
    [ -d "$model" ] || "$PYTHON" -c "from depthvid.testing import save_tiny_pipeline; save_tiny_pipeline('$model')"
    local failed=0 flags
    for flags in "--backend triton --precision fp16" "--backend triton --precision bf16" "--backend cpp --precision fp16" \
                 "--backend torch --precision fp32"; do
        local tag
        tag=$(echo "$flags" | awk '{print $2 "-" $4}')
        cli_run "$model" "tiny-$tag" --frames 8 --height 64 --width 64 --steps 12 --checkpoint-every 6 $flags || failed=1
        "$PYTHON" -m depthvid edit "$WORK/run-tiny-$tag" --prompt "a glass marble" --prompt "a red planet" --steps 6 \
            -o "$WORK/edit-tiny-$tag.mp4" --device "$DEVICE" --quiet ${flags#--backend * } --backend "${tag%%-*}" \
            && echo "tiny-$tag edit: ok" || failed=1
    done
    return $failed
}

stage_full() {
    local model="$WORK/full" steps="${FULL_STEPS:-20}" backends=(${FULL_BACKENDS:-auto}) backend
    if [ ! -d "$model/unet" ]; then
        "$PYTHON" -c "from depthvid.testing import save_full_size_pipeline; save_full_size_pipeline('$model')" || return 1
    fi
    for backend in "${backends[@]}"; do
        cli_run "$model" "full-$backend" --steps "$steps" --checkpoint-every "$steps" --backend "$backend" || return 1
    done
    "$PYTHON" - "$WORK/run-full-${backends[0]}" "${backends[0]}" << 'EOF'
import os, sys, time, torch
from depthvid.editing import edit
run, backend = sys.argv[1], sys.argv[2]
torch.cuda.reset_peak_memory_stats()
started = time.perf_counter()
edit(run, ["a tigress with her cubs", "a panda with her cubs"], "/tmp/depthvid-gpu-session/edit-full.mp4", steps=50,
     guidance=12.5, device=os.environ["DEVICE"], backend=backend, progress=False)
print(f"full-{backend} edit: 2 prompts, 50 steps: {time.perf_counter() - started:.1f} s, "
      f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated")
EOF
}

stage_bench() {
    # one pytest per file, each with its JSON: a stage cut short loses only the file in progress
    local file failed=0
    for file in ${BENCH:-benchmarks/bench_*.py}; do
        "$PYTHON" -m pytest "$file" --benchmark-only -q -p no:cacheprovider \
            --benchmark-json "$LOG_DIR/$(basename "$file" .py).json" || failed=1
    done
    return $failed
}

stage_tests() {
    # shellcheck disable=SC2086
    "$PYTHON" -m pytest -q -n "$(( $(nproc) / 2 ))" --dist loadfile -p no:cacheprovider ${TESTS:-tests/}
}

{
    echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
    "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'CUDA archs', '$TORCH_CUDA_ARCH_LIST')"
} | tee "$SUMMARY"
for stage in "$@"; do
    started=$(date +%s)
    echo "== stage $stage" >> "$LOG_DIR/stages.log"
    limit="LIMIT_$stage"
    timeout "${!limit:-${STAGE_LIMIT_S:-540}}" bash -c "$(declare -f); stage_$stage" > "$WORK/$stage.log" 2>&1
    status=$?
    cat "$WORK/$stage.log" >> "$LOG_DIR/stages.log"
    tail -25 "$WORK/$stage.log"
    echo "stage $stage: $([ $status = 0 ] && echo ok || echo "FAILED (exit $status)") in $(( $(date +%s) - started )) s" \
        | tee -a "$SUMMARY"
done
