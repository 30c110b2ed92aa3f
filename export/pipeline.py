"""The export pipeline as a Python API: checkpoint -> ONNX -> RoPE lowering -> parity -> engine.

    from export.pipeline import BuildOptions, build
    result = build(BuildOptions(model="rice-l-560", out=Path("artifacts/rice")))

The CLI (build_engine.py) is a thin layer over `build`.
"""

from __future__ import annotations

import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from . import __version__
from .artifacts import EXTERNAL_DATA_THRESHOLD, ONNX_NAME, save_onnx, sha256, staged_output, write_json
from . import engine as engines
from .errors import OptionError
from .families import INPUT_NAME
from .lowering import lower_rope, resolve_rope
from .onnx_export import ExportShape, export_canonical, validate_hidden_layer, validate_image_size
from .precision.recipe import check_options as check_precision_options



@dataclass
class BuildOptions:
    model: str | None = None  # folder, hub id or zoo alias; None: the bundled demo
    out: Path | None = None  # None: artifacts/<model name>
    precision: str = "fp32"
    rope: str = "auto"
    image_size: tuple[int, int] | None = None  # None: the checkpoint's
    dynamic_resolution: bool = False
    max_batch: int = 32
    hidden_layer: int | None = None
    calib_images: Path | None = None  # None: scikit-image's photographs (not the parity ones)
    calib_method: str = "max"
    quant_target: str = "tensorrt"  # int8/fp8 graph form: "tensorrt" (symmetric, fp16 rest) or "cpu"
    force: bool = False
    random_weights: bool = False
    parity: bool = True
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    runtime: str = "tensorrt"  # or "tensorrt-rtx"
    compute_capabilities: list[tuple[int, int]] | None = None  # TensorRT-RTX targets; None: GPU or all
    optimization_level: int | None = None  # TensorRT builder optimization level (0-5)
    timing_cache: Path | None = None  # None: ~/.cache/mvt-deploy, per runtime and version


@dataclass
class BuildResult:
    out: Path
    manifest: dict
    parity_passed: bool | None  # None: parity was not run
    files: list[str] = field(default_factory=list)


class Steps:
    """Numbered progress lines with timings: long steps (tracing bigG) say what is happening."""

    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.log, self.n, self.timings = total, log, 0, {}

    def run(self, title: str, fn, *args, **kwargs):
        self.n += 1
        self.log(f"[{self.n}/{self.total}] {title} ...")
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
        self.timings[title] = round(seconds, 2)
        self.log(f"      done in {seconds:.1f} s")
        return result


def default_out(model: str | None) -> Path:
    name = "demo" if model is None else Path(model.rstrip("/")).name.lower()
    return Path("artifacts") / name


def validate_options(opts: BuildOptions) -> None:
    """Checks that need no checkpoint, so that a typo fails before a slow load."""
    check_precision_options(opts.precision, opts.quant_target, opts.calib_method)
    resolve_rope(opts.rope, None)
    if opts.runtime not in engines.RUNTIMES:
        raise OptionError(f"--runtime {opts.runtime} is unknown; choose one of {', '.join(engines.RUNTIMES)}")
    if opts.max_batch < 1:
        raise OptionError(f"--max-batch {opts.max_batch} must be at least 1")
    if opts.calib_images is not None and not Path(opts.calib_images).is_dir():
        raise OptionError(f"--calib-images {opts.calib_images} is not a folder")


def build(opts: BuildOptions, log: Callable[[str], None] = print) -> BuildResult:
    from .loading import load_checkpoint

    validate_options(opts)
    out = Path(opts.out) if opts.out is not None else default_out(opts.model)
    target = engines.probe(opts.runtime)
    rope = resolve_rope(opts.rope, target.rope_runtime)
    steps = Steps(6, log)

    with staged_output(out, opts.force) as stage:
        ckpt = steps.run(f"Loading {opts.model or 'the demo model'}", load_checkpoint, opts.model,
                         random_weights=opts.random_weights)
        if ckpt.random_weights:
            log("      note: this model has seeded RANDOM weights (an architecture demo, not a trained encoder)")
        height, width = opts.image_size or ckpt.image_size
        validate_image_size(height, width, ckpt.patch_size)
        if opts.hidden_layer is not None:
            validate_hidden_layer(opts.hidden_layer, ckpt.config.num_hidden_layers)
        shape = ExportShape(height, width, opts.dynamic_resolution, opts.hidden_layer)

        onnx_path = stage / ONNX_NAME
        steps.run(f"Tracing to ONNX ({height}x{width}{', any resolution' if shape.dynamic_resolution else ''})",
                  export_canonical, ckpt, shape, onnx_path)
        precision = None
        if opts.precision == "fp32":
            _skip(steps, log, "Precision fp32: the traced graph as it is")
        else:
            precision = steps.run(f"Applying the {opts.precision} recipe", _apply_precision, opts, ckpt, shape,
                                  onnx_path, log)
            write_json(stage / "overflow_report.json", precision.overflow_report())
        if not ckpt.family.has_rope:
            rope = "none"
        files = steps.run(f"Lowering RoPE ({rope}) and saving {ONNX_NAME}", _lower_and_save, onnx_path,
                          rope, opts.external_data_threshold)

        parity = None
        if opts.parity:
            from .parity import onnx_parity

            parity = steps.run("Checking parity against PyTorch on photos", onnx_parity, ckpt, shape, onnx_path,
                               precision=opts.precision)
            log(parity.checklist())
            write_json(stage / "parity.json", parity.to_json())
        else:
            _skip(steps, log, "parity check skipped (--skip-parity)")

        if target.skip_reason is None:
            if not target.gpu:
                log("      no GPU here: TensorRT-RTX builds for the listed targets and may log CUDA driver "
                    "errors while doing so; they do not affect the engine")
            engine = steps.run(f"Building the {target.runtime} {target.version} engine", _build_engine, opts,
                               target, ckpt, shape, stage)
            files.append(stage / engines.PLAN_NAME)
        else:
            engine = {"built": False, "runtime": opts.runtime, "reason": target.skip_reason}
            _skip(steps, log, f"TensorRT engine skipped: {target.skip_reason}")

        ckpt.processor.save_pretrained(stage)  # the exact preprocessing, for serving
        extra = [stage / n for n in ("preprocessor_config.json", "overflow_report.json", "parity.json")
                 if (stage / n).exists()]
        manifest = _manifest(opts, ckpt, shape, rope, files + extra, parity, engine, steps.timings,
                             precision.recipe if precision else {"compute": "fp32"})
        write_json(stage / "manifest.json", manifest)
    log(f"wrote {out}/ ({', '.join(sorted(manifest['artifacts']))}, manifest.json)")
    return BuildResult(out, manifest, None if parity is None else parity.passed,
                       sorted(manifest["artifacts"]))


def _skip(steps: Steps, log, message: str) -> None:
    """A step that does nothing this time still gets its number, so the count stays true."""
    steps.n += 1
    log(f"[{steps.n}/{steps.total}] {message}")
    return None


def _apply_precision(opts: BuildOptions, ckpt, shape: ExportShape, onnx_path: Path, log):
    from .precision import apply_precision
    from .precision.calibration import calibration_feeds, calibration_images

    images, described = calibration_images(opts.calib_images, log)
    feeds = calibration_feeds(ckpt.processor, images, (shape.height, shape.width), INPUT_NAME)
    start = time.perf_counter()
    result = apply_precision(onnx_path, opts.precision, feeds, calib_method=opts.calib_method,
                             quant_target=opts.quant_target,
                             external_data_threshold=opts.external_data_threshold, log=log)
    result.recipe["calibration"] = {"images": described, "seconds": round(time.perf_counter() - start, 2)}
    return result


def _build_engine(opts: BuildOptions, target, ckpt, shape: ExportShape, stage: Path) -> dict:
    shapes = engines.profiles(INPUT_NAME, (shape.height, shape.width), shape.dynamic_resolution,
                              ckpt.patch_size, opts.max_batch)
    facts = engines.build_engine(
        target, stage / ONNX_NAME, stage / engines.PLAN_NAME, shapes,
        timing_cache=opts.timing_cache or engines.default_timing_cache(target),
        optimization_level=opts.optimization_level, compute_capabilities=opts.compute_capabilities,
    )
    return {"built": True, **facts, "gpu": target.gpu,
            "parity": "not measured here: running an engine needs a GPU (scripts/gpu_check.sh)"}


def _lower_and_save(onnx_path: Path, rope: str, threshold: int) -> list[Path]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    lowered = model if rope == "none" else lower_rope(model, rope)
    return save_onnx(lowered, onnx_path, threshold=threshold)


def _manifest(opts, ckpt, shape, rope, files, parity, engine, timings, recipe) -> dict:
    cfg = ckpt.config
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
        },
        "interface": {
            "inputs": {INPUT_NAME: {"dtype": "float32",
                                    "shape": ["batch", 3, "height" if shape.dynamic_resolution else shape.height,
                                              "width" if shape.dynamic_resolution else shape.width]}},
            "outputs": {name: {"dtype": "float32", "shape": ["batch", "sequence", cfg.hidden_size]
                               if name != "pooler_output" else ["batch", cfg.hidden_size]}
                        for name in shape.output_names},
            "hidden_layer": shape.hidden_layer,
            "dynamic_resolution": shape.dynamic_resolution,
            "max_batch": opts.max_batch,
        },
        "precision": opts.precision,
        "precision_recipe": recipe,
        "rope_lowering": rope,
        "engine": engine,
        "parity": None if parity is None else {"passed": parity.passed, "worst": parity.worst()},
        "artifacts": {Path(f).name: {"sha256": sha256(Path(f)), "bytes": Path(f).stat().st_size} for f in files},
        "versions": _versions(),
        "timings_s": timings,
        "peak_rss_mib": round(_peak_rss_mib(), 1),
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


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
