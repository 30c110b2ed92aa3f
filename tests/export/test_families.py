"""Guard: every registered family has a tiny model that saves and loads through the user's loader."""

from __future__ import annotations

import pytest

from export.core.errors import UnsupportedModelError
from export.models.families import CLIP_VISION, FAMILIES, MLCD_ROPE2D, UNICOM, family_for_model_type
from export.models.zoo import DEMO, ZOO, zoo_entry


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_has_a_tiny_model_that_loads(family, tiny_folders):
    from export.models.loading import load_checkpoint

    ckpt = load_checkpoint(str(tiny_folders[family.name]))  # a folder, or a released-format file (UNICOM)
    assert ckpt.family is family
    assert ckpt.config.hidden_size == family.tiny_config["hidden_size"]
    assert not ckpt.random_weights
    assert family.pooled_output in family.outputs and "last_hidden_state" in family.outputs


def test_existing_families_keep_their_output_names():
    assert MLCD_ROPE2D.output_names() == CLIP_VISION.output_names() == ("last_hidden_state", "pooler_output")
    assert UNICOM.output_names(-2) == ("last_hidden_state", "embedding", "hidden_state")


def test_model_types_belong_to_one_family_each():
    types = [t for f in FAMILIES for t in f.model_types]
    assert len(types) == len(set(types))
    assert family_for_model_type("clip").name == "clip-vision"
    with pytest.raises(UnsupportedModelError, match="not supported"):
        family_for_model_type("vit")


def test_zoo_covers_the_eight_encoders():
    assert {e.alias for e in ZOO} == {"rice-l-560", "mlcd-bigg-448", "mlcd-l-336", "mlcd-b-32",
                                      "unicom-b-32", "unicom-b-16", "unicom-l-14", "unicom-l-14-336"}
    assert zoo_entry("DeepGlint-AI/rice-vit-large-patch14-560").alias == "rice-l-560"
    assert zoo_entry("") is None  # UNICOM entries have no hub id
    for entry in ZOO + (DEMO,):
        family_for_model_type(entry.model_type)  # every entry maps to a family
    seq = {e.alias: (e.image_size // e.config["patch_size"]) ** 2
           + family_for_model_type(e.model_type).prefix_tokens for e in ZOO}
    assert seq == {"rice-l-560": 1601, "mlcd-bigg-448": 1025, "mlcd-l-336": 577, "mlcd-b-32": 50,
                   "unicom-b-32": 49, "unicom-b-16": 196, "unicom-l-14": 256, "unicom-l-14-336": 576}
    bigg = zoo_entry("mlcd-bigg-448").config
    assert bigg["hidden_size"] // bigg["num_attention_heads"] == 104  # head dim not a power of two
