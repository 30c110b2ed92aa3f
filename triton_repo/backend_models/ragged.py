"""Triton python-backend model for --preprocess anyres|native: image bytes -> per-image ragged encoder rows.

Input `image` (TYPE_STRING, [N]): N encoded images in one request. Each is preprocessed by
`preprocessing.py` beside this file (anyres: the whole image + its tiles, [T, 3, s, s]; native:
[1, 3, h', w']) and sent to the `encoder` model through BLS (async, so one request's chunks and
images are in flight together and the encoder's dynamic batcher merges them with other requests').
Outputs, every per-image block concatenated along the first axis (triton_repo/modes.py has the
layout): the encoder outputs (native: without the image axis), `count` [N], `grid` [N, 2],
`error` [N] ("" or the reason image i failed; its count is 0). A request whose every image fails
gets an error response.

With `pack` (a --projector export in anyres) each image's projected views are packed as its language model reads
them (`packing.py` beside this file: unpadding, anyres_max, `image_newline`): `image_embeds` [sum of rows, H_llm]
in the configured dtype, `count` = rows per image, plus `image_sizes` [N, 2] (height, width).
"""

import asyncio
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
    anyres_views_from_bytes,
    native_pixel_values_from_bytes,
)


class TritonPythonModel:
    def initialize(self, args):
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.cfg = ClipPreprocessing.from_file(os.path.join(version_dir, CONFIG_NAME))
        config = json.loads(args["model_config"])
        p = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.mode = p["mode"]
        self.tile_size = int(p["tile_size"])
        self.pinpoints = [tuple(x) for x in json.loads(p["pinpoints"])]
        self.factor, self.min_pixels, self.max_pixels = int(p["factor"]), int(p["min_pixels"]), int(p["max_pixels"])
        self.decode_max_pixels = int(p.get("decode_max_pixels") or DEFAULT_MAX_PIXELS)
        self.encoder, self.encoder_input = p["encoder"], p["encoder_input"]
        self.chunk = max(1, int(p["encoder_max_batch"]))
        self.outputs = [n for n in p["outputs"].split(",") if n]
        self.patch = int(p.get("patch") or 0)
        self.pack = p.get("pack") == "1"
        if self.pack:
            import packing

            self.pack_image, self.packing_error = packing.pack_image, packing.PackingError
            self.newline = np.load(os.path.join(version_dir, "image_newline.npy")) if p.get("newline") == "1" else None
            self.anyres_max = int(p.get("anyres_max") or 0) or None
            self.embeds_dtype = np.dtype(p.get("embeds_dtype") or "float32")

    def preprocess(self, data):
        """bytes -> (pixels [T, 3, H, W] float32, (rows, cols), the image's (height, width))."""
        if self.mode == "anyres":
            return anyres_views_from_bytes(data, self.cfg, self.pinpoints, self.tile_size, self.decode_max_pixels)
        pixels = native_pixel_values_from_bytes(data, self.cfg, self.factor, self.min_pixels, self.max_pixels)
        return pixels[None], None, (0, 0)  # (1, 3, h', w'); the grid comes from the patch size below

    async def encode(self, pixels):
        """[T, 3, H, W] -> {output: [T, ...]} through BLS, `chunk` rows per request, all in flight at once."""
        calls = []
        for start in range(0, pixels.shape[0], self.chunk):
            part = np.ascontiguousarray(pixels[start:start + self.chunk])  # (<=chunk, 3, H, W)
            # Outputs in CPU memory: without preferred_memory a BLS response keeps the device the encoder
            # answered on (a TensorRT encoder: the GPU), where as_numpy() raises "Tensor is stored in GPU and
            # cannot be converted to NumPy" (python_backend README "Using BLS with Decoupled Models"; 23.04+).
            request = pb_utils.InferenceRequest(
                model_name=self.encoder, requested_output_names=self.outputs,
                inputs=[pb_utils.Tensor(self.encoder_input, part)],
                preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0))
            calls.append(request.async_exec())
        parts: dict = {n: [] for n in self.outputs}
        for response in await asyncio.gather(*calls):
            if response.has_error():
                raise RuntimeError(f"encoder: {response.error().message()}")
            for n in self.outputs:
                parts[n].append(pb_utils.get_output_tensor_by_name(response, n).as_numpy())
        return {n: np.concatenate(v) for n, v in parts.items()}

    async def one_image(self, data):
        """-> (outputs {name: rows}, count, grid, error, image size)."""
        try:
            pixels, grid, size = self.preprocess(_as_bytes(data))
        except ImageDecodeError as exc:
            return None, 0, (0, 0), f"preprocess: {exc}", (0, 0)
        except Exception as exc:  # a mode PIL cannot convert, ...: this image only
            return None, 0, (0, 0), f"preprocess: {type(exc).__name__}: {exc}", (0, 0)
        try:
            out = await self.encode(pixels)
        except Exception as exc:
            return None, 0, (0, 0), str(exc), (0, 0)
        if self.pack:  # the language model's rows: (R, H_llm)
            name = self.outputs[0]
            try:
                rows = self.pack_image(out[name], size, grid, self.newline, self.anyres_max)
            except self.packing_error as exc:
                return None, 0, (0, 0), f"packing: {exc}", (0, 0)
            return {name: rows.astype(self.embeds_dtype)}, rows.shape[0], grid, "", size
        if self.mode == "native":
            first = out[self.outputs[0]]  # (1, L, C)
            out = {n: v[0] for n, v in out.items()}  # (L, C): one image, no image axis
            _, _, h, w = pixels.shape
            grid = (h // self.patch, w // self.patch) if self.patch else (0, 0)
            count = first.shape[1]
        else:
            count = pixels.shape[0]
        return out, count, grid, "", size

    async def respond(self, request):
        try:
            tensor = pb_utils.get_input_tensor_by_name(request, "image")
            if tensor is None:
                return _error("missing input `image` (TYPE_STRING, [N] encoded images)")
            images = tensor.as_numpy().reshape(-1)  # (N,)
            results = await asyncio.gather(*(self.one_image(x) for x in images))
            errors = [r[3] for r in results]
            if all(errors):
                return _error("; ".join(f"image {i}: {e}" for i, e in enumerate(errors)))
            tensors = []
            dtype = self.embeds_dtype if self.pack else np.float32
            for n in self.outputs:
                rows = [r[0][n] for r in results if r[0] is not None]
                tensors.append(pb_utils.Tensor(n, np.ascontiguousarray(np.concatenate(rows), dtype=dtype)))
            tensors.append(pb_utils.Tensor("count", np.array([r[1] for r in results], dtype=np.int64)))  # (N,)
            tensors.append(pb_utils.Tensor("grid", np.array([r[2] for r in results], dtype=np.int64)))  # (N, 2)
            if self.pack:
                tensors.append(pb_utils.Tensor("image_sizes", np.array([r[4] for r in results], dtype=np.int64)))
            tensors.append(pb_utils.Tensor("error", np.array([e.encode() for e in errors], dtype=np.object_)))
            return pb_utils.InferenceResponse(output_tensors=tensors)
        except Exception as exc:  # never let one request take the instance down
            return _error(f"{type(exc).__name__}: {exc}")

    async def execute(self, requests):
        return list(await asyncio.gather(*(self.respond(r) for r in requests)))


def _error(message):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


def _as_bytes(value) -> bytes:
    # TYPE_STRING elements arrive as bytes; a client that sent str gets them encoded back.
    return value if isinstance(value, bytes) else str(value).encode("latin-1")
