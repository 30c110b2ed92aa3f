"""python -m export.build_engine end to end on tiny checkpoints, and its errors."""

from __future__ import annotations

import json

import onnx
import onnxruntime as ort
import pytest

from export import build_engine
from export.artifacts import sha256
from export.pipeline import BuildOptions, build


def _main(*argv) -> int:
    return build_engine.main([str(a) for a in argv])


def test_build_writes_model_manifest_and_parity(tiny_folders, tmp_path, capsys):
    out = tmp_path / "out"
    assert _main("--model", tiny_folders["mlcd-rope2d"], "--out", out, "--hidden-layer", "-2") == 0
    text = capsys.readouterr().out
    assert "PASSED" in text and "TensorRT engine skipped" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rope_lowering"] == "custom" and manifest["parity"]["passed"]
    for name, meta in manifest["artifacts"].items():
        assert sha256(out / name) == meta["sha256"]
    assert set(manifest["interface"]["outputs"]) == {"last_hidden_state", "pooler_output", "hidden_state"}
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and {c["case"] for c in parity["checks"]} == {"batch 1 @ 56x56", "batch 3 @ 56x56"}
    # fixed resolution, dynamic batch
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (pixels,) = session.get_inputs()
    assert pixels.shape == ["batch", 3, 56, 56]
    assert not list(out.parent.glob(".out.staging-*"))  # nothing left behind


def test_clip_with_other_fixed_size_and_lowering(tiny_folders, tmp_path):
    out = tmp_path / "clip"
    assert _main("--model", tiny_folders["clip-full"], "--out", out, "--image-size", 70, 42, "--rope", "onnx23") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rope_lowering"] == "none"  # CLIP has no RoPE: nothing to lower
    assert manifest["interface"]["inputs"]["pixel_values"]["shape"] == ["batch", 3, 70, 42]


def test_existing_output_needs_force(tiny_folders, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert _main("--model", tiny_folders["mlcd-rope2d"], "--out", out) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert _main("--model", tiny_folders["mlcd-rope2d"], "--out", out, "--force", "--skip-parity") == 0
    assert not (out / "keep.txt").exists() and (out / "model.onnx").exists()


@pytest.mark.parametrize("argv, message", [
    (["--image-size", "300", "56"], "height 300 is not a multiple of patch size 14; use 294 or 308"),
    (["--image-size", "56", "10"], "width 10 is not a multiple of patch size 14; use 14"),
    (["--hidden-layer", "7"], "--hidden-layer 7 is out of range for 2 layers"),
    (["--precision", "int8", "--calib-images", "/nonexistent"], "--calib-images /nonexistent is not a folder"),
])
def test_bad_options_fail_clearly_and_write_nothing(tiny_folders, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert _main("--model", tiny_folders["mlcd-rope2d"], "--out", out, *argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_missing_model_folder(tmp_path, capsys):
    assert _main("--model", tmp_path / "missing", "--out", tmp_path / "out") == 2
    assert "does not exist" in capsys.readouterr().err


def test_external_data_path(tiny_folders, tmp_path):
    """Models over the threshold (bigG fp32 is ~7.4 GB) keep weights in model.onnx.data."""
    out = tmp_path / "ext"
    result = build(BuildOptions(model=str(tiny_folders["mlcd-rope2d"]), out=out, external_data_threshold=1024),
                   log=lambda _: None)
    assert result.parity_passed
    assert (out / "model.onnx.data").stat().st_size > 1024
    assert set(result.manifest["artifacts"]) >= {"model.onnx", "model.onnx.data"}
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    # and below the threshold the file is self-contained
    small = build(BuildOptions(model=str(tiny_folders["mlcd-rope2d"]), out=tmp_path / "one", parity=False),
                  log=lambda _: None)
    assert set(small.manifest["artifacts"]) == {"model.onnx", "preprocessor_config.json"}


def test_interrupted_build_leaves_nothing(tiny_folders, tmp_path, monkeypatch):
    import export.pipeline as pipeline

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_lower_and_save", boom)
    with pytest.raises(KeyboardInterrupt):
        build(BuildOptions(model=str(tiny_folders["mlcd-rope2d"]), out=tmp_path / "out"), log=lambda _: None)
    assert list(tmp_path.iterdir()) == []
