"""The PyTorch half of a build (load, trace, reference outputs), run in a child process.

Tracing leaves the model's weights referenced from inside torch's export machinery (C++ side, out
of reach of the garbage collector: about two copies of the weights stay alive after the model is
dropped). For MLCD-bigG that is 7-15 GB which the ONNX steps (the overflow scan, calibration,
parity) would otherwise hold on top of their own copy. In a child process, all of it goes back to
the system when the child exits: the parent keeps the checkpoint's config, processor and family,
the traced model.onnx and the reference outputs (a few MB).

The child is `python -m export.torch_side REQUEST RESULT` (pickle files in the staging folder):
a fresh interpreter, so nothing of the caller's state is inherited (fork is unsafe once torch or
onnxruntime run threads) and nothing of the caller's __main__ is re-run (multiprocessing's spawn
would, breaking scripts without a main guard). Its log lines come back to the parent's `log` as
they happen (stdout, line by line; progress bars go to the shared stderr), and its exceptions are
re-raised in the parent (an option error stays an option error: exit 2, nothing written).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from export.graph.trace import ExportShape
from export.models.loading import Checkpoint


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
    num_heads: int | None = None  # released weights files (UNICOM .pt): None = inferred
    projector: bool = False  # a VLM checkpoint's tower + multi_modal_projector (export.models.vlm)


@dataclass
class TorchResult:
    checkpoint: Checkpoint  # model released: config, processor, family
    shape: ExportShape
    references: list | None  # parity.ReferenceCase, when parity runs
    timings: dict[str, float]
    peaks_mib: dict[str, float]  # the child's peak RSS after each step
    # --projector with parity: transformers' get_image_features on photos (export.check.vlm_parity)
    packed_references: list | None = None


# Where run_torch_side runs the steps: "child" (above), or "in-process" for a debugger and for the test suite
# (conftest.py), whose builds would each pay the child's imports of torch and transformers again (seconds a tiny
# build); it gives back no memory. Users, the CLI and the tests of the child itself run "child".
RUN_IN = "child"


def run_torch_side(request: TorchRequest, log: Callable[[str], None]) -> TorchResult:
    """Run `torch_steps(request)` in a child interpreter; forward its log lines; return its result."""
    import os
    import pickle
    import subprocess
    import sys

    if RUN_IN == "in-process":  # what the parent gets is what survives pickling, as from the child
        return pickle.loads(pickle.dumps(torch_steps(request, log)))

    work = Path(request.onnx_path).parent
    request_file, result_file = work / ".torch-request.pkl", work / ".torch-result.pkl"
    request_file.write_bytes(pickle.dumps(request))
    env = dict(os.environ)
    # The child imports this very copy of the package, however the parent found it.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "export.torch_side", str(request_file), str(result_file)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None
        for line in child.stdout:
            log(line.rstrip("\n"))
        code = child.wait()
        if not result_file.exists():
            raise RuntimeError(f"the PyTorch steps (load, trace) died with exit code {code}"
                               f"{' (killed: out of memory?)' if code in (-9, 137) else ''}")
        kind, payload = pickle.loads(result_file.read_bytes())
        if kind == "error":
            raise payload
        return payload
    finally:
        if child.poll() is None:  # interrupted: do not leave it behind
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
        request_file.unlink(missing_ok=True)
        result_file.unlink(missing_ok=True)


def _child(request_file: Path, result_file: Path) -> int:
    import pickle

    request = pickle.loads(Path(request_file).read_bytes())
    from export.core.memory import return_large_frees_to_the_os

    return_large_frees_to_the_os()
    try:
        result: tuple = ("result", torch_steps(request, lambda line: print(line, flush=True)))
        code = 0
    except BaseException as exc:  # noqa: BLE001  everything goes back to the parent, which decides
        result, code = ("error", _picklable(exc)), 1
    Path(result_file).write_bytes(pickle.dumps(result))
    return code


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def torch_steps(request: TorchRequest, log: Callable[[str], None]) -> TorchResult:
    """Load the checkpoint, validate the shape options against it, trace model.onnx and (for parity)
    run the PyTorch reference on the held-out views. Runs anywhere; run_torch_side runs it in a child."""
    from export.core.steps import Steps
    from export.graph.trace import export_canonical, validate_hidden_layer, validate_image_size
    from export.models.loading import load_checkpoint

    steps = Steps(request.total_steps, log, start=request.first_step)
    ckpt = steps.run(f"Loading {request.model or 'the demo model'}", load_checkpoint, request.model,
                     random_weights=request.random_weights, num_heads=request.num_heads, projector=request.projector)
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
        from export.check.parity import reference_outputs

        references = steps.run("Running the PyTorch reference on the held-out views", reference_outputs, ckpt, shape)
    else:
        steps.skip("PyTorch reference skipped (--skip-parity)")
    packed = None
    if request.parity and request.projector:
        from export.check.vlm_parity import packed_references

        packed = packed_references(ckpt)  # transformers' get_image_features, AnyRes-packed, per photo
    ckpt.release_model()  # not sent back: the parent never runs it
    return TorchResult(ckpt, shape, references, steps.timings, steps.peaks_mib, packed)


if __name__ == "__main__":
    import sys

    # Through the package, not this __main__ copy: the pickled classes must be export.torch_side's.
    from export.torch_side import _child as child_main

    sys.exit(child_main(Path(sys.argv[1]), Path(sys.argv[2])))
