"""scripts/benchmark.py in its short CI mode on a tiny model, and the analytic FLOPs formula."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from export.models.testing import load_script

ROOT = Path(__file__).resolve().parents[2]


def _script():
    return load_script("benchmark")


@pytest.mark.parametrize("alias, gflops", [("rice-l-560", 1221), ("mlcd-bigg-448", 4110), ("mlcd-l-336", 382),
                                           ("mlcd-b-32", 8.8)])
def test_flops_formula_matches_the_published_figures(alias, gflops):
    from export.models.zoo import zoo_entry

    entry = zoo_entry(alias)
    config = SimpleNamespace(model_type=entry.model_type, **entry.config)
    flops = _script().flops_per_image(config, entry.image_size, entry.image_size)
    assert flops["gflops"] == pytest.approx(gflops, rel=0.01)


def test_short_benchmark_on_a_tiny_model(tiny_folders, tmp_path, capsys):
    out = tmp_path / "bench"
    # --no-tensorrt: the same run on a GPU machine with TensorRT (tensorrt is then skipped with that reason)
    code = _script().main(["--model", str(tiny_folders["mlcd-rope2d"]), "--short", "--out", str(out),
                           "--threads", "2", "--no-tensorrt"])
    assert code == 0
    report = json.loads((out / "benchmark.json").read_text())
    assert (out / "benchmark.png").read_bytes()[:4] == b"\x89PNG"
    backends = {r["backend"] for r in report["results"]}
    assert {"torch-eager", "ort-fp32-custom", "ort-fp32-onnx23", "ort-fp32-decomposed", "ort-fp16", "ort-int8",
            "ort-int8-cpu"} <= backends
    assert "ort-fp32-plugin" in report["skipped"] and "--no-tensorrt" in report["skipped"]["tensorrt"]
    assert {r["batch"] for r in report["results"]} == {1, 2}
    for r in report["results"]:
        assert r["median_ms"] > 0 and r["images_per_s"] > 0 and r["speedup_vs_torch"] > 0
        assert r["pooled_min_cosine"] > 0.99
        assert r["fraction_of_gpu_peak"] is None  # only TensorRT rows have one
    assert all(r["speedup_vs_torch"] == 1.0 for r in report["results"] if r["backend"] == "torch-eager")
    assert report["flops_per_image"]["total"] > 0 and report["settings"]["repeats"] == 2
    assert "| torch-eager |" in capsys.readouterr().out


def test_short_benchmark_on_unicom(tiny_folders, tmp_path):
    """A released-format UNICOM file: its `embedding` is the pooled output compared, its head is in the FLOPs."""
    out = tmp_path / "bench"
    code = _script().main(["--model", str(tiny_folders["unicom"]), "--short", "--out", str(out), "--threads", "2",
                           "--no-tensorrt", "--backends", "ort-fp32-none", "ort-int8"])
    assert code == 0
    report = json.loads((out / "benchmark.json").read_text())
    assert report["model"]["family"] == "unicom"
    assert {r["backend"] for r in report["results"]} == {"torch-eager", "ort-fp32-none", "ort-int8"}
    cosines = {r["backend"]: r["pooled_min_cosine"] for r in report["results"]}
    assert cosines["ort-fp32-none"] > 0.99999 and cosines["ort-int8"] > 0.99
    flops = report["flops_per_image"]
    assert flops["tokens"] == 16 and flops["head"] == 2 * 16 * 128 * 128 + 2 * 128 * 96


def test_bad_arguments_exit_2(capsys):
    assert _script().main(["--batch-sizes", "0", "--short"]) == 2


@pytest.mark.parametrize("target", ["scripts/benchmark.py", "scripts/visualize_features.py", "parity_tests"])
def test_help_needs_no_heavy_dependency(target):
    """-h works with torch, onnx, onnxruntime, TensorRT, tritonclient and matplotlib all absent."""
    import subprocess
    import sys

    blocked = ("tensorrt", "tensorrt_rtx", "polygraphy", "torch", "onnx", "onnxruntime", "triton", "tritonclient",
               "matplotlib")
    run = (f"runpy.run_path({str(ROOT / target)!r}, run_name='__main__')" if target.endswith(".py")
           else f"runpy.run_module({target!r}, run_name='__main__')")
    code = f"import runpy, sys\nfor m in {blocked!r}: sys.modules[m] = None\nsys.argv = ['x', '-h']\n{run}\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
