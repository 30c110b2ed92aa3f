#!/usr/bin/env bash
# GPU check of the 2D-RoPE kernels (mvt_kernels/) and the PyTorch model baseline; see scripts/gpu_check.py.
#
# Runs as is on an H100/H200 machine without internet where torch, triton and cupy are installed
# (onnxruntime optional). transformers (model baseline) may be carried as wheels:
#   on a machine with internet:  scripts/gpu_wheels.sh            -> scripts/gpu_wheels/
#   on the GPU machine:          MVT_WHEELS=scripts/gpu_wheels scripts/gpu_check.sh
#
#   PYTHON        interpreter (default: .venv/bin/python if present, else python3)
#   MVT_WHEELS    folder of wheels to install transformers from when it is missing (no index)
#   MVT_ROPE_CC   compute capability for the PTX (default: the GPU's)
#   MVT_GPU_CHECK_TIMEOUT  seconds before the check is stopped (default 470, under 8 minutes)
# Arguments go to scripts/gpu_check.py (e.g. --only correctness,aot --no-sweep --json out.json).
# Exit status: 0 all PASS, 1 a FAIL (or the timeout), 2 cannot start.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3; fi

unset TRITON_INTERPRET  # the check runs compiled kernels; the interpreter would break AOT compilation
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$py" -c "import torch, triton" 2>/dev/null; then
    echo "FAIL environment: $py cannot import torch and triton"; exit 2
fi
if ! "$py" -c "import transformers" 2>/dev/null; then
    wheels=${MVT_WHEELS:-scripts/gpu_wheels}
    if [ -d "$wheels" ]; then
        echo "installing transformers from $wheels (no index)"
        "$py" -m pip install --quiet --no-index --find-links "$wheels" transformers \
            || echo "note: transformers could not be installed from $wheels; the model baseline will be skipped"
    else
        echo "note: transformers is not importable and $wheels does not exist; the model baseline will be skipped"
    fi
fi

limit=${MVT_GPU_CHECK_TIMEOUT:-470}
timeout --signal=TERM --kill-after=10 "$limit" "$py" scripts/gpu_check.py "$@"
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "FAILED: gpu_check.py did not finish within ${limit} s"; exit 1
fi

# The pytest tests gated on a GPU and datacenter TensorRT (engine build + run, the AOT plugin engine).
if "$py" -c "import tensorrt, polygraphy, onnx, onnxruntime" 2>/dev/null; then
    echo "== pytest -m 'gpu or tensorrt'"
    timeout 300 "$py" -m pytest -q -m "gpu or tensorrt" tests parity_tests || rc=1
else
    echo "SKIP pytest -m 'gpu or tensorrt': tensorrt, polygraphy, onnx or onnxruntime is not importable here"
fi
exit "$rc"
