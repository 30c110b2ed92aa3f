"""Calibration images -> pixel_values batches, with a progress bar over calibration batches."""

from __future__ import annotations

from pathlib import Path

from export.core.images import load_image_folder, pixel_values

# scikit-image photographs used for calibration when no folder is given. Disjoint from the
# parity photos (images.SKIMAGE_PHOTOS[:3]) so that parity is judged on images calibration never saw.
SKIMAGE_CALIBRATION = ("rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel",
                       "camera", "coins", "brick", "grass", "gravel", "moon", "page", "text", "clock")
MAX_IMAGES = 512
# Calibration images used by default (--calib-count). Each step that calibrates (the fp16 overflow
# scan, int8 smoothing and ranges) runs the model once per image, so the default follows the model's
# cost: as many images as fit in CALIBRATION_BUDGET_TFLOPS, within [MIN_COUNT, DEFAULT_COUNT]. Small
# encoders (MLCD-B/32, L/14-336: <= 0.4 TFLOPs an image) get 16; RICE-L-560 (1.2) and MLCD-bigG
# (4.1) get 8, about a minute and four minutes per pass on 2 CPU cores. (The parity photos are never
# among them.)
DEFAULT_COUNT = 16
MIN_COUNT = 8
CALIBRATION_BUDGET_TFLOPS = 8.0


def default_count(config, size: tuple[int, int]) -> int:
    """The --calib-count default for a model `config` at `size` (H, W)."""
    from export.models.flops import flops_per_image

    tflops = flops_per_image(config, *size)["total"] / 1e12
    return max(MIN_COUNT, min(DEFAULT_COUNT, int(CALIBRATION_BUDGET_TFLOPS / max(tflops, 1e-9))))


def calibration_images(folder: Path | None, count: int = DEFAULT_COUNT, log=print) -> tuple[list, str]:
    """(up to `count` RGB PIL images, description). With no folder: scikit-image's photographs
    (and their mirror images), and say so."""
    if folder is not None:
        images = load_image_folder(folder, limit=min(count, MAX_IMAGES))
        log(f"      calibrating on {len(images)} images from {folder}")
        return images, f"{len(images)} images from {folder}"
    import skimage.data
    from PIL import Image, ImageOps

    images = []
    for name in SKIMAGE_CALIBRATION:
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        images.append(img)
    images += [ImageOps.mirror(img) for img in images]  # flips double the statistics cheaply
    images = images[:count]
    log(f"      calibrating on {len(images)} scikit-image photographs (--calib-count N to change; "
        "--calib-images DIR to use your own data)")
    used = SKIMAGE_CALIBRATION[:min(count, len(SKIMAGE_CALIBRATION))]
    flips = " and flips" if count > len(SKIMAGE_CALIBRATION) else ""
    return images, f"{len(images)} scikit-image photographs ({', '.join(used)}){flips}"


def calibration_feeds(processor, images, size: tuple[int, int], input_name: str, batch_size: int = 1):
    """onnxruntime feeds ({input_name: [b, 3, H, W] float32}), one per calibration batch."""
    feeds = []
    for start in range(0, len(images), batch_size):
        x = pixel_values(processor, images[start:start + batch_size], size)
        feeds.append({input_name: x.numpy()})
    return feeds


class FeedReader:
    """onnxruntime.quantization CalibrationDataReader over prepared feeds, with a tqdm bar.

    set_range/len: onnxruntime's strided calibration (CalibStridedMinMax) hands the calibrator one
    slice at a time, so a histogram calibrator holds one batch of activations, not all of them."""

    def __init__(self, feeds: list[dict], desc: str = "calibrating"):
        from tqdm.auto import tqdm

        self._all = feeds
        self._feeds = iter(feeds)
        self._bar = tqdm(total=len(feeds), desc=f"      {desc}", unit="batch", leave=False)

    def __len__(self) -> int:
        return len(self._all)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._feeds = iter(self._all[start_index:end_index])

    def get_next(self):
        feed = next(self._feeds, None)
        if feed is not None:
            self._bar.update(1)
            if self._bar.n >= len(self._all):
                self._bar.close()
        return feed

    def rewind(self):  # onnxruntime may ask; one pass is all we need
        pass
