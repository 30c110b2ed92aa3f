"""fp16 with fp32 islands: onnxruntime's float16 converter driven by our explicit policy."""

from __future__ import annotations

from .islands import FP32_ISLANDS


def to_fp16(model, keep_fp32_nodes: list[str] = ()):
    """Return `model` with fp16 compute, float32 inputs/outputs, FP32_ISLANDS op types and the
    named nodes left in fp32 (Casts inserted at every island boundary)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(
        model,
        keep_io_types=True,  # the interface stays float32
        op_block_list=sorted(FP32_ISLANDS),
        node_block_list=list(keep_fp32_nodes),
        # Large models (> 2 GB) cannot go through onnx's protobuf shape inference.
        disable_shape_infer=model.ByteSize() > 1 << 30,
    )
    fold_cast_round_trips(converted)
    return converted


def fold_cast_round_trips(model) -> int:
    """Remove fp32 -> fp16 -> fp32 Cast pairs between two fp32 nodes; return how many were removed.

    The converter casts every fp32 island's output to fp16, even when the consumer is another fp32
    island. That round trip is where a tensor kept in fp32 for overflow would overflow anyway
    (and it costs two kernels per edge).
    """
    import onnx

    types = {v.name: v.type.tensor_type.elem_type for v in
             list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    graph_outputs = {o.name for o in model.graph.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    rename: dict[str, str] = {}
    dead: set[int] = set()
    for node in model.graph.node:
        if cast_to(node) != onnx.TensorProto.FLOAT16 or types.get(node.input[0]) != onnx.TensorProto.FLOAT:
            continue
        users = consumers.get(node.output[0], [])
        back = [u for u in users if cast_to(u) == onnx.TensorProto.FLOAT and u.output[0] not in graph_outputs]
        for u in back:
            rename[u.output[0]] = node.input[0]
            dead.add(id(u))
        if len(back) == len(users) and node.output[0] not in graph_outputs:
            dead.add(id(node))
    keep = [n for n in model.graph.node if id(n) not in dead]
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return len(rename)


def count_float16_initializers(model) -> int:
    import onnx

    return sum(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
