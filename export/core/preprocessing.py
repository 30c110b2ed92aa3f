"""CLIP image preprocessing with PIL and numpy only: encoded bytes -> pixel_values [3, H, W] float32.

This file is copied next to the `preprocess` model's model.py and runs inside the Triton python
backend, whose environment is small (numpy < 2, pillow, onnxruntime): it must not import
transformers, torch or anything from this project. The project side imports the same file for the
parity tests, so what is tested is what is served.

It reproduces transformers' `CLIPImageProcessorPil` (transformers 5.24,
`image_processing_backends.PilBackend._preprocess` and `image_transforms.py`) step by step:

    convert_to_rgb   alpha (RGBA, LA, P with transparency) composited onto white, else .convert("RGB")
                     (gray, CMYK, ...); EXIF orientation is NOT applied, as transformers does not
    resize           shortest edge -> size["shortest_edge"], long edge int(size * long / short),
                     PIL resize with the configured resample (3 = bicubic), on uint8
    center_crop      top = (H - h) // 2, left = (W - w) // 2; zero padding if the image is smaller
    rescale          float64 * rescale_factor, then float32
    normalize        ((x.T - mean) / std).T in float32

Two VLM modes reuse those steps, with the checkpoint's mean/std and resample:

    anyres   LLaVA-NeXT's 2x2+1 tiling, `LlavaNextImageProcessorPil` (models/llava_next/
             image_processing_pil_llava_next.py, `get_image_patches`): select_best_resolution among the
             (height, width) pinpoints, resize to fit it keeping the aspect ratio, pad centered with black,
             cut into tile_size tiles row-major; the whole image squashed to s x s comes first; each view
             then goes through the CLIP steps -> (1 + rows * cols, 3, s, s).
    native   Qwen2-VL's native resolution as LLaVA-OneVision-1.5 runs RICE, `Qwen2VLImageProcessorPil`
             (models/qwen2_vl/image_processing_pil_qwen2_vl.py): smart_resize to multiples of factor
             (28 = patch 14 x 2x2 merge) within [min_pixels, max_pixels], resize, rescale, normalize
             -> (3, H', W'), the image before transformers packs it into patches.
"""

from __future__ import annotations

import functools
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CONFIG_NAME = "preprocessor_config.json"
# Decoding more pixels than this is refused before any pixel is decoded (decompression bombs).
# 64 megapixels: an 8000 x 8000 photo passes; PIL's own default warns at 89 M and refuses at 179 M.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
# CLIP's normalization, as export.core.interface states it: this file stands alone in a Triton model folder
# (tests/export/test_triton_preprocessing.py checks that the two agree).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


class ImageDecodeError(ValueError):
    """The bytes are not an image we accept; the message is returned to the client as-is."""


@dataclass(frozen=True)
class ClipPreprocessing:
    """The fields of a CLIPImageProcessor config that decide pixel_values (defaults: transformers')."""

    do_convert_rgb: bool = True
    do_resize: bool = True
    size: dict = field(default_factory=lambda: {"shortest_edge": 224})
    resample: int = 3  # PIL.Image.BICUBIC
    do_center_crop: bool = True
    crop_size: dict = field(default_factory=lambda: {"height": 224, "width": 224})
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = tuple(CLIP_MEAN)
    image_std: tuple = tuple(CLIP_STD)

    @classmethod
    def from_dict(cls, cfg: dict) -> "ClipPreprocessing":
        known = {k: cfg[k] for k in cls.__dataclass_fields__ if cfg.get(k) is not None}
        for key in ("image_mean", "image_std"):
            if key in known:
                value = known[key]
                known[key] = tuple(value) if isinstance(value, (list, tuple)) else (float(value),) * 3
        if isinstance(known.get("size"), int):  # old configs: an int means the shortest edge
            known["size"] = {"shortest_edge": known["size"]}
        if isinstance(known.get("crop_size"), int):
            known["crop_size"] = {"height": known["crop_size"], "width": known["crop_size"]}
        size = known.get("size", {})
        if "longest_edge" in size or not ("shortest_edge" in size or {"height", "width"} <= set(size)):
            raise ValueError(f"unsupported preprocessor size {size}; expected shortest_edge or height/width")
        return cls(**known)

    @classmethod
    def from_file(cls, path: Path | str) -> "ClipPreprocessing":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(H, W) of every output, or None when it depends on the image (no crop, shortest-edge resize)."""
        if self.do_center_crop:
            return int(self.crop_size["height"]), int(self.crop_size["width"])
        if self.do_resize and "height" in self.size:
            return int(self.size["height"]), int(self.size["width"])
        return None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Encoded bytes -> a loaded PIL image, or ImageDecodeError with a message for the client."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageDecodeError("empty image: the request carried 0 bytes")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:  # PIL's own guard (over 2 x MAX_IMAGE_PIXELS) fires at open
        raise ImageDecodeError(f"image has too many pixels: {exc}; downscale it before sending") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}; "
            "downscale it before sending (decompression-bomb guard)"
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes, {image.format}): {exc}") from None
    return image


def convert_to_rgb(image):
    """transformers.image_transforms.convert_to_rgb for PIL images."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_size(height: int, width: int, size: dict) -> tuple[int, int]:
    """Output (H, W): transformers' get_resize_output_image_size(default_to_square=False), or fixed."""
    if "shortest_edge" not in size:
        return int(size["height"]), int(size["width"])
    target = int(size["shortest_edge"])
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = target, int(target * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) -> (C, height, width); zero-pads when the image is smaller (transformers' center_crop)."""
    _, h, w = array.shape
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0 and top + height <= h and left + width <= w:
        return array[:, top:top + height, left:left + width]
    new_h, new_w = max(height, h), max(width, w)
    padded = np.zeros((array.shape[0], new_h, new_w), dtype=array.dtype)  # (C, H', W')
    top_pad, left_pad = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded[:, top_pad:top_pad + h, left_pad:left_pad + w] = array
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return padded[:, top:top + height, left:left + width]


def pixel_values_from_image(image, cfg: ClipPreprocessing) -> np.ndarray:
    """A PIL image -> (3, H, W) float32, as CLIPImageProcessorPil computes it."""
    if cfg.do_convert_rgb:
        image = convert_to_rgb(image)
    return _clip_steps(image, cfg)


def _chw(image) -> np.ndarray:
    """A PIL image -> its uint8 pixels as (C, H, W), as transformers' PilBackend.process_image lays them out."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]  # (H, W, 1)
    return np.ascontiguousarray(np.moveaxis(array, -1, 0))  # (C, H, W)


def _clip_steps(image, cfg: ClipPreprocessing) -> np.ndarray:
    """The CLIP steps after RGB conversion: PIL image -> resize -> center crop -> rescale -> normalize."""
    if cfg.do_resize:
        h, w = resize_size(image.height, image.width, cfg.size)
        image = image.resize((w, h), resample=cfg.resample)
    array = _chw(image)
    if cfg.do_center_crop:
        array = center_crop(array, int(cfg.crop_size["height"]), int(cfg.crop_size["width"]))
    return _rescale_normalize(array, cfg)


def _rescale_normalize(array: np.ndarray, cfg: ClipPreprocessing) -> np.ndarray:
    """(C, H, W) uint8 -> (C, H, W) float32: transformers' rescale (in float64) then normalize (in float32).

    Each output element depends only on its channel and its byte, so uint8 pixels are looked up in a
    (C, 256) table that the same operations computed: bit-identical, 8x faster than on the image."""
    table = _value_table(cfg.do_rescale, cfg.rescale_factor, cfg.do_normalize, tuple(cfg.image_mean),
                         tuple(cfg.image_std), array.shape[0]) if array.dtype == np.uint8 else None
    if table is None or table.shape[0] != array.shape[0]:  # e.g. one channel against three means
        return _rescale_normalize_values(array, cfg)
    return np.stack([np.take(table[c, 0], array[c]) for c in range(array.shape[0])])  # (C, H, W)


@functools.lru_cache(maxsize=16)
def _value_table(do_rescale, rescale_factor, do_normalize, image_mean, image_std, channels) -> np.ndarray:
    """(C', 1, 256) float32: every byte value of every channel through `_rescale_normalize_values`."""
    cfg = ClipPreprocessing(do_rescale=do_rescale, rescale_factor=rescale_factor, do_normalize=do_normalize,
                            image_mean=image_mean, image_std=image_std)
    values = np.broadcast_to(np.arange(256, dtype=np.uint8), (channels, 1, 256))  # (C, 1, 256): an "image"
    return _rescale_normalize_values(values, cfg)


def _rescale_normalize_values(array: np.ndarray, cfg: ClipPreprocessing) -> np.ndarray:
    """(C, H, W) -> (C, H, W) float32, element by element as transformers computes it."""
    if cfg.do_rescale:
        array = (array.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        array = array.astype(np.float32) if not np.issubdtype(array.dtype, np.floating) else array
        mean = np.asarray(cfg.image_mean, dtype=array.dtype)
        std = np.asarray(cfg.image_std, dtype=array.dtype)
        array = ((array.T - mean) / std).T  # (C, H, W) with per-channel mean/std on the last axis of .T
    return np.ascontiguousarray(array, dtype=np.float32)


def pixel_values_from_bytes(data: bytes, cfg: ClipPreprocessing, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> (3, H, W) float32; ImageDecodeError for anything we do not accept."""
    image = decode_image(data, max_pixels)
    try:
        return pixel_values_from_image(image, cfg)
    except (OSError, ValueError) as exc:  # e.g. a mode PIL cannot convert to RGB
        raise ImageDecodeError(f"cannot convert {image.mode} image to RGB: {exc}") from None


# ---------------------------------------------------------------------------------------------------
# AnyRes (LLaVA-NeXT): the whole image plus a grid of tiles at the checkpoint's native size
# ---------------------------------------------------------------------------------------------------


def default_grid_pinpoints(size: int) -> list[tuple[int, int]]:
    """LLaVA-NeXT's default pinpoints scaled to a native size s: 1x2, 2x1, 2x2, 3x1 and 1x3 tiles.

    Each pinpoint is (height, width), the order transformers uses: `select_best_resolution` unpacks
    `for height, width in possible_resolutions` (image_processing_utils.py) and LlavaNextImageProcessor's
    default `[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]` is this list for s = 336.
    """
    s = int(size)
    if s < 1:
        raise ValueError(f"native size must be a positive number of pixels, got {size}")
    return [(s, 2 * s), (2 * s, s), (2 * s, 2 * s), (3 * s, s), (s, 3 * s)]


def _check_pinpoints(pinpoints) -> list[tuple[int, int]]:
    try:
        checked = [(int(h), int(w)) for h, w in pinpoints]
    except (TypeError, ValueError):
        raise ValueError(f"grid pinpoints must be (height, width) pairs, got {pinpoints!r}") from None
    if not checked or any(h < 1 or w < 1 for h, w in checked):
        raise ValueError(f"grid pinpoints must be a non-empty list of positive (height, width), got {pinpoints!r}")
    return checked


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The pinpoint (height, width) LLaVA-NeXT resizes an image of height x width to before tiling.

    transformers `image_processing_utils.select_best_resolution`: scale the image to fit each pinpoint,
    keep the one with the largest effective resolution (downscaled pixels, capped at the original's),
    ties broken by the least wasted area; the first pinpoint wins a full tie. An image so thin that it
    keeps no pixel anywhere (effective 0 everywhere) gets the first pinpoint, as there.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width} (height x width)")
    best_fit = (0, 0)
    max_effective, min_wasted = 0, float("inf")
    for pin_h, pin_w in _check_pinpoints(pinpoints):
        scale = min(pin_w / width, pin_h / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        wasted = pin_w * pin_h - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (pin_h, pin_w)
    return best_fit  # never (0, 0): the first pinpoint always beats an infinite waste


def _patch_output_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """transformers `image_processing_utils.get_patch_output_size`: fit inside the target, keep the aspect."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def _whole_image_size(cfg: ClipPreprocessing) -> tuple[int, int]:
    """The (H, W) LLaVA-NeXT squashes the whole image to: size height/width, else shortest_edge squared."""
    if cfg.size.get("height") and cfg.size.get("width"):
        return int(cfg.size["height"]), int(cfg.size["width"])
    return int(cfg.size["shortest_edge"]), int(cfg.size["shortest_edge"])


def anyres_pixel_values(image, cfg: ClipPreprocessing, pinpoints, tile_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A PIL image -> ((T, 3, s, s) float32, (rows, cols)): the whole image, then the tiles row-major.

    T = 1 + rows * cols. Exactly LlavaNextImageProcessorPil's pixel_values for one image
    (`get_image_patches` then the per-patch CLIP steps) when `tile_size` is its patch size, i.e. the
    checkpoint's crop_size["height"]. The RGB conversion happens once, on the input, as there.
    """
    from PIL import Image

    if tile_size < 1:
        raise ValueError(f"tile size must be a positive number of pixels, got {tile_size}")
    if cfg.do_convert_rgb:
        image = convert_to_rgb(image)
    best_h, best_w = select_best_resolution(image.height, image.width, pinpoints)
    # resize for patching: fit inside the pinpoint keeping the aspect ratio (uint8, the configured resample)
    new_h, new_w = _patch_output_size(image.height, image.width, best_h, best_w)
    fitted = _chw(image.resize((new_w, new_h), resample=cfg.resample))  # (C, new_h, new_w)
    # pad for patching: centered, black (0 in uint8, not the mean), the odd pixel after (bottom/right)
    top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
    canvas = np.zeros((fitted.shape[0], best_h, best_w), dtype=fitted.dtype)  # (C, best_h, best_w)
    canvas[:, top:top + new_h, left:left + new_w] = fitted
    # divide into tiles row-major; a pinpoint that is not a multiple of the tile leaves partial edge tiles,
    # which the CLIP steps then resize and crop, as transformers' divide_to_patches does
    rows, cols = math.ceil(best_h / tile_size), math.ceil(best_w / tile_size)
    whole_h, whole_w = _whole_image_size(cfg)
    views = [image.resize((whole_w, whole_h), resample=cfg.resample)]  # the whole image, squashed to s x s
    for i in range(rows):
        for j in range(cols):
            tile = canvas[:, i * tile_size:(i + 1) * tile_size, j * tile_size:(j + 1) * tile_size]  # (C, t, t)
            hwc = np.moveaxis(tile, 0, -1)  # (t, t, C)
            views.append(Image.fromarray(hwc[:, :, 0] if hwc.shape[-1] == 1 else np.ascontiguousarray(hwc)))
    return np.stack([_clip_steps(view, cfg) for view in views]), (rows, cols)  # (T, C, s, s)


def anyres_pixel_values_from_bytes(data: bytes, cfg: ClipPreprocessing, pinpoints, tile_size: int,
                                   max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """Encoded image bytes -> anyres_pixel_values(...); ImageDecodeError for anything we do not accept."""
    pixels, grid, _ = anyres_views_from_bytes(data, cfg, pinpoints, tile_size, max_pixels)
    return pixels, grid


def anyres_views_from_bytes(data: bytes, cfg: ClipPreprocessing, pinpoints, tile_size: int,
                            max_pixels: int = DEFAULT_MAX_PIXELS
                            ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """anyres_pixel_values_from_bytes(...) plus the decoded image's (height, width): the `image_sizes` entry a VLM
    unpads with."""
    _check_pinpoints(pinpoints)  # a bad argument is the caller's error, not the image's
    if tile_size < 1:
        raise ValueError(f"tile size must be a positive number of pixels, got {tile_size}")
    image = decode_image(data, max_pixels)
    try:
        pixels, grid = anyres_pixel_values(image, cfg, pinpoints, tile_size)
    except (OSError, ValueError) as exc:  # e.g. a mode PIL cannot convert to RGB
        raise ImageDecodeError(f"cannot convert {image.mode} image to RGB: {exc}") from None
    return pixels, grid, (image.height, image.width)


# ---------------------------------------------------------------------------------------------------
# Native resolution (Qwen2-VL smart_resize, as LLaVA-OneVision-1.5 runs RICE)
# ---------------------------------------------------------------------------------------------------

NATIVE_FACTOR = 28  # patch 14 x a 2x2 merge: both sides of a native-resolution input are multiples of it
# LLaVA-OneVision-1.5's preprocessor_config.json (Qwen2VLImageProcessor, temporal_patch_size 1):
# "min_pixels": 3136, "max_pixels": 3240000 (1800 x 1800); its lmms-eval recipe passes max_pixels=3240000.
# Qwen2-VL's own defaults are 56 * 56 and 28 * 28 * 1280.
NATIVE_MIN_PIXELS = 56 * 56
NATIVE_MAX_PIXELS = 3_240_000
MAX_ASPECT_RATIO = 200  # smart_resize refuses longer / shorter side above this


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's (H', W'): both multiples of factor, H' * W' within [min_pixels, max_pixels], aspect kept.

    transformers `models/qwen2_vl/image_processing_pil_qwen2_vl.py::smart_resize`, the same arithmetic
    (Python's round-half-to-even included) and the same ValueError above an aspect ratio of 200. Unlike
    transformers, a non-positive size or factor is a ValueError here rather than a ZeroDivisionError.
    As there, the bounds are targets, not guarantees: the result is never under factor x factor, so a
    max_pixels below factor**2 is exceeded, and rounding can land slightly outside either bound.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width} (height x width)")
    if factor < 1:
        raise ValueError(f"factor must be a positive number of pixels, got {factor}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
                         f"got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _check_native_args(factor: int, min_pixels: int, max_pixels: int) -> None:
    if factor < 1:
        raise ValueError(f"factor must be a positive number of pixels, got {factor}")
    if min_pixels < 1 or max_pixels < 1:  # Qwen2VLImageProcessorPil.resize refuses a zero or missing bound
        raise ValueError(f"min_pixels and max_pixels must be positive, got {min_pixels} and {max_pixels}")


def native_pixel_values(image, cfg: ClipPreprocessing, factor: int, min_pixels: int, max_pixels: int) -> np.ndarray:
    """A PIL image -> (3, H', W') float32 with (H', W') = smart_resize(H, W, ...): Qwen2VLImageProcessorPil's
    image before its patch packing.

    From cfg: do_convert_rgb, resample (3 = bicubic), rescale and mean/std; its size and crop are not used.
    """
    _check_native_args(factor, min_pixels, max_pixels)
    if cfg.do_convert_rgb:
        image = convert_to_rgb(image)
    h, w = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    array = _chw(image.resize((w, h), resample=cfg.resample))  # (C, H', W') uint8
    return _rescale_normalize(array, cfg)


def native_pixel_values_from_bytes(data: bytes, cfg: ClipPreprocessing, factor: int = NATIVE_FACTOR,
                                   min_pixels: int = NATIVE_MIN_PIXELS, max_pixels: int = NATIVE_MAX_PIXELS,
                                   max_decode_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> native_pixel_values(...); ImageDecodeError for anything we do not accept.

    max_pixels is smart_resize's budget (the output); max_decode_pixels is the decompression-bomb guard
    on the input, the `max_pixels` of pixel_values_from_bytes.
    """
    _check_native_args(factor, min_pixels, max_pixels)  # a bad argument is the caller's error, not the image's
    image = decode_image(data, max_decode_pixels)
    try:
        smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    except ValueError as exc:
        raise ImageDecodeError(f"image is {image.width}x{image.height}: {exc}; crop or pad it before sending") from None
    try:
        return native_pixel_values(image, cfg, factor, min_pixels, max_pixels)
    except (OSError, ValueError) as exc:  # e.g. a mode PIL cannot convert to RGB
        raise ImageDecodeError(f"cannot convert {image.mode} image to RGB: {exc}") from None
