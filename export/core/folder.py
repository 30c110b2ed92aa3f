"""The export folder: the name of every file in it, and how it is written (staged in a temporary sibling
folder, then renamed into place).

An interrupted run leaves the previous output untouched (or nothing); an existing output is
replaced only with --force. What the files hold is recorded in manifest.json (export.core.manifest).

    model.onnx                the portable graph (RoPE as the custom op with its function body, attention as
                              onnxruntime's MultiHeadAttention with its function body, or as asked)
    model.onnx.data           its weights, when they exceed EXTERNAL_DATA_THRESHOLD
    engine.onnx               the graph handed to the engine builder, when its RoPE or attention lowering differs
    engine-<rope>-<attention>.onnx  a graph the --artifacts rebuild lowered for its TensorRT (export/rebuild.py)
    model.plan                the TensorRT / TensorRT-RTX engine
    engine_error.txt          why the engine build failed (the ONNX artifacts are kept)
    preprocessor_config.json  the checkpoint's image processor
    image_newline.npy         a VLM's image_newline row (H_llm,) float32, for AnyRes packing (--projector)
    parity.json               the parity check against PyTorch (not with --skip-parity)
    overflow_report.json      what the fp16/int8/fp8 recipe kept in fp32 and why
    manifest.json             what the folder holds and how it was made
    ledger/                   the parity ledger's default output (python -m parity_tests)
    features-*.png            scripts/visualize_features.py's default output
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
DATA_SUFFIX = ".data"  # model.onnx.data: external weights beside a graph of the same name
# The graph handed to the builder when it needs a RoPE lowering that plain onnxruntime cannot run
# (the AOT plugin); model.onnx itself always stays portable.
ENGINE_ONNX_NAME = "engine.onnx"
# A graph export/rebuild.py lowered for the engine it built (the TensorRT there takes another lowering than
# the export's): named by its RoPE and attention forms, beside the export's graphs, which it never rewrites.
REBUILT_ENGINE_ONNX = "engine-{rope}-{attention}.onnx"
PLAN_NAME = "model.plan"
ENGINE_ERROR_NAME = "engine_error.txt"
# The checkpoint's image processor, beside model.onnx (export.core.preprocessing.CONFIG_NAME: that file stands alone).
PREPROCESSOR_CONFIG = "preprocessor_config.json"
# Written beside model.onnx by the int8/fp8 recipe (export/precision/recipe.py) and removed before publishing.
SMOOTHED_ONNX_NAME = "smoothed.onnx"
SPLIT_ONNX_NAME = "split.onnx"
QDQ_ONNX_NAME = "qdq.onnx"
# --projector: the VLM's image_newline, which the served AnyRes packing appends to every feature-map row.
IMAGE_NEWLINE_NAME = "image_newline.npy"
PARITY_NAME = "parity.json"
OVERFLOW_REPORT_NAME = "overflow_report.json"
MANIFEST_NAME = "manifest.json"
# The parity ledger's output (parity_tests/ledger.py), in DIR/ledger/ unless --out says otherwise.
LEDGER_DIR = "ledger"
LEDGER_JSON = PARITY_NAME  # the ledger's own record, under the export's name for one
LEDGER_MD = "ledger.md"
LEDGER_STAGES_PNG = "stages.png"
LEDGER_LAYERS_PNG = "layers.png"
# scripts/visualize_features.py's default output ({native}: "native-" in native mode, else "").
FEATURES_PNG = "features-{backend}-{native}{height}x{width}.png"
PROTOBUF_LIMIT = 2 * 1024**3
# Weights above this stay in model.onnx.data beside model.onnx (protobuf cannot hold > 2 GB);
# below it model.onnx is one self-contained file. Margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 64 * 1024**2


def rebuilt_engine_onnx(rope: str, attention: str) -> str:
    return REBUILT_ENGINE_ONNX.format(rope=rope, attention=attention)


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

