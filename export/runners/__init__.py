"""One way to run a model: runners with Polygraphy's lifecycle (backend/base/runner.py).

    with OnnxRuntimeRunner("artifacts/demo/model.onnx", mode="exact") as runner:
        outputs = runner.infer({"pixel_values": x})        # {output name: np.ndarray}

`activate()` loads, `infer(feed) -> dict` runs, `deactivate()` frees; every runner is a context
manager. Runners:

    TorchRunner        the unpatched transformers encoder (the reference every parity check uses; UNICOM:
                       our module, export/models/unicom.py)
    OnnxRuntimeRunner  a graph in onnxruntime, mode "optimized" (its defaults: what a deployment
                       gets) or "exact" (optimizations off: Q/DQ as float simulation, as TensorRT
                       runs int8); plugin-form RoPE2D nodes get the reference body (pluginref)
    TensorRTRunner     a serialized engine through Polygraphy, datacenter TensorRT or TensorRT-RTX
    TritonRunner       a served ensemble (HTTP or gRPC client); its feed is encoded images

`runner_for_artifacts(DIR, kind)` picks one for an export folder; the engine runtime comes from
manifest.json (`engine_runner_from_manifest`), never from what happens to be installed. Parity,
the ledger, the benchmark, the feature visualization and the load test run models only here.
Heavy packages are imported on activation.
"""

from export.runners.base import (  # noqa: F401  (the public API, importable from the package)
    ORT_MODES,
    RUNNER_KINDS,
    Runner,
    check_mode,
    encode_images,
    image_feed,
    ort_mode_for,
)
from export.runners.ort import OnnxRuntimeRunner, default_providers, needs_pluginref, ort_session  # noqa: F401
from export.runners.pyt import TorchRunner  # noqa: F401
from export.runners.select import runner_for_artifacts  # noqa: F401
from export.runners.triton_client import TritonRunner  # noqa: F401
from export.runners.trt import (  # noqa: F401
    TensorRTRunner,
    engine_problem,
    engine_runner_from_manifest,
    engine_runtime,
)
