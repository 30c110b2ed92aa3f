"""Triton python-backend model `preprocess`: encoded image bytes -> CLIP pixel_values.

Input `image` (TYPE_STRING, [batch, 1]) holds JPEG/PNG/... bytes; output `pixel_values`
(TYPE_FP32, [batch, 3, H, W]). The recipe is `preprocessing.py` beside this file with the
checkpoint's preprocessor_config.json; a request whose image cannot be decoded (corrupt, empty,
too many pixels) gets its own error response and the other requests of the batch are unaffected.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # preprocessing.py sits beside model.py
from preprocessing import (  # noqa: E402
    CONFIG_NAME,
    DEFAULT_MAX_PIXELS,
    ClipPreprocessing,
    ImageDecodeError,
    pixel_values_from_bytes,
)


class TritonPythonModel:
    def initialize(self, args):
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.cfg = ClipPreprocessing.from_file(os.path.join(version_dir, CONFIG_NAME))
        params = json.loads(args["model_config"]).get("parameters", {})
        self.max_pixels = int(params.get("max_pixels", {}).get("string_value", DEFAULT_MAX_PIXELS))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                images = pb_utils.get_input_tensor_by_name(request, "image").as_numpy().reshape(-1)  # (B,)
                batch = np.stack([pixel_values_from_bytes(_as_bytes(x), self.cfg, self.max_pixels)
                                  for x in images])  # (B, 3, H, W)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("pixel_values", batch)]))
            except ImageDecodeError as exc:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"preprocess: {exc}")))
            except Exception as exc:  # never let one request take the instance down
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"preprocess: {type(exc).__name__}: {exc}")))
        return responses


def _as_bytes(value) -> bytes:
    # TYPE_STRING elements arrive as bytes; a client that sent str gets them encoded back.
    return value if isinstance(value, bytes) else str(value).encode("latin-1")
