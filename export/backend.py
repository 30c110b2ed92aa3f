"""One way to run a model: runners with Polygraphy's lifecycle (backend/base/runner.py).

    with OnnxRuntimeRunner("artifacts/demo/model.onnx", mode="exact") as runner:
        outputs = runner.infer({"pixel_values": x})        # {output name: np.ndarray}

`activate()` loads, `infer(feed) -> dict` runs, `deactivate()` frees; every runner is a context
manager. Runners:

    TorchRunner        the unpatched transformers encoder (the reference every parity check uses; UNICOM:
                       our module, export/unicom.py)
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

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any, Iterable, TypeVar

import numpy as np

from .errors import EngineUnavailableError, MissingDependencyError, OptionError
from .families import IMAGE_INPUT, INPUT_NAME

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


# ------------------------------------------------------------------------------------------ PyTorch

class TorchRunner(Runner):
    """The unpatched transformers encoder (export.onnx_export.encoder_module), fp32 eval, no grad."""

    def __init__(self, checkpoint, shape=None, output_names: Iterable[str] | None = None):
        from .onnx_export import ExportShape

        self.checkpoint = checkpoint
        self.shape = shape or ExportShape(*checkpoint.image_size)
        self.module_outputs = checkpoint.family.output_names(self.shape.hidden_layer)  # what the module returns
        super().__init__(f"torch ({checkpoint.source or 'demo'})", output_names or self.module_outputs)
        self._module: Any = None

    def activate_impl(self) -> None:
        from .onnx_export import encoder_module

        self._module = encoder_module(self.checkpoint, self.shape)

    def infer_impl(self, feed):
        import torch

        x = torch.from_numpy(np.ascontiguousarray(feed[INPUT_NAME], np.float32))  # (B, 3, H, W)
        with torch.no_grad():
            values = self._module(x)
        out = {name: v.numpy() for name, v in zip(self.module_outputs, values)}
        assert self.output_names is not None  # always given: the shape's outputs by default
        return {name: out[name] for name in self.output_names}

    def deactivate_impl(self) -> None:
        self._module = None


# ------------------------------------------------------------------------------------------ onnxruntime

def default_providers() -> list:
    """CUDA first where onnxruntime-gpu sees it, else the CPU (onnxruntime falls back to the CPU
    when CUDA cannot start)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        # No TF32 in fp32 GEMMs: fp32 parity asks for 1e-4, TF32 keeps 10 mantissa bits.
        return [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_session(model, mode: str = "optimized", providers=None, *, threads: int = 0, allow_spinning: bool = True,
                priority_order: bool = True):
    """An onnxruntime InferenceSession for `model` (a path, an onnx.ModelProto or its bytes).

    mode: ORT_MODES key ("exact" = ORT_DISABLE_ALL). providers: None = default_providers().
    threads: intra-op threads (0: onnxruntime's default). allow_spinning=False stops idle worker
    threads from spinning (they would steal cores from whatever runs next, timed or served).
    Plugin-form RoPE2D nodes (no body) run with the reference body attached (pluginref).
    priority_order: execute in onnxruntime's priority-based order, which follows the node list
    (default), rather than its default order, which holds far more at once: for graphs with side
    branches on every tensor (precision/stats.py's reductions) it runs the branches late and keeps
    every activation alive (6.3 GB instead of 1.2 GB measured on the demo model at 896 px), and in
    a Q/DQ graph it dequantizes weights long before their layer runs (our graphs put each weight's
    DequantizeLinear right before its reader: precision.fp16.topological_sort).
    """
    return _ort_session(model, mode, providers, threads, allow_spinning, priority_order)[0]


def _ort_session(model, mode, providers, threads, allow_spinning, priority_order=True):
    """(session, whether the pluginref body was attached)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_MODES[check_mode(mode)])
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not allow_spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if priority_order:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if mode == "exact":
        # Q/DQ graphs dequantize weights at run time; onnxruntime's CPU arena keeps every buffer it
        # ever handed out, and its CPU provider inserts fp16 <-> fp32 Casts (new nodes, last in
        # priority) that make it dequantize far ahead: MLCD-bigG int8 peaked at 9.6 GiB with the
        # arena, 5.4 GiB without (batch 1). The mode is for judging numbers, not for speed.
        options.enable_cpu_mem_arena = False
    providers = default_providers() if providers is None else list(providers)
    with _pluginref(model) as (source, attached):
        return ort.InferenceSession(source, options, providers=providers), attached


def needs_pluginref(model) -> bool:
    """Whether `model` (a ModelProto) holds RoPE2D nodes without a body: the plugin lowering."""
    from . import onnx_rope

    return any(n.domain == onnx_rope.DOMAIN and n.op_type == onnx_rope.OP_TYPE
               for n in onnx_rope.nodes_without_body(model))


class _pluginref:
    """Yields (what InferenceSession takes, attached). A plugin-form graph gets the reference body in
    a sibling copy (so relative external-data locations resolve) that lives only while the session is
    created: the session holds the graph afterwards (Polygraphy's pluginref idea)."""

    def __init__(self, model):
        self.model, self.tmp = model, None

    def __enter__(self):
        import onnx

        from . import onnx_rope

        model = self.model
        on_disk = isinstance(model, (str, Path))
        if on_disk:
            proto = onnx.load(str(model), load_external_data=False)
        elif isinstance(model, bytes):
            proto = onnx.load_from_string(model)
        else:
            proto = model
        if not needs_pluginref(proto):
            return (str(model) if on_disk else model if isinstance(model, bytes) else model.SerializeToString()), False
        if proto is model:  # the caller's ModelProto: change a copy
            proto = onnx.ModelProto()
            proto.CopyFrom(model)
        for node in onnx_rope.rope_nodes(proto.graph):
            del node.attribute[:]  # plugin_namespace / aot mean nothing to the body
        onnx_rope.attach_function(proto)
        if not on_disk:
            return proto.SerializeToString(), True
        fd, name = tempfile.mkstemp(prefix=".pluginref-", suffix=".onnx", dir=Path(model).parent)
        self.tmp = Path(name)
        with open(fd, "wb") as f:
            f.write(proto.SerializeToString())
        return str(self.tmp), True

    def __exit__(self, *exc):
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)


class OnnxRuntimeRunner(Runner):
    """A graph in onnxruntime (see ort_session for the arguments). `pluginref` says, once active,
    whether plugin nodes run with the reference body."""

    def __init__(self, path, mode: str = "optimized", providers=None, output_names: Iterable[str] | None = None,
                 *, threads: int = 0, allow_spinning: bool = True):
        self.path, self.mode, self.providers = Path(path), check_mode(mode), providers
        self.threads, self.allow_spinning = threads, allow_spinning
        self._requested = None if output_names is None else list(output_names)
        super().__init__(f"onnxruntime-{mode} ({self.path.name})", output_names)
        self.pluginref = False
        self._session: Any = None

    def activate_impl(self) -> None:
        self._session, self.pluginref = _ort_session(self.path, self.mode, self.providers, self.threads,
                                                     self.allow_spinning)
        if self._requested is None:
            self.output_names = [o.name for o in self._session.get_outputs()]

    def infer_impl(self, feed):
        assert self.output_names is not None  # set by activate_impl
        values = self._session.run(self.output_names, {k: np.ascontiguousarray(v) for k, v in feed.items()})
        return dict(zip(self.output_names, values))

    def deactivate_impl(self) -> None:
        self._session = None


# ------------------------------------------------------------------------------------------ TensorRT

class TensorRTRunner(Runner):
    """A serialized engine through Polygraphy's TrtRunner (GPU only). `runtime` selects Polygraphy's
    binding: "tensorrt" (datacenter) or "tensorrt-rtx"; an engine opens only in the runtime that built
    it, so take it from the manifest (engine_runner_from_manifest). Polygraphy binds one runtime per
    process: activating the other one raises."""

    def __init__(self, plan, runtime: str = "tensorrt", output_names: Iterable[str] | None = None):
        from .engine import RUNTIMES

        if runtime not in RUNTIMES:
            raise OptionError(f"engine runtime {runtime!r} is unknown; choose one of {', '.join(RUNTIMES)}")
        self.plan, self.runtime = Path(plan), runtime
        super().__init__(f"{runtime} ({self.plan.name})", output_names)
        self._runner: Any = None

    def activate_impl(self) -> None:
        from .engine import _select_polygraphy_runtime

        if not self.plan.is_file():
            raise EngineUnavailableError(f"{self.plan} does not exist; build it with python -m export.build_engine "
                                         f"--runtime {self.runtime}")
        _select_polygraphy_runtime(self.runtime)
        try:
            from polygraphy.backend.common import BytesFromPath
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        except ImportError:
            raise MissingDependencyError(f"polygraphy is not installed; install the extra: pip install "
                                         f"'mvt-deploy[{self.runtime}]'") from None
        runner = TrtRunner(EngineFromBytes(BytesFromPath(str(self.plan))), name=self.name)
        runner.activate()
        self._runner = runner

    def infer_impl(self, feed):
        out = self._runner.infer({k: np.ascontiguousarray(v) for k, v in feed.items()})
        if self.output_names is None:
            self.output_names = list(out)
        # Copies: TrtRunner returns views of host buffers that the next infer overwrites.
        return {name: np.array(out[name], copy=True) for name in self.output_names if name in out}

    def deactivate_impl(self) -> None:
        runner, self._runner = self._runner, None
        runner.deactivate()


def engine_runtime(manifest: dict, artifacts: Path) -> str:
    """The runtime that must open the folder's model.plan: manifest.json engine.runtime. Raises
    EngineUnavailableError when no engine was built."""
    from .engine import RUNTIMES

    engine = manifest.get("engine") or {}
    runtime = engine.get("runtime")
    if not engine.get("built"):
        raise EngineUnavailableError(
            f"no engine in {artifacts}: {engine.get('reason') or 'none was built'}; build one with "
            "python -m export.build_engine --runtime tensorrt (on a GPU) or --runtime tensorrt-rtx")
    if runtime not in RUNTIMES:
        raise EngineUnavailableError(f"{artifacts}/manifest.json names engine runtime {runtime!r}, not one of "
                                     f"{', '.join(RUNTIMES)}; re-export the folder with this version")
    return runtime


def engine_problem(engine: dict, target) -> str | None:
    """Why an engine described by the manifest's `engine` entry cannot run where `target`
    (export.engine.probe(engine runtime)) was probed; None when it can."""
    runtime = engine.get("runtime")
    if target.version is None:
        return f"the engine was built with {runtime}: {target.skip_reason}"
    if not _importable("polygraphy"):
        return f"polygraphy is not installed; install the extra: pip install 'mvt-deploy[{runtime}]'"
    if not target.gpu:
        return f"model.plan is a {runtime} engine: it runs only on an NVIDIA GPU and none is visible here"
    built_for = [cc for cc in engine.get("compute_capabilities") or [] if cc and cc != "current GPU"]
    here = target.gpu.get("compute_capability")
    if built_for and here and here not in built_for:
        hint = f" --compute-capability {here}" if runtime == "tensorrt-rtx" else ""
        return (f"the engine was built for compute capability {', '.join(built_for)}, this GPU "
                f"({target.gpu.get('name')}) is {here}; rebuild it: python -m export.build_engine --runtime "
                f"{runtime}{hint}")
    return None


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def engine_runner_from_manifest(artifacts: Path, output_names: Iterable[str] | None = None,
                                manifest: dict | None = None) -> TensorRTRunner:
    """A TensorRTRunner for DIR/model.plan in the runtime that built it, or EngineUnavailableError
    saying why it cannot run here and what to do."""
    from . import engine as engines
    from .manifest import output_names as manifest_outputs, read_manifest

    artifacts = Path(artifacts)
    manifest = manifest if manifest is not None else read_manifest(artifacts)
    runtime = engine_runtime(manifest, artifacts)
    plan = artifacts / engines.PLAN_NAME
    if not plan.is_file():
        raise EngineUnavailableError(f"{artifacts}/manifest.json lists an engine but {plan} is missing; "
                                     f"rebuild the folder (python -m export.build_engine --runtime {runtime})")
    problem = engine_problem(manifest["engine"], engines.probe(runtime))
    if problem:
        raise EngineUnavailableError(f"{plan} cannot run here: {problem}")
    return TensorRTRunner(plan, runtime, output_names or manifest_outputs(manifest) or None)


# ------------------------------------------------------------------------------------------ Triton

class TritonRunner(Runner):
    """A served ensemble through tritonclient (protocol "http" or "grpc"). Its feed is
    {IMAGE_INPUT: (B, 1) object array of encoded images} (encode_images): the server preprocesses."""

    input_name = IMAGE_INPUT
    PROTOCOLS = ("http", "grpc")

    def __init__(self, url: str, model: str = "embed", output_names: Iterable[str] | None = None,
                 protocol: str = "http"):
        if protocol not in self.PROTOCOLS:
            raise OptionError(f"protocol {protocol!r} is unknown; choose one of {', '.join(self.PROTOCOLS)}")
        self.url, self.model, self.protocol = url, model, protocol
        self._requested = None if output_names is None else list(output_names)
        super().__init__(f"triton {protocol}://{url}/{model}", output_names)
        self._client: Any = None

    def _module(self):
        from .errors import require

        return require(f"tritonclient.{self.protocol}", "serve")

    def activate_impl(self) -> None:
        client = self._module().InferenceServerClient(self.url)
        try:
            if not client.is_model_ready(self.model):
                raise RuntimeError(f"model {self.model!r} is not ready on the server at {self.url}")
            meta = (client.get_model_metadata(self.model) if self.protocol == "http"
                    else client.get_model_metadata(self.model, as_json=True))
        except Exception:
            client.close()
            raise
        served = [o["name"] for o in meta["outputs"]]
        self.output_names = [n for n in (self._requested or served) if n in served]
        self._client = client

    def infer_impl(self, feed):
        mod = self._module()
        payload = feed[IMAGE_INPUT]  # (B, 1) of bytes
        request = mod.InferInput(IMAGE_INPUT, list(payload.shape), "BYTES")
        request.set_data_from_numpy(payload)
        assert self.output_names is not None  # set by activate_impl
        outputs = [mod.InferRequestedOutput(n) for n in self.output_names]
        result = self._client.infer(self.model, [request], outputs=outputs)
        return {n: result.as_numpy(n) for n in self.output_names}

    def deactivate_impl(self) -> None:
        client, self._client = self._client, None
        client.close()


# ------------------------------------------------------------------------------------------ choosing

def runner_for_artifacts(artifacts: Path, kind: str = "onnxruntime", *, output_names: Iterable[str] | None = None,
                         url: str | None = None, model: str = "embed", manifest: dict | None = None) -> Runner:
    """The runner of `kind` (RUNNER_KINDS) for an export folder, not yet active:
    torch        the PyTorch reference the manifest names (loads the checkpoint now)
    onnxruntime  DIR/model.onnx, in the mode its precision is judged in (ort_mode_for)
    tensorrt     DIR/model.plan in the runtime that built it (engine_runner_from_manifest)
    triton       the ensemble `model` served at `url`
    """
    from .artifacts import ONNX_NAME
    from .manifest import export_shape, read_manifest, reference_checkpoint

    artifacts = Path(artifacts)
    if kind not in RUNNER_KINDS:
        raise OptionError(f"backend {kind!r} is unknown; choose one of {', '.join(RUNNER_KINDS)}")
    if kind == "triton":
        if not url:
            raise OptionError("the triton backend needs the server's address: --url HOST:PORT")
        return TritonRunner(url, model, output_names)
    manifest = manifest if manifest is not None else read_manifest(artifacts)
    if kind == "onnxruntime":
        return OnnxRuntimeRunner(artifacts / ONNX_NAME, ort_mode_for(manifest.get("precision", "fp32")),
                                 output_names=output_names)
    if kind == "tensorrt":
        return engine_runner_from_manifest(artifacts, output_names, manifest)
    ckpt = reference_checkpoint(manifest)
    return TorchRunner(ckpt, export_shape(manifest, ckpt), output_names)
