"""fp16 and int8 recipes: parity on held-out photos, the graph really is fp16 / Q/DQ, fp32 islands,
overflow localization, calibration inputs."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest

from export.core.images import SKIMAGE_PHOTOS, sample_photos
from export.pipeline import BuildOptions, build
from export.precision.calibration import SKIMAGE_CALIBRATION


def _build(folder, out, **kwargs):
    # runtime="none": these tests judge the ONNX recipe, the same on a machine with TensorRT
    kwargs.setdefault("runtime", "none")
    return build(BuildOptions(model=str(folder), out=out, **kwargs), log=lambda _: None)


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_parity_photos_are_held_out_from_calibration():
    assert not set(SKIMAGE_PHOTOS[:3]) & set(SKIMAGE_CALIBRATION)


@pytest.mark.parametrize("family", ["mlcd-rope2d", "clip-vision"])
def test_fp16_recipe(tiny_folders, tmp_path, family):
    result = _build(tiny_folders[family], tmp_path / "fp16", precision="fp16")
    assert result.parity_passed
    model = onnx.load(str(tmp_path / "fp16" / "model.onnx"))
    types = {t.data_type for t in model.graph.initializer if t.dims and np.prod(t.dims) > 64}
    assert onnx.TensorProto.FLOAT16 in types  # weights really are fp16
    io = [v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)]
    assert set(io) == {onnx.TensorProto.FLOAT}  # float32 interface
    # islands: every LayerNormalization and Softmax computes on float32 tensors (as onnxruntime runs them)
    islands = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert islands
    dtypes = _runtime_dtypes(model, [t for n in islands for t in (n.input[0], n.output[0])])
    assert set(dtypes.values()) == {np.dtype(np.float32)}, dtypes
    recipe = result.manifest["precision_recipe"]
    assert "LayerNormalization" in recipe["fp32_island_op_types"] and recipe["float16_initializers"] > 0
    assert json.loads((tmp_path / "fp16" / "overflow_report.json").read_text())["kept_fp32"] == []


@pytest.mark.parametrize("family", ["mlcd-rope2d", "clip-vision"])
def test_int8_recipe(tiny_folders, tmp_path, family):
    result = _build(tiny_folders[family], tmp_path / "int8", precision="int8")
    assert result.parity_passed
    ops = _ops(tmp_path / "int8" / "model.onnx")
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    model = onnx.load(str(tmp_path / "int8" / "model.onnx"))
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    layers = result.manifest["model"]["num_hidden_layers"]
    assert len(int8_weights) == 6 * layers  # q, k, v, out, fc1, fc2 of every layer
    # LayerNorm, softmax, RoPE and residual adds are not quantized: no Q/DQ feeds them directly
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "RoPE2D"):
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input)
    parity = json.loads((tmp_path / "int8" / "parity.json").read_text())
    assert {m["ort_mode"] for m in parity["measured"]} == {"exact", "optimized"}  # both reported


def test_int8_for_cpu_keeps_the_rest_in_fp32(tiny_folders, tmp_path):
    """--quant-target cpu: uint8-activation Q/DQ on the fp32 graph, fused by onnxruntime into integer kernels."""
    import onnxruntime as ort

    result = _build(tiny_folders["mlcd-rope2d"], tmp_path / "cpu", precision="int8", quant_target="cpu")
    assert result.parity_passed
    recipe = result.manifest["precision_recipe"]
    assert recipe["unquantized_dtype"] == "fp32" and recipe["quant_target"] == "cpu"
    model_types = {t.data_type for t in onnx.load(str(tmp_path / "cpu" / "model.onnx")).graph.initializer}
    assert onnx.TensorProto.UINT8 in model_types  # activation zero points
    path = tmp_path / "cpu" / "model.onnx"
    model = onnx.load(str(path))
    assert not any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fused = _ops(tmp_path / "optimized.onnx")
    assert fused["QLinearMatMul"] + fused["MatMulIntegerToFloat"] > 0, fused


def test_fp8_recipe(tiny_folders, tmp_path):
    result = _build(tiny_folders["mlcd-rope2d"], tmp_path / "fp8", precision="fp8")
    assert result.parity_passed
    model = onnx.load(str(tmp_path / "fp8" / "model.onnx"))
    fp8_weights = [t for t in model.graph.initializer
                   if t.data_type == onnx.TensorProto.FLOAT8E4M3FN and len(t.dims) == 2]
    assert len(fp8_weights) == 6 * result.manifest["model"]["num_hidden_layers"]
    assert result.manifest["precision_recipe"]["fp8"]["calibration_method"] == "distribution"


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_int8_from_an_image_folder(tiny_folders, tmp_path, method):
    images = tmp_path / "calib"
    images.mkdir()
    import skimage.data
    from PIL import Image

    for i, name in enumerate(SKIMAGE_CALIBRATION[:4]):
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(images / f"{i}.{'jpg' if i % 2 else 'png'}")
    result = _build(tiny_folders["mlcd-rope2d"], tmp_path / "out", precision="int8", calib_images=images,
                    calib_method=method)
    assert result.parity_passed
    recipe = result.manifest["precision_recipe"]
    assert recipe["int8"]["calibration_method"] == method
    assert recipe["calibration"]["images"].startswith("4 images from")


@pytest.fixture(scope="module")
def overflowing_checkpoint(tiny_folders, tmp_path_factory):
    """The tiny RoPE model with one MLP made to produce activations far beyond fp16's 65504."""
    from export.models.loading import load_folder

    ckpt = load_folder(tiny_folders["mlcd-rope2d"])
    mlp = ckpt.model.encoder.layers[0].mlp
    mlp.fc1.weight.data *= 3e4  # fc1 output ~1e5-1e6
    mlp.fc2.weight.data /= 3e4  # keeps the residual stream (and so the rest) in range
    folder = tmp_path_factory.mktemp("overflow")
    ckpt.model.save_pretrained(folder)
    ckpt.processor.save_pretrained(folder)
    return folder


def test_overflow_localization_keeps_the_overflowing_nodes_in_fp32(overflowing_checkpoint, tmp_path):
    result = _build(overflowing_checkpoint, tmp_path / "fp16", precision="fp16")
    report = json.loads((tmp_path / "fp16" / "overflow_report.json").read_text())
    kept = {f["op_type"] for f in report["kept_fp32"]}
    assert "MatMul" in kept and all(f["max_abs"] > 65504 / 4 for f in report["kept_fp32"])
    assert result.parity_passed, "with the overflowing nodes kept in fp32, fp16 must pass"


def _runtime_dtypes(model, names: list[str]) -> dict[str, np.dtype]:
    import onnxruntime as ort

    from export.core.interface import INPUT_NAME

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    shape = [1 if not isinstance(d, int) else d for d in session.get_inputs()[0].shape]
    values = session.run(names, {INPUT_NAME: np.zeros(shape, np.float32)})
    return {n: v.dtype for n, v in zip(names, values)}


def _nonfinite_tensors(model, feed) -> list[str]:
    """Names of intermediate tensors that hold inf or NaN when onnxruntime runs `model` on `feed`."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [o for n in probe.graph.node for o in n.output if o]
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in names if t not in existing)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = session.run(names, feed)
    return [n for n, v in zip(names, values) if v.dtype.kind == "f" and not np.all(np.isfinite(v))]


def test_naive_fp16_overflows_where_the_recipe_does_not(overflowing_checkpoint, tmp_path):
    """Islands alone (no overflow localization) leave an MLP in fp16: its activations become inf.

    The pooled output can still look finite on a CPU (onnxruntime's fp16 MatMul does not propagate
    inf the IEEE way a GPU kernel does), so the test looks at every intermediate tensor.
    """
    from export.core.images import pixel_values
    from export.core.interface import INPUT_NAME
    from export.models.loading import load_folder
    from export.precision.fp16 import to_fp16

    _build(overflowing_checkpoint, tmp_path / "fp32", parity=False)
    _build(overflowing_checkpoint, tmp_path / "fp16", precision="fp16", parity=False)
    ckpt = load_folder(overflowing_checkpoint)
    feed = {INPUT_NAME: pixel_values(ckpt.processor, sample_photos(1)).numpy()}
    naive = to_fp16(onnx.load(str(tmp_path / "fp32" / "model.onnx")), keep_fp32_nodes=[])
    assert _nonfinite_tensors(naive, feed), "the naive fp16 graph should overflow"
    assert _nonfinite_tensors(onnx.load(str(tmp_path / "fp16" / "model.onnx")), feed) == []


@pytest.mark.parametrize("precision", ["fp16", "int8", "fp8"])
def test_every_precision_and_lowering_passes_onnx_checker_with_external_data(tiny_folders, tmp_path, precision):
    """onnx.checker's full check (what `polygraphy check lint` runs) accepts every model.onnx, and the
    external-data path (weights in model.onnx.data, as for > 2 GB models) loads back in onnxruntime."""
    from export import runners as backend
    from export.core.metrics import row_cosines
    from export.graph.attention import ATTENTION_LOWERINGS, lower_attention
    from export.graph.lowering import LOWERINGS, lower_rope
    from export.pipeline import check_graph

    out = tmp_path / precision
    result = _build(tiny_folders["mlcd-rope2d"], out, precision=precision, external_data_threshold=1024)
    assert result.parity_passed
    assert result.manifest["onnx_checker"] == "passed"
    assert json.loads((out / "parity.json").read_text())["checks"][0]["metric"] == "onnx_checker"
    assert (out / "model.onnx.data").stat().st_size > 1024
    assert not list(out.glob("*.partial")) and not list(out.glob("qdq.onnx*"))
    x = sample_photos_pixels(result)
    want = backend.ort_session(out / "model.onnx", "exact").run(None, x)
    for lowering in LOWERINGS:
        if lowering == "plugin":
            continue  # no body: only TensorRT runs it (engine.onnx); onnx.checker accepts it in test_lowering
        path = out / f"{lowering}.onnx"
        onnx.save(lower_rope(onnx.load(str(out / "model.onnx"), load_external_data=False), lowering), str(path))
        assert check_graph(path) is None, lowering
        # optimizations off, as parity judges Q/DQ graphs (onnxruntime 1.32's optimizer rejects int8
        # graphs at opset 23; parity reports that as a note)
        got = backend.ort_session(path, "exact").run(None, x)
        # the same model: only rounding differs (which can flip an int8 rounding step, hence cosine)
        assert row_cosines(want[1], got[1]).min() > 0.999, lowering
    assert result.manifest["attention_lowering"] == "mha"
    for form in ATTENTION_LOWERINGS:  # model.onnx (mha) into each form, as engine.onnx is made
        path = out / f"attention-{form}.onnx"
        onnx.save(lower_attention(onnx.load(str(out / "model.onnx"), load_external_data=False), form), str(path))
        assert check_graph(path) is None, form
        got = backend.ort_session(path, "exact").run(None, x)
        assert row_cosines(want[1], got[1]).min() > 0.999, form


def sample_photos_pixels(result) -> dict:
    h, w = result.manifest["interface"]["inputs"]["pixel_values"]["shape"][2:]
    x = np.random.RandomState(0).rand(2, 3, h, w).astype(np.float32)
    return {"pixel_values": x}


def test_topological_sort_fixes_appended_casts():
    from onnx import TensorProto, helper

    from export.precision.fp16 import topological_sort

    # y = Relu(Cast(x)): the Cast appended last, as the float16 converter does with input casts
    nodes = [helper.make_node("Relu", ["x16"], ["y16"], name="relu"),
             helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT, name="out_cast"),
             helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16, name="in_cast")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model, full_check=True)
    topological_sort(model.graph)
    assert [n.name for n in model.graph.node] == ["in_cast", "relu", "out_cast"]
    onnx.checker.check_model(model, full_check=True)
    cyclic = helper.make_graph([helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Relu", ["a"], ["b"])],
                               "c", [], [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])])
    with pytest.raises(ValueError, match="cycle"):
        topological_sort(cyclic)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_build_with_a_relative_output_folder(precision, tmp_path, monkeypatch):
    """onnxruntime's quantizer runs from the model's folder (qdq._weights_read_lazily): paths given
    relative to the caller's folder must still resolve (the zoo matrix passes artifacts/zoo/...)."""
    from pathlib import Path

    from export.pipeline import BuildOptions, build

    monkeypatch.chdir(tmp_path)
    result = build(BuildOptions(precision=precision, out=Path("artifacts") / precision, runtime="none",
                                parity=False, calib_count=2), log=lambda _: None)
    assert (tmp_path / "artifacts" / precision / "model.onnx").is_file()
    assert result.manifest["precision_recipe"]["calibration"]["count"] == 2
