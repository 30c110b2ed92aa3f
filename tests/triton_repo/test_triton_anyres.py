"""--preprocess anyres|native (issue 12): options, build-time errors, generated configs, engine profiles,
and (marked triton_server) the real tritonserver serving both modes against PyTorch on the same tensors.

One tiny MLCD (RoPE) checkpoint exported twice by the real pipeline: at its native 56 x 56 (anyres) and with
--dynamic-resolution (native, and anyres again). Patch 14, so the native factor is 28.
"""

from __future__ import annotations

import importlib.util
import io
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.core.errors import OptionError
from export.core.manifest import read_manifest
from triton_repo.modes import ANYRES, NATIVE, check_pinpoints, parse_pinpoints

ROOT = Path(__file__).resolve().parents[2]
MIN_COSINE = 0.9999
TILE, PATCH = 56, 14  # the tiny checkpoint's native size and patch
NATIVE_BUDGET = (28 * 28, 112 * 112)  # small budget: grids up to 8 x 8 patches keep the server test fast


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"checkpoint": folder, "static": artifacts at 56 x 56, "dynamic": --dynamic-resolution artifacts}."""
    from export.models.families import family_by_name
    from export.models.testing import save_tiny_checkpoint
    from export.pipeline import BuildOptions, build

    root = tmp_path_factory.mktemp("anyres")
    ckpt = save_tiny_checkpoint(family_by_name("mlcd-rope2d"), root / "checkpoint")
    out = {"checkpoint": ckpt}
    for name, dynamic in (("static", False), ("dynamic", True)):
        out[name] = root / name
        build(BuildOptions(model=str(ckpt), out=out[name], max_batch=4, parity=False, runtime="none",
                           dynamic_resolution=dynamic,
                           native_budget=dict(zip(("min_pixels", "max_pixels"), NATIVE_BUDGET)) if dynamic else None),
              log=lambda _: None)
    return out


def _build(artifacts: Path, out: Path, **kwargs):
    from triton_repo.build import RepoOptions, build_repository

    return build_repository(RepoOptions(artifacts, out, backend="python", intra_op_threads=1, **kwargs),
                            log=lambda _: None)


# ------------------------------------------------------------------ options and build-time errors (no server)

def test_parse_pinpoints_accepts_both_spellings():
    assert parse_pinpoints(["56x112", "112X56"]) == [(56, 112), (112, 56)]
    assert parse_pinpoints("(56,112) (112,56),(112,112)") == [(56, 112), (112, 56), (112, 112)]
    with pytest.raises(OptionError, match="height x width pairs"):
        parse_pinpoints(["56x112", "112"])
    with pytest.raises(OptionError, match="multiple of the tile size 56"):
        check_pinpoints([(56, 100)], 56)
    with pytest.raises(OptionError, match="empty"):
        check_pinpoints([], 56)


def test_anyres_repository_configs(tiny, tmp_path):
    from export.core.preprocessing import default_grid_pinpoints
    from triton_repo import config as tc

    result = _build(tiny["static"], tmp_path / "repo", preprocess=ANYRES)
    assert set(result.models) == {"encoder", "embed"}  # no ensemble, no preprocess model
    embed = tc.parse_config(result.models["embed"])
    assert embed.backend == "python" and embed.max_batch_size == 0
    assert [(i.name, list(i.dims)) for i in embed.input] == [("image", [-1])]
    outs = {o.name: list(o.dims) for o in embed.output}
    assert outs == {"last_hidden_state": [-1, 17, 64], "pooler_output": [-1, 64], "count": [-1], "grid": [-1, 2],
                    "error": [-1]}
    params = {k: v.string_value for k, v in embed.parameters.items()}
    assert params["mode"] == "anyres" and params["tile_size"] == "56"
    assert [tuple(p) for p in json.loads(params["pinpoints"])] == default_grid_pinpoints(56)
    assert default_grid_pinpoints(56) == [(56, 112), (112, 56), (112, 112), (168, 56), (56, 168)]
    encoder = tc.parse_config(result.models["encoder"])
    assert list(encoder.input[0].dims) == [3, 56, 56] and encoder.max_batch_size == 4
    assert {"model.py", "preprocessing.py", "preprocessor_config.json"} <= {
        p.name for p in (tmp_path / "repo" / "embed" / "1").iterdir()}
    readme = (tmp_path / "repo" / "README.md").read_text()
    assert "[-1, 17, 64]" in readme and "count" in readme and "rows, cols" in readme
    info = json.loads((tmp_path / "repo" / "mvt_repository.json").read_text())
    assert info["preprocess"] == "anyres" and info["ragged"]["pinpoints"][0] == [56, 112]
    assert info["engine_profiles"] == [{"pixel_values": {"min": [1, 3, 56, 56], "opt": [2, 3, 56, 56],
                                                         "max": [4, 3, 56, 56]}}]


def test_native_repository_configs(tiny, tmp_path):
    from export.engine.profiles import native_profiles
    from triton_repo import config as tc

    result = _build(tiny["dynamic"], tmp_path / "repo", preprocess=NATIVE, native_min_pixels=NATIVE_BUDGET[0],
                    native_max_pixels=NATIVE_BUDGET[1])
    embed = tc.parse_config(result.models["embed"])
    outs = {o.name: list(o.dims) for o in embed.output}
    assert outs == {"last_hidden_state": [-1, 64], "count": [-1], "grid": [-1, 2], "error": [-1]}
    params = {k: v.string_value for k, v in embed.parameters.items()}
    assert (params["factor"], params["min_pixels"], params["max_pixels"]) == ("28", "784", "12544")
    encoder = tc.parse_config(result.models["encoder"])
    assert list(encoder.input[0].dims) == [3, -1, -1]
    # the encoder warms up on the sample photo at its native size: a multiple of the factor, within budget
    warm = encoder.model_warmup[0].inputs["pixel_values"].dims
    assert warm[1] % 28 == 0 and warm[2] % 28 == 0 and warm[1] * warm[2] <= NATIVE_BUDGET[1]
    assert "sum of L" in (tmp_path / "repo" / "README.md").read_text()
    info = json.loads((tmp_path / "repo" / "mvt_repository.json").read_text())
    assert info["engine_profiles"] == native_profiles("pixel_values", 28, *NATIVE_BUDGET)


def test_native_defaults_are_llava_onevision_15s(tiny, tmp_path):
    from export.core.preprocessing import NATIVE_MAX_PIXELS, NATIVE_MIN_PIXELS
    from triton_repo import config as tc

    result = _build(tiny["dynamic"], tmp_path / "repo", preprocess=NATIVE)
    params = {k: v.string_value for k, v in tc.parse_config(result.models["embed"]).parameters.items()}
    assert (int(params["min_pixels"]), int(params["max_pixels"])) == (NATIVE_MIN_PIXELS, NATIVE_MAX_PIXELS)
    assert params["factor"] == str(2 * PATCH)


def test_native_budget_that_will_not_fit_is_refused_with_the_estimate(tiny, tmp_path, monkeypatch):
    """The python encoder runs model.onnx in onnxruntime on this machine: the largest request at the budget
    (one 1792 x 1792 image at 3,240,000 pixels) must fit, once per instance; nothing is written otherwise."""
    from export.core.errors import MemoryBudgetError
    from export.graph import footprint

    monkeypatch.setattr(footprint, "available_bytes", lambda: 256 * 1024**2)
    with pytest.raises(MemoryBudgetError, match=r"--native-max-pixels 3240000.*\[1, 3, 1792, 1792\].*lower "
                                                 r"--native-max-pixels or --instances"):
        _build(tiny["dynamic"], tmp_path / "repo", preprocess=NATIVE, instances=2)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("case,kwargs,match", [
    ("static", {"preprocess": NATIVE}, "--dynamic-resolution"),
    ("static", {"preprocess": ANYRES, "grid_pinpoints": [(56, 100)]}, "multiple of the tile size 56"),
    ("dynamic", {"preprocess": NATIVE, "resize_factor": 20}, "multiple of the patch size 14"),
    ("dynamic", {"preprocess": NATIVE, "native_min_pixels": 5000, "native_max_pixels": 4000}, "min <= max"),
    ("static", {"preprocess": ANYRES, "normalize": True}, "--normalize"),
])
def test_build_time_errors(tiny, tmp_path, case, kwargs, match):
    with pytest.raises(OptionError, match=match):
        _build(tiny[case], tmp_path / "repo", **kwargs)
    assert not (tmp_path / "repo").exists()  # nothing half-written


@pytest.mark.parametrize("mode", ["crop", ANYRES, NATIVE])
@pytest.mark.parametrize("kwargs,message", [
    ({"intra_op_threads": -1}, "--intra-op-threads -1 must be 0 (onnxruntime's default) or more"),
    ({"instances": 0}, "--instances 0 must be at least 1"),
    ({"name": "../x"}, "--name '../x' is not a valid model name"),
])
def test_every_mode_refuses_the_same_options(tiny, tmp_path, mode, kwargs, message):
    """The crop ensemble and the ragged modes write one skeleton (triton_repo/layout.py): an option one mode
    refuses, every mode refuses, in the same words."""
    from triton_repo.build import RepoOptions, build_repository

    options = RepoOptions(tiny["dynamic"], tmp_path / "repo", backend="python", preprocess=mode, **kwargs)
    with pytest.raises(OptionError, match=re.escape(message)):
        build_repository(options, log=lambda _: None)
    assert not (tmp_path / "repo").exists()


def test_anyres_needs_artifacts_at_the_native_size(tiny, tmp_path):
    """Artifacts exported at another resolution than the checkpoint's (--image-size) cannot encode s x s tiles."""
    art = tmp_path / "artifacts-112"
    shutil.copytree(tiny["static"], art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["interface"]["inputs"]["pixel_values"]["shape"] = ["batch", 3, 112, 112]
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(OptionError, match="exported at 112x112"):
        _build(art, tmp_path / "repo", preprocess=ANYRES)


def test_crop_is_unchanged_by_the_new_options(tiny, tmp_path):
    from triton_repo import config as tc

    result = _build(tiny["static"], tmp_path / "repo")
    assert set(result.models) == {"preprocess", "encoder", "embed"}
    assert tc.parse_config(result.models["embed"]).platform == "ensemble"


def test_cli_reports_native_without_dynamic_resolution(tiny, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "triton_repo.build", "--artifacts", str(tiny["static"]), "--out",
                           str(tmp_path / "repo"), "--backend", "python", "--preprocess", "native"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--dynamic-resolution" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "triton_repo.build", "--artifacts", str(tiny["static"]), "--out",
                           str(tmp_path / "repo"), "--backend", "python", "--preprocess", "anyres",
                           "--grid-pinpoints", "56x112", "112x56"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    params = (tmp_path / "repo" / "embed" / "config.pbtxt").read_text()
    assert "[[56, 112], [112, 56]]" in params


# ------------------------------------------------------------------ engine optimization profiles

@pytest.mark.parametrize("factor,lo,hi", [(28, 56 * 56, 3_240_000), (28, 3136, 28 * 28 * 1280), (16, 256, 4096)])
def test_native_profiles_cover_every_smart_resize_output(factor, lo, hi):
    from export import engine as engines
    from export.core.preprocessing import MAX_ASPECT_RATIO, smart_resize

    profiles = [p["x"] for p in engines.native_profiles("x", factor, lo, hi, max_batch=2)]
    side_lo, side_hi = engines.native_side_range(factor, lo, hi)
    assert 4 <= len(profiles) <= 10
    # each profile's largest input stays near the budget, up to a factor of rounding per side (one profile for
    # every aspect ratio would hold side_hi^2)
    assert max(p["max"][2] * p["max"][3] for p in profiles) <= 3 * hi + 2 * factor * side_hi < side_hi ** 2 / 4
    assert all(p["max"][0] == 2 and p["min"][0] == 1 for p in profiles)
    rng = random.Random(0)
    seen = set()
    for _ in range(4000):
        h = rng.randint(1, 12000)
        w = max(1, round(h * 10 ** rng.uniform(-2.3, 2.3))) if rng.random() < 0.7 else rng.randint(1, 400)
        if max(h, w) / min(h, w) > MAX_ASPECT_RATIO:
            continue
        hp, wp = smart_resize(h, w, factor, lo, hi)
        seen.add((hp, wp))
        assert side_lo <= min(hp, wp) and max(hp, wp) <= side_hi, (h, w, hp, wp)
        assert any(engines.profile_covers(p, (1, 3, hp, wp)) for p in profiles), (h, w, hp, wp)
    assert len(seen) > 100  # many distinct shapes were checked, not a handful


def test_anyres_profile_batches_every_tile_of_the_largest_grid():
    from export import engine as engines
    from export.core.preprocessing import default_grid_pinpoints

    pins = default_grid_pinpoints(336)
    max_tiles = max((h // 336) * (w // 336) for h, w in pins)
    assert max_tiles == 4
    profile = engines.anyres_profile("pixel_values", 336, max_tiles, images=2)["pixel_values"]
    assert profile["max"] == [10, 3, 336, 336] and profile["min"] == [1, 3, 336, 336]


def test_engine_form_checks_the_recorded_profiles(tiny, tmp_path):
    """A tensorrt engine whose profile is the export's default (0.5x-1.5x native) cannot serve native; one whose
    manifest records native_profiles(...) can (the plan is a placeholder: Triton's TensorRT backend is absent)."""
    from export import engine as engines
    from triton_repo import config as tc
    from triton_repo.build import RepoOptions, build_repository

    art = tmp_path / "artifacts"
    shutil.copytree(tiny["dynamic"], art)
    (art / "model.plan").write_bytes(b"placeholder")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["engine"] = {"built": True, "runtime": "tensorrt", "version": "10.15",
                          "profiles": engines.profiles("pixel_values", (56, 56), True, 14, 4)}
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(OptionError, match="optimization profiles"):
        _build_engine_form(art, tmp_path / "repo-default")
    # what export.build_engine --dynamic-resolution builds: the batched profile plus the native budget's
    budget = manifest["interface"]["native_budget"]
    assert budget == {"factor": 28, "min_pixels": NATIVE_BUDGET[0], "max_pixels": NATIVE_BUDGET[1]}
    manifest["engine"]["profiles"] = engines.profiles("pixel_values", (56, 56), True, 14, 4, budget)
    (art / "manifest.json").write_text(json.dumps(manifest))
    result = _build_engine_form(art, tmp_path / "repo")
    encoder = tc.parse_config(result.models["encoder"])
    assert encoder.platform == "tensorrt_plan"
    # every profile named: Triton's TensorRT backend would otherwise use profile 0 (the batched one) only
    assert list(encoder.instance_group[0].profile) == [str(i) for i in range(len(manifest["engine"]["profiles"]))]
    assert len(encoder.instance_group[0].profile) > 2
    # max_batch_size: the batched profile's (4), not the native profiles' one image; native requests are not
    # merged (two same-sized images in a batch of 2 would fit no native profile)
    assert encoder.max_batch_size == 4 and not encoder.HasField("dynamic_batching")
    anyres = build_repository(RepoOptions(art, tmp_path / "repo-anyres", backend="tensorrt", preprocess="anyres"),
                              log=lambda _: None)
    tiles = tc.parse_config(anyres.models["encoder"])  # s x s tiles batch in profile 0, as crop does
    assert tiles.max_batch_size == 4 and tiles.HasField("dynamic_batching")


def test_engine_with_several_profiles_allocates_per_profile_and_says_what_it_costs(tiny, tmp_path):
    """A --dynamic-resolution engine (the batched profile and the native ones): every profile named, each context
    allocated on profile change (tensorrt_backend r25.05's parameter), and the README's per-instance GPU memory
    adds the contexts' own profiles, from the plan's size and the profiles' largest inputs (the plan is a
    placeholder: Triton's TensorRT backend is absent)."""
    from export import engine as engines
    from triton_repo import config as tc, gpu_memory
    from triton_repo.build import RepoOptions, build_repository

    art = tmp_path / "artifacts"
    shutil.copytree(tiny["dynamic"], art)
    (art / "model.plan").write_bytes(b"placeholder" * 1000)
    manifest = json.loads((art / "manifest.json").read_text())
    profiles = engines.profiles("pixel_values", (56, 56), True, 14, 4, manifest["interface"]["native_budget"])
    manifest["engine"] = {"built": True, "runtime": "tensorrt", "version": "10.11.0", "profiles": profiles}
    manifest["artifacts"]["model.plan"] = {"sha256": "0" * 64, "bytes": 11000}
    (art / "manifest.json").write_text(json.dumps(manifest))
    result = build_repository(RepoOptions(art, tmp_path / "repo", backend="tensorrt", instances=2),
                              log=lambda _: None)
    encoder = tc.parse_config(result.models["encoder"])
    assert list(encoder.instance_group[0].profile) == [str(i) for i in range(len(profiles))] and len(profiles) > 2
    assert encoder.parameters["execution_context_allocation_strategy"].string_value == "ON_PROFILE_CHANGE"
    readme = (tmp_path / "repo" / "README.md").read_text()
    assert f"holds {len(profiles)} execution contexts, one per optimization profile" in readme
    assert "It needs Triton 25.05 or later" in readme and "2 here, `--instances`" in readme
    m = gpu_memory.estimate(read_manifest(art), profiles, 11000)
    # by hand: hidden 64, the batched profile's largest input [4, 3, 84, 84] -> 6 x 6 patches + the class token
    (batched, *native) = m.profiles
    assert (batched.input_shape, batched.tokens) == ((4, 3, 84, 84), 37)
    assert batched.activations == 4 * 37 * max(6 * 64, 3 * 64 + 4 * 64) * 4  # fp32 activations
    assert m.activations() == sum(p.activations for p in m.profiles)  # each context its own profile
    assert m.activations(on_profile_change=False) == len(profiles) * max(p.activations for p in m.profiles)
    assert m.weights == 11000 and m.total() == 11000 + m.io + m.activations()
    assert f"**{gpu_memory.gib(m.total())}**" in readme and "(model.plan)" in readme
    assert "Triton before 25.05 ignores that parameter" in readme and "an estimate" in readme


def _build_engine_form(art: Path, out: Path):
    from triton_repo.build import RepoOptions, build_repository

    return build_repository(RepoOptions(art, out, backend="tensorrt", preprocess=NATIVE,
                                        native_min_pixels=NATIVE_BUDGET[0], native_max_pixels=NATIVE_BUDGET[1]),
                            log=lambda _: None)


# ------------------------------------------------------------------ ragged.py's BLS calls, against a fake pb_utils

def _fake_pb_utils(requests: list):
    """triton_repo.testing.fake_pb_utils with an encoder behind BLS that answers on the GPU, as a TensorRT
    encoder does: its outputs stay there unless the BLS request prefers CPU memory."""
    from triton_repo.testing import fake_pb_utils

    pb = fake_pb_utils()

    class InferenceRequest:
        def __init__(self, *, inputs, requested_output_names, model_name, request_id="", correlation_id=0,
                     model_version=-1, flags=0, timeout=0, preferred_memory=None, trace=None, parameters=None):
            self.inputs, self.outputs, self.model_name = inputs, requested_output_names, model_name
            self.preferred_memory = preferred_memory
            requests.append(self)

        async def async_exec(self):
            (pixels,) = [t.as_numpy() for t in self.inputs]  # (B, 3, H, W)
            gpu = self.preferred_memory is None or self.preferred_memory.type != pb.TRITONSERVER_MEMORY_CPU
            shapes = {"last_hidden_state": (17, 64), "pooler_output": (64,)}
            return pb.InferenceResponse([pb.Tensor(n, np.ones((pixels.shape[0], *shapes[n]), np.float32), on_gpu=gpu)
                                         for n in self.outputs])

    pb.InferenceRequest = InferenceRequest
    return pb


def test_ragged_bls_asks_for_its_outputs_in_cpu_memory(tiny, tmp_path, monkeypatch):
    """A GPU encoder's BLS outputs come back in CPU memory, where as_numpy() can read them."""
    import asyncio
    import importlib.util

    from google.protobuf import json_format

    from triton_repo import config as tc

    repo = _build(tiny["static"], tmp_path / "repo", preprocess=ANYRES).out
    requests: list = []
    pb = _fake_pb_utils(requests)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the model puts its folder first
    monkeypatch.delitem(sys.modules, "preprocessing", raising=False)
    spec = importlib.util.spec_from_file_location("ragged_under_test", repo / "embed" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules.pop("preprocessing", None)
    config = json_format.MessageToDict(tc.parse_config(repo / "embed" / "config.pbtxt"),
                                       preserving_proto_field_name=True)
    model = module.TritonPythonModel()
    model.initialize({"model_repository": str(repo / "embed"), "model_version": "1",
                      "model_config": json.dumps(config)})
    request = pb.Request([pb.Tensor("image", np.array([_photos()["astronaut.jpg"]], dtype=np.object_))])
    (response,) = asyncio.run(model.execute([request]))
    assert not response.has_error(), response.error().message()
    assert requests and all(r.preferred_memory.type == pb.TRITONSERVER_MEMORY_CPU for r in requests)
    outputs = {t.name(): t.as_numpy() for t in response.output_tensors()}
    assert outputs["count"].tolist() == [outputs["last_hidden_state"].shape[0]]


# ------------------------------------------------------------------ served by the real tritonserver

def _photos() -> dict[str, bytes]:
    """Real photographs of different aspect ratios (square, 3:2 landscape, 1:4 wide, 4:1 tall)."""
    from export.core.images import sample_photos
    from triton_repo.testing import encode

    astronaut, coffee = sample_photos(2)  # 512 x 512, 600 x 400 (width x height)
    return {"astronaut.jpg": encode(astronaut, "JPEG", quality=92), "coffee.png": encode(coffee, "PNG"),
            "wide.jpg": encode(astronaut.crop((0, 192, 512, 320)), "JPEG", quality=90),
            "tall.png": encode(coffee.crop((250, 0, 350, 400)), "PNG")}


CORRUPT = b"\x89PNG\r\n\x1a\n not a png at all"


@pytest.fixture(scope="module")
def servers(tiny, tmp_path_factory):
    """{mode: (http url, repository)}: one tritonserver per mode (their `encoder` models differ)."""
    from triton_repo.server import TritonServer, free_port
    from triton_repo.testing import import_or_skip, tritonserver_or_skip

    import_or_skip("tritonclient.http")
    install = tritonserver_or_skip()
    root = tmp_path_factory.mktemp("anyres-serve")
    repos = {ANYRES: _build(tiny["static"], root / "anyres", preprocess=ANYRES, max_batch=4).out,
             NATIVE: _build(tiny["dynamic"], root / "native", preprocess=NATIVE, max_batch=4,
                            native_min_pixels=NATIVE_BUDGET[0], native_max_pixels=NATIVE_BUDGET[1]).out}
    started = {m: TritonServer(r, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                               install=install, ready_timeout_s=90) for m, r in repos.items()}
    try:
        for server in started.values():
            server.start()
        for server in started.values():
            server.wait_ready()
        yield {m: s for m, s in started.items()}
    finally:
        for server in started.values():
            server.stop()


def _infer(url: str, images: list[bytes]):
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(url) as client:
        inp = httpclient.InferInput("image", [len(images)], "BYTES")
        inp.set_data_from_numpy(np.array(images, dtype=np.object_))
        return client.infer("embed", [inp])


def _torch(checkpoint: Path, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """PyTorch on the same preprocessed tensors (T, 3, H, W): the reference."""
    import torch

    from export.models.loading import load_checkpoint

    model = load_checkpoint(str(checkpoint)).model
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels))
    return {"last_hidden_state": out.last_hidden_state.numpy(), "pooler_output": out.pooler_output.numpy()}


def _split(result, name: str) -> list[np.ndarray]:
    count = result.as_numpy("count")
    return np.split(result.as_numpy(name), np.cumsum(count)[:-1])


@pytest.mark.triton_server
def test_anyres_served_tiles_match_pytorch(servers, tiny):
    from PIL import Image

    from export.core.metrics import row_cosines
    from export.core.preprocessing import ClipPreprocessing, anyres_pixel_values, default_grid_pinpoints

    photos = _photos()
    names = ["astronaut.jpg", "wide.jpg", "tall.png", "coffee.png"]
    images = [photos[n] for n in names]
    images.insert(1, CORRUPT)
    result = _infer(servers[ANYRES].http_url, images)
    errors = [e.decode() for e in result.as_numpy("error")]
    assert errors[1].startswith("preprocess:") and not any(errors[:1] + errors[2:]), errors
    count, grid = result.as_numpy("count"), result.as_numpy("grid")
    hidden, pooled = _split(result, "last_hidden_state"), _split(result, "pooler_output")
    cfg = ClipPreprocessing.from_file(tiny["static"] / "preprocessor_config.json")
    grids = []
    for i, name in [(0, names[0]), (2, names[1]), (3, names[2]), (4, names[3])]:
        pixels, (rows, cols) = anyres_pixel_values(Image.open(io.BytesIO(photos[name])), cfg,
                                                   default_grid_pinpoints(TILE), TILE)  # (T, 3, 56, 56)
        grids.append((rows, cols))
        assert tuple(grid[i]) == (rows, cols) and count[i] == 1 + rows * cols == pixels.shape[0], name
        ref = _torch(tiny["checkpoint"], pixels)
        assert hidden[i].shape == (count[i], 17, 64) and pooled[i].shape == (count[i], 64)
        assert row_cosines(ref["last_hidden_state"], hidden[i]).min() >= MIN_COSINE, name
        assert row_cosines(ref["pooler_output"], pooled[i]).min() >= MIN_COSINE, name
    assert count[1] == 0 and tuple(grid[1]) == (0, 0) and hidden[1].shape[0] == 0
    assert {(1, 3), (3, 1)} <= set(grids)  # the wide and tall photos chose the 1x3 and 3x1 grids


@pytest.mark.triton_server
def test_native_served_grid_matches_pytorch(servers, tiny):
    from PIL import Image

    from export.core.metrics import row_cosines
    from export.core.preprocessing import ClipPreprocessing, native_pixel_values

    photos = _photos()
    names = ["coffee.png", "astronaut.jpg", "tall.png", "wide.jpg"]
    images = [photos[n] for n in names] + [CORRUPT]
    result = _infer(servers[NATIVE].http_url, images)
    errors = [e.decode() for e in result.as_numpy("error")]
    assert errors[-1].startswith("preprocess:") and not any(errors[:-1]), errors
    count, grid = result.as_numpy("count"), result.as_numpy("grid")
    hidden = _split(result, "last_hidden_state")
    cfg = ClipPreprocessing.from_file(tiny["dynamic"] / "preprocessor_config.json")
    shapes = set()
    for i, name in enumerate(names):
        pixels = native_pixel_values(Image.open(io.BytesIO(photos[name])), cfg, 28, *NATIVE_BUDGET)  # (3, h', w')
        gh, gw = pixels.shape[1] // PATCH, pixels.shape[2] // PATCH
        shapes.add((gh, gw))
        assert tuple(grid[i]) == (gh, gw) and count[i] == 1 + gh * gw, name
        ref = _torch(tiny["checkpoint"], pixels[None])["last_hidden_state"][0]  # (1 + gh * gw, 64)
        assert hidden[i].shape == ref.shape == (1 + gh * gw, 64)
        assert row_cosines(ref, hidden[i]).min() >= MIN_COSINE, name
    assert len(shapes) == len(names)  # four aspect ratios, four grids
    assert count[-1] == 0 and tuple(grid[-1]) == (0, 0)


@pytest.mark.triton_server
@pytest.mark.parametrize("mode", [ANYRES, NATIVE])
def test_a_request_of_only_bad_images_is_an_error(servers, mode):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="preprocess:"):
        _infer(servers[mode].http_url, [CORRUPT])
    assert servers[mode].is_ready()
    good = _infer(servers[mode].http_url, [_photos()["coffee.png"]])  # and the next request is served
    assert good.as_numpy("count")[0] > 0


_RTX_BUILD = r"""
import json, sys
from pathlib import Path
import onnx
from onnx import TensorProto, helper, numpy_helper
import numpy as np
from export import engine as engines

out = Path(sys.argv[1])
# a patch-embedding graph with any batch, height and width: pixel_values [B, 3, H, W] -> [B, 8, H/14, W/14]
weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 3, 14, 14)).astype(np.float32), "w")
graph = helper.make_graph(
    [helper.make_node("Conv", ["pixel_values", "w"], ["patches"], kernel_shape=[14, 14], strides=[14, 14])], "g",
    [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["B", 3, "H", "W"])],
    [helper.make_tensor_value_info("patches", TensorProto.FLOAT, ["B", 8, "h", "w"])], [weight])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(out / "model.onnx"))
profiles = engines.native_profiles("pixel_values", 28, 784, 112 * 112, max_batch=2)
target = engines.probe("tensorrt-rtx")
facts = engines.build_engine(target, out / "model.onnx", out / "model.plan", profiles,
                             compute_capabilities=[(8, 9)])
print(json.dumps({"profiles": facts["profiles"], "bytes": facts["bytes"]}))
"""


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                    reason="tensorrt-rtx not installed (extra: tensorrt-rtx)")
def test_tensorrt_rtx_builds_the_native_profiles(tmp_path):
    """TensorRT(-RTX) accepts the native profile set: one engine, one profile per aspect band (built on a CPU)."""
    from export import engine as engines

    proc = subprocess.run([sys.executable, "-c", _RTX_BUILD, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["profiles"] == engines.native_profiles("pixel_values", 28, 784, 112 * 112, max_batch=2)
    assert len(facts["profiles"]) >= 4 and facts["bytes"] == (tmp_path / "model.plan").stat().st_size > 1000
