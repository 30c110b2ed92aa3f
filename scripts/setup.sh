#!/usr/bin/env bash
# Create .venv with everything a CPU machine can run (export, onnxruntime parity, TensorRT-RTX, tests) from
# the lock CI last passed with (locks/dev.txt, every package pinned with its hashes), then .server-venv.
# Datacenter TensorRT is not on PyPI in installable form; see docs/export.md "TensorRT".
# The locks are for Linux x86-64, CPython 3.11 (torch 2.13.0+cpu); elsewhere install from the ranges:
# `pip install -e '.[onnx,dev]'`. scripts/update_lock.sh moves the locks to the newest releases.
#   MVT_LOCK      the lock to install (default: locks/dev.txt; scripts/update_lock.sh tries candidates)
#   PYTHON        interpreter to base .venv on (default: python3; must be 3.11 for the lock)
#   TORCH_SPEC    a torch to install over the locked one, e.g. torch==2.13.0 (PyPI's CUDA build) on a GPU machine
#   TORCH_INDEX_URL  the index TORCH_SPEC comes from (default PyPI), e.g. PyTorch's wheels for an older driver's CUDA
#   WITH_SERVER=0 skip the Triton server environment (.server-venv, scripts/setup_server_env.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
lock=${MVT_LOCK:-locks/dev.txt}
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$pyver" = 3.11 ] || { echo "setup: $lock is for Python 3.11, $python is $pyver; set PYTHON=python3.11" >&2; exit 1; }

[ -x .venv/bin/python ] || "$python" -m venv .venv
# uv installs the lock (hash-checked, ~10x faster than pip); it is pinned in the lock itself, so sync keeps it.
uv_version=$(sed -n 's/^uv==\([^ ]*\).*/\1/p' "$lock")
[ -x .venv/bin/uv ] && [ "$(.venv/bin/uv --version | cut -d' ' -f2)" = "$uv_version" ] \
    || .venv/bin/python -m pip install --quiet --disable-pip-version-check "uv==$uv_version"
uv() { .venv/bin/uv "$@"; }

# torch 2.13.0+cpu is not on PyPI (its Linux wheel there is the CUDA build): take it from the wheel folders pip
# is configured with (this machine: /opt/wheels), or from UV_FIND_LINKS / UV_EXTRA_INDEX_URL (PyTorch's CPU index).
find_links=()
for dir in ${PIP_FIND_LINKS:-} $(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true); do
    [ -d "$dir" ] && find_links+=(--find-links "$dir")
done
# --compile-bytecode: the .pyc files are written once here; where PYTHONDONTWRITEBYTECODE is set (CI machines) every
# interpreter would otherwise compile transformers, onnx, ... again: ~4 s a process, and a build starts one.
uv pip sync --quiet --compile-bytecode --python .venv/bin/python --require-hashes "${find_links[@]}" "$lock" || {
    echo "setup: installing $lock failed; if torch 2.13.0+cpu was not found, set UV_EXTRA_INDEX_URL to PyTorch's CPU" \
         "wheel index (or UV_FIND_LINKS to a folder holding the wheel)" >&2
    exit 1
}
# TORCH_SPEC replaces the locked CPU torch (on a GPU machine: PyPI's Linux torch is the CUDA build). It comes from
# PyPI or TORCH_INDEX_URL, never from the CPU wheels the sync used (their 2.13.0+cpu sorts above 2.13.0), and is
# reinstalled: the locked 2.13.0+cpu already satisfies `torch==2.13.0` (PEP 440 ignores the local label).
if [ -n "${TORCH_SPEC:-}" ]; then
    env -u UV_EXTRA_INDEX_URL -u UV_FIND_LINKS .venv/bin/uv pip install --quiet --python .venv/bin/python \
        ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} --reinstall-package torch "$TORCH_SPEC"
fi
# No build isolation: setuptools comes from the lock too.
uv pip install --quiet --python .venv/bin/python --no-deps --no-build-isolation -e .
echo "setup: .venv ready from $lock ($(.venv/bin/python -c 'import torch, transformers, onnxruntime as o; print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime {o.__version__}")'))"
# tritonserver's python backend needs its own environment (numpy < 2); see the script.
[ "${WITH_SERVER:-1}" = 0 ] || bash scripts/setup_server_env.sh
