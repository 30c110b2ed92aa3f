"""--projector parity at the language model's input: the exported graph plus AnyRes packing against the VLM's own
`get_image_features`, row by row, on photos of several aspect ratios.

The reference side (PyTorch, run where the checkpoint is loaded: the torch child) is transformers' processor and
`get_image_features` (pixel_values + image_sizes -> the packed rows). The deployed side runs the processor's
views through model.onnx and packs them with export.core.packing, the code the server runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from export.core.interface import IMAGE_EMBEDS, INPUT_NAME
from export.core.metrics import Check, compare, thresholds_for
from export.core.packing import anyres_max_tiles, pack_image
from export.core.preprocessing import select_best_resolution

PACKED = f"{IMAGE_EMBEDS} (packed)"  # the checklist's name for the packed rows


@dataclass
class PackedReference:
    """One photo: the VLM processor's views and transformers' packed rows for them."""

    name: str
    image_size: tuple[int, int]  # (height, width)
    grid: tuple[int, int]  # (rows, cols) of tiles
    pixels: np.ndarray  # (V, 3, s, s): the whole image, then the tiles
    rows: np.ndarray  # (R, H_llm): get_image_features' packed rows


def aspect_photos() -> list[tuple[str, object]]:
    """Real photographs, square, wide and tall (the unpadding differs for each)."""
    from PIL import Image

    from export.core.images import sample_photos

    astronaut, coffee, chelsea = sample_photos(3)
    return [("astronaut 512x512", astronaut), (f"coffee {coffee.height}x{coffee.width}", coffee),
            (f"chelsea-tall {chelsea.width}x{chelsea.height}", chelsea.transpose(Image.Transpose.ROTATE_90))]


def grid_for(image_size: tuple[int, int], pinpoints, tile: int) -> tuple[int, int]:
    """(rows, cols) of tiles AnyRes cuts an image of image_size (height, width) into."""
    best_h, best_w = select_best_resolution(image_size[0], image_size[1], pinpoints)
    return best_h // tile, best_w // tile


def packed_references(checkpoint, images=None) -> list[PackedReference]:
    """transformers' get_image_features on each photo (PyTorch; needs the loaded --projector checkpoint)."""
    from export.models.vlm import image_processor, reference_vlm, vlm_image_features

    settings = checkpoint.vlm
    vlm = reference_vlm(checkpoint.model, checkpoint.image_newline)
    processor = image_processor(checkpoint.folder)
    cases = []
    for name, image in images or aspect_photos():
        batch = processor(images=[image], return_tensors="np")
        rows = vlm_image_features(vlm, batch, settings.vision_aspect_ratio)[0]
        size = (int(batch["image_sizes"][0][0]), int(batch["image_sizes"][0][1]))
        grid = grid_for(size, settings.image_grid_pinpoints, settings.tile_size)
        views = 1 + grid[0] * grid[1]
        cases.append(PackedReference(name, size, grid, np.asarray(batch["pixel_values"][0][:views], np.float32), rows))
    return cases


def packed_parity(references: list[PackedReference], runner, newline, vision_aspect_ratio: str | None,
                  precision: str, tolerances: dict) -> tuple[list[Check], list[str]]:
    """The checks (the row count, then the family's thresholds for image_embeds on the packed rows) and notes.
    runner: an active runner of the graph (image_embeds for pixel_values); newline: image_newline or None."""
    checks, notes = [], []
    max_tiles = anyres_max_tiles(vision_aspect_ratio)
    for ref in references:
        embeds = runner.infer({INPUT_NAME: ref.pixels})[IMAGE_EMBEDS]  # (V, S', H_llm)
        rows = pack_image(embeds, ref.image_size, ref.grid, newline, max_tiles)  # (R, H_llm)
        case = f"{ref.name} ({ref.grid[0]}x{ref.grid[1]} tiles)"
        if rows.shape != ref.rows.shape:
            notes.append(f"{case}: {rows.shape[0]} packed rows, transformers has {ref.rows.shape[0]}")
            checks.append(Check(case, PACKED, "min_cosine", 0.0, thresholds_for(tolerances, precision,
                                                                                IMAGE_EMBEDS).get("min_cosine", 1.0)))
            continue
        measured = compare(ref.rows, rows)
        for metric, threshold in thresholds_for(tolerances, precision, IMAGE_EMBEDS).items():
            checks.append(Check(case, PACKED, metric, measured[metric], threshold))
    return checks, notes
