"""Tiny test checkpoints. They live in the product (export.models.testing: the benchmark, the load test and
scripts/outlier_int8.py use them too); this module names them for the parity tests.
"""

from __future__ import annotations

from export.models.testing import (
    OUTLIER_CHANNELS,
    OUTLIER_GAIN,
    OUTLIER_HIDDEN,
    save_outlier_checkpoint,
    save_tiny_checkpoint,
)

__all__ = ["save_tiny_checkpoint", "save_outlier_checkpoint", "OUTLIER_CHANNELS", "OUTLIER_GAIN", "OUTLIER_HIDDEN"]
