"""Checkpoint loading: the real loader on tiny saved models, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from export.core.errors import CheckpointError, UnsupportedModelError
from export.models.loading import load_checkpoint, load_folder


def test_full_clip_checkpoint_loads_its_vision_tower(tiny_folders):
    ckpt = load_folder(tiny_folders["clip-full"])
    assert type(ckpt.model).__name__ == "CLIPVisionModel"
    assert ckpt.family.name == "clip-vision"
    from safetensors.torch import load_file

    saved = load_file(str(tiny_folders["clip-full"] / "model.safetensors"))
    weight = saved["vision_model.embeddings.patch_embedding.weight"]
    assert torch.equal(ckpt.model.embeddings.patch_embedding.weight, weight)  # transformers 5 flattened the tower


def test_processor_comes_from_the_checkpoint(tiny_folders, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_folders["mlcd-rope2d"], folder)
    cfg = json.loads((folder / "preprocessor_config.json").read_text())
    cfg["image_mean"] = [0.5, 0.5, 0.5]
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg))
    assert list(load_folder(folder).processor.image_mean) == [0.5, 0.5, 0.5]


def test_demo_is_seeded():
    a, b = load_checkpoint(None), load_checkpoint(None)
    assert a.random_weights and a.family.has_rope
    assert torch.equal(a.model.class_pos_emb, b.model.class_pos_emb)


def test_random_weights_needs_a_zoo_alias():
    with pytest.raises(CheckpointError, match="zoo architecture"):
        load_checkpoint("some/model", random_weights=True)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(str(tmp_path))


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedModelError, match="'bert' is not supported"):
        load_checkpoint(str(tmp_path))


def test_pickle_only_weights_are_refused(tiny_folders, tmp_path):
    (tmp_path / "config.json").write_text((tiny_folders["mlcd-rope2d"] / "config.json").read_text())
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickle weights.*safetensors"):
        load_checkpoint(str(tmp_path))


def test_unreachable_hub_id_says_what_to_do():
    # HF_HUB_OFFLINE=1 (conftest): fails at once instead of waiting on the network.
    with pytest.raises(CheckpointError, match="hf download DeepGlint-AI/rice-vit-large-patch14-560"):
        load_checkpoint("rice-l-560")
