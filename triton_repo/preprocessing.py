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
"""

from __future__ import annotations

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
_OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


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
    image_mean: tuple = tuple(_OPENAI_CLIP_MEAN)
    image_std: tuple = tuple(_OPENAI_CLIP_STD)

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
    if cfg.do_resize:
        h, w = resize_size(image.height, image.width, cfg.size)
        image = image.resize((w, h), resample=cfg.resample)
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]  # (H, W, 1)
    array = np.ascontiguousarray(np.moveaxis(array, -1, 0))  # (C, H, W)
    if cfg.do_center_crop:
        array = center_crop(array, int(cfg.crop_size["height"]), int(cfg.crop_size["width"]))
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
