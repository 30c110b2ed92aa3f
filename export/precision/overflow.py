"""Overflow localization: which fp32 tensors come near the fp16 range on real images.

Runs the fp32 graph in onnxruntime once per calibration batch with every float intermediate reduced
to its range inside the graph (stats.py), and names the nodes to keep in fp32: the producer of such
a tensor and every consumer (a consumer in fp16 would cast the tensor to fp16 and overflow there).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from export.precision.islands import FP16_MAX, HEADROOM


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
    from export.precision.stats import float_tensor_ranks

    floats = float_tensor_ranks(model)
    return {name: (node.name, node.op_type) for node in model.graph.node for name in node.output if name in floats}


def localize_overflow(model_path: Path, batches: Iterable[dict], headroom: float = HEADROOM,
                      log=print) -> list[OverflowFinding]:
    """Nodes that write or read a tensor whose max |value| exceeds FP16_MAX / headroom, largest first.

    One run of the model per calibration batch (stats.collect_stats: the graph reduces each tensor
    to its range itself, so memory stays at one layer's activations)."""
    import onnx

    from export.precision.stats import collect_stats

    model = onnx.load(str(model_path), load_external_data=False)
    producers = float_intermediates(model)
    run = collect_stats(model_path, batches, list(producers), model=model, desc="overflow scan", log=log)
    return overflow_findings(model, producers, run.stats, headroom)


def overflow_findings(model, producers: dict[str, tuple[str, str]], stats: dict,
                      headroom: float = HEADROOM) -> list[OverflowFinding]:
    """localize_overflow's verdict from statistics already collected (stats.TensorStats of every
    tensor in `producers`, float_intermediates(model)): int8/fp8 collect them in the same pass as
    their calibration."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    limit = FP16_MAX / headroom
    findings: dict[str, OverflowFinding] = {}
    for tensor in producers:
        peak = stats[tensor].max_abs
        if peak <= limit:
            continue
        node, op_type = producers[tensor]
        candidates = [(node, op_type, "writes")] + [(c.name, c.op_type, "reads") for c in consumers.get(tensor, [])]
        for name, op, role in candidates:
            if name not in findings or findings[name].max_abs < peak:
                findings[name] = OverflowFinding(name, op, tensor, peak, role)
    return sorted(findings.values(), key=lambda f: -f.max_abs)
