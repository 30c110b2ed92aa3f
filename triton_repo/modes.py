"""`--preprocess anyres|native`: a repository whose answer per image is ragged (issue 12): the modes, what each
resolves to (RaggedPlan) and the tensors it serves; triton_repo/ragged.py writes the repository.

    crop     the ensemble (crop.py): one s x s crop per image, a batch of images in, a batch out
    anyres   LLaVA-NeXT tiling: the whole image at s x s, then every s x s tile of its best-fit resolution
    native   smart_resize to a multiple of the factor within a pixel budget, encoded at that size

A Triton ensemble carries a batch of same-shaped results, which neither mode has (the tile count and
the native grid vary per image), so the model clients call (`--served-model`, default `embed`) is a
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
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from export import engine as engines
from export.core.errors import OptionError
from triton_repo.interface import EncoderInterface, TensorSpec
from triton_repo.resolve import encoder_interface as crop_interface

if TYPE_CHECKING:
    from triton_repo.export_folder import Artifacts
    from triton_repo.forms import EncoderForm
    from triton_repo.options import RepoOptions

CROP, ANYRES, NATIVE = "crop", "anyres", "native"
PREPROCESS_MODES = (CROP, ANYRES, NATIVE)
# The per-image outputs the ragged model adds to the encoder's own.
COUNT_OUTPUT, GRID_OUTPUT, ERROR_OUTPUT = "count", "grid", "error"
# --projector exports in anyres: each image's (height, width), what the VLM unpads with (transformers' image_sizes)
IMAGE_SIZES_OUTPUT = "image_sizes"
EMBEDS_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}  # --embeds-dtype -> the served image_embeds type
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
    # --projector exports: answer the language model's rows (export.core.packing), not the tiles' tokens
    pack: bool = False
    newline: bool = False  # image_newline.npy beside the model, appended to every feature-map row
    anyres_max: int = 0  # LLaVA-OneVision's anyres_max_N (0: none, LLaVA-NeXT)
    embeds_dtype: str = "float32"

    @property
    def max_tiles(self) -> int:
        """Tiles (besides the whole image) of the largest candidate grid."""
        return max((h // self.tile_size) * (w // self.tile_size) for h, w in self.pinpoints)

    def parameters(self) -> dict[str, object]:
        return {"mode": self.mode, "tile_size": self.tile_size, "patch": self.patch,
                "pinpoints": json.dumps([list(p) for p in self.pinpoints]),
                "factor": self.factor, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
                **({"pack": 1, "newline": int(self.newline), "anyres_max": self.anyres_max,
                    "embeds_dtype": self.embeds_dtype} if self.pack else {})}


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
    h, w = art.manifest.native_image_size
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
    check_projector_mode(opts, art)
    if art.manifest.projector:
        return projector_plan(opts, art)
    if opts.normalize:
        raise OptionError(f"--normalize applies to the crop ensemble; with --preprocess {mode} normalize the "
                          "pooled rows on the client, or drop --normalize")
    patch = art.manifest.patch_size
    dynamic = art.manifest.dynamic_resolution
    s = native_size(art) if mode == ANYRES else art.manifest.native_image_size[0]
    prefix = art.manifest.prefix_tokens
    if mode == ANYRES:
        h, w = art.manifest.input_shape[2:]
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


def check_projector_mode(opts: RepoOptions, art: Artifacts) -> None:
    """A --projector export serves the language model's sequence (anyres) only; --embeds-dtype needs one."""
    if art.manifest.projector and opts.preprocess != ANYRES:
        raise OptionError(f"{art.folder} is a --projector export (image_embeds for a language model): serve it with "
                          f"--preprocess anyres, which packs the rows the VLM reads; --preprocess {opts.preprocess} "
                          "serves towers (re-export without --projector for that)")
    if opts.embeds_dtype not in EMBEDS_DTYPES:
        raise OptionError(f"--embeds-dtype {opts.embeds_dtype} is unknown; choose one of {', '.join(EMBEDS_DTYPES)}")
    if opts.embeds_dtype != "float32" and not art.manifest.projector:
        raise OptionError(f"--embeds-dtype {opts.embeds_dtype} applies to --projector exports (image_embeds); "
                          f"{art.folder} is a tower export")


def projector_plan(opts: RepoOptions, art: Artifacts) -> RaggedPlan:
    """anyres for a --projector export: the checkpoint's own grid, packed as its language model reads it."""
    from export.core.packing import anyres_max_tiles

    vlm = art.manifest.vlm
    s = int(vlm["tile_size"])
    pinpoints = check_pinpoints(vlm["image_grid_pinpoints"], s)
    if opts.grid_pinpoints is not None and tuple(opts.grid_pinpoints) != pinpoints:
        raise OptionError("--grid-pinpoints: a --projector export is packed with its checkpoint's "
                          f"image_grid_pinpoints ({', '.join(f'{h}x{w}' for h, w in pinpoints)}), which the language "
                          "model was trained on; drop --grid-pinpoints")
    if opts.normalize:
        raise OptionError("--normalize: image_embeds go to a language model as they are; drop --normalize")
    h, w = art.manifest.input_shape[2:]
    if not art.manifest.dynamic_resolution and (h, w) != (s, s):
        raise OptionError(f"--preprocess anyres encodes {s}x{s} views, but {art.folder} was exported at {h}x{w}; "
                          "re-export without --image-size")
    anyres_max = anyres_max_tiles(vlm.get("vision_aspect_ratio")) or 0
    return RaggedPlan(ANYRES, s, int(vlm["patch_size"]), 0, pinpoints=pinpoints, pack=True,
                      newline=bool(vlm.get("image_newline")), anyres_max=anyres_max, embeds_dtype=opts.embeds_dtype)


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
    if rp.mode == ANYRES and art.preprocessor.output_size is not None \
            and not art.manifest.dynamic_resolution and not rp.pack:
        return crop_interface(art, spec)
    fixed = rp.mode == ANYRES
    sequence = (rp.tile_size // rp.patch) ** 2 + rp.prefix if fixed else -1
    dims = (3, rp.tile_size, rp.tile_size) if fixed else (3, -1, -1)
    outputs = tuple(TensorSpec(name, tuple(d if isinstance(d, int) else (sequence if d == "sequence" else -1)
                                           for d in shape[1:]))
                    for name, shape in art.manifest.output_shapes.items())
    return EncoderInterface(TensorSpec(art.manifest.input_name, dims), outputs, (rp.tile_size, rp.tile_size))


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
    profiles = art.engine.profiles or {}
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


def largest_request(rp: RaggedPlan, max_batch: int) -> tuple[int, int, int, int]:
    """The encoder input holding the most tokens the mode sends: native, one image of the largest square grid
    within the budget; anyres, a batch of the whole image and its tiles (up to max_batch per call)."""
    if rp.mode == ANYRES:
        return (min(max_batch, 1 + rp.max_tiles), 3, rp.tile_size, rp.tile_size)
    side = max(rp.factor, int(np.sqrt(rp.max_pixels)) // rp.factor * rp.factor)
    return (1, 3, side, side)


def check_served_memory(art: Artifacts, spec: EncoderForm, rp: RaggedPlan, input_name: str, max_batch: int,
                        instances: int) -> None:
    """A form that runs model.onnx in onnxruntime (onnxruntime, python) must hold the mode's largest request on
    this machine, once per instance: refused with the estimate otherwise (export.graph.footprint). Engines
    allocate their profiles' largest shapes when they load, which their own build checks."""
    from export.core.folder import ONNX_NAME
    from export.graph.footprint import GIB, check_fits, estimate_peak

    if spec.needs_engine:
        return
    shape = largest_request(rp, max_batch)
    one = estimate_peak(art.folder / ONNX_NAME, {input_name: shape})
    estimate = replace(one, weights=one.weights * instances, activations=one.activations * instances)
    budget = (f"--native-max-pixels {rp.max_pixels}" if rp.mode == NATIVE
              else f"the largest grid ({rp.max_tiles} tiles) at encoder max batch {max_batch}")
    check_fits(estimate, what=f"--preprocess {rp.mode} with {budget}: the request {list(shape)} in {instances} "
                              f"{spec.name} instance(s)",
               change=("lower --native-max-pixels" if rp.mode == NATIVE else "lower --max-batch or the pinpoints")
               + (" or --instances" if instances > 1 else "")
               + ("" if art.manifest.attention_lowering == "mha"
                  else f", or re-export with --attention mha (the scores alone hold {one.largest[2] / GIB:.1f} GiB)"))


def ragged_outputs(served: tuple[TensorSpec, ...], rp: RaggedPlan) -> tuple[TensorSpec, ...]:
    """The ragged model's outputs: each encoder output with its image axis folded into a row axis (-1);
    anyres token outputs have the tile's sequence length, known here even where the encoder says -1."""
    if rp.pack:  # one row per language-model position: [sum of rows, H_llm]
        (embeds,) = served
        return (TensorSpec(embeds.name, (-1, embeds.dims[-1]), EMBEDS_DTYPES[rp.embeds_dtype]),
                TensorSpec(COUNT_OUTPUT, (-1,), "TYPE_INT64"), TensorSpec(GRID_OUTPUT, (-1, 2), "TYPE_INT64"),
                TensorSpec(IMAGE_SIZES_OUTPUT, (-1, 2), "TYPE_INT64"), TensorSpec(ERROR_OUTPUT, (-1,), "TYPE_STRING"))
    sequence = (rp.tile_size // rp.patch) ** 2 + rp.prefix
    rows = tuple(TensorSpec(o.name, (-1, *o.dims[1:]) if rp.mode == NATIVE
                            else (-1, *((sequence if i == 0 and len(o.dims) == 2 and d == -1 else d)
                                        for i, d in enumerate(o.dims))))
                 for o in served)
    return rows + (TensorSpec(COUNT_OUTPUT, (-1,), "TYPE_INT64"), TensorSpec(GRID_OUTPUT, (-1, 2), "TYPE_INT64"),
                   TensorSpec(ERROR_OUTPUT, (-1,), "TYPE_STRING"))
