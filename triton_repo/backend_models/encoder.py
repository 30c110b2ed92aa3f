"""Triton python-backend model `encoder`: pixel_values -> encoder outputs, with onnxruntime.

For servers without the onnxruntime backend (the pip `tritonserver` our CI runs). The dynamic
batcher hands `execute` several requests; they are concatenated into one batch per input shape
(one execution in Triton's statistics) and split back per request.
Parameters (config.pbtxt): `intra_op_threads` (0 = see below), `allow_spinning` ("0" default, "1"
lets idle onnxruntime threads spin), `providers` (comma-separated, default CPUExecutionProvider),
`batch_parallel` ("1" default, "0" off).

Batch-parallel (the default on CPUExecutionProvider with intra_op_threads 0): one session with one
intra-op thread, and the batch split into up to <usable cores> slices run concurrently from Python
threads (onnxruntime releases the GIL; a session runs concurrently from several threads); usable
cores: the affinity mask, capped by a cgroup v2 CPU limit. Each
slice runs without onnxruntime's per-operator thread synchronization: measured on 2 shared cores,
demo model, concurrency 8, ~11 % less CPU per image than one run on 2 intra-op threads, the same as
2 instances x 1 thread but with one copy of the weights. A batch of 1 runs on one core.
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        threads = int(params.get("intra_op_threads") or 0)
        providers = [p for p in (params.get("providers") or "CPUExecutionProvider").split(",") if p]
        cores = _usable_cores()
        parallel = (threads == 0 and providers == ["CPUExecutionProvider"] and params.get("batch_parallel", "1") != "0"
                    and cores > 1)
        self.pool = ThreadPoolExecutor(cores, thread_name_prefix="encoder-slice") if parallel else None
        self.slices = cores if parallel else 1
        if parallel:
            threads = 1
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Spinning worker threads starve the preprocess stub and the server's own threads on a shared
        # CPU (measured: 8 req/s spinning vs 15 req/s not, 2 cores); "1" restores onnxruntime's default.
        options.add_session_config_entry("session.intra_op.allow_spinning", params.get("allow_spinning") or "0")
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
                outputs = self._run(batch)
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


    def _run(self, batch):
        """(B, 3, H, W) -> the outputs, each (B, ...): one run, or batch-parallel slices concatenated back."""
        n = min(self.slices, batch.shape[0])
        if n < 2 or self.pool is None:
            return self.session.run(self.output_names, {self.input_name: batch})
        parts = np.array_split(batch, n)  # n contiguous slices along the batch axis, in order
        runs = list(self.pool.map(lambda part: self.session.run(self.output_names, {self.input_name: part}), parts))
        return [np.concatenate([run[k] for run in runs]) for k in range(len(self.output_names))]

    def finalize(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def _usable_cores():
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a container's CPU limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]  # "max 100000" (no limit) or e.g. "200000 100000" (2 CPUs)
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))  # ceil(quota / period)
    except (OSError, ValueError):
        pass
    return cores


def _error(message):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
