"""Tiny test checkpoints. save_tiny_checkpoint lives in the product (export.models.testing: the benchmark and
the load test use it too); the outlier models below are for the precision tests.
"""

from __future__ import annotations

from pathlib import Path

from export.models.families import ModelFamily
from export.models.testing import save_tiny_checkpoint

__all__ = ["save_tiny_checkpoint", "save_outlier_checkpoint"]


# Trained ViTs carry a few activation channels 10-100x larger than the rest after LayerNorm (the
# inputs of q/k/v and the MLP); random weights have none. The outlier models put them back: hidden
# 96, and gain OUTLIER_GAIN on OUTLIER_CHANNELS of every pre-attention and pre-MLP LayerNorm.
OUTLIER_HIDDEN = 96
OUTLIER_CHANNELS = (5, 70)  # 2 of 96
OUTLIER_GAIN = 60.0


def save_outlier_checkpoint(family: ModelFamily, folder: Path, *, seed: int = 0, gain: float = OUTLIER_GAIN,
                            channels: tuple[int, ...] = OUTLIER_CHANNELS, layers: int | None = None,
                            bias: float | None = None) -> Path:
    """`family`'s tiny model at hidden OUTLIER_HIDDEN whose layer_norm1/layer_norm2 (before attention and
    before the MLP, in every layer) have gain `gain` on `channels`; saved like save_tiny_checkpoint.

    layers: encoder depth (None: the family's tiny one); bias: also a LayerNorm bias of `bias` on those
    channels (an outlier that is an offset as well as a scale, one sign on every token)."""
    from dataclasses import replace
    from typing import Any

    import torch

    folder = Path(folder)
    config = {**family.tiny_config, "hidden_size": OUTLIER_HIDDEN, "intermediate_size": 2 * OUTLIER_HIDDEN}
    if layers is not None:
        config["num_hidden_layers"] = layers
    save_tiny_checkpoint(replace(family, tiny_config=config), folder, seed=seed)
    model_class: Any = family.model_class()
    model = model_class.from_pretrained(folder)
    norms = [m for name, m in model.named_modules() if name.endswith(("layer_norm1", "layer_norm2"))]
    assert len(norms) == 2 * model.config.num_hidden_layers, "every encoder layer has two pre-norms"
    with torch.no_grad():
        for norm in norms:
            norm.weight[list(channels)] = gain
            if bias is not None:
                norm.bias[list(channels)] = bias
    model.save_pretrained(folder, safe_serialization=True)
    return folder
