#!/usr/bin/env bash
# Create .venv with everything a CPU machine can run: export, onnxruntime parity, tests.
# Datacenter TensorRT is not on PyPI in installable form; see README "TensorRT".
#   TORCH_SPEC   torch requirement to install first (default: torch==2.13.0, the tested release)
#   EXTRAS       project extras (default: onnx,dev,tensorrt-rtx,serve,embed,kserve: TensorRT-RTX builds engines on a CPU)
#   WITH_SERVER=0 skip the Triton server environment (.server-venv, scripts/setup_server_env.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }

pip install --quiet --upgrade pip
# torch before the project, so that the project's `torch>=2.6` is already met by the tested release.
pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
# Triton: kernel tests run in its interpreter and PTX compiles without a GPU (torch 2.13's CUDA build pins 3.7.1).
pip install --quiet "${TRITON_SPEC:-triton==3.7.1}"
pip install --quiet -e ".[${EXTRAS:-onnx,dev,tensorrt-rtx,serve,embed,kserve}]"
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, transformers, onnxruntime as o; print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime {o.__version__}")'))"
# tritonserver's python backend needs its own environment (numpy < 2); see the script.
[ "${WITH_SERVER:-1}" = 0 ] || bash scripts/setup_server_env.sh
