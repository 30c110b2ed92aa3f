"""AnyRes packing with numpy only: a VLM's projected tile features -> the rows its language model reads.

Like preprocessing.py, this file is copied next to the served model's model.py and runs inside the Triton
python backend (numpy < 2, no torch, nothing from this project); the project imports the same file, so
what is tested is what is served.

It reproduces transformers' `pack_image_features` (transformers 5.25, models/llava_next/modeling_llava_next.py
and models/llava_onevision/modeling_llava_onevision.py) for one image with more than one view:

    base      the whole image's n x n rows (view 0) come first, as they are
    grid      the tiles' rows laid out as the picture: (rows, n, cols, n) -> a (rows * n) x (cols * n) map
    unpad     the map cropped to the image's aspect ratio (`unpad_image`: the padding the tiling added)
    anyres_max  LLaVA-OneVision only: a map of more than N tiles' worth of cells (by over 10%) is shrunk
              bilinearly (torch's `interpolate(mode="bilinear")`, align_corners False) to about N tiles
    newline   `image_newline` appended at the end of every map row
    rows      the map read row by row: (h * (w + 1), H_llm), after the base rows

A single view (no tiles) is its rows plus one `image_newline` row, as there.
"""

from __future__ import annotations

import math

import numpy as np


class PackingError(ValueError):
    """An image whose features cannot be packed (e.g. so thin that unpadding keeps no row)."""


def unpad(features: np.ndarray, image_size) -> np.ndarray:
    """(C, H, W) -> (C, h, w): transformers' `unpad_image` for an image of image_size (height, width)."""
    original_h, original_w = int(image_size[0]), int(image_size[1])
    current_h, current_w = features.shape[1:]
    if original_w / original_h > current_w / current_h:
        new_h = int(round(original_h * (current_w / original_w), 7))
        padding = (current_h - new_h) // 2
        return features[:, padding:current_h - padding, :]
    new_w = int(round(original_w * (current_h / original_h), 7))
    padding = (current_w - new_w) // 2
    return features[:, :, padding:current_w - padding]


def bilinear_resize(features: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) -> (C, height, width) as torch's interpolate(mode="bilinear", align_corners=False) computes it
    (no antialias: source index (i + 0.5) * in / out - 0.5, clamped at 0, its two neighbours weighted)."""

    def axis(size_in: int, size_out: int):
        src = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5
        src = np.maximum(src, 0.0)
        low = np.floor(src).astype(np.int64)
        high = np.minimum(low + 1, size_in - 1)
        weight = (src - low).astype(np.float32)
        return low, high, weight

    values = features.astype(np.float32, copy=False)
    y0, y1, wy = axis(values.shape[1], height)
    x0, x1, wx = axis(values.shape[2], width)
    top = values[:, y0][:, :, x0] * (1 - wx) + values[:, y0][:, :, x1] * wx  # (C, height, width)
    bottom = values[:, y1][:, :, x0] * (1 - wx) + values[:, y1][:, :, x1] * wx
    return top * (1 - wy)[None, :, None] + bottom * wy[None, :, None]


def anyres_max_resize(features: np.ndarray, tile_tokens: int, max_tiles: int) -> np.ndarray:
    """LLaVA-OneVision's `anyres_max_N`: a (C, h, w) map with more than N tiles of n x n cells (by over 10%)
    shrunk to about N tiles, keeping its aspect ratio."""
    _, height, width = features.shape
    ratio = math.sqrt(height * width / (max_tiles * tile_tokens ** 2))
    if ratio <= 1.1:
        return features
    new_h, new_w = int(height // ratio), int(width // ratio)
    if new_h < 1 or new_w < 1:
        raise PackingError(f"the {height}x{width} feature map shrinks to {new_h}x{new_w} under anyres_max_{max_tiles}")
    return bilinear_resize(features, new_h, new_w)


def pack_image(features: np.ndarray, image_size, grid, newline: np.ndarray | None = None,
               max_tiles: int | None = None) -> np.ndarray:
    """One image's views (V, n * n, H) -> its packed rows (R, H) in float32.

    features: the projected features of the whole image (view 0) then its rows x cols tiles, row-major (the
    order export.core.preprocessing.anyres_pixel_values makes them); image_size: the image's (height, width);
    grid: (rows, cols); newline: image_newline (H,), None for a checkpoint without one; max_tiles: N of
    LLaVA-OneVision's anyres_max_N, None for LLaVA-NeXT.
    """
    views, tokens, hidden = features.shape
    values = features.astype(np.float32, copy=False)
    if views == 1:
        return values[0] if newline is None else np.concatenate([values[0], newline[None].astype(np.float32)])
    n = math.isqrt(tokens)
    rows, cols = int(grid[0]), int(grid[1])
    if n * n != tokens:
        raise PackingError(f"{tokens} rows per view is not a square grid of patches; the class token must be "
                           "dropped (vision_feature_select_strategy 'default') before packing")
    if views - 1 != rows * cols:
        raise PackingError(f"{views - 1} tiles do not fill a {rows}x{cols} grid")
    tiles = values[1:].reshape(rows, cols, n, n, hidden)
    grid_map = tiles.transpose(4, 0, 2, 1, 3).reshape(hidden, rows * n, cols * n)  # (H, rows*n, cols*n)
    grid_map = unpad(grid_map, image_size)
    if grid_map.shape[1] == 0 or grid_map.shape[2] == 0:
        raise PackingError(f"a {image_size[0]}x{image_size[1]} image keeps no row of its {rows}x{cols} tile grid "
                           "after unpadding; pad or crop it closer to the grid's aspect ratio")
    if max_tiles is not None:
        grid_map = anyres_max_resize(grid_map, n, max_tiles)
    if newline is not None:
        column = np.broadcast_to(newline.astype(np.float32)[:, None, None], (hidden, grid_map.shape[1], 1))
        grid_map = np.concatenate([grid_map, column], axis=2)  # (H, h, w + 1)
    packed = grid_map.reshape(hidden, -1).T  # (h * (w + 1), H): the map row by row
    return np.ascontiguousarray(np.concatenate([values[0], packed]))


def anyres_max_tiles(vision_aspect_ratio: str | None) -> int | None:
    """"anyres_max_9" -> 9; None (LLaVA-NeXT) -> None."""
    if not vision_aspect_ratio:
        return None
    prefix = "anyres_max_"
    if not vision_aspect_ratio.startswith(prefix) or not vision_aspect_ratio[len(prefix):].isdigit():
        raise ValueError(f"vision_aspect_ratio {vision_aspect_ratio!r} is not anyres_max_N")
    return int(vision_aspect_ratio[len(prefix):])
