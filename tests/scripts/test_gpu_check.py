"""scripts/gpu_check.py and gpu_check.sh, the parts that decide without a GPU: which tool loads the plugin's PTX
(a missing one is a SKIP, never a FAIL), the kernel-argument packing, the memory peak of the exact GPU and the
verdict. The GPU sections themselves run on a GPU machine (bash scripts/gpu_check.sh)."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from export.models.testing import load_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gc():
    return load_script("gpu_check")


@pytest.fixture()
def results(gc):
    """The script's check list, empty for the test."""
    saved = list(gc.RESULTS["checks"])
    gc.RESULTS["checks"].clear()
    yield gc.RESULTS["checks"]
    gc.RESULTS["checks"][:] = saved


def _problems(**missing):
    return lambda loader: missing.get(loader.replace("-", "_"))


def test_the_driver_loads_the_ptx_when_it_is_there(gc):
    assert gc.choose_ptx_loader("auto", _problems()) == ("driver", None)
    # the driver library would not open: the next tool that is here
    assert gc.choose_ptx_loader("auto", _problems(driver="no libcuda.so.1")) == ("cuda-bindings", None)
    assert gc.choose_ptx_loader("auto", _problems(driver="x", cuda_bindings="y")) == ("cupy", None)
    assert gc.choose_ptx_loader("cupy", _problems(driver="x")) == ("cupy", None)


def test_nothing_to_load_the_ptx_is_a_reason_not_a_failure(gc, results):
    loader, reason = gc.choose_ptx_loader("auto", _problems(driver="no libcuda.so.1", cuda_bindings="not installed",
                                                            cupy="not installed"))
    assert loader is None
    assert "driver: no libcuda.so.1" in reason and "cuda-bindings: not installed" in reason and "cupy" in reason
    loader, reason = gc.choose_ptx_loader("cupy", _problems(cupy="cupy is not importable"))
    assert loader is None and "cupy is not importable" in reason
    gc.check_aot(None, 90, loader, reason)  # no torch needed: nothing is launched
    assert results == [{"status": "SKIP", "what": "aot ptx", "detail": reason}]
    assert gc.verdict([c["status"] for c in results]) == ("PASSED", 0)
    with pytest.raises(ValueError, match="--ptx-loader"):
        gc.choose_ptx_loader("nvrtc", _problems())


def test_the_loaders_are_probed_for_real_here(gc):
    """This machine has no NVIDIA driver: the probe says so instead of raising."""
    problem = gc.ptx_loader_problem("driver")
    try:
        ctypes.CDLL("libcuda.so.1")
        assert problem is None
    except OSError:
        assert problem is not None and "libcuda.so.1" in problem
    if importlib.util.find_spec("cupy") is None:
        assert "cupy" in gc.ptx_loader_problem("cupy")


def test_verdict_fails_only_on_a_fail(gc):
    assert gc.verdict(["PASS", "SKIP", "PASS"]) == ("PASSED", 0)
    assert gc.verdict(["SKIP"]) == ("PASSED", 0)
    assert gc.verdict(["PASS", "FAIL", "SKIP"]) == ("FAILED", 1)


def test_kernel_params_point_at_each_argument_stored_as_its_ptx_type(gc):
    types = [".u64", ".u64", ".u64", ".u32", ".u32", ".u32", ".u32", ".u64"]  # x, cos, sin, 4 x i32, y
    values = [0x7F00_0000_1000, 0x7F00_0000_2000, 0x7F00_0000_3000, 1601, 16, 1601 * 16, 16, 0x7F00_0000_4000]
    array, storage = gc.pack_kernel_params(types, values)
    assert len(array) == 8
    for i, (t, v) in enumerate(zip(types, values)):
        ctype = ctypes.c_uint64 if t == ".u64" else ctypes.c_uint32
        assert ctypes.cast(array[i], ctypes.POINTER(ctype)).contents.value == v
        assert ctypes.sizeof(storage[i]) == (8 if t == ".u64" else 4)
    with pytest.raises(ValueError, match="declares 8 parameters, the launcher passes 7"):
        gc.pack_kernel_params(types, values[:7])
    with pytest.raises(ValueError, match=r"\.f32"):
        gc.pack_kernel_params([".f32"], [1])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None
                    or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="needs OpenAI Triton in a process without TRITON_INTERPRET=1")
def test_the_packing_matches_the_ptx_the_plugin_embeds(gc):
    """The PTX declares what the plugin passes (KERNEL_ARGS), in types the launcher packs."""
    from mvt_kernels.launch import KERNEL_ARGS

    kernel = gc.plugin_kernel(90, "fp16", 104)
    assert len(kernel.params) == len(KERNEL_ARGS)
    array, _ = gc.pack_kernel_params(kernel.params, list(range(1, len(KERNEL_ARGS) + 1)))
    assert len(array) == len(KERNEL_ARGS)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 PCIe", 2.0), ("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 NVL", 3.9),
    ("NVIDIA GH200 480GB", 4.0), ("NVIDIA H200", 4.8), ("NVIDIA H200 NVL", 4.8), ("NVIDIA RTX PRO 6000", None)])
def test_the_bandwidth_is_judged_against_the_exact_boards_peak(gc, name, peak):
    assert gc.memory_peak_tbs(name, None) == peak
    assert gc.memory_peak_tbs(name, 1.5) == 1.5  # --peak-tbs wins


def test_bandwidth_verdicts(gc):
    # 1.7 TB/s is 85% of an H100 PCIe's 2.0 TB/s and 51% of an H100 SXM's 3.35
    assert gc.bandwidth_verdict(1700.0, gc.memory_peak_tbs("NVIDIA H100 PCIe", None))[0] == "PASS"
    status, detail = gc.bandwidth_verdict(1700.0, gc.memory_peak_tbs("NVIDIA H100 80GB HBM3", None))
    assert status == "FAIL" and "50.7% of 3.35 TB/s" in detail
    status, detail = gc.bandwidth_verdict(1700.0, None)  # unknown GPU: the measurement, no verdict
    assert status == "SKIP" and "1700 GB/s measured" in detail and "--peak-tbs" in detail


def test_unknown_sections_are_refused(gc, capsys):
    assert gc.main(["--only", "correctness,speed"]) == 2
    assert "unknown sections speed" in capsys.readouterr().err


def test_a_cpu_build_of_torch_cannot_start(gc, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the check would run")
    assert gc.main(["--json", str(tmp_path / "g.json")]) == 2
    out = capsys.readouterr().out
    assert "cannot start" in out and ("CPU build" in out or "sees no GPU" in out)


def test_the_shell_script_says_how_to_get_a_cuda_torch(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "CPU build of torch" in proc.stdout and "TORCH_SPEC=torch==" in proc.stdout
