"""fp16 with fp32 islands: onnxruntime's float16 converter driven by our explicit policy.

Models whose weights live in external data (over ~2 GB: MLCD-bigG is 7.4 GB in fp32) are converted
without loading the weights: the converter rewrites the graph alone (shape inference needs only the
initializers' dims), then each external tensor is streamed from the old data file to the new one,
converted to fp16 where the converter changed its type.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import BinaryIO, Iterable

from export.core.folder import DATA_SUFFIX
from export.precision.islands import FP32_ISLANDS


def to_fp16(model, keep_fp32_nodes: Iterable[str] = (), *, infer_shapes: bool = True):
    """Return `model` with fp16 compute, float32 inputs/outputs, FP32_ISLANDS op types and the
    named nodes left in fp32 (Casts inserted at every island boundary), nodes in topological order.

    infer_shapes=False: `model` already carries inferred value_info (a graph without its weights)."""
    import onnx
    from onnxruntime.transformers import float16

    if infer_shapes:
        model = onnx.shape_inference.infer_shapes(model)
    with _value_info_from_dims(float16):
        converted = float16.convert_float_to_float16(
            model,
            keep_io_types=True,  # the interface stays float32
            op_block_list=sorted(FP32_ISLANDS),
            node_block_list=list(keep_fp32_nodes),
            disable_shape_infer=True,  # done above, on the graph alone (works for any size)
        )
    fold_cast_round_trips(converted)
    topological_sort(converted.graph)
    # The converter leaves some value_info with the pre-conversion type; infer afresh so every
    # consumer (onnx.checker's full check, the onnx23 lowering's head count) sees the true types.
    del converted.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(converted)


@contextlib.contextmanager
def _value_info_from_dims(float16):
    """The converter reads an initializer's whole array just to learn its shape
    (make_value_info_from_tensor), which fails for weights left in external data and would load
    them all; the dims field says the same."""
    from onnx import helper

    original = float16.make_value_info_from_tensor
    float16.make_value_info_from_tensor = lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    try:
        yield
    finally:
        float16.make_value_info_from_tensor = original


def convert_file(src: Path, dst: Path, *, fp16: bool, keep_fp32_nodes: Iterable[str] = ()):
    """Write `src` (an ONNX file, weights embedded or external) to `dst`, through to_fp16 when `fp16`.

    External weights are streamed tensor by tensor into `dst`.data, so memory holds the graph and one
    tensor, never the model's weights. Returns the written graph (weights not loaded)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    external = any(uses_external_data(t) for t in model.graph.initializer)
    if fp16:
        model = to_fp16(model, keep_fp32_nodes)
    else:
        topological_sort(model.graph)
    if not external:
        onnx.save(model, str(dst))
        return model
    tmp = dst.with_name(dst.name + DATA_SUFFIX + ".partial")
    try:
        _stream_external_data(model, src.parent, tmp, dst.name + DATA_SUFFIX)
        onnx.save(model, str(dst))
        tmp.replace(dst.with_name(dst.name + DATA_SUFFIX))
    finally:
        tmp.unlink(missing_ok=True)
    return model


def _stream_external_data(model, src_dir: Path, data_path: Path, location: str) -> None:
    """Copy every external tensor of `model` from its file under `src_dir` into `data_path` and point
    the tensor there (as `location`). A tensor whose type the converter changed to FLOAT16 while its
    bytes are still float32 is converted on the way (onnxruntime's clamping to the fp16 range)."""
    import numpy as np
    import onnx
    from onnx.external_data_helper import uses_external_data
    from onnxruntime.transformers.float16 import convert_np_to_float16

    handles: dict[str, BinaryIO] = {}
    offset = 0
    try:
        with open(data_path, "wb") as out:
            for tensor in model.graph.initializer:
                if not uses_external_data(tensor):
                    continue
                info = {e.key: e.value for e in tensor.external_data}
                name = info["location"]
                f = handles.get(name) or handles.setdefault(name, open(src_dir / name, "rb"))
                f.seek(int(info.get("offset", 0)))
                raw = f.read(int(info["length"]))
                count = int(np.prod(tensor.dims, dtype=np.int64))
                if tensor.data_type == onnx.TensorProto.FLOAT16 and len(raw) == 4 * count:
                    raw = convert_np_to_float16(np.frombuffer(raw, dtype=np.float32)).tobytes()
                pad = -offset % 4096  # page-aligned, as onnx writes external data (mmap-friendly)
                out.write(b"\0" * pad)
                offset += pad
                out.write(raw)
                del tensor.external_data[:]
                for key, value in (("location", location), ("offset", offset), ("length", len(raw))):
                    tensor.external_data.add(key=key, value=str(value))
                tensor.data_location = onnx.TensorProto.EXTERNAL
                offset += len(raw)
    finally:
        for f in handles.values():
            f.close()


def topological_sort(graph) -> None:
    """Order `graph`'s nodes so that every input is produced before it is read (in place; Kahn's
    algorithm, ties broken by the original position), then move every node computed from constants
    alone (a weight's DequantizeLinear, and a Cast after it) to just before its first reader.

    onnxruntime sorts what it loads, but onnx.checker (full check), Polygraphy's lint and other
    consumers require the order; the float16 converter appends its input Casts at the end. The
    quantizer puts every weight's DequantizeLinear near the top: run in that order (onnxruntime's
    priority-based order follows the node list) they would hold every weight in float at once."""
    import heapq

    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    waiting = [0] * len(nodes)  # unproduced inputs per node
    readers: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in set(_outer_inputs(node)):
            if name in producer and producer[name] != i:
                waiting[i] += 1
                readers.setdefault(producer[name], []).append(i)
    ready = [i for i, n in enumerate(waiting) if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in readers.get(i, []):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle: it cannot be sorted topologically")
    del graph.node[:]
    graph.node.extend(_constants_just_in_time(graph, [nodes[i] for i in order]))


def _constants_just_in_time(graph, nodes: list) -> list:
    """`nodes` (sorted) with the nodes that depend on constants alone placed right before their
    first reader (depth first, so a chain DequantizeLinear -> Cast stays in order)."""
    graph_inputs = {i.name for i in graph.input}  # an initializer named as an input can be overridden
    constant = {t.name for t in graph.initializer} - graph_inputs
    derived: dict[str, int] = {}  # output name -> index of the constant-only node writing it
    for i, node in enumerate(nodes):
        if all(not name or name in constant for name in _outer_inputs(node)):
            constant.update(node.output)
            derived.update({out: i for out in node.output if out})
    placed: set[int] = set()
    out: list = []

    def place(i: int) -> None:
        if i in placed:
            return
        for name in _outer_inputs(nodes[i]):
            if name in derived:
                place(derived[name])
        placed.add(i)
        out.append(nodes[i])

    movable = set(derived.values())
    for i, node in enumerate(nodes):
        if i not in movable:
            place(i)
    for i in sorted(movable):  # read by no other node (a graph output): where the sort put them, at the end
        place(i)
    return out


def _outer_inputs(node) -> list[str]:
    """A node's inputs, plus the outer-scope names its subgraphs (If/Loop/Scan bodies) read."""
    names = list(node.input)
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            inner = {o for n in sub.node for o in n.output} | {i.name for i in sub.input} | \
                    {t.name for t in sub.initializer}
            names += [i for n in sub.node for i in _outer_inputs(n) if i not in inner]
    return names


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
