"""Calibration images -> pixel_values batches, with a progress bar over calibration batches."""

from __future__ import annotations

from pathlib import Path

from ..images import load_image_folder, pixel_values

# scikit-image photographs used for calibration when no folder is given. Disjoint from the
# parity photos (images.SKIMAGE_PHOTOS[:3]) so that parity is judged on images calibration never saw.
SKIMAGE_CALIBRATION = ("rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel",
                       "camera", "coins", "brick", "grass", "gravel", "moon", "page", "text", "clock")
MAX_IMAGES = 512


def calibration_images(folder: Path | None, log=print) -> tuple[list, str]:
    """(RGB PIL images, description). With no folder: scikit-image's photographs, and say so."""
    if folder is not None:
        images = load_image_folder(folder, limit=MAX_IMAGES)
        return images, f"{len(images)} images from {folder}"
    import skimage.data
    from PIL import Image, ImageOps

    images = []
    for name in SKIMAGE_CALIBRATION:
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        images += [img, ImageOps.mirror(img)]  # flips double the activation statistics cheaply
    log(f"      calibrating on {len(images)} scikit-image photographs (and flips); "
        "pass --calib-images DIR to use your own data")
    return images, f"{len(images)} scikit-image photographs ({', '.join(SKIMAGE_CALIBRATION)}) and their flips"


def calibration_feeds(processor, images, size: tuple[int, int], input_name: str, batch_size: int = 1):
    """onnxruntime feeds ({input_name: [b, 3, H, W] float32}), one per calibration batch."""
    feeds = []
    for start in range(0, len(images), batch_size):
        x = pixel_values(processor, images[start:start + batch_size], size)
        feeds.append({input_name: x.numpy()})
    return feeds


class FeedReader:
    """onnxruntime.quantization CalibrationDataReader over prepared feeds, with a tqdm bar."""

    def __init__(self, feeds: list[dict], desc: str = "calibrating"):
        from tqdm.auto import tqdm

        self._feeds = iter(feeds)
        self._bar = tqdm(total=len(feeds), desc=f"      {desc}", unit="batch", leave=False)

    def get_next(self):
        feed = next(self._feeds, None)
        if feed is None:
            self._bar.close()
        else:
            self._bar.update(1)
        return feed

    def rewind(self):  # onnxruntime may ask; one pass is all we need
        pass
