"""Structure of each --rope lowering: the node is where it should be, in the right domain and form."""

from __future__ import annotations

import onnx
import pytest

from export.core.errors import OptionError
from export.graph import rope_node as onnx_rope
from export.graph.lowering import LOWERINGS, lower_rope, resolve_rope
from mvt_kernels.names import DOMAIN, OP_TYPE, PLUGIN_NAME, PLUGIN_NAMESPACE


@pytest.fixture(scope="module")
def canonical(exported):
    _, _, path = exported("mlcd-rope2d")
    return onnx.load(str(path))


def _domains(model):
    return {n.domain for n in model.graph.node}


def test_canonical_has_rope2d_with_function_body(canonical):
    nodes = onnx_rope.rope_nodes(canonical.graph)
    assert len(nodes) == 2 * 2  # q and k in each of 2 layers
    (fn,) = [f for f in canonical.functions if f.name == OP_TYPE]
    assert fn.domain == DOMAIN and [o.domain for o in fn.opset_import] == [""]
    assert not onnx_rope.nodes_without_body(canonical)  # portable: onnxruntime inlines the body
    onnx.checker.check_model(canonical, full_check=True)


def test_custom_is_the_canonical_graph(canonical):
    lowered = lower_rope(canonical, "custom")
    assert len(onnx_rope.rope_nodes(lowered.graph)) == 4
    assert len(lowered.functions) == 1


def test_decomposed_has_only_standard_ops(canonical):
    lowered = lower_rope(canonical, "decomposed")
    assert _domains(lowered) <= {""}
    assert not lowered.functions and DOMAIN not in {o.domain for o in lowered.opset_import}
    onnx.checker.check_model(lowered, full_check=True)


def test_onnx23_uses_standard_rotary_embedding(canonical):
    lowered = lower_rope(canonical, "onnx23")
    rotary = [n for n in lowered.graph.node if n.op_type == "RotaryEmbedding"]
    assert len(rotary) == 4 and not onnx_rope.rope_nodes(lowered.graph)
    attrs = {a.name: a.i for a in rotary[0].attribute}
    assert attrs == {"num_heads": 4, "interleaved": 0}
    assert {o.domain: o.version for o in lowered.opset_import}[""] == 23
    onnx.checker.check_model(lowered, full_check=True)


def test_plugin_node_has_namespace_aot_and_no_body(canonical):
    lowered = lower_rope(canonical, "plugin")
    nodes = onnx_rope.rope_nodes(lowered.graph)
    assert len(nodes) == 4 and not lowered.functions
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs == {"plugin_namespace": PLUGIN_NAMESPACE.encode(), "aot": 1}
    assert nodes[0].op_type == PLUGIN_NAME  # op type = plugin name
    assert onnx_rope.nodes_without_body(lowered) == nodes  # what onnxruntime cannot run


def test_lowering_leaves_the_canonical_model_alone(canonical):
    before = canonical.SerializeToString()
    for lowering in LOWERINGS:
        lower_rope(canonical, lowering)
    assert canonical.SerializeToString() == before


@pytest.mark.parametrize("engine, expected", [
    (None, "custom"), (("tensorrt", "11.4.0"), "onnx23"), (("tensorrt", "10.15.1"), "onnx23"),
    (("tensorrt", "10.12.0"), "plugin"), (("tensorrt", "10.9.0"), "plugin"), (("tensorrt", "10.8.0"), "decomposed"),
    (("tensorrt-rtx", "1.7.1.116"), "onnx23")])
def test_auto_picks_the_best_lowering_for_the_runtime(engine, expected):
    assert resolve_rope("auto", engine) == expected
    assert resolve_rope("decomposed", engine) == "decomposed"  # an explicit choice wins


def test_unknown_lowering_is_refused():
    with pytest.raises(OptionError, match="choose one of"):
        resolve_rope("fused", None)
