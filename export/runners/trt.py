"""TensorRT and TensorRT-RTX engines through Polygraphy, chosen from the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from export.core.errors import EngineUnavailableError, MissingDependencyError, OptionError, ShapeOutsideProfilesError
from export.core.folder import MANIFEST_NAME, PLAN_NAME
from export.core.manifest import EngineEntry, Manifest, ManifestLike, read_manifest
from export.runners.base import Runner

# Device memory for the shapes of each call (Polygraphy: IExecutionContext.updateDeviceMemorySizeForShapes),
# not "static" (Polygraphy's default: the largest of all profiles, up to ~2.4x the native pixel budget) nor
# "profile" (the active profile's max shapes). The buffer only grows, so a run's peak is its largest input.
ALLOCATION_STRATEGY = "runtime"


class TensorRTRunner(Runner):
    """A serialized engine through Polygraphy's TrtRunner (GPU only). `runtime` selects Polygraphy's
    binding: "tensorrt" (datacenter) or "tensorrt-rtx"; an engine opens only in the runtime that built
    it, so take it from the manifest (engine_runner_from_manifest). Polygraphy binds one runtime per
    process: activating the other one raises.

    Each infer runs in the optimization profile that holds its input shapes (export.engine.choose_profile,
    keeping the active one when it fits); shapes no profile holds raise ShapeOutsideProfilesError with
    the profiles' ranges."""

    def __init__(self, plan, runtime: str = "tensorrt", output_names: Iterable[str] | None = None):
        from export.engine.target import RUNTIMES

        if runtime not in RUNTIMES:
            raise OptionError(f"engine runtime {runtime!r} is unknown; choose one of {', '.join(RUNTIMES)}")
        self.plan, self.runtime = Path(plan), runtime
        super().__init__(f"{runtime} ({self.plan.name})", output_names)
        self._runner: Any = None
        self.profiles: list[dict] = []  # the engine's, read at activation: [{input: {min, opt, max}}]
        self.profile: int | None = None  # the active profile index

    @property
    def trt_runner(self) -> Any:
        """The active Polygraphy TrtRunner (None before activate): its engine, context and stream."""
        return self._runner

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
        runner = TrtRunner(EngineFromBytes(BytesFromPath(str(self.plan))), name=self.name,
                           allocation_strategy=ALLOCATION_STRATEGY)
        runner.activate()
        self._runner = runner
        self.profiles = engine_profiles(runner.engine)
        self.profile = 0  # Polygraphy leaves a new context in profile 0

    def select_profile(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """Make the profile that holds `shapes` ({input: shape}) active; return its index."""
        from export.engine.profiles import choose_profile, describe_profiles

        index = choose_profile(self.profiles, shapes, self.profile)
        if index is None:
            name = next(iter(shapes))
            raise ShapeOutsideProfilesError(
                f"{self.plan.name}: input {name} {list(shapes[name])} fits none of its optimization profiles "
                f"({describe_profiles(self.profiles, name)}); resize the input into one, or rebuild with a wider "
                "profile (--image-size, --dynamic-resolution, --max-batch)")
        if index != self.profile:
            self._runner.set_profile(index)
            self.profile = index
        return index

    def infer_impl(self, feed):
        self.select_profile({name: tuple(np.shape(v)) for name, v in feed.items()})
        out = self._runner.infer({k: np.ascontiguousarray(v) for k, v in feed.items()})
        if self.output_names is None:
            self.output_names = list(out)
        # Copies: TrtRunner returns views of host buffers that the next infer overwrites.
        return {name: np.array(out[name], copy=True) for name in self.output_names if name in out}

    def deactivate_impl(self) -> None:
        runner, self._runner = self._runner, None
        self.profile = None
        runner.deactivate()


def engine_profiles(engine: Any) -> list[dict]:
    """[{input: {"min", "opt", "max"}}] per optimization profile of a deserialized ICudaEngine (TensorRT 10
    name-based API: get_tensor_profile_shape(name, index) -> (min, opt, max))."""
    from polygraphy.backend.trt.util import trt  # the module Polygraphy bound: tensorrt or tensorrt_rtx

    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    out = []
    for index in range(engine.num_optimization_profiles):
        profile = {}
        for name in inputs:
            lo, opt, hi = engine.get_tensor_profile_shape(name, index)
            profile[name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
        out.append(profile)
    return out


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
