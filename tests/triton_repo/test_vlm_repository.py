"""--preprocess anyres on a --projector export (issue 24): the repository it writes, what it refuses, and its
packing model run in this process (fake pb_utils, the real graph behind BLS) against the in-process hand-off.
The numbers against transformers, served by a real tritonserver, are in parity_tests/test_vlm_parity.py."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from export.core.errors import OptionError


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A tiny LLaVA-NeXT (MLCD tower) exported with --projector, fp32, no parity (the parity tests run it)."""
    from export.models.families import MLCD_ROPE2D
    from export.models.testing import save_tiny_vlm
    from export.pipeline import BuildOptions, build

    root = tmp_path_factory.mktemp("vlm-repo")
    ckpt = save_tiny_vlm(MLCD_ROPE2D, root / "checkpoint", "llava_next")
    out = root / "artifacts"
    build(BuildOptions(model=str(ckpt), out=out, projector=True, runtime="none", max_batch=4, parity=False),
          log=lambda _: None)
    return out


def _build(artifacts, out, **kwargs):
    from triton_repo.build import RepoOptions, build_repository

    return build_repository(RepoOptions(artifacts, out, backend="python", intra_op_threads=1, max_batch=4, **kwargs),
                            log=lambda _: None)


def test_repository_serves_packed_rows(artifacts, tmp_path):
    from triton_repo import config as tc

    result = _build(artifacts, tmp_path / "repo", preprocess="anyres", embeds_dtype="float16")
    embed = tc.parse_config(result.models["embed"])
    outputs = {o.name: (list(o.dims), tc.model_config_pb2().DataType.Name(o.data_type)) for o in embed.output}
    assert outputs == {"image_embeds": ([-1, 48], "TYPE_FP16"), "count": ([-1], "TYPE_INT64"),
                       "grid": ([-1, 2], "TYPE_INT64"), "image_sizes": ([-1, 2], "TYPE_INT64"),
                       "error": ([-1], "TYPE_STRING")}
    encoder = tc.parse_config(result.models["encoder"])
    assert [(o.name, list(o.dims)) for o in encoder.output] == [("image_embeds", [16, 48])]  # 4 x 4 patches, no CLS
    files = {p.name for p in (tmp_path / "repo" / "embed" / "1").iterdir()}
    assert {"model.py", "preprocessing.py", "packing.py", "image_newline.npy"} <= files
    info = json.loads((tmp_path / "repo" / "mvt_repository.json").read_text())
    assert info["vlm"]["image_token_id"] == 127 and info["vlm"]["text_hidden_size"] == 48
    assert "image_sizes" in info["outputs"]
    assert "image token is id 127" in (tmp_path / "repo" / "README.md").read_text()


@pytest.mark.parametrize("kwargs, message", [
    (dict(preprocess="crop"), "serve it with --preprocess anyres"),
    (dict(preprocess="native"), "serve it with --preprocess anyres"),
    (dict(preprocess="anyres", grid_pinpoints=[(56, 56)]), "drop --grid-pinpoints"),
    (dict(preprocess="anyres", normalize=True), "drop --normalize"),
    (dict(preprocess="anyres", embeds_dtype="bfloat16"), "--embeds-dtype bfloat16 is unknown"),
])
def test_refusals_write_nothing(artifacts, tmp_path, kwargs, message):
    with pytest.raises(OptionError, match=message):
        _build(artifacts, tmp_path / "repo", **kwargs)
    assert not (tmp_path / "repo").exists()


def test_embeds_dtype_needs_a_projector_export(artifacts, tmp_path):
    import shutil

    tower = tmp_path / "tower"  # the same folder, its manifest saying "not --projector"
    shutil.copytree(artifacts, tower)
    manifest = json.loads((tower / "manifest.json").read_text())
    manifest["options"]["projector"] = False
    (tower / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(OptionError, match="applies to --projector exports"):
        _build(tower, tmp_path / "repo", preprocess="anyres", embeds_dtype="float16")


def test_packing_model_answers_the_in_process_hand_off(artifacts, tmp_path, monkeypatch):
    """The served model's code (model.py + preprocessing.py + packing.py beside it), its BLS encoder the real
    graph in onnxruntime: its rows, counts and image sizes are the in-process hand-off's."""
    import asyncio
    import importlib.util

    from google.protobuf import json_format
    from PIL import Image

    from export.core.images import sample_photos
    from export.runners.ort import ort_session
    from triton_repo import config as tc
    from triton_repo.testing import encode, fake_pb_utils
    from triton_repo.vlm import image_embeds

    repo = _build(artifacts, tmp_path / "repo", preprocess="anyres").out
    pb = fake_pb_utils()
    session = ort_session(artifacts / "model.onnx")

    class InferenceRequest:  # BLS to the encoder: the exported graph
        def __init__(self, *, inputs, requested_output_names, model_name, preferred_memory=None, **_):
            self.inputs, self.outputs = inputs, requested_output_names

        async def async_exec(self):
            (pixels,) = [t.as_numpy() for t in self.inputs]  # (B, 3, 56, 56)
            values = session.run(self.outputs, {"pixel_values": pixels})
            return pb.InferenceResponse([pb.Tensor(n, v) for n, v in zip(self.outputs, values)])

    pb.InferenceRequest = InferenceRequest
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the model puts its folder first
    for name in ("preprocessing", "packing"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    spec = importlib.util.spec_from_file_location("vlm_ragged_under_test", repo / "embed" / "1" / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = json_format.MessageToDict(tc.parse_config(repo / "embed" / "config.pbtxt"),
                                       preserving_proto_field_name=True)
    model = module.TritonPythonModel()
    model.initialize({"model_repository": str(repo / "embed"), "model_version": "1",
                      "model_config": json.dumps(config)})
    for name in ("preprocessing", "packing"):
        sys.modules.pop(name, None)

    astronaut, coffee = sample_photos(2)
    images = [encode(astronaut, "JPEG", quality=92), encode(coffee, "PNG"),
              encode(Image.new("RGB", (900, 1)), "PNG")]  # the last: no grid row survives unpadding
    request = pb.Request([pb.Tensor("image", np.array(images, dtype=np.object_))])
    (response,) = asyncio.run(model.execute([request]))
    assert not response.has_error(), response.error().message()
    served = {t.name(): t.as_numpy() for t in response.output_tensors()}
    local = image_embeds(images[:2], artifacts=artifacts)
    assert served["count"].tolist() == local.counts.tolist() + [0]
    assert served["image_sizes"].tolist() == [[512, 512], [400, 600], [0, 0]]
    assert "keeps no row" in served["error"][2].decode()
    np.testing.assert_allclose(served["image_embeds"], local.rows, rtol=0, atol=1e-6)


def test_the_documented_transformers_example_runs(artifacts, tmp_path, monkeypatch):
    """docs/vlm.md's runnable block, on this module's checkpoint and export, generates what pixel_values does."""
    from pathlib import Path

    import torch

    from export.models.vlm import image_processor

    doc = (Path(__file__).resolve().parents[2] / "docs" / "vlm.md").read_text()
    block = doc.split("<!-- runnable: tests/triton_repo/test_vlm_repository.py runs this block -->", 1)[1]
    code = block.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-llava").symlink_to(artifacts.parent / "checkpoint")
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "tiny-llava").symlink_to(artifacts)
    namespace: dict = {}
    exec(compile(code, "docs/vlm.md", "exec"), namespace)
    model, ids, photo = namespace["model"], namespace["ids"], namespace["photo"]
    batch = image_processor(artifacts.parent / "checkpoint")(images=[photo], return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(input_ids=ids, pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
                                  max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
    assert namespace["tokens"][0].tolist() == expected.tolist()


def test_embed_refuses_a_projector_export(artifacts, tmp_path):
    from embed.job import embed_images

    with pytest.raises(OptionError, match="is a --projector export"):
        embed_images(artifacts, str(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()
