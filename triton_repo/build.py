"""python -m triton_repo.build: export artifacts -> a Triton model repository (encoder, preprocess, ensemble).

    python -m triton_repo.build --artifacts artifacts/demo --out model_repository --backend python

The CLI is a thin layer over `build_repository(RepoOptions(...))`.
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

from export.errors import MvtError, OptionError

from .config import BACKENDS, EncoderInterface, TensorSpec, Warmup, validate_model_name
from .preprocessing import CONFIG_NAME as PREPROCESSOR_CONFIG, DEFAULT_MAX_PIXELS, ClipPreprocessing

HERE = Path(__file__).resolve().parent
ONNX_NAME, PLAN_NAME, MANIFEST_NAME = "model.onnx", "model.plan", "manifest.json"
ENCODER, PREPROCESS = "encoder", "preprocess"
REPO_INFO = "mvt_repository.json"


@dataclass
class RepoOptions:
    artifacts: Path  # the output folder of export.build_engine
    out: Path
    backend: str | None = None  # None: tensorrt when the artifacts hold an engine, else onnxruntime
    name: str = "embed"  # the ensemble, the model clients call
    instances: int = 1  # instances of the encoder and of preprocess
    max_batch: int | None = None  # None: the manifest's (tensorrt: the engine profile's max)
    force: bool = False
    intra_op_threads: int = 0  # python backend: onnxruntime threads per instance (0: its default)
    max_pixels: int = DEFAULT_MAX_PIXELS  # preprocess refuses larger images


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
    def engine_max_batch(self) -> int | None:
        engine = self.manifest.get("engine") or {}
        profiles = engine.get("profiles") or {}
        maxima = [p["max"][0] for p in profiles.values() if isinstance(p, dict) and p.get("max")]
        return min(maxima) if maxima else None


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


def resolve_backend(backend: str | None, art: Artifacts) -> str:
    # Triton's TensorRT backend links datacenter TensorRT: a TensorRT-RTX plan does not load there.
    runtime = (art.manifest.get("engine") or {}).get("runtime", "tensorrt")
    if backend is None:
        return "tensorrt" if art.plan is not None and runtime == "tensorrt" else "onnxruntime"
    if backend not in BACKENDS:
        raise OptionError(f"--backend {backend} is unknown; choose one of {', '.join(BACKENDS)}")
    if backend == "tensorrt" and runtime != "tensorrt":
        raise OptionError(
            f"{art.folder}/{PLAN_NAME} was built with {runtime}, which Triton's TensorRT backend cannot load; "
            "rebuild with `--runtime tensorrt` on a GPU machine, or use --backend onnxruntime|python"
        )
    if backend == "tensorrt" and (art.plan is None or art.engine_max_batch is None):
        reason = (art.manifest.get("engine") or {}).get("reason") or "no engine was built"
        raise OptionError(
            f"--backend tensorrt needs {art.folder}/{PLAN_NAME} and its optimization profile in the manifest "
            f"({reason}); build the engine on a GPU machine, or use --backend onnxruntime|python"
        )
    return backend


def resolve_max_batch(requested: int | None, backend: str, art: Artifacts) -> int:
    manifest_max = int(art.manifest.get("interface", {}).get("max_batch") or 8)
    if requested is not None and requested < 1:
        raise OptionError(f"--max-batch {requested} must be at least 1")
    if backend != "tensorrt":
        return requested or manifest_max
    engine_max = art.engine_max_batch
    if requested is not None and requested > engine_max:
        raise OptionError(
            f"--max-batch {requested} is larger than the engine's optimization profile allows ({engine_max}); "
            f"use --max-batch {engine_max} or rebuild with `python -m export.build_engine --max-batch {requested}`"
        )
    return requested or engine_max


def encoder_interface(art: Artifacts, backend: str) -> EncoderInterface:
    """Triton dims (no batch axis) from the manifest; symbolic axes become -1."""
    iface = art.manifest["interface"]
    (input_name, spec), = iface["inputs"].items()
    dims = tuple(d if isinstance(d, int) else -1 for d in spec["shape"][1:])  # (3, H, W)
    crop = art.preprocessor.output_size
    if crop is None:
        raise OptionError("the preprocessor config has no fixed output size (no center crop); "
                          "serving needs one resolution per batch")
    if dims[1] != -1 and tuple(dims[1:]) != crop:
        raise OptionError(f"the engine input is {dims[1]}x{dims[2]} but preprocessing crops {crop[0]}x{crop[1]}; "
                          f"re-export with --image-size {crop[0]} {crop[1]} or fix preprocessor_config.json")
    sequence = -1
    if backend == "tensorrt":  # engines have one resolution: give TensorRT the exact sequence length
        patch = art.manifest["model"]["patch_size"]
        sequence = (crop[0] // patch) * (crop[1] // patch) + 1  # class token + patches
    outputs = tuple(
        TensorSpec(name, tuple(d if isinstance(d, int) else (sequence if d == "sequence" else -1)
                               for d in out["shape"][1:]))
        for name, out in iface["outputs"].items()
    )
    return EncoderInterface(TensorSpec(input_name, dims), outputs, crop)


def sample_jpeg() -> bytes:
    """A real photograph (scikit-image's astronaut) as JPEG bytes: warm-up runs the real path."""
    from export.images import sample_photos

    buf = io.BytesIO()
    sample_photos(1)[0].save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build_repository(opts: RepoOptions, log: Callable[[str], None] = print) -> RepoResult:
    from export.artifacts import staged_output

    from . import config as tc
    from .preprocessing import pixel_values_from_bytes

    name = validate_model_name(opts.name)
    if name in (ENCODER, PREPROCESS):
        raise OptionError(f"--name {name} is taken by the {name} step; choose another ensemble name (e.g. embed)")
    if opts.instances < 1:
        raise OptionError(f"--instances {opts.instances} must be at least 1")
    art = read_artifacts(opts.artifacts)
    backend = resolve_backend(opts.backend, art)
    max_batch = resolve_max_batch(opts.max_batch, backend, art)
    iface = encoder_interface(art, backend)
    tc.model_config_pb2()  # fail before any work when the serve extra is missing

    jpeg = sample_jpeg()
    pixels = pixel_values_from_bytes(jpeg, art.preprocessor)  # (3, H, W)
    result = RepoResult(Path(opts.out), backend, max_batch)
    with staged_output(Path(opts.out), opts.force) as stage:
        # preprocess: model.py + preprocessing.py + the checkpoint's preprocessor config
        pre = stage / PREPROCESS
        _copy(HERE / "backend_models" / "preprocess.py", pre / "1" / "model.py")
        _copy(HERE / "preprocessing.py", pre / "1" / "preprocessing.py")
        _copy(art.folder / PREPROCESSOR_CONFIG, pre / "1" / PREPROCESSOR_CONFIG)
        # Triton reads TYPE_STRING warm-up data as <uint32 little-endian length><bytes> per element.
        _write(pre / "warmup" / "image", struct.pack("<I", len(jpeg)) + jpeg)
        pre_cfg = tc.preprocess_config(
            name=PREPROCESS, max_batch=max_batch, instances=opts.instances, pixel_values=iface.input,
            warmup=Warmup("sample_photo", 1, {"image": ("TYPE_STRING", (1,), "image")}),
            parameters={"max_pixels": opts.max_pixels})
        result.models[PREPROCESS] = tc.write_config(pre_cfg, pre)

        enc = stage / ENCODER
        params = None
        if backend == "tensorrt":
            _link_or_copy(art.plan, enc / "1" / PLAN_NAME)
        else:
            for f in [art.onnx, *art.folder.glob(ONNX_NAME + ".data")]:  # external weights stay beside it
                _link_or_copy(f, enc / "1" / f.name)
            if backend == "python":
                _copy(HERE / "backend_models" / "encoder.py", enc / "1" / "model.py")
                params = {"intra_op_threads": opts.intra_op_threads, "providers": "CPUExecutionProvider"}
        _write(enc / "warmup" / iface.input.name, pixels.astype("<f4").tobytes())
        enc_cfg = tc.encoder_config(
            backend, iface, name=ENCODER, max_batch=max_batch, instances=opts.instances, parameters=params,
            warmup=Warmup("sample_photo", 1, {iface.input.name: ("TYPE_FP32", tuple(pixels.shape), iface.input.name)}))
        result.models[ENCODER] = tc.write_config(enc_cfg, enc)

        (stage / name / "1").mkdir(parents=True)  # an ensemble still needs a version folder
        ens_cfg = tc.ensemble_config(name=name, max_batch=max_batch, preprocess=PREPROCESS, encoder=ENCODER,
                                     interface=iface)
        result.models[name] = tc.write_config(ens_cfg, stage / name)

        for model, path in result.models.items():  # read back every config the way Triton will
            tc.parse_config(path)
            result.models[model] = Path(opts.out) / model / tc.CONFIG_NAME
        (stage / "README.md").write_text(repository_readme(name, backend, iface, max_batch, art, Path(opts.out)))
        info = {"ensemble": name, "encoder": ENCODER, "preprocess": PREPROCESS, "backend": backend,
                "max_batch": max_batch, "image_size": list(iface.image_size),
                "outputs": list(iface.output_names), "artifacts": str(Path(opts.artifacts).resolve()),
                "model": art.manifest.get("model", {})}
        (stage / REPO_INFO).write_text(json.dumps(info, indent=2) + "\n")
    log(f"wrote {opts.out}/ ({name} = {PREPROCESS} -> {ENCODER} [{backend}], max batch {max_batch})")
    return result


def repository_readme(name: str, backend: str, iface: EncoderInterface, max_batch: int, art: Artifacts,
                      repo: Path) -> str:
    outputs = ", ".join(f"`{o.name}` {list(o.dims)}" for o in iface.outputs)
    h, w = iface.image_size
    trt = (art.manifest.get("engine") or {}).get("version")
    production = {
        "tensorrt": f"The encoder is a TensorRT engine (built with TensorRT {trt or '?'}): serve it with the NGC "
                    "Triton container whose TensorRT version matches the one that built `model.plan` "
                    "(an engine runs only on the TensorRT release and GPU architecture that built it).",
        "onnxruntime": "The encoder runs on Triton's onnxruntime backend (GPU where the server has one, else CPU).",
        "python": "The encoder runs onnxruntime inside Triton's python backend on the CPU: this form serves on a "
                  "`tritonserver` without the onnxruntime backend (the pip one). The server's python environment "
                  "needs numpy<2, onnxruntime and pillow.",
    }[backend]
    return f"""# Triton model repository: `{name}`

Generated by `python -m triton_repo.build` from `{art.folder}`.

| model | what | backend |
|---|---|---|
| `{name}` | ensemble: `image` (encoded bytes, TYPE_STRING) -> {outputs} | ensemble |
| `{PREPROCESS}` | image bytes -> `pixel_values` [3, {h}, {w}] (the checkpoint's CLIPImageProcessor) | python |
| `{ENCODER}` | `pixel_values` -> encoder outputs | {backend} |

Batched (max batch {max_batch}, dynamic batching); every model warms up on a real photograph.
{production}

## Serve

Production (NGC container, GPU; the python backend and, for engines, the TensorRT backend ship in it;
the python steps need `pip install pillow onnxruntime "numpy<2"` in the container):

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
result = client.infer("{name}", [image], outputs=[httpclient.InferRequestedOutput("pooler_output")])
embedding = result.as_numpy("pooler_output")  # (1, {iface.outputs[-1].dims[-1] if iface.outputs else '?'})
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
    p.add_argument("--backend", choices=BACKENDS,
                   help="encoder backend (default: tensorrt when the artifacts hold model.plan, else onnxruntime); "
                        "python runs onnxruntime in the python backend, for servers without the onnxruntime backend")
    p.add_argument("--name", default="embed", help="name of the ensemble clients call (default: embed)")
    p.add_argument("--instances", type=int, default=1, metavar="N", help="instances per model (default: 1)")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help="max batch (default: the manifest's; never above the engine's optimization profile)")
    p.add_argument("--force", action="store_true", help="replace an existing repository")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    opts = RepoOptions(artifacts=args.artifacts, out=args.out, backend=args.backend, name=args.name,
                       instances=args.instances, max_batch=args.max_batch, force=args.force)
    try:
        build_repository(opts)
    except MvtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
