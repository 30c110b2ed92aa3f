#!/usr/bin/env bash
# Create the server-side Python environment for `python -m triton_repo.serve` and the triton_server tests,
# from locks/server.txt (hash-checked; MVT_SERVER_LOCK names another, as scripts/update_lock.sh does):
#   .server-venv/  numpy<2, onnxruntime (the version of locks/dev.txt, so the same opsets load), pillow:
#                  what the python-backend models import
#                  + nvidia-pytriton (its dependencies left out): the tritonserver 2.51 binary, python backend, stubs
#   .server-venv/perf_analyzer/  Triton's perf_analyzer 2.51 (scripts/setup_perf_analyzer.sh)
# Why a separate environment: the python-backend stub imports from the first python3 on PATH and, with
# numpy 2, silently corrupts tensors; the project's .venv keeps numpy 2 and is never touched here.
# Idempotent: rerunning only checks and fills gaps. Needs .venv's uv (scripts/setup.sh installs it).
#   SERVER_ENV    where to create it (default: .server-venv; triton_repo reads MVT_SERVER_ENV)
#   PYTHON        interpreter to base it on (default: the one behind .venv, else python3); 3.11 for the lock
set -euo pipefail
cd "$(dirname "$0")/.."

env_dir=${SERVER_ENV:-.server-venv}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=$(.venv/bin/python -c 'import sys; print(sys._base_executable)'); else PYTHON=python3; fi
fi
[ -x "$env_dir/bin/python3" ] || "$PYTHON" -m venv "$env_dir"
[ -x .venv/bin/uv ] || { echo "setup_server_env: no .venv/bin/uv; run scripts/setup.sh first" >&2; exit 1; }
# The lock is complete (nvidia-pytriton's own dependencies, pyzmq, tritonclient, ..., are for PyTriton's Python
# API, which we do not use, and are left out on purpose): sync installs exactly what it lists.
.venv/bin/uv pip sync --quiet --compile-bytecode --python "$env_dir/bin/python3" --require-hashes "${MVT_SERVER_LOCK:-locks/server.txt}"

# The python-backend stub links libpython<X.Y>.so.1.0 (Debian: libpython<X.Y>).
pyver=$("$env_dir/bin/python3" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
root=$("$env_dir/bin/python3" -c 'import importlib.util; print(importlib.util.find_spec("pytriton").submodule_search_locations[0])')
stub="$root/tritonserver/python_backend_stubs/$pyver/triton_python_backend_stub"
[ -x "$stub" ] || { echo "setup_server_env: no python-backend stub for Python $pyver in nvidia-pytriton (it ships 3.10-3.12)" >&2; exit 1; }
if ldd "$stub" | grep -q "libpython$pyver.*not found"; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "libpython$pyver" >/dev/null
    else
        echo "setup_server_env: the stub needs libpython$pyver.so.1.0; install it (Debian/Ubuntu: apt-get install libpython$pyver)" >&2
        exit 1
    fi
fi
if ldd "$stub" | grep -q "not found"; then
    echo "setup_server_env: $stub has unresolved libraries:" >&2; ldd "$stub" | grep "not found" >&2; exit 1
fi

"$env_dir/bin/python3" -c 'import numpy, onnxruntime, PIL; assert int(numpy.__version__.split(".")[0]) < 2, numpy.__version__'
# Triton's load generator (perf_analyzer, from the tritonclient wheel) for scripts/load_test.py --perf-analyzer.
SERVER_ENV=$env_dir bash scripts/setup_perf_analyzer.sh
echo "setup: $env_dir ready ($("$env_dir/bin/python3" -c 'import numpy, onnxruntime, PIL; print(f"numpy {numpy.__version__}, onnxruntime {onnxruntime.__version__}, pillow {PIL.__version__}")'), tritonserver from nvidia-pytriton 0.7.0: $root/tritonserver/bin/tritonserver)"
