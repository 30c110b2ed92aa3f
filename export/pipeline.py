"""The export pipeline as a Python API: checkpoint -> ONNX -> RoPE and attention lowerings -> parity -> engine.

    from export.pipeline import BuildOptions, build
    result = build(BuildOptions(model="rice-l-560", out=Path("artifacts/rice")))

The CLI (build_engine.py) is a thin layer over `build`.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from export import __version__, engine as engines, torch_side
from export.core import memory
from export.core.errors import OptionError
from export.core.folder import (
    ENGINE_ERROR_NAME,
    ENGINE_ONNX_NAME,
    EXTERNAL_DATA_THRESHOLD,
    IMAGE_NEWLINE_NAME,
    MANIFEST_NAME,
    ONNX_NAME,
    OVERFLOW_REPORT_NAME,
    PARITY_NAME,
    PLAN_NAME,
    PREPROCESSOR_CONFIG,
    save_onnx,
    sha256,
    staged_output,
    write_json,
)
from export.core.interface import IMAGE_EMBEDS, INPUT_NAME
from export.core.manifest import DEFAULT_MAX_BATCH, Manifest, engine_entry, no_engine, write_manifest
from export.core.steps import Steps
from export.graph.attention import PORTABLE_ATTENTION, check_engine_attention, lower_graph, resolve_attention
from export.graph.lowering import resolve_rope
from export.graph.trace import ExportShape
from export.precision.recipe import check_options as check_precision_options
from export.torch_side import TorchRequest, run_torch_side


@dataclass
class BuildOptions:
    model: str | None = None  # folder, hub id or zoo alias; None: the bundled demo
    out: Path | None = None  # None: artifacts/<model name>
    precision: str = "fp32"
    rope: str = "auto"
    attention: str = "auto"  # export.graph.attention.ATTENTION_CHOICES
    image_size: tuple[int, int] | None = None  # None: the checkpoint's
    dynamic_resolution: bool = False
    # --dynamic-resolution engines also hold every shape of the native mode at this budget (engine.native_budget:
    # keys factor, min_pixels, max_pixels; missing ones take its defaults). None: the defaults.
    native_budget: dict | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    hidden_layer: int | None = None
    num_heads: int | None = None  # released weights files (UNICOM .pt): attention heads; None = hidden / 64
    calib_images: Path | None = None  # None: scikit-image's photographs (not the parity ones)
    calib_count: int | None = None  # calibration images used; None: precision.calibration.default_count
    calib_method: str = "max"
    quant_target: str = "tensorrt"  # int8/fp8 graph form: "tensorrt" (symmetric, fp16 rest) or "cpu"
    force: bool = False
    random_weights: bool = False
    parity: bool = True
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    # "tensorrt", "tensorrt-rtx" or "none"; None: datacenter TensorRT where it can build, else no engine
    runtime: str | None = None
    compute_capabilities: list[tuple[int, int]] | None = None  # TensorRT-RTX targets; None: GPU or all
    optimization_level: int | None = None  # TensorRT builder optimization level (0-5)
    timing_cache: Path | None = None  # None: ~/.cache/mvt-deploy, per runtime and version
    tf32: bool = False  # float32 layers may run in TF32 (faster; parity is judged in true float32)
    # a LLaVA-NeXT / LLaVA-OneVision checkpoint: one graph pixel_values -> image_embeds [B, S', H_llm] (the feature
    # layer, the class-token strategy, multi_modal_projector); parity also against the VLM's get_image_features
    projector: bool = False


@dataclass
class BuildResult:
    out: Path
    manifest: dict
    parity_passed: bool | None  # None: parity was not run
    files: list[str] = field(default_factory=list)

    @property
    def engine_failed(self) -> bool:
        """An engine build was attempted and failed (the ONNX artifacts are still written)."""
        return Manifest.of(self.manifest).engine.failed


def default_out(model: str | None) -> Path:
    # a released weights file names its folder without the suffix: artifacts/fp16-vit-b-32
    name = "demo" if model is None else Path(model.rstrip("/")).name.lower().removesuffix(".pt")
    return Path("artifacts") / name


def validate_options(opts: BuildOptions) -> None:
    """Checks that need no checkpoint, so that a typo fails before a slow load."""
    check_precision_options(opts.precision, opts.quant_target, opts.calib_method)
    resolve_rope(opts.rope, None)
    resolve_attention(opts.attention, None)
    check_engine_attention(opts.attention, opts.precision, opts.runtime)
    if opts.runtime is not None and opts.runtime not in engines.RUNTIME_CHOICES:
        raise OptionError(f"--runtime {opts.runtime} is unknown; choose one of {', '.join(engines.RUNTIME_CHOICES)}")
    if _cpu_quantized(opts) and opts.runtime in engines.RUNTIMES:
        raise OptionError(f"--quant-target cpu shapes the {opts.precision} graph for onnxruntime on CPUs (uint8 "
                          f"activations with zero points), which TensorRT does not build; drop --runtime "
                          f"{opts.runtime}, or use --quant-target tensorrt for an engine")
    if opts.rope == "plugin" and opts.runtime == "tensorrt-rtx":
        raise OptionError("--rope plugin needs datacenter TensorRT (10.9+): TensorRT-RTX cannot load Python "
                          "plugins; use --rope onnx23, custom or decomposed")
    if opts.calib_count is not None and opts.calib_count < 1:
        raise OptionError(f"--calib-count {opts.calib_count} must be at least 1")
    if opts.projector and opts.hidden_layer is not None:
        raise OptionError(f"--hidden-layer {opts.hidden_layer}: with --projector the checkpoint's vision_feature_layer "
                          "chooses the tower layer; drop --hidden-layer")
    if opts.max_batch < 1:
        raise OptionError(f"--max-batch {opts.max_batch} must be at least 1")
    if opts.native_budget and not opts.dynamic_resolution:
        flags = " ".join(f"--{k.replace('_', '-')}".replace("--factor", "--resize-factor") for k in opts.native_budget)
        raise OptionError(f"{flags}: the native-resolution budget shapes --dynamic-resolution engines; add "
                          "--dynamic-resolution or drop them")
    if opts.calib_images is not None and not Path(opts.calib_images).is_dir():
        raise OptionError(f"--calib-images {opts.calib_images} is not a folder")
    if opts.timing_cache is not None and Path(opts.timing_cache).is_dir():
        raise OptionError(f"--timing-cache {opts.timing_cache} is a folder; give a file path, e.g. "
                          f"{Path(opts.timing_cache) / 'timing.cache'}")
    if opts.compute_capabilities and opts.runtime == "tensorrt-rtx":
        engines.check_rtx_targets(engines.EngineTarget("tensorrt-rtx", None, None), opts.compute_capabilities)


def build(opts: BuildOptions, log: Callable[[str], None] = print) -> BuildResult:
    validate_options(opts)
    memory.return_large_frees_to_the_os()  # the onnxruntime steps free weight-sized buffers often
    out = Path(opts.out) if opts.out is not None else default_out(opts.model)
    target = _engine_target(opts)
    # model.onnx stays portable: the custom op with its function body unless a portable lowering is
    # asked for by name. The lowering the engine wants (auto: the best for its runtime; the AOT plugin,
    # which only TensorRT runs) goes into engine.onnx, the graph handed to the builder. (Also, int8
    # graphs at opset 23 trip onnxruntime 1.32's optimizer, so auto's onnx23 must not reach model.onnx.)
    engine_rope = resolve_rope(opts.rope, target.rope_runtime)
    rope = "custom" if opts.rope in ("auto", "plugin") else engine_rope
    # Attention likewise: model.onnx gets onnxruntime's MultiHeadAttention (memory linear in the tokens)
    # unless a form is asked for by name; engine.onnx the form the engine's TensorRT fuses.
    engine_attention = resolve_attention(opts.attention, target.rope_runtime, opts.precision)
    attention = PORTABLE_ATTENTION if opts.attention == "auto" else engine_attention
    if target.skip_reason is None:
        check_engine_attention(engine_attention, opts.precision, target.runtime, target.version)
    steps = Steps(7, log)

    with staged_output(out, opts.force) as stage:
        onnx_path = stage / ONNX_NAME
        # Steps 1-3 (load, trace, PyTorch reference) in a child process: its memory (the weights, and
        # the copies tracing keeps) is returned before the ONNX steps start (torch_side.py).
        torch_result = run_torch_side(TorchRequest(
            opts.model, opts.random_weights, opts.image_size, opts.dynamic_resolution, opts.hidden_layer,
            onnx_path, opts.parity, first_step=steps.n, total_steps=steps.total, num_heads=opts.num_heads,
            projector=opts.projector), log)
        ckpt, shape, references = torch_result.checkpoint, torch_result.shape, torch_result.references
        steps.n += 3
        steps.timings.update(torch_result.timings)
        steps.peaks_mib.update(torch_result.peaks_mib)
        precision = None
        if opts.precision == "fp32":
            steps.skip("Precision fp32: the traced graph as it is")
        else:
            precision = steps.run(f"Applying the {opts.precision} recipe", _apply_precision, opts, ckpt, shape,
                                  onnx_path, log)
            write_json(stage / OVERFLOW_REPORT_NAME, precision.overflow_report())
        if not ckpt.family.has_rope:
            rope = engine_rope = "none"
        files = steps.run(f"Lowering RoPE ({rope}) and attention ({attention}), saving {ONNX_NAME}",
                          _lower_and_save, onnx_path, rope, attention, opts.external_data_threshold)
        graph_error = check_graph(onnx_path)
        if graph_error:
            log(f"      {ONNX_NAME} fails onnx.checker's full check: {graph_error}")

        parity = None
        if opts.parity:
            from export.check.parity import calibration_target_check, onnx_parity

            parity = steps.run("Checking parity against PyTorch on the held-out views", onnx_parity, ckpt, shape,
                               onnx_path, precision=opts.precision, references=references)
            if torch_result.packed_references:
                _add_packed_parity(parity, torch_result.packed_references, ckpt, onnx_path, opts.precision)
            parity.checks.insert(0, graph_check(graph_error))
            # a recipe that missed its own calibration targets is a row, never silent (parity.py says when it fails)
            recipe_row = calibration_target_check(precision.recipe.get("fallback") if precision else None,
                                                  parity.passed)
            if recipe_row is not None:
                parity.checks.append(recipe_row)
            log(parity.checklist())
            write_json(stage / PARITY_NAME, parity.to_json())
        else:
            steps.skip("parity check skipped (--skip-parity)")

        if target.skip_reason is None:
            if not target.gpu:
                log("      no GPU here: TensorRT-RTX builds for the listed targets and may log CUDA driver "
                    "errors while doing so; they do not affect the engine")
            engine, engine_files = steps.run(f"Building the {target.runtime} {target.version} engine", _build_engine,
                                             opts, target, ckpt, shape, stage, (rope, attention),
                                             (engine_rope, engine_attention), log)
            files += [stage / name for name in engine_files]
        else:
            engine = no_engine(target.runtime, target.skip_reason)
            steps.skip(f"TensorRT engine skipped: {target.skip_reason}")

        ckpt.processor.save_pretrained(stage)  # the exact preprocessing, for serving
        if ckpt.image_newline is not None and opts.projector:  # what the served AnyRes packing appends per row
            import numpy as np

            np.save(stage / IMAGE_NEWLINE_NAME, np.asarray(ckpt.image_newline, np.float32))
        extra = [stage / n for n in (PREPROCESSOR_CONFIG, IMAGE_NEWLINE_NAME, OVERFLOW_REPORT_NAME, PARITY_NAME)
                 if (stage / n).exists()]
        manifest = write_manifest(stage, _manifest(opts, ckpt, shape, rope, attention, files + extra, parity, engine,
                                                   steps,
                                                   precision.recipe if precision else {"compute": "fp32"},
                                                   graph_error))
    recorded = sorted(Manifest(manifest).artifacts)
    log(f"wrote {out}/ ({', '.join(recorded)}, {MANIFEST_NAME})")
    return BuildResult(out, manifest, None if parity is None else parity.passed, recorded)


def _add_packed_parity(report, references, ckpt, onnx_path: Path, precision: str) -> None:
    """--projector: the graph's views AnyRes-packed against transformers' get_image_features, into `report`."""
    from export.check.vlm_parity import packed_parity
    from export.runners.base import ort_mode_for
    from export.runners.ort import OnnxRuntimeRunner

    with OnnxRuntimeRunner(onnx_path, ort_mode_for(precision), output_names=[IMAGE_EMBEDS]) as runner:
        checks, notes = packed_parity(references, runner, ckpt.image_newline, ckpt.vlm.vision_aspect_ratio,
                                      precision, ckpt.family.tolerances)
    report.checks += checks
    report.notes += notes


def _cpu_quantized(opts: BuildOptions) -> bool:
    from export.precision.recipe import cpu_quantized

    return cpu_quantized(opts.precision, opts.quant_target)


def _engine_target(opts: BuildOptions) -> engines.EngineTarget:
    """The engine runtime to build for, or the reason none is built (checked before any slow work)."""
    runtime = opts.runtime or "tensorrt"
    if _cpu_quantized(opts):  # only reached with the default runtime: validate_options refuses an explicit one
        return engines.EngineTarget(runtime, None, f"the --quant-target cpu {opts.precision} graph is for "
                                    "onnxruntime on CPUs; use --quant-target tensorrt for an engine")
    target = engines.probe(runtime)
    if target.runtime == "tensorrt-rtx" and not target.skip_reason:
        engines.check_rtx_targets(target, opts.compute_capabilities)  # an H100 (9.0) refused here, not after tracing
    return target


def _apply_precision(opts: BuildOptions, ckpt, shape: ExportShape, onnx_path: Path, log):
    from export.precision import apply_precision
    from export.precision.calibration import calibration_feeds, calibration_images, default_count

    count = opts.calib_count or default_count(ckpt.config, (shape.height, shape.width))
    images, described = calibration_images(opts.calib_images, count, log)
    feeds = calibration_feeds(ckpt.processor, images, (shape.height, shape.width), INPUT_NAME)
    start = time.perf_counter()
    result = apply_precision(onnx_path, opts.precision, feeds, calib_method=opts.calib_method,
                             quant_target=opts.quant_target,
                             external_data_threshold=opts.external_data_threshold, log=log)
    result.recipe["calibration"] = {"images": described, "count": len(images),
                                    "seconds": round(time.perf_counter() - start, 2)}
    return result


def _build_engine(opts: BuildOptions, target, ckpt, shape: ExportShape, stage: Path, lowered: tuple[str, str],
                  engine_lowered: tuple[str, str], log) -> tuple[dict, list[str]]:
    """Build model.plan; a failure is recorded (engine.failed, the reason) instead of discarding the
    ONNX artifacts, which are complete and checked by now. Returns the manifest's engine entry and the
    files this step added. lowered / engine_lowered: (RoPE, attention) forms of model.onnx / the engine's."""
    import traceback

    graph, files = stage / ONNX_NAME, []
    engine_rope, engine_attention = engine_lowered
    if engine_lowered != lowered:
        graph = _engine_graph(stage / ONNX_NAME, stage / ENGINE_ONNX_NAME, engine_rope, engine_attention)
        files.append(graph.name)
    shapes = engines.profiles(INPUT_NAME, (shape.height, shape.width), shape.dynamic_resolution,
                              ckpt.patch_size, opts.max_batch, _native_budget(opts, ckpt, shape))
    plan = stage / PLAN_NAME
    try:
        facts = engines.build_engine(
            target, graph, plan, shapes,
            timing_cache=opts.timing_cache or engines.default_timing_cache(target),
            optimization_level=opts.optimization_level, compute_capabilities=opts.compute_capabilities,
            tf32=opts.tf32,
        )
    except Exception as exc:  # TensorRT/Polygraphy raise many kinds; the ONNX must survive all of them
        plan.unlink(missing_ok=True)
        (stage / ENGINE_ERROR_NAME).write_text("".join(traceback.format_exception(exc)))
        reason = _one_line(exc)
        log(f"      engine build failed: {reason} (details: {ENGINE_ERROR_NAME}); the ONNX artifacts are kept")
        return (engine_entry(target, onnx=graph.name, rope_lowering=engine_rope, failure=reason,
                             attention_lowering=engine_attention), files + [ENGINE_ERROR_NAME])
    return (engine_entry(target, onnx=graph.name, rope_lowering=engine_rope, facts=facts,
                         attention_lowering=engine_attention), files + [plan.name])


def _native_budget(opts: BuildOptions, ckpt, shape: ExportShape) -> dict | None:
    """The native mode's budget the engine and the manifest carry (dynamic-resolution exports only)."""
    if not shape.dynamic_resolution:
        return None
    return engines.native_budget(ckpt.patch_size, **(opts.native_budget or {}))


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:400]


def _engine_graph(model_path: Path, engine_path: Path, rope: str, attention: str) -> Path:
    """engine.onnx: model.onnx with the engine's RoPE and attention lowerings. Weights in model.onnx.data
    are shared, not copied (the external-data references are relative to the same folder)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    onnx.save(lower_graph(model, rope, attention), str(engine_path))
    return engine_path


def check_graph(path: Path) -> str | None:
    """None when `path` passes onnx.checker's full check (by path: works past 2 GB), else why not."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        return _one_line(exc)
    return None


def graph_check(error: str | None):
    """The checklist line for check_graph's verdict."""
    from export.core.metrics import Check

    return Check("graph", ONNX_NAME, "onnx_checker", 0.0 if error else 1.0, 1.0)


def _lower_and_save(onnx_path: Path, rope: str, attention: str, threshold: int) -> list[Path]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return save_onnx(lower_graph(model, rope, attention), onnx_path, threshold=threshold)


def _manifest(opts, ckpt, shape, rope, attention, files, parity, engine, steps: Steps, recipe, graph_error) -> dict:
    cfg = ckpt.config
    # token outputs are as wide as the tower, image_embeds as the language model's embeddings
    width = ckpt.vlm.text_hidden_size if opts.projector else cfg.hidden_size
    vlm = None if ckpt.vlm is None else {
        **ckpt.vlm.to_json(), "image_newline": IMAGE_NEWLINE_NAME if opts.projector and ckpt.vlm.has_newline else None}
    return {
        "mvt_deploy": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "model": {
            "source": ckpt.source,
            "family": ckpt.family.name,
            "model_type": cfg.model_type,
            "random_weights": ckpt.random_weights,
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "patch_size": ckpt.patch_size,
            "native_image_size": list(ckpt.image_size),
            "prefix_tokens": ckpt.family.prefix_tokens,  # sequence = patches + this (1: the class token)
        },
        "interface": {
            "inputs": {INPUT_NAME: {"dtype": "float32",
                                    "shape": ["batch", 3, "height" if shape.dynamic_resolution else shape.height,
                                              "width" if shape.dynamic_resolution else shape.width]}},
            "outputs": {name: {"dtype": "float32", "shape": ["batch", "sequence", width]
                               if name != ckpt.family.pooled_output else ["batch", ckpt.family.pooled_size(cfg)]}
                        for name in ckpt.family.output_names(shape.hidden_layer)},
            "pooled_output": ckpt.family.pooled_output,  # the one-vector-per-image output (served embedding)
            "hidden_layer": shape.hidden_layer,
            "dynamic_resolution": shape.dynamic_resolution,
            # what --preprocess native may send to an engine built from this folder (engine.native_budget)
            "native_budget": _native_budget(opts, ckpt, shape),
            "max_batch": opts.max_batch,
        },
        "vlm": vlm,  # a LLaVA-NeXT / LLaVA-OneVision checkpoint's image side (export.models.vlm.VlmSettings)
        "precision": opts.precision,
        "precision_recipe": recipe,
        "rope_lowering": rope,  # model.onnx's; the engine's graph and lowering are under "engine"
        "attention_lowering": attention,  # likewise
        "engine": engine,
        "parity": None if parity is None else parity.manifest_summary(),
        "onnx_checker": graph_error or "passed",
        "artifacts": {Path(f).name: {"sha256": sha256(Path(f)), "bytes": Path(f).stat().st_size} for f in files},
        "versions": _versions(),
        "timings_s": steps.timings,
        "peak_rss_mib": {**_peak_rss_mib(), "after_step": steps.peaks_mib},
    }


def _versions() -> dict:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tensorrt", "tensorrt_rtx",
                "polygraphy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _peak_rss_mib() -> dict[str, float]:
    """Peak resident memory of this process (the ONNX steps) and of the PyTorch child (load, trace):
    the build's peak is the larger, as they never overlap."""
    onnx_steps = memory.peak_mib()
    # in-process (torch_side.RUN_IN): one process did both, its peak is both's
    torch_steps = onnx_steps if torch_side.RUN_IN == "in-process" else memory.peak_mib(children=True)
    return {"build": max(onnx_steps, torch_steps), "onnx_steps": onnx_steps, "torch_steps": torch_steps}
