"""Batch invariants of a deployed encoder: a row's result depends on that row alone.

    identical rows   a batch of B copies of one image gives B identical results
    batch size       row i of a batch of size b equals the same image run alone (b = 1 .. max)
    slot             reversing the batch reverses the results (a row's slot does not matter)

Not bit-exact: GEMM accumulation order may change with the batch size, so each invariant is judged
by the worst relative L2 distance ||row - row'|| / ||row|| against a per-precision threshold
(parity_tests.agreement.LEDGER_EXTRA["<precision>"]["invariants"]). A graph that mixes rows
(batch statistics, a wrong reshape) fails by orders of magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from export.core.metrics import rel_l2
from export.runners.base import Runner, image_feed


@dataclass
class InvariantResult:
    name: str  # "identical rows", "batch size", "slot"
    worst_rel_l2: float
    worst_case: str

    def to_json(self) -> dict:
        return {"name": self.name, "worst_rel_l2": self.worst_rel_l2, "worst_case": self.worst_case}


def batch_sizes_to_try(max_batch: int) -> list[int]:
    """1, 2, 3, the powers of two below max, and max: every kernel-shape regime without B^2 cost."""
    sizes = {b for b in (1, 2, 3) if b <= max_batch} | {max_batch}
    p = 4
    while p < max_batch:
        sizes.add(p)
        p *= 2
    return sorted(sizes)


def check_invariants(runner: Runner, pixels: np.ndarray, images: list, max_batch: int) -> list[InvariantResult]:
    """Run the three invariants on an active export.runners runner.

    `pixels` [N, 3, H, W] and `images` (N PIL images, for runners fed images) are distinct inputs;
    a batch of b rows takes rows 0..b-1 cyclically.
    """
    def run(x: np.ndarray, ims: list) -> dict[str, np.ndarray]:
        return runner.infer(image_feed(runner, x, ims))

    n = len(pixels)
    singles = [run(pixels[i:i + 1], images[i:i + 1]) for i in range(min(n, max_batch))]  # B = 1 each
    results = []

    # identical rows: B copies of image 0
    b = max(2, min(max_batch, 4)) if max_batch > 1 else 1
    out = run(np.repeat(pixels[:1], b, axis=0), [images[0]] * b)  # (b, 3, H, W) in
    worst, case = 0.0, "max_batch is 1"
    for name, value in out.items():
        for i in range(1, b):
            d = rel_l2(value[0], value[i])
            if d >= worst:
                worst, case = d, f"{name}: row {i} vs row 0 of {b} copies"
    results.append(InvariantResult("identical rows", worst, case))

    # batch size: every row against the same image alone
    worst, case = 0.0, ""
    for size in batch_sizes_to_try(max_batch):
        idx = [i % len(singles) for i in range(size)]
        out = run(pixels[idx], [images[i] for i in idx])  # (size, 3, H, W) in
        for name, value in out.items():
            for row, i in enumerate(idx):
                d = rel_l2(singles[i][name][0], value[row])
                if d >= worst:
                    worst, case = d, f"{name}: row {row} of batch {size} vs batch 1"
    results.append(InvariantResult("batch size", worst, case))

    # slot: the batch reversed
    size = min(max_batch, len(singles))
    idx = list(range(size))
    forward = run(pixels[idx], [images[i] for i in idx])
    backward = run(pixels[idx[::-1]], [images[i] for i in idx[::-1]])
    worst, case = 0.0, "max_batch is 1"
    for name in forward:
        for row in range(size):
            d = rel_l2(forward[name][row], backward[name][size - 1 - row])
            if d >= worst and size > 1:
                worst, case = d, f"{name}: image {row} in slot {row} vs slot {size - 1 - row}"
    results.append(InvariantResult("slot", worst, case))
    return results
