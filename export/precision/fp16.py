"""fp16 with fp32 islands: onnxruntime's float16 converter driven by our explicit policy."""

from __future__ import annotations

from .islands import FP32_ISLANDS


def to_fp16(model, keep_fp32_nodes: list[str] = ()):
    """Return `model` with fp16 compute, float32 inputs/outputs, FP32_ISLANDS op types and the
    named nodes left in fp32 (Casts inserted at every island boundary)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(
        model,
        keep_io_types=True,  # the interface stays float32
        op_block_list=sorted(FP32_ISLANDS),
        node_block_list=list(keep_fp32_nodes),
        # Large models (> 2 GB) cannot go through onnx's protobuf shape inference.
        disable_shape_infer=model.ByteSize() > 1 << 30,
    )


def count_float16_initializers(model) -> int:
    import onnx

    return sum(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
