"""The mvt::rope2d custom op against transformers' own rotation, and the patch that routes MLCD to it."""

from __future__ import annotations

import pytest
import torch

import mvt_kernels
from export.models import rope_op


def _tables(seq: int, head_dim: int):
    """transformers-style full tables [1, S, D] = [f_h, f_w, f_h, f_w] and angles."""
    angles = torch.randn(seq, head_dim // 2)  # (S, D/2)
    full = torch.cat([angles, angles], dim=-1)[None]  # (1, S, D)
    return full.cos(), full.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 104])  # 104: MLCD-bigG, not a power of two
def test_op_matches_transformers_rotation(dtype, head_dim):
    from transformers.models.mlcd.modeling_mlcd import apply_rotary_pos_emb_vision

    torch.manual_seed(0)
    q = torch.randn(2, 7, 3, head_dim).to(dtype)  # (B, S, H, D)
    k = torch.randn(2, 7, 3, head_dim).to(dtype)
    cos, sin = _tables(7, head_dim)
    want_q, want_k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    got_q, got_k = rope_op._apply_rotary_pos_emb_vision(q, k, cos, sin)
    assert got_q.dtype == dtype
    torch.testing.assert_close(got_q, want_q, rtol=0, atol=0)
    torch.testing.assert_close(got_k, want_k, rtol=0, atol=0)


def test_op_passes_opcheck():
    from mvt_kernels.torch_op import op_overload

    x = torch.randn(2, 5, 4, 8)
    c, s = torch.randn(5, 4), torch.randn(5, 4)
    torch.library.opcheck(op_overload(), (x, c, s))


def test_public_rope2d_checks_shapes():
    x = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match=r"cos must be \[S, D/2\] = \[5, 4\]"):
        mvt_kernels.rope2d(x, torch.zeros(5, 8), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="impl='cuda' is not available"):
        mvt_kernels.rope2d(x, torch.zeros(5, 4), torch.zeros(5, 4), impl="cuda")


def test_patch_routes_mlcd_attention_and_restores(exported):
    from transformers.models.mlcd import modeling_mlcd

    ckpt, _, _ = exported("mlcd-rope2d")
    original = modeling_mlcd.apply_rotary_pos_emb_vision
    calls = []
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        want = ckpt.model(pixel_values=x).last_hidden_state
        with rope_op.mlcd_rope_through_custom_op():
            inner = modeling_mlcd.apply_rotary_pos_emb_vision

            def spy(*args):
                calls.append(1)
                return inner(*args)

            modeling_mlcd.apply_rotary_pos_emb_vision = spy
            got = ckpt.model(pixel_values=x).last_hidden_state
    assert modeling_mlcd.apply_rotary_pos_emb_vision is original
    assert len(calls) == ckpt.config.num_hidden_layers
    torch.testing.assert_close(got, want, rtol=0, atol=0)
