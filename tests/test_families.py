"""Guard: every registered family has a tiny model that saves and loads through the user's loader."""

from __future__ import annotations

import pytest

from export.errors import UnsupportedModelError
from export.families import FAMILIES, family_for_model_type
from export.zoo import DEMO, ZOO, zoo_entry


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_has_a_tiny_model_that_loads(family, tiny_folders):
    from export.loading import load_folder

    ckpt = load_folder(tiny_folders[family.name])
    assert ckpt.family is family
    assert ckpt.config.hidden_size == family.tiny_config["hidden_size"]
    assert not ckpt.random_weights


def test_model_types_belong_to_one_family_each():
    types = [t for f in FAMILIES for t in f.model_types]
    assert len(types) == len(set(types))
    assert family_for_model_type("clip").name == "clip-vision"
    with pytest.raises(UnsupportedModelError, match="not supported"):
        family_for_model_type("vit")


def test_zoo_covers_the_four_encoders():
    assert {e.alias for e in ZOO} == {"rice-l-560", "mlcd-bigg-448", "mlcd-l-336", "mlcd-b-32"}
    assert zoo_entry("DeepGlint-AI/rice-vit-large-patch14-560").alias == "rice-l-560"
    for entry in ZOO + (DEMO,):
        family_for_model_type(entry.model_type)  # every entry maps to a family
    seq = {e.alias: (e.image_size // e.config["patch_size"]) ** 2 + 1 for e in ZOO}
    assert seq == {"rice-l-560": 1601, "mlcd-bigg-448": 1025, "mlcd-l-336": 577, "mlcd-b-32": 50}
    bigg = zoo_entry("mlcd-bigg-448").config
    assert bigg["hidden_size"] // bigg["num_attention_heads"] == 104  # head dim not a power of two
