"""The MVT model zoo: short aliases, hub ids and the architectures (for --random-weights runs).

Architectures are copied from the hub configs so that a full-size model can be built, exported
and benchmarked without downloading weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ZooEntry:
    alias: str
    hub_id: str
    model_type: str
    config: dict[str, Any]  # architecture kwargs for the family's config class

    @property
    def image_size(self) -> int:
        return self.config["image_size"]


def _vit(hidden, inter, layers, heads, image, patch, act):
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, image_size=image, patch_size=patch, hidden_act=act)


ZOO = (
    # axial 2D RoPE, gelu: S = (560/14)^2 + 1 = 1601
    ZooEntry("rice-l-560", "DeepGlint-AI/rice-vit-large-patch14-560", "mlcd_vision_model",
             _vit(1024, 4096, 24, 16, 560, 14, "gelu")),
    # axial 2D RoPE, head_dim 104: S = 1025
    ZooEntry("mlcd-bigg-448", "DeepGlint-AI/mlcd-vit-bigG-patch14-448", "mlcd_vision_model",
             _vit(1664, 8192, 48, 16, 448, 14, "gelu")),
    # CLIP architecture with learned positions, quick_gelu: S = 577
    ZooEntry("mlcd-l-336", "DeepGlint-AI/mlcd-vit-large-patch14-336", "clip_vision_model",
             _vit(1024, 4096, 24, 16, 336, 14, "quick_gelu")),
    # S = 50
    ZooEntry("mlcd-b-32", "DeepGlint-AI/mlcd-vit-base-patch32-224", "clip_vision_model",
             _vit(768, 3072, 12, 12, 224, 32, "quick_gelu")),
)

# The default model: a bundled demo of the 2D-RoPE family (hidden 384, 6 heads, 6 layers, 224 px),
# seeded random weights. Small enough to export in seconds on a laptop CPU.
DEMO = ZooEntry("demo", "", "mlcd_vision_model", _vit(384, 1536, 6, 6, 224, 14, "gelu"))
DEMO_SEED = 0


def zoo_entry(name: str) -> ZooEntry | None:
    """Find a zoo entry by alias or hub id (case-insensitive)."""
    key = name.lower()
    for entry in ZOO:
        if key in (entry.alias, entry.hub_id.lower()):
            return entry
    return None
