"""TensorRT engine step, on Polygraphy's API so the part that needs TensorRT and a GPU stays thin.

TensorRT 11 networks are strongly typed: precision comes from the ONNX graph, never from builder
flags, so this step takes the precision recipe's model.onnx as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PLAN_NAME = "model.plan"


@dataclass(frozen=True)
class EngineTarget:
    tensorrt_version: str | None  # None: no TensorRT importable
    skip_reason: str | None  # why no engine is built here, or None


def probe_tensorrt() -> EngineTarget:
    """What this machine can build. Never raises: a missing TensorRT or GPU is a reason, not an error."""
    try:
        import tensorrt
    except Exception as exc:  # ImportError, or a broken install that fails while loading its libraries
        return EngineTarget(None, f"TensorRT is not importable ({type(exc).__name__}); "
                                  "install mvt-deploy[tensorrt] on a machine with an NVIDIA GPU")
    version = str(tensorrt.__version__)
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if not has_gpu:
        return EngineTarget(version, f"TensorRT {version} is installed but no CUDA GPU is visible")
    return EngineTarget(version, None)


def batch_profile(max_batch: int) -> tuple[int, int, int]:
    """(min, opt, max) batch: TensorRT tunes kernels for opt, so pick the middle of the range."""
    return 1, max(1, max_batch // 2), max_batch


def build_engine(onnx_path: Path, plan_path: Path, *, input_name: str, image_size: tuple[int, int],
                 max_batch: int, timing_cache: Path | None = None, optimization_level: int | None = None) -> dict:
    """Build a strongly typed engine for batch 1..max_batch at a fixed resolution; return its profile."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    h, w = image_size
    lo, opt, hi = batch_profile(max_batch)
    profile = Profile().add(input_name, min=(lo, 3, h, w), opt=(opt, 3, h, w), max=(hi, 3, h, w))
    config = CreateConfig(profiles=[profile], load_timing_cache=str(timing_cache) if timing_cache else None,
                          builder_optimization_level=optimization_level)
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    engine = EngineFromNetwork(network, config=config, save_timing_cache=str(timing_cache) if timing_cache else None)
    SaveEngine(engine, path=str(plan_path))()
    return {input_name: {"min": [lo, 3, h, w], "opt": [opt, 3, h, w], "max": [hi, 3, h, w]}}
