"""The served preprocessing (PIL + numpy, export/core/preprocessing.py) equals transformers' CLIPImageProcessorPil.

No server needed: the file the `preprocess` model runs is imported here as it is.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from export.core.preprocessing import ClipPreprocessing, ImageDecodeError, decode_image, pixel_values_from_bytes
from triton_repo.testing import bomb_png, encode, import_or_skip

import_or_skip("skimage", extra="onnx")  # the photographs
PHOTOS = ("astronaut", "coffee", "chelsea")


def _processor(size: int = 56, crop: int | None = None):
    from export.core.interface import CLIP_MEAN, CLIP_STD
    from export.models.loading import _processor_class

    crop = crop or size
    return _processor_class()(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop},
                              image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)


def _ours(processor, tmp_path) -> ClipPreprocessing:
    processor.save_pretrained(tmp_path)  # the same file the generator copies into the model folder
    return ClipPreprocessing.from_file(tmp_path / "preprocessor_config.json")


def _reference(processor, data: bytes) -> np.ndarray:
    from PIL import Image

    return processor(images=Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"][0]


def _photo(name: str):
    import skimage.data
    from PIL import Image

    return Image.fromarray(getattr(skimage.data, name)())


@pytest.mark.parametrize("size,crop", [(56, 56), (224, 224), (300, 280)])
@pytest.mark.parametrize("name", PHOTOS)
def test_photos_match_transformers_exactly(name, size, crop, tmp_path):
    processor = _processor(size, crop)
    cfg = _ours(processor, tmp_path)
    for fmt in ("JPEG", "PNG"):
        data = encode(_photo(name), fmt)
        ours = pixel_values_from_bytes(data, cfg)
        ref = _reference(processor, data)
        assert ours.shape == ref.shape == (3, crop, crop) and ours.dtype == np.float32
        np.testing.assert_array_equal(ours, ref)


def _with_alpha(image):
    from PIL import Image

    rgba = np.array(image.convert("RGBA"))  # (H, W, 4)
    rgba[..., 3] = np.linspace(0, 255, rgba.shape[1]).astype(np.uint8)[None, :]  # a horizontal alpha ramp
    return Image.fromarray(rgba)


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("L", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"),
                                      ("CMYK", "JPEG"), ("P", "PNG"), ("I;16", "PNG")])
def test_color_conversions_match_transformers(mode, fmt, tmp_path):
    processor = _processor()
    cfg = _ours(processor, tmp_path)
    image = _photo("chelsea")
    image = _with_alpha(image) if mode == "RGBA" else image.convert(mode)
    data = encode(image, fmt)
    np.testing.assert_array_equal(pixel_values_from_bytes(data, cfg), _reference(processor, data))


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    from PIL import Image

    processor = _processor()
    image = Image.new("P", (80, 60), 0)
    image.putpalette([0, 0, 0] * 128 + [255, 0, 0] * 128)
    image.paste(200, (10, 10, 50, 50))
    data = encode(image, "PNG", transparency=0)
    ours = pixel_values_from_bytes(data, _ours(processor, tmp_path))
    np.testing.assert_array_equal(ours, _reference(processor, data))
    white = (1.0 - np.array(processor.image_mean)) / np.array(processor.image_std)
    np.testing.assert_allclose(ours[:, 0, 0], white, rtol=1e-6)  # transparent corner -> white, not black


def test_image_smaller_than_crop_is_padded_like_transformers(tmp_path):
    # shortest edge 56 but crop 64: transformers zero-pads the crop; so must we
    processor = _processor(56, 64)
    data = encode(_photo("coffee"), "PNG")
    np.testing.assert_array_equal(pixel_values_from_bytes(data, _ours(processor, tmp_path)),
                                  _reference(processor, data))


@pytest.mark.parametrize("data,match", [(b"", "empty image"), (b"\xff\xd8\xff\xe0 not really a jpeg", "cannot decode"),
                                        (b"GIF89a" + bytes(10), "cannot decode")])
def test_bad_bytes_raise_a_decode_error(data, match):
    with pytest.raises(ImageDecodeError, match=match):
        decode_image(data)


def test_truncated_jpeg_is_a_decode_error():
    data = encode(_photo("astronaut"), "JPEG")
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageDecodeError, match="pixels"):
        decode_image(bomb_png(100_000, 100_000))  # 10 gigapixels claimed by ~70 bytes
    with pytest.raises(ImageDecodeError, match="more than the limit of 1000"):
        decode_image(bomb_png(100, 100), max_pixels=1000)


def test_config_variants_are_read():
    cfg = ClipPreprocessing.from_dict({"size": 224, "crop_size": 224, "image_mean": 0.5, "image_std": 0.5})
    assert cfg.size == {"shortest_edge": 224} and cfg.output_size == (224, 224)
    assert cfg.image_mean == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="unsupported preprocessor size"):
        ClipPreprocessing.from_dict({"size": {"shortest_edge": 224, "longest_edge": 448}})


@pytest.mark.parametrize("cfg", [ClipPreprocessing(), ClipPreprocessing(do_rescale=False),
                                 ClipPreprocessing(do_normalize=False),
                                 ClipPreprocessing(do_rescale=False, do_normalize=False),
                                 ClipPreprocessing(image_mean=(0.5,) * 3, image_std=(0.5,) * 3,
                                                   rescale_factor=1 / 127.5)],
                         ids=["clip", "no-rescale", "no-normalize", "neither", "siglip-like"])
@pytest.mark.parametrize("channels", [3, 1])
def test_value_table_equals_computing_every_pixel(cfg, channels):
    """uint8 pixels are looked up in a per-channel table of the 256 values; the result is bit for bit the
    arithmetic on the image, including one channel broadcast against three means (three channels out)."""
    from export.core.preprocessing import _rescale_normalize, _rescale_normalize_values

    pixels = np.random.default_rng(channels).integers(0, 256, (channels, 37, 53), dtype=np.uint8)  # (C, H, W)
    ours, reference = _rescale_normalize(pixels, cfg), _rescale_normalize_values(pixels, cfg)
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    np.testing.assert_array_equal(ours, reference)


def test_the_standalone_copies_agree_with_the_core():
    """The served file carries its own copy of CLIP's mean/std and its config file name (it stands alone)."""
    from export.core import folder, interface, preprocessing

    assert (preprocessing.CLIP_MEAN, preprocessing.CLIP_STD) == (interface.CLIP_MEAN, interface.CLIP_STD)
    assert preprocessing.CONFIG_NAME == folder.PREPROCESSOR_CONFIG
