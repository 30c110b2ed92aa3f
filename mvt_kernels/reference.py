"""Pure-torch reference of the 2D-RoPE rotation: the numerics every kernel must match.

Layout (rotate-half, non-interleaved), for one head vector of size D with half tables c, s of size D/2:

    x = [ x1 (D/2) | x2 (D/2) ]
    y = [ x1*c - x2*s | x2*c + x1*s ]

This equals transformers' `q * cos + rotate_half(q) * sin` when its full tables are the half tables
repeated twice ([f_h, f_w, f_h, f_w] in MLCD), which is why only the first half [S, D/2] is passed.
Interleaved RoPE (pairs (x0, x1), (x2, x3), ...) is NOT this layout.
"""

from __future__ import annotations

import torch


def rope2d_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, H, D] by half tables cos/sin [S, D/2]; computed in fp32, returned in x.dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]  # (B, S, H, D/2) each
    c = cos.float().unsqueeze(-2)  # (S, 1, D/2): broadcast over heads
    s = sin.float().unsqueeze(-2)
    out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)  # (B, S, H, D)
    return out.to(x.dtype)


def check_rope2d_args(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Shape rules shared by every implementation; raise ValueError with what was expected."""
    if x.dim() != 4:
        raise ValueError(f"rope2d: x must be [B, S, H, D], got shape {tuple(x.shape)}")
    seq, head_dim = x.shape[1], x.shape[3]
    if head_dim % 2:
        raise ValueError(f"rope2d: head dim D={head_dim} must be even")
    want = (seq, head_dim // 2)
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != want:
            raise ValueError(f"rope2d: {name} must be [S, D/2] = {list(want)}, got {list(t.shape)}")
