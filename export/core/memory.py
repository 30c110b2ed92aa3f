"""Peak resident memory so far, for the progress lines and the manifest.

Each step logs the process's peak after it: the step at which the figure jumps is the one that set
the build's peak. (Linux can reset the high-water mark through /proc/self/clear_refs, but that also
resets what getrusage and `/usr/bin/time -v` report for the whole process, so it is not done here.)
"""

from __future__ import annotations

import resource
import sys


def peak_mib(children: bool = False) -> float:
    """Peak resident MiB of this process so far (children: of its largest finished child)."""
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return round(resource.getrusage(who).ru_maxrss / scale, 1)


def available_bytes() -> int | None:
    """Memory a new allocation can get now: /proc/meminfo's MemAvailable, lowered to what the cgroup
    (v2 memory.max, a container's limit) still allows; None where neither can be read (not Linux)."""
    candidates = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)  # kB
    except OSError:
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read().strip())
        if limit != "max":
            candidates.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(candidates) if candidates else None


def describe(mib: float) -> str:
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


MMAP_THRESHOLD = 1 << 20  # bytes


def return_large_frees_to_the_os() -> bool:
    """Serve every allocation of MMAP_THRESHOLD or more by its own mmap, so freeing it returns the
    memory at once (glibc's mallopt M_MMAP_THRESHOLD; False where that is not glibc).

    glibc raises the threshold to the size of each large block freed, up to 32 MiB, after which
    onnxruntime's weight-sized buffers (a layer's dequantized weights, 11-33 MB in MLCD-bigG) come
    from the heap and stay there, fragmented: its int8 parity run grew to 9.8 GiB at batch 3; with
    the threshold fixed at 1 MiB it peaks at 5.6 GiB, and runs in 101 s instead of 173 s."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
