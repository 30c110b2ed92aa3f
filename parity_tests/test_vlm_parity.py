"""LLM-ready image features (issue 24), proven at the language model's output.

Tiny LLaVA-NeXT (2D-RoPE MLCD tower) and LLaVA-OneVision (CLIP-style tower, anyres_max_4) checkpoints in the real
file format, exported with --projector (fp32, and fp16 for LLaVA-NeXT), served with --preprocess anyres, and
checked against the same checkpoints loaded whole by transformers (`from_pretrained`, not our loader):

  (a) the served image_embeds rows against `get_image_features` (cosine >= 0.9999 per row, equal counts and
      image_sizes) on photos square, wide and tall;
  (b) greedy generation of 16 tokens from `inputs_embeds` built with the served rows equals generation from
      `pixel_values` with the full model, token for token.

Plus export.core.packing against transformers' own `pack_image_features` on random features (no server).
"""

from __future__ import annotations

import numpy as np
import pytest

MIN_COSINE = 0.9999
NEW_TOKENS = 16
PROMPT = [3, 17, None, 42, 9]  # None: where the image goes


def _vlm_class(architecture: str):
    import transformers

    return (transformers.LlavaNextForConditionalGeneration if architecture == "llava_next"
            else transformers.LlavaOnevisionForConditionalGeneration)


# ------------------------------------------------------------------ packing against transformers (no export)

@pytest.mark.parametrize("architecture", ["llava_next", "llava_onevision"])
def test_packing_equals_transformers_pack_image_features(architecture):
    """Random features for images of many aspect ratios: export.core.packing's rows equal transformers'."""
    import torch

    from export.check.vlm_parity import grid_for
    from export.core.packing import anyres_max_tiles, pack_image
    from export.core.preprocessing import default_grid_pinpoints
    from export.models.testing import TINY_TEXT
    from export.models.vlm import VLM_ARCHITECTURES, _transformers_class

    tile, n, hidden = 56, 4, int(TINY_TEXT["hidden_size"])
    pinpoints = ([list(p) for p in default_grid_pinpoints(tile)] if architecture == "llava_next"
                 else [[tile * r, tile * c] for r in range(1, 5) for c in range(1, 5)])
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=tile, patch_size=14)
    extra = {"vision_aspect_ratio": "anyres_max_4"} if architecture == "llava_onevision" else {}
    config = _transformers_class(VLM_ARCHITECTURES[architecture][0])(
        vision_config=vision, text_config=TINY_TEXT, image_grid_pinpoints=pinpoints, **extra)
    with torch.device("meta"):
        vlm = _transformers_class(VLM_ARCHITECTURES[architecture][1])(config)
    rng = np.random.default_rng(0)
    newline = rng.standard_normal(hidden).astype(np.float32)
    for size in [(512, 512), (400, 600), (451, 300), (120, 900), (1000, 200), (224, 112), (57, 56)]:
        rows, cols = grid_for(size, pinpoints, tile)
        features = rng.standard_normal((1 + rows * cols, n * n, hidden)).astype(np.float32)
        kwargs = {"vision_aspect_ratio": "anyres_max_4"} if extra else {"vision_feature_select_strategy": "default"}
        (expected,), _ = vlm.pack_image_features([torch.from_numpy(features)], torch.tensor([size]),
                                                 image_newline=torch.from_numpy(newline), **kwargs)
        packed = pack_image(features, size, (rows, cols), newline, anyres_max_tiles(extra.get("vision_aspect_ratio")))
        assert packed.shape == tuple(expected.shape), size
        np.testing.assert_allclose(packed, expected.numpy(), rtol=1e-5, atol=1e-5, err_msg=str(size))


def test_a_grid_that_keeps_no_row_is_an_error():
    from export.core.packing import PackingError, pack_image

    features = np.ones((1 + 3, 16, 8), np.float32)  # whole image + 1 x 3 tiles of 4 x 4 patches
    with pytest.raises(PackingError, match="keeps no row"):
        pack_image(features, (1, 900), (1, 3))  # 1 px tall: unpadding keeps 0 of 4 rows


# ------------------------------------------------------------------ exported, served, generated

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """{name: (checkpoint, artifacts, server url, architecture, precision)} for three --projector exports."""
    from export.models.families import CLIP_VISION, MLCD_ROPE2D
    from export.models.testing import save_tiny_vlm
    from export.pipeline import BuildOptions, build
    from triton_repo.build import RepoOptions, build_repository
    from triton_repo.server import TritonServer, free_port
    from triton_repo.testing import import_or_skip, tritonserver_or_skip

    import_or_skip("tritonclient.http")
    install = tritonserver_or_skip()
    root = tmp_path_factory.mktemp("vlm")
    ckpts = {"llava_next": save_tiny_vlm(MLCD_ROPE2D, root / "next", "llava_next"),
             "llava_onevision": save_tiny_vlm(CLIP_VISION, root / "ov", "llava_onevision")}
    plans = {"next-fp32": ("llava_next", "fp32"), "next-fp16": ("llava_next", "fp16"),
             "ov-fp32": ("llava_onevision", "fp32")}
    servers, out = {}, {}
    try:
        for name, (arch, precision) in plans.items():
            art = root / f"{name}-art"
            # the export's own parity (against get_image_features, packed) runs once, on the first
            build(BuildOptions(model=str(ckpts[arch]), out=art, projector=True, precision=precision, runtime="none",
                               max_batch=4, calib_count=2, parity=name == "next-fp32"), log=lambda _: None)
            repo = build_repository(RepoOptions(art, root / f"{name}-repo", backend="python", preprocess="anyres",
                                                max_batch=4, intra_op_threads=1,
                                                embeds_dtype="float16" if precision == "fp16" else "float32"),
                                    log=lambda _: None).out
            servers[name] = TritonServer(repo, http_port=free_port(), grpc_port=free_port(),
                                         metrics_port=free_port(), install=install, ready_timeout_s=90).start()
            out[name] = (ckpts[arch], art, arch, precision)
        for name, server in servers.items():
            server.wait_ready()
        yield {name: (*out[name][:2], servers[name].http_url, *out[name][2:]) for name in out}
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="module")
def references(served):
    """{architecture: (the whole VLM by from_pretrained, its image processor)}."""
    from export.models.vlm import image_processor

    refs = {}
    for ckpt, _, _, arch, _ in served.values():
        if arch not in refs:
            refs[arch] = (_vlm_class(arch).from_pretrained(ckpt).eval(), image_processor(ckpt))
    return refs


def _photos():
    from export.check.vlm_parity import aspect_photos

    return [image for _, image in aspect_photos()]


def test_export_parity_covers_the_packed_rows(served):
    import json

    _, art, _, _, _ = served["next-fp32"]
    parity = json.loads((art / "parity.json").read_text())
    packed = [c for c in parity["checks"] if c["output"] == "image_embeds (packed)"]
    assert parity["passed"] and {c["case"].split()[0] for c in packed} == {"astronaut", "coffee", "chelsea-tall"}
    assert all(c["passed"] for c in packed)


@pytest.mark.parametrize("name", ["next-fp32", "next-fp16", "ov-fp32"])
def test_served_rows_match_transformers(served, references, name):
    import torch

    from triton_repo.vlm import image_embeds

    _, art, url, arch, precision = served[name]
    vlm, processor = references[arch]
    photos = _photos()
    batch = processor(images=photos, return_tensors="pt")
    with torch.no_grad():
        expected = vlm.model.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                                return_dict=True).pooler_output
    out = image_embeds(photos, url=url)
    assert out.rows.dtype == (np.float16 if precision == "fp16" else np.float32)
    assert out.errors == ["", "", ""]
    assert out.counts.tolist() == [e.shape[0] for e in expected]
    assert out.image_sizes.tolist() == batch["image_sizes"].tolist()
    for rows, ref in zip(out.per_image(), expected):
        from export.core.metrics import row_cosines

        assert row_cosines(ref.numpy(), rows.astype(np.float32)).min() >= MIN_COSINE
    if precision == "fp32":  # the in-process hand-off answers what the server does
        local = image_embeds(photos, artifacts=art)
        np.testing.assert_array_equal(local.counts, out.counts)
        np.testing.assert_allclose(local.rows, out.rows, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["next-fp32", "next-fp16", "ov-fp32"])
def test_greedy_generation_from_served_rows_equals_pixel_values(served, references, name):
    import torch

    from export.models.testing import TINY_IMAGE_TOKEN
    from triton_repo.vlm import expand_image_tokens, image_embeds

    _, _, url, arch, _ = served[name]
    vlm, processor = references[arch]
    photos = _photos()
    out = image_embeds(photos, url=url)
    prompt = [TINY_IMAGE_TOKEN if t is None else t for t in PROMPT]
    generated = []
    for photo, rows in zip(photos, out.per_image()):
        ids = torch.tensor([expand_image_tokens(prompt, [rows.shape[0]], TINY_IMAGE_TOKEN)])  # (1, L)
        batch = processor(images=[photo], return_tensors="pt")
        with torch.no_grad():
            expected = vlm.generate(input_ids=ids, pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
                                    max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1]:]
            embeds = vlm.get_input_embeddings()(ids)  # (1, L, H_llm)
            embeds[ids == TINY_IMAGE_TOKEN] = torch.from_numpy(rows.astype(np.float32))
            actual = vlm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=NEW_TOKENS, do_sample=False)[0]
        assert len(expected) == NEW_TOKENS
        assert actual.tolist() == expected.tolist()
        generated.append(tuple(expected.tolist()))
    assert len(set(generated)) > 1  # the image decides what is generated: the check has teeth


def test_bad_images_fail_alone(served):
    from PIL import Image

    from triton_repo.testing import encode
    from triton_repo.vlm import image_embeds

    _, _, url, _, _ = served["next-fp32"]
    thin = encode(Image.new("RGB", (900, 1), (120, 30, 200)), "PNG")  # 1 px tall: no grid row survives unpadding
    out = image_embeds([_photos()[0], b"not an image", thin], url=url)
    assert out.counts[0] > 0 and out.counts[1:].tolist() == [0, 0]
    assert out.errors[0] == "" and "cannot decode" in out.errors[1] and "keeps no row" in out.errors[2]
    assert out.rows.shape[0] == out.counts[0]
