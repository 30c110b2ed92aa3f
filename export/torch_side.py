"""The PyTorch half of a build (load, trace, reference outputs), run in a child process.

Tracing leaves the model's weights referenced from inside torch's export machinery (C++ side, out
of reach of the garbage collector: about two copies of the weights stay alive after the model is
dropped). For MLCD-bigG that is 7-15 GB which the ONNX steps (the overflow scan, calibration,
parity) would otherwise hold on top of their own copy. In a child process, all of it goes back to
the system when the child exits: the parent keeps the checkpoint's config, processor and family,
the traced model.onnx and the reference outputs (a few MB).

The child is started with "spawn" (fork is unsafe once torch or onnxruntime have started threads);
its log lines come back to the parent's `log` as they happen, and its exceptions are re-raised in
the parent (an option error stays an option error: exit 2, nothing written).
"""

from __future__ import annotations

import multiprocessing
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .loading import Checkpoint
from .onnx_export import ExportShape


@dataclass
class TorchRequest:
    model: str | None
    random_weights: bool
    image_size: tuple[int, int] | None
    dynamic_resolution: bool
    hidden_layer: int | None
    onnx_path: Path
    parity: bool
    first_step: int  # step numbers continue the parent's
    total_steps: int


@dataclass
class TorchResult:
    checkpoint: Checkpoint  # model released: config, processor, family
    shape: ExportShape
    references: list | None  # parity.ReferenceCase, when parity runs
    timings: dict[str, float]


def run_torch_side(request: TorchRequest, log: Callable[[str], None]) -> TorchResult:
    """Run `torch_steps(request)` in a spawned child; forward its log lines; return its result."""
    ctx = multiprocessing.get_context("spawn")
    messages = ctx.Queue()
    child = ctx.Process(target=_child, args=(request, messages), name="mvt-torch-side", daemon=True)
    child.start()
    try:
        while True:
            try:
                kind, payload = messages.get(timeout=1.0)
            except queue.Empty:
                if not child.is_alive():
                    raise RuntimeError(f"the PyTorch step (load, trace) died with exit code {child.exitcode}"
                                       f"{' (killed: out of memory?)' if child.exitcode == -9 else ''}") from None
                continue
            if kind == "log":
                log(payload)
            elif kind == "error":
                raise payload
            else:
                return payload
    finally:
        if child.is_alive():
            child.join(timeout=30)
        if child.is_alive():  # interrupted, or it hangs: do not leave it behind
            child.terminate()
            child.join(timeout=10)
        messages.close()


def _child(request: TorchRequest, messages) -> None:
    try:
        result = torch_steps(request, lambda line: messages.put(("log", line)))
        messages.put(("result", result))
    except BaseException as exc:  # noqa: BLE001  everything goes back to the parent, which decides
        messages.put(("error", _picklable(exc)))


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def torch_steps(request: TorchRequest, log: Callable[[str], None]) -> TorchResult:
    """Load the checkpoint, validate the shape options against it, trace model.onnx and (for parity)
    run the PyTorch reference on the parity photos. Runs anywhere; run_torch_side runs it in a child."""
    from .loading import load_checkpoint
    from .onnx_export import export_canonical, validate_hidden_layer, validate_image_size
    from .steps import Steps

    steps = Steps(request.total_steps, log, start=request.first_step)
    ckpt = steps.run(f"Loading {request.model or 'the demo model'}", load_checkpoint, request.model,
                     random_weights=request.random_weights)
    if ckpt.random_weights:
        log("      note: this model has seeded RANDOM weights (an architecture demo, not a trained encoder)")
    height, width = request.image_size or ckpt.image_size
    validate_image_size(height, width, ckpt.patch_size)
    if request.hidden_layer is not None:
        validate_hidden_layer(request.hidden_layer, ckpt.config.num_hidden_layers)
    shape = ExportShape(height, width, request.dynamic_resolution, request.hidden_layer)
    steps.run(f"Tracing to ONNX ({height}x{width}{', any resolution' if shape.dynamic_resolution else ''})",
              export_canonical, ckpt, shape, request.onnx_path)
    references: Any = None
    if request.parity:
        from .parity import reference_outputs

        references = steps.run("Running the PyTorch reference on the parity photos", reference_outputs, ckpt, shape)
    else:
        steps.skip("PyTorch reference skipped (--skip-parity)")
    ckpt.release_model()  # not sent back: the parent never runs it
    return TorchResult(ckpt, shape, references, steps.timings)
