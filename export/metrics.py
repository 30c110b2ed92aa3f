"""Comparison metrics and data-driven thresholds (per precision, per output)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# metric -> (direction, description); a threshold passes when `value <direction> threshold`.
METRICS = {
    "max_abs": ("<=", "max |a - b|"),
    "mean_abs": ("<=", "mean |a - b|"),
    "min_cosine": (">=", "minimum cosine over rows (tokens or images)"),
    "sqnr_db": (">=", "signal-to-quantization-noise ratio in dB"),
}


def compare(reference: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """Metrics of `actual` against `reference`; rows are the last axis (one per token or image)."""
    if reference.shape != actual.shape:
        raise ValueError(f"shape mismatch: reference {reference.shape} vs actual {actual.shape}")
    ref = reference.astype(np.float64).reshape(-1, reference.shape[-1])  # (rows, C)
    act = actual.astype(np.float64).reshape(-1, actual.shape[-1])
    diff = ref - act
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(act, axis=1)
    cosine = np.sum(ref * act, axis=1) / np.maximum(norms, 1e-30)
    noise = float(np.sum(diff**2))
    return {
        "max_abs": float(np.max(np.abs(diff))),
        "mean_abs": float(np.mean(np.abs(diff))),
        "min_cosine": float(np.min(cosine)),
        "sqnr_db": float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref**2) / noise)),
    }


def passes(metric: str, value: float, threshold: float, table: dict = METRICS) -> bool:
    """Whether `value` meets `threshold` in `metric`'s direction (table: metric -> (direction, text))."""
    return value <= threshold if table[metric][0] == "<=" else value >= threshold


def mark(passed: bool, enforced: bool) -> str:
    """The checklist tag: judged checks say ok/FAIL, reported-only ones info/miss."""
    return ("ok  " if passed else "FAIL") if enforced else ("info" if passed else "miss")


def thresholds_for(table: dict, precision: str, output: str) -> dict[str, float]:
    """`table[precision]["*"]` overlaid with `table[precision][output]`."""
    per_precision = table.get(precision, {})
    return {**per_precision.get("*", {}), **per_precision.get(output, {})}


@dataclass
class Check:
    case: str  # e.g. "batch 3 @ 224x224"
    output: str
    metric: str
    value: float
    threshold: float
    enforced: bool = True  # False: reported beside the threshold, not judged

    @property
    def passed(self) -> bool:
        return passes(self.metric, self.value, self.threshold)

    def line(self) -> str:
        direction = METRICS[self.metric][0]
        value = f"{self.value:.8f}" if self.metric == "min_cosine" else f"{self.value:.3g}"
        return (f"  [{mark(self.passed, self.enforced)}] {self.case:<32} {self.output:<18} {self.metric:<10} "
                f"{value:<12} {direction} {self.threshold:g}")

    def to_json(self) -> dict:
        return {**asdict(self), "passed": self.passed}
