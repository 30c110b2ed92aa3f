"""UNICOM (MVT-1.0): released-format `.pt` files through the loader users run, our module against the
architecture's description, BatchNorm folding, the release download path (offline, file:// only).

The tiny files are written as the releases are (export.models.unicom.save_tiny_release: fp16 tensors,
upstream key names, torch.save of a plain state_dict) with non-trivial BatchNorm statistics.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from export.core.errors import CheckpointError, OptionError
from export.models.families import UNICOM
from export.models.loading import load_checkpoint, load_folder
from export.models.testing import save_tiny_checkpoint
from export.models.unicom import UnicomVisionConfig, UnicomVisionModel, config_from_state_dict, fold_head_batchnorms
from export.models.zoo import Release, zoo_entry


@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(UNICOM, tmp_path_factory.mktemp("unicom"))


@pytest.fixture(scope="module")
def photos_pixels(tiny_pt):
    from export.core.images import pixel_values, sample_photos

    ckpt = load_checkpoint(str(tiny_pt))
    return pixel_values(ckpt.processor, sample_photos(3), ckpt.image_size)  # (3, 3, 56, 56)


def _functional_reference(state: dict, pixels: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The architecture as issue 11 describes it, computed with torch.nn.functional from the raw released
    state_dict (fp16 -> fp32, BatchNorms unfolded): (last_hidden_state, embedding)."""
    w = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    x = F.conv2d(pixels.double(), w["patch_embed.proj.weight"], w["patch_embed.proj.bias"],
                 stride=w["patch_embed.proj.weight"].shape[-1])  # (B, C, h, w)
    x = x.flatten(2).transpose(1, 2) + w["pos_embed"]  # (B, N, C)
    b, n, c = x.shape
    layers = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
    for i in range(layers):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (c,), w[p + "norm1.weight"], w[p + "norm1.bias"], eps=1e-5)
        q, k, v = (h @ w[p + "attn.qkv.weight"].T).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) * (c // heads) ** -0.5, dim=-1)  # (B, H, N, N)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(b, n, c), w[p + "attn.proj.weight"],
                         w[p + "attn.proj.bias"])
        h = F.layer_norm(x, (c,), w[p + "norm2.weight"], w[p + "norm2.bias"], eps=1e-5)
        h = torch.clamp(F.linear(h, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"]), 0.0, 6.0)  # ReLU6
        x = x + F.linear(h, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
    x = F.layer_norm(x, (c,), w["norm.weight"], w["norm.bias"], eps=1e-5)
    e = x.reshape(b, n * c) @ w["feature.0.weight"].T
    e = F.batch_norm(e, w["feature.1.running_mean"], w["feature.1.running_var"], w["feature.1.weight"],
                     w["feature.1.bias"], eps=2e-5)
    e = e @ w["feature.2.weight"].T
    e = F.batch_norm(e, w["feature.3.running_mean"], w["feature.3.running_var"], w["feature.3.weight"],
                     w["feature.3.bias"], eps=2e-5)
    return x.float(), e.float()


def test_released_file_loads_with_inferred_architecture(tiny_pt):
    state = torch.load(tiny_pt, weights_only=True)
    assert all(v.dtype == torch.float16 for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert "feature.1.running_var" in state and "feature.3.num_batches_tracked" in state  # the released form
    ckpt = load_checkpoint(str(tiny_pt))
    assert ckpt.family is UNICOM and ckpt.folder is None and not ckpt.random_weights
    cfg = ckpt.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.image_size, cfg.patch_size,
            cfg.embedding_size, cfg.intermediate_size) == (128, 2, 2, 56, 14, 96, 512)
    assert cfg.head_folded and isinstance(ckpt.model.feature[1], torch.nn.Identity)
    assert ckpt.model.feature[0].bias is not None and ckpt.model.feature[0].weight.dtype == torch.float32
    # preprocessing: CLIPImageProcessor at the model's size (shorter side -> 56, bicubic, center crop 56)
    assert ckpt.processor.size["shortest_edge"] == 56 and ckpt.processor.crop_size == {"height": 56, "width": 56}
    assert ckpt.processor.resample == 3  # PIL bicubic


def test_module_matches_the_architecture_description(tiny_pt, photos_pixels):
    """Our module (folded head, sdpa and eager attention) against a functional float64 computation of the
    description from the raw state_dict: a wrong activation, eps, scale or flatten order fails this."""
    state = torch.load(tiny_pt, weights_only=True)
    ref_tokens, ref_embedding = _functional_reference(state, photos_pixels, heads=2)
    model = load_checkpoint(str(tiny_pt)).model
    for attention in ("sdpa", "eager"):
        model.config._attn_implementation = attention
        with torch.no_grad():
            out = model(pixel_values=photos_pixels, output_hidden_states=True)
        assert out.embedding.shape == (3, 96) and out.last_hidden_state.shape == (3, 16, 128)
        assert len(out.hidden_states) == 3  # embeddings + one per block
        torch.testing.assert_close(out.last_hidden_state, ref_tokens, rtol=0, atol=2e-5)
        torch.testing.assert_close(out.embedding, ref_embedding, rtol=0, atol=2e-5 * ref_embedding.abs().max().item())


def test_batchnorm_folding_is_exact_to_fp32_rounding(tiny_pt, photos_pixels):
    from export.models.unicom import read_state_dict

    state = read_state_dict(tiny_pt)
    unfolded = UnicomVisionModel(UnicomVisionConfig(**config_from_state_dict(state), head_folded=False)).eval()
    unfolded.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    released_fc1 = unfolded.feature[0].weight.clone()
    x = torch.cat([torch.randn(8, 3, 56, 56), photos_pixels])  # (11, 3, 56, 56)
    with torch.no_grad():
        before = unfolded(pixel_values=x).embedding
        without_bn = unfolded.feature[2](unfolded.feature[0](unfolded(pixel_values=x).last_hidden_state.flatten(1)))
        folded = fold_head_batchnorms(unfolded)
        after = folded(pixel_values=x).embedding
    assert folded.config.head_folded and not any(isinstance(m, torch.nn.BatchNorm1d) for m in folded.modules())
    assert not torch.equal(folded.get_parameter("feature.0.weight"), released_fc1)  # the weights did change...
    assert (before - without_bn).abs().max() > 0.1 * before.abs().max()  # ...because the BatchNorms matter
    # one float32 rounding of each folded weight, then the same sums: a few ulps of the output's magnitude
    assert (after - before).abs().max().item() <= 8 * torch.finfo(torch.float32).eps * before.abs().max().item()


def test_module_prefix_is_stripped(tiny_pt, tmp_path, photos_pixels):
    state = torch.load(tiny_pt, weights_only=True)
    wrapped = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, wrapped)
    a, b = load_checkpoint(str(tiny_pt)).model, load_checkpoint(str(wrapped)).model
    with torch.no_grad():
        assert torch.equal(a(pixel_values=photos_pixels).embedding, b(pixel_values=photos_pixels).embedding)


def test_missing_and_unexpected_keys_are_named(tiny_pt, tmp_path):
    state = torch.load(tiny_pt, weights_only=True)
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.attn.qkv.bias"] = torch.zeros(384, dtype=torch.float16)  # upstream's qkv has none
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.mlp\.fc2\.bias.*"
                                              r"unexpected keys: blocks\.0\.attn\.qkv\.bias"):
        load_checkpoint(str(bad))


def test_wrong_shapes_are_named(tiny_pt, tmp_path):
    state = torch.load(tiny_pt, weights_only=True)
    state["blocks.1.norm2.weight"] = torch.ones(64, dtype=torch.float16)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.norm2\.weight \(64,\) \(expected \(128,\)\)"):
        load_checkpoint(str(bad))


def test_arbitrary_unpickling_is_refused(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a pickled module: loading it needs arbitrary unpickling
    with pytest.raises(CheckpointError, match=r"arbitrary unpickling.*weights_only=True"):
        load_checkpoint(str(path))


@pytest.mark.parametrize("payload", [b"not a torch file", None])
def test_not_a_state_dict(tmp_path, payload):
    path = tmp_path / "x.pt"
    if payload is None:
        torch.save([torch.zeros(2)], path)  # loads, but is a list
    else:
        path.write_bytes(payload)
    with pytest.raises(CheckpointError, match="not a readable torch.save state_dict|not a state_dict"):
        load_checkpoint(str(path))


def test_other_state_dicts_are_not_unicom(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a UNICOM state_dict: it has no patch_embed.proj.weight"):
        load_checkpoint(str(path))


def test_head_count_override(tiny_pt, photos_pixels):
    four = load_checkpoint(str(tiny_pt), num_heads=4)
    assert four.config.num_attention_heads == 4
    state = torch.load(tiny_pt, weights_only=True)
    _, ref = _functional_reference(state, photos_pixels, heads=4)
    with torch.no_grad():
        torch.testing.assert_close(four.model(pixel_values=photos_pixels).embedding, ref, rtol=0,
                                   atol=2e-5 * ref.abs().max().item())
    with pytest.raises(CheckpointError, match="num_heads 3 does not divide the hidden size 128"):
        load_checkpoint(str(tiny_pt), num_heads=3)


def test_num_heads_flag_reaches_the_export_and_its_reference(tiny_pt, tmp_path):
    """`--num-heads 4` (the file alone says 2): traced with 4 heads, recorded, and the manifest's reference
    (what the ledger and the benchmarks reload) is rebuilt with 4 heads too."""
    import json

    from export.build_engine import main
    from export.core.manifest import read_manifest
    from export.models.loading import reference_checkpoint

    out = tmp_path / "four-heads"
    assert main(["--model", str(tiny_pt), "--num-heads", "4", "--out", str(out), "--runtime", "none"]) == 0
    manifest = read_manifest(out)
    assert manifest.num_heads == 4 and manifest.model["num_attention_heads"] == 4
    assert json.loads((out / "parity.json").read_text())["passed"]
    assert reference_checkpoint(manifest).config.num_attention_heads == 4


@pytest.mark.parametrize("model", [None, "mlcd-b-32"])
def test_num_heads_is_refused_where_the_checkpoint_names_its_heads(model):
    with pytest.raises(CheckpointError, match="--num-heads applies to released weights files"):
        load_checkpoint(model, random_weights=model is not None, num_heads=4)


@pytest.mark.parametrize("alias", ["unicom-b-32", "unicom-b-16", "unicom-l-14", "unicom-l-14-336"])
def test_zoo_architectures_match_what_a_release_file_infers(alias):
    """Each zoo architecture, built on the meta device (no memory), has the released key set, and the shapes
    of its state_dict infer that very architecture back."""
    entry = zoo_entry(alias)
    with torch.device("meta"):
        model = UnicomVisionModel(UnicomVisionConfig(**entry.config, head_folded=False))
    state = model.state_dict()
    inferred = config_from_state_dict(state)
    assert inferred == {**entry.config, "num_channels": 3}
    assert entry.config["hidden_size"] // entry.config["num_attention_heads"] == 64
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("feature."))
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("feature."))
    if alias == "unicom-l-14-336":
        assert 600e6 < head < 610e6 and 1.9 < head / backbone < 2.1  # "twice the size of its backbone"


def test_flops_count_no_class_token_and_the_head():
    from export.models.flops import flops_per_image

    entry = zoo_entry("unicom-l-14-336")
    cfg = UnicomVisionConfig(**entry.config)
    flops = flops_per_image(cfg, 336, 336)
    n, c, i, e, layers, p = 576, 1024, 4096, 768, 24, 14
    by_hand = (2 * n * 3 * p * p * c + layers * 2 * (4 * n * c * c + 2 * n * c * i + 2 * n * n * c)
               + 2 * n * c * c + 2 * c * e)
    assert flops["tokens"] == n and flops["head"] == 2 * n * c * c + 2 * c * e and flops["total"] == by_hand
    assert "2*N*C*C + 2*C*E" in flops["formula"]


def test_fixed_resolution_is_enforced(tiny_pt, tmp_path):
    from export.graph.trace import ExportShape, export_canonical

    ckpt = load_checkpoint(str(tiny_pt))
    for shape, what in ((ExportShape(84, 84), "--image-size 84 84"), (ExportShape(56, 56, True), "--dynamic")):
        with pytest.raises(OptionError, match=f"{what}.*56x56 only"):
            export_canonical(ckpt, shape, tmp_path / "model.onnx")
    with pytest.raises(ValueError, match="56x56 images only"):
        ckpt.model(pixel_values=torch.zeros(1, 3, 84, 84))


def test_saved_as_a_transformers_folder_it_loads_by_model_type(tiny_pt, tmp_path, photos_pixels):
    ckpt = load_checkpoint(str(tiny_pt))
    ckpt.model.save_pretrained(tmp_path / "hf")
    ckpt.processor.save_pretrained(tmp_path / "hf")
    again = load_folder(tmp_path / "hf")
    assert again.family is UNICOM and again.config.head_folded
    with torch.no_grad():
        assert torch.equal(again.model(pixel_values=photos_pixels).embedding,
                           ckpt.model(pixel_values=photos_pixels).embedding)


def test_missing_release_file_says_where_to_get_it(tmp_path):
    with pytest.raises(CheckpointError, match=r"releases/download/b32/FP16-ViT-B-32\.pt.*--model unicom-b-32"):
        load_checkpoint(str(tmp_path / "FP16-ViT-B-32.pt"))


# ------------------------------------------------------------------ the release aliases, offline (file:// URLs)

def _alias_to(monkeypatch, tmp_path, source: Path, sha256: str | None = None) -> Release:
    """Point unicom-b-32's release at a local folder (file://) holding `source` under the release's name, and
    the cache at tmp_path/cache."""
    import export.models.zoo as zoo

    entry = zoo_entry("unicom-b-32")
    mirror = tmp_path / "mirror"
    (mirror / entry.release.tag).mkdir(parents=True, exist_ok=True)
    if source.exists():
        (mirror / entry.release.tag / entry.release.filename).write_bytes(source.read_bytes())
    digest = sha256 or (hashlib.sha256(source.read_bytes()).hexdigest() if source.exists() else "0" * 64)
    release = replace(entry.release, sha256=digest, base_url=mirror.as_uri())
    monkeypatch.setattr(zoo, "ZOO", tuple(replace(e, release=release) if e is entry else e for e in zoo.ZOO))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return release


def test_alias_downloads_verifies_and_caches(monkeypatch, tmp_path, tiny_pt):
    release = _alias_to(monkeypatch, tmp_path, tiny_pt)
    ckpt = load_checkpoint("unicom-b-32")
    cached = tmp_path / "cache" / "mvt-deploy" / "unicom" / release.filename
    assert cached.is_file() and ckpt.config.hidden_size == 128 and ckpt.source == "unicom-b-32"
    assert [p.name for p in cached.parent.iterdir()] == [release.filename]  # no partial file left
    (tmp_path / "mirror" / release.tag / release.filename).unlink()  # now only the cache has it
    assert load_checkpoint("unicom-b-32").config.embedding_size == 96


def test_alias_without_network_says_what_to_download_and_where(monkeypatch, tmp_path):
    release = _alias_to(monkeypatch, tmp_path, tmp_path / "absent.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint("unicom-b-32")
    text = str(err.value)
    assert f"could not download {release.url}" in text
    assert str(tmp_path / "cache" / "mvt-deploy" / "unicom" / release.filename) in text
    assert "--model path/to/FP16-ViT-B-32.pt" in text and "--random-weights" in text
    assert not any((tmp_path / "cache" / "mvt-deploy" / "unicom").iterdir())  # nothing half-written


def test_checksum_mismatch_discards_the_download(monkeypatch, tmp_path, tiny_pt):
    _alias_to(monkeypatch, tmp_path, tiny_pt, sha256="ab" * 32)
    with pytest.raises(CheckpointError, match=r"SHA-256 is [0-9a-f]{64}, not the published abab"):
        load_checkpoint("unicom-b-32")
    assert not any((tmp_path / "cache" / "mvt-deploy" / "unicom").iterdir())


def test_a_corrupt_cached_file_is_downloaded_again(monkeypatch, tmp_path, tiny_pt):
    release = _alias_to(monkeypatch, tmp_path, tiny_pt)
    cached = tmp_path / "cache" / "mvt-deploy" / "unicom" / release.filename
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    logged: list[str] = []
    from export.models.download import fetch_release

    assert fetch_release(release, "unicom-b-32", log=logged.append) == cached
    assert cached.read_bytes() == tiny_pt.read_bytes() and any("does not match" in line for line in logged)


def test_random_weights_alias_builds_the_architecture(monkeypatch):
    """--random-weights needs no file: the zoo architecture with seeded weights (a tiny stand-in here; the
    full-size builds are measured by the zoo matrix)."""
    import export.models.zoo as zoo

    entry = zoo_entry("unicom-l-14-336")
    tiny = replace(entry, config={**UNICOM.tiny_config})
    monkeypatch.setattr(zoo, "ZOO", tuple(tiny if e is entry else e for e in zoo.ZOO))
    a, b = (load_checkpoint("unicom-l-14-336", random_weights=True) for _ in range(2))
    assert a.random_weights and a.family is UNICOM and a.config.head_folded
    assert torch.equal(a.model.pos_embed, b.model.pos_embed) and a.model.pos_embed.abs().sum() > 0
    assert np.isfinite(a.model(pixel_values=torch.zeros(1, 3, 56, 56)).embedding.detach().numpy()).all()


def test_patch_tokens_without_a_class_token():
    from export.check.features import patch_tokens
    from export.pipeline import default_out

    tokens = np.arange(16 * 3, dtype=np.float32).reshape(1, 16, 3)  # (1, N, C), no class token
    assert np.array_equal(patch_tokens(tokens, (4, 4), UNICOM.prefix_tokens), tokens[0])
    with pytest.raises(ValueError, match="16 patch tokens \\+ 1 prefix"):
        patch_tokens(tokens, (4, 4))  # a class-token family's expectation
    assert default_out("downloads/FP16-ViT-B-32.pt") == Path("artifacts/fp16-vit-b-32")
