"""One spec per model family: how to build, load and trace it, its interface and its tolerances.

Generic code (loading, tracing, parity) asks the spec; it never branches on a family.
Add a family by writing a `ModelFamily` and listing it in FAMILIES; tests/test_families.py checks
that every family has a tiny test model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

from .errors import UnsupportedModelError

INPUT_NAME = "pixel_values"
IMAGE_INPUT = "image"  # the served ensemble's input: encoded image bytes, preprocessed by the server
OUTPUT_NAMES = ("last_hidden_state", "pooler_output")
HIDDEN_LAYER_OUTPUT = "hidden_state"  # added by --hidden-layer N

# Dynamic axes by meaning (optimum style); the sequence axis of outputs follows from height/width.
INPUT_AXES = {0: "batch", 2: "height", 3: "width"}
OUTPUT_AXES = {"last_hidden_state": {0: "batch", 1: "sequence"}, "pooler_output": {0: "batch"},
               HIDDEN_LAYER_OUTPUT: {0: "batch", 1: "sequence"}}

# CLIP's normalization; the model zoo's preprocessor configs use it too.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _no_patch() -> ContextManager:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values this family loads
    has_rope: bool  # exports mvt.RoPE2D nodes, so --rope lowerings apply
    model_class: Callable[[], type]  # lazy: transformers class
    config_class: Callable[[], type]
    tiny_config: dict[str, Any]  # kwargs for config_class(): the tiny test model
    tracing_context: Callable[[], ContextManager] = _no_patch  # routes ops through custom ops while exporting
    # Extra forward kwargs that make any H x W valid (CLIP interpolates its learned positions).
    resize_kwargs: dict[str, Any] = field(default_factory=dict)
    # fp32 parity thresholds per output; "*" applies to all outputs.
    tolerances: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)


def _mlcd_model():
    from transformers import MLCDVisionModel

    return MLCDVisionModel


def _mlcd_config():
    from transformers import MLCDVisionConfig

    return MLCDVisionConfig


def _clip_model():
    from transformers import CLIPVisionModel

    return CLIPVisionModel


def _clip_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig


def _mlcd_tracing_context():
    from .rope_op import mlcd_rope_through_custom_op

    return mlcd_rope_through_custom_op()


# Parity thresholds, per precision and output ("*": every output). Judged on photos calibration
# never saw. fp32: exact to float rounding, element-wise relative to each output's peak |value|
# (export.metrics "max_abs_rel"), because an absolute bound fails a correct export of a model with
# massive activations (issue 9: peak 58, max |diff| 0.0027 against 1e-4, cosine 1.00000000).
# Measured on the outlier test models (peak ~30): correct exports 7e-6..1.4e-5, one weight
# perturbed by 0.1% 3e-4..5e-4 (its cosine, 0.9999999, would pass); issue 9's run: 4.7e-5.
# fp16/int8: the pooled-cosine bars plus per-token cosine and SQNR on last_hidden_state.
TOLERANCES = {
    "fp32": {"*": {"min_cosine": 0.99999, "max_abs_rel": 1e-4}},
    "fp16": {"*": {"min_cosine": 0.999, "sqnr_db": 30.0}},
    "int8": {"*": {"min_cosine": 0.99, "sqnr_db": 20.0}, "last_hidden_state": {"min_cosine": 0.98}},
    "fp8": {"*": {"min_cosine": 0.99, "sqnr_db": 15.0}, "last_hidden_state": {"min_cosine": 0.98}},
}

MLCD_ROPE2D = ModelFamily(
    name="mlcd-rope2d",
    model_types=("mlcd_vision_model",),
    has_rope=True,
    model_class=_mlcd_model,
    config_class=_mlcd_config,
    tiny_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     image_size=56, patch_size=14, hidden_act="gelu"),
    tracing_context=_mlcd_tracing_context,
    tolerances=TOLERANCES,
)

CLIP_VISION = ModelFamily(
    name="clip-vision",
    model_types=("clip_vision_model", "clip"),
    has_rope=False,
    model_class=_clip_model,
    config_class=_clip_config,
    tiny_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     image_size=56, patch_size=14, hidden_act="quick_gelu"),
    resize_kwargs={"interpolate_pos_encoding": True},
    tolerances=TOLERANCES,
)

FAMILIES = (MLCD_ROPE2D, CLIP_VISION)


def family_for_model_type(model_type: str) -> ModelFamily:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported; mvt-deploy exports {known} checkpoints"
    )


def family_by_name(name: str) -> ModelFamily:
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise KeyError(name)
