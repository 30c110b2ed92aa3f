"""An engine's time on device buffers, with the host<->device copies timed apart (the benchmark's TensorRT row).

`TensorRTRunner.infer` takes and returns numpy arrays: Polygraphy copies every input to the device, runs the engine,
copies every output back to pageable host memory and synchronizes (polygraphy 0.53.6 backend/trt/runner.py
`_infer_impl`: `_get_array_on_gpu`, `execute_async_v3`, `_get_array_on_cpu`), and the runner copies the outputs once
more. A host clock around it times the engine plus all of that. Here, on the runner's own CUDA stream:

    prepare(feed)   once per input shape: the inputs into device tensors, the optimization profile that holds them
                    (TensorRTRunner.select_profile), and one Polygraphy infer with those device tensors and
                    copy_outputs_to_host=False, which leaves the context's shapes, tensor addresses, output
                    allocator and device memory set for these shapes
    measure()       CUDA events around three steps: H2D of the inputs (from pageable host memory, as Polygraphy
                    copies them) | context.execute_async_v3 on the device buffers | D2H of every output (to pageable
                    host memory). The middle interval is the engine; its enqueue is inside it, as in trtexec's
                    "GPU Compute Time".

torch is imported on use (its CUDA events, tensors and the runner's stream wrapped as an ExternalStream).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

TIMING = ("CUDA events around execute_async_v3 on device buffers; H2D and D2H timed apart, from and to pageable host "
          "memory, on the engine's stream")


@dataclass(frozen=True)
class EngineTiming:
    """One measured run, in milliseconds of GPU time, and the bytes each copy moved."""

    h2d_ms: float  # every input, host -> device
    compute_ms: float  # the engine: execute_async_v3
    d2h_ms: float  # every output, device -> host
    h2d_bytes: int
    d2h_bytes: int


def summarize(samples: Sequence[EngineTiming], host_seconds: Sequence[float] = ()) -> dict:
    """Medians over `samples`: the engine, each copy (and its GB/s), the copies' share of engine + copies; and the
    median of `host_seconds` (TensorRTRunner.infer timed by a host clock: numpy in, numpy out) when given."""
    if not samples:
        raise ValueError("no timed runs to summarize")
    compute = statistics.median(s.compute_ms for s in samples)
    h2d = statistics.median(s.h2d_ms for s in samples)
    d2h = statistics.median(s.d2h_ms for s in samples)
    h2d_bytes, d2h_bytes = samples[0].h2d_bytes, samples[0].d2h_bytes
    total = compute + h2d + d2h
    out = {"engine_ms": round(compute, 4), "h2d_ms": round(h2d, 4), "d2h_ms": round(d2h, 4),
           "h2d_MB": round(h2d_bytes / 1e6, 3), "d2h_MB": round(d2h_bytes / 1e6, 3),
           "h2d_GBps": round(h2d_bytes / (h2d * 1e6), 2) if h2d > 0 else None,
           "d2h_GBps": round(d2h_bytes / (d2h * 1e6), 2) if d2h > 0 else None,
           "transfer_share": round((h2d + d2h) / total, 4) if total > 0 else None,
           "host_ms": round(statistics.median(host_seconds) * 1e3, 4) if host_seconds else None}
    return out


class ProfiledEngineRunner(Protocol):
    """What DeviceTimer uses of export.runners.trt.TensorRTRunner."""

    name: str
    output_names: list[str] | None

    @property
    def trt_runner(self) -> Any:
        """The active Polygraphy TrtRunner (its context and stream), None before activate."""

    def select_profile(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """Make the optimization profile that holds `shapes` active; return its index."""


class DeviceTimer:
    """Times an active TensorRTRunner's engine on device buffers (see the module docstring)."""

    def __init__(self, runner: ProfiledEngineRunner):
        self.runner = runner
        self._host_inputs: dict[str, Any] = {}  # torch CPU tensors over the feed's arrays (pageable)
        self._device_inputs: dict[str, Any] = {}  # torch CUDA tensors the engine reads
        self._device_outputs: dict[str, Any] = {}  # Polygraphy's device output views (torch CUDA tensors)
        self._host_outputs: dict[str, Any] = {}  # torch CPU tensors (pageable) the outputs are copied into

    def _trt(self) -> Any:
        trt_runner = self.runner.trt_runner
        if trt_runner is None:
            raise RuntimeError(f"{self.runner.name} is not active: activate it before timing it on the device")
        return trt_runner

    def prepare(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Set the engine up for `feed`'s shapes on device buffers; return its outputs as numpy arrays."""
        import torch

        trt_runner = self._trt()
        self.runner.select_profile({name: tuple(np.shape(v)) for name, v in feed.items()})
        self._host_inputs = {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in feed.items()}
        self._device_inputs = {name: t.to("cuda") for name, t in self._host_inputs.items()}
        torch.cuda.synchronize()
        # torch tensors in: Polygraphy binds their device pointers (no copy) and, with copy_outputs_to_host=False,
        # returns the outputs as torch CUDA tensors (views of its output allocator's buffers, reused while the
        # shapes stay the same).
        outputs = trt_runner.infer(self._device_inputs, copy_outputs_to_host=False)
        names = self.runner.output_names or list(outputs)
        self._device_outputs = {name: outputs[name] for name in names if name in outputs}
        self._host_outputs = {name: torch.empty(t.shape, dtype=t.dtype, device="cpu")
                              for name, t in self._device_outputs.items()}
        self.measure()  # also copies the outputs into the host buffers
        return self.outputs()

    def outputs(self) -> dict[str, np.ndarray]:
        """The outputs of the last measured run, copied to numpy."""
        return {name: t.numpy().copy() for name, t in self._host_outputs.items()}

    def measure(self) -> EngineTiming:
        """One run: H2D | engine | D2H on the runner's stream, each between two CUDA events."""
        import torch

        if not self._device_inputs:
            raise RuntimeError("DeviceTimer.measure before prepare(feed)")
        trt_runner = self._trt()
        stream = torch.cuda.ExternalStream(trt_runner.stream.ptr)  # the stream Polygraphy runs the engine on
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        context = trt_runner.context
        with torch.cuda.stream(stream):
            # Polygraphy's own infer (TensorRTRunner.infer) rebinds inputs to its buffers: bind ours again
            for name, t in self._device_inputs.items():
                context.set_tensor_address(name, t.data_ptr())
            events[0].record(stream)
            for name, t in self._device_inputs.items():
                t.copy_(self._host_inputs[name], non_blocking=True)
            events[1].record(stream)
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"{self.runner.name}: execute_async_v3 failed (see TensorRT's log above)")
            events[2].record(stream)
            for name, t in self._device_outputs.items():
                self._host_outputs[name].copy_(t, non_blocking=True)
            events[3].record(stream)
        events[3].synchronize()
        return EngineTiming(h2d_ms=events[0].elapsed_time(events[1]), compute_ms=events[1].elapsed_time(events[2]),
                            d2h_ms=events[2].elapsed_time(events[3]),
                            h2d_bytes=sum(t.numel() * t.element_size() for t in self._host_inputs.values()),
                            d2h_bytes=sum(t.numel() * t.element_size() for t in self._host_outputs.values()))
