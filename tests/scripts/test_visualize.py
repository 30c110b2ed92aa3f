"""scripts/visualize_features.py: the PCA-RGB figure of PyTorch's and the deployed model's tokens."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from export.models.testing import load_script

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _script():
    return load_script("visualize_features")


@pytest.fixture(scope="module")
def any_resolution_folder(exported, tiny_folders, tmp_path_factory):
    """An export folder around the session's canonical any-resolution export (no second trace):
    model.onnx + the manifest fields the script reads."""
    ckpt, shape, path = exported("mlcd-rope2d")
    folder = tmp_path_factory.mktemp("viz") / "artifacts"
    folder.mkdir()
    shutil.copyfile(path, folder / "model.onnx")
    if path.with_name("model.onnx.data").exists():
        shutil.copyfile(path.with_name("model.onnx.data"), folder / "model.onnx.data")
    manifest = {"options": {"model": str(tiny_folders["mlcd-rope2d"]), "random_weights": False, "image_size": None},
                "model": {"source": str(tiny_folders["mlcd-rope2d"]), "family": ckpt.family.name,
                          "native_image_size": list(ckpt.image_size), "patch_size": ckpt.patch_size},
                "interface": {"dynamic_resolution": True, "hidden_layer": shape.hidden_layer, "max_batch": 8},
                "precision": "fp32", "rope_lowering": "custom"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_feature_png_at_the_native_resolution(any_resolution_folder, tmp_path):
    out = tmp_path / "native.png"
    assert _script().main(["--artifacts", str(any_resolution_folder), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_feature_png_at_a_higher_non_square_resolution(any_resolution_folder, tmp_path):
    args = _script().parser().parse_args(["--artifacts", str(any_resolution_folder), "--size", "112", "84",
                                          "--out", str(tmp_path / "big.png"), "--output", "hidden_state"])
    facts = _script().run(args, log=lambda _: None)
    assert facts["grid"] == [8, 6] and facts["tokens_min_cosine"] > 0.99999
    assert facts["rgb_max_abs_difference"] < 1e-3  # one basis: the maps agree, not just look alike
    assert (tmp_path / "big.png").read_bytes()[:8] == PNG_MAGIC


def test_bad_size_is_explained(any_resolution_folder, capsys):
    assert _script().main(["--artifacts", str(any_resolution_folder), "--size", "100", "56"]) == 2
    assert "multiple of patch size" in capsys.readouterr().err


def test_a_size_that_will_not_fit_is_refused_before_pytorch_runs(any_resolution_folder, monkeypatch, capsys):
    """The canonical graph keeps the traced attention, [B, heads, S, S]: at 4480 x 4480 (102,401 tokens) its
    scores alone are 4 x 102,401^2 x 4 bytes = 168 GB; the refusal names the estimate and what to change."""
    from export.runners import pyt

    def never(*args, **kwargs):
        raise AssertionError("PyTorch ran")

    monkeypatch.setattr(pyt.TorchRunner, "activate_impl", never)
    assert _script().main(["--artifacts", str(any_resolution_folder), "--size", "4480", "4480"]) == 2
    err = capsys.readouterr().err
    assert "--size 4480 4480" in err and "GiB" in err and "use a smaller --size" in err
    assert "--attention mha" in err  # the manifest records no attention form: the traced one


def test_one_pca_basis_shows_a_different_model():
    """Tokens from another model land elsewhere in the reference basis: the maps differ."""
    from export.check.features import fit_pca

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(16, 32))
    basis = fit_pca(ref)
    same = basis.rgb(ref + 1e-6, (4, 4))
    other = basis.rgb(rng.normal(size=(16, 32)), (4, 4))
    assert np.abs(same - basis.rgb(ref, (4, 4))).max() < 1e-4
    assert np.abs(other - basis.rgb(ref, (4, 4))).mean() > 0.1


def test_feature_png_at_the_native_grid(any_resolution_folder, tmp_path):
    """--native-max-pixels: the image at smart_resize(h, w, 28, min, max), as --preprocess native serves it."""
    from PIL import Image

    from export.core.preprocessing import smart_resize

    photo = tmp_path / "wide.png"
    Image.new("RGB", (300, 120), (200, 30, 60)).save(photo)
    args = _script().parser().parse_args(["--artifacts", str(any_resolution_folder), "--image", str(photo),
                                          "--native-max-pixels", str(112 * 112), "--native-min-pixels", "784",
                                          "--out", str(tmp_path / "native.png")])
    facts = _script().run(args, log=lambda _: None)
    h, w = smart_resize(120, 300, 28, 784, 112 * 112)
    assert facts["native"] and facts["size"] == [h, w] and h != w
    assert facts["grid"] == [h // 14, w // 14] and facts["tokens_min_cosine"] > 0.99999
    assert (tmp_path / "native.png").read_bytes()[:8] == PNG_MAGIC


def test_native_mode_needs_a_dynamic_export_and_no_size(any_resolution_folder, tmp_path, capsys):
    base = ["--artifacts", str(any_resolution_folder), "--native-max-pixels", "12544"]
    assert _script().main(base + ["--size", "56", "56"]) == 2
    assert "drop --size" in capsys.readouterr().err
    fixed = tmp_path / "fixed"
    shutil.copytree(any_resolution_folder, fixed)
    manifest = json.loads((fixed / "manifest.json").read_text())
    manifest["interface"]["dynamic_resolution"] = False
    (fixed / "manifest.json").write_text(json.dumps(manifest))
    assert _script().main(["--artifacts", str(fixed), "--native-max-pixels", "12544"]) == 2
    assert "--dynamic-resolution" in capsys.readouterr().err
