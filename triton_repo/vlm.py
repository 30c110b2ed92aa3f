"""The hand-off to a VLM's language model: the packed image rows a --projector export serves, from the server or
in-process, and the placeholder expansion that lines a prompt up with them (docs/vlm.md shows them feeding
transformers' `generate(inputs_embeds=...)`, and what vLLM, TensorRT-LLM and SGLang expect).

    from triton_repo.vlm import image_embeds, expand_image_tokens
    out = image_embeds(["photo.jpg"], url="127.0.0.1:8000")          # or artifacts="artifacts/llava"
    out.rows          # (sum of rows, H_llm): every image's rows, in order
    out.counts        # (N,): rows of each image (0 for a failed one, whose reason is out.errors[i])
    ids = expand_image_tokens(prompt_ids, out.counts, image_token_id)  # one placeholder -> counts[i] of them
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from export.core.errors import OptionError
from export.core.folder import IMAGE_NEWLINE_NAME
from export.core.interface import IMAGE_EMBEDS, IMAGE_INPUT
from triton_repo.export_folder import Artifacts
from triton_repo.forms import EncoderForm
from triton_repo.interface import TensorSpec
from triton_repo.modes import COUNT_OUTPUT, ERROR_OUTPUT, GRID_OUTPUT, IMAGE_SIZES_OUTPUT, RaggedPlan, ragged_outputs


@dataclass
class ImageEmbeds:
    """What the language model reads for a list of images, in the order given."""

    rows: np.ndarray  # (sum of counts, H_llm) float32 or float16
    counts: np.ndarray  # (N,) int64: rows of each image
    image_sizes: np.ndarray  # (N, 2) int64: (height, width) of each decoded image
    errors: list[str] = field(default_factory=list)  # "" or why image i failed (its count is 0)

    def per_image(self) -> list[np.ndarray]:
        """[(counts[i], H_llm)]: each image's rows (vLLM's per-image `image_embeds`)."""
        return np.split(self.rows, np.cumsum(self.counts)[:-1])


def image_embeds(images: Sequence[Any], *, url: str | None = None, artifacts: Path | str | None = None,
                 served_model: str = "embed", embeds_dtype: str | None = None) -> ImageEmbeds:
    """The packed rows for `images` (paths, encoded bytes or PIL images) from a server (`url`, HTTP host:port of a
    repository built with --preprocess anyres from a --projector export) or, with `artifacts`, in this process from
    the export folder (onnxruntime, the server's own preprocessing and packing). embeds_dtype: in-process only
    (float32 default, float16 as --embeds-dtype serves them)."""
    if (url is None) == (artifacts is None):
        raise OptionError("image_embeds: give either url= (a running server) or artifacts= (an export folder)")
    data = [_encoded(image) for image in images]
    if not data:
        raise OptionError("image_embeds: no images given")
    if url is not None:
        return _from_server(data, url, served_model)
    return _in_process(data, Path(artifacts), embeds_dtype or "float32")  # type: ignore[arg-type]


def expand_image_tokens(token_ids: Sequence[int], counts: Sequence[int], image_token_id: int) -> list[int]:
    """`token_ids` with its i-th `image_token_id` repeated counts[i] times (what transformers' processors do to
    the `<image>` placeholder), so that the prompt has one image position per row."""
    counts = [int(c) for c in counts]
    found = sum(1 for t in token_ids if t == image_token_id)
    if found != len(counts):
        raise OptionError(f"the prompt has {found} image placeholder(s) (token {image_token_id}) for {len(counts)} "
                          "image(s); put one per image")
    out: list[int] = []
    images = iter(counts)
    for token in token_ids:
        out.extend([token] * next(images) if token == image_token_id else [token])
    return out


def _encoded(image) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # lossless: the server decodes the same pixels
    return buf.getvalue()


def _from_server(data: list[bytes], url: str, served_model: str) -> ImageEmbeds:
    from export.core.errors import require

    http = require("tritonclient.http", "serve")
    client = http.InferenceServerClient(url)
    tensor = http.InferInput(IMAGE_INPUT, [len(data)], "BYTES")
    tensor.set_data_from_numpy(np.array(data, dtype=np.object_))
    names = (IMAGE_EMBEDS, COUNT_OUTPUT, IMAGE_SIZES_OUTPUT, ERROR_OUTPUT)
    result = client.infer(served_model, [tensor], outputs=[http.InferRequestedOutput(n) for n in names])
    errors = [e.decode() if isinstance(e, bytes) else str(e) for e in result.as_numpy(ERROR_OUTPUT)]
    return ImageEmbeds(result.as_numpy(IMAGE_EMBEDS), result.as_numpy(COUNT_OUTPUT),
                       result.as_numpy(IMAGE_SIZES_OUTPUT), errors)


class PackedEncoder:
    """An export folder's graph with the server's preprocessing and packing, in this process: what the served
    `embed` model answers, image by image (the direct side of scripts/benchmark_vlm.py)."""

    def __init__(self, artifacts: Path, embeds_dtype: str = "float32"):
        from export.core.packing import anyres_max_tiles
        from export.runners.base import ort_mode_for
        from export.runners.ort import ort_session
        from triton_repo.export_folder import read_artifacts

        art = read_artifacts(artifacts)
        vlm = art.manifest.vlm
        if not art.manifest.projector:
            raise OptionError(f"{artifacts} is not a --projector export; re-export the VLM checkpoint with "
                              "python -m export.build_engine --model DIR --projector")
        self.cfg, self.tile = art.preprocessor, int(vlm["tile_size"])
        self.pinpoints = [tuple(p) for p in vlm["image_grid_pinpoints"]]
        self.newline = np.load(art.folder / IMAGE_NEWLINE_NAME) if vlm.get("image_newline") else None
        self.max_tiles = anyres_max_tiles(vlm.get("vision_aspect_ratio"))
        self.dtype = np.dtype(embeds_dtype)
        self.input_name = art.manifest.input_name
        self.session = ort_session(art.onnx, ort_mode_for(art.manifest.precision))

    def encode(self, data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
        """Encoded bytes -> ((R, H_llm) rows, (height, width)); ImageDecodeError / PackingError for a bad image."""
        from export.core.packing import pack_image
        from export.core.preprocessing import anyres_views_from_bytes

        pixels, grid, size = anyres_views_from_bytes(data, self.cfg, self.pinpoints, self.tile)  # (V, 3, s, s)
        (embeds,) = self.session.run([IMAGE_EMBEDS], {self.input_name: pixels})  # (V, S', H_llm)
        return pack_image(embeds, size, grid, self.newline, self.max_tiles).astype(self.dtype), size


def _in_process(data: list[bytes], artifacts: Path, embeds_dtype: str) -> ImageEmbeds:
    from export.core.packing import PackingError
    from export.core.preprocessing import ImageDecodeError

    encoder = PackedEncoder(artifacts, embeds_dtype)
    rows, counts, sizes, errors = [], [], [], []
    for item in data:
        try:
            packed, size = encoder.encode(item)
        except (ImageDecodeError, PackingError) as exc:
            counts.append(0)
            sizes.append((0, 0))
            errors.append(str(exc))
            continue
        rows.append(packed)
        counts.append(packed.shape[0])
        sizes.append(size)
        errors.append("")
    if not rows:
        raise OptionError("; ".join(f"image {i}: {e}" for i, e in enumerate(errors)))
    return ImageEmbeds(np.concatenate(rows), np.array(counts, np.int64), np.array(sizes, np.int64), errors)


def packed_readme(name: str, spec: EncoderForm, rp: RaggedPlan, served: tuple[TensorSpec, ...], max_batch: int,
                  art: Artifacts, repo: Path) -> str:
    """The README of a --preprocess anyres repository on a --projector export."""
    vlm = art.manifest.vlm
    rows = ragged_outputs(served, rp)
    width = rows[0].dims[-1]
    s, n = rp.tile_size, rp.tile_size // rp.patch
    shrink = f", shrunk bilinearly to about {rp.anyres_max} tiles (anyres_max_{rp.anyres_max})" if rp.anyres_max else ""
    newline = ", then `image_newline` after every row of the map" if rp.newline else ""
    return f"""# Triton model repository: `{name}` (LLM-ready image features, {vlm.get('architecture')})

Generated by `python -m triton_repo.build --preprocess anyres` from `{art.folder}` (a `--projector` export).

| model | what | backend |
|---|---|---|
| `{name}` | `image` [N] (encoded bytes) -> AnyRes views -> BLS calls to `encoder` -> packed rows | python |
| `encoder` | `pixel_values` [V, 3, {s}, {s}] -> `{IMAGE_EMBEDS}` [V, {n * n}, {width}] (tower + projector, \
max batch {max_batch}) | {spec.name} |

Per image, exactly what the VLM inserts for it: the best fit of the checkpoint's `image_grid_pinpoints`
({', '.join(f'{h}x{w}' for h, w in rp.pinpoints)}), the whole image and its {s}x{s} tiles through the tower
(`vision_feature_layer` {vlm.get('vision_feature_layer')}, `{vlm.get('vision_feature_select_strategy')}`) and
the projector; then the whole image's {n * n} rows, and the tiles' map unpadded to the image's aspect{shrink}{newline}
(transformers' `pack_image_features`).

## Outputs of `{name}` (one request, N images; no batch axis)

| output | shape |
|---|---|
| `image` (input) | [N] BYTES |
| `{IMAGE_EMBEDS}` | [sum of count, {width}] {rows[0].dtype.removeprefix('TYPE_')}: the rows, image after image |
| `{COUNT_OUTPUT}` | [N] INT64: rows of image i (0 for a failed image): its number of image tokens |
| `{GRID_OUTPUT}` | [N, 2] INT64: the tile grid (rows, cols) |
| `{IMAGE_SIZES_OUTPUT}` | [N, 2] INT64: the decoded image's (height, width), transformers' `image_sizes` |
| `{ERROR_OUTPUT}` | [N] BYTES: "" or why that image failed |

The language model's image token is id {vlm.get('image_token_id')}; expand each placeholder to `count[i]`
copies and put the rows at those positions (docs/vlm.md: transformers `inputs_embeds`, vLLM `image_embeds`,
TensorRT-LLM's prompt table, SGLang).

## Serve and call

```bash
python -m triton_repo.serve {repo} --http-port 8000 --grpc-port 8001 --metrics-port 8002
```

```python
from triton_repo.vlm import image_embeds
out = image_embeds(["photo.jpg"], url="127.0.0.1:8000", served_model="{name}")
out.rows, out.counts, out.image_sizes, out.errors
```
"""
