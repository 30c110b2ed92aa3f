"""Route MLCD's q/k rotation through the torch custom op `mvt::rope2d` (defined in mvt_kernels/torch_op.py).

During export the op is opaque to the tracer and becomes one ONNX node `mvt.RoPE2D`
(see export/graph/rope_node.py and docs/rope2d.md). Importing this module defines the op, with its fake and its
CUDA kernel; `rope2d` is re-exported here for callers that reach it through export.
"""

from __future__ import annotations

import contextlib

import torch

from mvt_kernels.torch_op import rope2d

__all__ = ["rope2d", "half_tables", "mlcd_rope_through_custom_op"]

def half_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' full tables [..., S, D] ([f_h, f_w, f_h, f_w]) -> half tables [S, D/2]."""
    half = cos.shape[-1] // 2
    cos = cos.reshape(-1, cos.shape[-1])[:, :half]  # (S, D/2)
    sin = sin.reshape(-1, sin.shape[-1])[:, :half]
    return cos.float(), sin.float()


def _apply_rotary_pos_emb_vision(q, k, cos, sin):
    """Drop-in for transformers' MLCD `apply_rotary_pos_emb_vision(q, k, cos, sin)`.

    q, k [B, S, H, D]; cos, sin [1, S, D] as MLCDAttention.forward passes them.
    """
    c, s = half_tables(cos, sin)  # (S, D/2) each
    return rope2d(q, c, s), rope2d(k, c, s)


@contextlib.contextmanager
def mlcd_rope_through_custom_op():
    """Route MLCD's q/k rotation through `mvt::rope2d` while the context is open.

    Replaces `transformers.models.mlcd.modeling_mlcd.apply_rotary_pos_emb_vision`, which
    `MLCDAttention.forward` looks up as a module global (checked against transformers 5.24).
    """
    from transformers.models.mlcd import modeling_mlcd

    name = "apply_rotary_pos_emb_vision"
    original = getattr(modeling_mlcd, name, None)
    if original is None:
        raise RuntimeError(
            f"transformers {_transformers_version()} has no modeling_mlcd.{name}; "
            "mvt-deploy was checked against transformers 5.24 — pin transformers to a 5.x release it supports"
        )
    setattr(modeling_mlcd, name, _apply_rotary_pos_emb_vision)
    try:
        yield
    finally:
        setattr(modeling_mlcd, name, original)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
