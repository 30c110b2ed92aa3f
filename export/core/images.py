"""Real photographs for parity and calibration, and the model's own preprocessing of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from export.core.errors import OptionError

# Photographs that ship with scikit-image (no download); parity uses the first ones.
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def sample_photos(count: int = 3, offset: int = 0) -> list:
    """`count` scikit-image photographs as RGB PIL images, starting at `offset`."""
    import skimage.data
    from PIL import Image

    names = SKIMAGE_PHOTOS[offset:offset + count]
    if len(names) < count:
        raise ValueError(f"only {len(SKIMAGE_PHOTOS)} sample photos ship with scikit-image")
    return [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in names]


def load_image_folder(folder: Path, limit: int | None = None) -> list:
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise OptionError(f"image folder {folder} does not exist")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not paths:
        raise OptionError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [Image.open(p).convert("RGB") for p in paths]


def pixel_values(processor, images, size: tuple[int, int] | None = None):
    """[B, 3, H, W] float32 as the checkpoint's CLIPImageProcessor makes it.

    `size` (H, W) other than the processor's own: resize the shortest edge to max(H, W), then
    center-crop H x W (the processor's recipe, at another resolution).
    """
    kwargs = {}
    if size is not None:
        h, w = size
        kwargs = dict(size={"shortest_edge": max(h, w)}, crop_size={"height": h, "width": w})
    return processor(images=images, return_tensors="pt", **kwargs)["pixel_values"].float()


# The ledger's held-out set. Nearest-neighbour agreement needs structure among the embeddings: several
# views (flip, crops) of each photo are near-duplicates, so "which image is closest" has a meaningful
# answer that a faithful deployment must reproduce. None of these photographs is in the int8
# calibration set (export.precision.calibration.SKIMAGE_CALIBRATION); a test checks it.
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
    from PIL import Image

    photos = []
    for name in HELD_OUT_PHOTOS:
        array = getattr(skimage.data, name)()
        if array.ndim == 3 and array.shape[2] == 4:  # RGBA (logo): composite on white
            rgb, alpha = array[..., :3].astype(np.float32), array[..., 3:].astype(np.float32) / 255
            array = (rgb * alpha + 255 * (1 - alpha)).astype(np.uint8)
        base = Image.fromarray(array).convert("RGB")
        photos += [Photo(f"{name}/{view}", _view(base, view)) for view in VIEWS]
    return photos if count is None else photos[:count]


def _view(image, view: str):
    from PIL import ImageOps

    if view == "full":
        return image
    if view == "flip":
        return ImageOps.mirror(image)
    w, h = image.size
    cw, ch = int(w * CROP), int(h * CROP)
    corner = view.split("-")[1]
    left = {"tl": 0, "bl": 0, "tr": w - cw, "br": w - cw, "center": (w - cw) // 2}[corner]
    top = {"tl": 0, "tr": 0, "bl": h - ch, "br": h - ch, "center": (h - ch) // 2}[corner]
    return image.crop((left, top, left + cw, top + ch))
