"""SmoothQuant-style smoothing: move activation outliers into the following weights before int8/fp8.

Trained ViTs carry a few LayerNorm output channels 10-100x larger than the rest (the inputs of
q/k/v and the MLP). One per-tensor activation scale must cover the largest channel, which leaves
the ordinary channels a handful of int8 levels. For a LayerNorm output X whose every consumer is a
linear layer X @ W (W [in, out], a constant), per input channel j (Xiao et al., SmoothQuant,
arXiv:2211.10438, eq. 4):

    s_j = max|X_j|^alpha / max|W_j,:|^(1 - alpha)     (max|W_j,:| over every consumer's row j)
    LayerNorm gain and bias / s    ->  the same LayerNormalization op now writes X / s
    each consumer's weight rows * s  ->  (X / s) @ (s W) = X @ W, up to float rounding

The graph stays plain LayerNormalization -> MatMul, so the quantizer puts ordinary Q/DQ on the
smoothed activation (per tensor) and weight (per output channel): what TensorRT fuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.core.folder import DATA_SUFFIX, SMOOTHED_ONNX_NAME

# Migration strength: 0.5 splits the quantization difficulty evenly between activations and weights
# (SmoothQuant's default for most models; larger moves more of it into the weights).
ALPHA = 0.5
# Smooth a LayerNorm output when its largest per-channel peak exceeds this many times the median
# one. Random weights give 1.4-1.6x (the tiny test models); trained ViTs' outlier channels 10-100x.
# Below it there is nothing to migrate and the graph is left as traced.
MIN_SPREAD = 4.0
# Only integer grids lose precision to outlier channels. E4M3 (fp8) is a float format: its relative
# precision does not depend on the scale (measured: ~3.5% error per linear layer with or without
# smoothing, against 4.8% -> 1% for int8), and onnxruntime's fp8 weight scales (from the weights'
# std) would clip the rows that smoothing enlarges.
SMOOTHED_DTYPES = ("int8",)
SMOOTHED_DTYPES_WHY = ("fp8 E4M3 is a float format: its relative precision does not depend on the scale, so outlier "
                       "channels cost it nothing; smoothing would only enlarge weight rows that std-based fp8 "
                       "weight scales clip")
# Bounds on s_j: a dead channel (peak 0) or a runaway ratio must not turn a gain into 0 or inf.
FACTOR_RANGE = (1e-3, 1e3)


@dataclass
class SmoothTarget:
    """A LayerNormalization whose output feeds only constant-weight MatMuls."""

    layernorm: Any  # NodeProto
    tensor: str  # its output
    linears: list  # NodeProto, MatMul(tensor, weight)


def smoothable(model) -> tuple[list[SmoothTarget], list[dict]]:
    """(targets, [{"layernorm", "reason"}] for LayerNorms left alone) in graph order."""
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    targets, skipped = [], []
    for node in model.graph.node:
        if node.op_type != "LayerNormalization":
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        users = consumers.get(node.output[0], [])
        reason = None
        if axis != -1:
            reason = f"normalizes axis {axis}, not the channel (last) axis"
        elif node.input[1] not in inits or (len(node.input) > 2 and node.input[2] and node.input[2] not in inits):
            reason = "its gain or bias is not a constant"
        elif node.output[0] in graph_outputs:
            reason = "its output is a model output"
        elif not users or not all(_is_linear_on(u, node.output[0], inits) for u in users):
            others = sorted({u.op_type for u in users if not _is_linear_on(u, node.output[0], inits)})
            reason = f"it also feeds {', '.join(others) or 'nothing'}: only linear layers can absorb the factors"
        if reason:
            skipped.append({"layernorm": node.name, "reason": reason})
        else:
            targets.append(SmoothTarget(node, node.output[0], users))
    return targets, skipped


def _is_linear_on(node, tensor: str, inits: dict) -> bool:
    """MatMul(tensor, W) with a constant 2-D W [in, out]: its rows are the channels of `tensor`."""
    return (node.op_type == "MatMul" and node.input[0] == tensor and node.input[1] != tensor
            and node.input[1] in inits and len(inits[node.input[1]].dims) == 2)


def smoothing_factors(x_peak: np.ndarray, w_peak: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """s [C] from per-channel max|X| [C] and max|W row| [C]; 1 where either is 0 (nothing to balance)."""
    x_peak = np.asarray(x_peak, np.float64)
    w_peak = np.asarray(w_peak, np.float64)
    live = (x_peak > 0) & (w_peak > 0)
    s = np.ones_like(x_peak)
    s[live] = x_peak[live] ** alpha / w_peak[live] ** (1 - alpha)
    return np.clip(s, *FACTOR_RANGE)


def spread(peaks: np.ndarray) -> float:
    """Largest per-channel peak over the median one: how much one per-tensor scale wastes."""
    median = float(np.median(peaks))
    return float(np.max(peaks)) / median if median > 0 else float("inf")


def smoothing_tensors(model, dtype: str) -> list[str]:
    """The tensors whose per-channel statistics smoothing needs: the smoothable LayerNorm outputs
    (none for a dtype that is not smoothed)."""
    return [t.tensor for t in smoothable(model)[0]] if dtype in SMOOTHED_DTYPES else []


def smooth_for_quantization(path: Path, feeds: list[dict], *, dtype: str = "int8", dst: Path | None = None,
                            alpha: float = ALPHA, min_spread: float = MIN_SPREAD, log=print) -> dict:
    """Smooth the fp32 model at `path` into `dst` (default: `path` beside it as smoothed.onnx).

    dtype: the quantized type; only int8 is smoothed (see SMOOTHED_DTYPES).
    Returns the report for the manifest: which LayerNorm/linear layers were smoothed, their factor
    ranges and channel spreads before/after, and which LayerNorms were not and why. `dst` is written
    only when something was smoothed (report["smoothed"] is not empty); else quantize `path` itself.
    Weights are read and rewritten one tensor at a time, so a model with external data (> 2 GB)
    never sits in memory whole; the rewritten ones go to `dst`.data, the rest stay where they are.
    """
    return smooth_with_factors(path, feeds, dtype=dtype, dst=dst, alpha=alpha, min_spread=min_spread, log=log)[0]


def smooth_with_factors(path: Path, feeds: list[dict], *, dtype: str = "int8", dst: Path | None = None,
                        alpha: float = ALPHA, min_spread: float = MIN_SPREAD, stats: dict | None = None,
                        log=print) -> tuple[dict, dict[str, np.ndarray]]:
    """smooth_for_quantization, also returning {smoothed tensor: factors s [C]} (the smoothed model
    writes tensor / s). stats: per-channel statistics of smoothing_tensors already collected (then
    `feeds` are not run)."""
    import onnx

    from export.precision.stats import collect_stats

    path = Path(path)
    dst = Path(dst) if dst is not None else path.with_name(SMOOTHED_ONNX_NAME)
    model = onnx.load(str(path), load_external_data=False)
    targets, skipped = smoothable(model)
    report: dict[str, Any] = {
        "method": "SmoothQuant-style: s_j = max|X_j|^alpha / max|W_j|^(1-alpha) per input channel j of a "
                  "LayerNorm output X feeding only linear layers; LayerNorm gain and bias divided by s, "
                  "the linear layers' weight rows multiplied by s (same function, plain Q/DQ graph)",
        "alpha": alpha,
        "rule": f"smooth when the largest per-channel max |X| exceeds {min_spread:g} x the median one "
                f"(one per-tensor int8 scale would waste the range on the outlier channels)",
        "calibration_batches": len(feeds),
        "smoothed": [],
        "not_smoothed": list(skipped),
    }
    factors: dict[str, np.ndarray] = {}
    if dtype not in SMOOTHED_DTYPES:
        report["skipped"] = SMOOTHED_DTYPES_WHY
        return report, factors
    if not targets:
        return report, factors
    tensors = [t.tensor for t in targets]
    if stats is None:
        stats = collect_stats(path, feeds, tensors, per_channel=tensors, model=model,
                              desc="smoothing statistics", log=log).stats
    rewriter = _Rewriter(model, path.parent, dst)
    for target in targets:
        x_peak = np.asarray(stats[target.tensor].channel_max_abs, np.float64)  # (C,) max |X_j|, every token and image
        entry = {"layernorm": target.layernorm.name, "tensor": target.tensor,
                 "linear_layers": [n.name for n in target.linears], "spread": round(spread(x_peak), 2)}
        if spread(x_peak) <= min_spread:
            report["not_smoothed"].append({"layernorm": target.layernorm.name,
                                           "reason": f"channel peaks spread {spread(x_peak):.2f} x the median, "
                                                     f"at most {min_spread:g}: no outlier channels"})
            continue
        w_peak = np.zeros_like(x_peak)  # (C,) max |W_j,:| over every consumer, one weight in memory at a time
        for linear in target.linears:
            w_peak = np.maximum(w_peak, np.abs(rewriter.read(linear.input[1])).max(axis=1))  # W (C, out)
        s = smoothing_factors(x_peak, w_peak, alpha)  # (C,)
        rewriter.scale_input(target.layernorm, 1, 1 / s)  # gain
        if len(target.layernorm.input) > 2 and target.layernorm.input[2]:
            rewriter.scale_input(target.layernorm, 2, 1 / s)  # bias
        for linear in target.linears:
            rewriter.scale_input(linear, 1, s[:, None])  # (C, out) rows
        median = float(np.median(x_peak))
        outliers = [int(c) for c in np.argsort(-x_peak) if x_peak[c] > min_spread * median][:8]
        entry.update({
            "outlier_channels": outliers,
            "outlier_peaks": [round(float(x_peak[c]), 3) for c in outliers],  # max |X_j| of each
            "channel_peak_median": round(median, 4),
            "spread_after": round(spread(x_peak / s), 2),
            "factor_min": float(f"{s.min():.4g}"), "factor_max": float(f"{s.max():.4g}"),
            "why": f"channels {', '.join(map(str, outliers))} peak at up to {spread(x_peak):.1f} x the median channel; "
                   f"one per-tensor int8 scale would leave the others {127 / spread(x_peak):.0f} levels. "
                   f"Smoothed, the spread is {spread(x_peak / s):.1f} x",
        })
        report["smoothed"].append(entry)
        factors[target.tensor] = s
        log(f"      smoothing {target.layernorm.name} -> {', '.join(entry['linear_layers'])}: "
            f"channel spread {entry['spread']:.1f} -> {entry['spread_after']:.1f}, "
            f"factors {s.min():.3g}..{s.max():.3g}")
    if report["smoothed"]:
        rewriter.save()
    return report, factors


class _Rewriter:
    """Reads initializers one at a time (inline or external data) and replaces the ones it scales
    with private copies, so a weight or gain shared with another node keeps its value there."""

    def __init__(self, model, base_dir: Path, dst: Path):
        from onnx.external_data_helper import uses_external_data

        self.model, self.base_dir, self.dst = model, Path(base_dir), Path(dst)
        self.inits = {t.name: t for t in model.graph.initializer}
        self.external = any(uses_external_data(t) for t in model.graph.initializer)
        self.data = self.dst.with_name(self.dst.name + DATA_SUFFIX)
        self.data.unlink(missing_ok=True)
        self.offset = 0
        self.uses: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1
        self.names = set(self.inits) | {o for n in model.graph.node for o in n.output}

    def read(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.inits[name], str(self.base_dir))

    def scale_input(self, node, index: int, factor: np.ndarray) -> None:
        """node.input[index] (a float initializer) *= factor, in a copy private to this node."""
        from onnx import numpy_helper

        name = node.input[index]
        value = self.read(name)
        scaled = (value.astype(np.float64) * factor).astype(value.dtype)
        new = f"{name}_smoothed_{node.name}"
        while new in self.names:
            new += "_"
        self.names.add(new)
        self.uses[name] -= 1
        self.uses[new] = 1
        node.input[index] = new
        tensor = numpy_helper.from_array(scaled, new)
        if self.external and tensor.ByteSize() > 1024:  # keep the graph file small, as the source did
            self._externalize(tensor)
        self.model.graph.initializer.append(tensor)
        if self.uses[name] == 0:  # nobody reads the original any more
            self.model.graph.initializer.remove(self.inits.pop(name))

    def _externalize(self, tensor) -> None:
        from onnx.external_data_helper import set_external_data

        raw = tensor.raw_data
        with open(self.data, "ab") as f:
            f.write(raw)
        set_external_data(tensor, self.data.name, offset=self.offset, length=len(raw))
        tensor.data_location = tensor.EXTERNAL
        tensor.ClearField("raw_data")
        self.offset += len(raw)

    def save(self) -> None:
        import onnx

        onnx.save(self.model, str(self.dst))  # other external tensors keep pointing at the source's data file
