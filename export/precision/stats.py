"""Activation statistics in one pass: the graph reduces every watched tensor to a few numbers itself.

The overflow scan, int8/fp8 calibration and smoothing all need statistics of intermediate tensors
on calibration images. Exposing the tensors as graph outputs would hold every one of them at once
(attention scores alone are 16 x 1025 x 1025 floats per image in MLCD-bigG), so instead each
watched tensor x gets reduction nodes placed right after its producer:

    x ──> ReduceMax(x), ReduceMin(x)                      # range: overflow scan, int8 max calibration
      ──> ReduceSum(x), ReduceSumSquare(x), Size(x)       # mean/std: fp8 scales (moments=True)
      ──> ReduceMax(x, axes=0..r-2), ReduceMin(...)       # per channel (last axis): smoothing

The session returns only those small arrays, so onnxruntime frees each activation as soon as its
consumers (now including the reductions) have run: memory stays at one layer's activations, and the
model runs once per calibration batch however many tensors are watched. onnxruntime's own
calibrators work the same way (ReduceMin/ReduceMax nodes), which is where the idea comes from.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

SUFFIX = "/mvt_stat/"


@dataclass
class TensorStats:
    """Running statistics of one tensor over all calibration batches."""

    min: float = math.inf
    max: float = -math.inf
    total: float = 0.0  # sum of values (moments)
    total_sq: float = 0.0  # sum of squares (moments)
    count: int = 0  # number of values (moments)
    channel_max: np.ndarray | None = None  # [C] max over all but the last axis (per_channel)
    channel_min: np.ndarray | None = None  # [C] min over all but the last axis (per_channel)
    finite: bool = True

    @property
    def channel_max_abs(self) -> np.ndarray | None:
        """[C] max |x| per channel (per_channel)."""
        if self.channel_max is None or self.channel_min is None:
            return None
        return np.maximum(np.abs(self.channel_max), np.abs(self.channel_min))

    def divided(self, factor: np.ndarray) -> "TensorStats":
        """The statistics of x / factor (factor [C] > 0, per channel), from the per-channel ones:
        what smoothing (smooth.py) makes of a LayerNorm output, without running the smoothed model.
        min and max are exact; the moments are not kept (no per-channel sums are collected)."""
        if self.channel_max is None or self.channel_min is None:
            raise ValueError("dividing statistics per channel needs per_channel statistics")
        factor = np.asarray(factor, np.float64)
        hi, lo = self.channel_max / factor, self.channel_min / factor  # (C,)
        return TensorStats(min=float(lo.min()), max=float(hi.max()), channel_max=hi, channel_min=lo,
                           finite=self.finite)

    def masked(self, keep: np.ndarray) -> "TensorStats":
        """The statistics of x * keep (keep [C] bool: channels kept, the others set to 0), from the per-channel
        ones: what outlier splitting (split.py) hands the int8 path."""
        if self.channel_max is None or self.channel_min is None:
            raise ValueError("masking statistics per channel needs per_channel statistics")
        keep = np.asarray(keep, bool)
        hi = np.where(keep, self.channel_max, 0.0)  # (C,)
        lo = np.where(keep, self.channel_min, 0.0)  # (C,)
        return TensorStats(min=float(lo.min()), max=float(hi.max()), channel_max=hi, channel_min=lo,
                           finite=self.finite)

    @property
    def max_abs(self) -> float:
        """Largest |value| seen; inf when a non-finite value was seen."""
        if not self.finite:
            return math.inf
        return max(abs(self.min), abs(self.max)) if self.max >= self.min else 0.0  # else: never updated

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        if not self.count:
            return 0.0
        return math.sqrt(max(self.total_sq / self.count - self.mean**2, 0.0))


@dataclass
class StatsPass:
    """What one pass watched and how long it took."""

    stats: dict[str, TensorStats] = field(default_factory=dict)
    batches: int = 0
    seconds: float = 0.0
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)  # the model's own, keep_outputs feeds


def float_tensor_ranks(model) -> dict[str, int | None]:
    """{name: rank or None} for every float32 node output of the main graph (shape inference on the
    graph alone: the weights are not needed, so > 2 GB models work when loaded without their data)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    info = {v.name: v.type.tensor_type for v in
            list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    out: dict[str, int | None] = {}
    for node in model.graph.node:
        for name in node.output:
            t = info.get(name)
            if name and t is not None and t.elem_type == onnx.TensorProto.FLOAT:
                out[name] = len(t.shape.dim) if t.HasField("shape") else None
    return out


def collect_stats(model_path: Path, feeds: Iterable[dict], tensors: Sequence[str], *,
                  per_channel: Sequence[str] = (), moments: Sequence[str] = (), model=None,
                  desc: str = "collecting activation statistics", providers: Sequence[str] | None = None,
                  keep_outputs: int = 0, log=print) -> StatsPass:
    """Run `model_path` once per feed with reductions of `tensors` (float32 intermediates) appended.

    per_channel: tensors whose max and min are also kept per channel (last axis; rank must be known).
    moments: tensors whose sum, sum of squares and count are kept (mean/std for fp8 scales).
    model: `model_path` already loaded without external data (saves a load).
    keep_outputs: also keep the model's own outputs for the first this many feeds (the fp32
    reference that int8's fallback judges against, without another run of the model).
    """
    import onnx
    from tqdm.auto import tqdm

    if model is None:
        model = onnx.load(str(model_path), load_external_data=False)
    watched = list(dict.fromkeys(list(tensors) + list(per_channel) + list(moments)))
    ranks = float_tensor_ranks(model) if per_channel else {}
    probe, outputs = _augment(model, watched, set(per_channel), set(moments), ranks)
    feeds = list(feeds)
    result = StatsPass({name: TensorStats() for name in watched})
    start = time.perf_counter()
    # A sibling file, so that relative external-data paths (model.onnx.data) resolve.
    tmp = Path(model_path).with_name(f".stats-probe-{Path(model_path).stem}.onnx")
    try:
        onnx.save(probe, str(tmp))
        del probe
        session = _session(tmp, providers)
        names = [name for _, name in outputs]
        own = [o.name for o in model.graph.output]
        for i, feed in enumerate(tqdm(feeds, desc=f"      {desc}", unit="batch", leave=False)):
            kept = own if i < keep_outputs else []
            values = session.run(names + kept, feed)
            for ((tensor, kind), _), value in zip(outputs, values):
                _update(result.stats[tensor], kind, value)
            for name, value in zip(kept, values[len(names):]):
                result.outputs.setdefault(name, []).append(value)
            result.batches += 1
    finally:
        tmp.unlink(missing_ok=True)
    result.seconds = time.perf_counter() - start
    log(f"      {desc}: {len(watched)} tensors, {result.batches} batches, {result.seconds:.1f} s")
    return result


def _update(s: TensorStats, kind: str, value: np.ndarray) -> None:
    if kind == "max":
        v = float(value)
        s.finite &= math.isfinite(v)
        s.max = max(s.max, v) if math.isfinite(v) else s.max
    elif kind == "min":
        v = float(value)
        s.finite &= math.isfinite(v)
        s.min = min(s.min, v) if math.isfinite(v) else s.min
    elif kind == "sum":
        s.total += float(value)
    elif kind == "sumsq":
        s.total_sq += float(value)
    elif kind == "size":
        s.count += int(value)
    elif kind == "channel_max":
        a = np.asarray(value, dtype=np.float64).reshape(-1)  # (C,)
        s.channel_max = a if s.channel_max is None else np.maximum(s.channel_max, a)
    elif kind == "channel_min":
        a = np.asarray(value, dtype=np.float64).reshape(-1)  # (C,)
        s.channel_min = a if s.channel_min is None else np.minimum(s.channel_min, a)


def _augment(model, watched: list[str], per_channel: set[str], moments: set[str], ranks: dict):
    """A copy of `model` with reduction nodes right after each watched tensor's producer, and their
    outputs as graph outputs. Returns (model, [((tensor, kind), output name)])."""
    import onnx
    from onnx import helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    axes_as_input = opset >= 18  # ReduceMax/ReduceMin take axes as an input from opset 18
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph = probe.graph
    position = {out: i for i, node in enumerate(graph.node) for out in node.output}
    inserts: dict[int, list] = {}  # producer index -> reduction nodes placed right after it
    outputs: list[tuple[tuple[str, str], str]] = []
    for n, tensor in enumerate(watched):
        base = f"{SUFFIX}{n}/"
        nodes = [
            helper.make_node("ReduceMax", [tensor], [base + "max"], keepdims=0, name=base + "max"),
            helper.make_node("ReduceMin", [tensor], [base + "min"], keepdims=0, name=base + "min"),
        ]
        kinds = ["max", "min"]
        if tensor in moments:
            nodes += [helper.make_node("ReduceSum", [tensor], [base + "sum"], keepdims=0, name=base + "sum"),
                      helper.make_node("ReduceSumSquare", [tensor], [base + "sumsq"], keepdims=0,
                                       name=base + "sumsq"),
                      helper.make_node("Size", [tensor], [base + "size"], name=base + "size")]
            kinds += ["sum", "sumsq", "size"]
        if tensor in per_channel:
            rank = ranks.get(tensor)
            if not rank or rank < 2:
                raise ValueError(f"per-channel statistics need a tensor of known rank >= 2; {tensor} has {rank}")
            axes = list(range(rank - 1))  # every axis but the channel one
            for op, kind in (("ReduceMax", "channel_max"), ("ReduceMin", "channel_min")):
                out = base + kind
                if axes_as_input:
                    graph.initializer.append(helper.make_tensor(out + "/axes", onnx.TensorProto.INT64,
                                                                [len(axes)], axes))
                    nodes.append(helper.make_node(op, [tensor, out + "/axes"], [out], keepdims=0, name=out))
                else:
                    nodes.append(helper.make_node(op, [tensor], [out], axes=axes, keepdims=0, name=out))
                kinds.append(kind)
        inserts.setdefault(position.get(tensor, -1), []).extend(nodes)
        outputs += [((tensor, kind), base + kind) for kind in kinds]
    ordered = list(inserts.get(-1, []))  # graph inputs: reduce first
    for i, node in enumerate(graph.node):
        ordered.append(node)
        ordered.extend(inserts.get(i, []))
    del graph.node[:]
    graph.node.extend(ordered)
    graph.output.extend(onnx.ValueInfoProto(name=name) for _, name in outputs)
    return probe, outputs


def _session(path: Path, providers: Sequence[str] | None):
    """onnxruntime with default optimizations (fusions never remove a tensor that a reduction still
    reads) in priority-based order, which runs each reduction right after its producer, so that the
    activation can be freed (ort_session's priority_order)."""
    from export.runners.ort import ort_session

    return ort_session(path, "optimized", providers, priority_order=True)
