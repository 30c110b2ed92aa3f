"""Numbered progress lines with timings: long steps (tracing bigG) say what is happening."""

from __future__ import annotations

import time
from typing import Callable

from export.core import memory


class Steps:
    """`[n/total] title ...` before a step, `done in X s (peak RSS so far Y)` after; timings and the
    peak after each step kept for the manifest (the step where it jumps set the build's peak).
    start: the number of steps already done elsewhere (the PyTorch child process continues the count)."""

    def __init__(self, total: int, log: Callable[[str], None], start: int = 0):
        self.total, self.log, self.n = total, log, start
        self.timings: dict[str, float] = {}
        self.peaks_mib: dict[str, float] = {}

    def run(self, title: str, fn, *args, **kwargs):
        self.n += 1
        self.log(f"[{self.n}/{self.total}] {title} ...")
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
        self.timings[title] = round(seconds, 2)
        self.peaks_mib[title] = memory.peak_mib()
        self.log(f"      done in {seconds:.1f} s (peak RSS so far {memory.describe(self.peaks_mib[title])})")
        return result

    def skip(self, message: str) -> None:
        """A step that does nothing this time still gets its number, so the count stays true."""
        self.n += 1
        self.log(f"[{self.n}/{self.total}] {message}")
