"""The VLM input modes of export/core/preprocessing.py equal transformers' PIL processors exactly.

anyres: LlavaNextImageProcessorPil's pixel_values (whole image + tiles). native: Qwen2VLImageProcessorPil's
patch-packed pixel_values, unpacked back to (3, H', W') with its image_grid_thw. Real photographs in
several aspect ratios and color modes; np.array_equal on float32, no tolerance.
"""

from __future__ import annotations

import io
import json
import subprocess

import numpy as np
import pytest

from export.core.preprocessing import (
    NATIVE_MAX_PIXELS,
    NATIVE_MIN_PIXELS,
    ClipPreprocessing,
    ImageDecodeError,
    anyres_pixel_values,
    anyres_pixel_values_from_bytes,
    default_grid_pinpoints,
    native_pixel_values,
    native_pixel_values_from_bytes,
    select_best_resolution,
    smart_resize,
)
from triton_repo.testing import bomb_png, encode, import_or_skip, skip_unless_required

import_or_skip("skimage", extra="onnx")  # the photographs
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle")
SHAPES = ("as-is", "portrait", "landscape", "panorama", "tall", "tiny", "large")
MEAN_05 = (0.5, 0.5, 0.5)


def _photo(name: str):
    import skimage.data
    from PIL import Image

    if name == "motorcycle":  # a stereo pair: (left, right, disparity); keep the left view
        array = skimage.data.stereo_motorcycle()[0]
    else:
        array = getattr(skimage.data, name)()
    return Image.fromarray(array)


def _shaped(image, shape: str):
    """The photo cropped / resized with Pillow to an aspect ratio (or size) that exercises another branch."""
    from PIL import Image

    w, h = image.size
    if shape == "as-is":
        return image
    if shape == "portrait":  # 2:3
        cw = min(w, h * 2 // 3)
        return image.crop((0, 0, cw, cw * 3 // 2))
    if shape == "landscape":  # 16:9
        ch = min(h, w * 9 // 16)
        return image.crop((0, 0, ch * 16 // 9, ch))
    if shape == "panorama":  # 4:1
        return image.crop((0, 0, w, w // 4))
    if shape == "tall":  # 1:4, upscaled so the long side is 800
        return image.crop((0, 0, h // 4, h)).resize((200, 800), Image.Resampling.BICUBIC)
    if shape == "tiny":
        return image.resize((20, 30), Image.Resampling.BICUBIC)
    if shape == "large":  # 2400 x 1600 = 3.84 MP, over LLaVA-OneVision-1.5's 3.24 MP budget
        return image.resize((2400, 1600), Image.Resampling.BICUBIC)
    raise AssertionError(shape)


def _with_alpha(image):
    from PIL import Image

    rgba = np.array(image.convert("RGBA"))  # (H, W, 4)
    rgba[..., 3] = np.linspace(0, 255, rgba.shape[1]).astype(np.uint8)[None, :]  # a horizontal alpha ramp
    return Image.fromarray(rgba)


def _in_mode(image, mode: str):
    return _with_alpha(image) if mode == "RGBA" else image.convert(mode)


# --- AnyRes (LLaVA-NeXT) ---------------------------------------------------------------------------

CUSTOM_PINPOINTS = [(56, 56), (56, 112), (112, 56), (112, 168), (168, 112), (168, 168), (56, 224)]
OFF_GRID_PINPOINTS = [(100, 150), (150, 100)]  # not multiples of the tile: partial edge tiles, as transformers


def _llava_next(size: int, pinpoints, mean=None):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from export.core.interface import CLIP_MEAN, CLIP_STD

    return LlavaNextImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                      image_grid_pinpoints=[list(p) for p in pinpoints],
                                      image_mean=list(mean or CLIP_MEAN), image_std=CLIP_STD, do_convert_rgb=True)


def _cfg_of(processor) -> ClipPreprocessing:
    """Our config read from the reference's own saved config: what serving reads from the checkpoint."""
    return ClipPreprocessing.from_dict(json.loads(processor.to_json_string()))


def _native_cfg(processor) -> ClipPreprocessing:
    """The checkpoint config fields native mode uses (a Qwen2-VL config's size is a pixel budget, not CLIP's)."""
    saved = json.loads(processor.to_json_string())
    return ClipPreprocessing(do_convert_rgb=saved["do_convert_rgb"], resample=saved["resample"],
                             do_rescale=saved["do_rescale"], rescale_factor=saved["rescale_factor"],
                             do_normalize=saved["do_normalize"], image_mean=tuple(saved["image_mean"]),
                             image_std=tuple(saved["image_std"]))


def _anyres_check(image, size: int, pinpoints, mean=None) -> tuple[int, int]:
    processor = _llava_next(size, pinpoints, mean)
    ref = processor(images=image, return_tensors="np")
    ours, grid = anyres_pixel_values(image, _cfg_of(processor), pinpoints, size)
    rows, cols = grid
    assert ours.dtype == np.float32 and ours.shape == (1 + rows * cols, 3, size, size)
    assert ref["pixel_values"].shape == (1, *ours.shape)
    assert np.array_equal(ours, ref["pixel_values"][0])
    best = select_best_resolution(image.height, image.width, pinpoints)
    assert grid == (-(-best[0] // size), -(-best[1] // size))
    return grid


@pytest.mark.parametrize("shape", [s for s in SHAPES if s != "large"])
@pytest.mark.parametrize("name", PHOTOS)
def test_anyres_default_pinpoints_match_llava_next_exactly(name, shape):
    image = _shaped(_photo(name), shape)
    grid = _anyres_check(image, 56, default_grid_pinpoints(56))
    expected = {"panorama": (1, 3), "tall": (3, 1)}
    if shape in expected:  # a 4:1 image takes the 1x3 pinpoint, a 1:4 image the 3x1 one
        assert grid == expected[shape]


@pytest.mark.parametrize("pinpoints", [CUSTOM_PINPOINTS, OFF_GRID_PINPOINTS], ids=["custom", "off-grid"])
@pytest.mark.parametrize("shape", ["as-is", "panorama", "tall", "tiny"])
def test_anyres_custom_pinpoints_match_llava_next_exactly(shape, pinpoints):
    _anyres_check(_shaped(_photo("coffee"), shape), 56, pinpoints, mean=MEAN_05)


def test_anyres_at_a_real_native_size():
    # RICE / MLCD-L at 336 px with LLaVA-NeXT's own default pinpoints (the 2x2+1 grid for a square photo)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    assert default_grid_pinpoints(336) == [tuple(p) for p in LlavaNextImageProcessorPil.image_grid_pinpoints]
    assert _anyres_check(_photo("astronaut"), 336, default_grid_pinpoints(336)) == (2, 2)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_anyres_color_modes_match_llava_next(mode):
    _anyres_check(_in_mode(_shaped(_photo("chelsea"), "landscape"), mode), 56, default_grid_pinpoints(56))


def test_anyres_first_view_is_the_whole_image_then_row_major_tiles():
    # a left/right split photo: the right half white; tiles are cut row-major from the padded canvas
    from PIL import Image

    array = np.array(_photo("astronaut").resize((224, 112)))  # (112, 224, 3): a 1x2 pinpoint at s = 112
    array[:, 112:] = 255
    views, grid = anyres_pixel_values(Image.fromarray(array), ClipPreprocessing(
        size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112}), default_grid_pinpoints(112), 112)
    assert grid == (1, 2) and views.shape == (3, 3, 112, 112)
    white = (1.0 - np.array(ClipPreprocessing().image_mean)) / np.array(ClipPreprocessing().image_std)
    np.testing.assert_allclose(views[2].mean(axis=(1, 2)), white, rtol=1e-5)  # the right tile is all white
    assert not np.allclose(views[1].mean(axis=(1, 2)), white, rtol=1e-2)  # the left one is the photo


# --- native resolution (Qwen2-VL smart_resize) -------------------------------------------------------

# (patch, merge, min_pixels, max_pixels, temporal_patch_size, mean)
NATIVE_SETTINGS = {
    "llava-ov-1.5": (14, 2, NATIVE_MIN_PIXELS, NATIVE_MAX_PIXELS, 1, None),
    "qwen2-vl": (14, 2, 56 * 56, 28 * 28 * 1280, 2, None),
    "small-budget-32": (16, 2, 32 * 32 * 4, 64 * 64 * 4, 1, MEAN_05),
    "factor-14": (14, 1, 14 * 14 * 4, 14 * 14 * 64, 1, None),
}


def _qwen2_vl(patch: int, merge: int, min_pixels: int, max_pixels: int, temporal: int, mean=None):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from export.core.interface import CLIP_MEAN, CLIP_STD

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch, merge_size=merge,
                                    temporal_patch_size=temporal, image_mean=list(mean or CLIP_MEAN),
                                    image_std=CLIP_STD, do_convert_rgb=True)


def _unpack(pixel_values: np.ndarray, grid_thw, patch: int, merge: int, temporal: int) -> np.ndarray:
    """Qwen2-VL's packed (gh * gw, 3 * temporal * p * p) back to (3, gh * p, gw * p)."""
    t, gh, gw = (int(v) for v in grid_thw)
    assert t == 1
    x = pixel_values.reshape(gh // merge, gw // merge, merge, merge, 3, temporal, patch, patch)
    for frame in range(1, temporal):  # a still image is repeated along the temporal patch
        assert np.array_equal(x[:, :, :, :, :, frame], x[:, :, :, :, :, 0])
    x = x[:, :, :, :, :, 0]  # (gh/m, gw/m, m, m, C, p, p)
    x = x.transpose(4, 0, 2, 5, 1, 3, 6)  # (C, gh/m, m, p, gw/m, m, p)
    return x.reshape(3, gh * patch, gw * patch)


def _native_check(image, setting: str) -> np.ndarray:
    patch, merge, min_pixels, max_pixels, temporal, mean = NATIVE_SETTINGS[setting]
    processor = _qwen2_vl(patch, merge, min_pixels, max_pixels, temporal, mean)
    ref = processor(images=image, return_tensors="np")
    ours = native_pixel_values(image, _native_cfg(processor), patch * merge, min_pixels, max_pixels)
    h, w = smart_resize(image.height, image.width, patch * merge, min_pixels, max_pixels)
    assert ours.dtype == np.float32 and ours.shape == (3, h, w)
    assert h % (patch * merge) == 0 and w % (patch * merge) == 0
    assert np.array_equal(ours, _unpack(ref["pixel_values"], ref["image_grid_thw"][0], patch, merge, temporal))
    return ours


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", PHOTOS)
def test_native_llava_onevision_defaults_match_qwen2_vl_exactly(name, shape):
    image = _shaped(_photo(name), shape)
    h, w = _native_check(image, "llava-ov-1.5").shape[1:]
    if shape == "large":  # over the budget: downscaled into it
        assert h * w <= NATIVE_MAX_PIXELS < image.width * image.height
    if shape == "tiny":  # under min_pixels: upscaled to it
        assert h * w >= NATIVE_MIN_PIXELS > image.width * image.height


@pytest.mark.parametrize("setting", ["qwen2-vl", "small-budget-32", "factor-14"])
@pytest.mark.parametrize("shape", ["as-is", "portrait", "panorama", "tiny"])
def test_native_other_settings_match_qwen2_vl_exactly(setting, shape):
    image = _shaped(_photo("rocket"), shape)
    h, w = _native_check(image, setting).shape[1:]
    if setting == "small-budget-32" and shape != "tiny":  # every photo is over 16384 px: downscaled
        assert h * w <= 64 * 64 * 4 < image.width * image.height


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_native_color_modes_match_qwen2_vl(mode):
    _native_check(_in_mode(_shaped(_photo("chelsea"), "portrait"), mode), "llava-ov-1.5")


# --- select_best_resolution / smart_resize: the arithmetic and its edges ---------------------------

def test_select_best_resolution_agrees_with_transformers_on_a_sweep():
    from transformers.image_processing_utils import select_best_resolution as reference

    sizes = [1, 7, 20, 30, 100, 224, 335, 336, 337, 500, 671, 672, 1000, 1008, 2000, 4000]
    for pinpoints in (default_grid_pinpoints(336), CUSTOM_PINPOINTS, OFF_GRID_PINPOINTS):
        for h in sizes:
            for w in sizes:
                expected = reference((h, w), [list(p) for p in pinpoints])
                assert select_best_resolution(h, w, pinpoints) == tuple(expected), (h, w, pinpoints)


def test_select_best_resolution_choices():
    pins = default_grid_pinpoints(336)
    assert pins == [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]  # (height, width)
    assert select_best_resolution(512, 512, pins) == (672, 672)  # square: the 2x2 grid
    assert select_best_resolution(250, 1000, pins) == (336, 1008)  # 4:1 landscape: 1 row x 3 columns
    assert select_best_resolution(1000, 250, pins) == (1008, 336)
    # smaller than every pinpoint: the effective resolution is the whole image everywhere, so the least
    # waste decides, and of the equal-area (336, 672) and (672, 336) the first listed wins
    assert select_best_resolution(30, 20, pins) == (336, 672)
    assert select_best_resolution(30, 20, list(reversed(pins))) == (672, 336)


def test_select_best_resolution_errors():
    from transformers.image_processing_utils import select_best_resolution as reference

    # a 1 x 100000 line keeps no pixel in any pinpoint (effective 0 everywhere): the first one wins
    assert select_best_resolution(1, 100_000, default_grid_pinpoints(336)) == (336, 672)
    assert reference((1, 100_000), [list(p) for p in default_grid_pinpoints(336)]) == (336, 672)
    for bad in ([], [(0, 336)], [(336,)], "336x672"):
        with pytest.raises(ValueError, match="pinpoints"):
            select_best_resolution(100, 100, bad)
    with pytest.raises(ValueError, match="positive"):
        select_best_resolution(0, 100, default_grid_pinpoints(336))
    with pytest.raises(ValueError, match="positive"):
        default_grid_pinpoints(0)


def test_smart_resize_agrees_with_transformers_on_a_sweep():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    sizes = [1, 2, 13, 14, 15, 20, 27, 28, 29, 42, 70, 100, 299, 300, 512, 1000, 1799, 1800, 2400, 4000, 8000]
    budgets = [(NATIVE_MIN_PIXELS, NATIVE_MAX_PIXELS), (56 * 56, 28 * 28 * 1280), (4096, 16384), (100, 500)]
    for factor in (14, 28, 32):
        for min_pixels, max_pixels in budgets:
            for h in sizes:
                for w in sizes:
                    if max(h, w) / min(h, w) > 200:
                        continue
                    expected = reference(h, w, factor, min_pixels, max_pixels)
                    assert smart_resize(h, w, factor, min_pixels, max_pixels) == expected, (h, w, factor)


def test_smart_resize_edges():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    args = (28, NATIVE_MIN_PIXELS, NATIVE_MAX_PIXELS)
    assert smart_resize(20, 30, *args) == (56, 84)  # under min_pixels: scaled up, rounded up to 28
    assert smart_resize(42, 70, *args) == reference(42, 70, *args)  # 1.5 and 2.5 round half to even
    assert smart_resize(4000, 3000, *args) == (2072, 1540)  # over max_pixels: scaled down, rounded down
    assert smart_resize(4000, 3000, *args)[0] * smart_resize(4000, 3000, *args)[1] <= NATIVE_MAX_PIXELS
    assert smart_resize(1, 200, *args) == reference(1, 200, *args)  # an aspect ratio of exactly 200 passes
    for h, w in ((1, 201), (201, 1), (10, 2500)):
        with pytest.raises(ValueError, match="absolute aspect ratio must be smaller than 200") as ours:
            smart_resize(h, w, *args)
        with pytest.raises(ValueError) as theirs:
            reference(h, w, *args)
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(ZeroDivisionError):
        reference(0, 100, *args)  # transformers divides by zero; we say what is wrong
    with pytest.raises(ValueError, match="image size must be positive"):
        smart_resize(0, 100, *args)
    with pytest.raises(ValueError, match="factor must be a positive"):
        smart_resize(100, 100, 0, NATIVE_MIN_PIXELS, NATIVE_MAX_PIXELS)
    # a budget below factor**2 cannot be met: the result stays factor x factor, as in transformers
    assert smart_resize(1000, 1000, 28, 1, 100) == reference(1000, 1000, 28, 1, 100) == (28, 28)


def test_native_refuses_a_zero_pixel_budget_like_transformers():
    image = _photo("coffee")
    with pytest.raises(ValueError, match="size"):
        _qwen2_vl(14, 2, 0, NATIVE_MAX_PIXELS, 1)(images=image, return_tensors="np")
    with pytest.raises(ValueError, match="min_pixels and max_pixels must be positive"):
        native_pixel_values(image, ClipPreprocessing(), 28, 0, NATIVE_MAX_PIXELS)


def test_llava_onevision_defaults():
    assert (NATIVE_MIN_PIXELS, NATIVE_MAX_PIXELS) == (3136, 3_240_000)
    # a 1800 x 1800 photo is exactly the budget: smart_resize keeps it within, on the 28 grid
    assert smart_resize(1800, 1800, 28, NATIVE_MIN_PIXELS, NATIVE_MAX_PIXELS) == (1792, 1792)


# --- from bytes: decode errors and what travels over the wire ---------------------------------------

def _decoded(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_from_bytes_match_the_references(fmt):
    data = encode(_shaped(_photo("motorcycle"), "landscape"), fmt)
    processor = _llava_next(56, default_grid_pinpoints(56))
    ours, grid = anyres_pixel_values_from_bytes(data, _cfg_of(processor), default_grid_pinpoints(56), 56)
    assert np.array_equal(ours, processor(images=_decoded(data), return_tensors="np")["pixel_values"][0])
    patch, merge, min_pixels, max_pixels, temporal, _ = NATIVE_SETTINGS["llava-ov-1.5"]
    qwen = _qwen2_vl(patch, merge, min_pixels, max_pixels, temporal)
    native = native_pixel_values_from_bytes(data, _native_cfg(qwen))  # the defaults: LLaVA-OneVision-1.5's
    ref = qwen(images=_decoded(data), return_tensors="np")
    assert np.array_equal(native, _unpack(ref["pixel_values"], ref["image_grid_thw"][0], patch, merge, temporal))


@pytest.mark.parametrize("data,match", [(b"", "empty image"), (b"\xff\xd8\xff\xe0 not really a jpeg", "cannot decode"),
                                        (bomb_png(100_000, 100_000), "pixels")])
def test_from_bytes_decode_errors(data, match):
    with pytest.raises(ImageDecodeError, match=match):
        anyres_pixel_values_from_bytes(data, ClipPreprocessing(), default_grid_pinpoints(224), 224)
    with pytest.raises(ImageDecodeError, match=match):
        native_pixel_values_from_bytes(data, ClipPreprocessing())


def test_extreme_aspect_ratios_anyres_follows_transformers_native_refuses():
    from PIL import Image

    # a 2000 x 1 line: LLaVA-NeXT still makes views of it (1 pixel high, black padding); so do we
    line = _photo("coffee").resize((2000, 1))
    _anyres_check(line, 56, default_grid_pinpoints(56))
    # smart_resize refuses over 200:1; from bytes that is the client's ImageDecodeError
    thin = encode(Image.new("RGB", (2000, 1), (128, 64, 32)), "PNG")
    with pytest.raises(ImageDecodeError, match=r"image is 2000x1: absolute aspect ratio .* crop or pad"):
        native_pixel_values_from_bytes(thin, ClipPreprocessing())
    # a bad argument is the caller's ValueError, not the client's ImageDecodeError
    data = encode(_photo("coffee"), "PNG")
    with pytest.raises(ValueError, match="tile size") as exc:
        anyres_pixel_values_from_bytes(data, ClipPreprocessing(), default_grid_pinpoints(56), 0)
    assert not isinstance(exc.value, ImageDecodeError)
    with pytest.raises(ValueError, match="factor") as exc:
        native_pixel_values_from_bytes(data, ClipPreprocessing(), factor=0)
    assert not isinstance(exc.value, ImageDecodeError)


_SERVER_SIDE = """
import io, sys
import numpy as np
sys.path.insert(0, sys.argv[1])  # as the python backend loads it: the file beside model.py, nothing else
import preprocessing as p
data = sys.stdin.buffer.read()
cfg = p.ClipPreprocessing()
views, grid = p.anyres_pixel_values_from_bytes(data, cfg, p.default_grid_pinpoints(56), 56)
native = p.native_pixel_values_from_bytes(data, cfg)
buf = io.BytesIO()
np.savez(buf, views=views, grid=np.array(grid), native=native, numpy=np.array(np.__version__))
sys.stdout.buffer.write(buf.getvalue())
"""


def test_server_environment_computes_the_same_arrays():
    # the served copy runs under the server's numpy < 2 and Pillow only: same bytes in, same arrays out
    from pathlib import Path

    from export.core import preprocessing
    from triton_repo.server import server_env

    python = server_env() / "bin" / "python"
    if not python.exists():
        skip_unless_required(f"no server environment at {server_env()} (scripts/setup_server_env.sh)")
    data = encode(_shaped(_photo("astronaut"), "panorama"), "PNG")
    here = str(Path(preprocessing.__file__).parent)  # the file the served models import from beside them
    run = subprocess.run([str(python), "-I", "-c", _SERVER_SIDE, here], input=data, capture_output=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    served = np.load(io.BytesIO(run.stdout))
    assert str(served["numpy"]).startswith("1."), "the server environment should have numpy < 2"
    views, grid = anyres_pixel_values_from_bytes(data, ClipPreprocessing(), default_grid_pinpoints(56), 56)
    assert tuple(served["grid"]) == grid == (1, 3)
    assert np.array_equal(served["views"], views)
    assert np.array_equal(served["native"], native_pixel_values_from_bytes(data, ClipPreprocessing()))
