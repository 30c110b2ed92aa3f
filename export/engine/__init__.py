"""TensorRT engine step on Polygraphy's API, so the part that needs TensorRT and a GPU stays thin.

Two runtimes:
  tensorrt      datacenter TensorRT (>= 10.9): needs a CUDA GPU to build; engines for that GPU.
  tensorrt-rtx  TensorRT for RTX: builds on a CPU-only machine for chosen compute capabilities
                (7.5-12.1, not 9.0); Polygraphy drives it with POLYGRAPHY_USE_TENSORRT_RTX=1.

Both take strongly typed networks: precision comes from the ONNX graph (TensorRT 11 removed the
fp16/int8 builder flags), so this step builds model.onnx as the precision recipe left it.

One module per concern: target (what can build here), profiles (their geometry), build.
"""

from export.core.folder import ENGINE_ONNX_NAME, PLAN_NAME  # noqa: F401  (the public API, from the package)
from export.engine.build import build_engine  # noqa: F401
from export.engine.profiles import (  # noqa: F401
    NATIVE_ASPECT_BAND,
    add_native_budget_arguments,
    anyres_profile,
    batch_profile,
    choose_profile,
    describe_profiles,
    native_budget,
    native_profiles,
    native_side_range,
    profile_covers,
    profile_max_batch,
    profiles,
    resolution_profile,
)
from export.engine.target import (  # noqa: F401
    NO_ENGINE,
    RTX_DEFAULT_CCS,
    RTX_SUPPORTED_CCS,
    RUNTIME_CHOICES,
    RUNTIMES,
    EngineTarget,
    check_rtx_targets,
    default_timing_cache,
    gpu_info,
    prepare_timing_cache,
    probe,
    rtx_supported_ccs,
)
