"""Trace a checkpoint to the canonical ONNX graph (RoPE as mvt.RoPE2D nodes with a function body).

Every --rope lowering is a rewrite of this graph (lowering.py), so the slow trace runs once.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from export.core.errors import OptionError
from export.core.interface import INPUT_AXES, INPUT_NAME, OUTPUT_AXES
from export.core.manifest import Manifest, ManifestLike
from export.models.loading import Checkpoint


@dataclass(frozen=True)
class ExportShape:
    """What the graph accepts: a fixed H x W, or any multiple of the patch size. Its outputs are the
    family's: `checkpoint.family.output_names(shape.hidden_layer)`."""

    height: int
    width: int
    dynamic_resolution: bool = False
    hidden_layer: int | None = None


def validate_image_size(height: int, width: int, patch: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % patch:
            lower = max(patch, value // patch * patch)
            upper = (value // patch + 1) * patch
            hint = f"use {lower} or {upper}" if lower != upper and value > patch else f"use {upper}"
            raise OptionError(f"--image-size {name} {value} is not a multiple of patch size {patch}; {hint}")


def validate_hidden_layer(layer: int, num_layers: int) -> None:
    # hidden_states holds the embeddings plus one entry per layer: L + 1 entries.
    if not -(num_layers + 1) <= layer <= num_layers:
        raise OptionError(
            f"--hidden-layer {layer} is out of range for {num_layers} layers; "
            f"use {-num_layers - 1}..{num_layers} (-2 is the penultimate layer LLaVA-style VLMs use)"
        )


def validate_resolution(checkpoint: Checkpoint, shape: ExportShape) -> None:
    """A fixed-resolution family (UNICOM: no position interpolation, a head over all tokens) exports at
    its checkpoint's size only."""
    native = checkpoint.image_size
    if checkpoint.family.fixed_resolution and (shape.dynamic_resolution or (shape.height, shape.width) != native):
        asked = "--dynamic-resolution" if shape.dynamic_resolution else f"--image-size {shape.height} {shape.width}"
        raise OptionError(f"{asked}: {checkpoint.family.name} models run at {native[0]}x{native[1]} only (their "
                          "learned positions and the head over the flattened tokens fix the resolution); drop it")


def encoder_module(checkpoint: Checkpoint, shape: ExportShape):
    """An nn.Module: pixel_values [B, 3, H, W] -> the family's outputs (e.g. last_hidden_state,
    pooler_output), then hidden_state with --hidden-layer."""
    import torch

    native = checkpoint.image_size == (shape.height, shape.width)
    extra = {} if native and not shape.dynamic_resolution else dict(checkpoint.family.resize_kwargs)
    layer = shape.hidden_layer
    fields = checkpoint.family.outputs

    class Encoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            out = self.model(pixel_values=pixel_values, output_hidden_states=layer is not None, **extra)
            outputs: tuple = tuple(getattr(out, name) for name in fields)  # (B, S, C) tokens, (B, C') pooled
            if layer is not None:
                outputs += (out.hidden_states[layer],)  # (B, S, C)
            return outputs

    return Encoder(checkpoint.model).eval()


def export_canonical(checkpoint: Checkpoint, shape: ExportShape, path: Path, *, verbose: bool = False) -> None:
    """torch.onnx.export(dynamo=True) to `path` (+ `path`.data), then attach the RoPE2D function."""
    import onnx
    import torch

    from export.graph import rope_node as onnx_rope

    validate_image_size(shape.height, shape.width, checkpoint.patch_size)
    validate_resolution(checkpoint, shape)
    if shape.hidden_layer is not None:
        validate_hidden_layer(shape.hidden_layer, checkpoint.config.num_hidden_layers)

    module = encoder_module(checkpoint, shape)
    # A non-square example for any-resolution graphs: a square one lets the tracer specialize on
    # height == width (CLIP's interpolate_pos_encoding branches on it) and the graph would reject H != W.
    extra_width = checkpoint.patch_size if shape.dynamic_resolution else 0
    example = torch.zeros(2, 3, shape.height, shape.width + extra_width)  # (B, 3, H, W)
    axes = INPUT_AXES if shape.dynamic_resolution else {0: INPUT_AXES[0]}
    onnx_rope.register_schema()
    with checkpoint.family.tracing_context(), torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=list(checkpoint.family.output_names(shape.hidden_layer)),
            dynamic_shapes={INPUT_NAME: axes},
            custom_translation_table=onnx_rope.custom_translation_table(),
            verbose=verbose,
            report=False,
        )
    # Weights go to external data here so that a > 2 GB model never has to fit in one protobuf;
    # the pipeline folds them back in when the result is small (artifacts.save_onnx).
    assert program is not None  # dynamo=True always returns the ONNXProgram
    program.save(str(path), external_data=True)
    model = onnx.load(str(path), load_external_data=False)
    if onnx_rope.rope_nodes(model.graph):
        onnx_rope.attach_function(model)
    _name_axes(model)
    onnx.save(model, str(path))


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs optional-op registrations and deprecation chatter; keep the user's screen for us."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _name_axes(model) -> None:
    """Replace the exporter's symbolic expressions ('((height//14))*((width//14)) + 1') by names."""
    for value in list(model.graph.input) + list(model.graph.output):
        axes = OUTPUT_AXES.get(value.name, INPUT_AXES if value.name == INPUT_NAME else {})
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_param") and i in axes:
                dim.dim_param = axes[i]
            elif dim.HasField("dim_param") and re.search(r"[^A-Za-z0-9_]", dim.dim_param):
                dim.dim_param = f"dim{i}"


def export_shape(manifest: ManifestLike) -> ExportShape:
    """The ExportShape the folder's model.onnx was traced with."""
    m = Manifest.of(manifest)
    height, width = m.traced_size
    return ExportShape(height, width, m.dynamic_resolution, m.hidden_layer)
