"""Analytic FLOPs of a ViT encoder: one fact that the benchmark and the calibration default need."""

from __future__ import annotations


def flops_per_image(config, height: int, width: int) -> dict:
    """FLOPs of one image through a ViT encoder (multiply-add = 2 FLOPs; norms and softmax ignored):

        2*N*3*p^2*C  +  L * 2 * (4*S*C^2 + 2*S*C*I + 2*S^2*C)

    N patches, S = N + 1 tokens, C hidden, I MLP width, L layers: the patch embedding, then per layer
    the q/k/v/o projections, the MLP and the two attention products (QK^T and AV)."""
    p = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    c, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    n = (height // p) * (width // p)
    s = n + 1
    patch = 2 * n * 3 * p * p * c
    proj, mlp, attn = 2 * 4 * s * c * c, 2 * 2 * s * c * i, 2 * 2 * s * s * c
    total = patch + layers * (proj + mlp + attn)
    return {"total": total, "gflops": round(total / 1e9, 3), "patch_embedding": patch,
            "per_layer": {"qkvo_projections": proj, "mlp": mlp, "attention": attn}, "tokens": s,
            "formula": "2*N*3*p^2*C + L*2*(4*S*C^2 + 2*S*C*I + 2*S^2*C)"}
