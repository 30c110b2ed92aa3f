"""The encoder's interface: tensor names, dynamic axes by meaning, CLIP normalization."""

from __future__ import annotations

INPUT_NAME = "pixel_values"
IMAGE_INPUT = "image"  # the served ensemble's input: encoded image bytes, preprocessed by the server
OUTPUT_NAMES = ("last_hidden_state", "pooler_output")  # the transformers families' outputs (ModelFamily.outputs)
HIDDEN_LAYER_OUTPUT = "hidden_state"  # added by --hidden-layer N
IMAGE_EMBEDS = "image_embeds"  # --projector: a VLM's projected tokens [B, S', H_llm], its one output
# Dynamic axes by meaning (optimum style); the sequence axis of outputs follows from height/width.
INPUT_AXES = {0: "batch", 2: "height", 3: "width"}
OUTPUT_AXES = {"last_hidden_state": {0: "batch", 1: "sequence"}, "pooler_output": {0: "batch"},
               "embedding": {0: "batch"}, HIDDEN_LAYER_OUTPUT: {0: "batch", 1: "sequence"},
               IMAGE_EMBEDS: {0: "batch", 1: "sequence"}}
# CLIP's normalization; the model zoo's preprocessor configs use it too.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
