#!/usr/bin/env bash
# The GPU checks in one go, for a CUDA machine with no internet (`make gpu-check`):
#   1. install: a venv over the machine's own python (its torch, Lightning, numpy...) plus the wheels that
#      `make gpu-wheels` put in .gpu-wheels (Hydra, MLflow...), --no-index --no-deps; bp-service editable
#   2. `make test-gpu` (pytest -m gpu), junit xml
#   3. bp-bench's CUDA rows (--device cuda, items GPU_BENCH_ITEMS), json
#   4. a short bp-train of experiment=synthetic in each GPU precision (32-true, bf16-mixed, 16-mixed)
# Expected under 5 minutes on an H200. Every step runs even if an earlier one failed; the exit status is
# non-zero if any failed. Results go to one folder, at most 7 files (the device tool returns 8):
#   summary.txt install.log test-gpu.log junit-gpu.xml bench-gpu.log bench-gpu.json train.log
#
#   tools/gpu-check.sh [OUT_DIR]         # default: $OUT, else ./gpu-check-out
#
# Environment: PYTHON (the machine's python with torch; default python3), WHEELS (default .gpu-wheels),
# WORK (scratch: venv, MLflow store, runs; default /tmp/bp-gpu-check), GPU_BENCH_ITEMS (default 1,2,3,4),
# PRECISIONS, TRAIN_ARGS (extra bp-train overrides), GPU_CHECK_DEADLINE (seconds for everything; default 540).
# GPU_CHECK_CPU=1 is the dry run for machines without CUDA: the same steps on the CPU at toy sizes
# (the gpu tests skip, bench runs step-time on the CPU, bp-train uses trainer=cpu and 3000 rows, without
# 16-mixed, which needs CUDA).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"

OUT_DIR="${1:-${OUT:-$REPO/gpu-check-out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-$REPO/.gpu-wheels}"
WORK="${WORK:-/tmp/bp-gpu-check}"
VENV="$WORK/venv"
CPU_DRY_RUN="${GPU_CHECK_CPU:-0}"
PRECISIONS="${PRECISIONS:-32-true bf16-mixed 16-mixed}"
export PYTHONUNBUFFERED=1 MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
unset MLFLOW_TRACKING_URI HYDRA_FULL_ERROR

SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
FAILED=()
STARTED=$SECONDS
DEADLINE="${GPU_CHECK_DEADLINE:-540}"
say() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME TIMEOUT_S LOG COMMAND...: run (a shell function: in a subshell, without the time limit),
# append its output to LOG, record status and time in the summary. No step runs past DEADLINE seconds
# from the start, so the summary is written before the caller's own time limit ends the script.
step() {
    local name="$1" limit="$2" log="$3"
    shift 3
    local t0=$SECONDS rc left=$((DEADLINE - (SECONDS - STARTED) - 10))
    if [ "$left" -lt 20 ]; then
        say "SKIPPED $name (out of time: GPU_CHECK_DEADLINE=$DEADLINE s)"
        FAILED+=("$name")
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name: $*" >> "$log"
    if declare -F "$1" > /dev/null; then
        ("$@") >> "$log" 2>&1
    else
        timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
    fi
    rc=$?
    if [ "$rc" -eq 0 ]; then
        say "ok      $name ($((SECONDS - t0)) s)"
    else
        [ "$rc" -eq 124 ] && rc="$rc: timed out after ${limit} s"
        say "FAILED  $name (exit $rc, $((SECONDS - t0)) s; see $(basename "$log"))"
        FAILED+=("$name")
    fi
    [ "${rc%%:*}" -eq 0 ]
}

# ----------------------------------------------------------------------------------------------- machine
say "gpu-check: $(date -u +%Y-%m-%dT%H:%M:%SZ) in $REPO, results in $OUT_DIR"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    | sed 's/^/gpu:    /' | tee -a "$SUMMARY"
if ! "$PYTHON" - <<'EOF' 2>&1 | sed 's/^/python: /' | tee -a "$SUMMARY"; then
import sys, torch
cuda = torch.cuda.is_available()
print(sys.executable, sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", cuda)
EOF
    say "FAILED  $PYTHON cannot import torch"
    exit 1
fi
if [ "$CPU_DRY_RUN" != 1 ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    say "FAILED  no CUDA device visible to $PYTHON (GPU_CHECK_CPU=1 is the dry run for CPU machines)"
    exit 1
fi

# ----------------------------------------------------------------------------------------------- install
# A venv over the machine's python: its site-packages (which may itself be a venv's) are added with
# site.addsitedir, after the venv's own, so the carried wheels win and torch/Lightning/numpy are the machine's.
install_venv() {
    set -e
    ls "$WHEELS"/*.whl > /dev/null  # run `make gpu-wheels` on a machine with internet first
    rm -rf "$VENV"
    "$PYTHON" -m venv --without-pip "$VENV"
    local venv_site
    venv_site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$PYTHON" - "$venv_site/_bp_gpu_check_machine_site.pth" <<'EOF'
import site, sys
dirs = [d for d in site.getsitepackages() + [site.getusersitepackages()] if d]
with open(sys.argv[1], "w") as f:
    f.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n")
print("machine site-packages:", *dirs)
EOF
    "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
        "$WHEELS"/*.whl
    "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-build-isolation --disable-pip-version-check \
        -e "$REPO"
    # Byte-compile on every core now rather than one file at a time at first import (MLflow alone is
    # thousands of modules: a minute of the test step on a slow machine). Some packages ship files that
    # are not meant to compile: ignore the status.
    "$VENV/bin/python" -m compileall -q -j 0 "$venv_site" > /dev/null || true
    "$VENV/bin/python" -c 'import torch, lightning, hydra, mlflow, sklearn, pytest, bp_service.training.cli, bp_service.bench.cli
print("imports ok: torch", torch.__version__, "lightning", lightning.__version__, "mlflow", mlflow.__version__)'
    "$VENV/bin/python" -m pip check || true  # informative: --no-deps installs are not resolved
    touch "$VENV/.installed"  # make's stamp: test-gpu must not try to build .venv from the index
}
mkdir -p "$WORK"
lock_sum="$(sha256sum requirements.lock | cut -d' ' -f1)"
if [ "$(cat "$WHEELS/requirements.lock.sha256" 2>/dev/null)" != "$lock_sum" ]; then
    say "WARNING $WHEELS was not made from this requirements.lock (rerun make gpu-wheels if imports fail)"
fi
if ! step install 300 "$OUT_DIR/install.log" install_venv; then
    say "gpu-check: cannot continue without the install; the end of install.log:"
    tail -n 30 "$OUT_DIR/install.log" | tee -a "$SUMMARY"
    exit 1
fi

# ----------------------------------------------------------------------------------------------- tests
pytest_args="-q -p no:cacheprovider --junitxml=$OUT_DIR/junit-gpu.xml"
if command -v make > /dev/null; then
    step test-gpu 240 "$OUT_DIR/test-gpu.log" make --no-print-directory test-gpu VENV="$VENV" PYTEST_ARGS="$pytest_args"
else  # what `make test-gpu` runs
    # shellcheck disable=SC2086
    step test-gpu 240 "$OUT_DIR/test-gpu.log" "$VENV/bin/pytest" -m gpu $pytest_args
fi

# ----------------------------------------------------------------------------------------------- bench
if [ "$CPU_DRY_RUN" = 1 ]; then
    bench_args=(--device cpu --items 1 --quick --reps 3)
else
    bench_args=(--device cuda --items "${GPU_BENCH_ITEMS:-1,2,3,4}" --quick)
fi
step bench 120 "$OUT_DIR/bench-gpu.log" "$VENV/bin/bp-bench" "${bench_args[@]}" --json "$OUT_DIR/bench-gpu.json"

# ----------------------------------------------------------------------------------------------- training
# One MLflow store for the three runs (its schema is created once); runs and checkpoints stay in $WORK.
export BP_SERVICE_HOME="$WORK/home"
if [ "$CPU_DRY_RUN" = 1 ]; then
    train_args=(trainer=cpu data.n_samples=3000 data.batch_size=256 trainer.max_epochs=1)
    PRECISIONS="${PRECISIONS// 16-mixed/}"  # float16 needs CUDA: bp-train refuses it on the CPU
else
    train_args=(trainer=gpu trainer.max_epochs=2)
fi
for precision in $PRECISIONS; do
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of overrides
    step "bp-train $precision" 80 "$OUT_DIR/train.log" "$VENV/bin/bp-train" experiment=synthetic "${train_args[@]}" \
        trainer.precision="$precision" trainer.enable_progress_bar=false "task_name=gpu_check_${precision//-/_}" \
        ${TRAIN_ARGS:-}
done

# ----------------------------------------------------------------------------------------------- summary
{
    echo
    echo "--- bench (bench-gpu.json)"
    sed -n '/^threads:/,$p' "$OUT_DIR/bench-gpu.log"
    echo
    echo "--- bp-train summaries (train.log)"
    grep -E '^(=== bp-train|bp-train: |  test/|  checkpoint|  MLflow run)' "$OUT_DIR/train.log"
    echo
    echo "--- tests (test-gpu.log)"
    grep -E '(passed|failed|error|skipped)' "$OUT_DIR/test-gpu.log" | tail -n 3
} >> "$SUMMARY" 2>/dev/null
tail -n +2 "$SUMMARY" | sed -n '/^--- bench/,$p'
say "gpu-check: $((SECONDS - STARTED)) s, ${#FAILED[@]} step(s) failed${FAILED[*]:+: ${FAILED[*]}}"
[ "${#FAILED[@]}" -eq 0 ]
