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
import math
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


def batch_profile(max_batch: int) -> tuple[int, int, int]:
    """(min, opt, max) batch: TensorRT tunes kernels for opt, so pick the middle of the range."""
    return 1, max(1, max_batch // 2), max_batch


def resolution_profile(native: tuple[int, int], patch: int) -> dict[str, tuple[int, int]]:
    """H, W ranges for --dynamic-resolution engines: half to 1.5x the native size, patch multiples."""
    def snap(v: float) -> int:
        return max(patch, int(round(v / patch)) * patch)

    h, w = native
    return {"min": (snap(h / 2), snap(w / 2)), "opt": (h, w), "max": (snap(h * 1.5), snap(w * 1.5))}


def profiles(input_name: str, image_size: tuple[int, int], dynamic: bool, patch: int, max_batch: int,
             native: dict | None = None) -> dict | list[dict]:
    """The engine's optimization profiles: the batch range at the traced size (dynamic: 0.5-1.5x it), and for
    dynamic-resolution engines with a `native` budget (native_budget) also every shape --preprocess native
    can send (native_profiles: one image at a time, one profile per band of aspect ratios)."""
    lo, opt, hi = batch_profile(max_batch)
    hw = resolution_profile(image_size, patch) if dynamic else {k: image_size for k in ("min", "opt", "max")}
    batched = {input_name: {"min": [lo, 3, *hw["min"]], "opt": [opt, 3, *hw["opt"]], "max": [hi, 3, *hw["max"]]}}
    if not (dynamic and native):
        return batched
    return [batched, *native_profiles(input_name, native["factor"], native["min_pixels"], native["max_pixels"])]


def profile_max_batch(profiles: dict | list[dict]) -> int | None:
    """The largest batch of the batched profile (Triton's max_batch_size): one profile {input: {min, opt, max}},
    or a list whose first is the batched one and the rest take one image each (export.engine.profiles with a
    native budget: --preprocess native sends one image at a time, and its encoder does not batch); None
    without one."""
    first = (profiles[0] if profiles else {}) if isinstance(profiles, list) else profiles
    maxima = [p["max"][0] for p in first.values() if isinstance(p, dict) and p.get("max")]
    return min(maxima) if maxima else None


def native_budget(patch: int, factor: int | None = None, min_pixels: int | None = None,
                  max_pixels: int | None = None) -> dict:
    """The native mode's resize budget (triton_repo.build --preprocess native): h', w' multiples of `factor`
    (default twice the patch: a 2x2 merge) with min_pixels <= h' * w' <= max_pixels (default
    LLaVA-OneVision-1.5's). Raises OptionError for a budget smart_resize cannot honour."""
    from triton_repo.preprocessing import NATIVE_MAX_PIXELS, NATIVE_MIN_PIXELS

    factor = 2 * patch if factor is None else factor
    lo = NATIVE_MIN_PIXELS if min_pixels is None else min_pixels
    hi = NATIVE_MAX_PIXELS if max_pixels is None else max_pixels
    if factor < patch or factor % patch:
        raise OptionError(f"--resize-factor {factor} must be a positive multiple of the patch size {patch} "
                          f"(e.g. {2 * patch})")
    if lo < 1 or hi < factor * factor or lo > hi:
        raise OptionError(f"--min-pixels {lo} / --max-pixels {hi}: need 1 <= min <= max and max >= factor^2 "
                          f"({factor * factor})")
    return {"factor": factor, "min_pixels": lo, "max_pixels": hi}


def add_native_budget_arguments(p, scope: str, *, prefix: str = "", max_help: str | None = None) -> None:
    """The CLI flags of native_budget: --resize-factor, --{prefix}min-pixels, --{prefix}max-pixels (dest
    resize_factor, {prefix}min_pixels, ...). `scope` starts each help; max_help replaces the upper end's
    where giving it also turns native mode on (the ledger, visualize_features)."""
    from triton_repo.preprocessing import NATIVE_MAX_PIXELS, NATIVE_MIN_PIXELS

    p.add_argument("--resize-factor", type=int, metavar="N",
                   help=f"{scope}: sides are multiples of N (default: twice the patch size)")
    p.add_argument(f"--{prefix}min-pixels", type=int, metavar="N",
                   help=f"{scope}: pixel budget, lower end (default: {NATIVE_MIN_PIXELS}, LLaVA-OneVision-1.5's)")
    p.add_argument(f"--{prefix}max-pixels", type=int, metavar="N", help=max_help or (
        f"{scope}: pixel budget, upper end (default: {NATIVE_MAX_PIXELS}, LLaVA-OneVision-1.5's)"))


# Each native-resolution profile spans aspect ratios within this factor: its max shape then holds at most
# sqrt(band) x the pixel budget, where one profile for every aspect ratio would hold (longest side)^2.
NATIVE_ASPECT_BAND = 4.0


def native_side_range(factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(shortest, longest) side smart_resize(h, w, factor, min_pixels, max_pixels) can produce: multiples of
    factor, at least factor. h' * w' <= max_pixels and an aspect ratio of at most MAX_ASPECT_RATIO (smart_resize
    refuses more) bound the longest side by sqrt(MAX_ASPECT_RATIO * max_pixels), plus one factor of rounding."""
    from triton_repo.preprocessing import MAX_ASPECT_RATIO

    budget = max(max_pixels, factor * factor)
    longest = _ceil_to(math.sqrt(MAX_ASPECT_RATIO * budget), factor) + factor
    return factor, max(longest, _ceil_to(math.sqrt(MAX_ASPECT_RATIO * min_pixels), factor) + factor)


def native_profiles(input_name: str, factor: int, min_pixels: int, max_pixels: int, max_batch: int = 1,
                    band: float = NATIVE_ASPECT_BAND) -> list[dict]:
    """Optimization profiles covering every (h', w') the native mode produces (--preprocess native).

    Profile k covers aspect ratios (h/w) in [r_k, band * r_k], from 1/MAX_ASPECT_RATIO up to MAX_ASPECT_RATIO;
    its sides run from `factor` to what the pixel budget allows at the band's extreme ratio, so a profile's max
    shape stays near the budget. Triton's TensorRT backend picks, per request, a profile whose range holds it.
    """
    from triton_repo.preprocessing import MAX_ASPECT_RATIO

    lo_side, hi_side = native_side_range(factor, min_pixels, max_pixels)
    budget = max(max_pixels, lo_side * lo_side)
    out, ratio = [], 1.0 / MAX_ASPECT_RATIO
    while ratio < MAX_ASPECT_RATIO:
        top = min(ratio * band, float(MAX_ASPECT_RATIO))
        # h/w = r and h*w <= budget -> h <= sqrt(budget * r), w <= sqrt(budget / r); + one factor of rounding
        h_max = min(hi_side, _ceil_to(math.sqrt(budget * top), factor) + factor)
        w_max = min(hi_side, _ceil_to(math.sqrt(budget / ratio), factor) + factor)
        h_opt = min(h_max, _ceil_to(math.sqrt(budget * math.sqrt(ratio * top)) / 2, factor))
        w_opt = min(w_max, _ceil_to(math.sqrt(budget / math.sqrt(ratio * top)) / 2, factor))
        out.append({input_name: {"min": [1, 3, lo_side, lo_side], "opt": [1, 3, h_opt, w_opt],
                                 "max": [max_batch, 3, h_max, w_max]}})
        ratio = top
    return out


def anyres_profile(input_name: str, tile: int, max_tiles: int, images: int = 1) -> dict:
    """The profile for --preprocess anyres: s x s tiles, batches of up to `images` x (1 + max_tiles) (the whole
    image first, then each tile of the largest grid)."""
    lo, opt, hi = batch_profile(images * (1 + max_tiles))
    return {input_name: {"min": [lo, 3, tile, tile], "opt": [opt, 3, tile, tile], "max": [hi, 3, tile, tile]}}


def profile_covers(profile: dict, shape: tuple[int, ...]) -> bool:
    """Whether one input's {min, opt, max} holds `shape` in every dimension."""
    return (len(shape) == len(profile["min"])
            and all(a <= s <= b for a, s, b in zip(profile["min"], shape, profile["max"])))


def _ceil_to(value: float, multiple: int) -> int:
    return max(multiple, int(math.ceil(value / multiple)) * multiple)


def build_engine(target: EngineTarget, onnx_path: Path, plan_path: Path, shapes: dict | list[dict], *,
                 timing_cache: Path | None = None, optimization_level: int | None = None,
                 compute_capabilities: list[tuple[int, int]] | None = None) -> dict:
    """Build a strongly typed engine for `shapes` ({input: {min, opt, max}}, or a list of such optimization
    profiles: native_profiles); return build facts (the profiles recorded as given)."""
    _select_polygraphy_runtime(target.runtime)
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    trt_profiles = []
    for one in (shapes if isinstance(shapes, list) else [shapes]):
        profile = Profile()
        for name, s in one.items():
            profile.add(name, min=tuple(s["min"]), opt=tuple(s["opt"]), max=tuple(s["max"]))
        trt_profiles.append(profile)
    common = dict(profiles=trt_profiles, builder_optimization_level=optimization_level,
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
        from mvt_kernels.trt_plugin import register_trt_plugin

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
