"""`--preprocess anyres|native`: a repository whose answer per image is ragged (issue 12).

    crop     today's ensemble (build.py): one s x s crop per image, a batch of images in, a batch out
    anyres   LLaVA-NeXT tiling: the whole image at s x s, then every s x s tile of its best-fit resolution
    native   smart_resize to a multiple of the factor within a pixel budget, encoded at that size

A Triton ensemble carries a batch of same-shaped results, which neither mode has (the tile count and
the native grid vary per image), so the model clients call (`--name`, default `embed`) is a
python-backend model (backend_models/ragged.py) that preprocesses each image and sends its pixels
to the `encoder` model through BLS: one image's tiles go in batches of up to the encoder's max batch,
and the encoder's dynamic batcher merges what concurrent requests send.

Wire format (one request, N images; max_batch_size 0, so no batch axis):

    image               [N]        TYPE_STRING  encoded bytes (JPEG, PNG, ...)
    <each token output> [sum(count), ...]       anyres: [sum T, S, C]; native: [sum L, C]
    <pooled output>     [sum(count), C]         anyres only: one vector per tile
    count               [N]        TYPE_INT64   rows of the outputs above that belong to image i
                                                (anyres T = 1 + rows * cols; native L = prefix + rows * cols)
    grid                [N, 2]     TYPE_INT64   anyres: the tile grid (rows, cols); native: (h'/p, w'/p)
    error               [N]        TYPE_STRING  "" or why image i failed (its count is 0, its grid (0, 0))

A request whose every image fails is an error response, as in the crop ensemble.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from export import engine as engines
from export.core.errors import OptionError
from export.core.manifest import pooled_output, prefix_tokens
from triton_repo.config import EncoderInterface, TensorSpec, Warmup

if TYPE_CHECKING:
    from triton_repo.build import Artifacts, RepoOptions, RepoResult
    from triton_repo.forms import EncoderForm

CROP, ANYRES, NATIVE = "crop", "anyres", "native"
PREPROCESS_MODES = (CROP, ANYRES, NATIVE)
# The per-image outputs the ragged model adds to the encoder's own.
COUNT_OUTPUT, GRID_OUTPUT, ERROR_OUTPUT = "count", "grid", "error"
MODEL_PY = "ragged.py"  # backend_models/<this>, the model clients call in both ragged modes


@dataclass(frozen=True)
class RaggedPlan:
    """What the ragged model does, resolved from the options and the artifacts (written into its config)."""

    mode: str
    tile_size: int  # s: the checkpoint's native size (anyres tiles, the encoder's input in anyres)
    patch: int
    prefix: int  # tokens before the patches (1: a class token)
    pinpoints: tuple[tuple[int, int], ...] = ()  # anyres: candidate (height, width) resolutions
    factor: int = 0  # native: h', w' are multiples of this
    min_pixels: int = 0
    max_pixels: int = 0

    @property
    def max_tiles(self) -> int:
        """Tiles (besides the whole image) of the largest candidate grid."""
        return max((h // self.tile_size) * (w // self.tile_size) for h, w in self.pinpoints)

    def parameters(self) -> dict[str, object]:
        return {"mode": self.mode, "tile_size": self.tile_size, "patch": self.patch,
                "pinpoints": json.dumps([list(p) for p in self.pinpoints]),
                "factor": self.factor, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels}


def parse_pinpoints(values: list[str] | str) -> list[tuple[int, int]]:
    """`448x896 896x448` or `(448,896),(896,448)` -> [(448, 896), (896, 448)] ((height, width) pairs)."""
    text = " ".join(values) if isinstance(values, list) else values
    for ch in "()[],":
        text = text.replace(ch, " " if ch != "," else ",")
    tokens = [t for t in text.replace(",", " ").split() if t]
    pairs: list[tuple[int, int]] = []
    try:
        if all("x" in t.lower() for t in tokens):
            pairs = [(int(a), int(b)) for a, b in (t.lower().split("x") for t in tokens)]
        elif len(tokens) % 2 == 0:
            numbers = [int(t) for t in tokens]
            pairs = list(zip(numbers[0::2], numbers[1::2]))
        else:
            raise ValueError
    except ValueError:
        raise OptionError(f"--grid-pinpoints {text!r} is not a list of resolutions; write height x width pairs, "
                          "e.g. --grid-pinpoints 448x896 896x448 896x896") from None
    return pairs


def check_pinpoints(pinpoints, tile: int) -> tuple[tuple[int, int], ...]:
    """Every candidate a positive multiple of the tile size s in both sides (LLaVA-NeXT cuts s x s tiles)."""
    pairs = tuple((int(h), int(w)) for h, w in pinpoints)
    if not pairs:
        raise OptionError(f"--grid-pinpoints is empty; give at least one resolution, e.g. {tile}x{2 * tile}")
    bad = [f"{h}x{w}" for h, w in pairs if h <= 0 or w <= 0 or h % tile or w % tile]
    if bad:
        raise OptionError(f"--grid-pinpoints {', '.join(bad)}: every resolution must be a positive multiple of the "
                          f"tile size {tile} (the checkpoint's native size) in both sides, e.g. {tile}x{2 * tile}")
    return pairs


def native_size(art: Artifacts) -> int:
    """s, the checkpoint's native (square) size: the tile size of anyres."""
    h, w = art.manifest["model"].get("native_image_size") or art.manifest["options"].get("image_size")
    if h != w:
        raise OptionError(f"--preprocess anyres cuts square tiles, but the checkpoint's native size is {h}x{w}; "
                          "use --preprocess crop or native")
    return int(h)


def plan(opts: RepoOptions, art: Artifacts) -> RaggedPlan:
    """The mode's parameters, or OptionError for what cannot work with these artifacts."""
    from export.core import preprocessing as pre

    mode = opts.preprocess
    if mode not in (ANYRES, NATIVE):
        raise OptionError(f"--preprocess {mode} is unknown; choose one of {', '.join(PREPROCESS_MODES)}")
    if opts.normalize:
        raise OptionError(f"--normalize applies to the crop ensemble; with --preprocess {mode} normalize the "
                          "pooled rows on the client, or drop --normalize")
    patch = int(art.manifest["model"]["patch_size"])
    dynamic = bool(art.manifest["interface"].get("dynamic_resolution"))
    s = native_size(art) if mode == ANYRES else int(art.manifest["model"]["native_image_size"][0])
    prefix = prefix_tokens(art.manifest)
    if mode == ANYRES:
        shape = art.manifest["interface"]["inputs"]
        (_, info), = shape.items()
        h, w = info["shape"][2:]
        if not dynamic and (h, w) != (s, s):
            raise OptionError(f"--preprocess anyres encodes {s}x{s} tiles (the checkpoint's native size), but "
                              f"{art.folder} was exported at {h}x{w}; re-export without --image-size (or with "
                              f"--image-size {s} {s}, or --dynamic-resolution)")
        crop = art.preprocessor.output_size
        if crop is not None and crop != (s, s):
            raise OptionError(f"--preprocess anyres: the preprocessor config crops {crop[0]}x{crop[1]} but the "
                              f"checkpoint's native size is {s}x{s}; fix preprocessor_config.json")
        pinpoints = check_pinpoints(opts.grid_pinpoints if opts.grid_pinpoints is not None
                                    else pre.default_grid_pinpoints(s), s)
        return RaggedPlan(mode, s, patch, prefix, pinpoints=pinpoints)
    if not dynamic:
        raise OptionError(f"--preprocess native encodes every image at its own size, but {art.folder} was exported "
                          "at one resolution; re-export it with `python -m export.build_engine --dynamic-resolution` "
                          "(RoPE families: MLCD, RICE), or use --preprocess crop|anyres")
    budget = engines.native_budget(patch, opts.resize_factor, opts.native_min_pixels, opts.native_max_pixels)
    return RaggedPlan(mode, s, patch, prefix, **budget)


def native_pixels(processor, image, patch: int, max_pixels: int | None = None, min_pixels: int | None = None,
                  factor: int | None = None) -> np.ndarray:
    """One PIL image -> (1, 3, h', w') float32 as `--preprocess native` serves it, for offline tools (the ledger,
    scripts/visualize_features.py). processor: the checkpoint's image processor (its rescale and mean/std);
    None: preprocessing's defaults (LLaVA-OneVision-1.5's budget, a factor of twice the patch size)."""
    from export.core import preprocessing as pre

    cfg = pre.ClipPreprocessing.from_dict(processor.to_dict())
    budget = engines.native_budget(patch, factor, min_pixels, max_pixels)
    try:
        return pre.native_pixel_values(image, cfg, budget["factor"], budget["min_pixels"],
                                       budget["max_pixels"])[None]  # (1, 3, h', w')
    except ValueError as exc:
        raise OptionError(f"native preprocessing: {exc}") from None


def encoder_interface(art: Artifacts, spec: EncoderForm, rp: RaggedPlan) -> EncoderInterface:
    """The encoder's tensors: anyres as the crop ensemble's (s x s); native with any height and width."""
    from triton_repo.build import encoder_interface as crop_interface

    if rp.mode == ANYRES and art.preprocessor.output_size is not None \
            and not art.manifest["interface"].get("dynamic_resolution"):
        return crop_interface(art, spec)
    iface = art.manifest["interface"]
    (input_name, _), = iface["inputs"].items()
    fixed = rp.mode == ANYRES
    sequence = (rp.tile_size // rp.patch) ** 2 + rp.prefix if fixed else -1
    dims = (3, rp.tile_size, rp.tile_size) if fixed else (3, -1, -1)
    outputs = tuple(TensorSpec(name, tuple(d if isinstance(d, int) else (sequence if d == "sequence" else -1)
                                           for d in out["shape"][1:]))
                    for name, out in iface["outputs"].items())
    return EncoderInterface(TensorSpec(input_name, dims), outputs, (rp.tile_size, rp.tile_size))


def engine_profiles(rp: RaggedPlan, input_name: str, max_batch: int) -> list[dict]:
    """The optimization profiles an engine needs to serve this mode: native, one per aspect band over the pixel
    budget (one image per BLS call); anyres, s x s tiles in batches up to max_batch (an image's tiles are sent in
    chunks of the encoder's max batch)."""
    if rp.mode == NATIVE:
        return engines.native_profiles(input_name, rp.factor, rp.min_pixels, rp.max_pixels)
    lo, opt, hi = engines.batch_profile(max_batch)
    return [{input_name: {"min": [lo, 3, rp.tile_size, rp.tile_size], "opt": [min(opt, 1 + rp.max_tiles), 3,
                                                                             rp.tile_size, rp.tile_size],
                          "max": [hi, 3, rp.tile_size, rp.tile_size]}}]


def check_engine_profile(art: Artifacts, spec: EncoderForm, rp: RaggedPlan, input_name: str) -> None:
    """An engine form serves the mode only if its optimization profiles hold every shape the mode sends."""
    if not spec.needs_engine:
        return
    profiles = art.engine.get("profiles") or {}
    candidates = [p[input_name] for p in (profiles if isinstance(profiles, list) else [profiles]) if input_name in p]
    if rp.mode == ANYRES:
        needed = [(1, 3, rp.tile_size, rp.tile_size)]
        hint = f"export.engine.anyres_profile({input_name!r}, {rp.tile_size}, {rp.max_tiles})"
    else:
        lo, hi = engines.native_side_range(rp.factor, rp.min_pixels, rp.max_pixels)
        needed = [(1, 3, lo, lo), (1, 3, lo, hi), (1, 3, hi, lo)]
        hint = (f"export.engine.native_profiles({input_name!r}, {rp.factor}, {rp.min_pixels}, {rp.max_pixels}) "
                f"(sides {lo}..{hi})")
    missing = [s for s in needed if not any(engines.profile_covers(p, s) for p in candidates)]
    if missing:
        raise OptionError(f"--preprocess {rp.mode}: the engine's optimization profiles ({candidates or 'none'}) do "
                          f"not hold input shapes {missing}; rebuild model.plan with the profiles of {hint}, or "
                          "serve model.onnx with --backend onnxruntime|python")


def build_ragged(opts: RepoOptions, log: Callable[[str], None]) -> RepoResult:
    """The anyres / native repository: `encoder` (as in the crop ensemble) + the ragged model `opts.name`."""
    from export.core import preprocessing as pre
    from export.core.folder import staged_output
    from triton_repo import build as b, config as tc

    name = tc.validate_model_name(opts.name)
    if name in (b.ENCODER, b.PREPROCESS, b.NORMALIZE):
        raise OptionError(f"--name {name} is taken by the {name} step; choose another name (e.g. embed)")
    if opts.instances < 1:
        raise OptionError(f"--instances {opts.instances} must be at least 1")
    art = b.read_artifacts(opts.artifacts)
    rp = plan(opts, art)
    spec = b.resolve_form(opts.backend, art)
    max_batch = b.resolve_max_batch(opts.max_batch, spec, art)
    iface = encoder_interface(art, spec, rp)
    check_engine_profile(art, spec, rp, iface.input.name)
    tc.model_config_pb2()  # fail before any work when the serve extra is missing

    jpeg = b.sample_jpeg()
    if rp.mode == ANYRES:
        tiles, _ = pre.anyres_pixel_values_from_bytes(jpeg, art.preprocessor, list(rp.pinpoints), rp.tile_size)
        pixels = tiles[0]  # (3, s, s): the whole image
    else:
        pixels = pre.native_pixel_values_from_bytes(jpeg, art.preprocessor, rp.factor, rp.min_pixels, rp.max_pixels)
    pooled = pooled_output(art.manifest)
    served = tuple(o for o in iface.outputs if rp.mode == ANYRES or o.name != pooled)
    result = b.RepoResult(Path(opts.out), spec.name, max_batch)
    with staged_output(Path(opts.out), opts.force) as stage:
        enc = stage / b.ENCODER
        for i, filename in enumerate(spec.model_files):
            if i == 0 or (art.folder / filename).is_file():
                b._link_or_copy(art.folder / filename, enc / "1" / filename)
        if spec.model_py:
            b._copy(b.HERE / "backend_models" / spec.model_py, enc / "1" / "model.py")
        params = spec.parameters(opts) if spec.parameters else None
        b._write(enc / "warmup" / iface.input.name, pixels.astype("<f4").tobytes())
        enc_cfg = tc.encoder_config(
            spec, iface, name=b.ENCODER, max_batch=max_batch, instances=opts.instances, parameters=params,
            warmup=Warmup("sample_photo", 1, {iface.input.name: ("TYPE_FP32", tuple(pixels.shape), iface.input.name)}),
            profiles=b.profile_count(art.engine.get("profiles")),
            # two same-sized native images merged into a batch of 2 fit no native profile (one image each)
            dynamic_batching=not (spec.needs_engine and rp.mode == NATIVE))
        result.models[b.ENCODER] = tc.write_config(enc_cfg, enc)

        model = stage / name
        b._copy(b.HERE / "backend_models" / MODEL_PY, model / "1" / "model.py")
        b._copy(b.PREPROCESSING_PY, model / "1" / "preprocessing.py")
        b._copy(art.folder / b.PREPROCESSOR_CONFIG, model / "1" / b.PREPROCESSOR_CONFIG)
        # No warm-up here: BLS cannot reach the encoder before every model has loaded.
        cfg = tc.ragged_config(name=name, instances=opts.instances, outputs=ragged_outputs(served, rp),
                               parameters={**rp.parameters(), "encoder": b.ENCODER, "encoder_input": iface.input.name,
                                           "encoder_max_batch": max_batch, "decode_max_pixels": opts.max_pixels,
                                           "outputs": ",".join(o.name for o in served)})
        result.models[name] = tc.write_config(cfg, model)

        for m, path in result.models.items():
            tc.parse_config(path)
            result.models[m] = Path(opts.out) / m / tc.CONFIG_NAME
        (stage / "README.md").write_text(ragged_readme(name, spec, rp, served, max_batch, art, Path(opts.out)))
        info = {"ensemble": name, "encoder": b.ENCODER, "preprocess": rp.mode, "backend": spec.name,
                "max_batch": max_batch, "image_size": [rp.tile_size, rp.tile_size],
                "outputs": [o.name for o in served] + [COUNT_OUTPUT, GRID_OUTPUT, ERROR_OUTPUT],
                "pooled_output": pooled if rp.mode == ANYRES else None, "normalized": False,
                "artifacts": str(Path(opts.artifacts).resolve()), "model": art.manifest.get("model", {}),
                "ragged": {**rp.parameters(), "pinpoints": [list(p) for p in rp.pinpoints]},
                # what a TensorRT engine for this mode needs (export.engine.build_engine takes the list as is)
                "engine_profiles": engine_profiles(rp, iface.input.name, max_batch)}
        (stage / b.REPO_INFO).write_text(json.dumps(info, indent=2) + "\n")
    log(f"wrote {opts.out}/ ({name} = {rp.mode} preprocessing -> BLS -> {b.ENCODER} [{spec.name}], "
        f"encoder max batch {max_batch})")
    return result


def ragged_outputs(served: tuple[TensorSpec, ...], rp: RaggedPlan) -> tuple[TensorSpec, ...]:
    """The ragged model's outputs: each encoder output with its image axis folded into a row axis (-1);
    anyres token outputs have the tile's sequence length, known here even where the encoder says -1."""
    sequence = (rp.tile_size // rp.patch) ** 2 + rp.prefix
    rows = tuple(TensorSpec(o.name, (-1, *o.dims[1:]) if rp.mode == NATIVE
                            else (-1, *((sequence if i == 0 and len(o.dims) == 2 and d == -1 else d)
                                        for i, d in enumerate(o.dims))))
                 for o in served)
    return rows + (TensorSpec(COUNT_OUTPUT, (-1,), "TYPE_INT64"), TensorSpec(GRID_OUTPUT, (-1, 2), "TYPE_INT64"),
                   TensorSpec(ERROR_OUTPUT, (-1,), "TYPE_STRING"))


def ragged_readme(name: str, spec: EncoderForm, rp: RaggedPlan, served: tuple[TensorSpec, ...], max_batch: int,
                  art: Artifacts, repo: Path) -> str:
    s, p = rp.tile_size, rp.patch
    width = next((o.dims[-1] for o in served), "?")
    rows = ragged_outputs(served, rp)[:len(served)]
    if rp.mode == ANYRES:
        what = (f"LLaVA-NeXT AnyRes: the best fit of {', '.join(f'{h}x{w}' for h, w in rp.pinpoints)} (height x "
                f"width), the image resized and padded into it and cut into {s}x{s} tiles; the whole image "
                f"resized to {s}x{s} comes first (T = 1 + rows * cols rows per image)")
        shapes = "\n".join(f"| `{o.name}` | {list(o.dims)} (sum of T over the images) |" for o in rows)
        grid = "the tile grid (rows, cols) of the chosen resolution, for LLaVA-NeXT's unpad and merge"
    else:
        what = (f"native resolution: smart_resize(h, w, factor={rp.factor}, min_pixels={rp.min_pixels}, "
                f"max_pixels={rp.max_pixels}), encoded at that size (L = {rp.prefix} + h'/{p} * w'/{p} rows per "
                "image)")
        shapes = "\n".join(f"| `{o.name}` | {list(o.dims)} (sum of L over the images) |" for o in rows)
        grid = f"the patch grid (h'/{p}, w'/{p})"
    return f"""# Triton model repository: `{name}` (--preprocess {rp.mode})

Generated by `python -m triton_repo.build --preprocess {rp.mode}` from `{art.folder}`.

| model | what | backend |
|---|---|---|
| `{name}` | `image` [N] (encoded bytes) -> {rp.mode} preprocessing -> BLS calls to `encoder` | python |
| `encoder` | `pixel_values` -> encoder outputs (max batch {max_batch}, dynamic batching) | {spec.name} |

Preprocessing: {what}.

## Outputs of `{name}` (one request, N images; no batch axis)

| output | shape |
|---|---|
| `image` (input) | [N] BYTES |
{shapes}
| `{COUNT_OUTPUT}` | [N] INT64: rows of the outputs above that belong to each image (0 for a failed image) |
| `{GRID_OUTPUT}` | [N, 2] INT64: {grid}; (0, 0) for a failed image |
| `{ERROR_OUTPUT}` | [N] BYTES: "" or why that image failed |

Split with `np.split(rows, np.cumsum(count)[:-1])`. One bad image fails only its own entry; a request whose
every image fails is an error response.

## Serve

```bash
python -m triton_repo.serve {repo} --http-port 8000 --grpc-port 8001 --metrics-port 8002
```

## Client

```python
import numpy as np
import tritonclient.http as httpclient

client = httpclient.InferenceServerClient("127.0.0.1:8000")
images = [open(p, "rb").read() for p in ("a.jpg", "b.png")]
inp = httpclient.InferInput("image", [len(images)], "BYTES")
inp.set_data_from_numpy(np.array(images, dtype=np.object_))
result = client.infer("{name}", [inp])
count, grid = result.as_numpy("{COUNT_OUTPUT}"), result.as_numpy("{GRID_OUTPUT}")
per_image = np.split(result.as_numpy("{served[0].name if served else 'last_hidden_state'}"), np.cumsum(count)[:-1])
# per_image[i]: rows of image i, width {width}
```
"""
