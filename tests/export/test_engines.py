"""Engine builds: TensorRT-RTX on this CPU machine for fp32/fp16/int8 graphs; datacenter TensorRT
where it and a GPU exist (gated)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import onnx
import pytest

from export import engine as engines

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None and importlib.util.find_spec("polygraphy") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt-rtx / polygraphy not installed (extra: tensorrt-rtx)")


def _cli(*argv, timeout=600) -> subprocess.CompletedProcess:
    # A process per build: Polygraphy binds to one TensorRT flavour per process.
    return subprocess.run([sys.executable, "-m", "export.build_engine", *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout)


def test_profiles_cover_batch_and_resolution():
    assert engines.batch_profile(32) == (1, 16, 32)
    assert engines.batch_profile(1) == (1, 1, 1)
    fixed = engines.profiles("pixel_values", (560, 560), False, 14, 8)
    assert fixed == {"pixel_values": {"min": [1, 3, 560, 560], "opt": [4, 3, 560, 560], "max": [8, 3, 560, 560]}}
    one = engines.profiles("pixel_values", (448, 336), True, 14, 4)
    assert isinstance(one, dict)  # without a native budget: the batched profile alone
    dyn = one["pixel_values"]
    assert dyn["min"][2:] == [224, 168] and dyn["opt"][2:] == [448, 336] and dyn["max"][2:] == [672, 504]
    assert all(v % 14 == 0 for k in ("min", "max") for v in dyn[k][2:])


@needs_rtx
def test_tensorrt_rtx_builds_int8_with_outlier_channels_carried_through_attention(tmp_path):
    """The outlier split widens V by the outlier channels (export/precision/split.py); TensorRT's fused attention
    wants q, k and v of one head size, so the engine form pads all three to a multiple of HEAD_SIZE_ALIGN
    (TensorRT-RTX 1.7 refused the unpadded graph: "Key and Value must have the same shape")."""
    from export.graph.attention import HEAD_SIZE_ALIGN
    from export.models.families import family_by_name
    from export.models.testing import save_outlier_checkpoint

    ckpt = save_outlier_checkpoint(family_by_name("mlcd-rope2d"), tmp_path / "ckpt")
    out = tmp_path / "int8"
    proc = _cli("--model", ckpt, "--out", out, "--precision", "int8", "--runtime", "tensorrt-rtx",
                "--compute-capability", "8.9", "--max-batch", "2", "--skip-parity")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    carried = [c for e in manifest["precision_recipe"]["splitting"]["split"] for c in e.get("through_attention", [])]
    assert carried and manifest["engine"]["built"] and manifest["engine"]["attention_lowering"] == "onnx23"
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(out / "engine.onnx"), load_external_data=False)).graph
    dims = {v.name: v.type.tensor_type.shape.dim for v in graph.value_info}
    attention = [n for n in graph.node if n.op_type == "Attention"]
    sizes = {dims[name][3].dim_value for n in attention for name in n.input[:3] if name in dims}
    assert len(attention) == len(carried) and sizes and all(s % HEAD_SIZE_ALIGN == 0 for s in sizes), sizes

@needs_rtx
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "fp8"])
def test_tensorrt_rtx_builds_an_engine_on_cpu(tiny_folders, tmp_path, precision):
    out = tmp_path / precision
    proc = _cli("--model", tiny_folders["mlcd-rope2d"], "--out", out, "--precision", precision,
                "--runtime", "tensorrt-rtx", "--compute-capability", "8.9", "--max-batch", "4",
                "--timing-cache", tmp_path / "cache" / "timing.cache",  # a folder that does not exist yet
                *(["--tf32"] if precision == "fp32" else []))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    eng = manifest["engine"]
    assert eng["built"] and eng["runtime"] == "tensorrt-rtx" and eng["compute_capabilities"] == ["8.9"]
    assert eng["tf32"]["enabled"] is (precision == "fp32")
    assert eng["runtime_activation_resize"] is True  # TensorRT-RTX 1.7 has the preview feature
    assert eng["profiles"]["pixel_values"]["max"] == [4, 3, 56, 56]
    # auto: model.onnx keeps the portable custom op; the engine got native RotaryEmbedding (engine.onnx)
    assert manifest["rope_lowering"] == "custom"
    assert eng["rope_lowering"] == "onnx23" and eng["onnx"] == "engine.onnx"
    assert {"model.onnx", "engine.onnx", "model.plan"} <= set(manifest["artifacts"])
    engine_graph = onnx.load(str(out / "engine.onnx"), load_external_data=False)
    assert "RotaryEmbedding" in {n.op_type for n in engine_graph.graph.node}
    plan = out / "model.plan"
    assert plan.stat().st_size == eng["bytes"] > 10_000
    assert manifest["artifacts"]["model.plan"]["bytes"] == plan.stat().st_size
    assert (tmp_path / "cache" / "timing.cache").exists()


@needs_rtx
def test_tensorrt_rtx_dynamic_resolution_engine(tiny_folders, tmp_path):
    out = tmp_path / "dyn"
    proc = _cli("--model", tiny_folders["clip-vision"], "--out", out, "--dynamic-resolution", "--skip-parity",
                "--runtime", "tensorrt-rtx", "--compute-capability", "8.6", "--max-batch", "2",
                "--max-pixels", str(112 * 112))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    batched, *native = manifest["engine"]["profiles"]  # the batched profile, then the native mode's
    profile = batched["pixel_values"]
    assert profile["min"] == [1, 3, 28, 28] and profile["max"] == [2, 3, 84, 84]
    budget = manifest["interface"]["native_budget"]
    assert budget == {"factor": 28, "min_pixels": 3136, "max_pixels": 112 * 112}
    assert native == engines.native_profiles("pixel_values", 28, 3136, 112 * 112) and len(native) > 2


@needs_rtx
def test_plugin_lowering_is_refused_by_tensorrt_rtx(tiny_folders, tmp_path):
    proc = _cli("--model", tiny_folders["mlcd-rope2d"], "--out", tmp_path / "p", "--rope", "plugin",
                "--runtime", "tensorrt-rtx", "--skip-parity", "--compute-capability", "8.9")
    assert proc.returncode == 2
    assert "--rope plugin needs datacenter TensorRT" in proc.stderr
    assert not (tmp_path / "p").exists()


def _datacenter_trt_reason() -> str | None:
    target = engines.probe("tensorrt")
    return target.skip_reason


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_datacenter_tensorrt_engine_matches_onnxruntime(tiny_folders, tmp_path):
    reason = _datacenter_trt_reason()
    if reason:
        pytest.skip(reason)
    import numpy as np
    import onnxruntime as ort
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    out = tmp_path / "trt"
    proc = _cli("--model", tiny_folders["mlcd-rope2d"], "--out", out, "--precision", "fp16", "--max-batch", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    x = np.random.RandomState(0).randn(3, 3, 56, 56).astype(np.float32)
    want = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        ["pooler_output"], {"pixel_values": x})[0]
    with TrtRunner(EngineFromBytes(BytesFromPath(str(out / "model.plan")))) as runner:
        got = runner.infer({"pixel_values": x})["pooler_output"]
    cos = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.999
