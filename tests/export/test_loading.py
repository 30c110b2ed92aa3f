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


def test_the_processor_crosses_a_pickle_as_json_and_saves_the_same_bytes(tiny_folders, tmp_path):
    """The PyTorch child hands the parent its checkpoint pickled; the processor goes as JSON (no transformers
    import in the parent until it is used), saves what transformers' save_pretrained saves and preprocesses
    the same pixels."""
    import pickle

    from export.core.images import pixel_values, sample_photos
    from export.models.loading import ProcessorJson, load_checkpoint

    ckpt = load_checkpoint(str(tiny_folders["mlcd-rope2d"]))
    ckpt.release_model()
    back = pickle.loads(pickle.dumps(ckpt))
    assert isinstance(back.processor, ProcessorJson) and back.config.to_dict() == ckpt.config.to_dict()
    assert (back.config.hidden_size, back.config.model_type) == (ckpt.config.hidden_size, ckpt.config.model_type)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ckpt.processor.save_pretrained(tmp_path / "a")
    back.processor.save_pretrained(tmp_path / "b")
    saved = [(tmp_path / side / "preprocessor_config.json").read_bytes() for side in ("a", "b")]
    assert saved[0] == saved[1]
    photos = sample_photos(2)
    assert pixel_values(back.processor, photos, (56, 56)).equal(pixel_values(ckpt.processor, photos, (56, 56)))


def test_a_build_does_not_import_transformers_in_the_parent_for_fp32(tiny_folders, tmp_path):
    """The PyTorch steps run in a child; the parent of an fp32 build never needs transformers or torch."""
    import subprocess
    import sys

    code = ("import sys\nfrom export.pipeline import BuildOptions, build\n"
            f"build(BuildOptions(model={str(tiny_folders['mlcd-rope2d'])!r}, out={str(tmp_path / 'out')!r}, "
            "runtime='none'), log=lambda line: None)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
