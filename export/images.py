"""Real photographs for parity and calibration, and the model's own preprocessing of them."""

from __future__ import annotations

from pathlib import Path

from .errors import OptionError

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
