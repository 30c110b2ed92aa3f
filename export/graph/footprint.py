"""Peak memory of running a graph in onnxruntime at given input shapes, known before it is spent.

    estimate = estimate_peak(path, {"pixel_values": (1, 3, 2044, 2044)})
    check_fits(estimate, what="--size 2044 2044", change="a smaller --size")   # MemoryBudgetError if not

Every tensor's shape at those sizes comes from onnxruntime's symbolic shape inference (the exporter's own
value_info leaves some axes unnamed, the attention scores' among them). The peak is then found by walking the
nodes in the graph's order (ort_session runs them in that order), holding each tensor from the node that
makes it to its last reader:

    peak = weights x WEIGHT_COPIES + largest live activations x ACTIVATION_FACTOR + RUNTIME_OVERHEAD

Ops that onnxruntime runs as views (Reshape, Squeeze, Unsqueeze, Flatten, Identity) allocate nothing and
keep their input alive. MultiHeadAttention adds what its kernel holds inside; the standard Attention is
counted as the MatMul/Softmax/MatMul that onnxruntime's CPU kernel for it amounts to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

from export.core.errors import MemoryBudgetError
from export.core.memory import available_bytes

if TYPE_CHECKING:
    import onnx

GIB = 1024**3
# What onnxruntime keeps of each initializer: the tensor itself, plus the pre-packed copy its CPU MatMul
# kernels may make of constant weights.
WEIGHT_COPIES = 2.0
# What onnxruntime's CPU arena and kernels hold beyond the live tensors, over repeated runs (the arena keeps
# and splits what it once reserved). Fitted on the demo model (onnxruntime 1.32, 2 threads, VmHWM of a child
# per measurement, scripts/benchmark_attention.py): live-tensor estimate -> measured peak minus the runtime:
# mha 5,330 tokens 0.07 -> 0.37 GiB, mha 21,317 tokens 0.28 -> 0.78 GiB, decomposed 5,330 tokens 1.29 -> 3.0 GiB.
ACTIVATION_FACTOR = 2.5
# The interpreter, numpy, onnx, onnxruntime and the caller's arrays: an onnxruntime session on the demo model
# (42 MB of weights) holds 310 MB before its first run (measured, VmRSS).
RUNTIME_OVERHEAD = 300 * 1024**2
VIEW_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
# Fraction of the available memory an estimate may use: the estimate is a model, and the page cache,
# other processes and allocator fragmentation take their share.
HEADROOM = 0.9


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run is expected to hold at its peak, by part, and the tensor that dominates."""

    weights: int
    activations: int
    overhead: int
    largest: tuple[str, tuple[int, ...], int]  # (tensor, shape, bytes)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # the inputs it was made for

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.overhead

    def describe(self) -> str:
        name, shape, size = self.largest
        return (f"{self.total / GIB:.2f} GiB (weights {self.weights / GIB:.2f}, activations "
                f"{self.activations / GIB:.2f}, runtime {self.overhead / GIB:.2f}; largest tensor {name} "
                f"{list(shape)}: {size / GIB:.2f} GiB)")


@dataclass(frozen=True)
class WeightlessGraph:
    """A graph without its weights' data (they become inputs of their shape) and their size: what estimates
    need, small enough to keep beside a session (a 1.2 GB model.onnx with inline weights parses to 1.2 GB)."""

    proto: onnx.ModelProto
    weight_bytes: int


def weightless(model) -> WeightlessGraph:
    """`model` (a path, a ModelProto or a WeightlessGraph) as a WeightlessGraph; RoPE2D nodes decomposed
    (shape inference does not know the custom op) and the standard Attention as the MatMul/Softmax/MatMul
    that onnxruntime 1.32's CPU kernel for it amounts to (it materializes the scores and their softmax: 6.6 GB
    at S = 16,384, 6 heads, measured; the shape inference also reads any node named Attention as the
    com.microsoft one)."""
    import onnx
    from onnx import helper

    from export.graph import rope_node
    from export.graph.attention import lower_attention, lowered_attention
    from export.graph.lowering import lower_rope

    if isinstance(model, WeightlessGraph):
        return model
    proto = onnx.load(str(model), load_external_data=False) if isinstance(model, (str, Path)) else model
    graph_only = onnx.ModelProto()
    graph_only.CopyFrom(proto)
    del proto  # the caller's copy only, when it passed one
    graph = graph_only.graph
    # Integer initializers (shape vectors, axes) keep their values, which shape inference reads; weights
    # become inputs of their shape, so nothing reads (or needs) their data.
    keep = [t for t in graph.initializer if t.data_type in _INDEX_TYPES and not t.external_data]
    moved = [t for t in graph.initializer if t.data_type not in _INDEX_TYPES or t.external_data]
    weight_bytes = sum(_tensor_bytes(t) for t in moved)
    weights = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in moved]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    graph.input.extend(weights)
    if rope_node.rope_nodes(graph):
        graph_only = lower_rope(graph_only, "decomposed")
    if lowered_attention(graph_only) == "onnx23":
        graph_only = lower_attention(graph_only, "decomposed")
    return WeightlessGraph(graph_only, weight_bytes)


def estimate_peak(model, shapes: Mapping[str, Iterable[int]]) -> MemoryEstimate:
    """The estimated peak of one onnxruntime run of `model` (a path, ModelProto or WeightlessGraph) with
    float32 inputs of `shapes`."""
    import numpy as np
    import onnx

    light = weightless(model)
    concrete = {name: tuple(int(d) for d in dims) for name, dims in shapes.items()}
    inferred = _infer(light.proto, concrete)
    sizes, dims_of = {}, {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.output):
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else 0 for d in tensor.shape.dim)
        if tensor.elem_type:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize
            sizes[value.name] = int(np.prod(dims, dtype=np.int64)) * itemsize
            dims_of[value.name] = dims
    for name, input_dims in concrete.items():
        sizes[name] = int(np.prod(input_dims, dtype=np.int64)) * 4
        dims_of[name] = input_dims
    activations, largest = _live_peak(inferred.graph, sizes, concrete)
    name = largest or next(iter(concrete))
    return MemoryEstimate(int(light.weight_bytes * WEIGHT_COPIES), int(activations * ACTIVATION_FACTOR),
                          RUNTIME_OVERHEAD, (name, dims_of.get(name, ()), sizes.get(name, 0)), concrete)


def check_fits(estimate: MemoryEstimate, *, what: str, change: str, available: int | None = None,
               session_loaded: bool = False) -> MemoryEstimate:
    """Return `estimate` if it fits in HEADROOM of the memory available; else raise MemoryBudgetError
    saying what was asked (`what`), the estimate, and what to change (`change`).

    session_loaded: the session already holds the weights and the runtime (they are no longer in the
    available memory), so only the activations must still fit."""
    free = available_bytes() if available is None else available
    needed = estimate.activations if session_loaded else estimate.total
    if free is None or needed <= HEADROOM * free:
        return estimate
    part = "activations" if session_loaded else "in all"
    raise MemoryBudgetError(f"{what} would need about {estimate.describe()}: {needed / GIB:.2f} GiB {part}, "
                            f"more than the {HEADROOM * free / GIB:.2f} GiB this machine can give it "
                            f"({free / GIB:.2f} GiB available); {change}")


def _infer(proto: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of the (weightless) graph with every value_info concrete at `shapes`."""
    import onnx

    concrete = onnx.ModelProto()
    concrete.CopyFrom(proto)
    for value in concrete.graph.input:
        if value.name in shapes:
            for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name]):
                dim.Clear()
                dim.dim_value = size
    del concrete.graph.value_info[:]
    return _symbolic_shape_inference().infer_shapes(concrete, auto_merge=True)


def _symbolic_shape_inference():
    """onnxruntime's SymbolicShapeInference (onnxruntime/tools/symbolic_shape_infer.py), loaded from its file:
    the onnxruntime.tools package imports torch in its __init__ (pytorch_export_helpers), which processes
    that only run onnxruntime should not pay for (4.7 s of 15 s measured under load); the module itself needs
    numpy, onnx and sympy."""
    import importlib.util
    import sys

    name = "_mvt_symbolic_shape_infer"
    if name not in sys.modules:
        package = importlib.util.find_spec("onnxruntime")
        assert package is not None and package.submodule_search_locations
        path = Path(list(package.submodule_search_locations)[0]) / "tools" / "symbolic_shape_infer.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].SymbolicShapeInference


_INDEX_TYPES = (7, 6)  # onnx.TensorProto.INT64, INT32


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    import numpy as np
    import onnx

    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _live_peak(graph: onnx.GraphProto, sizes: Mapping[str, int], inputs: Iterable[str]) -> tuple[int, str | None]:
    """Largest sum of live activations over the node order (plus the running node's workspace), and the
    largest tensor alive at that point."""
    last_use: dict[str, int] = {}
    owner: dict[str, str] = {}  # a view's name -> the tensor whose memory it is
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name:
                last_use[owner.get(name, name)] = index
        if node.op_type in VIEW_OPS and node.input and node.input[0]:
            for out in node.output:
                owner[out] = owner.get(node.input[0], node.input[0])
    end = len(graph.node)
    for output in graph.output:
        last_use[owner.get(output.name, output.name)] = end
    live: dict[str, int] = {name: sizes.get(name, 0) for name in inputs}
    peak, peak_largest = sum(live.values()), None
    for index, node in enumerate(graph.node):
        for out in node.output:
            if out and out not in owner:
                live[out] = sizes.get(out, 0)
        current = sum(live.values()) + _attention_workspace(node, sizes)
        if current > peak:
            peak, peak_largest = current, max(live, key=lambda n: live[n])
        for name in [n for n in live if last_use.get(n, -1) <= index]:
            del live[name]
    return peak, peak_largest


def _attention_workspace(node: onnx.NodeProto, sizes: Mapping[str, int]) -> int:
    """What onnxruntime's CPU MultiHeadAttention holds inside: q, k, v transposed to [B, N, S, H] and
    per-thread FlashAttention blocks of a few MB (contrib_ops/cpu/bert/multihead_attention.cc): its three
    inputs' worth again."""
    from export.graph.attention import MHA_DOMAIN, MHA_OP

    if node.domain == MHA_DOMAIN and node.op_type == MHA_OP:
        return sum(sizes.get(name, 0) for name in node.input[:3] if name)
    return 0
