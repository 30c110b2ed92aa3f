"""Triton model configurations built as Triton's own protobuf (`ModelConfig`), written as text format.

Every field name is checked by protobuf when a message is built, and `parse_config` reads a
config.pbtxt back the way Triton does, so a misspelled field fails here, never at server start.
Protobuf builders only (the tensors they take are interface.py's); needs the `serve` extra (tritonclient,
protobuf) when a builder runs, not at import.
"""

from __future__ import annotations

from pathlib import Path

from export.core.errors import require
from export.core.interface import IMAGE_INPUT
from triton_repo.forms import BACKENDS, EncoderForm, form  # noqa: F401  (BACKENDS: the --backend choices, re-exported)
from triton_repo.interface import EncoderInterface, TensorSpec, Warmup

CONFIG_NAME = "config.pbtxt"
# A short wait lets concurrent requests meet in one batch; Triton also batches whatever queued
# while an execution ran, so a busy server batches with no delay at all.
MAX_QUEUE_DELAY_US = 1000
# Triton's TensorRT backend creates one execution context per profile the instance group names, each allocated
# kSTATIC by default: for the largest of all profiles ("Default static allocation with the maximum size across all
# profiles", NvInferRuntime.h). ON_PROFILE_CHANGE sizes each context for its own profile once it is set. Spelled
# as tensorrt_backend's ModelState::ParseParameters reads it (src/model_state.cc, r25.05 on: "STATIC" or
# "ON_PROFILE_CHANGE", anything else fails the load); r25.04 and older ignore the parameter (triton_repo/versions.py).
ALLOCATION_STRATEGY = "execution_context_allocation_strategy"
ON_PROFILE_CHANGE = "ON_PROFILE_CHANGE"


def model_config_pb2():
    return require("tritonclient.grpc.model_config_pb2", "serve")


def preferred_batch_sizes(max_batch: int) -> list[int]:
    """Powers of two from 4 up to max_batch, plus max_batch itself (e.g. 8 -> [4, 8]; 32 -> [4, 8, 16, 32])."""
    sizes = {max_batch}
    size = 4
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


def _io(msg, spec: TensorSpec, pb2):
    msg.name = spec.name
    msg.data_type = pb2.DataType.Value(spec.dtype)
    msg.dims.extend(spec.dims)
    return msg


def _common(cfg, name: str, max_batch: int, instances: int, kind: str, warmup: Warmup | None, pb2,
            dynamic_batching: bool = True) -> None:
    cfg.name = name
    cfg.max_batch_size = max_batch
    if dynamic_batching:
        cfg.dynamic_batching.preferred_batch_size.extend(preferred_batch_sizes(max_batch))
        cfg.dynamic_batching.max_queue_delay_microseconds = MAX_QUEUE_DELAY_US
    group = cfg.instance_group.add()
    group.count = instances
    group.kind = pb2.ModelInstanceGroup.Kind.Value(kind)
    if warmup is not None:
        w = cfg.model_warmup.add()
        w.name = warmup.name
        w.batch_size = warmup.batch_size
        for input_name, (dtype, dims, filename) in warmup.inputs.items():
            inp = w.inputs[input_name]
            inp.data_type = pb2.DataType.Value(dtype)
            inp.dims.extend(dims)
            inp.input_data_file = filename


def encoder_config(backend: str | EncoderForm, interface: EncoderInterface, *, name: str = "encoder",
                   max_batch: int, instances: int = 1, warmup: Warmup | None = None,
                   parameters: dict[str, object] | None = None, profiles: int = 1, dynamic_batching: bool = True):
    """The encoder in one of the forms of triton_repo/forms.py (a name or the spec itself).

    profiles: how many optimization profiles the engine holds (engine forms). With more than one, the
    instance group names them all: Triton's TensorRT backend otherwise creates a context for profile 0
    only (model_config.proto, ModelInstanceGroup.profile: "If not specified, the server will select the
    first optimization profile by default"; tensorrt_backend src/instance_state.cc
    InitOptimizationProfiles), and a shape outside it fails. Named, it picks per request the profile
    nearest the request's shape among those that hold it (GetMostOptimizedProfile), and each context is
    allocated on profile change (ALLOCATION_STRATEGY), so that it holds its own profile's activations only.
    dynamic_batching: off where merged requests could fall outside every profile (native mode on an engine:
    its native-resolution profiles take one image)."""
    spec = backend if isinstance(backend, EncoderForm) else form(backend)
    pb2 = model_config_pb2()
    cfg = pb2.ModelConfig()
    if spec.platform:
        cfg.platform = spec.platform
    if spec.backend:
        cfg.backend = spec.backend
    if spec.default_model_filename:
        cfg.default_model_filename = spec.default_model_filename
    _common(cfg, name, max_batch, instances, spec.kind, warmup, pb2, dynamic_batching=dynamic_batching)
    if spec.needs_engine and profiles > 1:  # the field is for the TensorRT backend only (an error elsewhere)
        cfg.instance_group[0].profile.extend(str(i) for i in range(profiles))
        cfg.parameters[ALLOCATION_STRATEGY].string_value = ON_PROFILE_CHANGE
    _io(cfg.input.add(), interface.input, pb2)
    for out in interface.outputs:
        _io(cfg.output.add(), out, pb2)
    for key, value in (parameters or {}).items():
        cfg.parameters[key].string_value = str(value)
    return cfg


def preprocess_config(*, name: str = "preprocess", max_batch: int, instances: int, pixel_values: TensorSpec,
                      warmup: Warmup | None = None, parameters: dict[str, object] | None = None):
    """Encoded image bytes (TYPE_STRING, one per batch row) -> pixel_values, on the CPU."""
    pb2 = model_config_pb2()
    cfg = pb2.ModelConfig()
    cfg.backend = "python"
    _common(cfg, name, max_batch, instances, "KIND_CPU", warmup, pb2)
    _io(cfg.input.add(), TensorSpec(IMAGE_INPUT, (1,), "TYPE_STRING"), pb2)
    _io(cfg.output.add(), pixel_values, pb2)
    for key, value in (parameters or {}).items():
        cfg.parameters[key].string_value = str(value)
    return cfg


# The `normalize` step's tensors (python backend, backend_models/normalize.py): one vector per row in,
# the same vector divided by its L2 norm out.
NORMALIZE_INPUT, NORMALIZE_OUTPUT = "unnormalized", "normalized"


def normalize_config(*, name: str = "normalize", max_batch: int, instances: int, width: int):
    """L2 normalization of one [batch, width] output, on the CPU (the ensemble's --normalize step)."""
    pb2 = model_config_pb2()
    cfg = pb2.ModelConfig()
    cfg.backend = "python"
    _common(cfg, name, max_batch, instances, "KIND_CPU", None, pb2, dynamic_batching=False)
    _io(cfg.input.add(), TensorSpec(NORMALIZE_INPUT, (width,)), pb2)
    _io(cfg.output.add(), TensorSpec(NORMALIZE_OUTPUT, (width,)), pb2)
    return cfg


def ragged_config(*, name: str, instances: int, outputs: tuple[TensorSpec, ...],
                  parameters: dict[str, object] | None = None):
    """The model clients call in --preprocess anyres|native (backend_models/ragged.py, python backend):
    `image` [N] encoded bytes -> per-image ragged rows concatenated (triton_repo/modes.py has the layout).

    max_batch_size 0: the first axis is the request's images, not a batch Triton may merge; the encoder
    behind it (called through BLS) is the one that batches."""
    pb2 = model_config_pb2()
    cfg = pb2.ModelConfig()
    cfg.backend = "python"
    _common(cfg, name, 0, instances, "KIND_CPU", None, pb2, dynamic_batching=False)
    _io(cfg.input.add(), TensorSpec(IMAGE_INPUT, (-1,), "TYPE_STRING"), pb2)
    for out in outputs:
        _io(cfg.output.add(), out, pb2)
    for key, value in (parameters or {}).items():
        cfg.parameters[key].string_value = str(value)
    return cfg


def ensemble_config(*, name: str, max_batch: int, preprocess: str, encoder: str, interface: EncoderInterface,
                    normalize: tuple[str, str] | None = None):
    """image (TYPE_STRING) -> preprocess -> encoder -> every encoder output, under the same names.

    normalize: (the normalize model, the output it applies to): that output goes through the model and
    is answered L2-normalized, under its own name."""
    pb2 = model_config_pb2()
    cfg = pb2.ModelConfig()
    cfg.name = name
    cfg.platform = "ensemble"
    cfg.max_batch_size = max_batch
    _io(cfg.input.add(), TensorSpec(IMAGE_INPUT, (1,), "TYPE_STRING"), pb2)
    for out in interface.outputs:
        _io(cfg.output.add(), out, pb2)
    step = cfg.ensemble_scheduling.step.add()
    step.model_name = preprocess
    step.model_version = -1
    step.input_map[IMAGE_INPUT] = IMAGE_INPUT
    step.output_map[interface.input.name] = "_pixel_values"
    step = cfg.ensemble_scheduling.step.add()
    step.model_name = encoder
    step.model_version = -1
    step.input_map[interface.input.name] = "_pixel_values"
    for out in interface.outputs:
        step.output_map[out.name] = f"_{out.name}" if normalize and out.name == normalize[1] else out.name
    if normalize:
        model, output = normalize
        step = cfg.ensemble_scheduling.step.add()
        step.model_name = model
        step.model_version = -1
        step.input_map[NORMALIZE_INPUT] = f"_{output}"
        step.output_map[NORMALIZE_OUTPUT] = output
    return cfg


def config_text(cfg) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def write_config(cfg, model_dir: Path) -> Path:
    path = Path(model_dir) / CONFIG_NAME
    path.write_text(config_text(cfg))
    return path


def parse_config(path_or_text: Path | str):
    """config.pbtxt (a path or its text) -> ModelConfig; protobuf rejects unknown fields and bad values."""
    from google.protobuf import text_format

    text = Path(path_or_text).read_text() if isinstance(path_or_text, Path) else path_or_text
    return text_format.Parse(text, model_config_pb2().ModelConfig())
