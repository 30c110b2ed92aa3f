"""Peak resident memory so far, for the progress lines and the manifest.

Each step logs the process's peak after it: the step at which the figure jumps is the one that set
the build's peak. (Linux can reset the high-water mark through /proc/self/clear_refs, but that also
resets what getrusage and `/usr/bin/time -v` report for the whole process, so it is not done here.)
"""

from __future__ import annotations

import resource
import sys


def peak_mib() -> float:
    """Peak resident MiB of this process so far."""
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, 1)


def describe(mib: float) -> str:
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"
