"""Tiny random checkpoints of every family, saved with save_pretrained like real ones.

Tests, the benchmark and the load test load them back through export.models.loading, the same code users
run (timm's tiny-model idea); tests/export/test_families.py checks every family has one.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

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
