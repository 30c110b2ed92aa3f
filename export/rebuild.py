"""Rebuild model.plan from an existing export folder, for the GPU and TensorRT at hand.

    from export.rebuild import RebuildOptions, rebuild_engine
    result = rebuild_engine(RebuildOptions(Path("artifacts/rice"), runtime="tensorrt"))

A TensorRT plan runs only on the GPU architecture and TensorRT release that built it, so a plan made on
a workstation rarely fits a cluster node: this builds it again where it will run (the KServe start-up
step in triton_repo/kserve.py runs it inside the serving image). The checkpoint is never needed: every
fact comes from manifest.json, and every file the manifest records is checked against its sha256 and
size first; a folder that does not match is refused and left as it is. The new plan is written beside
the old one and renamed over it only when complete; the manifest (rewritten atomically) records it.

The RoPE lowering is chosen for the TensorRT at hand (export.graph.lowering.engine_lowering): the export's
`--rope` as the export would resolve it here, unless that does not build here, as the AOT plugin does not
without triton and torch (the KServe serving image has neither): then RotaryEmbedding (TensorRT >= 10.15) or
the decomposed form; the attention form too (export.graph.attention.resolve_attention: the export's
`--attention` for this TensorRT and precision). A graph lowered here is kept as engine-<rope>-<attention>.onnx
beside the export's graphs (which stay as they are), recorded with its sha256, and the engine entry names it
and its lowerings (`rope_lowering`, `attention_lowering`, and `rope_lowering_note` when the RoPE form is not
the export's choice).

`python -m export.build_engine --artifacts DIR` is the CLI.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from export import engine as engines
from export.core.errors import EngineUnavailableError, OptionError
from export.core.folder import MANIFEST_NAME, ONNX_NAME, PLAN_NAME, rebuilt_engine_onnx, sha256
from export.core.manifest import EngineEntry, Manifest, ManifestLike, engine_entry, read_manifest, write_manifest
from export.graph.attention import check_engine_attention, resolve_attention
from export.precision.recipe import cpu_quantized


@dataclass
class RebuildOptions:
    artifacts: Path  # a folder export.build_engine wrote
    # "tensorrt" or "tensorrt-rtx"; None: the runtime of the manifest's engine, else datacenter TensorRT
    runtime: str | None = None
    compute_capabilities: list[tuple[int, int]] | None = None  # TensorRT-RTX targets; None: GPU or all
    optimization_level: int | None = None
    timing_cache: Path | None = None  # None: ~/.cache/mvt-deploy, per runtime and version
    max_batch: int | None = None  # None: the export's (manifest interface.max_batch)
    force: bool = False  # rebuild even when the plan was built for this very target
    tf32: bool | None = None  # None: as the export chose (manifest engine.tf32; off when not recorded)


@dataclass
class RebuildResult:
    folder: Path
    engine: dict  # the manifest's engine entry after the call
    rebuilt: bool  # False: the existing plan already fits this target and --force was not given


class ArtifactsChangedError(OptionError):
    """A recorded file is missing or differs from its manifest entry: the folder is not what was exported."""


def verify_artifacts(folder: Path, manifest: ManifestLike) -> int:
    """Check every file the manifest records (size, then sha256); return how many; raise on the first mismatch."""
    records = Manifest.of(manifest).artifacts
    if not records:
        raise ArtifactsChangedError(f"{folder}/{MANIFEST_NAME} records no artifacts; re-export the folder with "
                                    "this version of python -m export.build_engine")
    advice = "re-export the folder (python -m export.build_engine) or restore the original files; nothing was rebuilt"
    for name, meta in sorted(records.items()):
        path = folder / name
        if not path.is_file():
            raise ArtifactsChangedError(f"{path} is missing but {MANIFEST_NAME} records it; {advice}")
        size = path.stat().st_size
        if size != meta.size:
            raise ArtifactsChangedError(f"{path} is {size} bytes but {MANIFEST_NAME} records {meta.size}: "
                                        f"the file changed after export; {advice}")
        digest = sha256(path)
        if digest != meta.sha256:
            raise ArtifactsChangedError(f"{path} has sha256 {digest[:16]}... but {MANIFEST_NAME} records "
                                        f"{str(meta.sha256)[:16]}...: the file changed after export; {advice}")
    return len(records)


def engine_shapes(manifest: ManifestLike, max_batch: int) -> dict | list[dict]:
    """The optimization profile the export would build, from the manifest alone (no checkpoint)."""
    m = Manifest.of(manifest)
    h, w = m.input_shape[2:]
    if m.dynamic_resolution:  # the profile is centred on the size it was traced at (as pipeline.build does)
        h, w = m.traced_size
    return engines.profiles(m.input_name, (int(h), int(w)), m.dynamic_resolution, m.patch_size, max_batch,
                            m.native_budget)


def _same_target(engine: EngineEntry, target: engines.EngineTarget, shapes: dict | list[dict],
                 opts: RebuildOptions) -> bool:
    """The recorded plan was built by this runtime and version, for this GPU (or RTX targets) and profile."""
    if not engine.built or engine.runtime != target.runtime or engine.version != target.version:
        return False
    if engine.profiles != shapes:
        return False
    if opts.optimization_level is not None and engine.optimization_level != opts.optimization_level:
        return False
    if _tf32(engine, opts) != bool((engine.data.get("tf32") or {}).get("enabled")):
        return False
    if target.runtime == "tensorrt-rtx":  # the targets build_engine would choose (engine.py), as recorded there
        ccs = opts.compute_capabilities or (None if target.gpu else list(engines.RTX_DEFAULT_CCS))
        wanted = ["current GPU"] if ccs is None else [f"{a}.{b}" for a, b in ccs]
        if engine.compute_capabilities != wanted:
            return False
    recorded = engine.gpu
    return (recorded.get("name"), recorded.get("compute_capability")) == \
        (target.gpu.get("name"), target.gpu.get("compute_capability"))


def _tf32(engine: EngineEntry, opts: RebuildOptions) -> bool:
    """TF32 for the rebuilt plan: --tf32, else what the recorded engine used."""
    return opts.tf32 if opts.tf32 is not None else bool((engine.data.get("tf32") or {}).get("enabled"))


def _wanted_lowering(manifest: Manifest, target: engines.EngineTarget) -> tuple[str, str | None]:
    """The RoPE lowering to build this runtime's engine from: the export's --rope resolved as build does, unless
    that does not build here (graph.lowering.engine_lowering: the AOT plugin without triton and torch, as in
    the KServe image); and why it differs (None: it does not)."""
    from export.graph.lowering import engine_lowering

    if manifest.rope_lowering == "none" or target.rope_runtime is None:  # no RoPE (CLIP-style, UNICOM)
        return "none", None
    return engine_lowering(manifest.rope, target.rope_runtime)


def _wanted_attention(manifest: Manifest, target: engines.EngineTarget) -> str:
    """The attention form the export would give this runtime's engine (its --attention, resolved as build does)."""
    return resolve_attention(manifest.attention, target.rope_runtime, manifest.precision)


def _recorded_graph(manifest: Manifest, lowering: str, attention: str) -> str | None:
    """The recorded graph already in `lowering` (RoPE) and `attention`: the engine's graph when it is in them
    (engine.onnx, or one an earlier rebuild wrote), model.onnx when it is in them itself; None: model.onnx
    must be lowered for this runtime first."""
    engine = manifest.engine
    if (engine.onnx and engine.onnx in manifest.artifacts and engine.rope_lowering == lowering
            and engine.attention_lowering == attention):
        return engine.onnx
    if rebuilt_engine_onnx(lowering, attention) in manifest.artifacts:
        return rebuilt_engine_onnx(lowering, attention)
    if (manifest.rope_lowering == lowering or lowering == "none") and manifest.attention_lowering == attention:
        return ONNX_NAME
    return None


def _temporary(folder: Path, prefix: str, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)  # same folder: rename is atomic
    os.close(fd)
    return Path(name)


def _lower_into(folder: Path, manifest: Manifest, lowering: str, attention: str, path: Path) -> None:
    """model.onnx with its RoPE in `lowering` and its attention in `attention`, saved as `path` beside it (the
    weights stay shared in model.onnx.data, whose location is relative). model.onnx holds the canonical RoPE2D
    nodes (--rope auto, custom and plugin; an older plugin-form model.onnx is turned back into them by
    lower_rope); a graph exported with another lowering has none left to lower."""
    import onnx

    from export.graph.attention import lower_graph

    rope = "none" if lowering in ("none", manifest.rope_lowering) else lowering  # only what differs is lowered
    if rope != "none" and manifest.rope_lowering not in ("custom", "plugin"):
        raise OptionError(f"{folder}/{ONNX_NAME} has its RoPE as {manifest.rope_lowering} (--rope "
                          f"{manifest.rope}), which cannot be lowered to {lowering} for this TensorRT; re-export "
                          "with --rope auto (the portable custom op), which every runtime's lowering starts from")
    model = onnx.load(str(folder / ONNX_NAME), load_external_data=False)
    onnx.save(lower_graph(model, rope, attention), str(path))


def rebuild_engine(opts: RebuildOptions, log: Callable[[str], None] = print) -> RebuildResult:
    folder = Path(opts.artifacts)
    manifest = read_manifest(folder)
    if opts.max_batch is not None and opts.max_batch < 1:
        raise OptionError(f"--max-batch {opts.max_batch} must be at least 1")
    old = manifest.engine
    runtime = opts.runtime or (old.runtime if old.runtime in engines.RUNTIMES else "tensorrt")
    if runtime not in engines.RUNTIMES:
        raise OptionError(f"--artifacts rebuilds an engine: --runtime {runtime} is not one; choose one of "
                          f"{', '.join(engines.RUNTIMES)}")
    if opts.compute_capabilities and runtime != "tensorrt-rtx":
        raise OptionError("--compute-capability chooses TensorRT-RTX targets; datacenter TensorRT builds for the "
                          "GPU it runs on: drop it, or use --runtime tensorrt-rtx")
    if cpu_quantized(manifest.precision, manifest.quant_target):
        raise OptionError(f"{folder} holds a --quant-target cpu {manifest.precision} graph for onnxruntime "
                          "on CPUs, which TensorRT does not build; re-export with --quant-target tensorrt")

    log(f"[1/3] Checking {folder} against its {MANIFEST_NAME} ...")
    count = verify_artifacts(folder, manifest)
    log(f"      {count} files match their recorded sha256 and size")

    target = engines.probe(runtime)
    if target.skip_reason is not None:
        raise EngineUnavailableError(f"cannot build {folder}/{PLAN_NAME} here: {target.skip_reason}; "
                                     "the folder is unchanged")
    max_batch = opts.max_batch or manifest.max_batch
    shapes = engine_shapes(manifest, max_batch)
    plan = folder / PLAN_NAME
    if plan.is_file() and _same_target(old, target, shapes, opts) and not opts.force:
        where = target.gpu.get("name") or ", ".join(old.compute_capabilities) or "this target"
        log(f"[2/3] {plan} was built by {target.runtime} {target.version} for {where} with this profile: kept "
            "(pass --force to rebuild it anyway)")
        return RebuildResult(folder, old.data, rebuilt=False)

    lowering, why = _wanted_lowering(manifest, target)
    if why:
        log(f"      RoPE: {why}")
    attention = _wanted_attention(manifest, target)
    check_engine_attention(attention, manifest.precision, target.runtime, target.version)
    recorded = _recorded_graph(manifest, lowering, attention)
    temporaries: list[Path] = []  # removed whatever happens: the recorded artifacts stay as they are
    try:
        new_graph = None  # (temporary, name): a graph lowered here, published beside the others on success
        if recorded is None:
            graph_name = rebuilt_engine_onnx(lowering, attention)
            log(f"      lowering {ONNX_NAME}'s RoPE to {lowering} and attention to {attention} for this runtime "
                f"({graph_name})")
            graph = _temporary(folder, ".rebuild-", ".onnx")
            temporaries.append(graph)
            _lower_into(folder, manifest, lowering, attention, graph)
            new_graph = (graph, graph_name)
        else:
            graph, graph_name = folder / recorded, recorded
        tmp_plan = _temporary(folder, f".{PLAN_NAME}.", ".tmp")
        temporaries.append(tmp_plan)
        log(f"[2/3] Building the {target.runtime} {target.version} engine from {graph_name} ...")
        start = time.perf_counter()
        facts = engines.build_engine(
            target, graph, tmp_plan, shapes,
            timing_cache=opts.timing_cache or engines.default_timing_cache(target),
            optimization_level=opts.optimization_level, compute_capabilities=opts.compute_capabilities,
            tf32=_tf32(old, opts))
        seconds = time.perf_counter() - start
        log(f"      done in {seconds:.1f} s")
        digest = sha256(tmp_plan)
        extra = {"rope_lowering_note": why} if why else {}
        engine = engine_entry(target, onnx=graph_name, rope_lowering=lowering, attention_lowering=attention,
                              facts=facts, sha256=digest,
                              built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), rebuilt=True,
                              build_seconds=round(seconds, 2), **extra)
        log(f"[3/3] Publishing {plan.name} and recording it in {MANIFEST_NAME} ...")
        # the old engine is kept in short in engine_history: the manifest stays the one record of this folder
        updated = manifest.with_engine(engine, plan.name, digest, facts["bytes"])
        if new_graph is not None:  # recorded like every artifact: the next rebuild checks and reuses it
            tmp_graph, name = new_graph
            updated["artifacts"][name] = {"sha256": sha256(tmp_graph), "bytes": tmp_graph.stat().st_size}
            os.replace(tmp_graph, folder / name)  # a new name: the export's graphs stay as they are
        os.replace(tmp_plan, plan)  # the old plan stays until the new one is complete
        write_manifest(folder, updated)  # temp + rename
    finally:
        for path in temporaries:
            path.unlink(missing_ok=True)
    log(f"wrote {plan} ({facts['bytes']} bytes, sha256 {digest[:16]}...)")
    return RebuildResult(folder, engine, rebuilt=True)
