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
# What TensorRT-RTX can target at all (tensorrt_rtx.ComputeCapability in 1.7: SM75 SM80 SM86 SM89 SM120
# SM121); no Hopper (9.0) or datacenter Blackwell (10.0): datacenter TensorRT serves those.
RTX_SUPPORTED_CCS = ((7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1))


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


def rtx_supported_ccs() -> tuple[tuple[int, int], ...]:
    """The compute capabilities the installed TensorRT-RTX targets (its ComputeCapability enum), else
    RTX_SUPPORTED_CCS."""
    try:
        import tensorrt_rtx

        names = [n for n in dir(tensorrt_rtx.ComputeCapability) if n.startswith("SM") and n[2:].isdigit()]
    except Exception:  # not installed, or an enum without SM names
        return RTX_SUPPORTED_CCS
    found = tuple(sorted((int(n[2:-1]), int(n[-1])) for n in names))
    return found or RTX_SUPPORTED_CCS


def check_rtx_targets(target: EngineTarget, compute_capabilities: list[tuple[int, int]] | None) -> None:
    """Refuse, before any work, a TensorRT-RTX build for an architecture it does not support: the GPU here
    when no --compute-capability is given (an H100 is 9.0), or a given one."""
    supported = rtx_supported_ccs()
    listed = ", ".join(f"{a}.{b}" for a, b in supported)
    if compute_capabilities:
        bad = [f"{a}.{b}" for a, b in compute_capabilities if (a, b) not in supported]
        if bad:
            raise OptionError(f"--runtime tensorrt-rtx cannot target compute capability {', '.join(bad)}; it "
                              f"supports {listed}. Use --runtime tensorrt for datacenter GPUs (9.0, 10.0)")
        return
    here = target.gpu.get("compute_capability")
    if here:
        major, minor = (int(v) for v in str(here).split(".")[:2])
        if (major, minor) not in supported:
            raise OptionError(
                f"--runtime tensorrt-rtx builds for this GPU ({target.gpu.get('name')}, compute capability "
                f"{here}) by default, which TensorRT-RTX does not support ({listed}); use --runtime tensorrt "
                "here, or name RTX targets with --compute-capability X.Y")


def prepare_timing_cache(path: Path | None) -> Path | None:
    """The timing cache file, its folder created: Polygraphy locks and writes it only after the build, so a
    missing folder would fail once the engine is finished. Refuses a path that is a folder."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if path.is_dir():
        raise OptionError(f"--timing-cache {path} is a folder; give a file path, e.g. {path / 'timing.cache'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


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
