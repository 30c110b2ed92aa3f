"""Build a strongly typed engine through Polygraphy."""

from __future__ import annotations

from pathlib import Path

from export.core.errors import OptionError
from export.engine.target import (
    RTX_DEFAULT_CCS,
    EngineTarget,
    _select_polygraphy_runtime,
    check_rtx_targets,
    prepare_timing_cache,
)
from mvt_kernels.names import PLUGIN_ID


def build_engine(target: EngineTarget, onnx_path: Path, plan_path: Path, shapes: dict | list[dict], *,
                 timing_cache: Path | None = None, optimization_level: int | None = None,
                 compute_capabilities: list[tuple[int, int]] | None = None, tf32: bool = False) -> dict:
    """Build a strongly typed engine for `shapes` ({input: {min, opt, max}}, or a list of such optimization
    profiles: native_profiles); return build facts (the profiles recorded as given).

    tf32: let float32 GEMMs and convolutions run in TF32. Off by default (Polygraphy's CreateConfig clears
    TensorRT's flag unless asked): fp32 engines and the fp32 islands of fp16/int8 graphs then compute in
    true float32, the precision parity judges them at; TF32 is faster on Ampere and later."""
    _select_polygraphy_runtime(target.runtime)
    if target.runtime == "tensorrt-rtx":
        check_rtx_targets(target, compute_capabilities)
    timing_cache = prepare_timing_cache(timing_cache)
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineBytesFromNetwork,
        NetworkFromOnnxPath,
        PostprocessConfig,
        Profile,
    )

    trt_profiles = []
    for one in (shapes if isinstance(shapes, list) else [shapes]):
        profile = Profile()
        for name, s in one.items():
            profile.add(name, min=tuple(s["min"]), opt=tuple(s["opt"]), max=tuple(s["max"]))
        trt_profiles.append(profile)
    common = dict(profiles=trt_profiles, builder_optimization_level=optimization_level,
                  load_timing_cache=str(timing_cache) if timing_cache and timing_cache.exists() else None)
    facts: dict = {"runtime": target.runtime, "version": target.version, "profiles": shapes,
                   "builder_optimization_level": optimization_level,
                   "tf32": {"enabled": tf32, "note": ("float32 math may run in TF32 (--tf32)" if tf32 else
                            "float32 layers compute in true float32 (TF32 off; --tf32 turns it on)")}}
    if target.runtime == "tensorrt-rtx":
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

        if compute_capabilities is None and not target.gpu:
            compute_capabilities = list(RTX_DEFAULT_CCS)
        base = CreateConfigRTX(use_gpu=compute_capabilities is None, compute_capabilities=compute_capabilities,
                               **common)
        facts["compute_capabilities"] = (["current GPU"] if compute_capabilities is None
                                         else [f"{a}.{b}" for a, b in compute_capabilities])
    else:
        base = CreateConfig(**common)  # TF32: set once, in _configure
        facts["compute_capabilities"] = [target.gpu.get("compute_capability")]
    # CreateConfigRTX takes no tf32 and leaves TensorRT-RTX's default (TF32 on), so the flag is set here for
    # both; and activation memory that follows the input shapes (see _configure).
    resize = _activation_resize_feature()
    config = PostprocessConfig(base, lambda builder, network, cfg: _configure(cfg, tf32, resize))
    facts["runtime_activation_resize"] = resize is not None
    if _has_plugin_nodes(onnx_path):
        if target.runtime == "tensorrt-rtx":
            raise OptionError("--rope plugin needs datacenter TensorRT (10.9+): TensorRT-RTX cannot load Python "
                              "plugins; use --rope onnx23, custom or decomposed")
        from mvt_kernels.trt_plugin import register_trt_plugin

        # The RoPE plugin with its ahead-of-time PTX, embedded in the engine; the PTX ISA is the driver's.
        plugin = register_trt_plugin()
        facts["plugins"] = [f"{PLUGIN_ID} (AOT, Triton PTX {plugin['ptx_version'] or 'default'} for "
                            f"sm_{plugin['cc']})"]
        facts["rope_plugin"] = plugin
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    # Serialized bytes, never a deserialized engine: that would need a GPU, and TensorRT-RTX builds
    # on machines without one.
    serialized = EngineBytesFromNetwork(network, config=config,
                                        save_timing_cache=str(timing_cache) if timing_cache else None)()
    with open(plan_path, "wb") as f:
        f.write(memoryview(serialized))
    facts["bytes"] = plan_path.stat().st_size
    return facts


def _activation_resize_feature():
    """PreviewFeature.RUNTIME_ACTIVATION_RESIZE_10_10 where the TensorRT has it (10.10+, TensorRT-RTX 1.x), else
    None. With it IExecutionContext.updateDeviceMemorySizeForShapes sizes activations for the shapes at hand
    (TensorRTRunner's allocation); without it, for the profile's maximum."""
    from polygraphy.backend.trt.util import trt

    return getattr(getattr(trt, "PreviewFeature", None), "RUNTIME_ACTIVATION_RESIZE_10_10", None)


def _configure(config, tf32: bool, resize) -> None:
    _set_tf32(config, tf32)
    if resize is not None:
        config.set_preview_feature(resize, True)


def _set_tf32(config, enabled: bool) -> None:
    from polygraphy.backend.trt.util import trt  # the module Polygraphy bound: tensorrt or tensorrt_rtx

    (config.set_flag if enabled else config.clear_flag)(trt.BuilderFlag.TF32)


def _has_plugin_nodes(onnx_path: Path) -> bool:
    import onnx

    from mvt_kernels.names import PLUGIN_NAMESPACE

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(a.name == "plugin_namespace" and a.s.decode() == PLUGIN_NAMESPACE
               for n in model.graph.node for a in n.attribute)
