"""int8 / fp8: explicit symmetric Q/DQ from post-training calibration (onnxruntime's quantizer, CPU).

What is quantized: MatMul/Gemm nodes with a constant weight (the linear layers of attention and MLP)
and the patch-embedding Conv. int8: inputs per-tensor, weights per-channel, symmetric (zero point 0),
which is what TensorRT fuses into int8 kernels. fp8 (E4M3, Hopper/Ada and newer): per-tensor scales;
onnxruntime calibrates float8 only with its "distribution" method. Attention's activation x
activation MatMuls, LayerNorm, softmax, the RoPE op and residual adds stay out of the low precision.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

CALIBRATION_METHODS = ("max", "entropy", "percentile")


def quantizable_nodes(model) -> list[str]:
    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if (n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input[1:])) or n.op_type == "Conv"]


def quantize_qdq(src: Path, dst: Path, feeds: list[dict], dtype: str = "int8", method: str = "max",
                 large: bool = False, unsigned_activations: bool = False) -> dict:
    """Write the Q/DQ model of `src` to `dst` in `dtype` (int8 or fp8); return what was done.

    unsigned_activations: uint8 activations with zero points (onnxruntime CPU's U8S8 kernels)
    instead of symmetric int8 (TensorRT). Weights stay symmetric int8 per channel either way.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .calibration import FeedReader

    methods = {"max": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    fp8 = dtype == "fp8"
    if fp8:
        method = "distribution"  # the only calibrator onnxruntime accepts for float8
    qtype = QuantType.QFLOAT8E4M3FN if fp8 else QuantType.QInt8
    act_type = QuantType.QUInt8 if unsigned_activations and not fp8 else qtype
    nodes = quantizable_nodes(onnx.load(str(src), load_external_data=False))
    with _quiet_root_logger():
        quantize_static(
            str(src), str(dst), FeedReader(feeds, f"calibrating {dtype} ({method})"),
            quant_format=QuantFormat.QDQ,
            per_channel=not fp8,
            activation_type=act_type,
            weight_type=qtype,
            nodes_to_quantize=nodes,
            calibrate_method=CalibrationMethod.Distribution if fp8 else methods[method],
            use_external_data_format=large,
            extra_options={"ActivationSymmetric": act_type != QuantType.QUInt8, "WeightSymmetric": True,
                           "CalibPercentile": 99.99, "CalibMovingAverage": False},
        )
    scheme = ("fp8 E4M3, per-tensor scales (Q/DQ)" if fp8 else
              "uint8 activations with zero points, symmetric int8 per-channel weights (Q/DQ)"
              if unsigned_activations else
              "symmetric int8, per-channel weights, per-tensor activations (Q/DQ)")
    return {"dtype": dtype, "quantized_nodes": len(nodes), "calibration_method": method, "scheme": scheme}


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
