"""The type checker reaches code that never runs here: a wrong call to one of our functions or
dataclasses, in a GPU-only test, fails `scripts/lint.sh`'s mypy (the project configuration), with
no GPU and no TensorRT. The whole tree is checked by scripts/lint.sh itself (CI runs it)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A GPU-only test module as a developer might write it: it skips on this machine, so only a
# static check can see that its calls do not match export.engine.build_engine and BuildOptions.
GPU_ONLY_TEST = """
import pytest

from export.engine import build_engine, probe, profiles
from export.pipeline import BuildOptions, build


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_from_an_export(tmp_path):
    target = probe("tensorrt")
    if target.skip_reason:
        pytest.skip(target.skip_reason)
    shapes = profiles("pixel_values", (224, 224), False, 14, 2)
    onnx_path, plan = tmp_path / "model.onnx", tmp_path / "model.plan"
    build_engine(target, onnx_path, plan, shapes, {KEYWORD}=None)
    build_engine(target, onnx_path, plan{SHAPES})
    build(BuildOptions(out=tmp_path / "out", {BATCH}=2, runtime="tensorrt"))
"""
# a wrong keyword, a missing argument, a dataclass field that does not exist
WRONG = GPU_ONLY_TEST.format(KEYWORD="input_name", SHAPES="", BATCH="max_batch_size")
RIGHT = GPU_ONLY_TEST.format(KEYWORD="timing_cache", SHAPES=", shapes", BATCH="max_batch")


def _mypy_errors(*files: Path) -> tuple[str, dict[str, list[str]]]:
    """mypy with the project configuration on `files` (and what they import); errors per file name.
    It shares scripts/lint.sh's cache (.mypy_cache, or MYPY_CACHE_DIR): warm after a lint run, a few
    seconds; cold, mypy reads torch's and transformers' types first (~45 s on 2 cores)."""
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                           "--no-pretty", "--show-error-codes",
                           *map(str, files)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    errors: dict[str, list[str]] = {f.name: [] for f in files}
    for line in proc.stdout.splitlines():
        m = re.match(r"(.+?):\d+: error: (.*)", line)
        if m and Path(m.group(1)).name in errors:
            errors[Path(m.group(1)).name].append(m.group(2))
    return proc.stdout + proc.stderr, errors


def test_a_wrong_call_in_a_gpu_only_test_fails_the_type_check(tmp_path):
    pytest.importorskip("mypy", reason="mypy comes with the dev extra: pip install -e '.[dev]'")
    (tmp_path / "wrong").mkdir()
    (tmp_path / "right").mkdir()
    wrong, right = tmp_path / "wrong" / "test_gpu_wrong.py", tmp_path / "right" / "test_gpu_right.py"
    wrong.write_text(WRONG)
    right.write_text(RIGHT)
    output, errors = _mypy_errors(wrong, right)

    found = "\n".join(errors[wrong.name])
    assert 'Unexpected keyword argument "input_name" for "build_engine"' in found, output
    assert 'Missing positional argument "shapes" in call to "build_engine"' in found, output
    assert 'Unexpected keyword argument "max_batch_size" for "BuildOptions"' in found, output
    assert errors[right.name] == [], output
