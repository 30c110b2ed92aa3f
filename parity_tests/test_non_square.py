"""The non-square convention: we match transformers (height first), not upstream unicom.

transformers (modeling_mlcd.py, 5.24) gives patch (r, c) of an Hp x Wp grid the angles of
(h=r, w=c). Upstream deepglint/unicom mlcd/vit_rope2d_hf.py builds its position grid with height
and width swapped: it lays the row-major token index i over a Wp x Hp grid, so token i gets
(h=i // Hp, w=i % Hp). The two agree only on square inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.core.images import pixel_values, sample_photos
from export.core.interface import INPUT_NAME
from export.core.metrics import compare


def _positions(hp: int, wp: int, convention: str) -> torch.Tensor:
    """(Hp*Wp, 2) [h, w] angle indices per row-major patch token."""
    i = torch.arange(hp * wp)
    if convention == "transformers":
        return torch.stack([i // wp, i % wp], dim=-1)
    return torch.stack([i // hp, i % hp], dim=-1)  # unicom: grid built as (W, H)


def _run_with_positions(ckpt, x, convention):
    """Run the transformers model with its RoPE tables built from `convention`'s positions."""
    from transformers.models.mlcd import modeling_mlcd

    model = ckpt.model
    hp, wp = x.shape[-2] // ckpt.patch_size, x.shape[-1] // ckpt.patch_size
    rotary = model.vision_rotary_embedding
    original = type(rotary).forward

    def forward(self, hidden, pos_ids):
        return original(self, hidden, _positions(hp, wp, convention))

    modeling_mlcd.MLCDRotaryEmbedding.forward = forward  # type: ignore[method-assign]  # patched for one pass
    try:
        with torch.no_grad():
            return model(pixel_values=x).last_hidden_state.numpy()
    finally:
        modeling_mlcd.MLCDRotaryEmbedding.forward = original  # type: ignore[method-assign]


def test_transformers_positions_are_what_the_model_uses(exported):
    ckpt, _, _ = exported("mlcd-rope2d")
    x = pixel_values(ckpt.processor, sample_photos(1), (84, 42))
    with torch.no_grad():
        plain = ckpt.model(pixel_values=x).last_hidden_state.numpy()
    np.testing.assert_array_equal(_run_with_positions(ckpt, x, "transformers"), plain)


@pytest.mark.parametrize("size", [(84, 42), (42, 70)])
def test_onnx_matches_transformers_not_unicom_on_non_square(exported, size):
    from export.runners.ort import OnnxRuntimeRunner

    ckpt, _, path = exported("mlcd-rope2d")
    x = pixel_values(ckpt.processor, sample_photos(2), size)
    with OnnxRuntimeRunner(path, output_names=["last_hidden_state"]) as runner:
        ours = runner.infer({INPUT_NAME: x.numpy()})["last_hidden_state"]
    to_hf = compare(_run_with_positions(ckpt, x, "transformers"), ours)
    to_unicom = compare(_run_with_positions(ckpt, x, "unicom"), ours)
    assert to_hf["min_cosine"] > 0.99999 and to_hf["max_abs"] < 1e-4
    assert to_unicom["max_abs"] > 1e-2, "the conventions should differ on a non-square grid"


def test_conventions_agree_on_square(exported):
    ckpt, _, _ = exported("mlcd-rope2d")
    x = pixel_values(ckpt.processor, sample_photos(1), (56, 56))
    a = _run_with_positions(ckpt, x, "transformers")
    b = _run_with_positions(ckpt, x, "unicom")
    np.testing.assert_allclose(a, b, atol=1e-6)
