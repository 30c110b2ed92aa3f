"""--rope lowerings: ONNX-to-ONNX rewrites of the canonical graph's mvt.RoPE2D nodes.

    custom      mvt.RoPE2D + model-local function body (plain onnxruntime inlines the body)
    onnx23      standard RotaryEmbedding (opset 23): onnxruntime >= 1.23, TensorRT >= 10.15
    decomposed  the body inlined: standard elementwise ops only, any runtime
    plugin      mvt.RoPE2D with plugin_namespace/aot attributes and no body: TensorRT's
                ahead-of-time plugin mvt::RoPE2D (op type = plugin name; names in rope_identity.py)
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Callable

from export.core.errors import OptionError
from mvt_kernels.names import PLUGIN_NAMESPACE  # export/engine/ imports it from here too

if TYPE_CHECKING:
    import onnx

LOWERINGS = ("custom", "onnx23", "decomposed", "plugin")
ROPE_CHOICES = ("auto",) + LOWERINGS
ROTARY_OPSET = 23
# The first TensorRT whose ONNX parser builds each lowering (TensorRT CHANGELOG.md: 10.9 "Added support for
# Python AOT plugins", 10.15 "Added support for `RotaryEmbedding`"); custom and decomposed build on any.
MIN_TENSORRT = {"plugin": (10, 9), "onnx23": (10, 15)}
# What building an engine from each lowering imports besides TensorRT: TensorRT calls the plugin's aot_impl
# during the build, which compiles the Triton kernel (mvt_kernels/aot.py imports triton; the kernel's module,
# mvt_kernels/rope_triton.py, imports torch). The engine itself embeds the PTX and needs neither to run.
BUILD_MODULES = {"plugin": ("triton", "torch")}


def importable(module: str) -> bool:
    """`module` is installed here (found, not imported: importing triton or torch is slow)."""
    return importlib.util.find_spec(module) is not None


def unbuildable(lowering: str, engine: tuple[str, str], found: Callable[[str], bool] | None = None) -> str | None:
    """Why the TensorRT `engine` (runtime, version) cannot build a graph in `lowering` here; None: it can.

    found: whether a module is installed (None: `importable`, which asks this Python)."""
    found = found or importable
    runtime, version = engine
    if lowering == "plugin" and runtime == "tensorrt-rtx":
        return "TensorRT-RTX cannot load Python plugins"
    if runtime == "tensorrt" and lowering in MIN_TENSORRT and major_minor(version) < MIN_TENSORRT[lowering]:
        return f"TensorRT parses it from {'.'.join(map(str, MIN_TENSORRT[lowering]))} on"
    missing = [m for m in BUILD_MODULES.get(lowering, ()) if not found(m)]
    if missing:
        return f"its build compiles the RoPE kernel with {' and '.join(BUILD_MODULES[lowering])}; " \
               f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed here"
    return None


def major_minor(version: str) -> tuple[int, ...]:
    """"10.13.0" -> (10, 13): what the TensorRT version thresholds compare."""
    return tuple(int(p) for p in version.split(".")[:2])


def resolve_rope(requested: str, engine: tuple[str, str] | None, found: Callable[[str], bool] | None = None) -> str:
    """`auto`: the best lowering for the runtime that will run the graph.

    engine: (runtime, version) of the TensorRT that builds an engine here, or None.
    No engine: `custom` (onnxruntime runs the body; a registered kernel can take over).
    TensorRT >= 10.15: native RotaryEmbedding. 10.9-10.14: the AOT plugin where its build can compile the
    kernel (triton and torch installed: BUILD_MODULES), else decomposed. Older: decomposed.
    TensorRT-RTX: RotaryEmbedding (its 1.7 parser builds it; checked in CI).
    An explicit choice is returned as it is (engine_lowering says whether it builds here).
    """
    if requested not in ROPE_CHOICES:
        raise OptionError(f"--rope {requested} is unknown; choose one of {', '.join(ROPE_CHOICES)}")
    if requested != "auto":
        return requested
    if engine is None:
        return "custom"
    runtime, version = engine
    if runtime == "tensorrt-rtx":
        return "onnx23"
    for lowering in ("onnx23", "plugin"):
        if unbuildable(lowering, engine, found) is None:
            return lowering
    return "decomposed"


def engine_lowering(requested: str, engine: tuple[str, str],
                    found: Callable[[str], bool] | None = None) -> tuple[str, str | None]:
    """The lowering an engine is built from here, and why it is not `requested` resolved (None: it is).

    `requested` (the export's --rope) resolved by resolve_rope, unless this TensorRT cannot build that here (the
    AOT plugin without triton and torch, as in the KServe image; RotaryEmbedding before 10.15): then what `auto`
    gives here, which always builds. The rebuild (export/rebuild.py) runs where the export did not, so the
    export's choice may not build there; a plan in another lowering computes the same function."""
    lowering = resolve_rope(requested, engine, found)
    reason = unbuildable(lowering, engine, found)
    if reason is None:
        return lowering, None
    fallback = resolve_rope("auto", engine, found)
    runtime, version = engine
    return fallback, f"--rope {lowering} does not build with {runtime} {version} here ({reason}): {fallback} instead"


def lower_rope(model: onnx.ModelProto, lowering: str) -> onnx.ModelProto:
    """Return a copy of `model` with its RoPE2D nodes in the `lowering` form. `model` holds them canonical, or in
    the plugin form (an engine graph, or an older `--rope plugin` model.onnx), which is turned back first."""
    import onnx

    from export.graph import rope_node as onnx_rope

    if lowering not in LOWERINGS:
        raise OptionError(f"unknown RoPE lowering {lowering!r}; choose one of {', '.join(LOWERINGS)}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not onnx_rope.rope_nodes(out.graph):
        return out  # nothing to lower (CLIP-style models)
    _unplug(out)
    {"custom": _keep_custom, "onnx23": _to_rotary_embedding, "decomposed": _inline,
     "plugin": _to_plugin}[lowering](out)
    return out


def _unplug(model: onnx.ModelProto) -> None:
    """Turn plugin-form RoPE2D nodes back into canonical ones: the plugin form is the canonical node plus
    plugin_namespace and aot (_to_plugin), the canonical node has no attributes."""
    from export.graph import rope_node as onnx_rope

    for node in onnx_rope.rope_nodes(model.graph):
        del node.attribute[:]


def _keep_custom(model: onnx.ModelProto) -> None:
    from export.graph import rope_node as onnx_rope

    onnx_rope.attach_function(model)


def _inline(model: onnx.ModelProto) -> None:
    import onnx.inliner

    from export.graph import rope_node as onnx_rope

    onnx_rope.attach_function(model)
    inlined = onnx.inliner.inline_selected_functions(model, [(onnx_rope.DOMAIN, onnx_rope.OP_TYPE)])
    model.CopyFrom(inlined)
    onnx_rope.del_functions(model)
    _drop_opset(model, onnx_rope.DOMAIN)


def _to_plugin(model: onnx.ModelProto) -> None:
    from onnx import helper

    from export.graph import rope_node as onnx_rope

    onnx_rope.del_functions(model)
    for node in onnx_rope.rope_nodes(model.graph):
        del node.attribute[:]
        node.attribute.extend([
            helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE),
            helper.make_attribute("aot", 1),  # use the ahead-of-time implementation (no Python at runtime)
        ])


def _to_rotary_embedding(model: onnx.ModelProto) -> None:
    """Each RoPE2D(x [B,S,H,D], cos, sin) becomes

        xf  = CastLike(x, cos)                      # rotate in float, as the reference does
        x3  = Reshape(xf, [0, 0, -1])               # (B, S, H*D): the 3-D form takes num_heads
        pos = Expand(Range(0, S, 1)[None], [B, S])  # onnxruntime rejects position_ids [1, S] for B > 1
        y3  = RotaryEmbedding(x3, cos, sin, pos, num_heads=H, interleaved=0)
        y   = CastLike(Reshape(y3, Shape(x)), x)
    """
    import onnx
    from onnx import helper

    from export.graph import rope_node as onnx_rope

    heads = _static_heads(model)
    onnx_rope.del_functions(model)
    new_nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if not (node.domain == onnx_rope.DOMAIN and node.op_type == onnx_rope.OP_TYPE):
            new_nodes.append(node)
            continue
        x, cos, sin = node.input
        y = node.output[0]
        p = (node.name or y) + "/rotary/"
        n = helper.make_node
        new_nodes += [
            n("CastLike", [x, cos], [p + "xf"], name=p + "cast_in"),
            n("Shape", [x], [p + "shape"], name=p + "shape"),
            n("Reshape", [p + "xf", p + "flat_shape"], [p + "x3"], name=p + "flatten_heads"),  # (B, S, H*D)
            n("Shape", [x], [p + "batch_seq"], start=0, end=2, name=p + "batch_seq"),  # [B, S]
            n("Shape", [x], [p + "seq"], start=1, end=2, name=p + "seq_shape"),
            n("Squeeze", [p + "seq"], [p + "seq_scalar"], name=p + "seq_scalar"),
            n("Range", [p + "zero", p + "seq_scalar", p + "one"], [p + "positions"], name=p + "range"),  # (S,)
            n("Expand", [p + "positions", p + "batch_seq"], [p + "position_ids"], name=p + "position_ids"),  # (B, S)
            n("RotaryEmbedding", [p + "x3", cos, sin, p + "position_ids"], [p + "y3"],
              num_heads=heads[x], interleaved=0, name=p + "rotary"),
            n("Reshape", [p + "y3", p + "shape"], [p + "yf"], name=p + "unflatten_heads"),  # (B, S, H, D)
            n("CastLike", [p + "yf", x], [y], name=p + "cast_out"),
        ]
        model.graph.initializer.extend([
            helper.make_tensor(p + "flat_shape", onnx.TensorProto.INT64, [3], [0, 0, -1]),
            helper.make_tensor(p + "zero", onnx.TensorProto.INT64, [], [0]),
            helper.make_tensor(p + "one", onnx.TensorProto.INT64, [], [1]),
        ])
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    _drop_opset(model, onnx_rope.DOMAIN)
    set_default_opset(model, ROTARY_OPSET)


def _static_heads(model: onnx.ModelProto) -> dict[str, int]:
    """Number of heads (axis 2 of each RoPE2D input), which RotaryEmbedding needs as an attribute.

    Read from the exporter's value_info; a precision recipe may have put a Cast in between, so
    follow Cast nodes back to a tensor whose shape is known.
    """
    from export.graph import rope_node as onnx_rope

    dims = {v.name: v.type.tensor_type.shape.dim for v in model.graph.value_info}
    producers = {out: node for node in model.graph.node for out in node.output}
    heads = {}
    for node in onnx_rope.rope_nodes(model.graph):
        name = node.input[0]
        while name not in dims and name in producers and producers[name].op_type in ("Cast", "CastLike"):
            name = producers[name].input[0]
        shape = dims.get(name)
        if shape is None or len(shape) != 4 or not shape[2].HasField("dim_value"):
            raise OptionError(f"--rope onnx23: the head count of {node.input[0]} is not static in the graph")
        heads[node.input[0]] = shape[2].dim_value
    return heads


def _drop_opset(model: onnx.ModelProto, domain: str) -> None:
    keep = [o for o in model.opset_import if o.domain != domain]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def set_default_opset(model: onnx.ModelProto, version: int) -> None:
    """Raise the default-domain opset. The exporter's ops (opset 18-20) keep their semantics up to 23:
    the versions in between only add types (checked by onnx.checker and onnxruntime parity)."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, version)
    for f in model.functions:
        for o in f.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = max(o.version, version)
    model.ir_version = max(model.ir_version, 11)  # opset 23 needs IR version 11
