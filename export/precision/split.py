"""Outlier-channel splitting: a LayerNorm's few outlier channels take a float path; the rest is int8.

Trained ViTs carry a few LayerNorm output channels 30-100x larger than the rest. Smoothing (smooth.py)
moves part of that range into the weights, but both sides still pay: the ordinary channels keep a few
int8 levels, the weight rows of the outlier channels take most of each output channel's weight range.
On the outlier test models the error left lands in the attention logits, which the outlier channels
dominate (q and k both carry them), and a saturated softmax turns it into a different attention
pattern. Splitting (LLM.int8()'s decomposition, Dettmers et al., arXiv:2208.07339, with the channels
found on calibration images instead of per batch) keeps those channels out of int8 altogether, for a
LayerNorm output X [.., C] whose every consumer is a linear layer X @ W, outlier channels O:

    X ──> Mul(X, mask)   (mask: 0 on O, 1 elsewhere) ──> Q/DQ ──> MatMul(·, W)   int8, as before ──┐
      └─> Gather(X, O, axis=-1) [.., |O|] ──> MatMul(·, W[O, :])   float, K = |O| ──────────── Add ─> Y

Y = X @ W up to float rounding. The int8 path sees no outlier (its range is the ordinary channels'),
its weights keep their own range, and the outlier channels' contribution is exact to fp16. The side
path is a GEMM of depth |O| (2-8): its cost is |O| / C of the layer's. The graph stays plain MatMul
with Q/DQ plus pointwise Mul/Add and a Gather, which TensorRT fuses or runs as such.

Measured against smoothing, rotation and other calibration methods on the outlier models:
docs/precision.md#activation-outliers-smoothing-splitting-and-the-per-layer-fallback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# A channel is an outlier when its peak |X_j| on the calibration images exceeds this many times the median
# channel's (smooth.MIN_SPREAD: the same rule decides that a LayerNorm needs either treatment).
OUTLIER_RATIO = 4.0
# Split only a few channels: the side path's depth is their number, and beyond a handful the LayerNorm is
# not "a few channels" any more (smoothing handles it instead).
MAX_SPLIT_CHANNELS = 8
# Nodes of the float side path end with this: the quantizer leaves them alone (qdq.quantizable_nodes).
FLOAT_PATH_SUFFIX = "/outlier_float"
SPLIT_DTYPES = ("int8",)  # fp8 is a float format: outliers cost it no precision (smooth.SMOOTHED_DTYPES_WHY)


def outlier_channels(peaks: np.ndarray, ratio: float = OUTLIER_RATIO) -> list[int]:
    """Channels whose peak exceeds `ratio` x the median peak, largest first."""
    peaks = np.asarray(peaks, np.float64)
    median = float(np.median(peaks))
    return [int(c) for c in np.argsort(-peaks) if peaks[c] > ratio * median]


def split_outlier_channels(path: Path, dst: Path, stats: dict, *, dtype: str = "int8", log=print) -> tuple[dict, dict]:
    """Split the outlier channels of the fp32 model at `path` into `dst` (written only when something was
    split). `stats`: per-channel statistics of smooth.smoothing_tensors (the recipe's one pass).

    Returns (report for the manifest, {new tensor: stats.TensorStats} for the tensors the quantizer will
    calibrate that the fp32 model does not have: the masked activations, and the int8 layers' renamed
    outputs)."""
    import onnx
    from onnx import helper, numpy_helper

    from export.precision.smooth import smoothable

    path, dst = Path(path), Path(dst)
    report: dict[str, Any] = {
        "method": "outlier channels of a LayerNorm output X feeding only linear layers take a float path: "
                  "Gather(X, O) @ W[O] added to the int8 MatMul of X with those channels masked to 0 "
                  "(LLM.int8()-style decomposition, channels fixed from the calibration images)",
        "rule": f"channels whose peak |X_j| exceeds {OUTLIER_RATIO:g} x the median channel's, when at most "
                f"{MAX_SPLIT_CHANNELS}; more are left to smoothing",
        "split": [],
    }
    derived: dict = {}
    if dtype not in SPLIT_DTYPES:
        report["skipped"] = "fp8 E4M3 is a float format: outlier channels cost it no precision"
        return report, derived
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    names = set(inits) | {o for n in graph.node for o in n.output}

    def fresh(name: str) -> str:
        while name in names:
            name += "_"
        names.add(name)
        return name

    for target in smoothable(model)[0]:
        peaks = stats[target.tensor].channel_max_abs  # (C,)
        channels = outlier_channels(peaks)
        if not channels or len(channels) > MAX_SPLIT_CHANNELS:
            continue
        x = target.tensor
        keep = np.ones(len(peaks), np.float32)  # (C,)
        keep[channels] = 0
        mask, index = fresh(f"{x}/outlier_mask"), fresh(f"{x}/outlier_channels")
        graph.initializer.extend([numpy_helper.from_array(keep, mask),
                                  numpy_helper.from_array(np.array(channels, np.int64), index)])
        masked, picked = fresh(f"{x}/masked"), fresh(f"{x}/outliers")  # (.., C) int8 side, (.., |O|) float side
        new = [helper.make_node("Mul", [x, mask], [masked], name=fresh(f"{x}/mask")),
               helper.make_node("Gather", [x, index], [picked], axis=-1, name=fresh(f"{x}/gather_outliers"))]
        derived[masked] = stats[x].masked(keep.astype(bool))
        for linear in target.linears:
            weight = numpy_helper.to_array(inits[linear.input[1]], str(path.parent))  # W (C, out)
            rows = fresh(f"{linear.input[1]}/outlier_rows")
            graph.initializer.append(numpy_helper.from_array(weight[channels], rows))  # (|O|, out)
            y = linear.output[0]
            int8_part, float_part = fresh(f"{y}/int8_part"), fresh(f"{y}/outlier_part")
            linear.input[0], linear.output[0] = masked, int8_part
            new += [helper.make_node("MatMul", [picked, rows], [float_part],
                                     name=fresh(linear.name + FLOAT_PATH_SUFFIX)),
                    helper.make_node("Add", [int8_part, float_part], [y], name=fresh(f"{linear.name}/add_outliers"))]
            if y in stats:  # outputs are not quantized; the quantizer still asks for a range
                derived[int8_part] = stats[y]
        graph.node.extend(new)
        report["split"].append({
            "layernorm": target.layernorm.name, "tensor": x, "linear_layers": [n.name for n in target.linears],
            "outlier_channels": channels, "outlier_peaks": [round(float(peaks[c]), 3) for c in channels],
            "channel_peak_median": round(float(np.median(peaks)), 4),
            "why": f"channels {', '.join(map(str, channels))} peak at up to "
                   f"{float(np.max(peaks)) / max(float(np.median(peaks)), 1e-30):.1f} x the median channel; "
                   f"they take a float path of depth {len(channels)}, the int8 path keeps the ordinary range"})
        log(f"      splitting {len(channels)} outlier channels of {target.layernorm.name} into a float path "
            f"({', '.join(n.name for n in target.linears)})")
    if report["split"]:
        from export.precision.fp16 import topological_sort

        topological_sort(graph)
        onnx.save(model, str(dst))  # other weights keep pointing at the source's data file (same folder)
    return report, derived
