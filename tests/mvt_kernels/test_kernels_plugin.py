"""TensorRT plugin `mvt::RoPE2D` (AOT, PTX from the Triton kernel).

Where TensorRT cannot be imported, registration is skipped with the reason; it is never faked.
The engine tests run where TensorRT (>= 10.9) and a CUDA GPU exist.
"""

from __future__ import annotations

import pytest

from mvt_kernels.names import DOMAIN, OP_TYPE, PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION, VERSION
from mvt_kernels.trt_plugin import PLUGIN_ID, register_trt_plugin, tensorrt_skip_reason


def _require_tensorrt_and_gpu():
    reason = tensorrt_skip_reason()
    if reason:
        pytest.skip(reason)
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA GPU is visible")
    pytest.importorskip("triton")


def test_plugin_id_matches_the_plugin_lowering():
    from export.graph.lowering import PLUGIN_NAMESPACE

    assert PLUGIN_ID == f"{PLUGIN_NAMESPACE}::{OP_TYPE}"


def test_registration_without_tensorrt_raises_the_reason():
    reason = tensorrt_skip_reason()
    if reason is None:
        pytest.skip("TensorRT is importable here; see the tensorrt-marked tests")
    assert "TensorRT" in reason
    with pytest.raises(RuntimeError, match="TensorRT"):
        register_trt_plugin()


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_plugin_is_registered():
    _require_tensorrt_and_gpu()
    import tensorrt as trt

    register_trt_plugin()
    register_trt_plugin()  # once per process
    creator = trt.get_plugin_registry().get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    assert creator is not None


def _one_node_model(heads: int, dim: int, seq: int, elem_type):
    from onnx import TensorProto, helper

    node = helper.make_node(PLUGIN_NAME, ["x", "cos", "sin"], ["y"], domain=DOMAIN,
                            plugin_namespace=PLUGIN_NAMESPACE, aot=1)
    graph = helper.make_graph(
        [node], "rope2d",
        [helper.make_tensor_value_info("x", elem_type, ["B", seq, heads, dim]),
         helper.make_tensor_value_info("cos", TensorProto.FLOAT, [seq, dim // 2]),
         helper.make_tensor_value_info("sin", TensorProto.FLOAT, [seq, dim // 2])],
        [helper.make_tensor_value_info("y", elem_type, ["B", seq, heads, dim])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, VERSION)])


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_engine_with_the_plugin_matches_the_reference(dtype):
    _require_tensorrt_and_gpu()
    import tensorrt as trt
    import torch
    from onnx import TensorProto

    from mvt_kernels.reference import rope2d_reference
    from mvt_kernels.selftest import ATOL, RTOL

    register_trt_plugin()
    seq, heads, dim = 37, 3, 104
    elem = {"float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT}[dtype]
    model = _one_node_model(heads, dim, seq, elem)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, seq, heads, dim), (2, seq, heads, dim), (4, seq, heads, dim))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None, "engine build failed"
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()

    torch_dtype = getattr(torch, dtype)
    for batch in (1, 3):  # dynamic batch: one PTX, the grid follows B
        x = torch.randn(batch, seq, heads, dim, device="cuda").to(torch_dtype)
        angles = torch.rand(seq, dim // 2, device="cuda") * 6.3
        cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
        y = torch.empty_like(x)
        context.set_input_shape("x", tuple(x.shape))
        for name, t in (("x", x), ("cos", cos), ("sin", sin), ("y", y)):
            context.set_tensor_address(name, t.data_ptr())
        stream = torch.cuda.current_stream()
        assert context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        ref = rope2d_reference(x, cos, sin)
        torch.testing.assert_close(y.float(), ref.float(), rtol=RTOL[dtype], atol=ATOL[dtype])


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.slow
def test_plugin_lowering_builds_an_engine_and_keeps_model_onnx_portable(tiny_folders, tmp_path):
    """--rope plugin end to end: engine.onnx carries the body-less plugin nodes and becomes a plan with
    the AOT kernel inside; model.onnx keeps the function body, so plain onnxruntime still runs it; the
    plan matches it."""
    _require_tensorrt_and_gpu()
    import numpy as np
    import onnx

    from export import runners as backend
    from export.core.metrics import row_cosines
    from export.pipeline import BuildOptions, build

    out = tmp_path / "plugin"
    result = build(BuildOptions(model=str(tiny_folders["mlcd-rope2d"]), out=out, rope="plugin", runtime="tensorrt",
                                max_batch=2), log=print)
    engine = result.manifest["engine"]
    assert engine["built"], engine
    assert engine["onnx"] == "engine.onnx" and engine["rope_lowering"] == "plugin"
    assert result.manifest["rope_lowering"] == "custom"
    plugin_nodes = [n for n in onnx.load(str(out / "engine.onnx"), load_external_data=False).graph.node
                    if n.op_type == OP_TYPE and n.domain == DOMAIN]
    assert plugin_nodes and all({a.name for a in n.attribute} == {"plugin_namespace", "aot"} for n in plugin_nodes)
    x = {"pixel_values": np.random.RandomState(0).randn(2, 3, 56, 56).astype(np.float32)}
    with backend.OnnxRuntimeRunner(out / "model.onnx") as reference:  # no pluginref needed: portable
        assert not reference.pluginref
        want = reference.infer(x)["pooler_output"]
    with backend.engine_runner_from_manifest(out) as runner:
        got = runner.infer(x)["pooler_output"]
    assert row_cosines(want, got).min() > 0.9999
