"""Shared fixtures: tiny checkpoints on disk and their (expensive) canonical ONNX exports."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download


@pytest.fixture(scope="session", autouse=True)
def _torch_steps_in_process():
    """Builds in a test's own process run their PyTorch steps there: the worker has imported torch and
    transformers once, a child per build would import them again. Builds the tests start as commands (the
    CLI tests) run the child as users do, and tests/export/test_loading.py checks the child itself."""
    from export import torch_side

    torch_side.RUN_IN = "in-process"
    yield
    torch_side.RUN_IN = "child"


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


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the marks (tests/test_test_runner.py)
def pytest_collection_modifyitems(config, items):
    """Parallel runs (pyproject: -n auto --dist loadgroup) send each test to any worker, except tests of a module
    that shares a module- or class-scoped fixture (a served repository, an export): those stay on one worker,
    so the fixture is built once. Files of many slow independent exports then spread over the workers."""
    for item in items:
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        if any(d.scope in ("module", "class", "package") for fixture in defs.values() for d in fixture):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
