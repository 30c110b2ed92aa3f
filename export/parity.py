"""fp32 parity: the ONNX file in onnxruntime against the PyTorch reference (transformers), on photos.

The reference is the unpatched transformers model: the custom op, the lowerings and the export
are all on the ONNX side of the comparison.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .families import INPUT_NAME
from .images import pixel_values, sample_photos
from .loading import Checkpoint
from .metrics import Check, compare, thresholds_for
from .onnx_export import ExportShape, encoder_module

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


# onnxruntime modes. "exact": graph optimizations off, so Q/DQ pairs run as float simulation of int8,
# as TensorRT fuses them (int8 GEMM, float scales). "optimized": onnxruntime's defaults, which fuse
# Q/DQ into integer kernels that requantize outputs: what a CPU deployment of the file gets.
ORT_MODES = {"exact": "ORT_DISABLE_ALL", "optimized": "ORT_ENABLE_ALL"}


def onnx_parity(checkpoint: Checkpoint, shape: ExportShape, onnx_path: Path, *, precision: str = "fp32",
                batch_sizes=BATCH_SIZES, images=None, tolerances: dict | None = None,
                modes: dict[str, bool] | None = None) -> ParityReport:
    """Compare `onnx_path` with the PyTorch reference. `modes`: {ORT mode: enforced}; by default
    fp32 is judged with onnxruntime's defaults, fp16 in "exact" mode, int8 in "exact" mode (the
    TensorRT-like one) with "optimized" (integer kernels) reported beside it."""
    import torch

    tolerances = tolerances or checkpoint.family.tolerances
    images = images or sample_photos(max(batch_sizes))
    if modes is None:
        modes = {"fp32": {"optimized": True}, "fp16": {"exact": True}}.get(precision,
                                                                          {"exact": True, "optimized": False})
    report = ParityReport(precision)
    sessions = {}
    for mode, enforced in modes.items():
        try:
            sessions[mode], pluginref = onnx_session(onnx_path, mode)
        except Exception as exc:  # an informational mode must not hide the judged one
            if enforced:
                raise
            report.notes.append(f"onnxruntime {mode} mode could not load the graph: {_first_line(exc)}")
    if sessions and pluginref:
        report.notes.append("plugin nodes ran with the RoPE2D reference body (pluginref); "
                            "the plugin kernel itself runs only in TensorRT")
    with torch.no_grad():
        for height, width in parity_sizes(checkpoint, shape):
            encoder = encoder_module(checkpoint, ExportShape(height, width, shape.dynamic_resolution,
                                                             shape.hidden_layer))
            pixels = pixel_values(checkpoint.processor, images, (height, width))
            for batch in batch_sizes:
                x = pixels[:batch]
                reference = [t.numpy() for t in encoder(x)]
                for mode, enforced in modes.items():
                    if mode not in sessions:
                        continue
                    actual = sessions[mode].run(list(shape.output_names), {INPUT_NAME: x.numpy()})
                    case = f"batch {batch} @ {height}x{width}" + ("" if len(modes) == 1 else f" {mode}")
                    for name, ref, act in zip(shape.output_names, reference, actual):
                        measured = compare(ref, act)
                        report.measured.append({"case": case, "output": name, "ort_mode": mode, **measured})
                        for metric, threshold in thresholds_for(tolerances, precision, name).items():
                            report.checks.append(Check(case, name, metric, measured[metric], threshold, enforced))
    return report


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def onnx_session(path: Path, mode: str = "optimized"):
    """(onnxruntime CPU session for `path`, whether plugin nodes run with the reference body).

    Plugin-form RoPE2D nodes have no body; they get the reference body in a sibling copy that
    lives only while the session is created (the session holds the graph afterwards).
    """
    import onnx

    path = Path(path)
    with _runnable_copy(onnx.load(str(path), load_external_data=False), path) as runnable:
        return _session(runnable, mode), runnable != path


def _session(path: Path, mode: str = "optimized"):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_MODES[mode])
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _runnable_copy:
    """The model itself, or, when it holds plugin-form RoPE2D nodes (no body), a sibling copy with
    the reference body attached, so onnxruntime can run it (Polygraphy's pluginref idea)."""

    def __init__(self, model, path: Path):
        self.model, self.path, self.tmp = model, path, None

    def __enter__(self) -> Path:
        from . import onnx_rope

        nodes = onnx_rope.rope_nodes(self.model.graph)
        if not nodes or any(f.name == onnx_rope.OP_TYPE for f in self.model.functions):
            return self.path
        import onnx

        for node in nodes:
            del node.attribute[:]  # plugin_namespace / aot mean nothing to the body
        onnx_rope.attach_function(self.model)
        # Same folder, so that relative external-data locations still resolve.
        fd, name = tempfile.mkstemp(prefix=".pluginref-", suffix=".onnx", dir=self.path.parent)
        self.tmp = Path(name)
        with open(fd, "wb") as f:
            f.write(self.model.SerializeToString())
        return self.tmp

    def __exit__(self, *exc):
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
