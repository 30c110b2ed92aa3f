"""Comparison metrics and data-driven thresholds (per precision, per output)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# metric -> (direction, description); a threshold passes when `value <direction> threshold`.
METRICS = {
    "max_abs": ("<=", "max |a - b|"),
    # Scale-aware: float32 rounding grows with the magnitudes a computation carries, which the
    # output's peak bounds (massive activations in a few channels are common in trained ViTs).
    # Not the RMS: it follows the ordinary channels, so the massive ones' own rounding would fail.
    "max_abs_rel": ("<=", "max |a - b| / max |a|, per output (a: the reference)"),
    "mean_abs": ("<=", "mean |a - b|"),
    "min_cosine": (">=", "minimum cosine over rows (tokens or images)"),
    "sqnr_db": (">=", "signal-to-quantization-noise ratio in dB"),
    # 1 when onnx.checker.check_model(path, full_check=True) accepts the file (Polygraphy's lint runs
    # the same check; unlike onnxruntime it requires topological order and consistent types), else 0.
    "onnx_checker": (">=", "the ONNX file passes onnx.checker's full check"),
}


def compare(reference: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """Metrics of `actual` against `reference`; rows are the last axis (one per token or image)."""
    if reference.shape != actual.shape:
        raise ValueError(f"shape mismatch: reference {reference.shape} vs actual {actual.shape}")
    ref = reference.astype(np.float64).reshape(-1, reference.shape[-1])  # (rows, C)
    act = actual.astype(np.float64).reshape(-1, actual.shape[-1])
    diff = ref - act
    cosine = row_cosines(ref, act)  # (rows,)
    noise = float(np.sum(diff**2))
    return {
        "max_abs": float(np.max(np.abs(diff))),
        "max_abs_rel": float(np.max(np.abs(diff)) / max(float(np.max(np.abs(ref))), 1e-30)),
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
        return (f"  [{mark(self.passed, self.enforced)}] {self.case:<32} {self.output:<18} {self.metric:<11} "
                f"{value:<12} {direction} {self.threshold:g}")

    def to_json(self) -> dict:
        return {**asdict(self), "passed": self.passed}


# ------------------------------------------------------------------ metrics beyond compare()'s checks

def row_cosines(reference: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row (the last axis: one per token or image), in float64."""
    if reference.shape != actual.shape:
        raise ValueError(f"shape mismatch: reference {reference.shape} vs actual {actual.shape}")
    ref = reference.astype(np.float64).reshape(-1, reference.shape[-1])  # (rows, C)
    act = actual.astype(np.float64).reshape(-1, actual.shape[-1])
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(act, axis=1)  # (rows,)
    return np.sum(ref * act, axis=1) / np.maximum(norms, 1e-30)


def rel_l2(reference: np.ndarray, actual: np.ndarray) -> float:
    """||reference - actual|| / ||reference|| over the whole array."""
    ref, act = reference.astype(np.float64), actual.astype(np.float64)
    return float(np.linalg.norm(ref - act) / max(float(np.linalg.norm(ref)), 1e-30))


def neighbour_ranks(embeddings: np.ndarray) -> np.ndarray:
    """(N, N-1) indices of the other images, most similar first (cosine), ties by index."""
    x = embeddings.astype(np.float64).reshape(len(embeddings), -1)  # (N, C)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    sim = x @ x.T  # (N, N)
    np.fill_diagonal(sim, -np.inf)  # an image is not its own neighbour
    order = np.argsort(-sim, axis=1, kind="stable")  # (N, N)
    return order[:, :-1]  # the last column is the image itself (-inf)


def nn_agreement(reference: np.ndarray, actual: np.ndarray, k: int = 5) -> dict[str, float]:
    """{"nn_top1", "nn_top5"} of `actual`'s pooled embeddings against `reference`'s (N >= 3 images).

    For every image, rank the other images by cosine similarity, once per embedding set. top-1: the
    fraction of images whose nearest neighbour is the same; top-5: the mean of
    |top5_reference ∩ top5_actual| / 5 (k = min(5, N - 1)). A retrieval index built on the actual
    embeddings behaves like the reference's exactly when both are 1.
    """
    if reference.shape != actual.shape:
        raise ValueError(f"shape mismatch: reference {reference.shape} vs actual {actual.shape}")
    n = len(reference)
    if n < 3:
        raise ValueError(f"nearest-neighbour agreement needs at least 3 images, got {n}")
    k = min(k, n - 1)
    ref, act = neighbour_ranks(reference), neighbour_ranks(actual)
    top1 = float(np.mean(ref[:, 0] == act[:, 0]))
    overlap = [len(set(r[:k]) & set(a[:k])) / k for r, a in zip(ref, act)]
    return {"nn_top1": top1, "nn_top5": float(np.mean(overlap))}
