"""VLM checkpoints (issue 24): the tower alone or with --projector, and what is refused (no export here; the
--projector export runs in tests/triton_repo/test_vlm_repository.py and parity_tests/test_vlm_parity.py)."""

from __future__ import annotations

import json
import shutil

import pytest

from export.core.errors import CheckpointError, OptionError, UnsupportedModelError


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    from export.models.families import MLCD_ROPE2D
    from export.models.testing import save_tiny_vlm

    return save_tiny_vlm(MLCD_ROPE2D, tmp_path_factory.mktemp("vlm") / "llava-next")


def _edited(folder, tmp_path, **changes):
    """A copy of `folder` with config.json's keys changed (a dict value is merged one level down)."""
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    for key, value in changes.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_without_projector_a_vlm_exports_its_tower(vlm_folder):
    from safetensors import safe_open
    from transformers import MLCDVisionModel

    from export.core.interface import OUTPUT_NAMES
    from export.models.loading import load_checkpoint

    ckpt = load_checkpoint(str(vlm_folder))
    assert isinstance(ckpt.model, MLCDVisionModel) and ckpt.family.outputs == OUTPUT_NAMES
    assert ckpt.vlm.architecture == "llava_next" and not ckpt.vlm.projector
    with safe_open(str(vlm_folder / "model.safetensors"), "pt") as f:
        saved = f.get_tensor("vision_tower.embeddings.patch_embedding.weight")
    assert ckpt.model.embeddings.patch_embedding.weight.equal(saved)  # the checkpoint's weights, not random ones
    assert ckpt.processor.crop_size == {"height": 56, "width": 56}


def test_projector_module_outputs_image_embeds(vlm_folder):
    import torch

    from export.models.loading import load_checkpoint

    ckpt = load_checkpoint(str(vlm_folder), projector=True)
    assert ckpt.family.outputs == ("image_embeds",) and ckpt.family.pooled_output == ""
    with torch.no_grad():
        out = ckpt.model(pixel_values=torch.zeros(2, 3, 56, 56)).image_embeds
    assert tuple(out.shape) == (2, 16, 48)  # 4 x 4 patches (class token dropped), the language model's width
    assert ckpt.image_newline.shape == (48,) and ckpt.vlm.text_hidden_size == 48
    assert ckpt.vlm.vision_feature_layer == -2 and ckpt.vlm.image_token_id == 127


def test_a_tower_that_is_not_ours_is_refused_and_nothing_is_written(vlm_folder, tmp_path):
    from export.build_engine import main

    folder = _edited(vlm_folder, tmp_path, vision_config={"model_type": "siglip_vision_model"})
    out = tmp_path / "out"
    assert main(["--model", str(folder), "--projector", "--out", str(out), "--runtime", "none"]) == 2
    assert not out.exists()
    from export.models.loading import load_checkpoint

    with pytest.raises(UnsupportedModelError, match="vision tower is 'siglip_vision_model'"):
        load_checkpoint(str(folder), projector=True)


def test_projector_needs_a_vlm_checkpoint(tmp_path):
    from export.models.families import MLCD_ROPE2D
    from export.models.loading import load_checkpoint
    from export.models.testing import save_tiny_checkpoint

    tower = save_tiny_checkpoint(MLCD_ROPE2D, tmp_path / "tower")
    with pytest.raises(CheckpointError, match="drop --projector"):
        load_checkpoint(str(tower), projector=True)
    with pytest.raises(CheckpointError, match="no --random-weights"):
        load_checkpoint("mlcd-b-32", random_weights=True, projector=True)


def test_projector_refuses_what_it_cannot_pack(vlm_folder, tmp_path):
    from export.models.loading import load_checkpoint
    from export.pipeline import BuildOptions, validate_options

    with pytest.raises(OptionError, match="drop --hidden-layer"):
        validate_options(BuildOptions(projector=True, hidden_layer=-2))
    full = _edited(vlm_folder, tmp_path, vision_feature_select_strategy="full")
    with pytest.raises(CheckpointError, match="'full' keeps the class token"):
        load_checkpoint(str(full), projector=True)


def test_processor_and_config_grids_must_agree(vlm_folder, tmp_path):
    from export.models.loading import load_checkpoint

    folder = tmp_path / "mismatch"
    shutil.copytree(vlm_folder, folder)
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    processor["image_grid_pinpoints"] = [[56, 112]]
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(CheckpointError, match="make them agree"):
        load_checkpoint(str(folder), projector=True)
