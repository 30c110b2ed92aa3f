"""The MVT model zoo: short aliases, hub ids or release files, and the architectures (for --random-weights runs).

Architectures are copied from the hub configs (UNICOM: from its release files' tensor shapes) so
that a full-size model can be built, exported and benchmarked without downloading weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RELEASES_URL = "https://github.com/deepglint/unicom/releases/download"


@dataclass(frozen=True)
class Release:
    """A weight file published as a GitHub release asset (UNICOM), verified by its SHA-256."""

    filename: str
    tag: str
    sha256: str
    base_url: str = RELEASES_URL

    @property
    def url(self) -> str:
        return f"{self.base_url}/{self.tag}/{self.filename}"


@dataclass(frozen=True)
class ZooEntry:
    alias: str
    hub_id: str  # "" when the weights are a release file instead
    model_type: str
    config: dict[str, Any]  # architecture kwargs for the family's config class
    release: Release | None = None  # downloaded into the user's cache (export.models.download)

    @property
    def image_size(self) -> int:
        return self.config["image_size"]


def _vit(hidden, inter, layers, heads, image, patch, act):
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, image_size=image, patch_size=patch, hidden_act=act)


def _unicom(hidden, layers, image, patch, embedding):
    # head dim 64 in every release; MLP 4x; LayerNorm/BatchNorm eps are the config's defaults
    return dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                num_attention_heads=hidden // 64, image_size=image, patch_size=patch, embedding_size=embedding)




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
    # UNICOM (MVT-1.0): deepglint/unicom release assets, fp16 state_dicts; SHA-256 sums from unicom/model.py.
    # No class token: S = N = (image / patch)^2, and the flattened head Linear(N*C -> C) fixes the resolution.
    ZooEntry("unicom-b-32", "", "unicom_vision_model", _unicom(768, 12, 224, 32, 512),  # S = 49
             Release("FP16-ViT-B-32.pt", "b32",
                     "f9d5696a9b58dbbbefee2d31615ca59084f2895a0fdd2ca4c235e0f9b2793f7a")),
    ZooEntry("unicom-b-16", "", "unicom_vision_model", _unicom(768, 12, 224, 16, 768),  # S = 196
             Release("FP16-ViT-B-16.pt", "b16",
                     "c04f324f7c3b4435667236ec6c0eca1cd62f9d64fbfc2d06f8e8e60e6497edef")),
    ZooEntry("unicom-l-14", "", "unicom_vision_model", _unicom(1024, 24, 224, 14, 768),  # S = 256
             Release("FP16-ViT-L-14.pt", "l14",
                     "ff3ab62ff782876460099e6e0ee17b73a7c01109de2fffd595f16f4129404bbd")),
    # S = 576; its head (576*1024 -> 1024, 604 M parameters) is twice the size of its backbone
    ZooEntry("unicom-l-14-336", "", "unicom_vision_model", _unicom(1024, 24, 336, 14, 768),
             Release("FP16-ViT-L-14-336px.pt", "l14_336px",
                     "3916ab5aed3b522fc90345be8b4457fe5dad60801ad2af5a6871c0c096e8d7ea")),
)

# The default model: a bundled demo of the 2D-RoPE family (hidden 384, 6 heads, 6 layers, 224 px),
# seeded random weights. Small enough to export in seconds on a laptop CPU.
DEMO = ZooEntry("demo", "", "mlcd_vision_model", _vit(384, 1536, 6, 6, 224, 14, "gelu"))
DEMO_SEED = 0


def zoo_entry(name: str) -> ZooEntry | None:
    """Find a zoo entry by alias or hub id (case-insensitive)."""
    key = name.lower()
    for entry in ZOO:
        if key == entry.alias or (entry.hub_id and key == entry.hub_id.lower()):
            return entry
    return None


def release_named(filename: str) -> ZooEntry | None:
    """The zoo entry whose release file is called `filename` (for a helpful error on a missing file)."""
    for entry in ZOO:
        if entry.release is not None and entry.release.filename.lower() == filename.lower():
            return entry
    return None
