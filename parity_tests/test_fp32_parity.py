"""fp32 parity of every RoPE lowering against transformers, on the held-out views (batches of 1 and 3), at the
native resolution and at a non-square one (one graph for any resolution)."""

from __future__ import annotations

import onnx
import pytest

from export.check.parity import onnx_parity
from export.graph.lowering import LOWERINGS, lower_rope


def _lowered_file(exported, family: str, lowering: str, tmp_path):
    ckpt, shape, canonical = exported(family)
    model = lower_rope(onnx.load(str(canonical)), lowering)  # weights loaded: tiny model
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return ckpt, shape, path


@pytest.mark.parametrize("lowering", LOWERINGS)
def test_rope_family_lowering_matches_transformers(exported, lowering, tmp_path):
    ckpt, shape, path = _lowered_file(exported, "mlcd-rope2d", lowering, tmp_path)
    report = onnx_parity(ckpt, shape, path)
    print(report.checklist())
    assert report.passed, report.checklist()
    cases = {c.case for c in report.checks}
    assert {f"{report.views} views @ 56x56", "4 views @ 84x42"} <= cases  # every view, and some at a second size
    assert report.views == 49
    assert {c.output for c in report.checks} == {"last_hidden_state", "pooler_output", "hidden_state", "retrieval"}
    if lowering == "plugin":
        assert any("pluginref" in n for n in report.notes)


def test_clip_family_matches_transformers(exported, tmp_path):
    ckpt, shape, path = _lowered_file(exported, "clip-vision", "custom", tmp_path)
    report = onnx_parity(ckpt, shape, path)
    assert report.passed, report.checklist()
    assert len({c.case for c in report.checks}) == 2  # 2 resolutions


def test_parity_detects_a_wrong_model(exported, tmp_path):
    """The check can fail: a graph whose RoPE ignores the sine table must not pass."""
    ckpt, shape, path = _lowered_file(exported, "mlcd-rope2d", "decomposed", tmp_path)
    model = onnx.load(str(path))
    swapped = 0
    for node in model.graph.node:
        # x1*c - x2*s  ->  x1*c + x2*s: a sign error in the rotation
        if node.op_type == "Sub" and "y1" in node.output[0]:
            node.op_type = "Add"
            swapped += 1
    assert swapped == ckpt.config.num_hidden_layers * 2  # q and k of every layer
    onnx.save(model, str(path))
    report = onnx_parity(ckpt, shape, path)
    assert not report.passed


def test_head_dim_104_like_bigg(tmp_path):
    """MLCD-bigG's head dim (104) is not a power of two: every lowering still matches transformers."""
    from dataclasses import replace

    from export.graph.trace import ExportShape, export_canonical
    from export.models.families import MLCD_ROPE2D
    from export.models.loading import load_folder
    from parity_tests.tiny_models import save_tiny_checkpoint

    family = replace(MLCD_ROPE2D, tiny_config={**MLCD_ROPE2D.tiny_config, "hidden_size": 208,
                                                 "num_attention_heads": 2, "num_hidden_layers": 1})
    ckpt = load_folder(save_tiny_checkpoint(family, tmp_path / "ckpt"))
    assert ckpt.config.hidden_size // ckpt.config.num_attention_heads == 104
    shape = ExportShape(56, 42)
    canonical = tmp_path / "canonical.onnx"
    export_canonical(ckpt, shape, canonical)
    for lowering in ("custom", "onnx23", "decomposed"):
        path = tmp_path / f"{lowering}.onnx"
        onnx.save(lower_rope(onnx.load(str(canonical)), lowering), str(path))
        report = onnx_parity(ckpt, shape, path, batch_sizes=(2,))
        assert report.passed, report.checklist()
