"""One model that turns a batch of image paths into rows: the unit both modes run (in-process: one;
Ray: one per actor).

Preprocessing is the served ensemble's own (export/core/preprocessing.py: the checkpoint's
CLIPImageProcessor, step by step); the model runs through export.runners's runners (onnxruntime, or
the folder's TensorRT plan in the runtime that built it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.core.errors import EngineUnavailableError, OptionError
from export.core.folder import ONNX_NAME, PREPROCESSOR_CONFIG
from export.core.interface import INPUT_NAME
from export.core.manifest import Manifest, ManifestLike

RUNTIME_CHOICES = ("auto", "onnxruntime", "tensorrt")
# The served ensemble's `normalize` step (triton_repo/backend_models/normalize.py) divides by
# max(||x||_2, EPS). That file imports triton_python_backend_utils at the top, so it cannot be
# imported here: this is the same definition, kept beside it by tests/embed/test_embed.py's comparison
# with torch.nn.functional.normalize (which the served step is documented to equal).
NORMALIZE_EPS = 1e-12


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """(B, E) -> (B, E) float32, each row divided by max(its L2 norm, 1e-12), the norm in float64."""
    norm = np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=-1, keepdims=True))  # (B, 1)
    return (x / np.maximum(norm, NORMALIZE_EPS)).astype(np.float32)


def resolve_runtime(artifacts: Path, runtime: str, manifest: ManifestLike) -> tuple[str, str | None]:
    """(the runtime to use, why the plan was passed over or None). "auto": the folder's plan when it can run
    here (export.runners decides, from the manifest), else onnxruntime; "tensorrt" when it cannot: the error."""
    from export.runners.trt import engine_runner_from_manifest

    if runtime not in RUNTIME_CHOICES:
        raise OptionError(f"--runtime {runtime!r} is unknown; choose one of {', '.join(RUNTIME_CHOICES)}")
    if runtime == "onnxruntime" or (runtime == "auto" and not Manifest.of(manifest).engine.built):
        return "onnxruntime", None
    try:
        engine_runner_from_manifest(artifacts, manifest=manifest)  # not activated: only the checks
    except EngineUnavailableError as exc:
        if runtime == "tensorrt":
            raise
        return "onnxruntime", str(exc)
    return "tensorrt", None


def engine_max_batch(manifest: ManifestLike) -> int:
    """The largest batch the folder's plan runs through TensorRTRunner: Polygraphy's TrtRunner keeps the
    engine's profile 0 (runner.py: "will default to the 0th profile"), the first the manifest records. Not
    interface.max_batch: `export.build_engine --artifacts --max-batch N` rebuilds the plan for N and
    leaves the export's interface as it was."""
    from export.engine.profiles import profile_max_batch

    m = Manifest.of(manifest)
    served = profile_max_batch(m.engine.profiles or {})
    return int(served) if served else m.max_batch


def preprocessor_config(artifacts: Path) -> Path:
    """DIR/preprocessor_config.json: the served preprocessing's recipe (the checkpoint's processor)."""
    path = Path(artifacts) / PREPROCESSOR_CONFIG
    if not path.is_file():
        raise OptionError(f"{artifacts} has no {PREPROCESSOR_CONFIG}; pass the folder export.build_engine wrote")
    return path


@dataclass
class Row:
    path: str
    embedding: np.ndarray | None  # (E,) float32
    error: str | None


class Embedder:
    """Image paths -> rows, with the folder's preprocessing and model. Not thread-safe; one per process/actor.

    runtime: "onnxruntime" or "tensorrt" (resolve "auto" with resolve_runtime first, or pass it: it is
    resolved here). threads: onnxruntime intra-op threads (0: its default).
    """

    def __init__(self, artifacts: Path | str, runtime: str = "auto", normalize: bool = False, threads: int = 0):
        from export.core.manifest import read_manifest
        from export.core.preprocessing import ClipPreprocessing

        self.artifacts = Path(artifacts)
        self.manifest = read_manifest(self.artifacts)
        self.output = self.manifest.pooled_output
        self.normalize = normalize
        self.runtime, self.fallback_reason = resolve_runtime(self.artifacts, runtime, self.manifest)
        self.preprocessing = ClipPreprocessing.from_file(preprocessor_config(self.artifacts))
        # Engines take batches up to their profile's max; onnxruntime's batch axis is unbounded.
        self.max_batch = engine_max_batch(self.manifest) if self.runtime == "tensorrt" else 0
        self.threads = threads
        self._runner: Any = None

    def activate(self) -> Embedder:
        from export.runners.base import ort_mode_for
        from export.runners.ort import OnnxRuntimeRunner
        from export.runners.trt import engine_runner_from_manifest

        if self._runner is None:
            if self.runtime == "tensorrt":
                runner: Any = engine_runner_from_manifest(self.artifacts, [self.output], self.manifest)
            else:
                runner = OnnxRuntimeRunner(self.artifacts / ONNX_NAME, ort_mode_for(self.manifest.precision),
                                           output_names=[self.output], threads=self.threads)
            self._runner = runner.activate()
        return self

    def deactivate(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.deactivate()

    def __enter__(self) -> Embedder:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def rows(self, paths: list[str]) -> list[Row]:
        """One row per path, in order: an embedding, or the reason the file could not be read or decoded."""
        from export.core.preprocessing import pixel_values_from_bytes

        self.activate()
        rows = [Row(p, None, None) for p in paths]
        pixels: dict[tuple, list[tuple[int, np.ndarray]]] = {}  # shape -> [(row, (3, H, W))]
        for i, path in enumerate(paths):
            try:
                data = Path(path).read_bytes()
                x = pixel_values_from_bytes(data, self.preprocessing)  # (3, H, W) float32
            except Exception as exc:  # one bad file is a row, never the end of the job
                rows[i].error = f"{type(exc).__name__}: {exc}"
                continue
            pixels.setdefault(x.shape, []).append((i, x))
        # Without a center crop, sizes differ per image (dynamic-resolution graphs): one batch per size.
        for group in pixels.values():
            step = self.max_batch or len(group)
            for start in range(0, len(group), step):
                chunk = group[start:start + step]
                batch = np.stack([x for _, x in chunk])  # (B, 3, H, W)
                out = self._runner.infer({INPUT_NAME: batch})[self.output]  # (B, E)
                out = out.reshape(len(chunk), -1).astype(np.float32)  # (B, E)
                if self.normalize:
                    out = l2_normalize(out)
                for (i, _), vector in zip(chunk, out):
                    rows[i].embedding = vector
        return rows

    def table(self, paths: list[str], identity: dict):
        """rows(paths) as a pyarrow Table with the output schema (store.schema(identity))."""
        return rows_table(self.rows(paths), identity)


def rows_table(rows: list[Row], identity: dict):
    import pyarrow as pa

    from embed.store import schema

    sizes = [0 if r.embedding is None else r.embedding.size for r in rows]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)  # (N + 1,)
    values = [r.embedding for r in rows if r.embedding is not None]
    flat = np.concatenate(values).astype(np.float32) if values else np.zeros(0, np.float32)  # (sum E,)
    embedding = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32()),
                                         mask=pa.array([r.embedding is None for r in rows], pa.bool_()))
    return pa.Table.from_arrays([pa.array([r.path for r in rows], pa.string()), embedding,
                                 pa.array([r.error for r in rows], pa.string())], schema=schema(identity))
