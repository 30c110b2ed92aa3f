#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.sh needs beyond torch and triton (transformers and its
# small dependencies) into scripts/gpu_wheels/, to carry to a GPU machine without internet.
#   PYVER     target Python version, e.g. 3.12 (default: this interpreter's)
#   TRANSFORMERS_SPEC  default: transformers==5.24.*
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
pyver=${PYVER:-$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
out=scripts/gpu_wheels
mkdir -p "$out"
"$py" -m pip download --quiet --dest "$out" --only-binary=:all: --python-version "$pyver" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    "${TRANSFORMERS_SPEC:-transformers==5.24.*}"
# torch and numpy are on the GPU machine already; do not carry them.
rm -f "$out"/torch-*.whl "$out"/nvidia_*.whl "$out"/triton-*.whl
du -sh "$out"
