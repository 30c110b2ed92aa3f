"""Outlier-channel splitting carried through attention (export/precision/split.py): V keeps the int8 part, the
outlier channels ride through attention as extra columns of every head and their part is added after out_proj.
Exact in float, every attention lowering still fuses it, and a V whose graph is not the traced pattern is split
as the other linear layers are."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx
import pytest

from export.core.interface import INPUT_NAME
from export.graph.attention import HEAD_SIZE_ALIGN, lower_attention
from export.precision.qdq import quantizable_nodes
from export.precision.smooth import smoothable
from export.precision.split import FLOAT_PATH_SUFFIX, split_outlier_channels
from export.precision.stats import TensorStats
from export.runners.ort import ort_session

FAMILIES = ["clip-vision", "mlcd-rope2d"]
SPIKED = (1, 3)  # channels the statistics below call outliers: the rewrite is exact whatever they hold


def _outlier_stats(model) -> dict[str, TensorStats]:
    """Per-channel statistics of every LayerNorm output that feeds linear layers only, with SPIKED 50x the rest
    (a tiny random model has no outliers; splitting decides from these numbers alone)."""
    stats = {}
    for target in smoothable(model)[0]:
        width = next(t.dims[0] for t in model.graph.initializer if t.name == target.linears[0].input[1])
        peak = np.ones(width)  # (C,)
        peak[list(SPIKED)] = 50.0
        stats[target.tensor] = TensorStats(min=-50.0, max=50.0, channel_max=peak, channel_min=-peak)
    return stats


def _feeds(ckpt, shape) -> list[dict]:
    x = np.random.default_rng(0).standard_normal((2, 3, shape.height, shape.width)).astype(np.float32)  # (B, 3, H, W)
    return [{INPUT_NAME: x}]


def _outputs(model, feed: dict) -> list[np.ndarray]:
    return ort_session(model, "exact").run(None, feed)


def _assert_same(before: list[np.ndarray], after: list[np.ndarray]) -> None:
    for b, a in zip(before, after):
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b))


def _split(model: onnx.ModelProto, folder, feeds) -> tuple[dict, dict, onnx.ModelProto]:
    """Split `model` (weights loaded) saved in `folder`; the split model, weights loaded."""
    folder.mkdir()
    onnx.save(model, str(folder / "model.onnx"))
    report, derived = split_outlier_channels(folder / "model.onnx", folder / "split.onnx", _outlier_stats(model),
                                             feeds, log=lambda _: None)
    return report, derived, onnx.load(str(folder / "split.onnx"))


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_carries_the_split_exactly_in_every_lowering(exported, family, tmp_path):
    ckpt, shape, src = exported(family)
    feeds = _feeds(ckpt, shape)
    fp32 = onnx.load(str(src))
    report, derived, split = _split(fp32, tmp_path / "m", feeds)
    layers = ckpt.config.num_hidden_layers
    carried = [c for e in report["split"] for c in e.get("through_attention", [])]
    assert len(carried) == layers and len({c["out_projection"] for c in carried}) == layers
    assert report["through_attention_statistics"]["tensors"] == layers
    assert set(quantizable_nodes(split)) == set(quantizable_nodes(fp32))  # the side paths are never quantized
    nodes = {n.name: n for n in split.graph.node}
    for entry in carried:
        assert entry["out_projection"] + FLOAT_PATH_SUFFIX in nodes
        assert entry["v_projection"] + FLOAT_PATH_SUFFIX not in nodes  # V's outlier part goes around attention
        z = nodes[entry["out_projection"]].input[0]  # out_proj's int8 input: measured on the split model
        assert z.endswith("/int8_part") and math.isfinite(derived[z].max_abs) and derived[z].max_abs > 0
    before = _outputs(fp32, feeds[0])
    _assert_same(before, _outputs(split, feeds[0]))
    for form, op in (("mha", "MultiHeadAttention"), ("onnx23", "Attention"), ("decomposed", "Softmax")):
        lowered = lower_attention(split, form)
        ops = Counter(n.op_type for n in lowered.graph.node)
        assert ops[op] == layers, form  # the widened V keeps each attention one op
        # TensorRT's IAttention wants k and v of one shape: q and k get zero columns, and all three a head size
        # that flash-style kernels take (v's extra zero columns are sliced off again)
        wide = ckpt.config.hidden_size // ckpt.config.num_attention_heads + len(SPIKED)  # V's head size
        v_padded = wide % HEAD_SIZE_ALIGN != 0
        assert ops["Pad"] == ((3 if v_padded else 2) * layers if form == "onnx23" else 0)
        if form == "onnx23":
            assert _attention_head_sizes(lowered) == {-(-wide // HEAD_SIZE_ALIGN) * HEAD_SIZE_ALIGN}
        _assert_same(before, _outputs(lowered, feeds[0]))
    bare = onnx.ModelProto()
    bare.CopyFrom(split)
    del bare.graph.value_info[:]  # a graph whose value_info was dropped: the head sizes come from the split
    padded, padded_bare = lower_attention(split, "onnx23"), lower_attention(bare, "onnx23")
    assert Counter(n.op_type for n in padded_bare.graph.node) == Counter(n.op_type for n in padded.graph.node)
    _assert_same(before, _outputs(padded_bare, feeds[0]))
    back = lower_attention(lower_attention(split, "onnx23"), "decomposed")
    assert not [n for n in back.graph.node if n.op_type == "Pad" or n.name.endswith("/attention/out_slice")]


def test_a_v_outside_the_traced_pattern_is_split_as_before(exported, tmp_path):
    """The opset-23 Attention op (another lowering), and a V that something else also reads: V gets the ordinary
    side path (Gather(X, O) @ Wv[O] added to its output) and the function is kept."""
    ckpt, shape, src = exported("clip-vision")
    feeds = _feeds(ckpt, shape)
    fp32 = onnx.load(str(src))
    lowered = lower_attention(fp32, "onnx23")
    report, _, _ = _split(fp32, tmp_path / "plain", feeds)
    v = next(c["v_projection"] for e in report["split"] for c in e.get("through_attention", []))  # layer 0's
    read_elsewhere = onnx.ModelProto()
    read_elsewhere.CopyFrom(fp32)
    v_output = next(n.output[0] for n in read_elsewhere.graph.node if n.name == v)
    read_elsewhere.graph.output.append(onnx.ValueInfoProto(name=v_output))
    for i, model in enumerate((lowered, read_elsewhere)):
        report, _, split = _split(model, tmp_path / str(i), feeds)
        assert report["split"]
        side = {n.name for n in split.graph.node if n.name.endswith(FLOAT_PATH_SUFFIX)}
        carried = [c for e in report["split"] for c in e.get("through_attention", [])]
        if model is lowered:
            assert not carried and "through_attention_statistics" not in report  # no pass over the split model
            assert side == {lin.name + FLOAT_PATH_SUFFIX for t in smoothable(model)[0] for lin in t.linears}
        else:
            assert v + FLOAT_PATH_SUFFIX in side and v not in {c["v_projection"] for c in carried}
            assert len(carried) == ckpt.config.num_hidden_layers - 1  # the other layers' V still carried
        _assert_same(_outputs(model, feeds[0]), _outputs(split, feeds[0]))


def _attention_head_sizes(model) -> set[int]:
    """Head sizes of the q, k and v every Attention node reads (shape inference)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {v.name: v.type.tensor_type.shape.dim for v in inferred.graph.value_info}
    return {dims[name][3].dim_value for node in inferred.graph.node if node.op_type == "Attention"
            for name in node.input[:3]}
