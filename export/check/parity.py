"""fp32 parity: the ONNX file in onnxruntime against the PyTorch reference (transformers), on photos.

The reference is the unpatched transformers model: the custom op, the lowerings and the export
are all on the ONNX side of the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from export.core.images import pixel_values, sample_photos
from export.core.interface import INPUT_NAME
from export.core.metrics import Check, compare, thresholds_for
from export.graph.trace import ExportShape
from export.models.loading import Checkpoint
from export.runners.base import ort_mode_for
from export.runners.ort import OnnxRuntimeRunner
from export.runners.pyt import TorchRunner

BATCH_SIZES = (1, 3)


@dataclass
class ParityReport:
    precision: str
    checks: list[Check] = field(default_factory=list)
    measured: list[dict] = field(default_factory=list)  # every metric, thresholded or not
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        enforced = [c for c in self.checks if c.enforced]
        return bool(enforced) and all(c.passed for c in enforced)

    def checklist(self) -> str:
        lines = [f"parity ({self.precision}, onnxruntime vs PyTorch reference):"]
        lines += [c.line() for c in self.checks]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)

    def worst(self) -> dict[str, dict[str, float]]:
        """Per output: the worst value of each metric over all cases (for the manifest)."""
        out: dict[str, dict[str, float]] = {}
        for c in self.checks:
            if not c.enforced:
                continue
            worst = out.setdefault(c.output, {})
            better_high = c.metric in ("min_cosine", "sqnr_db")
            prev = worst.get(c.metric)
            if prev is None or (c.value < prev if better_high else c.value > prev):
                worst[c.metric] = c.value
        return out

    def to_json(self) -> dict:
        return {"precision": self.precision, "passed": self.passed, "worst": self.worst(),
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
    """One parity input and the PyTorch reference's outputs for it."""

    height: int
    width: int
    batch: int
    feed: dict  # {INPUT_NAME: (batch, 3, H, W) float32}
    outputs: dict  # {output name: array}


def reference_outputs(checkpoint: Checkpoint, shape: ExportShape, *, batch_sizes=BATCH_SIZES,
                      images=None) -> list[ReferenceCase]:
    """The PyTorch reference on the parity photos, every size and batch: computed once, so that the
    model can be released before the memory-hungry ONNX steps (bigG is 7.4 GB in fp32)."""
    images = images or sample_photos(max(batch_sizes))
    cases = []
    for height, width in parity_sizes(checkpoint, shape):
        size = ExportShape(height, width, shape.dynamic_resolution, shape.hidden_layer)
        pixels = pixel_values(checkpoint.processor, images, (height, width)).numpy()  # (N, 3, H, W)
        with TorchRunner(checkpoint, size) as reference_runner:
            for batch in batch_sizes:
                feed = {INPUT_NAME: pixels[:batch]}
                cases.append(ReferenceCase(height, width, batch, feed, reference_runner.infer(feed)))
    return cases


def onnx_parity(checkpoint: Checkpoint, shape: ExportShape, onnx_path: Path, *, precision: str = "fp32",
                batch_sizes=BATCH_SIZES, images=None, tolerances: dict | None = None,
                modes: dict[str, bool] | None = None, references: list[ReferenceCase] | None = None) -> ParityReport:
    """Compare `onnx_path` with the PyTorch reference. `modes`: {ORT mode: enforced}; by default
    fp32 is judged with onnxruntime's defaults, fp16 in "exact" mode, int8 in "exact" mode (the
    TensorRT-like one) with "optimized" (integer kernels) reported beside it. `references`: from
    reference_outputs (then the checkpoint's model is not used)."""
    tolerances = tolerances or checkpoint.family.tolerances
    if references is None:
        references = reference_outputs(checkpoint, shape, batch_sizes=batch_sizes, images=images)
    if modes is None:
        judged = ort_mode_for(precision)
        modes = {judged: True} if precision in ("fp32", "fp16") else {judged: True, "optimized": False}
    report = ParityReport(precision)
    output_names = checkpoint.family.output_names(shape.hidden_layer)
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
        try:
            if runner.pluginref and not any("pluginref" in n for n in report.notes):
                report.notes.append("plugin nodes ran with the RoPE2D reference body (pluginref); "
                                    "the plugin kernel itself runs only in TensorRT")
            for ref in references:
                actual = runner.infer(ref.feed)
                case = f"batch {ref.batch} @ {ref.height}x{ref.width}" + ("" if len(modes) == 1 else f" {mode}")
                for name in output_names:
                    measured = compare(ref.outputs[name], actual[name])
                    report.measured.append({"case": case, "output": name, "ort_mode": mode, **measured})
                    for metric, threshold in thresholds_for(tolerances, precision, name).items():
                        report.checks.append(Check(case, name, metric, measured[metric], threshold, enforced))
        finally:
            runner.deactivate()
    return report


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
