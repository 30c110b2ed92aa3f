"""The repository skeleton the crop ensemble (crop.py) and the ragged modes (ragged.py) share: model names and
the checks on them, file placement, the encoder model, a python model's code, and the repo-info file.

One place for these, so that both kinds of repository refuse the same options with the same words and lay
out the encoder alike.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from export.core import preprocessing
from export.core.errors import OptionError
from export.core.folder import PREPROCESSOR_CONFIG
from triton_repo import config as tc
from triton_repo.export_folder import Artifacts
from triton_repo.forms import EncoderForm
from triton_repo.interface import EncoderInterface, Warmup
from triton_repo.options import RepoOptions, RepoResult

if TYPE_CHECKING:
    import numpy as np

HERE = Path(__file__).resolve().parent
# The preprocess and ragged models import this file from beside them; the project imports it as a module.
PREPROCESSING_PY = Path(preprocessing.__file__).resolve()
ENCODER, PREPROCESS, NORMALIZE = "encoder", "preprocess", "normalize"
REPO_INFO = "mvt_repository.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def validate_model_name(name: str, what: str = "--name") -> str:
    """A model name is a folder name in the repository: no separators, no `..`, nothing hidden."""
    if not isinstance(name, str) or ".." in name or "/" in name or "\\" in name or not _NAME.match(name):
        raise OptionError(
            f"{what} {name!r} is not a valid model name; use letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, without path separators or '..' (e.g. embed)"
        )
    return name


def check_options(opts: RepoOptions, what: str) -> str:
    """The name of the model clients call (`what` names it in the message: "ensemble name" or "name"), after
    the checks every repository makes on the options it writes into its models."""
    name = validate_model_name(opts.name)
    if name in (ENCODER, PREPROCESS, NORMALIZE):
        raise OptionError(f"--name {name} is taken by the {name} step; choose another {what} (e.g. embed)")
    if opts.instances < 1:
        raise OptionError(f"--instances {opts.instances} must be at least 1")
    if opts.intra_op_threads < 0:
        raise OptionError(f"--intra-op-threads {opts.intra_op_threads} must be 0 (onnxruntime's default) or more")
    return name


def copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard link when on one filesystem (a bigG model is 7 GB), else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def sample_jpeg() -> bytes:
    """A real photograph (scikit-image's astronaut) as JPEG bytes: warm-up runs the real path."""
    from export.core.images import sample_photos

    buf = io.BytesIO()
    sample_photos(1)[0].save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def place_encoder(stage: Path, spec: EncoderForm, art: Artifacts, iface: EncoderInterface, opts: RepoOptions, *,
                  max_batch: int, pixels: np.ndarray, profiles: int, dynamic_batching: bool = True,
                  plan_in_pod: bool = False) -> Path:
    """<stage>/encoder: the form's model files, its model.py, a warm-up on `pixels` (3, H, W); its config's path.

    plan_in_pod (--kserve, no plan Triton can load): an empty version folder, which the start-up step fills."""
    enc = stage / ENCODER
    if plan_in_pod:  # the start-up step copies the plan in before Triton starts (kserve.start_script)
        (enc / "1").mkdir(parents=True)
    for i, filename in enumerate(() if plan_in_pod else spec.model_files):  # the first is required (refusal())
        if i == 0 or (art.folder / filename).is_file():
            link_or_copy(art.folder / filename, enc / "1" / filename)
    if spec.model_py:
        copy_file(HERE / "backend_models" / spec.model_py, enc / "1" / "model.py")
    params = spec.parameters(opts) if spec.parameters else None
    write_file(enc / "warmup" / iface.input.name, pixels.astype("<f4").tobytes())
    cfg = tc.encoder_config(
        spec, iface, name=ENCODER, max_batch=max_batch, instances=opts.instances, parameters=params,
        warmup=Warmup("sample_photo", 1, {iface.input.name: ("TYPE_FP32", tuple(pixels.shape), iface.input.name)}),
        profiles=profiles, dynamic_batching=dynamic_batching)
    return tc.write_config(cfg, enc)


def place_python_model(model: Path, model_py: str, art: Artifacts) -> None:
    """<model>/1/: backend_models/<model_py> as model.py, beside preprocessing.py and the checkpoint's
    preprocessor config (the models that decode and preprocess images)."""
    copy_file(HERE / "backend_models" / model_py, model / "1" / "model.py")
    copy_file(PREPROCESSING_PY, model / "1" / "preprocessing.py")
    copy_file(art.folder / PREPROCESSOR_CONFIG, model / "1" / PREPROCESSOR_CONFIG)


def read_back(result: RepoResult) -> None:
    """Parse every config written the way Triton will, then point result.models at the published repository."""
    for model, path in result.models.items():
        tc.parse_config(path)
        result.models[model] = Path(result.out) / model / tc.CONFIG_NAME


def write_repo_info(stage: Path, opts: RepoOptions, art: Artifacts, *, ensemble: str, preprocess: str,
                    backend: str, max_batch: int, image_size: list[int], outputs: list[str],
                    pooled_output: str | None, normalized: bool, **extra: object) -> None:
    """mvt_repository.json: what the repository serves, for tools that take a repository (scripts/load_test.py)."""
    info = {"ensemble": ensemble, "encoder": ENCODER, "preprocess": preprocess, "backend": backend,
            "max_batch": max_batch, "image_size": image_size, "outputs": outputs, "pooled_output": pooled_output,
            "normalized": normalized, "artifacts": str(Path(opts.artifacts).resolve()),
            "model": art.manifest.model, **extra}
    (stage / REPO_INFO).write_text(json.dumps(info, indent=2) + "\n")
