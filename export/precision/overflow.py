"""Overflow localization: which fp32 tensors come near the fp16 range on real images.

Runs the fp32 graph in onnxruntime with every float intermediate exposed as an output, keeps the
running max |value| per tensor, and names the nodes to keep in fp32: the producer of such a tensor
and every consumer (a consumer in fp16 would cast the tensor to fp16 and overflow there).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .islands import FP16_MAX, HEADROOM

CHUNK = 256  # intermediate outputs per onnxruntime run: bounds host memory on large models


@dataclass
class OverflowFinding:
    node: str
    op_type: str
    tensor: str
    max_abs: float
    role: str  # "writes" or "reads" the tensor

    def to_json(self) -> dict:
        return asdict(self)


def float_intermediates(model) -> dict[str, tuple[str, str]]:
    """{tensor name: (producer node name, op type)} for float32 node outputs of the main graph."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.output)}
    out = {}
    for node in model.graph.node:
        for name in node.output:
            if name and types.get(name) == onnx.TensorProto.FLOAT:
                out[name] = (node.name, node.op_type)
    return out


def max_abs_per_tensor(model, model_path: Path, tensors: list[str], batches: Iterable[dict]) -> dict[str, float]:
    """Largest |value| of each of `tensors` over `batches` (input feeds); `model` is `model_path`
    loaded without its weights."""
    import onnx
    import onnxruntime as ort

    existing = {o.name for o in model.graph.output}
    batches = list(batches)
    peaks: dict[str, float] = {}
    for start in range(0, len(tensors), CHUNK):
        chunk = tensors[start:start + CHUNK]
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in chunk if t not in existing)
        # Sibling file so that relative external-data paths resolve.
        tmp = Path(model_path).with_name(f".overflow-probe-{start}.onnx")
        try:
            onnx.save(probe, str(tmp))
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
            options.log_severity_level = 3
            session = ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
            for feed in batches:
                for name, value in zip(chunk, session.run(chunk, feed)):
                    finite = np.abs(value[np.isfinite(value)]) if value.size else np.zeros(1)
                    peak = float(finite.max()) if finite.size else 0.0
                    if not np.all(np.isfinite(value)):
                        peak = float("inf")
                    peaks[name] = max(peaks.get(name, 0.0), peak)
        finally:
            tmp.unlink(missing_ok=True)
    return peaks


def localize_overflow(model_path: Path, batches: Iterable[dict], headroom: float = HEADROOM) -> list[OverflowFinding]:
    """Nodes that write or read a tensor whose max |value| exceeds FP16_MAX / headroom, largest first."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    producers = float_intermediates(model)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    limit = FP16_MAX / headroom
    findings: dict[str, OverflowFinding] = {}
    for tensor, peak in max_abs_per_tensor(model, model_path, list(producers), batches).items():
        if peak <= limit:
            continue
        node, op_type = producers[tensor]
        candidates = [(node, op_type, "writes")] + [(c.name, c.op_type, "reads") for c in consumers.get(tensor, [])]
        for name, op, role in candidates:
            if name not in findings or findings[name].max_abs < peak:
                findings[name] = OverflowFinding(name, op, tensor, peak, role)
    return sorted(findings.values(), key=lambda f: -f.max_abs)
