"""Helpers for tests and scripts: tiny artifacts, a served repository, encoded test images, references.

Used by the tests (the Triton ones, the backend models in-process) and scripts/load_test.py; nothing here runs
at import time.
"""

from __future__ import annotations

import importlib
import io
import os
import struct
import threading
import types
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

# CI sets this after scripts/setup_server_env.sh, so that a broken setup (no tritonserver, no
# tritonclient) fails the Triton tests instead of skipping them.
REQUIRE_SERVER_VAR = "MVT_REQUIRE_TRITON_SERVER"

if TYPE_CHECKING:
    from triton_repo.server import TritonServer


def tiny_artifacts(folder: Path, family_name: str = "mlcd-rope2d", *, max_batch: int = 8,
                   hidden_layer: int | None = None, runtime: str = "none") -> Path:
    """A tiny random checkpoint of `family_name` exported by the real pipeline into `folder`/artifacts.

    runtime "none" builds no engine whatever is installed, so the artifacts (and the tests on them)
    are the same on a CPU machine and on a GPU machine with TensorRT.
    """
    from export.models.families import family_by_name
    from export.models.testing import save_tiny_checkpoint
    from export.pipeline import BuildOptions, build

    folder = Path(folder)
    ckpt = save_tiny_checkpoint(family_by_name(family_name), folder / "checkpoint")  # UNICOM: a .pt in it
    out = folder / "artifacts"
    build(BuildOptions(model=str(ckpt), out=out, max_batch=max_batch, hidden_layer=hidden_layer, parity=False,
                       runtime=runtime), log=lambda _: None)
    return out


def encode(image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def photo_bytes() -> dict[str, bytes]:
    """Real photographs (scikit-image) as JPEG and PNG bytes: {"astronaut.jpg": ..., ...}."""
    from export.core.images import sample_photos

    astronaut, coffee, chelsea = sample_photos(3)
    return {"astronaut.jpg": encode(astronaut, "JPEG", quality=92), "coffee.png": encode(coffee, "PNG"),
            "chelsea.jpg": encode(chelsea, "JPEG", quality=85), "chelsea.png": encode(chelsea, "PNG")}


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A few hundred bytes claiming width x height pixels: a valid PNG header over a tiny image.

    The header is rewritten (with its CRC) so that a decoder that trusted it would allocate
    width * height * 3 bytes (30 GB by default): the decompression-bomb case, cheap to make.
    """
    from PIL import Image

    data = bytearray(encode(Image.new("RGB", (8, 8)), "PNG"))
    ihdr = 8  # after the PNG signature: length (4), b"IHDR" (4), width (4), height (4), ...
    assert data[ihdr + 4:ihdr + 8] == b"IHDR"
    data[ihdr + 8:ihdr + 16] = struct.pack(">II", width, height)
    body = bytes(data[ihdr + 4:ihdr + 8 + 13])  # chunk type + 13 data bytes
    data[ihdr + 8 + 13:ihdr + 8 + 17] = struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    return bytes(data)


def reference_pooler(checkpoint: Path, images: list[bytes], output: str | None = None) -> np.ndarray:
    """transformers' processor + model on the decoded images: the reference the server must match.
    checkpoint: what --model took (a folder, or UNICOM's .pt file); output None: the family's pooled output."""
    import torch
    from PIL import Image

    from export.models.loading import load_checkpoint

    ckpt = load_checkpoint(str(checkpoint))
    pil = [Image.open(io.BytesIO(b)) for b in images]
    pixels = ckpt.processor(images=pil, return_tensors="pt")["pixel_values"].float()
    with torch.no_grad():
        return getattr(ckpt.model(pixel_values=pixels), output or ckpt.family.pooled_output).numpy()


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine per batch item, each item flattened (a served output against its reference)."""
    from export.core.metrics import row_cosines

    return row_cosines(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))  # (B,)


@dataclass
class ServedRepository:
    """A running server on a generated repository (what the session fixture yields)."""

    server: TritonServer
    repository: Path
    artifacts: Path
    checkpoint: Path  # what --model took: a folder, or a released weights file
    ensemble: str = "embed"

    @property
    def http_url(self) -> str:
        return self.server.http_url

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url


def skip_unless_required(reason: str) -> NoReturn:
    """Skip a Triton test, fixture or module for `reason`; under MVT_REQUIRE_TRITON_SERVER=1 fail instead.

    The one gate for every Triton test: a missing client library and a missing server obey one rule.
    """
    import pytest

    if os.environ.get(REQUIRE_SERVER_VAR) == "1":
        pytest.fail(f"{REQUIRE_SERVER_VAR}=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def import_or_skip(module: str, extra: str = "serve"):
    """The imported module, or skip_unless_required saying which extra brings it (pytest.importorskip's
    place in Triton tests: that one skips even where CI requires the server)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        skip_unless_required(f"{module} is not importable ({exc}); pip install 'mvt-deploy[{extra}]'")


def tritonserver_or_skip(env: Path | str | None = None):
    """find_tritonserver(env), or skip_unless_required with what is missing."""
    from triton_repo.server import ServerUnavailable, find_tritonserver

    try:
        return find_tritonserver(env)
    except ServerUnavailable as exc:
        skip_unless_required(f"no tritonserver: {exc}")


def fake_pb_utils() -> Any:
    """A stand-in for Triton's `triton_python_backend_utils`, to run a backend model's model.py in this
    process: what our models call, as the 24.10 python backend defines it (src/pb_stub.cc,
    src/pb_tensor.cc, src/response_sender.cc). A Tensor may be "on the GPU" (as_numpy() then raises, as
    for a TensorRT encoder's BLS outputs unless the request prefers CPU memory); a Request's response
    sender records what was sent; Logger.log_warn appends to `pb.warnings`."""
    pb: Any = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_MEMORY_GPU, pb.TRITONSERVER_MEMORY_CPU = "TRITONSERVER_MEMORY_GPU", "TRITONSERVER_MEMORY_CPU"
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    pb.warnings = []

    class PreferredMemory:
        def __init__(self, preferred_memory_type, preferred_device_id=0):
            self.type, self.device = preferred_memory_type, preferred_device_id

    class Tensor:
        def __init__(self, name, array, on_gpu=False):
            self._name, self._array, self._gpu = name, array, on_gpu

        def name(self):
            return self._name

        def is_cpu(self):
            return not self._gpu

        def as_numpy(self):
            if self._gpu:
                raise RuntimeError("Tensor is stored in GPU and cannot be converted to NumPy.")
            return self._array

    class TritonError:
        def __init__(self, message):
            self._message = message

        def message(self):
            return self._message

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self._tensors, self._error = output_tensors, error

        def output_tensors(self):
            return self._tensors

        def has_error(self):
            return self._error is not None

        def error(self):
            return self._error

    class ResponseSender:
        def __init__(self):
            self.sent: list = []  # (response or None, flags)
            self.answered = threading.Event()

        def send(self, response=None, flags=0):
            self.sent.append((response, flags))
            self.answered.set()

    class Request:
        """A request to the model under test: its input tensors and a recording response sender."""

        def __init__(self, tensors):
            self._tensors, self.sender = tensors, ResponseSender()

        def inputs(self):
            return self._tensors

        def get_response_sender(self):
            return self.sender

    class Logger:
        @staticmethod
        def log_warn(message):
            pb.warnings.append(message)

    def by_name(tensors, name):
        return next((t for t in tensors if t.name() == name), None)

    pb.PreferredMemory, pb.Tensor, pb.TritonError, pb.InferenceResponse = PreferredMemory, Tensor, TritonError, \
        InferenceResponse
    pb.Request, pb.Logger = Request, Logger
    pb.get_input_tensor_by_name = lambda request, name: by_name(request.inputs(), name)
    pb.get_output_tensor_by_name = lambda response, name: by_name(response.output_tensors(), name)
    return pb


# The import name of each distribution a generated Dockerfile installs, and the packages of mvt-deploy itself
# (`pip install --no-deps /opt/mvt-deploy`: pyproject.toml's packages.find).
DISTRIBUTION_MODULES = {"pillow": "PIL", "numpy": "numpy", "onnxruntime": "onnxruntime", "onnx": "onnx",
                        "polygraphy": "polygraphy", "tensorrt-cu12": "tensorrt", "tensorrt-cu13": "tensorrt",
                        "triton": "triton", "torch": "torch"}
PROJECT_PACKAGES = ("export", "mvt_kernels", "triton_repo", "parity_tests", "embed")


def pip_installs(dockerfile: str) -> list[str]:
    """Every argument of every `pip install` in a Dockerfile, unquoted, options dropped."""
    import re

    text = dockerfile.replace("\\\n", " ")
    found: list[str] = []
    for command in re.findall(r"pip install ([^&\n]+)", text):
        found += [arg.strip('"') for arg in command.split() if not arg.startswith("-")]
    return found


def installed_modules(dockerfile: str) -> set[str]:
    """The modules the image a generated Dockerfile builds can import beyond Triton's own (an unknown
    distribution raises KeyError: add it to DISTRIBUTION_MODULES)."""
    from packaging.requirements import Requirement

    modules: set[str] = set()
    for arg in pip_installs(dockerfile):
        if arg.startswith("/"):  # the mvt-deploy checkout
            modules.update(PROJECT_PACKAGES)
        else:
            modules.add(DISTRIBUTION_MODULES[Requirement(arg.replace("${TENSORRT_VERSION}", "10")).name])
    return modules
