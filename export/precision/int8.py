"""int8: explicit symmetric Q/DQ from post-training calibration (onnxruntime's quantizer, CPU).

What is quantized: MatMul/Gemm nodes with a constant weight (the linear layers of attention and MLP)
and the patch-embedding Conv: inputs per-tensor, weights per-channel, symmetric int8 (zero point 0),
which is what TensorRT fuses into int8 kernels. Attention's activation x activation MatMuls,
LayerNorm, softmax, the RoPE op and residual adds stay out of int8.
"""

from __future__ import annotations

from pathlib import Path

CALIBRATION_METHODS = ("max", "entropy", "percentile")


def quantizable_nodes(model) -> list[str]:
    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if (n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input[1:])) or n.op_type == "Conv"]


def quantize_int8(src: Path, dst: Path, feeds: list[dict], method: str = "max", large: bool = False) -> dict:
    """Write the Q/DQ model of `src` to `dst`; return what was done (for the manifest)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .calibration import FeedReader

    methods = {"max": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    nodes = quantizable_nodes(onnx.load(str(src), load_external_data=False))
    quantize_static(
        str(src), str(dst), FeedReader(feeds, f"calibrating ({method})"),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        nodes_to_quantize=nodes,
        calibrate_method=methods[method],
        use_external_data_format=large,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                       "CalibPercentile": 99.99, "CalibMovingAverage": False},
    )
    return {"quantized_nodes": len(nodes), "calibration_method": method, "scheme": "symmetric int8, "
            "per-channel weights, per-tensor activations (Q/DQ)"}
