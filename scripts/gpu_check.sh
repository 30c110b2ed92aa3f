#!/usr/bin/env bash
# GPU check of the 2D-RoPE kernels (mvt_kernels/) and the PyTorch model baseline; see scripts/gpu_check.py.
#
# Runs without internet where a CUDA build of torch (with the triton it pins) is installed: the README's set-up
# with TORCH_SPEC (docs/development.md#gpu-check). The plugin's PTX is loaded through the NVIDIA driver itself
# (libcuda.so.1); cuda-bindings or cupy are used only where the driver library cannot be opened. The engine tests
# at the end need the `gpu-check` extra (datacenter TensorRT); without it they are skipped, never failed.
# transformers (model baseline) may be carried as wheels where it is missing:
#   on a machine with internet:  scripts/gpu_wheels.sh            -> scripts/gpu_wheels/
#   on the GPU machine:          MVT_WHEELS=scripts/gpu_wheels scripts/gpu_check.sh
#
#   PYTHON        interpreter (default: .venv/bin/python if present, else python3)
#   MVT_WHEELS    folder of wheels to install transformers from when it is missing (no index)
#   MVT_ROPE_CC   compute capability the plugin's PTX is compiled for (default: the GPU's)
#   MVT_PTX_LOADER  auto (default), driver, cuda-bindings or cupy: what loads the plugin's PTX
#   MVT_GPU_CHECK_TIMEOUT  seconds before gpu_check.py is stopped (default 470, under 8 minutes); the engine
#                 tests after it get MVT_GPU_TESTS_TIMEOUT (default 300)
# Arguments go to scripts/gpu_check.py (e.g. --only correctness,aot --no-sweep --json out.json).
# Exit status: 0 no FAIL (SKIPs allowed: a missing tool or an unknown peak), 1 a FAIL (or a timeout),
# 2 cannot start (no CUDA build of torch, no GPU).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3; fi

unset TRITON_INTERPRET  # the check runs compiled kernels; the interpreter would break AOT compilation
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$py" -c "import torch, triton" 2>/dev/null; then
    echo "cannot start: $py cannot import torch and triton (torch's Linux wheels bring triton)"; exit 2
fi
if ! "$py" -c "import sys, torch; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
    # the README's set-up installs the locked CPU build; a GPU machine needs torch's CUDA build over it
    version=$("$py" -c "import torch; print(torch.__version__.split('+')[0])")
    echo "cannot start: $py has a CPU build of torch; install the CUDA build over it:" \
         "TORCH_SPEC=torch==$version ./scripts/setup.sh (docs/development.md#gpu-check)"
    exit 2
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
[ "$rc" -eq 2 ] && exit 2  # cannot start (or bad arguments): gpu_check.py said why

# The pytest tests gated on a GPU and datacenter TensorRT (engine build + run, the AOT plugin engine).
if "$py" -c "import tensorrt, polygraphy, onnx, onnxruntime" 2>/dev/null; then
    echo "== pytest -m 'gpu or tensorrt'"
    timeout "${MVT_GPU_TESTS_TIMEOUT:-300}" "$py" -m pytest -q -m "gpu or tensorrt" tests parity_tests || rc=1
else
    echo "SKIP pytest -m 'gpu or tensorrt': tensorrt, polygraphy, onnx or onnxruntime is not importable here" \
         "(pip install -e '.[gpu-check]')"
fi
exit "$rc"
