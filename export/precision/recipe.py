"""apply_precision: the fp32 canonical model.onnx -> the fp16 or int8 model.onnx, in place."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from export.core.errors import OptionError
from export.core.folder import DATA_SUFFIX, QDQ_ONNX_NAME, SMOOTHED_ONNX_NAME, SPLIT_ONNX_NAME
from export.precision.islands import FP16_MAX, FP32_ISLANDS, HEADROOM

PRECISIONS = ("fp32", "fp16", "int8", "fp8")
QUANTIZED = ("int8", "fp8")
# Who runs an int8/fp8 graph decides its form:
#   tensorrt  symmetric int8 (zero point 0, as TensorRT requires), fp16 for everything not quantized
#   cpu       uint8 activations with zero points and int8 weights, fp32 elsewhere: the U8S8 integer
#             kernels onnxruntime's CPU provider fuses Q/DQ into (its fastest int8 path)
QUANT_TARGETS = ("tensorrt", "cpu")


def cpu_quantized(precision: str | None, quant_target: str | None) -> bool:
    """An int8/fp8 graph shaped for onnxruntime on CPUs (uint8 activations, fp32 rest): TensorRT builds none."""
    return precision in QUANTIZED and quant_target == "cpu"


@dataclass
class PrecisionResult:
    precision: str
    recipe: dict = field(default_factory=dict)  # for manifest.json
    overflow: list = field(default_factory=list)  # OverflowFinding, for overflow_report.json

    def overflow_report(self) -> dict:
        return {
            "rule": f"keep a node in fp32 when it writes or reads a tensor whose max |value| on calibration images "
                    f"exceeds fp16 max {FP16_MAX:g} / headroom {HEADROOM:g} = {FP16_MAX / HEADROOM:g}",
            "kept_fp32": [f.to_json() for f in self.overflow],
            "fp32_island_op_types": FP32_ISLANDS,
            **{key: self.recipe[key] for key in ("splitting", "smoothing", "fallback") if key in self.recipe},
        }


def check_options(precision: str, quant_target: str = "tensorrt", calib_method: str = "max") -> None:
    """Option checks that need no model, so that a typo fails before a slow load."""
    from export.precision.qdq import CALIBRATION_METHODS

    for flag, value, choices in (("--precision", precision, PRECISIONS),
                                 ("--quant-target", quant_target, QUANT_TARGETS),
                                 ("--calib-method", calib_method, CALIBRATION_METHODS)):
        if value not in choices:
            raise OptionError(f"{flag} {value} is unknown; choose one of {', '.join(choices)}")
    if precision == "fp8" and quant_target == "cpu":
        raise OptionError("--precision fp8 targets Hopper/Ada GPUs (TensorRT); use --quant-target tensorrt, "
                          "or int8 for CPUs")


def apply_precision(path: Path, precision: str, feeds: list[dict] | None, *, calib_method: str = "max",
                    quant_target: str = "tensorrt", external_data_threshold: int, log=print) -> PrecisionResult:
    """Rewrite the fp32 model at `path` (and `path`.data) into `precision`; `feeds` are calibration inputs.

    quant_target: the runtime an int8/fp8 graph is shaped for (QUANT_TARGETS; ignored for fp16).
    """
    check_options(precision, quant_target, calib_method)
    result = PrecisionResult(precision)
    if precision == "fp32":
        return result
    rest = "fp32" if cpu_quantized(precision, quant_target) else "fp16"

    import onnx

    from export.core.folder import save_onnx
    from export.precision.fp16 import convert_file, count_float16_initializers
    from export.precision.overflow import localize_overflow

    path = Path(path)
    if not feeds:
        raise ValueError(f"--precision {precision} needs calibration images (feeds)")
    source = path
    data = path.with_name(path.name + DATA_SUFFIX)
    large = data.exists() and data.stat().st_size > external_data_threshold
    if precision in QUANTIZED:
        source = _quantize(path, precision, feeds, calib_method, quant_target, large, result, log)
    else:
        result.overflow = localize_overflow(path, feeds, log=log)
        _log_overflow(result.overflow, log)
    kept = [f.node for f in result.overflow]
    # The layers the fallback kept out of int8 stay in fp32, as it judged them (fp8 keeps its own fallback): in
    # fp16 the patch embedding rounds the pixels (2^-11 relative), which alone moved a token of the 2D-RoPE
    # outlier model to cosine 0.977 (0.998 in fp32; docs/precision.md). They are at most a quarter of the layers.
    from export.precision.fallback import fallback_style

    fallback_kept = [e["node"] for e in result.recipe.get("fallback", {}).get("kept_out_of_low_precision", [])
                     if fallback_style(precision)["fp32"]]
    # Outlier splitting's float paths stay fp32 too, and the masks the fallback's layers read (split.py says why).
    from export.precision.split import float_path_nodes

    split_kept = (float_path_nodes(onnx.load(str(source), load_external_data=False), fallback_kept)
                  if result.recipe.get("splitting", {}).get("split") and rest == "fp16" else [])
    # Streams external weights: a > 2 GB model is never held whole, nor serialized as one protobuf.
    model = convert_file(source, path, fp16=rest == "fp16", keep_fp32_nodes=kept + fallback_kept + split_kept)
    for leftover in (path.with_name(QDQ_ONNX_NAME), path.with_name(QDQ_ONNX_NAME + DATA_SUFFIX),
                     path.with_name(SMOOTHED_ONNX_NAME), path.with_name(SMOOTHED_ONNX_NAME + DATA_SUFFIX),
                     path.with_name(SPLIT_ONNX_NAME)):
        leftover.unlink(missing_ok=True)
    # Folds the weights back into model.onnx when they now fit under the threshold.
    save_onnx(onnx.load(str(path), load_external_data=False), path, threshold=external_data_threshold)
    result.recipe.update({
        "compute": "fp16" if precision == "fp16" else f"{precision} Q/DQ on linear layers, {rest} elsewhere",
        "unquantized_dtype": rest,
        **({"quant_target": quant_target} if precision in QUANTIZED else {}),
        "fp32_island_op_types": sorted(FP32_ISLANDS),
        "fp32_nodes_from_overflow": kept,
        **({"fp32_nodes_from_fallback": fallback_kept} if precision in QUANTIZED else {}),
        **({"fp32_nodes_from_splitting": split_kept} if split_kept else {}),
        "float16_initializers": count_float16_initializers(model),
        "interface": "float32",
    })
    return result


def _log_overflow(findings: list, log) -> None:
    for f in findings:
        log(f"      keeping {f.node} ({f.op_type}) in fp32: it {f.role} {f.tensor}, "
            f"max |value| {f.max_abs:.4g} on calibration images")


def _quantize(path: Path, precision: str, feeds: list[dict], calib_method: str, quant_target: str, large: bool,
              result: PrecisionResult, log) -> Path:
    """Smoothing, Q/DQ and the per-layer fallback; returns the Q/DQ model (qdq.onnx beside `path`).

    The fp32 model runs once per calibration batch for everything they need (stats.collect_stats):
    the overflow scan's ranges, smoothing's per-channel peaks, the calibration ranges (those of
    smoothed tensors follow from the per-channel ones: TensorStats.divided) and the fallback's fp32
    reference outputs. (Four passes before; each is about 3 minutes on MLCD-bigG at 8 images.)"""
    import onnx

    from export.precision.fallback import FALLBACK_IMAGES, keep_sensitive_layers_out
    from export.precision.overflow import float_intermediates, overflow_findings
    from export.precision.qdq import calibration_tensors, quantize_qdq, weight_only_on_vectors
    from export.precision.smooth import smooth_with_factors, smoothing_tensors
    from export.precision.split import split_outlier_channels
    from export.precision.stats import collect_stats

    fp16_rest = quant_target != "cpu"
    graph = onnx.load(str(path), load_external_data=False)
    producers = float_intermediates(graph) if fp16_rest else {}  # the overflow scan's tensors
    smoothed_tensors = smoothing_tensors(graph, precision)
    # onnxruntime's histogram calibrators ("entropy", "percentile") run their own pass on the smoothed model.
    calibrated = calibration_tensors(graph) if calib_method == "max" or precision == "fp8" else []
    scanned = list(producers)
    purposes = [what for what, tensors in (("overflow scan", scanned), ("smoothing", smoothed_tensors),
                                           (f"{precision} calibration", calibrated)) if tensors]
    run = collect_stats(path, feeds, scanned + calibrated, per_channel=smoothed_tensors,
                        moments=calibrated if precision == "fp8" else (), model=graph,
                        desc=f"statistics ({', '.join(purposes + ['fp32 reference'])})",
                        keep_outputs=FALLBACK_IMAGES, log=log)
    result.overflow = overflow_findings(graph, producers, run.stats)
    _log_overflow(result.overflow, log)

    # Splitting (split.py): a LayerNorm's few outlier channels take a float path, the rest stays int8.
    # Smoothing (smooth.py) then takes the LayerNorms with more outlier channels: they migrate into the
    # next weights before Q/DQ. Each writes its model only when it changes something.
    split = path.with_name(SPLIT_ONNX_NAME)
    result.recipe["splitting"], split_stats = split_outlier_channels(path, split, run.stats, feeds, dtype=precision,
                                                                     log=log)
    source = split if result.recipe["splitting"]["split"] else path
    smoothed = path.with_name(SMOOTHED_ONNX_NAME)
    result.recipe["smoothing"], factors = smooth_with_factors(source, feeds, dtype=precision, dst=smoothed,
                                                              stats=run.stats, log=log)
    float_model = smoothed if result.recipe["smoothing"]["smoothed"] else source
    calibration = None
    if calibrated:
        calibration = {name: run.stats[name] for name in calibrated}
        calibration.update(split_stats)
        calibration.update({name: run.stats[name].divided(s) for name, s in factors.items()})
    qdq = path.with_name(QDQ_ONNX_NAME)
    result.recipe[precision] = quantize_qdq(float_model, qdq, feeds, precision, calib_method, large=large,
                                            unsigned_activations=quant_target == "cpu", stats=calibration,
                                            log=log)
    if fp16_rest:  # TensorRT: layers on one vector per image keep float inputs (qdq.py says why)
        result.recipe[precision]["weight_only"] = weight_only_on_vectors(qdq)
        for entry in result.recipe[precision]["weight_only"]:
            log(f"      {entry['node']} ({entry['op_type']}): {precision} weights, float input ({entry['why']})")
    # Per-layer fallback (fallback.py): layers whose error the model amplifies go back to float.
    result.recipe["fallback"] = keep_sensitive_layers_out(float_model, qdq, feeds, precision,
                                                          reference=run.outputs, log=log)
    return qdq
