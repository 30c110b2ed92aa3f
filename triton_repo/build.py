"""python -m triton_repo.build: export artifacts -> a Triton model repository (encoder, preprocess, ensemble).

    python -m triton_repo.build --artifacts artifacts/demo --out model_repository --backend python

The CLI is a thin layer over `build_repository(RepoOptions(...))`; the encoder's forms (`--backend`)
are the registry in triton_repo/forms.py.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from export.core import preprocessing
from export.core.errors import MvtError, OptionError, require
from export.core.folder import MANIFEST_NAME, ONNX_NAME, PLAN_NAME
from export.core.interface import IMAGE_INPUT
from export.core.manifest import pooled_output, prefix_tokens
from export.core.preprocessing import CONFIG_NAME as PREPROCESSOR_CONFIG, DEFAULT_MAX_PIXELS, ClipPreprocessing
from export.engine.profiles import add_native_budget_arguments, profile_max_batch
from triton_repo.config import EncoderInterface, TensorSpec, Warmup, validate_model_name
from triton_repo.forms import BACKENDS, FORMS, EncoderForm, cli_help, form
from triton_repo.kserve import (
    KServeOptions,
    add_arguments as add_kserve_arguments,
    options_from_args as kserve_options,
    write_kserve,
)
from triton_repo.modes import PREPROCESS_MODES

HERE = Path(__file__).resolve().parent
# The preprocess and ragged models import this file from beside them; the project imports it as a module.
PREPROCESSING_PY = Path(preprocessing.__file__).resolve()
ENCODER, PREPROCESS, NORMALIZE = "encoder", "preprocess", "normalize"
REPO_INFO = "mvt_repository.json"
ENSEMBLE_NOTE = "README.txt"  # in the ensemble's otherwise empty version folder


@dataclass
class RepoOptions:
    artifacts: Path  # the output folder of export.build_engine
    out: Path
    backend: str | None = None  # a form of triton_repo/forms.py; None: the first one that can serve the artifacts
    name: str = "embed"  # the ensemble, the model clients call
    instances: int = 1  # instances of the encoder and of preprocess
    max_batch: int | None = None  # None: the manifest's (tensorrt: the engine profile's max)
    force: bool = False
    # python backend: onnxruntime threads per encoder instance (0: one-thread runs per image on every core,
    # backend_models/encoder.py)
    intra_op_threads: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS  # preprocess refuses larger images
    # answer the pooled output (UNICOM: embedding) L2-normalized, through a `normalize` step
    normalize: bool = False
    # crop (the ensemble above) | anyres | native: triton_repo/modes.py (issue 12)
    preprocess: str = "crop"
    grid_pinpoints: list[tuple[int, int]] | None = None  # anyres (height, width) candidates; None: the default
    resize_factor: int | None = None  # native: h', w' multiples of this; None: twice the patch size
    native_min_pixels: int | None = None  # native pixel budget; None: preprocessing.NATIVE_MIN/MAX_PIXELS
    native_max_pixels: int | None = None
    # also write kserve/ beside the repository: a KServe InferenceService (triton_repo/kserve.py); None: no
    kserve: KServeOptions | None = None


@dataclass
class RepoResult:
    out: Path
    backend: str
    max_batch: int
    models: dict[str, Path] = field(default_factory=dict)  # model name -> its config.pbtxt


@dataclass(frozen=True)
class Artifacts:
    folder: Path
    manifest: dict
    onnx: Path
    plan: Path | None
    preprocessor: ClipPreprocessing

    @property
    def engine(self) -> dict:
        return self.manifest.get("engine") or {}

    @property
    def engine_max_batch(self) -> int | None:
        return profile_max_batch(self.engine.get("profiles") or {})

    def nodes_without_body(self) -> list[str]:
        """`domain.op_type` of each custom node in model.onnx that plain onnxruntime cannot run.

        Empty for what export.build_engine writes now (model.onnx is portable; an engine-only lowering
        goes to engine.onnx); an older export with `--rope plugin`, or a hand-made graph, has some.
        """
        onnx = require("onnx", "onnx")
        from export.graph.rope_node import nodes_without_body

        model = onnx.load(str(self.onnx), load_external_data=False)  # the graph only, not the weights
        return sorted({f"{n.domain}.{n.op_type}" for n in nodes_without_body(model)})


def profile_count(profiles: dict | list[dict] | None) -> int:
    """How many optimization profiles an engine entry's `profiles` holds (a dict is one; none recorded: 1)."""
    return len(profiles) if isinstance(profiles, list) else 1


def read_artifacts(folder: Path) -> Artifacts:
    folder = Path(folder)
    hint = f"run `python -m export.build_engine --out {folder}` first"
    if not folder.is_dir():
        raise OptionError(f"--artifacts {folder} is not a folder; {hint}")
    missing = [n for n in (MANIFEST_NAME, ONNX_NAME, PREPROCESSOR_CONFIG) if not (folder / n).is_file()]
    if missing:
        raise OptionError(f"--artifacts {folder} lacks {', '.join(missing)}; {hint}")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    plan = folder / PLAN_NAME
    return Artifacts(folder, manifest, folder / ONNX_NAME, plan if plan.is_file() else None,
                     ClipPreprocessing.from_file(folder / PREPROCESSOR_CONFIG))


def refusal(spec: EncoderForm, art: Artifacts, *, built_in_pod: bool = False) -> str | None:
    """Why the `spec` form cannot serve these artifacts (the error message), or None when it can.

    built_in_pod (--kserve): an engine form's plan is built by the pod's start-up step from model.onnx and
    the manifest (export/rebuild.py), so the export needs no plan, only what that step reads."""
    others = "|".join(n for n in BACKENDS if n != spec.name)
    if spec.needs_engine and built_in_pod:
        return _pod_build_refusal(art, others)
    if spec.needs_engine:
        # Manifests older than TensorRT-RTX support name no runtime: theirs was datacenter TensorRT.
        runtime = art.engine.get("runtime") or spec.engine_runtimes[0]
        missing = (f"--backend {spec.name} needs {art.folder}/{PLAN_NAME} and its optimization profile in the "
                   f"manifest ({art.engine.get('reason') or 'no engine was built'}); build the engine on a GPU "
                   f"machine, or use --backend {others}")
        if art.plan is None:
            return missing
        if runtime not in spec.engine_runtimes:
            return (f"{art.folder}/{PLAN_NAME} was built with {runtime}, which {spec.serves_with} cannot load; "
                    f"rebuild with `--runtime {spec.engine_runtimes[0]}` on a GPU machine, or use --backend {others}")
        if art.engine_max_batch is None:
            return missing
    if spec.needs_portable_graph:
        custom = art.nodes_without_body()
        if custom:  # one text for every such form, so that the default's error lists it once
            runs_onnx = "|".join(n for n, f in FORMS.items() if f.needs_portable_graph)
            engines = "|".join(n for n, f in FORMS.items() if f.needs_engine)
            return (f"{art.onnx} holds {', '.join(custom)} nodes without a function body (the TensorRT plugin "
                    "lowering, written by an older mvt-deploy or by hand), which onnxruntime cannot run: "
                    f"--backend {runs_onnx} would fail to load it; re-export the model with this version of "
                    "`python -m export.build_engine` (same options: model.onnx is then portable and the engine's "
                    f"lowering goes to engine.onnx), or serve the engine with --backend {engines}")
    return None


def _pod_build_refusal(art: Artifacts, others: str) -> str | None:
    """Why the KServe start-up step (export.rebuild.rebuild_engine) would refuse to build a plan from `art`."""
    from export.precision.recipe import cpu_quantized

    if not art.manifest.get("artifacts"):
        return (f"--kserve builds the plan in the pod from the files {art.folder}/{MANIFEST_NAME} records, and "
                "it records none; re-export the folder with this version of `python -m export.build_engine`")
    precision = art.manifest.get("precision")
    # rebuild_engine refuses this graph too (export/rebuild.py): it is shaped for onnxruntime on CPUs
    if cpu_quantized(precision, (art.manifest.get("options") or {}).get("quant_target")):
        return (f"{art.folder} holds a --quant-target cpu {precision} graph for onnxruntime on CPUs, which the pod's "
                f"start-up step cannot build into a TensorRT plan; re-export with --quant-target tensorrt, or use "
                f"--backend {others}")
    return None


def resolve_form(backend: str | None, art: Artifacts, *, built_in_pod: bool = False) -> EncoderForm:
    """The requested form if it can serve the artifacts; None: the first form (registry order) that can.

    built_in_pod (--kserve) applies to a requested form only: the default stays the first form that can
    serve the export as it is."""
    if backend is not None:
        spec = form(backend)
        problem = refusal(spec, art, built_in_pod=built_in_pod)
        if problem:
            raise OptionError(problem)
        return spec
    problems: dict[str, list[str]] = {}  # reason -> the forms it stops
    for spec in FORMS.values():
        problem = refusal(spec, art)
        if problem is None:
            return spec
        problems.setdefault(problem, []).append(spec.name)
    raise OptionError(f"no --backend can serve {art.folder}:\n"
                      + "\n".join(f"  {'|'.join(names)}: {p}" for p, names in problems.items()))


def resolve_max_batch(requested: int | None, spec: EncoderForm, art: Artifacts, *, built_in_pod: bool = False) -> int:
    """built_in_pod (--kserve): for an engine form, the max batch of the plan the start-up step builds with
    `--max-batch <this>` (kserve.start_script), so a larger --max-batch than the export's is passed through."""
    manifest_max = int(art.manifest.get("interface", {}).get("max_batch") or 8)
    if requested is not None and requested < 1:
        raise OptionError(f"--max-batch {requested} must be at least 1")
    if not spec.needs_engine:
        return requested or manifest_max
    if built_in_pod:
        from export.rebuild import engine_shapes

        # default: a recorded plan Triton loads (the pod keeps it on the GPU that built it), else the export's
        wanted = requested or (art.engine_max_batch if refusal(spec, art) is None else None) or manifest_max
        served = profile_max_batch(engine_shapes(art.manifest, wanted))  # the profile export/rebuild.py builds
        assert served is not None  # engine_shapes always bounds the batch
        if requested is not None and served != requested:
            raise OptionError(f"--max-batch {requested}: the plan the pod builds from {art.folder} takes at most "
                              f"{served} images per batch in one of its optimization profiles; use --max-batch "
                              f"{served}")
        return served
    engine_max = art.engine_max_batch
    assert engine_max is not None  # refusal() turns away an engine form without a profile
    if requested is not None and requested > engine_max:
        raise OptionError(
            f"--max-batch {requested} is larger than the engine's optimization profile allows ({engine_max}); "
            f"use --max-batch {engine_max} or rebuild with `python -m export.build_engine --max-batch {requested}`"
        )
    return requested or engine_max


def unserved_plan(spec: EncoderForm, art: Artifacts, max_batch: int) -> str | None:
    """--kserve: why the export holds no plan the engine form's start-up step would keep (then every pod
    builds one and <encoder>/1/ starts empty), or None when it holds one (it goes into <encoder>/1/)."""
    from export.rebuild import engine_shapes

    if not spec.needs_engine:
        return None
    if art.plan is None:
        return f"{art.folder} has no {PLAN_NAME}: {art.engine.get('reason') or 'no engine was built'}"
    runtime = art.engine.get("runtime") or spec.engine_runtimes[0]  # as in refusal()
    if runtime not in spec.engine_runtimes:
        return f"{art.folder}/{PLAN_NAME} was built with {runtime}, which {spec.serves_with} cannot load"
    if art.engine.get("profiles") != engine_shapes(art.manifest, max_batch):  # rebuild's own test (_same_target)
        return f"the optimization profile of {art.folder}/{PLAN_NAME} is not the one for max batch {max_batch}"
    return None


def encoder_interface(art: Artifacts, spec: EncoderForm) -> EncoderInterface:
    """Triton dims (no batch axis) from the manifest; symbolic axes become -1."""
    iface = art.manifest["interface"]
    (input_name, input_info), = iface["inputs"].items()
    dims = tuple(d if isinstance(d, int) else -1 for d in input_info["shape"][1:])  # (3, H, W)
    crop = art.preprocessor.output_size
    if crop is None:
        raise OptionError("the preprocessor config has no fixed output size (no center crop); "
                          "serving needs one resolution per batch")
    if dims[1] != -1 and tuple(dims[1:]) != crop:
        raise OptionError(f"the engine input is {dims[1]}x{dims[2]} but preprocessing crops {crop[0]}x{crop[1]}; "
                          f"re-export with --image-size {crop[0]} {crop[1]} or fix preprocessor_config.json")
    sequence = -1
    if spec.needs_engine:  # engines have one resolution: give TensorRT the exact sequence length
        patch = art.manifest["model"]["patch_size"]
        sequence = (crop[0] // patch) * (crop[1] // patch) + prefix_tokens(art.manifest)  # (class token +) patches
    outputs = tuple(
        TensorSpec(name, tuple(d if isinstance(d, int) else (sequence if d == "sequence" else -1)
                               for d in out["shape"][1:]))
        for name, out in iface["outputs"].items()
    )
    return EncoderInterface(TensorSpec(input_name, dims), outputs, crop)


def sample_jpeg() -> bytes:
    """A real photograph (scikit-image's astronaut) as JPEG bytes: warm-up runs the real path."""
    from export.core.images import sample_photos

    buf = io.BytesIO()
    sample_photos(1)[0].save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build_repository(opts: RepoOptions, log: Callable[[str], None] = print) -> RepoResult:
    from export.core.folder import staged_output
    from export.core.preprocessing import pixel_values_from_bytes
    from triton_repo import config as tc

    if opts.kserve and opts.preprocess != "crop":
        raise OptionError(f"--kserve writes an InferenceService for the crop ensemble; drop --preprocess "
                          f"{opts.preprocess}")
    if opts.preprocess != "crop":  # anyres | native: ragged answers, not an ensemble
        from triton_repo.modes import build_ragged

        return build_ragged(opts, log)
    name = validate_model_name(opts.name)
    if name in (ENCODER, PREPROCESS, NORMALIZE):
        raise OptionError(f"--name {name} is taken by the {name} step; choose another ensemble name (e.g. embed)")
    if opts.instances < 1:
        raise OptionError(f"--instances {opts.instances} must be at least 1")
    if opts.intra_op_threads < 0:
        raise OptionError(f"--intra-op-threads {opts.intra_op_threads} must be 0 (onnxruntime's default) or more")
    art = read_artifacts(opts.artifacts)
    # --kserve: an engine form's pod builds its plan at start-up, so the export need not hold one
    in_pod = opts.kserve is not None
    spec = resolve_form(opts.backend, art, built_in_pod=in_pod)
    max_batch = resolve_max_batch(opts.max_batch, spec, art, built_in_pod=in_pod)
    no_plan = unserved_plan(spec, art, max_batch) if in_pod else None
    iface = encoder_interface(art, spec)  # from the manifest: the same with or without a plan
    tc.model_config_pb2()  # fail before any work when the serve extra is missing
    if no_plan:
        log(f"{ENCODER} [{spec.name}]: {no_plan}; the KServe start-up step builds {PLAN_NAME} on each serving "
            f"node (--max-batch {max_batch}) and puts it in {ENCODER}/1/, which stays empty until then")

    jpeg = sample_jpeg()
    pixels = pixel_values_from_bytes(jpeg, art.preprocessor)  # (3, H, W)
    result = RepoResult(Path(opts.out), spec.name, max_batch)
    with staged_output(Path(opts.out), opts.force) as stage:
        # preprocess: model.py + preprocessing.py + the checkpoint's preprocessor config
        pre = stage / PREPROCESS
        _copy(HERE / "backend_models" / "preprocess.py", pre / "1" / "model.py")
        _copy(PREPROCESSING_PY, pre / "1" / "preprocessing.py")
        _copy(art.folder / PREPROCESSOR_CONFIG, pre / "1" / PREPROCESSOR_CONFIG)
        # Triton reads TYPE_STRING warm-up data as <uint32 little-endian length><bytes> per element.
        _write(pre / "warmup" / "image", struct.pack("<I", len(jpeg)) + jpeg)
        pre_cfg = tc.preprocess_config(
            name=PREPROCESS, max_batch=max_batch, instances=opts.instances, pixel_values=iface.input,
            warmup=Warmup("sample_photo", 1, {IMAGE_INPUT: ("TYPE_STRING", (1,), "image")}),
            parameters={"max_pixels": opts.max_pixels})
        result.models[PREPROCESS] = tc.write_config(pre_cfg, pre)

        enc = stage / ENCODER
        if no_plan:  # the start-up step copies the plan in before Triton starts (kserve.start_script)
            (enc / "1").mkdir(parents=True)
        for i, filename in enumerate(() if no_plan else spec.model_files):  # the first is required (refusal())
            if i == 0 or (art.folder / filename).is_file():
                _link_or_copy(art.folder / filename, enc / "1" / filename)
        if spec.model_py:
            _copy(HERE / "backend_models" / spec.model_py, enc / "1" / "model.py")
        params = spec.parameters(opts) if spec.parameters else None
        _write(enc / "warmup" / iface.input.name, pixels.astype("<f4").tobytes())
        # the plan Triton loads: the recorded one, or (no_plan) the one the pod's start-up step builds
        if no_plan:
            from export.rebuild import engine_shapes

            plan_profiles = profile_count(engine_shapes(art.manifest, max_batch))
        else:
            plan_profiles = profile_count(art.engine.get("profiles"))
        enc_cfg = tc.encoder_config(
            spec, iface, name=ENCODER, max_batch=max_batch, instances=opts.instances, parameters=params,
            warmup=Warmup("sample_photo", 1, {iface.input.name: ("TYPE_FP32", tuple(pixels.shape), iface.input.name)}),
            profiles=plan_profiles)
        result.models[ENCODER] = tc.write_config(enc_cfg, enc)

        normalize = None
        if opts.normalize:
            pooled = _pooled_spec(art, iface)
            _copy(HERE / "backend_models" / "normalize.py", stage / NORMALIZE / "1" / "model.py")
            norm_cfg = tc.normalize_config(name=NORMALIZE, max_batch=max_batch, instances=opts.instances,
                                           width=pooled.dims[-1])
            result.models[NORMALIZE] = tc.write_config(norm_cfg, stage / NORMALIZE)
            normalize = (NORMALIZE, pooled.name)

        # An ensemble still needs a version folder, and object stores (S3, GCS: KServe's storageUri) keep no
        # empty folders, so it holds a note (Triton reads nothing in an ensemble's version folder).
        (stage / name / "1").mkdir(parents=True)
        _write(stage / name / "1" / ENSEMBLE_NOTE, b"Version folder of a Triton ensemble; this note keeps it when the "
                                                   b"repository is copied to object storage.\n")
        ens_cfg = tc.ensemble_config(name=name, max_batch=max_batch, preprocess=PREPROCESS, encoder=ENCODER,
                                     interface=iface, normalize=normalize)
        result.models[name] = tc.write_config(ens_cfg, stage / name)

        for model, path in result.models.items():  # read back every config the way Triton will
            tc.parse_config(path)
            result.models[model] = Path(opts.out) / model / tc.CONFIG_NAME
        if opts.kserve:  # kserve/ beside the repository (engine forms: + encoder/artifacts/ in it)
            write_kserve(opts.kserve, stage=stage, out=Path(opts.out), ensemble=name, encoder=ENCODER, spec=spec,
                         art=art, max_batch=max_batch, force=opts.force, log=log, plan_in_pod=no_plan)
        (stage / "README.md").write_text(repository_readme(name, spec, iface, max_batch, art, Path(opts.out),
                                                           opts.normalize, plan_in_pod=no_plan))
        info = {"ensemble": name, "encoder": ENCODER, "preprocess": PREPROCESS, "backend": spec.name,
                "max_batch": max_batch, "image_size": list(iface.image_size),
                "outputs": list(iface.output_names), "pooled_output": pooled_output(art.manifest),
                "normalized": opts.normalize, "artifacts": str(Path(opts.artifacts).resolve()),
                "model": art.manifest.get("model", {})}
        (stage / REPO_INFO).write_text(json.dumps(info, indent=2) + "\n")
    steps = f"{PREPROCESS} -> {ENCODER} [{spec.name}]" + (f" -> {NORMALIZE}" if opts.normalize else "")
    log(f"wrote {opts.out}/ ({name} = {steps}, max batch {max_batch})")
    return result


def _pooled_spec(art: Artifacts, iface: EncoderInterface) -> TensorSpec:
    """The encoder output --normalize applies to: the manifest's pooled output, one vector per image."""
    name = pooled_output(art.manifest)
    spec = next((o for o in iface.outputs if o.name == name), None)
    if spec is None or len(spec.dims) != 1 or spec.dims[0] < 1:
        raise OptionError(f"--normalize: the artifacts have no pooled output {name!r} of one vector per image; "
                          "re-export them with this version of python -m export.build_engine")
    return spec


def repository_readme(name: str, spec: EncoderForm, iface: EncoderInterface, max_batch: int, art: Artifacts,
                      repo: Path, normalized: bool = False, plan_in_pod: str | None = None) -> str:
    outputs = ", ".join(f"`{o.name}` {list(o.dims)}" for o in iface.outputs)
    pooled = pooled_output(art.manifest)
    width = next((o.dims[-1] for o in iface.outputs if o.name == pooled), "?")
    normalize_row = (f"| `{NORMALIZE}` | `{pooled}` -> `{pooled}` / its L2 norm, per image | python |\n"
                     if normalized else "")
    h, w = iface.image_size
    production = spec.readme.format(engine_version=art.engine.get("version") or "?")
    if plan_in_pod:  # --kserve without a plan Triton can load (unserved_plan)
        production = (f"The encoder is a TensorRT engine that the KServe start-up step builds on each serving node "
                      f"({plan_in_pod}): `{ENCODER}/1/` holds no `{PLAN_NAME}` until then, so serve this repository "
                      f"through `../kserve/` (its README), not with a plain `tritonserver`.")
    backend = spec.name
    return f"""# Triton model repository: `{name}`

Generated by `python -m triton_repo.build` from `{art.folder}`.

| model | what | backend |
|---|---|---|
| `{name}` | ensemble: `image` (encoded bytes, TYPE_STRING) -> {outputs} | ensemble |
| `{PREPROCESS}` | image bytes -> `pixel_values` [3, {h}, {w}] (the checkpoint's CLIPImageProcessor) | python |
| `{ENCODER}` | `pixel_values` -> encoder outputs | {backend} |
{normalize_row}
Batched (max batch {max_batch}, dynamic batching); every model warms up on a real photograph.
{production}

## Serve

Production (NGC container, GPU; the python backend and, for engines, the TensorRT backend ship in it;
the python steps need `pip install pillow onnxruntime "numpy<2"` in the container, and a `python`
encoder needs 24.06 or later: it answers through response senders):

```bash
docker run --gpus all --rm -p8000:8000 -p8001:8001 -p8002:8002 -v "$(realpath {repo})":/models \\
    nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models
```

Locally, with the pip `tritonserver` that `scripts/setup_server_env.sh` installs (CPU works):

```bash
python -m triton_repo.serve {repo} --http-port 8000 --grpc-port 8001 --metrics-port 8002
```

## Client

```python
import numpy as np
import tritonclient.http as httpclient

client = httpclient.InferenceServerClient("127.0.0.1:8000")
data = open("photo.jpg", "rb").read()
image = httpclient.InferInput("image", [1, 1], "BYTES")
image.set_data_from_numpy(np.array([[data]], dtype=np.object_))
result = client.infer("{name}", [image], outputs=[httpclient.InferRequestedOutput("{pooled}")])
embedding = result.as_numpy("{pooled}")  # (1, {width}){", L2-normalized" if normalized else ""}
```

A bad image (corrupt, empty, over the pixel limit) fails only its own request, with a message.
"""


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link when on one filesystem (a bigG model is 7 GB), else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m triton_repo.build",
        description="Generate a Triton model repository (preprocess -> encoder ensemble) from export artifacts.",
    )
    p.add_argument("--artifacts", type=Path, required=True, metavar="DIR",
                   help="output folder of export.build_engine (model.onnx, manifest.json, preprocessor_config.json)")
    p.add_argument("--out", type=Path, required=True, metavar="REPO", help="model repository folder to write")
    p.add_argument("--backend", choices=BACKENDS, help=cli_help())
    p.add_argument("--name", default="embed", help="name of the ensemble clients call (default: embed)")
    p.add_argument("--instances", type=int, default=1, metavar="N", help="instances per model (default: 1)")
    p.add_argument("--intra-op-threads", type=int, default=0, metavar="N",
                   help="--backend python: onnxruntime threads per encoder instance (default: 0 = one worker per "
                        "usable core, a one-thread run per image, batches overlapping)")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help="max batch (default: the manifest's; never above the engine's optimization profile)")
    p.add_argument("--normalize", action="store_true",
                   help="answer the pooled output (UNICOM: embedding) L2-normalized, for retrieval by inner "
                        "product (default: as the model computes it)")
    p.add_argument("--preprocess", choices=PREPROCESS_MODES, default="crop",
                   help="crop: one center crop per image, an ensemble (default); anyres: LLaVA-NeXT tiles; native: "
                        "smart_resize within a pixel budget (needs --dynamic-resolution artifacts). See README")
    p.add_argument("--grid-pinpoints", nargs="+", metavar="HxW",
                   help="anyres candidate resolutions, height x width (default for native size s: "
                        "sx2s 2sxs 2sx2s 3sxs sx3s)")
    add_native_budget_arguments(p, "native")
    p.add_argument("--force", action="store_true", help="replace an existing repository")
    add_kserve_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    opts = RepoOptions(artifacts=args.artifacts, out=args.out, backend=args.backend, name=args.name,
                       instances=args.instances, max_batch=args.max_batch, force=args.force, normalize=args.normalize,
                       intra_op_threads=args.intra_op_threads, preprocess=args.preprocess,
                       resize_factor=args.resize_factor,
                       native_min_pixels=args.min_pixels, native_max_pixels=args.max_pixels,
                       kserve=kserve_options(args))
    try:
        if args.grid_pinpoints:
            from triton_repo.modes import parse_pinpoints

            opts.grid_pinpoints = parse_pinpoints(args.grid_pinpoints)
        build_repository(opts)
    except MvtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
