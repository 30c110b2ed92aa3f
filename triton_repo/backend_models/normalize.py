"""Triton python-backend model `normalize`: one output L2-normalized per row (the ensemble's --normalize).

Its one input (TYPE_FP32, [batch, E]) -> its one output = x / max(||x||_2, 1e-12) per row (names from
config.pbtxt, written by triton_repo.config.normalize_config), the same as
torch.nn.functional.normalize: retrieval compares embeddings by cosine, so a normalized
embedding lets an index use the inner product. Requests are processed one by one (a division per
row: nothing to gain from batching them).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

EPS = 1e-12


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                x = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()  # (B, E)
                norm = np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=-1, keepdims=True))  # (B, 1)
                y = (x / np.maximum(norm, EPS)).astype(np.float32)  # (B, E)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, y)]))
            except Exception as exc:  # never let one request take the instance down
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"normalize: {type(exc).__name__}: {exc}")))
        return responses
