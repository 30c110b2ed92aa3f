"""Reads an export folder (the output of export.build_engine) for the repository generator: `Artifacts`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from export.core.errors import OptionError, require
from export.core.folder import MANIFEST_NAME, ONNX_NAME, PLAN_NAME, PREPROCESSOR_CONFIG
from export.core.manifest import EngineEntry, Manifest, read_manifest
from export.core.preprocessing import ClipPreprocessing
from export.engine.profiles import profile_max_batch


@dataclass(frozen=True)
class Artifacts:
    folder: Path
    manifest: Manifest
    onnx: Path
    plan: Path | None
    preprocessor: ClipPreprocessing

    @property
    def engine(self) -> EngineEntry:
        return self.manifest.engine

    @property
    def engine_max_batch(self) -> int | None:
        return profile_max_batch(self.engine.profiles or {})

    def nodes_without_body(self) -> list[str]:
        """`domain.op_type` of each custom node in model.onnx that plain onnxruntime cannot run.

        Empty for what export.build_engine writes now (model.onnx is portable; an engine-only lowering
        goes to engine.onnx); an older export with `--rope plugin`, or a hand-made graph, has some.
        """
        onnx = require("onnx", "onnx")
        from export.graph.rope_node import nodes_without_body

        model = onnx.load(str(self.onnx), load_external_data=False)  # the graph only, not the weights
        return sorted({f"{n.domain}.{n.op_type}" for n in nodes_without_body(model)})


def profile_count(profiles: dict | list[dict] | None) -> int:
    """How many optimization profiles an engine entry's `profiles` holds (a dict is one; none recorded: 1)."""
    return len(profiles) if isinstance(profiles, list) else 1


def read_artifacts(folder: Path) -> Artifacts:
    folder = Path(folder)
    hint = f"run `python -m export.build_engine --out {folder}` first"
    if not folder.is_dir():
        raise OptionError(f"--artifacts {folder} is not a folder; {hint}")
    missing = [n for n in (MANIFEST_NAME, ONNX_NAME, PREPROCESSOR_CONFIG) if not (folder / n).is_file()]
    if missing:
        raise OptionError(f"--artifacts {folder} lacks {', '.join(missing)}; {hint}")
    manifest = read_manifest(folder)
    plan = folder / PLAN_NAME
    return Artifacts(folder, manifest, folder / ONNX_NAME, plan if plan.is_file() else None,
                     ClipPreprocessing.from_file(folder / PREPROCESSOR_CONFIG))
