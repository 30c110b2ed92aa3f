"""Heavy and GPU-only dependencies stay optional: `import export` and `-h` need none of them."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("tensorrt", "tensorrt_rtx", "polygraphy", "torch", "onnx", "onnxruntime", "modelopt", "triton", "tritonclient")
BLOCK = f"import sys\nfor m in {HEAVY!r}: sys.modules[m] = None\n"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


def test_import_export_needs_no_heavy_dependency():
    proc = _run("import export, mvt_kernels, triton_repo, parity_tests; print(export.__version__)")
    assert proc.returncode == 0, proc.stderr


def test_build_engine_help_needs_no_heavy_dependency():
    proc = _run("import runpy; sys.argv = ['build_engine', '-h']; "
                "runpy.run_module('export.build_engine', run_name='__main__')")
    assert proc.returncode == 0, proc.stderr
    assert "--rope" in proc.stdout and "--dynamic-resolution" in proc.stdout


def test_missing_tensorrt_is_a_reason_not_an_error():
    proc = _run("from export.engine import probe\nfor r in ('tensorrt', 'tensorrt-rtx'): print(probe(r).skip_reason)")
    assert proc.returncode == 0, proc.stderr
    assert "tensorrt is not installed; install mvt-deploy[tensorrt] on a machine with an NVIDIA GPU" in proc.stdout
    assert "tensorrt-rtx is not installed; install mvt-deploy[tensorrt-rtx]\n" in proc.stdout


def test_missing_extra_names_the_extra():
    proc = _run(
        "from export.core.errors import require, MissingDependencyError\n"
        "try:\n    require('tensorrt', 'tensorrt')\nexcept MissingDependencyError as e:\n    print(e)\n"
    )
    assert "pip install 'mvt-deploy[tensorrt]'" in proc.stdout, proc.stderr
