"""The 2D-RoPE rotation as one torch custom op, `mvt::rope2d`, and the patch that routes MLCD through it.

Op: ``mvt::rope2d(Tensor x, Tensor cos, Tensor sin) -> Tensor``
  x    [B, S, H, D]  fp32/fp16/bf16, the layout MLCD's attention holds q and k in
  cos  [S, D/2]      fp32, half table (row 0 is the class token, rows 1.. the patches)
  sin  [S, D/2]      fp32
  out  [B, S, H, D]  x.dtype, computed in fp32 (as transformers does)

During export the op is opaque to the tracer and becomes one ONNX node `mvt.RoPE2D`
(see onnx_rope.py and ROPE2D.md).
"""

from __future__ import annotations

import contextlib

import torch

from kernels.reference import rope2d_reference


@torch.library.custom_op("mvt::rope2d", mutates_args=())
def rope2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return rope2d_reference(x, cos, sin)


@rope2d.register_fake
def _rope2d_fake(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


# On CUDA the op runs the Triton kernel (kernels/torch_op.py); CPU, fake tensors and export keep the
# reference. Registration imports nothing heavy until the first CUDA call.
from kernels import register_cuda_impl  # noqa: E402

register_cuda_impl()


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
    c, s = half_tables(cos, sin)
    return torch.ops.mvt.rope2d(q, c, s), torch.ops.mvt.rope2d(k, c, s)


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
