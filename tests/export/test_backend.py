"""export.runners: one runner protocol, the engine runtime taken from the manifest, one session helper;
export.core.metrics' shared metrics; and the layering rule (nothing outside parity_tests imports it)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from export import runners as backend
from export.core.errors import EngineUnavailableError, OptionError
from export.core.interface import IMAGE_INPUT, INPUT_NAME
from export.engine.target import EngineTarget
from export.runners.base import image_feed
from export.runners.ort import OnnxRuntimeRunner, ort_session
from export.runners.select import runner_for_artifacts
from export.runners.triton_client import TritonRunner
from export.runners.trt import TensorRTRunner, engine_problem, engine_runner_from_manifest, engine_runtime

ROOT = Path(__file__).resolve().parents[2]
H200 = {"name": "NVIDIA H200", "compute_capability": "9.0"}
RTX_4090 = {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}


def _folder(tmp_path: Path, engine: dict, plan: bool = True) -> Path:
    """An export folder with the manifest fields the engine runner reads (and a placeholder plan)."""
    folder = tmp_path / "artifacts"
    folder.mkdir()
    manifest = {"options": {}, "model": {}, "precision": "fp32", "engine": engine,
                "interface": {"outputs": {"last_hidden_state": {}, "pooler_output": {}}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    if plan:
        (folder / "model.plan").write_bytes(b"not an engine")
    return folder


RTX_ENGINE = {"built": True, "runtime": "tensorrt-rtx", "version": "1.7",
              "compute_capabilities": ["7.5", "8.0", "8.6", "8.9", "12.0"]}
DATACENTER_ENGINE = {"built": True, "runtime": "tensorrt", "version": "11.4", "compute_capabilities": ["9.0"]}


@pytest.fixture
def gpu_here(monkeypatch):
    """Pretend every runtime is installed and `gpu` is visible: export.engine.probe is the only probe."""
    def use(gpu: dict):
        monkeypatch.setattr("export.engine.probe", lambda runtime: EngineTarget(runtime, "1.0", None, gpu))
        monkeypatch.setattr("export.runners.trt._importable", lambda module: True)  # polygraphy "installed"

    return use


@pytest.mark.parametrize("engine, runtime", [(RTX_ENGINE, "tensorrt-rtx"), (DATACENTER_ENGINE, "tensorrt")])
def test_the_plan_opens_in_the_runtime_that_built_it(tmp_path, gpu_here, engine, runtime):
    folder = _folder(tmp_path, engine)
    assert engine_runtime(json.loads((folder / "manifest.json").read_text()), folder) == runtime
    gpu_here(H200 if runtime == "tensorrt" else RTX_4090)
    runner = engine_runner_from_manifest(folder)
    assert isinstance(runner, TensorRTRunner) and runner.runtime == runtime and not runner.is_active
    assert runner.output_names == ["last_hidden_state", "pooler_output"]
    chosen = runner_for_artifacts(folder, "tensorrt")
    assert isinstance(chosen, TensorRTRunner) and chosen.runtime == runtime


def test_a_folder_without_an_engine_is_refused_with_what_to_do(tmp_path):
    folder = _folder(tmp_path, {"built": False, "runtime": "none", "reason": "no engine requested (--runtime none)"},
                     plan=False)
    with pytest.raises(EngineUnavailableError, match=r"no engine in .*--runtime none.*export\.build_engine"):
        engine_runner_from_manifest(folder)


def test_a_missing_plan_is_refused(tmp_path):
    folder = _folder(tmp_path, RTX_ENGINE, plan=False)
    with pytest.raises(EngineUnavailableError, match="model.plan is missing"):
        engine_runner_from_manifest(folder)


def test_no_gpu_or_no_runtime_is_a_clear_refusal(tmp_path, monkeypatch):
    folder = _folder(tmp_path, RTX_ENGINE)
    monkeypatch.setattr("export.engine.probe", lambda r: EngineTarget(r, "1.7", None, {}))
    with pytest.raises(EngineUnavailableError, match="tensorrt-rtx engine: it runs only on an NVIDIA GPU"):
        engine_runner_from_manifest(folder)
    missing = EngineTarget("tensorrt-rtx", None, "tensorrt-rtx is not installed; install mvt-deploy[tensorrt-rtx]")
    assert "install mvt-deploy[tensorrt-rtx]" in engine_problem(RTX_ENGINE, missing)


def test_an_engine_built_for_another_gpu_is_refused(monkeypatch):
    monkeypatch.setattr("export.runners.trt._importable", lambda module: True)
    problem = engine_problem(RTX_ENGINE, EngineTarget("tensorrt-rtx", "1.7", None, H200))
    assert "built for compute capability 7.5, 8.0, 8.6, 8.9, 12.0" in problem and "--compute-capability 9.0" in problem
    assert engine_problem(RTX_ENGINE, EngineTarget("tensorrt-rtx", "1.7", None, RTX_4090)) is None
    assert "is 8.9" in engine_problem(DATACENTER_ENGINE, EngineTarget("tensorrt", "11.4", None, RTX_4090))


def test_activation_binds_polygraphy_to_the_runner_runtime(tmp_path):
    """TensorRTRunner("tensorrt-rtx") selects Polygraphy's RTX binding before it opens the plan, and a
    second runtime in the same process is refused, not silently opened with the wrong one."""
    pytest.importorskip("polygraphy")
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not an engine")
    code = f"""
from export.runners import TensorRTRunner
from export.core.errors import OptionError
try:
    TensorRTRunner({str(plan)!r}, "tensorrt-rtx").activate()
except Exception:
    pass  # no TensorRT-RTX, no GPU or not an engine: the binding is chosen before any of that
from polygraphy import config
print("rtx", config.USE_TENSORRT_RTX)
try:
    TensorRTRunner({str(plan)!r}, "tensorrt").activate()
except OptionError as exc:
    print("refused", exc)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert "rtx True" in proc.stdout, proc.stdout + proc.stderr
    assert "refused this process already loaded Polygraphy for tensorrt-rtx" in proc.stdout, proc.stdout + proc.stderr


def test_unknown_runtimes_and_kinds_are_option_errors(tmp_path):
    with pytest.raises(OptionError, match="tensorrt, tensorrt-rtx"):
        TensorRTRunner(tmp_path / "model.plan", "tensorrt-llm")
    with pytest.raises(OptionError, match="onnxruntime"):
        runner_for_artifacts(tmp_path, "openvino")
    with pytest.raises(OptionError, match="--url"):
        runner_for_artifacts(tmp_path, "triton")
    with pytest.raises(OptionError, match="exact, optimized"):
        OnnxRuntimeRunner(tmp_path / "model.onnx", "fast")


def _tiny_graph(path: Path) -> Path:
    """pixel_values [B, 3, 4, 4] -> pooler_output [B, 3] (spatial mean)."""
    node = helper.make_node("ReduceMean", [INPUT_NAME, "axes"], ["pooler_output"], keepdims=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                                                          ["batch", 3, 4, 4])],
                              [helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_onnxruntime_runner_is_a_context_manager(tmp_path):
    runner = OnnxRuntimeRunner(_tiny_graph(tmp_path / "g.onnx"), "exact")
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    with runner as active:
        assert active is runner and runner.is_active and runner.output_names == ["pooler_output"]
        out = runner.infer({INPUT_NAME: x})
        np.testing.assert_allclose(out["pooler_output"], x.mean(axis=(2, 3)), rtol=1e-6)
    assert not runner.is_active and runner._session is None  # freed
    with pytest.raises(RuntimeError, match="not active"):
        runner.infer({INPUT_NAME: x})
    with pytest.raises(ZeroDivisionError):
        with runner:
            1 / 0
    assert not runner.is_active  # deactivated on the way out of an error too


def test_ort_session_modes_and_default_providers(tmp_path, monkeypatch):
    import onnxruntime as ort

    path = _tiny_graph(tmp_path / "g.onnx")
    exact = ort_session(path, "exact")
    assert exact.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    optimized = ort_session(onnx.load(str(path)), "optimized")  # a ModelProto works too
    assert optimized.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    first = backend.default_providers()[0]
    assert first[0] == "CUDAExecutionProvider" and first[1]["use_tf32"] == "0"
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert backend.default_providers() == ["CPUExecutionProvider"]


def test_plugin_nodes_run_with_the_reference_body_and_leave_no_file(exported, tmp_path):
    from export.core.images import pixel_values, sample_photos
    from export.graph.lowering import lower_rope

    ckpt, shape, canonical = exported("mlcd-rope2d")
    plugin = tmp_path / "model.onnx"
    onnx.save(lower_rope(onnx.load(str(canonical)), "plugin"), str(plugin))
    x = pixel_values(ckpt.processor, sample_photos(1), (shape.height, shape.width)).numpy()
    with OnnxRuntimeRunner(plugin, output_names=["pooler_output"]) as runner, \
            OnnxRuntimeRunner(canonical, output_names=["pooler_output"]) as reference:
        assert runner.pluginref and not reference.pluginref
        np.testing.assert_allclose(runner.infer({INPUT_NAME: x})["pooler_output"],
                                   reference.infer({INPUT_NAME: x})["pooler_output"], atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # the pluginref copy is gone


def test_triton_runner_takes_png_bytes_and_fails_cleanly_without_a_server():
    pytest.importorskip("tritonclient.http")
    from PIL import Image

    images = [Image.fromarray(np.full((5, 7, 3), v, np.uint8)) for v in (0, 200)]
    runner = TritonRunner("127.0.0.1:9", "embed")  # discard port: nothing listens
    feed = image_feed(runner, np.zeros((2, 3, 4, 4), np.float32), images)
    assert list(feed) == [IMAGE_INPUT] and feed[IMAGE_INPUT].shape == (2, 1)
    import io

    decoded = np.asarray(Image.open(io.BytesIO(feed[IMAGE_INPUT][1, 0])))
    assert decoded.shape == (5, 7, 3) and (decoded == 200).all()  # lossless
    with pytest.raises(Exception):
        runner.activate()
    assert not runner.is_active


def test_shared_metrics_agree_and_can_fail():
    from export.core.metrics import compare, rel_l2, row_cosines

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 6, 8))
    assert rel_l2(ref, ref * 1.01) == pytest.approx(0.01)
    assert rel_l2(ref, ref) == 0.0
    noisy = ref + 0.1 * rng.normal(size=ref.shape)
    assert row_cosines(ref, noisy).shape == (24,)
    assert row_cosines(ref, noisy).min() == pytest.approx(compare(ref, noisy)["min_cosine"])
    assert row_cosines(ref, -ref).max() == pytest.approx(-1.0)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_nothing_outside_parity_tests_imports_parity_tests():
    """The product (export, mvt_kernels, triton_repo), the scripts and the unit tests depend on the
    product only; parity_tests is a test suite."""
    offenders = []
    for folder, dirs, files in os.walk(ROOT):
        top = Path(folder) == ROOT  # parity_tests itself and generated artifacts are not looked at
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"
                   and not (top and d in ("parity_tests", "artifacts"))]
        for name in files:
            path = Path(folder) / name
            if name.endswith(".py") and any(n == "parity_tests" or n.startswith("parity_tests.")
                                            for n in _imports(path)):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"these import parity_tests; move what they need into the product: {offenders}"
