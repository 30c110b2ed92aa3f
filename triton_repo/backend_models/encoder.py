"""Triton python-backend model `encoder`: pixel_values -> encoder outputs, with onnxruntime.

For servers without the onnxruntime backend (the pip `tritonserver` our CI runs). The dynamic
batcher hands `execute` several requests; they are concatenated into one batch per input shape
(one execution in Triton's statistics) and split back per request.
Parameters (config.pbtxt): `intra_op_threads` (0 = see below), `allow_spinning` ("0" default, "1"
lets idle onnxruntime threads spin), `providers` (comma-separated, default CPUExecutionProvider),
`batch_parallel` ("1" default, "0" off).

`execute` only queues the batch and returns; worker threads run it and answer each request through
its response sender (one response, then final: the python backend's default mode allows it since
24.06, Triton 2.47). So Triton hands this instance the next batch while the workers still run this
one: without that, every batch ended with one core idle while the other finished its share (measured:
the served path used 1.76 of 2 cores). At most two runs per worker wait or run; beyond that `execute`
waits, and requests stay in Triton's queue where its batching, priorities and timeouts apply.

Batch-parallel (the default on CPUExecutionProvider with intra_op_threads 0): one session with one
intra-op thread, one worker per usable core, and a run per image (onnxruntime releases the GIL; a
session runs concurrently from several threads; per image a run of 1 costs what a run of 4 does on
one thread). Usable cores: the affinity mask, capped by a cgroup v2 CPU limit. Each run goes without
onnxruntime's per-operator thread synchronization: ~11 % less CPU per image than one run on 2
intra-op threads (2 shared cores, demo model, concurrency 8) with one copy of the weights.
Otherwise one worker runs each batch whole (GPU providers, or intra-op threads set).
"""

import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

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
        self.per_image = (threads == 0 and providers == ["CPUExecutionProvider"]
                          and params.get("batch_parallel", "1") != "0" and cores > 1)
        workers = cores if self.per_image else 1
        if self.per_image:
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
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="encoder")
        self.room = threading.Semaphore(2 * workers)  # runs queued or running

    def execute(self, requests):
        groups: dict = {}  # input shape without batch -> [(response sender, array)]
        for request in requests:
            sender = request.get_response_sender()
            tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
            if tensor is None:
                _send(sender, _error(f"encoder: missing input {self.input_name}"))
                continue
            array = np.array(tensor.as_numpy())  # (b, 3, H, W); a copy: request tensors are freed on return
            groups.setdefault(array.shape[1:], []).append((sender, array))
        for members in groups.values():
            batch = np.concatenate([a for _, a in members]) if len(members) > 1 else members[0][1]  # (B, 3, H, W)
            parts = np.split(batch, batch.shape[0]) if self.per_image else [batch]  # each (b, 3, H, W)
            job = _Job(members, len(parts), self.output_names, self.room)
            for k, part in enumerate(parts):
                self.room.acquire()
                future = self.pool.submit(self.session.run, self.output_names, {self.input_name: part})
                future.add_done_callback(partial(job.done, k))
        return None

    def finalize(self):
        self.pool.shutdown(wait=True)  # answers every queued batch first


class _Job:
    """The runs of one batch; when the last one ends, each request gets its rows (or the error)."""

    def __init__(self, members, runs, output_names, room):
        self.members, self.output_names, self.room = members, output_names, room
        self.results: list = [None] * runs
        self.left = runs
        self.lock = threading.Lock()

    def done(self, k, future: Future):
        self.room.release()
        with self.lock:
            self.results[k] = future
            self.left -= 1
            if self.left:
                return
        try:
            answers = self._answers([f.result() for f in self.results])
        except Exception as exc:  # a failed run (or split) fails its batch, never the instance
            answers = [_error(f"encoder: {type(exc).__name__}: {exc}")] * len(self.members)
        for (sender, _), answer in zip(self.members, answers):
            _send(sender, answer)

    def _answers(self, runs):
        """runs: each run's outputs, in batch order -> one response per request with its rows."""
        outputs = [np.concatenate([run[j] for run in runs]) if len(runs) > 1 else runs[0][j]
                   for j in range(len(self.output_names))]  # each (B, ...)
        answers, start = [], 0
        for _, array in self.members:
            stop = start + array.shape[0]
            answers.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, np.ascontiguousarray(out[start:stop]))
                for name, out in zip(self.output_names, outputs)]))
            start = stop
        return answers


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


def _send(sender, response):
    try:
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    except Exception as exc:  # a cancelled request; the other requests of the batch are still answered
        pb_utils.Logger.log_warn(f"encoder: response not sent: {exc}")
