"""Precision recipes: ONNX-to-ONNX steps that put the precision into the graph.

TensorRT 11 networks are strongly typed (no fp16/int8 builder flags, no implicit calibration), so
the graph itself says what runs in which type:

    fp32  the traced graph
    fp16  fp16 compute, fp32 islands (islands.py) + nodes whose fp32 outputs near the fp16 range
          on calibration images (overflow.py); float32 at the interface
    int8  explicit symmetric int8 Q/DQ on the linear layers and the patch embedding, calibrated on
          real images (qdq.py), then the fp16 recipe for everything else (as TensorRT runs it fastest)
    fp8   the same with fp8 E4M3 Q/DQ (Hopper, Ada and newer GPUs)
"""

from export.precision.recipe import PRECISIONS, PrecisionResult, apply_precision

__all__ = ["PRECISIONS", "PrecisionResult", "apply_precision"]
