#!/usr/bin/env bash
# Static checks, configured in pyproject.toml ([tool.ruff], [tool.mypy]); exits non-zero on any finding.
#   ruff  pyflakes (F), pycodestyle (E, W; 120 columns), import order (I)
#   mypy  every function body, annotated or not (check_untyped_defs), in export/, mvt_kernels/, triton_repo/,
#         parity_tests/, scripts/, tests/ and conftest.py: a call to one of our functions or dataclasses
#         with a wrong keyword or a missing argument fails here, in GPU-only tests and scripts too, with
#         no GPU and no TensorRT installed.
# Runs from .venv (scripts/setup.sh installs both tools with the `dev` extra). MYPY_CACHE_DIR moves
# mypy's cache (default .mypy_cache; a cold run takes ~40 s on 2 cores, a warm one a few seconds).
set -euo pipefail
cd "$(dirname "$0")/.."

py=.venv/bin/python
if [ ! -x "$py" ]; then
    echo "lint: $py not found; run scripts/setup.sh first" >&2
    exit 2
fi
paths=(export mvt_kernels triton_repo parity_tests embed scripts tests conftest.py)  # the same files as [tool.mypy] files

status=0
echo "lint: ruff check ${paths[*]}"
"$py" -m ruff check --no-fix "${paths[@]}" || status=1
echo "lint: mypy (files and options from pyproject.toml)"
"$py" -m mypy || status=1
if [ "$status" -ne 0 ]; then
    echo "lint: FAILED (ruff check --fix repairs import order; see the messages above)" >&2
else
    echo "lint: passed"
fi
exit "$status"
