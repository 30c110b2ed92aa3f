"""Tiny random checkpoints of every family, saved with save_pretrained like real ones.

Tests, the benchmark and the load test load them back through export.models.loading, the same code users
run (timm's tiny-model idea); tests/export/test_families.py checks every family has one.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from export.core.interface import CLIP_MEAN, CLIP_STD
from export.models.families import ModelFamily
from export.models.loading import load_processor


def save_tiny_checkpoint(family: ModelFamily, folder: Path, *, seed: int = 0, full_clip: bool = False) -> Path:
    """Write config.json, model.safetensors and preprocessor_config.json for `family`'s tiny model, and
    return the folder; a family released as single weight files (UNICOM) gets one such file in `folder`,
    written as the releases are, and its path is returned. Either way: what --model takes.

    full_clip: save a whole CLIPModel (text + vision towers, model_type "clip") instead of the
    vision tower, as OpenAI-style checkpoints are distributed.
    """
    import torch

    folder = Path(folder)
    if family.weights_file is not None:
        suffix = family.weights_file.suffixes[0]
        return family.weights_file.save_tiny(folder / f"tiny-{family.name}{suffix}", dict(family.tiny_config), seed)
    torch.manual_seed(seed)
    config = family.config_class()(**family.tiny_config)
    if full_clip:
        from transformers import CLIPConfig, CLIPModel

        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    vocab_size=99, max_position_embeddings=16)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=config.to_dict(), projection_dim=16))
    else:
        model = family.model_class()(config)
    model.save_pretrained(folder, safe_serialization=True)
    load_processor(None, config).save_pretrained(folder)
    return folder


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py of this source checkout as a module (scripts/ is not a package), registered in
    sys.modules under `name` so that its dataclasses and pickles resolve."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[2] / "scripts" / f"{name}.py"  # export/models/testing.py
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# Tiny VLMs: a 4 x 4-patch tile (56 px, patch 14) and a Qwen2 language model narrower than the tower (48 against 64),
# so that a swapped width shows. LLaVA-OneVision gets grids up to 4 x 4 tiles and anyres_max_4, so that large
# photos take its bilinear shrink.
TINY_TEXT: dict[str, Any] = dict(model_type="qwen2", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                 max_position_embeddings=1024)
TINY_IMAGE_TOKEN = 127


def save_tiny_vlm(family: ModelFamily, folder: Path, architecture: str = "llava_next", *, seed: int = 0,
                  vision_feature_layer: int | list[int] = -2) -> Path:
    """A tiny random LLaVA-NeXT or LLaVA-OneVision checkpoint around `family`'s tiny tower, saved as the real ones
    are (config.json, model.safetensors, preprocessor_config.json): what --model --projector takes."""
    import torch
    import transformers

    from export.core.preprocessing import default_grid_pinpoints

    folder = Path(folder)
    tile = int(family.tiny_config["image_size"])
    vision = {**family.tiny_config, "model_type": family.model_types[0]}
    torch.manual_seed(seed)
    if architecture == "llava_next":
        pinpoints = [list(p) for p in default_grid_pinpoints(tile)]
        config: Any = transformers.LlavaNextConfig(
            vision_config=vision, text_config=TINY_TEXT, image_token_index=TINY_IMAGE_TOKEN,
            image_grid_pinpoints=pinpoints, vision_feature_layer=vision_feature_layer)
        model: Any = transformers.LlavaNextForConditionalGeneration(config)
        processor = _vlm_processor_class("LlavaNext")(
            size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints,
            image_mean=CLIP_MEAN, image_std=CLIP_STD)
    elif architecture == "llava_onevision":
        pinpoints = [[tile * r, tile * c] for r in range(1, 5) for c in range(1, 5)]
        config = transformers.LlavaOnevisionConfig(vision_config=vision, text_config=TINY_TEXT,
                                                   image_token_index=TINY_IMAGE_TOKEN, image_grid_pinpoints=pinpoints,
                                                   vision_feature_layer=vision_feature_layer,
                                                   vision_aspect_ratio="anyres_max_4",
                                                   # our towers have a class token (SigLIP, OneVision's own, has none)
                                                   vision_feature_select_strategy="default")
        model = transformers.LlavaOnevisionForConditionalGeneration(config)
        processor = _vlm_processor_class("LlavaOnevision")(
            size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints, image_mean=CLIP_MEAN,
            image_std=CLIP_STD)
    else:
        raise ValueError(f"architecture {architecture!r}: llava_next or llava_onevision")
    model.eval().save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def _vlm_processor_class(stem: str):
    import transformers

    return getattr(transformers, f"{stem}ImageProcessorPil", None) or getattr(transformers, f"{stem}ImageProcessor")



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
