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


@pytest.mark.parametrize("runtime, version, lowering", [
    ("tensorrt", "10.8.0.43", "decomposed"),  # no AOT plugins, no RotaryEmbedding
    ("tensorrt", "10.9.0.34", "plugin"),
    ("tensorrt", "10.12.0.36", "plugin"),  # the parser has no RotaryEmbedding before 10.15
    ("tensorrt", "10.14.1.48", "plugin"),
    ("tensorrt", "10.15.1.29", "onnx23"),
    ("tensorrt-rtx", "1.7.1.116", "onnx23"),
])
def test_the_tensorrt_row_is_lowered_as_the_export_lowers_it(runtime, version, lowering):
    from export.graph.lowering import resolve_rope

    script = _script()
    assert script.tensorrt_lowering((runtime, version), has_rope=True) == lowering
    assert lowering == resolve_rope("auto", (runtime, version))  # one rule, the export's
    assert script.tensorrt_lowering((runtime, version), has_rope=False) == "none"  # CLIP-style: nothing to lower


def test_fraction_of_peak_uses_the_exact_board():
    script = _script()
    assert script.gpu_peak("NVIDIA H100 PCIe") == 756e12  # not the SXM's 989
    assert script.gpu_peak("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert script.gpu_peak("NVIDIA L40") is None and script.gpu_peak(None) is None  # not the L4, not a guess


def test_the_tensorrt_row_shows_the_copies_it_leaves_out():
    """Layout of the report from given GPU timings: the row's latency is the engine's; the copies and the
    numpy-in, numpy-out time are beside it."""
    from export.runners.trt_timing import TIMING, EngineTiming, summarize

    script = _script()
    samples = [EngineTiming(h2d_ms=10.0, compute_ms=40.0, d2h_ms=20.0, h2d_bytes=120_000_000, d2h_bytes=210_000_000)]
    timing = summarize(samples, [0.075])
    results = [
        {"backend": "torch-eager", "batch": 32, "median_ms": 4000.0, "images_per_s": 8.0, "speedup_vs_torch": 1.0,
         "pooled_min_cosine": 1.0},
        {"backend": "tensorrt", "batch": 32, "median_ms": 40.0, "images_per_s": 800.0, "speedup_vs_torch": 100.0,
         "pooled_min_cosine": 0.9999, "device_timing": timing},
    ]
    report = {"settings": {"batch_sizes": [32]}, "results": results, "skipped": {},
              "pooled_min_cosine_at_largest_batch": {"torch-eager": 1.0, "tensorrt": 0.9999},
              "tensorrt": {"version": "10.12.0.36", "rope_lowering": "plugin", "timing": TIMING}}
    text = script.table(report)
    assert "| tensorrt | 800.0 (40.0) | 100.00x | 0.999900 |" in text
    assert "tensorrt (TensorRT 10.12.0.36, RoPE plugin): CUDA events around execute_async_v3" in text
    assert "| 32 | 40.00 | 10.00 (120.0, 12.0) | 20.00 (210.0, 10.5) | 43% | 75.00 |" in text
    no_engine = dict(report, results=results[:1], skipped={"tensorrt": "no GPU"}, tensorrt=None)
    assert script.tensorrt_table(no_engine) == "" and "| tensorrt | skipped: no GPU |" in script.table(no_engine)
