"""The ledger's own metrics and thresholds (as data, per precision), checked with the same ok/FAIL
checklist lines as export.core.metrics.Check. The metrics themselves (relative L2, nearest-neighbour
agreement) are export.core.metrics'.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from export.core.metrics import METRICS, compare, mark, passes, rel_l2
from export.models.families import TOLERANCES

# metric -> (direction, description); a check passes when `value <direction> threshold`.
LEDGER_METRICS = {
    **METRICS,
    "rel_l2": ("<=", "||a - b|| / ||a|| over the whole output"),
    "invariant_rel_l2": ("<=", "worst ||row - same row elsewhere|| / ||row|| (batch invariants)"),
}

# Added to export.models.families.TOLERANCES: relative L2 on every output, NN agreement on the pooled
# output (POOLED: the family's pooled output, pooler_output or UNICOM's embedding), and how exactly a
# row must be reproduced whatever its batch (accumulation order in the GEMMs changes with the batch
# size, so not bit-exact: a few ulps of the compute precision).
POOLED = "<pooled>"
LEDGER_EXTRA = {
    "fp32": {"*": {"rel_l2": 1e-4}, POOLED: {"nn_top1": 1.0, "nn_top5": 0.98},
             "invariants": {"invariant_rel_l2": 1e-5}},
    "fp16": {"*": {"rel_l2": 2e-2}, POOLED: {"nn_top1": 0.9, "nn_top5": 0.9},
             "invariants": {"invariant_rel_l2": 5e-3}},
    "int8": {"*": {"rel_l2": 0.1}, POOLED: {"nn_top1": 0.8, "nn_top5": 0.8},
             "invariants": {"invariant_rel_l2": 5e-3}},
    # fp8 (E4M3) deployments: judged where they run (a GPU engine, or the served model)
    "fp8": {"*": {"rel_l2": 0.2}, POOLED: {"nn_top1": 0.8, "nn_top5": 0.8},
            "invariants": {"invariant_rel_l2": 5e-3}},
}


def ledger_thresholds(family_tolerances: dict | None = None, pooled_output: str = "pooler_output") -> dict:
    """{precision: {output or "*" or "invariants": {metric: threshold}}}: the family's parity table
    overlaid with LEDGER_EXTRA, whose pooled-output entries go to `pooled_output`."""
    base = family_tolerances or TOLERANCES
    out: dict = {}
    for precision in set(base) | set(LEDGER_EXTRA):
        merged: dict = {}
        for table in (base.get(precision, {}), LEDGER_EXTRA.get(precision, {})):
            for key, metrics in table.items():
                merged.setdefault(pooled_output if key == POOLED else key, {}).update(metrics)
        out[precision] = merged
    return out


def thresholds(table: dict, precision: str, output: str) -> dict[str, float]:
    per = table.get(precision, {})
    return {**per.get("*", {}), **per.get(output, {})} if output != "invariants" else dict(per.get("invariants", {}))


def measure(reference: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """export.core.metrics.compare plus the relative L2 error of the whole output."""
    return {**compare(reference, actual), "rel_l2": rel_l2(reference, actual)}


@dataclass
class LedgerCheck:
    stage: str
    output: str  # an output name, or "invariants"
    metric: str
    value: float
    threshold: float
    enforced: bool = True  # False: reported beside the threshold, not judged
    case: str = ""

    @property
    def passed(self) -> bool:
        return passes(self.metric, self.value, self.threshold, LEDGER_METRICS)

    def line(self) -> str:
        direction = LEDGER_METRICS[self.metric][0]
        value = f"{self.value:.6f}" if self.metric in ("min_cosine", "nn_top1", "nn_top5") else f"{self.value:.3g}"
        where = f"{self.output} {self.case}".strip()
        return (f"  [{mark(self.passed, self.enforced)}] {self.stage:<22} {where:<30} {self.metric:<17} {value:<11} "
                f"{direction} {self.threshold:g}")

    def to_json(self) -> dict:
        return {**asdict(self), "passed": self.passed}
