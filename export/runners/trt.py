"""TensorRT and TensorRT-RTX engines through Polygraphy, chosen from the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from export.core.errors import EngineUnavailableError, MissingDependencyError, OptionError
from export.core.folder import MANIFEST_NAME, PLAN_NAME
from export.core.manifest import EngineEntry, Manifest, ManifestLike, read_manifest
from export.runners.base import Runner


class TensorRTRunner(Runner):
    """A serialized engine through Polygraphy's TrtRunner (GPU only). `runtime` selects Polygraphy's
    binding: "tensorrt" (datacenter) or "tensorrt-rtx"; an engine opens only in the runtime that built
    it, so take it from the manifest (engine_runner_from_manifest). Polygraphy binds one runtime per
    process: activating the other one raises."""

    def __init__(self, plan, runtime: str = "tensorrt", output_names: Iterable[str] | None = None):
        from export.engine.target import RUNTIMES

        if runtime not in RUNTIMES:
            raise OptionError(f"engine runtime {runtime!r} is unknown; choose one of {', '.join(RUNTIMES)}")
        self.plan, self.runtime = Path(plan), runtime
        super().__init__(f"{runtime} ({self.plan.name})", output_names)
        self._runner: Any = None

    def activate_impl(self) -> None:
        from export.engine.target import _select_polygraphy_runtime

        if not self.plan.is_file():
            raise EngineUnavailableError(f"{self.plan} does not exist; build it with python -m export.build_engine "
                                         f"--runtime {self.runtime}")
        _select_polygraphy_runtime(self.runtime)
        try:
            from polygraphy.backend.common import BytesFromPath
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        except ImportError:
            raise MissingDependencyError(f"polygraphy is not installed; install the extra: pip install "
                                         f"'mvt-deploy[{self.runtime}]'") from None
        runner = TrtRunner(EngineFromBytes(BytesFromPath(str(self.plan))), name=self.name)
        runner.activate()
        self._runner = runner

    def infer_impl(self, feed):
        out = self._runner.infer({k: np.ascontiguousarray(v) for k, v in feed.items()})
        if self.output_names is None:
            self.output_names = list(out)
        # Copies: TrtRunner returns views of host buffers that the next infer overwrites.
        return {name: np.array(out[name], copy=True) for name in self.output_names if name in out}

    def deactivate_impl(self) -> None:
        runner, self._runner = self._runner, None
        runner.deactivate()


def engine_runtime(manifest: ManifestLike, artifacts: Path) -> str:
    """The runtime that must open the folder's model.plan: manifest.json engine.runtime. Raises
    EngineUnavailableError when no engine was built."""
    from export.engine.target import RUNTIMES

    engine = Manifest.of(manifest).engine
    runtime = engine.runtime
    if not engine.built:
        raise EngineUnavailableError(
            f"no engine in {artifacts}: {engine.reason or 'none was built'}; build one with "
            "python -m export.build_engine --runtime tensorrt (on a GPU) or --runtime tensorrt-rtx")
    if runtime not in RUNTIMES:
        raise EngineUnavailableError(f"{artifacts}/{MANIFEST_NAME} names engine runtime {runtime!r}, not one of "
                                     f"{', '.join(RUNTIMES)}; re-export the folder with this version")
    return runtime


def engine_problem(engine: EngineEntry | dict, target) -> str | None:
    """Why an engine described by the manifest's `engine` entry cannot run where `target`
    (export.engine.probe(engine runtime)) was probed; None when it can."""
    engine = engine if isinstance(engine, EngineEntry) else EngineEntry(engine)
    runtime = engine.runtime
    if target.version is None:
        return f"the engine was built with {runtime}: {target.skip_reason}"
    if not _importable("polygraphy"):
        return f"polygraphy is not installed; install the extra: pip install 'mvt-deploy[{runtime}]'"
    if not target.gpu:
        return f"{PLAN_NAME} is a {runtime} engine: it runs only on an NVIDIA GPU and none is visible here"
    built_for = [cc for cc in engine.compute_capabilities if cc and cc != "current GPU"]
    here = target.gpu.get("compute_capability")
    if built_for and here and here not in built_for:
        hint = f" --compute-capability {here}" if runtime == "tensorrt-rtx" else ""
        return (f"the engine was built for compute capability {', '.join(built_for)}, this GPU "
                f"({target.gpu.get('name')}) is {here}; rebuild it: python -m export.build_engine --runtime "
                f"{runtime}{hint}")
    return None


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def engine_runner_from_manifest(artifacts: Path, output_names: Iterable[str] | None = None,
                                manifest: ManifestLike | None = None) -> TensorRTRunner:
    """A TensorRTRunner for DIR/model.plan in the runtime that built it, or EngineUnavailableError
    saying why it cannot run here and what to do."""
    from export import engine as engines

    artifacts = Path(artifacts)
    m = Manifest.of(manifest) if manifest is not None else read_manifest(artifacts)
    runtime = engine_runtime(m, artifacts)
    plan = artifacts / PLAN_NAME
    if not plan.is_file():
        raise EngineUnavailableError(f"{artifacts}/{MANIFEST_NAME} lists an engine but {plan} is missing; "
                                     f"rebuild the folder (python -m export.build_engine --runtime {runtime})")
    problem = engine_problem(m.engine, engines.probe(runtime))
    if problem:
        raise EngineUnavailableError(f"{plan} cannot run here: {problem}")
    return TensorRTRunner(plan, runtime, output_names or m.output_names or None)
