"""Pick a runner for an export folder."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from export.core.errors import OptionError
from export.core.manifest import Manifest, ManifestLike, read_manifest
from export.runners.base import RUNNER_KINDS, Runner, ort_mode_for
from export.runners.ort import OnnxRuntimeRunner
from export.runners.pyt import TorchRunner
from export.runners.triton_client import TritonRunner
from export.runners.trt import engine_runner_from_manifest


def runner_for_artifacts(artifacts: Path, kind: str = "onnxruntime", *, output_names: Iterable[str] | None = None,
                         url: str | None = None, model: str = "embed", manifest: ManifestLike | None = None) -> Runner:
    """The runner of `kind` (RUNNER_KINDS) for an export folder, not yet active:
    torch        the PyTorch reference the manifest names (loads the checkpoint now)
    onnxruntime  DIR/model.onnx, in the mode its precision is judged in (ort_mode_for)
    tensorrt     DIR/model.plan in the runtime that built it (engine_runner_from_manifest)
    triton       the ensemble `model` served at `url`
    """
    from export.core.folder import ONNX_NAME
    from export.graph.trace import export_shape
    from export.models.loading import reference_checkpoint

    artifacts = Path(artifacts)
    if kind not in RUNNER_KINDS:
        raise OptionError(f"backend {kind!r} is unknown; choose one of {', '.join(RUNNER_KINDS)}")
    if kind == "triton":
        if not url:
            raise OptionError("the triton backend needs the server's address: --url HOST:PORT")
        return TritonRunner(url, model, output_names)
    m = Manifest.of(manifest) if manifest is not None else read_manifest(artifacts)
    if kind == "onnxruntime":
        return OnnxRuntimeRunner(artifacts / ONNX_NAME, ort_mode_for(m.precision), output_names=output_names)
    if kind == "tensorrt":
        return engine_runner_from_manifest(artifacts, output_names, m)
    ckpt = reference_checkpoint(m)
    return TorchRunner(ckpt, export_shape(m), output_names)
