"""Triton python-backend model `encoder`: pixel_values -> encoder outputs, with onnxruntime.

For servers without the onnxruntime backend (the pip `tritonserver` our CI runs). The dynamic
batcher hands `execute` several requests; they are concatenated into one onnxruntime run per
input shape (one execution in Triton's statistics) and split back per request.
Parameters (config.pbtxt): `intra_op_threads` (0 = onnxruntime's default), `allow_spinning`
("0" default, "1" lets idle onnxruntime threads spin), `providers` (comma-separated, default
CPUExecutionProvider).
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        threads = int(params.get("intra_op_threads") or 0)
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Spinning worker threads starve the preprocess stub and the server's own threads on a shared
        # CPU (measured: 8 req/s spinning vs 15 req/s not, 2 cores); "1" restores onnxruntime's default.
        options.add_session_config_entry("session.intra_op.allow_spinning", params.get("allow_spinning") or "0")
        providers = [p for p in (params.get("providers") or "CPUExecutionProvider").split(",") if p]
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.input_name = config["input"][0]["name"]
        self.output_names = [o["name"] for o in config["output"]]

    def execute(self, requests):
        responses = [None] * len(requests)
        groups: dict = {}  # input shape without batch -> [(request index, array)]
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
            if tensor is None:
                responses[i] = _error(f"encoder: missing input {self.input_name}")
                continue
            array = tensor.as_numpy()  # (b, 3, H, W)
            groups.setdefault(array.shape[1:], []).append((i, array))
        for members in groups.values():
            try:
                batch = np.concatenate([a for _, a in members]) if len(members) > 1 else members[0][1]  # (B, 3, H, W)
                outputs = self.session.run(self.output_names, {self.input_name: batch})
                start = 0
                for i, array in members:
                    stop = start + array.shape[0]
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[
                        pb_utils.Tensor(name, np.ascontiguousarray(out[start:stop]))
                        for name, out in zip(self.output_names, outputs)])
                    start = stop
            except Exception as exc:
                for i, _ in members:
                    responses[i] = _error(f"encoder: {type(exc).__name__}: {exc}")
        return responses


def _error(message):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
