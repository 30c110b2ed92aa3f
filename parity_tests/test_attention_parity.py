"""Every --attention form against transformers/PyTorch, in every family, on the held-out views (batches of
1 and 3, a non-square size where the export allows one); the ONNX reference evaluator runs the portable form
through its body."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from export.check.parity import onnx_parity
from export.graph.attention import ATTENTION_LOWERINGS, MHA_OP, lower_graph


def _lowered_file(exported, family: str, attention: str, tmp_path):
    ckpt, shape, canonical = exported(family)
    rope = "custom" if ckpt.family.has_rope else "none"
    path = tmp_path / "model.onnx"
    onnx.save(lower_graph(onnx.load(str(canonical)), rope, attention), str(path))  # tiny: weights inline
    return ckpt, shape, path


@pytest.mark.parametrize("family", ["mlcd-rope2d", "clip-vision", "unicom"])
@pytest.mark.parametrize("attention", ATTENTION_LOWERINGS)
def test_attention_form_matches_pytorch(exported, family, attention, tmp_path):
    ckpt, shape, path = _lowered_file(exported, family, attention, tmp_path)
    report = onnx_parity(ckpt, shape, path)
    assert report.passed, report.checklist()
    assert report.views >= 16 and report.retrieval["recall_at_1"] == 1.0  # every held-out view, judged alone
    if shape.dynamic_resolution:  # and a non-square size where the export allows one
        assert len({c.case for c in report.checks if c.output != "retrieval"}) >= 2


def test_a_wrong_scale_fails_parity(exported, tmp_path):
    """The check can fail: MultiHeadAttention with scale 2 (q k^T counted twice) must not pass."""
    ckpt, shape, path = _lowered_file(exported, "mlcd-rope2d", "mha", tmp_path)
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == MHA_OP:
            next(a for a in node.attribute if a.name == "scale").f = 2.0
    onnx.save(model, str(path))
    assert not onnx_parity(ckpt, shape, path).passed


def test_reference_evaluator_runs_the_portable_graph(exported, tmp_path):
    """onnx.reference has no kernel for com.microsoft.MultiHeadAttention: it runs the model-local body."""
    from onnx.reference import ReferenceEvaluator

    from export.runners.ort import ort_session

    ckpt, shape, path = _lowered_file(exported, "mlcd-rope2d", "mha", tmp_path)
    pixels = np.random.default_rng(0).standard_normal((1, 3, 28, 42)).astype(np.float32)  # (B, 3, H, W)
    reference = ReferenceEvaluator(str(path)).run(None, {"pixel_values": pixels})
    runtime = ort_session(path, providers=["CPUExecutionProvider"]).run(None, {"pixel_values": pixels})
    for ref, got in zip(reference, runtime):
        np.testing.assert_allclose(ref, got, rtol=1e-4, atol=1e-4)
