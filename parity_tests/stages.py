"""The ledger's stages: how each one is made (from one export folder) and how it is run.

    deployed          the folder's own model.onnx, as exported (its precision and RoPE lowering)
    fp32-<lowering>   the canonical fp32 graph in each RoPE lowering (custom, onnx23, decomposed,
                      plugin; plugin runs with the reference body, Polygraphy's pluginref idea)
    fp16, int8        the project's precision recipes applied to the canonical graph, calibrated
                      as the folder's manifest says; int8 judged as TensorRT runs it (onnxruntime
                      with optimizations off: float simulation of Q/DQ)
    int8-cpu          reported, not judged: the int8 recipe with --quant-target cpu (uint8 activations,
                      fp32 elsewhere), which onnxruntime runs with integer kernels: what a CPU
                      deployment of int8 gets
    tensorrt          the folder's model.plan, where TensorRT and a GPU exist
    triton            a running Triton server (--url), fed the photographs as PNG bytes

Every runner has the same call: runner(pixels [B, 3, H, W] float32, images: B PIL images) ->
{output name: array}; the Triton runner uses the images (the server preprocesses), the others the pixels.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from export.artifacts import EXTERNAL_DATA_THRESHOLD, ONNX_NAME, save_onnx
from export.families import INPUT_NAME
from export.lowering import LOWERINGS

STAGE_GROUPS = ("deployed", "fp32", "fp16", "int8", "tensorrt", "triton")


@dataclass
class Stage:
    name: str  # "fp32-onnx23"
    precision: str  # which threshold table judges it
    kind: str  # "onnx", "tensorrt" or "triton"
    description: str
    path: Path | None = None
    ort_mode: str = "optimized"  # export.parity.ORT_MODES key, for "onnx" stages
    enforced: bool = True  # False: reported, not judged
    skip_reason: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"name": self.name, "precision": self.precision, "kind": self.kind, "description": self.description,
                "path": None if self.path is None else str(self.path), "ort_mode": self.ort_mode if self.kind == "onnx"
                else None, "enforced": self.enforced, "skip_reason": self.skip_reason, "notes": self.notes}


def resolve_groups(requested: list[str] | None) -> tuple[str, ...]:
    from export.errors import OptionError

    if not requested:
        return STAGE_GROUPS
    unknown = [g for g in requested if g not in STAGE_GROUPS]
    if unknown:
        raise OptionError(f"--stages {' '.join(unknown)} unknown; choose from {', '.join(STAGE_GROUPS)}")
    return tuple(g for g in STAGE_GROUPS if g in requested)


def copy_onnx(src: Path, dst: Path) -> Path:
    """Copy model.onnx and its external data (same relative name) into dst's folder."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    data = src.with_name(src.name + ".data")
    if data.exists():
        shutil.copyfile(data, dst.with_name(dst.name + ".data"))
    return dst


def canonical_graph(ckpt, shape, manifest: dict, artifacts: Path, work: Path, log) -> tuple[Path, str]:
    """The canonical fp32 graph (RoPE2D nodes with their function body): the folder's own model.onnx
    when it is exactly that (fp32, custom lowering), else a fresh trace. Returns (path, how)."""
    from export.onnx_export import export_canonical

    own = artifacts / ONNX_NAME
    if manifest.get("precision") == "fp32" and manifest.get("rope_lowering") in ("custom", "none") and own.exists():
        return own, f"reused {own} (fp32, RoPE lowering {manifest.get('rope_lowering')})"
    path = work / "canonical" / ONNX_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"      tracing the canonical fp32 graph ({shape.height}x{shape.width}) ...")
    export_canonical(ckpt, shape, path)
    return path, f"traced afresh into {path}"


def lowered_graph(canonical: Path, lowering: str, dst: Path) -> Path:
    import onnx

    from export.lowering import lower_rope

    model = onnx.load(str(canonical))  # with external data: save_onnx decides again where weights go
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_onnx(lower_rope(model, lowering), dst)
    return dst


def precision_graph(ckpt, shape, canonical: Path, precision: str, dst: Path, manifest: dict, log,
                    quant_target: str = "tensorrt") -> dict:
    """The project's fp16 / int8 recipe applied to a copy of the canonical graph (as build() does)."""
    import onnx

    from export.lowering import lower_rope
    from export.precision import apply_precision
    from export.precision.calibration import calibration_feeds, calibration_images

    options = manifest.get("options", {})
    folder = options.get("calib_images")
    images, described = calibration_images(Path(folder) if folder else None, log=lambda _: None)
    feeds = calibration_feeds(ckpt.processor, images, (shape.height, shape.width), INPUT_NAME)
    copy_onnx(canonical, dst)
    result = apply_precision(dst, precision, feeds, calib_method=options.get("calib_method") or "max",
                             quant_target=quant_target, external_data_threshold=EXTERNAL_DATA_THRESHOLD, log=lambda _: None)
    if ckpt.family.has_rope:
        save_onnx(lower_rope(onnx.load(str(dst)), "custom"), dst)
    result.recipe["calibration"] = described
    return result.recipe


def plan_stages(ckpt, shape, manifest: dict, artifacts: Path, work: Path, groups, url: str | None,
                log: Callable[[str], None]) -> tuple[list[Stage], dict]:
    """Make every requested stage's file in `work`; return the stages (skipped ones with a reason)
    and facts for the ledger (how the canonical graph was obtained, the recipes)."""
    from tqdm.auto import tqdm

    deployed_precision = manifest.get("precision", "fp32")
    facts: dict = {}
    stages: list[Stage] = []
    if "deployed" in groups:
        stages.append(Stage("deployed", deployed_precision, "onnx",
                            f"{artifacts / ONNX_NAME} as exported ({deployed_precision}, "
                            f"RoPE {manifest.get('rope_lowering')})", artifacts / ONNX_NAME,
                            ort_mode="optimized" if deployed_precision == "fp32" else "exact"))
    needs_canonical = any(g in groups for g in ("fp32", "fp16", "int8"))
    canonical = None
    if needs_canonical:
        canonical, how = canonical_graph(ckpt, shape, manifest, artifacts, work, log)
        facts["canonical"] = how
    if "fp32" in groups:
        lowerings = LOWERINGS if ckpt.family.has_rope else ("none",)
        for lowering in tqdm(lowerings, desc="      lowering RoPE", leave=False):
            if lowering == "none":
                path, desc = canonical, "the canonical fp32 graph (no RoPE to lower)"
            else:
                path = lowered_graph(canonical, lowering, work / f"fp32-{lowering}" / ONNX_NAME)
                desc = f"canonical fp32 graph, RoPE lowered to {lowering}"
            stage = Stage(f"fp32-{lowering}", "fp32", "onnx", desc, path)
            if lowering == "plugin":
                stage.notes.append("plugin nodes run with the RoPE2D reference body (pluginref); "
                                   "the plugin kernel itself runs only in TensorRT")
            stages.append(stage)
    facts["recipes"] = {}
    for precision in ("fp16", "int8"):
        if precision not in groups:
            continue
        log(f"      applying the {precision} recipe ...")
        path = work / precision / ONNX_NAME
        facts["recipes"][precision] = precision_graph(ckpt, shape, canonical, precision, path, manifest, log)
        stages.append(Stage(precision, precision, "onnx", f"the {precision} recipe on the canonical graph"
                            + (" (onnxruntime without optimizations: Q/DQ as float simulation, as TensorRT "
                               "runs int8)" if precision == "int8" else " (onnxruntime without optimizations)"),
                            path, ort_mode="exact"))
        if precision == "int8":
            log("      int8 for CPUs (--quant-target cpu) ...")
            cpu = work / "int8-cpu" / ONNX_NAME
            facts["recipes"]["int8-cpu"] = precision_graph(ckpt, shape, canonical, "int8", cpu, manifest, log,
                                                              quant_target="cpu")
            stages.append(Stage("int8-cpu", "int8", "onnx", "the int8 recipe with --quant-target cpu (uint8 "
                                "activations, fp32 elsewhere), onnxruntime optimizations on: its integer "
                                "kernels, what a CPU deployment of int8 gets", cpu, ort_mode="optimized",
                                enforced=False))
    if "tensorrt" in groups:
        stages.append(tensorrt_stage(artifacts, manifest))
    if "triton" in groups:
        stages.append(Stage("triton", deployed_precision, "triton", f"Triton server at {url}" if url else
                            "a Triton server", skip_reason=None if url else
                            "no server given: pass --url HOST:PORT of a server serving this folder "
                            "(python -m triton_repo.build / triton_repo.serve)"))
    return stages, facts


def tensorrt_stage(artifacts: Path, manifest: dict) -> Stage:
    from export.engine import PLAN_NAME, gpu_info

    precision = manifest.get("precision", "fp32")
    engine = manifest.get("engine") or {}
    plan = artifacts / PLAN_NAME
    stage = Stage("tensorrt", precision, "tensorrt", f"{plan} ({engine.get('runtime', 'tensorrt')})", plan)
    if not engine.get("built") or not plan.exists():
        stage.skip_reason = f"no engine in {artifacts}: {engine.get('reason') or 'model.plan is missing'}"
    elif not gpu_info():
        stage.skip_reason = "model.plan exists but no CUDA GPU is visible: an engine runs only on a GPU"
    else:
        try:
            import polygraphy  # noqa: F401
        except ImportError:
            stage.skip_reason = "polygraphy is not installed; install mvt-deploy[tensorrt]"
    return stage


# ------------------------------------------------------------------------------------------------ runners

class OnnxRunner:
    """onnxruntime on CPU; plugin-form graphs run through a sibling copy with the reference body."""

    def __init__(self, path: Path, mode: str = "optimized", output_names=None):
        from export.parity import onnx_session

        self.session, _ = onnx_session(path, mode)
        self.output_names = list(output_names or [o.name for o in self.session.get_outputs()])

    def __call__(self, pixels: np.ndarray, images=None) -> dict[str, np.ndarray]:
        values = self.session.run(self.output_names, {INPUT_NAME: np.ascontiguousarray(pixels, np.float32)})
        return dict(zip(self.output_names, values))


class TensorRTRunner:
    """A serialized engine through Polygraphy (GPU only)."""

    def __init__(self, plan: Path, output_names):
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.runner = TrtRunner(EngineFromBytes(BytesFromPath(str(plan))))
        self.runner.activate()
        self.output_names = list(output_names)

    def __call__(self, pixels: np.ndarray, images=None) -> dict[str, np.ndarray]:
        out = self.runner.infer({INPUT_NAME: np.ascontiguousarray(pixels, np.float32)})
        return {name: np.asarray(out[name]) for name in self.output_names if name in out}


class TritonRunner:
    """The served ensemble over HTTP: images go as PNG bytes (lossless, so the server decodes the very
    pixels the reference saw), input `image` TYPE_STRING [B, 1]."""

    def __init__(self, url: str, model: str, output_names):
        import tritonclient.http as httpclient

        self.client = httpclient.InferenceServerClient(url)
        self.model = model
        if not self.client.is_model_ready(model):
            raise RuntimeError(f"model {model!r} is not ready on the server at {url}")
        served = {o["name"] for o in self.client.get_model_metadata(model)["outputs"]}
        self.output_names = [n for n in output_names if n in served]

    def __call__(self, pixels, images) -> dict[str, np.ndarray]:
        import tritonclient.http as httpclient

        payload = np.empty((len(images), 1), dtype=object)  # (B, 1) of bytes
        for i, image in enumerate(images):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            payload[i, 0] = buf.getvalue()
        request = httpclient.InferInput("image", list(payload.shape), "BYTES")
        request.set_data_from_numpy(payload)
        outputs = [httpclient.InferRequestedOutput(n) for n in self.output_names]
        result = self.client.infer(self.model, [request], outputs=outputs)
        return {n: result.as_numpy(n) for n in self.output_names}


def make_runner(stage: Stage, output_names, url: str | None = None, triton_model: str = "embed"):
    if stage.kind == "onnx":
        return OnnxRunner(stage.path, stage.ort_mode, output_names)
    if stage.kind == "tensorrt":
        return TensorRTRunner(stage.path, output_names)
    if stage.kind == "triton":
        return TritonRunner(url, triton_model, output_names)
    raise ValueError(f"unknown stage kind {stage.kind!r}")
