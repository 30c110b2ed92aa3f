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
    # Retrieval among the held-out views' pooled embeddings (recall_at_1, nn_agreement below).
    "recall_at_1": (">=", "each deployed embedding's nearest PyTorch embedding shows the same photograph"),
    "nn_top1": (">=", "nearest-neighbour agreement among pooled embeddings (top-1)"),
    "nn_top5": (">=", "nearest-neighbour overlap among pooled embeddings (top-5)"),
    # 1 when the precision recipe met its own targets on the calibration images (its per-layer fallback), else 0.
    "met_target": (">=", "the precision recipe met its calibration-image targets"),
}
# Metrics where a larger value is better (the rest: smaller is better).
HIGHER_IS_BETTER = frozenset(m for m, (direction, _) in METRICS.items() if direction == ">=")


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
    where: str = ""  # the input that gave `value` (the worst view), when the check summarizes many

    @property
    def passed(self) -> bool:
        return passes(self.metric, self.value, self.threshold)

    def line(self) -> str:
        direction = METRICS[self.metric][0]
        value = f"{self.value:.8f}" if self.metric == "min_cosine" else f"{self.value:.4g}"
        where = f"  ({self.where})" if self.where else ""
        return (f"  [{mark(self.passed, self.enforced)}] {self.case:<32} {self.output:<18} {self.metric:<11} "
                f"{value:<12} {direction} {self.threshold:g}{where}")

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


def _unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """(N, C) float64 rows of unit length (cosines are their dot products)."""
    x = embeddings.astype(np.float64).reshape(len(embeddings), -1)  # (N, C)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)


def _cosine_matrix(embeddings: np.ndarray) -> np.ndarray:
    x = _unit_rows(embeddings)
    return x @ x.T  # (N, N)


def neighbour_ranks(embeddings: np.ndarray, sim: np.ndarray | None = None) -> np.ndarray:
    """(N, N-1) indices of the other images, most similar first (cosine), ties by index.
    `sim`: their (N, N) cosine matrix, when the caller has it."""
    sim = (_cosine_matrix(embeddings) if sim is None else sim).copy()
    np.fill_diagonal(sim, -np.inf)  # an image is not its own neighbour
    order = np.argsort(-sim, axis=1, kind="stable")  # (N, N)
    return order[:, :-1]  # the last column is the image itself (-inf)


def worst_and_p5(metric: str, values) -> tuple[float, float, int]:
    """(worst value, 5th-percentile value, index of the worst) of `metric` over many inputs: the 5th
    percentile is the value that 95% of the inputs meet or beat (for a smaller-is-better metric, the 95th
    percentile of the values)."""
    v = np.asarray(values, np.float64)
    if metric in HIGHER_IS_BETTER:
        return float(v.min()), float(np.percentile(v, 5)), int(np.argmin(v))
    return float(v.max()), float(np.percentile(v, 95)), int(np.argmax(v))


def recall_at_1(gallery: np.ndarray, queries: np.ndarray, identities) -> float:
    """Fraction of `queries` (N, C) whose nearest `gallery` row (N, C; cosine) shows the query's identity.

    Row i of both is input i, `identities[i]` its photograph (views of one photo share it): the deployed
    embeddings (queries) against the reference's (gallery). 1.0 when every deployed embedding is still
    closer to a reference view of its own photograph than to any other photograph's."""
    if gallery.shape != queries.shape:
        raise ValueError(f"shape mismatch: gallery {gallery.shape} vs queries {queries.shape}")
    nearest = np.argmax(_unit_rows(queries) @ _unit_rows(gallery).T, axis=1)  # (N,) the closest gallery row
    ids = np.asarray(list(identities))
    return float(np.mean(ids[nearest] == ids))


# Neighbours whose reference cosines to an image differ by less than this are ties: the held-out set holds
# near-duplicate views of one photograph (a JPEG round trip, a rescale), which at small input sizes differ by
# 1e-6..4e-5 in cosine, so their order is float noise, not retrieval (measured on the tiny int8 models: every
# top-1 disagreement was such a tie within one photograph).
NN_TIE_COSINE = 1e-4


def nn_agreement(reference: np.ndarray, actual: np.ndarray, k: int = 5, tie: float = NN_TIE_COSINE) -> dict[str, float]:
    """{"nn_top1", "nn_top5"} of `actual`'s pooled embeddings against `reference`'s (N >= 3 images).

    For every image, rank the other images by cosine similarity, once per embedding set. top-1: the
    fraction of images whose nearest neighbour agrees; top-5: the mean fraction of the actual top-k
    (k = min(5, N - 1)) that the reference also ranks in its top-k. Neighbours the reference itself cannot
    tell apart (cosines within `tie` of its k-th, or of its nearest) count as the same rank. A retrieval
    index built on the actual embeddings behaves like the reference's exactly when both are 1.
    """
    if reference.shape != actual.shape:
        raise ValueError(f"shape mismatch: reference {reference.shape} vs actual {actual.shape}")
    n = len(reference)
    if n < 3:
        raise ValueError(f"nearest-neighbour agreement needs at least 3 images, got {n}")
    k = min(k, n - 1)
    sim = _cosine_matrix(reference)  # (N, N) the reference's own similarities
    ref, act = neighbour_ranks(reference, sim), neighbour_ranks(actual)  # (N, N-1)
    rows = np.arange(n)
    top1 = sim[rows, act[:, 0]] >= sim[rows, ref[:, 0]] - tie  # (N,)
    kth = sim[rows, ref[:, k - 1]]  # (N,) the reference's k-th nearest
    overlap = [np.mean(sim[i, act[i, :k]] >= kth[i] - tie) for i in range(n)]
    return {"nn_top1": float(np.mean(top1)), "nn_top5": float(np.mean(overlap))}
