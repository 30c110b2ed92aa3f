"""triton_repo stays importable, and its CLIs answer -h, without tritonclient, torch or onnxruntime
(tests/test_layers.py checks how its modules import one another)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BLOCK = ("import sys\nfor m in ('tritonclient', 'tritonclient.grpc', 'google.protobuf', 'torch', 'onnx', "
         "'onnxruntime', 'tensorrt'): sys.modules[m] = None\n")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])


def test_modules_import_without_optional_dependencies():
    proc = _run("import triton_repo.build, triton_repo.config, triton_repo.forms, triton_repo.serve, "
                "triton_repo.server, export.core.preprocessing, triton_repo.testing, triton_repo.repository")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("module", ["triton_repo.build", "triton_repo.serve"])
def test_help_without_optional_dependencies(module):
    proc = _run(f"import runpy; sys.argv = ['{module}', '-h']; runpy.run_module('{module}', run_name='__main__')")
    assert proc.returncode == 0, proc.stderr
    assert "--artifacts" in proc.stdout or "--http-port" in proc.stdout


def test_missing_tritonclient_names_the_extra(tmp_path):
    proc = _run("from triton_repo.config import model_config_pb2\n"
                "from export.core.errors import MissingDependencyError\n"
                "try:\n    model_config_pb2()\nexcept MissingDependencyError as e:\n    print(e)\n")
    assert "pip install 'mvt-deploy[serve]'" in proc.stdout, proc.stderr


def test_missing_client_skips_but_fails_where_the_server_is_required(tmp_path):
    """Triton tests gate their imports through triton_repo.testing: MVT_REQUIRE_TRITON_SERVER=1 (CI) turns
    the skip into a failure, as it does for a missing tritonserver."""
    test = tmp_path / "test_gate.py"
    test.write_text("from triton_repo.testing import import_or_skip\n"
                    "import_or_skip('mvt_no_such_client.http')\n"
                    "def test_never_runs():\n    pass\n")
    root = Path(__file__).resolve().parents[2]
    results = {}
    for flag in ("0", "1"):
        env = {**os.environ, "MVT_REQUIRE_TRITON_SERVER": flag, "PYTHONPATH": str(root)}
        results[flag] = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                            str(test)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                                           env=env)
    skipped, required = results["0"], results["1"]
    # a skipped module collects nothing: pytest's exit code 5, not an error
    assert skipped.returncode == pytest.ExitCode.NO_TESTS_COLLECTED and "1 skipped" in skipped.stdout, skipped.stdout
    assert "pip install 'mvt-deploy[serve]'" in skipped.stdout
    assert required.returncode != 0 and "MVT_REQUIRE_TRITON_SERVER=1 but mvt_no_such_client" in required.stdout, \
        required.stdout
