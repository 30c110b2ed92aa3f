"""TensorRT engine step on Polygraphy's API, so the part that needs TensorRT and a GPU stays thin.

Two runtimes:
  tensorrt      datacenter TensorRT (>= 10.9): needs a CUDA GPU to build; engines for that GPU.
  tensorrt-rtx  TensorRT for RTX: builds on a CPU-only machine for chosen compute capabilities
                (7.5-12.1, not 9.0); Polygraphy drives it with POLYGRAPHY_USE_TENSORRT_RTX=1.

Both take strongly typed networks: precision comes from the ONNX graph (TensorRT 11 removed the
fp16/int8 builder flags), so this step builds model.onnx as the precision recipe left it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OptionError
from .rope_identity import PLUGIN_ID

PLAN_NAME = "model.plan"
# The graph handed to the builder when it needs a RoPE lowering that plain onnxruntime cannot run
# (the AOT plugin); model.onnx itself always stays portable.
ENGINE_ONNX_NAME = "engine.onnx"
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
    if info and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = out.stdout.strip() or None
        except Exception:
            pass
    return info


def batch_profile(max_batch: int) -> tuple[int, int, int]:
    """(min, opt, max) batch: TensorRT tunes kernels for opt, so pick the middle of the range."""
    return 1, max(1, max_batch // 2), max_batch


def resolution_profile(native: tuple[int, int], patch: int) -> dict[str, tuple[int, int]]:
    """H, W ranges for --dynamic-resolution engines: half to 1.5x the native size, patch multiples."""
    def snap(v: float) -> int:
        return max(patch, int(round(v / patch)) * patch)

    h, w = native
    return {"min": (snap(h / 2), snap(w / 2)), "opt": (h, w), "max": (snap(h * 1.5), snap(w * 1.5))}


def profiles(input_name: str, image_size: tuple[int, int], dynamic: bool, patch: int, max_batch: int) -> dict:
    lo, opt, hi = batch_profile(max_batch)
    hw = resolution_profile(image_size, patch) if dynamic else {k: image_size for k in ("min", "opt", "max")}
    return {input_name: {"min": [lo, 3, *hw["min"]], "opt": [opt, 3, *hw["opt"]], "max": [hi, 3, *hw["max"]]}}


def build_engine(target: EngineTarget, onnx_path: Path, plan_path: Path, shapes: dict, *,
                 timing_cache: Path | None = None, optimization_level: int | None = None,
                 compute_capabilities: list[tuple[int, int]] | None = None) -> dict:
    """Build a strongly typed engine for `shapes` ({input: {min, opt, max}}); return build facts."""
    _select_polygraphy_runtime(target.runtime)
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    profile = Profile()
    for name, s in shapes.items():
        profile.add(name, min=tuple(s["min"]), opt=tuple(s["opt"]), max=tuple(s["max"]))
    common = dict(profiles=[profile], builder_optimization_level=optimization_level,
                  load_timing_cache=str(timing_cache) if timing_cache and timing_cache.exists() else None)
    facts: dict = {"runtime": target.runtime, "version": target.version, "profiles": shapes,
                   "builder_optimization_level": optimization_level}
    if target.runtime == "tensorrt-rtx":
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

        if compute_capabilities is None and not target.gpu:
            compute_capabilities = list(RTX_DEFAULT_CCS)
        config = CreateConfigRTX(use_gpu=compute_capabilities is None, compute_capabilities=compute_capabilities,
                                 **common)
        facts["compute_capabilities"] = (["current GPU"] if compute_capabilities is None
                                         else [f"{a}.{b}" for a, b in compute_capabilities])
    else:
        config = CreateConfig(**common)
        facts["compute_capabilities"] = [target.gpu.get("compute_capability")]
    if _has_plugin_nodes(onnx_path):
        if target.runtime == "tensorrt-rtx":
            raise OptionError("--rope plugin needs datacenter TensorRT (10.9+): TensorRT-RTX cannot load Python "
                              "plugins; use --rope onnx23, custom or decomposed")
        from kernels.trt_plugin import register_trt_plugin

        register_trt_plugin()  # the RoPE plugin with its ahead-of-time PTX, embedded in the engine
        facts["plugins"] = [f"{PLUGIN_ID} (AOT, Triton PTX)"]
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    # Serialized bytes, never a deserialized engine: that would need a GPU, and TensorRT-RTX builds
    # on machines without one.
    serialized = EngineBytesFromNetwork(network, config=config,
                                        save_timing_cache=str(timing_cache) if timing_cache else None)()
    with open(plan_path, "wb") as f:
        f.write(memoryview(serialized))
    facts["bytes"] = plan_path.stat().st_size
    return facts


def _has_plugin_nodes(onnx_path: Path) -> bool:
    import onnx

    from .rope_identity import PLUGIN_NAMESPACE

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(a.name == "plugin_namespace" and a.s.decode() == PLUGIN_NAMESPACE
               for n in model.graph.node for a in n.attribute)


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
    from .download import cache_root

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return root / f"timing-{target.runtime}-{target.version}.cache"
