"""int8 / fp8: explicit symmetric Q/DQ from post-training calibration (onnxruntime's quantizer, CPU).

What is quantized: MatMul/Gemm nodes with a constant weight (the linear layers of attention and MLP)
and the patch-embedding Conv. int8: inputs per-tensor, weights per-channel, symmetric (zero point 0),
which is what TensorRT fuses into int8 kernels. fp8 (E4M3, Hopper/Ada and newer): per-tensor scales;
onnxruntime calibrates float8 only with its "distribution" method. Attention's activation x
activation MatMuls, LayerNorm, softmax, the RoPE op and residual adds stay out of the low precision.

Gemm nodes (2-D by the ONNX spec: layers on one vector per image, e.g. UNICOM's flattened head) keep
int8/fp8 weights but float inputs in the TensorRT form (weight-only: a DequantizeLinear prologue into
a float GEMM, which TensorRT runs as such). At a small batch they are GEMVs, bound by reading the
weights, so low-precision weights give the speed; rounding their input adds only error, and a
reduction over N x C inputs amplifies it: on the tiny UNICOM, row 5 of a batch of 8 moved 7.2e-3
(relative L2) from the same image alone, against 5e-3 allowed (fp16 noise in the backbone flips
int8 rounding steps of the head's input); weight-only, 4.8e-4.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from export.core.folder import DATA_SUFFIX

CALIBRATION_METHODS = ("max", "entropy", "percentile")


QUANTIZED_OP_TYPES = ["MatMul", "Gemm", "Conv"]


def quantizable_nodes(model) -> list[str]:
    """The linear layers (constant weight) and convolutions, except outlier splitting's float side paths."""
    from export.precision.split import FLOAT_PATH_SUFFIX

    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if ((n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input[1:])) or n.op_type == "Conv")
            and not n.name.endswith(FLOAT_PATH_SUFFIX)]


def calibration_tensors(model) -> list[str]:
    """The tensors quantize_qdq calibrates in `model` (its `stats` must cover them)."""
    return activation_tensors(model, quantizable_nodes(model))


def activation_tensors(model, nodes: list[str]) -> list[str]:
    """The non-constant float tensors the quantizer needs ranges for: inputs and outputs of `nodes`."""
    weights = {t.name for t in model.graph.initializer}
    wanted = set(nodes)
    names = [t for n in model.graph.node if n.name in wanted for t in list(n.input) + list(n.output)]
    return list(dict.fromkeys(t for t in names if t and t not in weights))


def quantize_qdq(src: Path, dst: Path, feeds: list[dict], dtype: str = "int8", method: str = "max",
                 large: bool = False, unsigned_activations: bool = False, stats: dict | None = None,
                 log=print) -> dict:
    """Write the Q/DQ model of `src` to `dst` in `dtype` (int8 or fp8); return what was done.

    unsigned_activations: uint8 activations with zero points (onnxruntime CPU's U8S8 kernels)
    instead of symmetric int8 (TensorRT). Weights stay symmetric int8 per channel either way.

    Calibration runs the model once per batch. "max" (int8) and fp8 ranges come from our one-pass
    statistics (stats.py: min/max reduced inside the graph) handed to onnxruntime's quantizer as its
    calibration cache; "entropy" and "percentile" use onnxruntime's histogram calibrators, fed one
    batch at a time so that only one batch of activations is held.

    Outputs of the quantized layers stay float (Q/DQ on their inputs only), as TensorRT's and
    ModelOpt's int8/fp8 graphs have them: onnxruntime's default also rounds every linear layer's
    output, an extra error (held-out pooled cosine 0.966 -> 0.9975 on the outlier test model).
    fp8 scales are max |x| / 448 (E4M3's largest value), activations and weights, as TensorRT and
    ModelOpt calibrate fp8: onnxruntime's own fp8 scale (from the standard deviation) covers about
    4.5 std and clips outlier channels, which sit near 20.

    stats: {tensor: stats.TensorStats} of `src`'s calibration_tensors already collected ("max" and
    fp8; moments for fp8), so that the recipe runs the model once for all its statistics.
    """
    import numpy as np
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    from export.precision.calibration import FeedReader
    from export.precision.stats import collect_stats

    fp8 = dtype == "fp8"
    if fp8:
        method = "distribution"  # onnxruntime's float8 scales: std of the values (its Distribution method)
    qtype = QuantType.QFLOAT8E4M3FN if fp8 else QuantType.QInt8
    act_type = QuantType.QUInt8 if unsigned_activations and not fp8 else qtype
    graph = onnx.load(str(src), load_external_data=False)
    nodes = quantizable_nodes(graph)
    calibrate = {"max": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile, "distribution": CalibrationMethod.Distribution}[method]
    options: dict = {}
    # Absolute: quantize_static runs from the model's folder (_weights_read_lazily).
    cache = Path(dst).resolve().with_name(Path(dst).name + ".calibration.json")
    overrides: dict = {}
    if method in ("max", "distribution"):
        tensors = activation_tensors(graph, nodes)
        if stats is None:
            stats = collect_stats(src, feeds, tensors, moments=tensors if fp8 else (), model=graph,
                                  desc=f"calibrating {dtype} ({method})", log=log).stats
        missing = [t for t in tensors if t not in stats]
        if missing:
            raise ValueError(f"calibration statistics lack {len(missing)} tensors, e.g. {missing[:3]}")
        f32 = np.float32
        data = {name: TensorData(lowest=f32(stats[name].min), highest=f32(stats[name].max),
                                 **({"avg": f32(stats[name].mean), "std": f32(stats[name].std)} if fp8 else {}))
                for name in tensors}
        save_tensors_data(TensorsData(calibrate, data), cache)
        options["calibration_cache_path"] = str(cache)
        reader = None
        if fp8:
            peaks = {name: stats[name].max_abs for name in tensors}
            peaks.update(_weight_peaks(graph, nodes, Path(src).parent))
            overrides = {name: [_fp8_override(peak)] for name, peak in peaks.items()}
    else:
        reader = FeedReader(feeds, f"calibrating {dtype} ({method})")
    del graph
    # Written beside `src`: the weights it does not replace stay in src's data file (relative paths).
    # Resolved here: inside _weights_read_lazily the working directory is the model's folder.
    source, target = Path(src).resolve(), Path(dst).resolve()
    work = source.parent
    written = target if target.parent == work else work / f".qdq-{target.name}"
    try:
        with _quiet_root_logger(), _weights_read_lazily(work):
            quantize_static(
                str(source), str(written), reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=QUANTIZED_OP_TYPES,  # the calibrator watches only these ops' tensors
                per_channel=not fp8,
                activation_type=act_type,
                weight_type=qtype,
                nodes_to_quantize=nodes,
                calibrate_method=calibrate,
                use_external_data_format=large,
                extra_options={"ActivationSymmetric": act_type != QuantType.QUInt8, "WeightSymmetric": True,
                               "CalibPercentile": 99.99, "CalibMovingAverage": False,
                               "OpTypesToExcludeOutputQuantization": QUANTIZED_OP_TYPES,
                               **({"TensorQuantOverrides": overrides} if overrides else {}),
                               # one batch per collect_data call: histogram calibrators otherwise hold
                               # every batch's activations at once
                               **({"CalibStridedMinMax": 1} if reader is not None else {})},
                **options,
            )
        if written != target:  # elsewhere: a self-contained copy (weights streamed)
            from export.precision.fp16 import convert_file

            convert_file(written, target, fp16=False)
    finally:
        cache.unlink(missing_ok=True)
        if written != target:
            written.unlink(missing_ok=True)
            written.with_name(written.name + DATA_SUFFIX).unlink(missing_ok=True)
    scheme = ("fp8 E4M3, per-tensor scales max |x| / 448 (Q/DQ)" if fp8 else
              "uint8 activations with zero points, symmetric int8 per-channel weights (Q/DQ)"
              if unsigned_activations else
              "symmetric int8, per-channel weights, per-tensor activations (Q/DQ)")
    return {"dtype": dtype, "quantized_nodes": len(nodes), "calibration_method": method, "scheme": scheme}


def weight_only_on_vectors(path: Path) -> list[dict]:
    """Rewrite the Q/DQ graph at `path` (graph only; its weights stay in their file) so that quantized
    Gemm nodes read their float input, not its Q/DQ copy (the module docstring says why). Returns the
    manifest's account: one entry per node."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    changed = []
    for node in graph.node:
        if node.op_type != "Gemm" or len(node.input) < 2:
            continue
        dq, weight_dq = producers.get(node.input[0]), producers.get(node.input[1])
        if dq is None or weight_dq is None or (dq.op_type, weight_dq.op_type) != ("DequantizeLinear",) * 2:
            continue
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        node.input[0] = q.input[0]  # (B, K) float, as the layer before produced it
        changed.append({"node": node.name, "op_type": node.op_type, "scheme": "weight-only (float input)",
                        "why": "one vector per image (a GEMV at small batch): low-precision weights give the "
                               "speed; rounding its input adds error that its long reduction amplifies"})
    if changed:
        prune_unused_qdq(graph)
        onnx.save(model, str(path))
    return changed


def prune_unused_qdq(graph) -> None:
    """Drop Q/DQ nodes nobody reads any more, then unused initializers."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | outputs
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


FP8_E4M3_MAX = 448.0


def _fp8_override(peak: float) -> dict:
    """onnxruntime TensorQuantOverrides entry: scale max |x| / 448, zero point 0 (E4M3)."""
    import numpy as np
    from ml_dtypes import float8_e4m3fn

    scale = max(peak, 1e-12) / FP8_E4M3_MAX if np.isfinite(peak) else 1.0
    return {"scale": np.array(scale, dtype=np.float32), "zero_point": np.array(0, dtype=float8_e4m3fn)}


def _weight_peaks(model, nodes: list[str], folder: Path) -> dict[str, float]:
    """max |W| of each quantized node's constant weight, read one tensor at a time (external data too)."""
    import numpy as np
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    wanted = set(nodes)
    names = {i for n in model.graph.node if n.name in wanted for i in n.input[1:2] if i in inits}
    return {name: float(np.abs(numpy_helper.to_array(inits[name], str(folder))).max()) for name in sorted(names)}


@contextlib.contextmanager
def _weights_read_lazily(folder: Path):
    """onnxruntime's quantizer loads the whole float model (external data included: 7.4 GB for
    MLCD-bigG) and keeps it while it adds the quantized weights: 2.7x the weights at peak. It only
    needs the graph and, one at a time, the weights it quantizes (numpy_helper.to_array, which
    resolves external data against the working directory). So: load the graph alone (shape
    inference on the path, as onnxruntime does) and work from the model's folder; the weights it
    does not replace stay in the source's data file, which the written Q/DQ model points to."""
    import importlib
    import os

    import onnx
    from onnxruntime.quantization import quant_utils

    # the module, not the package's `quantize` function of the same name
    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")

    def load_graph(model_path: Path):
        inferred = Path(model_path).with_name(Path(model_path).stem + "-inferred.onnx")
        onnx.shape_inference.infer_shapes_path(str(model_path), str(inferred))
        try:
            model = onnx.load(str(inferred), load_external_data=False)
        finally:
            inferred.unlink(missing_ok=True)
        quant_utils.add_infer_metadata(model)
        return model

    name = "load_model_with_shape_infer"
    original, cwd = getattr(ort_quantize, name), os.getcwd()
    setattr(ort_quantize, name, load_graph)
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)
        setattr(ort_quantize, name, original)


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime's quantizer logs "consider pre-processing" on the root logger at every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
