"""apply_precision: the fp32 canonical model.onnx -> the fp16 or int8 model.onnx, in place."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OptionError
from .islands import FP16_MAX, FP32_ISLANDS, HEADROOM

PRECISIONS = ("fp32", "fp16", "int8", "fp8")
QUANTIZED = ("int8", "fp8")
# What int8/fp8 leave out of the low precision runs in: fp16 (what TensorRT runs fastest) or fp32
# (lets onnxruntime on a CPU fuse the Q/DQ pairs into integer kernels).
HIGH_PRECISIONS = ("fp16", "fp32")


@dataclass
class PrecisionResult:
    precision: str
    recipe: dict = field(default_factory=dict)  # for manifest.json
    overflow: list = field(default_factory=list)  # OverflowFinding, for overflow_report.json

    def overflow_report(self) -> dict:
        return {
            "rule": f"keep a node in fp32 when it writes or reads a tensor whose max |value| on calibration images exceeds "
                    f"fp16 max {FP16_MAX:g} / headroom {HEADROOM:g} = {FP16_MAX / HEADROOM:g}",
            "kept_fp32": [f.to_json() for f in self.overflow],
            "fp32_island_op_types": FP32_ISLANDS,
        }


def apply_precision(path: Path, precision: str, feeds: list[dict] | None, *, calib_method: str = "max",
                    high_precision: str = "fp16", external_data_threshold: int, log=print) -> PrecisionResult:
    """Rewrite the fp32 model at `path` (and `path`.data) into `precision`; `feeds` are calibration inputs.

    high_precision: the dtype of what int8/fp8 do not quantize (ignored for fp16).
    """
    if precision not in PRECISIONS:
        raise OptionError(f"--precision {precision} is unknown; choose one of {', '.join(PRECISIONS)}")
    if high_precision not in HIGH_PRECISIONS:
        raise OptionError(f"--high-precision {high_precision} is unknown; choose one of {', '.join(HIGH_PRECISIONS)}")
    result = PrecisionResult(precision)
    if precision == "fp32":
        return result
    rest = "fp16" if precision == "fp16" else high_precision

    import onnx

    from ..artifacts import save_onnx
    from .fp16 import count_float16_initializers, to_fp16
    from .overflow import localize_overflow

    path = Path(path)
    result.overflow = localize_overflow(path, feeds) if rest == "fp16" else []
    kept = [f.node for f in result.overflow]
    for f in result.overflow:
        log(f"      keeping {f.node} ({f.op_type}) in fp32: it {f.role} {f.tensor}, "
            f"max |value| {f.max_abs:.4g} on calibration images")

    source = path
    large = path.with_name(path.name + ".data").exists() and \
        path.with_name(path.name + ".data").stat().st_size > external_data_threshold
    if precision in QUANTIZED:
        from .qdq import quantize_qdq

        qdq = path.with_name("qdq.onnx")
        result.recipe[precision] = quantize_qdq(path, qdq, feeds, precision, calib_method, large=large)
        source = qdq
    model = onnx.load(str(source))
    if rest == "fp16":
        model = to_fp16(model, kept)
    for leftover in (path.with_name("qdq.onnx"), path.with_name("qdq.onnx.data")):
        leftover.unlink(missing_ok=True)
    save_onnx(model, path, threshold=external_data_threshold)
    result.recipe.update({
        "compute": "fp16" if precision == "fp16" else f"{precision} Q/DQ on linear layers, {rest} elsewhere",
        "high_precision": rest,
        "fp32_island_op_types": sorted(FP32_ISLANDS),
        "fp32_nodes_from_overflow": kept,
        "float16_initializers": count_float16_initializers(model),
        "interface": "float32",
    })
    return result
