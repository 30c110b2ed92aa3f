"""Structure of each --attention lowering: which nodes replace the traced MatMul/Softmax/MatMul, in which
domain, and that every form can be turned into every other (model.onnx -> engine.onnx, rebuilds)."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest

from export.core.errors import OptionError
from export.core.manifest import Manifest
from export.graph import attention as att
from export.graph.attention import (
    ATTENTION_LOWERINGS,
    attention_sites,
    check_engine_attention,
    lower_attention,
    lower_graph,
    lowered_attention,
    resolve_attention,
)


@pytest.fixture(scope="module")
def canonical(exported):
    _, _, path = exported("mlcd-rope2d")
    return onnx.load(str(path))


def _ops(model) -> Counter:
    return Counter((n.domain, n.op_type) for n in model.graph.node)


def test_every_family_has_one_site_per_layer(exported):
    for family in ("mlcd-rope2d", "clip-vision", "unicom"):
        ckpt, _, path = exported(family)
        sites = attention_sites(onnx.load(str(path)))
        assert len(sites) == ckpt.config.num_hidden_layers, family
        assert {s.heads for s in sites} == {ckpt.config.num_attention_heads}, family


def test_mha_replaces_the_scores_and_carries_its_body(canonical):
    lowered = lower_attention(canonical, "mha")
    ops = _ops(lowered)
    assert ops[(att.MHA_DOMAIN, att.MHA_OP)] == 2 and ops[("", "Softmax")] == 0
    mha = next(n for n in lowered.graph.node if n.op_type == att.MHA_OP)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in mha.attribute}
    assert attrs == {"num_heads": 4, "scale": 1.0}  # q and k^T arrive scaled, as traced
    (body,) = [f for f in lowered.functions if (f.domain, f.name) == (att.MHA_DOMAIN, att.MHA_OP)]
    assert list(body.attribute) == ["num_heads", "scale"]
    assert {o.domain: o.version for o in lowered.opset_import}[att.MHA_DOMAIN] == att.MHA_VERSION
    assert ops[("mvt", "RoPE2D")] == 4  # the RoPE op still feeds q and k
    # k^T's traced Reshape/Transpose/Reshape is gone (one Transpose a layer); q, k, v and the output get one
    # each, which onnxruntime cancels against the model's own around the attention
    assert ops[("", "Transpose")] == _ops(canonical)[("", "Transpose")] - 2 * 1 + 2 * 4
    onnx.checker.check_model(lowered, full_check=True)


def test_onnx23_uses_the_standard_attention(canonical):
    lowered = lower_attention(canonical, "onnx23")
    ops = _ops(lowered)
    assert ops[("", "Attention")] == 2 and ops[("", "Softmax")] == 0
    assert {o.domain: o.version for o in lowered.opset_import}[""] == att.ATTENTION_OPSET
    onnx.checker.check_model(lowered, full_check=True)


def test_forms_convert_into_each_other(canonical):
    """engine.onnx and rebuilds start from model.onnx in whatever form it holds."""
    for first in ATTENTION_LOWERINGS:
        for second in ATTENTION_LOWERINGS:
            model = lower_attention(lower_attention(canonical, first), second)
            assert lowered_attention(model) == second
            back = lower_attention(model, "decomposed")
            for op in ("MatMul", "Softmax"):  # the traced attention again (k^T may be one Transpose now)
                assert _ops(back)[("", op)] == _ops(canonical)[("", op)]
            assert lowered_attention(back) == "decomposed"
            assert not [f for f in back.functions if f.domain == att.MHA_DOMAIN]


def test_lower_graph_does_rope_and_attention_and_leaves_the_input_alone(canonical):
    before = canonical.SerializeToString()
    lowered = lower_graph(canonical, "onnx23", "onnx23")
    ops = _ops(lowered)
    assert ops[("", "RotaryEmbedding")] == 4 and ops[("", "Attention")] == 2
    assert canonical.SerializeToString() == before


def test_a_softmax_read_elsewhere_is_left_alone(canonical):
    model = onnx.ModelProto()
    model.CopyFrom(canonical)
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(softmax.output[0]))
    assert len(attention_sites(model)) == 1  # the other layer only
    assert _ops(lower_attention(model, "mha"))[("", "Softmax")] == 1


@pytest.mark.parametrize("engine, precision, expected", [
    (None, "fp32", "mha"), (None, "fp16", "mha"),
    (("tensorrt", "10.13.3"), "fp16", "decomposed"), (("tensorrt", "10.14.1"), "fp16", "onnx23"),
    (("tensorrt", "11.4.0"), "int8", "onnx23"), (("tensorrt", "11.4.0"), "fp32", "decomposed"),
    (("tensorrt-rtx", "1.7.1.116"), "fp8", "onnx23"), (("tensorrt-rtx", "1.7.1.116"), "fp32", "decomposed")])
def test_auto_picks_the_form_the_runtime_fuses(engine, precision, expected):
    assert resolve_attention("auto", engine, precision) == expected
    assert resolve_attention("decomposed", engine, precision) == "decomposed"  # an explicit choice wins


def test_unknown_form_and_fp32_iattention_are_refused():
    with pytest.raises(OptionError, match="choose one of"):
        resolve_attention("flash", None)
    with pytest.raises(OptionError, match="fp16/bf16 only"):
        check_engine_attention("onnx23", "fp32", "tensorrt-rtx")
    check_engine_attention("onnx23", "fp32", "none")  # no engine: onnxruntime runs it
    check_engine_attention("onnx23", "fp16", "tensorrt")
    check_engine_attention("onnx23", "fp16", "tensorrt", "10.14.1")
    with pytest.raises(OptionError, match="no Attention importer"):  # the parser of 10.9-10.13
        check_engine_attention("onnx23", "fp16", "tensorrt", "10.13.0")


def test_manifest_fallback_for_exports_before_the_option():
    old = Manifest.of({"options": {}, "model": {}, "interface": {}, "rope_lowering": "custom",
                       "engine": {"built": True, "runtime": "tensorrt", "version": "10.13"}})
    assert old.attention == "auto" and old.attention_lowering == "decomposed"
    assert old.engine.attention_lowering == "decomposed"
