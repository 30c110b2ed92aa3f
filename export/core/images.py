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


# The held-out view set, on which the export's parity and the ledger judge every precision: every photograph
# that ships with scikit-image (the `onnx` extra; no download) and that calibration does not use
# (export.precision.calibration.SKIMAGE_CALIBRATION; a test checks they are disjoint), each in every view of
# VIEWS. Thresholds are judged on the worst view. The views of one photograph are near-duplicates (one
# identity), so retrieval among them has a meaningful answer that a faithful deployment must reproduce
# (export.core.metrics.recall_at_1, nn_agreement). stereo_motorcycle: its left frame; logo: RGBA on white.
HELD_OUT_PHOTOS = ("astronaut", "coffee", "chelsea", "logo", "stereo_motorcycle", "cell", "microaneurysms")
# full; mirrored; a centre crop keeping CROP of each side; a 2:1 and a 1:2 band (other aspect ratios, which
# the processor's centre crop meets differently); the photo at RESCALE of its size (detail lost, then
# upsampled by the processor); a JPEG round trip at JPEG_QUALITY (block artefacts).
VIEWS = ("full", "flip", "crop", "wide", "tall", "rescale", "jpeg")
CROP = 0.7
RESCALE = 0.4
JPEG_QUALITY = 40


@dataclass
class Photo:
    name: str  # "astronaut/crop"
    image: object  # RGB PIL image

    @property
    def identity(self) -> str:
        return identity_of(self.name)


def identity_of(view: str) -> str:
    """The photograph a view shows ("astronaut/jpeg" -> "astronaut"): views of one photo are one identity."""
    return view.split("/")[0]


def held_out_photos(count: int | None = None) -> list[Photo]:
    """The first `count` views (default: all, len(HELD_OUT_PHOTOS) x len(VIEWS)) of the held-out set.

    Round-robin order: view k shows photo k % P in view (k % P + k // P) % V, so every prefix of at least P
    views covers every photograph, and with different kinds of view (a model too large for the whole set
    is judged on a prefix: export.check.parity.default_view_count)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    bases = []
    for name in HELD_OUT_PHOTOS:
        array = getattr(skimage.data, name)()
        if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
            array = array[0]
        if array.ndim == 3 and array.shape[2] == 4:  # RGBA (logo): composite on white
            rgb, alpha = array[..., :3].astype(np.float32), array[..., 3:].astype(np.float32) / 255
            array = (rgb * alpha + 255 * (1 - alpha)).astype(np.uint8)
        bases.append(Image.fromarray(array).convert("RGB"))
    total = len(HELD_OUT_PHOTOS) * len(VIEWS)
    count = total if count is None else min(count, total)
    photos = []
    for k in range(count):
        p = k % len(HELD_OUT_PHOTOS)
        view = VIEWS[(p + k // len(HELD_OUT_PHOTOS)) % len(VIEWS)]
        photos.append(Photo(f"{HELD_OUT_PHOTOS[p]}/{view}", _view(bases[p], view)))
    return photos


def _view(image, view: str):
    import io

    from PIL import Image, ImageOps

    w, h = image.size
    if view == "full":
        return image
    if view == "flip":
        return ImageOps.mirror(image)
    if view == "rescale":
        return image.resize((max(1, round(w * RESCALE)), max(1, round(h * RESCALE))), Image.Resampling.BICUBIC)
    if view == "jpeg":
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    cw, ch = {"crop": (int(w * CROP), int(h * CROP)), "wide": (w, min(h, w // 2)), "tall": (min(w, h // 2), h)}[view]
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch))
