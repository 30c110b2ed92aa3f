"""Structure of each --rope lowering: the node is where it should be, in the right domain and form."""

from __future__ import annotations

import onnx
import pytest

from export.core.errors import OptionError
from export.graph import rope_node as onnx_rope
from export.graph.lowering import LOWERINGS, engine_lowering, lower_rope, resolve_rope, unbuildable
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


def everything(module: str) -> bool:
    return True


def no_kernel_compiler(module: str) -> bool:  # the KServe serving image: TensorRT, neither triton nor torch
    return module not in ("triton", "torch")


@pytest.mark.parametrize("engine, expected, without_compiler", [
    (None, "custom", "custom"), (("tensorrt", "11.4.0"), "onnx23", "onnx23"),
    (("tensorrt", "10.15.1"), "onnx23", "onnx23"), (("tensorrt", "10.12.0"), "plugin", "decomposed"),
    (("tensorrt", "10.9.0"), "plugin", "decomposed"), (("tensorrt", "10.8.0"), "decomposed", "decomposed"),
    (("tensorrt-rtx", "1.7.1.116"), "onnx23", "onnx23")])
def test_auto_picks_the_best_lowering_that_builds(engine, expected, without_compiler):
    assert resolve_rope("auto", engine, everything) == expected
    # the AOT plugin's build compiles its kernel (triton, torch): without them auto takes what needs nothing more
    assert resolve_rope("auto", engine, no_kernel_compiler) == without_compiler
    assert resolve_rope("decomposed", engine, everything) == "decomposed"  # an explicit choice wins
    assert resolve_rope("plugin", engine, no_kernel_compiler) == "plugin"  # ... even one that does not build


@pytest.mark.parametrize("requested, version, found, expected, why", [
    ("plugin", "10.12.0", everything, "plugin", None),
    ("plugin", "10.12.0", no_kernel_compiler, "decomposed", "with triton and torch; triton, torch are not installed"),
    ("plugin", "10.16.0", lambda m: m != "torch", "onnx23", "torch is not installed"),
    ("plugin", "10.8.0", everything, "decomposed", "TensorRT parses it from 10.9 on"),
    ("onnx23", "10.12.0", everything, "plugin", "TensorRT parses it from 10.15 on"),
    ("onnx23", "10.12.0", no_kernel_compiler, "decomposed", "TensorRT parses it from 10.15 on"),
    ("custom", "10.12.0", no_kernel_compiler, "custom", None),
    ("auto", "10.12.0", no_kernel_compiler, "decomposed", None)])
def test_engine_lowering_replaces_what_does_not_build_here(requested, version, found, expected, why):
    lowering, reason = engine_lowering(requested, ("tensorrt", version), found)
    assert lowering == expected
    if why is None:
        assert reason is None
    else:
        assert reason.startswith(f"--rope {requested} does not build with tensorrt {version} here") and why in reason
        assert reason.endswith(f"{expected} instead") and unbuildable(expected, ("tensorrt", version), found) is None
    assert engine_lowering("plugin", ("tensorrt-rtx", "1.7"), everything) == \
        ("onnx23", "--rope plugin does not build with tensorrt-rtx 1.7 here (TensorRT-RTX cannot load Python "
                   "plugins): onnx23 instead")


def test_plugin_form_lowers_again_as_the_canonical_graph_does(canonical):
    """An engine graph in the plugin form (or an older --rope plugin model.onnx) is the canonical graph plus the
    plugin attributes: every lowering of it equals that of the canonical graph."""
    plugin = lower_rope(canonical, "plugin")
    for lowering in LOWERINGS:
        assert lower_rope(plugin, lowering) == lower_rope(canonical, lowering), lowering
    assert not onnx_rope.nodes_without_body(lower_rope(plugin, "custom"))  # portable again


def test_unknown_lowering_is_refused():
    with pytest.raises(OptionError, match="choose one of"):
        resolve_rope("fused", None)
