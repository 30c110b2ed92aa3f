"""Fused 2D-RoPE kernels behind the `mvt::rope2d` op, each beside the pure-torch reference.

    from kernels import rope2d
    y = rope2d(x, cos, sin)          # x [B, S, H, D]; cos, sin [S, D/2] fp32

`impl="torch"` is the reference (kernels/reference.py). The Triton kernel and the TensorRT
ahead-of-time plugin register here as further implementations. torch is imported on first use.
"""

from __future__ import annotations

IMPLEMENTATIONS = ("auto", "torch")


def rope2d(x, cos, sin, impl: str = "auto"):
    """Apply the non-interleaved 2D rotation to x [B, S, H, D] with half tables [S, D/2]."""
    from .reference import check_rope2d_args, rope2d_reference

    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"rope2d: impl={impl!r} is not available; choose one of {', '.join(IMPLEMENTATIONS)}")
    check_rope2d_args(x, cos, sin)
    return rope2d_reference(x, cos, sin)


__all__ = ["rope2d", "IMPLEMENTATIONS"]
