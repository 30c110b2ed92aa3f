"""Shared fixtures: tiny checkpoints on disk and their (expensive) canonical ONNX exports."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """{family name: what --model takes (a checkpoint folder; UNICOM: a released-format .pt file)}, plus
    "clip-full" (a whole CLIPModel checkpoint)."""
    from export.models.families import CLIP_VISION, FAMILIES
    from export.models.testing import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    folders = {f.name: save_tiny_checkpoint(f, root / f.name) for f in FAMILIES}
    folders["clip-full"] = save_tiny_checkpoint(CLIP_VISION, root / "clip-full", full_clip=True)
    return folders


@pytest.fixture(scope="session")
def exported(tiny_folders, tmp_path_factory):
    """Canonical exports, one trace per family: any resolution (fixed-resolution families: their own),
    plus hidden_states[-2].

    Returns a function family name -> (checkpoint, shape, path of the canonical model.onnx).
    """
    from export.graph.trace import ExportShape, export_canonical
    from export.models.loading import load_checkpoint

    cache = {}

    def get(name: str):
        if name not in cache:
            ckpt = load_checkpoint(str(tiny_folders[name]))
            h, w = ckpt.image_size
            shape = ExportShape(h, w, dynamic_resolution=not ckpt.family.fixed_resolution, hidden_layer=-2)
            path = tmp_path_factory.mktemp(f"onnx-{name}") / "model.onnx"
            export_canonical(ckpt, shape, path)
            cache[name] = (ckpt, shape, path)
        return cache[name]

    return get
