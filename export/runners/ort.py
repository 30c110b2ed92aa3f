"""onnxruntime: sessions, modes, providers, the RoPE2D reference body (pluginref)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from export.runners.base import ORT_MODES, Runner, check_mode


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
    from export.graph import rope_node as onnx_rope

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

        from export.graph import rope_node as onnx_rope

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
    whether plugin nodes run with the reference body.

    memory_check: before running a feed of a new, larger shape, estimate the run's peak memory from the
    graph's shapes (export.graph.footprint) and raise MemoryBudgetError, with the estimate and what to
    change, when it will not fit in the memory available, instead of dying to the out-of-memory killer."""

    def __init__(self, path, mode: str = "optimized", providers=None, output_names: Iterable[str] | None = None,
                 *, threads: int = 0, allow_spinning: bool = True, memory_check: bool = True):
        self.path, self.mode, self.providers = Path(path), check_mode(mode), providers
        self.threads, self.allow_spinning = threads, allow_spinning
        self._requested = None if output_names is None else list(output_names)
        super().__init__(f"onnxruntime-{mode} ({self.path.name})", output_names)
        self.pluginref = False
        self._session: Any = None
        self.memory_check = memory_check
        self._graph: Any = None  # the weightless graph estimates read
        self._fitted: list[tuple[int, ...]] = []  # feed shapes already estimated to fit
        self.last_estimate: Any = None  # export.graph.footprint.MemoryEstimate of the last new shape

    def activate_impl(self) -> None:
        if self.memory_check:
            from export.graph.footprint import weightless

            self._graph = weightless(self.path)  # before the session: the parsed file is freed first
        self._session, self.pluginref = _ort_session(self.path, self.mode, self.providers, self.threads,
                                                     self.allow_spinning)
        if self._requested is None:
            self.output_names = [o.name for o in self._session.get_outputs()]

    def infer_impl(self, feed):
        assert self.output_names is not None  # set by activate_impl
        if self._graph is not None:
            self.check_memory(feed)
        values = self._session.run(self.output_names, {k: np.ascontiguousarray(v) for k, v in feed.items()})
        return dict(zip(self.output_names, values))

    def check_memory(self, feed) -> None:
        """Estimate shapes no smaller-or-equal feed has been estimated for; refuse what will not fit."""
        from export.graph.attention import lowered_attention
        from export.graph.footprint import check_fits, estimate_peak

        name, array = next(iter(feed.items()))  # the one input (Runner.input_name)
        shape = tuple(array.shape)
        if any(len(done) == len(shape) and all(a <= b for a, b in zip(shape, done)) for done in self._fitted):
            return  # memory grows with every axis: a larger shape already fits
        self.last_estimate = estimate_peak(self._graph, {name: shape})
        form = lowered_attention(self._graph.proto)
        change = ("its attention materializes the scores [batch, heads, tokens, tokens] in onnxruntime: re-export "
                  "with --attention mha (the default), or use a smaller image size or batch"
                  if form == "decomposed" else "use a smaller image size or batch")
        check_fits(self.last_estimate, what=f"{self.path.name} on input {list(shape)}", change=change,
                   session_loaded=True)
        self._fitted.append(shape)

    def deactivate_impl(self) -> None:
        self._session = None
        self._graph = None
