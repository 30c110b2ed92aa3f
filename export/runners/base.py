"""The runner protocol (Polygraphy's lifecycle) and feeds."""

from __future__ import annotations

import io
from typing import Iterable, TypeVar

import numpy as np

from export.core.errors import OptionError
from export.core.interface import IMAGE_INPUT, INPUT_NAME

RUNNER_KINDS = ("torch", "onnxruntime", "tensorrt", "triton")
_R = TypeVar("_R", bound="Runner")  # activate() and `with` return the runner's own class
# onnxruntime modes. "exact": graph optimizations off, so Q/DQ pairs run as float simulation of int8,
# as TensorRT fuses them (int8 GEMM, float scales). "optimized": onnxruntime's defaults, which fuse
# Q/DQ into integer kernels that requantize outputs: what a CPU deployment of the file gets.
ORT_MODES = {"exact": "ORT_DISABLE_ALL", "optimized": "ORT_ENABLE_ALL"}


def check_mode(mode: str) -> str:
    if mode not in ORT_MODES:
        raise OptionError(f"onnxruntime mode {mode!r} is unknown; choose one of {', '.join(ORT_MODES)}")
    return mode


def ort_mode_for(precision: str) -> str:
    """The mode a graph of `precision` is judged in: fp32 as deployed, lower precisions as TensorRT runs them."""
    return "optimized" if precision == "fp32" else "exact"


class Runner:
    """The protocol. Subclasses implement activate_impl / infer_impl / deactivate_impl.

    `output_names`: what infer returns, in order; None until activation when not given.
    `input_name`: the one key of infer's feed (pixel_values [B, 3, H, W] float32, or IMAGE_INPUT).
    """

    input_name = INPUT_NAME

    def __init__(self, name: str, output_names: Iterable[str] | None = None):
        self.name = name
        self.output_names = None if output_names is None else list(output_names)
        self.is_active = False

    def activate(self: _R) -> _R:
        if not self.is_active:
            self.activate_impl()
            self.is_active = True
        return self

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.is_active:
            raise RuntimeError(f"{self.name} is not active: use `with runner:` or call activate() first")
        return self.infer_impl(feed)

    def deactivate(self) -> None:
        if self.is_active:
            self.is_active = False
            self.deactivate_impl()

    def __enter__(self: _R) -> _R:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate_impl(self) -> None:
        raise NotImplementedError

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {'active' if self.is_active else 'inactive'}>"


def image_feed(runner: Runner, pixels: np.ndarray, images: list | None = None) -> dict[str, np.ndarray]:
    """The feed `runner` takes for one batch: pixel_values [B, 3, H, W] float32, or, for a served
    ensemble (which preprocesses), the B images as PNG bytes."""
    if runner.input_name == IMAGE_INPUT:
        if images is None or len(images) != len(pixels):
            raise ValueError(f"{runner.name} takes images, not pixel values: pass the {len(pixels)} images")
        return {IMAGE_INPUT: encode_images(images)}
    return {INPUT_NAME: np.ascontiguousarray(pixels, np.float32)}


def encode_images(images: list, fmt: str = "PNG") -> np.ndarray:
    """(B, 1) object array of encoded images. PNG is lossless: the server decodes the very pixels
    the reference saw."""
    payload = np.empty((len(images), 1), dtype=object)  # (B, 1) of bytes
    for i, image in enumerate(images):
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        payload[i, 0] = buf.getvalue()
    return payload
