"""The parity ledger in native mode (issue 12): a --dynamic-resolution export, every held-out photo encoded at
its own smart_resize grid, each stage against PyTorch on the same tensors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from export.pipeline import BuildOptions, build
from parity_tests.ledger import LedgerOptions, main, run_ledger

BUDGET = 112 * 112  # small: grids up to 8 x 8 patches of the tiny model (patch 14, factor 28)


@pytest.fixture(scope="module")
def dynamic_export(tiny_folders, tmp_path_factory):
    art = tmp_path_factory.mktemp("ledger-native") / "artifacts"
    build(BuildOptions(model=str(tiny_folders["mlcd-rope2d"]), out=art, parity=False, max_batch=4, runtime="none",
                      dynamic_resolution=True), log=lambda _: None)
    return art


def test_native_ledger_measures_every_photo_at_its_own_grid(dynamic_export, tmp_path):
    from export.core.preprocessing import NATIVE_MIN_PIXELS

    out = tmp_path / "ledger"
    result = run_ledger(LedgerOptions(dynamic_export, out, stages=["deployed", "fp32", "fp16"],
                                      native_max_pixels=BUDGET, plots=False), log=lambda _: None)
    assert result.passed, result.checklist()
    native = result.data["native"]
    assert (native["factor"], native["min_pixels"], native["max_pixels"]) == (28, NATIVE_MIN_PIXELS, BUDGET)
    sizes = {tuple(s) for s in native["sizes"]}
    assert len(native["sizes"]) == len(result.data["photos"]) and len(sizes) >= 2  # not one crop size
    assert all(h % 28 == 0 and w % 28 == 0 and h * w <= BUDGET for h, w in sizes)
    measured = {(r["stage"], r["output"]) for r in result.data["measured"]}
    assert {("deployed", "last_hidden_state"), ("fp16", "pooler_output")} <= measured
    assert "each at its native size" in (out / "ledger.md").read_text()
    data = json.loads((out / "parity.json").read_text())
    assert data["passed"] and data["native"]["sizes"] == native["sizes"]


def test_native_ledger_tokens_are_the_native_grid(dynamic_export):
    """run_native concatenates every photo's tokens: 1 + h'/14 * w'/14 rows each."""
    from export.core.images import held_out_photos
    from export.core.manifest import read_manifest
    from export.graph.trace import export_shape
    from export.models.loading import reference_checkpoint
    from export.runners.pyt import TorchRunner
    from parity_tests.ledger import native_inputs, run_native

    manifest = read_manifest(dynamic_export)
    ckpt = reference_checkpoint(manifest)
    images = [p.image for p in held_out_photos(3)]
    opts = LedgerOptions(dynamic_export, native_max_pixels=BUDGET)
    inputs = native_inputs(ckpt, images, opts)
    with TorchRunner(ckpt, export_shape(manifest)) as runner:
        out = run_native(runner, inputs, {"last_hidden_state"})
    tokens = sum(1 + (x.shape[2] // 14) * (x.shape[3] // 14) for x in inputs)
    assert out["last_hidden_state"].shape == (tokens, 64) and out["pooler_output"].shape == (3, 64)
    assert np.isfinite(out["last_hidden_state"]).all()


def test_native_ledger_needs_a_dynamic_resolution_export(dynamic_export, tmp_path, capsys):
    fixed = tmp_path / "fixed"
    shutil.copytree(dynamic_export, fixed)
    manifest = json.loads((fixed / "manifest.json").read_text())
    manifest["interface"]["dynamic_resolution"] = False
    (fixed / "manifest.json").write_text(json.dumps(manifest))
    assert main(["--artifacts", str(fixed), "--native-max-pixels", str(BUDGET), "--no-plots"]) == 2
    assert "--dynamic-resolution" in capsys.readouterr().err


def test_native_subset_keeps_the_tokens_and_rows_of_the_photos_an_engine_ran():
    """A TensorRT stage skips native sizes no optimization profile holds; the reference is cut to match."""
    import numpy as np

    from parity_tests.ledger import native_subset

    inputs = [np.zeros((1, 3, 28, 42)), np.zeros((1, 3, 56, 14)), np.zeros((1, 3, 14, 14))]  # 6, 4, 1 patches
    tokens = [6 + 1, 4 + 1, 1 + 1]  # + a class token each
    hidden = np.concatenate([np.full((t, 2), i, np.float32) for i, t in enumerate(tokens)])  # [sum L, C]
    pooled = np.arange(3, dtype=np.float32)[:, None]  # [N, 1]
    out = native_subset({"last_hidden_state": hidden, "pooler_output": pooled}, inputs, [0, 2],
                        {"last_hidden_state"}, patch=14)
    assert out["pooler_output"].ravel().tolist() == [0, 2]
    assert out["last_hidden_state"][:, 0].tolist() == [0] * 7 + [2] * 2
