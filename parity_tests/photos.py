"""The ledger's held-out photo set: real photographs calibration never saw, and views of them.

Nearest-neighbour agreement needs structure among the embeddings: several views (flip, crops) of
each photo are near-duplicates, so "which image is closest" has a meaningful answer that a
faithful deployment must reproduce. None of these photographs is in the int8 calibration set
(export.precision.calibration.SKIMAGE_CALIBRATION); a test checks it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Colour photographs bundled with scikit-image (no download) and absent from int8 calibration.
HELD_OUT_PHOTOS = ("astronaut", "coffee", "chelsea", "logo")
VIEWS = ("full", "flip", "crop-tl", "crop-tr", "crop-bl", "crop-br", "crop-center")
CROP = 0.7  # crops keep 70% of each side


@dataclass
class Photo:
    name: str  # "astronaut/crop-tl"
    image: object  # RGB PIL image


def held_out_photos(count: int | None = None) -> list[Photo]:
    """Up to `count` images (default: all 28): every view of every held-out photograph, photo-major."""
    import numpy as np
    import skimage.data
    from PIL import Image, ImageOps

    photos = []
    for name in HELD_OUT_PHOTOS:
        array = getattr(skimage.data, name)()
        if array.ndim == 3 and array.shape[2] == 4:  # RGBA (logo): composite on white
            rgb, alpha = array[..., :3].astype(np.float32), array[..., 3:].astype(np.float32) / 255
            array = (rgb * alpha + 255 * (1 - alpha)).astype(np.uint8)
        base = Image.fromarray(array).convert("RGB")
        for view in VIEWS:
            photos.append(Photo(f"{name}/{view}", _view(base, view, ImageOps)))
    return photos if count is None else photos[:count]


def _view(image, view: str, ImageOps):
    if view == "full":
        return image
    if view == "flip":
        return ImageOps.mirror(image)
    w, h = image.size
    cw, ch = int(w * CROP), int(h * CROP)
    left = {"tl": 0, "bl": 0, "tr": w - cw, "br": w - cw, "center": (w - cw) // 2}[view.split("-")[1]]
    top = {"tl": 0, "tr": 0, "bl": h - ch, "br": h - ch, "center": (h - ch) // 2}[view.split("-")[1]]
    return image.crop((left, top, left + cw, top + ch))
