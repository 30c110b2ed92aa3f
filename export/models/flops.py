"""Analytic FLOPs of a ViT encoder: one fact that the benchmark and the calibration default need."""

from __future__ import annotations

FORMULA = "2*N*3*p^2*C + L*2*(4*S*C^2 + 2*S*C*I + 2*S^2*C)"


def flops_per_image(config, height: int, width: int) -> dict:
    """FLOPs of one image through a ViT encoder (multiply-add = 2 FLOPs; norms and softmax ignored):

        2*N*3*p^2*C  +  L * 2 * (4*S*C^2 + 2*S*C*I + 2*S^2*C)  [+ the family's head]

    N patches, S = N + prefix tokens (1: the class token; UNICOM has none), C hidden, I MLP width,
    L layers: the patch embedding, then per layer the q/k/v/o projections, the MLP and the two
    attention products (QK^T and AV). UNICOM adds its head over the flattened tokens, Linear(N*C -> C)
    then Linear(C -> E): 2*N*C*C + 2*C*E (1.2 of 382 GFLOPs at ViT-L/14@336: cheap in FLOPs, but its
    604 M weights are read once per batch, a GEMV at batch 1). The family
    comes from config.model_type."""
    from export.models.families import family_for_model_type

    family = family_for_model_type(config.model_type)
    p = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    c, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    n = (height // p) * (width // p)
    s = n + family.prefix_tokens
    patch = 2 * n * 3 * p * p * c
    proj, mlp, attn = 2 * 4 * s * c * c, 2 * 2 * s * c * i, 2 * 2 * s * s * c
    head = family.head_flops(config, n) if family.head_flops else 0
    total = patch + layers * (proj + mlp + attn) + head
    formula = FORMULA + (f" + {family.head_flops_formula}" if family.head_flops else "")
    return {"total": total, "gflops": round(total / 1e9, 3), "patch_embedding": patch,
            "per_layer": {"qkvo_projections": proj, "mlp": mlp, "attention": attn}, "head": head, "tokens": s,
            "formula": formula}
