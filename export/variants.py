"""Variants of one canonical fp32 graph: each RoPE lowering, each precision recipe, as build() makes them.

The ledger (parity_tests/stages.py) and the benchmark (scripts/benchmark.py) compare these side by
side; each is written to its own folder (weights beside it, as save_onnx decides).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from export.core.folder import DATA_SUFFIX, EXTERNAL_DATA_THRESHOLD, save_onnx
from export.core.interface import INPUT_NAME


def copy_onnx(src: Path, dst: Path) -> Path:
    """Copy a model and its external data (same relative name) to `dst`."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    data = src.with_name(src.name + DATA_SUFFIX)
    if data.exists():
        shutil.copyfile(data, dst.with_name(dst.name + DATA_SUFFIX))
    return dst


def lowered_graph(canonical: Path, lowering: str, dst: Path) -> Path:
    """The canonical graph with its RoPE2D nodes lowered to `lowering` (export.graph.lowering.LOWERINGS)."""
    import onnx

    from export.graph.lowering import lower_rope

    model = onnx.load(str(canonical))  # with external data: save_onnx decides again where weights go
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    save_onnx(lower_rope(model, lowering), dst)
    return Path(dst)


def precision_graph(ckpt, shape, canonical: Path, precision: str, dst: Path, *, calib_images: Path | None = None,
                    calib_method: str = "max", quant_target: str = "tensorrt", calib_count: int | None = None) -> dict:
    """The project's fp16 / int8 / fp8 recipe applied to a copy of the canonical graph at `dst`,
    calibrated as build() does (calib_images None: scikit-image's calibration photographs).
    Returns the recipe (for a report)."""
    import onnx

    from export.graph.lowering import lower_rope
    from export.precision import apply_precision
    from export.precision.calibration import calibration_feeds, calibration_images, default_count

    images, described = calibration_images(Path(calib_images) if calib_images else None,
                                           calib_count or default_count(ckpt.config, (shape.height, shape.width)),
                                           log=lambda _: None)
    feeds = calibration_feeds(ckpt.processor, images, (shape.height, shape.width), INPUT_NAME)
    copy_onnx(canonical, dst)
    result = apply_precision(dst, precision, feeds, calib_method=calib_method, quant_target=quant_target,
                             external_data_threshold=EXTERNAL_DATA_THRESHOLD, log=lambda _: None)
    if ckpt.family.has_rope:
        save_onnx(lower_rope(onnx.load(str(dst)), "custom"), dst)
    result.recipe["calibration"] = described
    return result.recipe
