"""The Triton kernels against the torch reference on the CPU, under TRITON_INTERPRET=1.

Interpreter mode and ahead-of-time compilation do not mix in one process (triton.compile fails
while TRITON_INTERPRET=1 is set), so every case runs in one child process
(`python -m mvt_kernels.selftest --json`) and each test here asserts on its result.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mvt_kernels.selftest import CASES

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="OpenAI Triton is not installed (pip install triton==3.7.1)")


@pytest.fixture(scope="module")
def interpreter_results():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "mvt_kernels.selftest", "--device", "cpu", "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"selftest printed no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return {r["name"]: r for r in json.loads(lines[-1])["results"]}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_triton_kernel_matches_reference(interpreter_results, case):
    result = interpreter_results[case.name]
    assert result["ok"], result


def test_cases_cover_the_issue():
    dtypes = {c.dtype for c in CASES}
    assert dtypes == {"float32", "float16", "bfloat16"}
    assert any(c.shape[3] == 104 for c in CASES), "MLCD-bigG's head dim must be covered"
    assert any(c.shape[1] & (c.shape[1] - 1) for c in CASES), "a non-power-of-two S must be covered"
    assert {"single", "qk", "qkv_view"} <= {c.kind for c in CASES}


def test_triton_on_cpu_without_interpreter_says_what_to_do():
    torch = pytest.importorskip("torch")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("this process runs under TRITON_INTERPRET=1")
    from mvt_kernels import rope2d

    x = torch.randn(1, 3, 2, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rope2d(x, torch.ones(3, 4), torch.zeros(3, 4), impl="triton")
