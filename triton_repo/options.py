"""What a repository build takes (RepoOptions, with KServeOptions for --kserve) and returns (RepoResult).

Plain data, below every other module of the generator: forms.py, the builders and kserve.py read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from export.core.preprocessing import DEFAULT_MAX_PIXELS

# --kserve's defaults: visibly unset, so that the generated files say what to fill in
PLACEHOLDER_URI = "s3://CHANGE-ME/mvt-deploy/repository"
PLACEHOLDER_IMAGE = "registry.example.com/CHANGE-ME/mvt-deploy-tritonserver:latest"


@dataclass
class KServeOptions:
    storage_uri: str = PLACEHOLDER_URI  # where the repository is uploaded (its root: the model store)
    # the serving image: KServe's Triton image plus what our python steps (preprocess: pillow, numpy<2) and the
    # form need (python: onnxruntime; tensorrt: mvt-deploy, onnx, polygraphy, TensorRT's Python bindings for
    # the start-up step), built from kserve/Dockerfile; the stock runtime image has none of them
    image: str = PLACEHOLDER_IMAGE
    min_replicas: int = 1  # not 0: a cold start loads the model (and may rebuild the engine) for minutes
    max_replicas: int = 3
    scale_metric: str = "concurrency"  # Knative (serverless) mode; RawDeployment's HPA takes cpu or memory
    scale_target: int | None = None  # None: the max batch (in-flight requests that fill one dynamic batch)
    gpus: int | None = None  # None: 1 for GPU forms (tensorrt), else 0
    name: str | None = None  # the InferenceService's name; None: from the ensemble name


@dataclass
class RepoOptions:
    artifacts: Path  # the output folder of export.build_engine
    out: Path
    backend: str | None = None  # a form of triton_repo/forms.py; None: the first one that can serve the artifacts
    name: str = "embed"  # the ensemble, the model clients call
    instances: int = 1  # instances of the encoder and of preprocess
    max_batch: int | None = None  # None: the manifest's (tensorrt: the engine profile's max)
    force: bool = False
    # python backend: onnxruntime threads per encoder instance (0: one-thread runs per image on every core,
    # backend_models/encoder.py)
    intra_op_threads: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS  # preprocess refuses larger images
    # answer the pooled output (UNICOM: embedding) L2-normalized, through a `normalize` step
    normalize: bool = False
    # crop (the ensemble, crop.py) | anyres | native: triton_repo/modes.py, ragged.py (issue 12)
    preprocess: str = "crop"
    grid_pinpoints: list[tuple[int, int]] | None = None  # anyres (height, width) candidates; None: the default
    resize_factor: int | None = None  # native: h', w' multiples of this; None: twice the patch size
    native_min_pixels: int | None = None  # native pixel budget; None: preprocessing.NATIVE_MIN/MAX_PIXELS
    native_max_pixels: int | None = None
    # --projector exports in anyres: the served image_embeds' type (float32 | float16); the rows are packed in float32
    embeds_dtype: str = "float32"
    # also write kserve/ beside the repository: a KServe InferenceService (triton_repo/kserve.py); None: no
    kserve: KServeOptions | None = None


@dataclass
class RepoResult:
    out: Path
    backend: str
    max_batch: int
    models: dict[str, Path] = field(default_factory=dict)  # model name -> its config.pbtxt
