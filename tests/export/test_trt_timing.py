"""The benchmark's TensorRT timing summary (export/runners/trt_timing.py): the engine apart from the copies,
from given GPU timings. The measuring itself needs a GPU and TensorRT (scripts/benchmark.py runs it)."""

from __future__ import annotations

import pytest

from export.runners.trt_timing import EngineTiming, summarize


def _sample(h2d, compute, d2h, h2d_bytes=120_000_000, d2h_bytes=210_000_000):
    return EngineTiming(h2d_ms=h2d, compute_ms=compute, d2h_ms=d2h, h2d_bytes=h2d_bytes, d2h_bytes=d2h_bytes)


def test_summary_takes_medians_and_puts_the_copies_beside_the_engine():
    # RICE-L-560 at batch 32: ~120 MB in, ~210 MB out (issue 21); the copies are the same order as the engine
    samples = [_sample(10.0, 40.0, 20.0), _sample(12.0, 41.0, 21.0), _sample(11.0, 60.0, 19.0)]
    s = summarize(samples, host_seconds=[0.090, 0.080, 0.100])
    assert (s["engine_ms"], s["h2d_ms"], s["d2h_ms"]) == (41.0, 11.0, 20.0)
    assert s["h2d_MB"] == 120.0 and s["d2h_MB"] == 210.0
    assert s["h2d_GBps"] == pytest.approx(120e6 / 11e-3 / 1e9, abs=0.01)  # 10.9 GB/s
    assert s["d2h_GBps"] == pytest.approx(10.5)
    assert s["transfer_share"] == pytest.approx(31 / 72, abs=1e-4)  # copies / (engine + copies)
    assert s["host_ms"] == 90.0  # what a numpy caller waits: engine + copies + Polygraphy's host work


def test_summary_without_host_timings_or_samples():
    s = summarize([_sample(0.0, 1.0, 0.0, h2d_bytes=0, d2h_bytes=0)])
    assert s["host_ms"] is None and s["h2d_GBps"] is None and s["transfer_share"] == 0.0
    with pytest.raises(ValueError, match="no timed runs"):
        summarize([])
