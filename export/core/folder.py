"""Output folder handling: stage everything in a temporary sibling folder, then rename into place.

An interrupted run leaves the previous output untouched (or nothing); an existing output is
replaced only with --force.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from export.core.errors import OutputExistsError

ONNX_NAME = "model.onnx"
DATA_SUFFIX = ".data"
PROTOBUF_LIMIT = 2 * 1024**3
# Weights above this stay in model.onnx.data beside model.onnx (protobuf cannot hold > 2 GB);
# below it model.onnx is one self-contained file. Margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 64 * 1024**2


def check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"--out {out} already holds output; pass --force to replace it or choose another "
                                "folder")


@contextlib.contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on error it is removed."""
    out = Path(out)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield stage
        publish(stage, out, force)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, out: Path, force: bool) -> None:
    check_output_dir(out, force)  # again: something may have appeared while we worked
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    stage.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_onnx(model, path: Path, *, threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Save `model` as `path`, with its weights in `path`.data when they exceed `threshold` bytes.

    `model` may hold its weights in memory or still refer to `path`.data (loaded with
    load_external_data=False). Returns the files that make up the model. Callers write inside a
    staging folder, which is what makes the result atomic.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    path = Path(path)
    data = path.with_name(path.name + DATA_SUFFIX)
    tensors = list(_tensors(model))
    if any(uses_external_data(t) for t in tensors):
        if data.stat().st_size > threshold:
            onnx.save(model, str(path))  # weights stay where they are
            return [path, data]
        load_external_data_for_model(model, str(path.parent))
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    if sum(len(t.raw_data) for t in tensors) > threshold:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=1024)
        return [path, data]
    onnx.save(model, str(path))
    return [path]


def _tensors(model):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


MANIFEST_NAME = "manifest.json"
# The checkpoint's image processor, beside model.onnx (export.core.preprocessing.CONFIG_NAME: that file stands alone).
PREPROCESSOR_CONFIG = "preprocessor_config.json"


PLAN_NAME = "model.plan"
# The graph handed to the builder when it needs a RoPE lowering that plain onnxruntime cannot run
# (the AOT plugin); model.onnx itself always stays portable.
ENGINE_ONNX_NAME = "engine.onnx"
