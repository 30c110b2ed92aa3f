"""The ledger's stages: how each one is made (from one export folder) and which runner runs it.

    deployed          the folder's own model.onnx, as exported (its precision and RoPE lowering)
    fp32-<lowering>   the canonical fp32 graph in each RoPE lowering (custom, onnx23, decomposed,
                      plugin; plugin runs with the reference body, Polygraphy's pluginref idea)
    fp16, int8        the project's precision recipes applied to the canonical graph, calibrated
                      as the folder's manifest says; int8 judged as TensorRT runs it (onnxruntime
                      with optimizations off: float simulation of Q/DQ)
    int8-cpu          reported, not judged: the int8 recipe with --quant-target cpu (uint8 activations,
                      fp32 elsewhere), which onnxruntime runs with integer kernels: what a CPU
                      deployment of int8 gets
    tensorrt          the folder's model.plan, in the runtime that built it (manifest engine.runtime),
                      where that runtime and a GPU exist
    triton            a running Triton server (--url), fed the photographs as PNG bytes

Runners are export.runners's; export.runners.image_feed gives each its feed (pixels, or images
for the server, which preprocesses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from export.core.errors import EngineUnavailableError
from export.core.folder import ONNX_NAME, PLAN_NAME
from export.core.manifest import Manifest, ManifestLike
from export.graph.lowering import LOWERINGS
from export.runners.base import Runner, ort_mode_for
from export.runners.ort import OnnxRuntimeRunner
from export.runners.triton_client import TritonRunner
from export.runners.trt import engine_runner_from_manifest
from export.variants import lowered_graph, precision_graph

STAGE_GROUPS = ("deployed", "fp32", "fp16", "int8", "tensorrt", "triton")


@dataclass
class Stage:
    name: str  # "fp32-onnx23"
    precision: str  # which threshold table judges it
    kind: str  # "onnx", "tensorrt" or "triton"
    description: str
    path: Path | None = None
    ort_mode: str = "optimized"  # export.runners.ORT_MODES key, for "onnx" stages
    enforced: bool = True  # False: reported, not judged
    skip_reason: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"name": self.name, "precision": self.precision, "kind": self.kind, "description": self.description,
                "path": None if self.path is None else str(self.path), "ort_mode": self.ort_mode if self.kind == "onnx"
                else None, "enforced": self.enforced, "skip_reason": self.skip_reason, "notes": self.notes}


def resolve_groups(requested: list[str] | None) -> tuple[str, ...]:
    from export.core.errors import OptionError

    if not requested:
        return STAGE_GROUPS
    unknown = [g for g in requested if g not in STAGE_GROUPS]
    if unknown:
        raise OptionError(f"--stages {' '.join(unknown)} unknown; choose from {', '.join(STAGE_GROUPS)}")
    return tuple(g for g in STAGE_GROUPS if g in requested)


def canonical_graph(ckpt, shape, manifest: Manifest, artifacts: Path, work: Path, log) -> tuple[Path, str]:
    """The canonical fp32 graph (RoPE2D nodes with their function body): the folder's own model.onnx
    when it is exactly that (fp32, custom lowering), else a fresh trace. Returns (path, how)."""
    from export.graph.trace import export_canonical

    own = artifacts / ONNX_NAME
    if manifest.precision == "fp32" and manifest.rope_lowering in ("custom", "none") and own.exists():
        return own, f"reused {own} (fp32, RoPE lowering {manifest.rope_lowering})"
    path = work / "canonical" / ONNX_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"      tracing the canonical fp32 graph ({shape.height}x{shape.width}) ...")
    export_canonical(ckpt, shape, path)
    return path, f"traced afresh into {path}"


def plan_stages(ckpt, shape, manifest: ManifestLike, artifacts: Path, work: Path, groups, url: str | None,
                log: Callable[[str], None]) -> tuple[list[Stage], dict]:
    """Make every requested stage's file in `work`; return the stages (skipped ones with a reason)
    and facts for the ledger (how the canonical graph was obtained, the recipes)."""
    from tqdm.auto import tqdm

    manifest = Manifest.of(manifest)
    deployed_precision = manifest.precision
    facts: dict = {}
    stages: list[Stage] = []
    if "deployed" in groups:
        stages.append(Stage("deployed", deployed_precision, "onnx",
                            f"{artifacts / ONNX_NAME} as exported ({deployed_precision}, "
                            f"RoPE {manifest.rope_lowering})", artifacts / ONNX_NAME,
                            ort_mode=ort_mode_for(deployed_precision)))
    needs_canonical = any(g in groups for g in ("fp32", "fp16", "int8"))
    canonical = None
    if needs_canonical:
        canonical, how = canonical_graph(ckpt, shape, manifest, artifacts, work, log)
        facts["canonical"] = how
    if "fp32" in groups:
        assert canonical is not None  # needs_canonical
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
    calibration = manifest.calibration_options
    for precision in ("fp16", "int8"):
        if precision not in groups:
            continue
        log(f"      applying the {precision} recipe ...")
        assert canonical is not None  # needs_canonical
        path = work / precision / ONNX_NAME
        facts["recipes"][precision] = precision_graph(ckpt, shape, canonical, precision, path, **calibration)
        stages.append(Stage(precision, precision, "onnx", f"the {precision} recipe on the canonical graph"
                            + (" (onnxruntime without optimizations: Q/DQ as float simulation, as TensorRT "
                               "runs int8)" if precision == "int8" else " (onnxruntime without optimizations)"),
                            path, ort_mode="exact"))
        if precision == "int8":
            log("      int8 for CPUs (--quant-target cpu) ...")
            cpu = work / "int8-cpu" / ONNX_NAME
            facts["recipes"]["int8-cpu"] = precision_graph(ckpt, shape, canonical, "int8", cpu, quant_target="cpu",
                                                              **calibration)
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


def tensorrt_stage(artifacts: Path, manifest: ManifestLike) -> Stage:
    """The folder's engine, skipped with the reason when it cannot run here (export.runners decides)."""
    manifest = Manifest.of(manifest)
    plan = artifacts / PLAN_NAME
    stage = Stage("tensorrt", manifest.precision, "tensorrt", f"{plan} ({manifest.engine.runtime})", plan)
    try:
        engine_runner_from_manifest(artifacts, manifest=manifest)  # not activated: only the checks
    except EngineUnavailableError as exc:
        stage.skip_reason = str(exc)
    return stage


def make_runner(stage: Stage, output_names, artifacts: Path, url: str | None = None,
                triton_model: str = "embed") -> Runner:
    """The stage's runner, not yet active."""
    if stage.kind == "onnx":
        return OnnxRuntimeRunner(stage.path, stage.ort_mode, output_names=output_names)
    if stage.kind == "tensorrt":
        return engine_runner_from_manifest(artifacts, output_names)
    if stage.kind == "triton":
        if url is None:
            raise ValueError(f"stage {stage.name!r} is served by Triton: pass its url")
        return TritonRunner(url, triton_model, output_names)
    raise ValueError(f"unknown stage kind {stage.kind!r}")
