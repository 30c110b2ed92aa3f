"""What can build an engine here: the runtimes, the GPU, Polygraphy's binding."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from export.core.errors import OptionError

RUNTIMES = ("tensorrt", "tensorrt-rtx")
NO_ENGINE = "none"  # --runtime none: export and check the ONNX only
RUNTIME_CHOICES = RUNTIMES + (NO_ENGINE,)
# TensorRT-RTX targets when no GPU is visible: every RTX-class architecture it builds for.
RTX_DEFAULT_CCS = ((7, 5), (8, 0), (8, 6), (8, 9), (12, 0))


@dataclass(frozen=True)
class EngineTarget:
    runtime: str
    version: str | None  # None: not importable
    skip_reason: str | None  # why no engine is built here, or None
    gpu: dict = field(default_factory=dict)  # name, compute capability, driver, CUDA (when visible)

    @property
    def rope_runtime(self) -> tuple[str, str] | None:
        """(runtime, version) for the RoPE lowering choice, or None when no engine will be built."""
        if self.skip_reason or self.version is None:  # no version: not importable, so skipped anyway
            return None
        return self.runtime, self.version


def probe(runtime: str) -> EngineTarget:
    """What this machine can build. Never raises for a missing TensorRT or GPU: that is a reason."""
    if runtime not in RUNTIME_CHOICES:
        raise OptionError(f"--runtime {runtime} is unknown; choose one of {', '.join(RUNTIME_CHOICES)}")
    if runtime == NO_ENGINE:
        return EngineTarget(runtime, None, "no engine requested (--runtime none)")
    module = "tensorrt_rtx" if runtime == "tensorrt-rtx" else "tensorrt"
    try:
        trt = __import__(module)
    except Exception as exc:  # ImportError, or a broken install that fails loading its libraries
        where = "" if runtime == "tensorrt-rtx" else " on a machine with an NVIDIA GPU"
        state = "is not installed" if isinstance(exc, ImportError) else f"failed to load ({exc})"
        hint = ""
        if runtime == "tensorrt" and importlib.util.find_spec("tensorrt_rtx") is not None:
            hint = " (--runtime tensorrt-rtx builds an engine for RTX GPUs here)"
        return EngineTarget(runtime, None, f"{runtime} {state}; install mvt-deploy[{runtime}]{where}{hint}")
    version = str(trt.__version__)
    gpu = gpu_info()
    if runtime == "tensorrt" and not gpu:
        return EngineTarget(runtime, version, f"TensorRT {version} is installed but no CUDA GPU is visible")
    return EngineTarget(runtime, version, None, gpu)


def gpu_info() -> dict:
    """Name, compute capability, driver and CUDA versions of GPU 0, from nvidia-smi and torch."""
    info: dict = {}
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            info = {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}",
                    "cuda": torch.version.cuda}
    except Exception:
        pass
    if not info:  # no CUDA torch (the Triton serving image where `--artifacts` rebuilds a plan): ask the driver
        return _gpu_info_from_nvidia_smi()
    if info and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = out.stdout.strip() or None
        except Exception:
            pass
    return info


def _gpu_info_from_nvidia_smi() -> dict:
    """GPU 0 as nvidia-smi reports it ({} without a driver): the `compute_cap` field needs driver 510+."""
    if not shutil.which("nvidia-smi"):
        return {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader",
                              "-i", "0"], capture_output=True, text=True, timeout=20)
    except Exception:
        return {}
    fields = [f.strip() for f in out.stdout.strip().split(",")]
    if out.returncode != 0 or len(fields) != 3 or not fields[0]:
        return {}
    name, capability, driver = fields
    return {"name": name, "compute_capability": capability, "cuda": None, "driver": driver or None}


def _select_polygraphy_runtime(runtime: str) -> None:
    """Polygraphy binds to tensorrt or tensorrt_rtx when its backend is first imported: one per process."""
    want_rtx = runtime == "tensorrt-rtx"
    if "polygraphy.backend.trt" in sys.modules:
        from polygraphy import config

        if config.USE_TENSORRT_RTX != want_rtx:
            raise OptionError(f"this process already loaded Polygraphy for "
                              f"{'tensorrt-rtx' if config.USE_TENSORRT_RTX else 'tensorrt'}; "
                              f"build {runtime} engines in a new process")
        return
    os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1" if want_rtx else "0"
    from polygraphy import config

    config.USE_TENSORRT_RTX = want_rtx


def default_timing_cache(target: EngineTarget) -> Path:
    """Reused across builds (per user, runtime and version): later builds skip most tactic timing."""
    from export.models.download import cache_root

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return root / f"timing-{target.runtime}-{target.version}.cache"
