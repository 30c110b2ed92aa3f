"""Parity: the ONNX file in onnxruntime against the PyTorch reference (transformers), on held-out views.

The views (export.core.images.held_out_photos) are photographs calibration never saw, each in several
deterministic views; every threshold is judged on the worst view, and the pooled embeddings must retrieve
PyTorch's (recall@1, nearest-neighbour agreement).

The reference is the unpatched transformers model: the custom op, the lowerings and the export
are all on the ONNX side of the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export.core.images import HELD_OUT_PHOTOS, VIEWS, held_out_photos, identity_of, pixel_values
from export.core.interface import INPUT_NAME
from export.core.metrics import Check, compare, nn_agreement, passes, recall_at_1, thresholds_for, worst_and_p5
from export.graph.trace import ExportShape
from export.models.families import RETRIEVAL
from export.models.flops import flops_per_image
from export.models.loading import Checkpoint
from export.runners.base import ort_mode_for
from export.runners.ort import OnnxRuntimeRunner
from export.runners.pyt import TorchRunner

# The views are run in batches of these sizes (the last repeats): one view alone, then batches of 3, so
# that a graph that mishandles the batch axis fails too.
BATCH_SIZES = (1, 3)
# Views judged by default: as many held-out views as fit in VIEW_BUDGET_TFLOPS, within [MIN_VIEWS, every
# view]: every model up to ViT-L/14@336 (0.38 TFLOPs an image) gets the whole set (49 views); RICE-L-560
# (1.2) and MLCD-bigG (4.1) get MIN_VIEWS, a prefix that still covers every photograph (images.held_out_photos).
VIEW_BUDGET_TFLOPS = 20.0
MIN_VIEWS = 16
# A second, non-square size (dynamic-resolution exports) is judged on this many views.
SECOND_SIZE_VIEWS = 4
# onnxruntime modes reported beside the judged one (int8's integer kernels) run on this many views: they
# judge nothing, and the int8 "optimized" session costs as much as the judged one.
INFORMATIONAL_VIEWS = 8
# The bar beside which retrieval metrics that no table judges are reported: PyTorch's own answer.
RETRIEVAL_IDEAL = {"recall_at_1": 1.0, "nn_top1": 1.0, "nn_top5": 1.0}


def default_view_count(config, size: tuple[int, int]) -> int:
    """Held-out views the export's parity judges for a model `config` at `size` (H, W)."""
    every = len(HELD_OUT_PHOTOS) * len(VIEWS)
    tflops = flops_per_image(config, *size)["total"] / 1e12
    return max(min(MIN_VIEWS, every), min(every, int(VIEW_BUDGET_TFLOPS / max(tflops, 1e-9))))


@dataclass
class ParityReport:
    precision: str
    checks: list[Check] = field(default_factory=list)
    measured: list[dict] = field(default_factory=list)  # every metric of every view, thresholded or not
    notes: list[str] = field(default_factory=list)
    views: int = 0  # held-out views judged (at the export's size)
    # {output: {metric: {"worst", "p5", "worst_view"}}} over the judged views, every size
    summary: dict[str, dict[str, dict]] = field(default_factory=dict)
    retrieval: dict = field(default_factory=dict)  # recall_at_1, nn_top1, nn_top5 of the pooled output

    @property
    def passed(self) -> bool:
        enforced = [c for c in self.checks if c.enforced]
        return bool(enforced) and all(c.passed for c in enforced)

    def checklist(self) -> str:
        lines = [f"parity ({self.precision}, onnxruntime vs PyTorch reference, worst of {self.views} held-out views):"]
        lines += [c.line() for c in self.checks]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)

    def worst(self) -> dict[str, dict[str, float]]:
        """Per output: the worst value of each judged metric over all views (for the manifest)."""
        return self._per_output("worst")

    def p5(self) -> dict[str, dict[str, float]]:
        """Per output: the 5th-percentile value of each judged metric (95% of the views do at least as well)."""
        return self._per_output("p5")

    def _per_output(self, key: str) -> dict[str, dict[str, float]]:
        return {output: {metric: v[key] for metric, v in metrics.items()} for output, metrics in self.summary.items()}

    def manifest_summary(self) -> dict:
        """The manifest's `parity` entry: the verdict, the number of views, worst and 5th percentile, retrieval."""
        return {"passed": self.passed, "views": self.views, "worst": self.worst(), "p5": self.p5(),
                "retrieval": self.retrieval}

    def to_json(self) -> dict:
        return {"precision": self.precision, "passed": self.passed, "views": self.views, "worst": self.worst(),
                "p5": self.p5(), "outputs": self.summary, "retrieval": self.retrieval,
                "checks": [c.to_json() for c in self.checks], "measured": self.measured, "notes": self.notes}


def parity_sizes(checkpoint: Checkpoint, shape: ExportShape) -> list[tuple[int, int]]:
    """Resolutions to check: the export's, plus a non-square one when the graph takes any size."""
    sizes = [(shape.height, shape.width)]
    if shape.dynamic_resolution:
        p = checkpoint.patch_size
        sizes.append((shape.height + 2 * p, max(p, shape.width - p)))  # taller than wide
    return sizes


@dataclass
class ReferenceCase:
    """One batch of held-out views and the PyTorch reference's outputs for it."""

    height: int
    width: int
    batch: int
    feed: dict  # {INPUT_NAME: (batch, 3, H, W) float32}
    outputs: dict  # {output name: array}
    views: list[str] = field(default_factory=list)  # the views' names ("coffee/jpeg"), one per row

    @property
    def size(self) -> str:
        return f"{self.height}x{self.width}"


def _batches(n: int, sizes) -> list[slice]:
    """Consecutive slices of range(n) of sizes[0], sizes[1], ..., the last size repeating."""
    out, start, i = [], 0, 0
    while start < n:
        step = sizes[min(i, len(sizes) - 1)]
        out.append(slice(start, min(n, start + step)))
        start, i = start + step, i + 1
    return out


def reference_outputs(checkpoint: Checkpoint, shape: ExportShape, *, batch_sizes=BATCH_SIZES,
                      views: int | None = None) -> list[ReferenceCase]:
    """The PyTorch reference on the held-out views (`views`: how many; None: default_view_count), every
    size: computed once, so that the model can be released before the memory-hungry ONNX steps (bigG is
    7.4 GB in fp32)."""
    count = views or default_view_count(checkpoint.config, (shape.height, shape.width))
    photos = held_out_photos(count)
    cases = []
    for i, (height, width) in enumerate(parity_sizes(checkpoint, shape)):
        chosen = photos if i == 0 else photos[:SECOND_SIZE_VIEWS]
        size = ExportShape(height, width, shape.dynamic_resolution, shape.hidden_layer)
        pixels = pixel_values(checkpoint.processor, [p.image for p in chosen], (height, width)).numpy()  # (N, 3, H, W)
        with TorchRunner(checkpoint, size) as reference_runner:
            for sl in _batches(len(chosen), batch_sizes):
                feed = {INPUT_NAME: pixels[sl]}
                cases.append(ReferenceCase(height, width, sl.stop - sl.start, feed, reference_runner.infer(feed),
                                           [p.name for p in chosen[sl]]))
    return cases


def onnx_parity(checkpoint: Checkpoint, shape: ExportShape, onnx_path: Path, *, precision: str = "fp32",
                batch_sizes=BATCH_SIZES, views: int | None = None, tolerances: dict | None = None,
                modes: dict[str, bool] | None = None, references: list[ReferenceCase] | None = None) -> ParityReport:
    """Compare `onnx_path` with the PyTorch reference on the held-out views; each threshold is judged on
    the worst view. `modes`: {ORT mode: enforced}; by default fp32 is judged with onnxruntime's defaults,
    fp16 in "exact" mode, int8 in "exact" mode (the TensorRT-like one) with "optimized" (integer kernels)
    reported beside it on INFORMATIONAL_VIEWS views. `references`: from reference_outputs (then the
    checkpoint's model is not used)."""
    tolerances = tolerances or checkpoint.family.tolerances
    if references is None:
        references = reference_outputs(checkpoint, shape, batch_sizes=batch_sizes, views=views)
    if modes is None:
        judged = ort_mode_for(precision)
        modes = {judged: True} if precision in ("fp32", "fp16") else {judged: True, "optimized": False}
    report = ParityReport(precision)
    output_names = checkpoint.family.output_names(shape.hidden_layer)
    pooled_name = checkpoint.family.pooled_output  # retrieval is judged on it
    main_size = references[0].size if references else ""
    report.views = sum(r.batch for r in references if r.size == main_size)
    # One onnxruntime session at a time: for large Q/DQ graphs the "optimized" session folds the
    # weights back to float, and two sessions side by side would hold both forms at once.
    for mode, enforced in modes.items():
        try:
            runner = OnnxRuntimeRunner(onnx_path, mode, output_names=output_names).activate()
        except Exception as exc:  # an informational mode must not hide the judged one
            if enforced:
                raise
            report.notes.append(f"onnxruntime {mode} mode could not load the graph: {_first_line(exc)}")
            continue
        suffix = "" if len(modes) == 1 else f" {mode}"
        # {size: {output: {metric: [(value, view)]}}}; pooled rows of the export's size for retrieval
        per_view: dict[str, dict[str, dict[str, list]]] = {}
        pooled: dict[str, list] = {"reference": [], "actual": [], "views": []}
        try:
            if runner.pluginref and not any("pluginref" in n for n in report.notes):
                report.notes.append("plugin nodes ran with the RoPE2D reference body (pluginref); "
                                    "the plugin kernel itself runs only in TensorRT")
            done: dict[str, int] = {}
            for ref in references:
                if not enforced and done.get(ref.size, 0) >= INFORMATIONAL_VIEWS:
                    continue
                done[ref.size] = done.get(ref.size, 0) + ref.batch
                actual = runner.infer(ref.feed)
                for name in output_names:
                    thresholds = thresholds_for(tolerances, precision, name)
                    for i, view in enumerate(ref.views or [f"#{i}" for i in range(ref.batch)]):
                        measured = compare(ref.outputs[name][i:i + 1], actual[name][i:i + 1])  # one view
                        report.measured.append({"size": ref.size, "batch": ref.batch, "view": view, "output": name,
                                                "ort_mode": mode, **measured})
                        for metric in thresholds:
                            per_view.setdefault(ref.size, {}).setdefault(name, {}).setdefault(metric, []).append(
                                (measured[metric], view))
                if ref.size == main_size and pooled_name in output_names:  # a --projector graph has none
                    pooled["reference"].append(ref.outputs[pooled_name])
                    pooled["actual"].append(actual[pooled_name])
                    pooled["views"] += list(ref.views)
        finally:
            runner.deactivate()
        for size, outputs in per_view.items():
            for name, metrics in outputs.items():
                thresholds = thresholds_for(tolerances, precision, name)
                for metric, values in metrics.items():
                    worst, p5, at = worst_and_p5(metric, [v for v, _ in values])
                    report.checks.append(Check(f"{len(values)} views @ {size}{suffix}", name, metric, worst,
                                               thresholds[metric], enforced, where=f"worst: {values[at][1]}"))
                    if enforced:
                        _summarize(report.summary, name, metric, worst, p5, values[at][1])
        if enforced and pooled["views"]:
            report.retrieval = _retrieval(np.concatenate(pooled["reference"]), np.concatenate(pooled["actual"]),
                                          pooled["views"])
            bars = tolerances.get(precision, {}).get(RETRIEVAL, {})  # judged; the others reported
            for metric in ("recall_at_1", "nn_top1", "nn_top5"):
                if metric in report.retrieval:
                    report.checks.append(Check(f"{len(pooled['views'])} views @ {main_size}", "retrieval", metric,
                                               report.retrieval[metric], bars.get(metric, RETRIEVAL_IDEAL[metric]),
                                               metric in bars))
    return report


def calibration_target_check(fallback: dict | None, held_out_passed: bool) -> Check | None:
    """The checklist row for a precision recipe's own targets on the calibration images (its per-layer
    fallback, export.precision.fallback): ok when met. A miss is a failed row unless the held-out verdict
    (`held_out_passed`: every other judged row) passes; then it is reported as a miss, never silently, and
    the manifest keeps precision_recipe.fallback.met_target = false. None: no fallback ran."""
    if not fallback or "met_target" not in fallback:
        return None
    met = bool(fallback["met_target"])
    kept = len(fallback.get("kept_out_of_low_precision", []))
    where = f"{kept} layers kept in float" + ("" if met or not held_out_passed else "; the held-out views pass")
    return Check("calibration images", "every output", "met_target", float(met), 1.0,
                 enforced=met or not held_out_passed, where=where)


def _summarize(summary: dict, output: str, metric: str, worst: float, p5: float, view: str) -> None:
    """Keep, per (output, metric), the worse of what `summary` holds (another size) and these figures."""
    entry = summary.setdefault(output, {}).get(metric)
    if entry is None:
        summary[output][metric] = {"worst": worst, "p5": p5, "worst_view": view}
        return
    if not passes(metric, worst, entry["worst"]):
        entry.update(worst=worst, worst_view=view)
    if not passes(metric, p5, entry["p5"]):
        entry["p5"] = p5


def _retrieval(reference: np.ndarray, actual: np.ndarray, views: list[str]) -> dict:
    """Retrieval of the deployed pooled embeddings (N, C) against PyTorch's on the same views."""
    identities = [identity_of(v) for v in views]
    out = {"views": len(views), "identities": len(set(identities)),
           "recall_at_1": recall_at_1(reference, actual, identities)}
    if len(views) >= 3:
        out.update(nn_agreement(reference, actual))
    return out


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
