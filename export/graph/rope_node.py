"""The `mvt.RoPE2D` ONNX node: schema, exporter translation and its model-local function body.

    RoPE2D(x, cos, sin) -> y          domain "mvt", version 1 (names: rope_identity.py)
      x    [B, S, H, D]   float/float16/bfloat16
      cos  [S, D/2]       float
      sin  [S, D/2]       float
      y    [B, S, H, D]   same type as x; rotate-half rotation computed in float

The function body (standard ops, opset >= 18) lets plain onnxruntime run the file with no custom
kernel; a runtime with a kernel registered for mvt.RoPE2D uses that kernel instead.
"""

from __future__ import annotations

import onnx
from onnx import helper

from mvt_kernels.names import DOMAIN, OP_TYPE, VERSION

_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def register_schema() -> None:
    """Make the exporter accept mvt.RoPE2D (onnxscript needs a schema); call only while exporting."""
    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    schema = onnx.defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        VERSION,
        doc="Non-interleaved 2D rotary embedding with half tables [S, D/2]; see docs/rope2d.md.",
        inputs=[
            onnx.defs.OpSchema.FormalParameter("x", "T"),
            onnx.defs.OpSchema.FormalParameter("cos", "tensor(float)"),
            onnx.defs.OpSchema.FormalParameter("sin", "tensor(float)"),
        ],
        outputs=[onnx.defs.OpSchema.FormalParameter("y", "T")],
        type_constraints=[("T", _FLOAT_TYPES, "x and y share a floating type")],
    )
    onnx.defs.register_schema(schema)


def custom_translation_table() -> dict:
    """{torch op overload: onnxscript function} for torch.onnx.export(custom_translation_table=...)."""
    from onnxscript import values

    from mvt_kernels.torch_op import op_overload  # defines torch.ops.mvt.rope2d

    node = getattr(values.Opset(DOMAIN, VERSION), OP_TYPE)  # mvt.RoPE2D

    def rope2d(x, cos, sin):
        return node(x, cos, sin)

    return {op_overload(): rope2d}


def function_proto(opset: int) -> onnx.FunctionProto:
    """The body of RoPE2D in standard ops (Split with num_outputs needs opset >= 18)."""
    if opset < 18:
        raise ValueError(f"RoPE2D's body needs opset >= 18, the model has {opset}")
    n = helper.make_node
    nodes = [
        n("CastLike", ["x", "cos"], ["xf"]),  # compute in float whatever x's type
        n("Split", ["xf"], ["x1", "x2"], axis=-1, num_outputs=2),  # (B, S, H, D/2) each
        n("Constant", [], ["head_axis"], value=helper.make_tensor("head_axis", onnx.TensorProto.INT64, [1], [1])),
        n("Unsqueeze", ["cos", "head_axis"], ["c"]),  # (S, 1, D/2): broadcast over heads
        n("Unsqueeze", ["sin", "head_axis"], ["s"]),
        n("Mul", ["x1", "c"], ["x1c"]),
        n("Mul", ["x2", "s"], ["x2s"]),
        n("Sub", ["x1c", "x2s"], ["y1"]),  # x1*c - x2*s
        n("Mul", ["x2", "c"], ["x2c"]),
        n("Mul", ["x1", "s"], ["x1s"]),
        n("Add", ["x2c", "x1s"], ["y2"]),  # x2*c + x1*s
        n("Concat", ["y1", "y2"], ["yf"], axis=-1),  # (B, S, H, D)
        n("CastLike", ["yf", "x"], ["y"]),
    ]
    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        inputs=["x", "cos", "sin"],
        outputs=["y"],
        nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset)],
    )


def default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def attach_function(model: onnx.ModelProto) -> None:
    """Give the model its local RoPE2D function (the exporter cannot emit it itself in torch 2.13)."""
    del_functions(model)
    model.functions.append(function_proto(default_opset(model)))
    ensure_opset(model, DOMAIN, VERSION)


def del_functions(model: onnx.ModelProto) -> None:
    keep = [f for f in model.functions if not (f.domain == DOMAIN and f.name == OP_TYPE)]
    del model.functions[:]
    model.functions.extend(keep)


def ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    for o in model.opset_import:
        if o.domain == domain:
            o.version = version
            return
    model.opset_import.append(helper.make_opsetid(domain, version))


def rope_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [nd for nd in graph.node if nd.domain == DOMAIN and nd.op_type == OP_TYPE]


# Domains onnxruntime runs with no custom kernel (plain, or inside Triton's onnxruntime and python backends).
ONNXRUNTIME_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")


def nodes_without_body(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Custom-domain nodes with no model-local function: only a runtime with a kernel or plugin runs them.

    Empty for a portable graph (the canonical one: RoPE2D carries its body). The `plugin` lowering's
    RoPE2D nodes (body removed, plugin_namespace set) are what an engine-only graph holds.
    """
    local = {(f.domain, f.name) for f in model.functions}
    return [nd for nd in model.graph.node
            if nd.domain not in ONNXRUNTIME_DOMAINS and (nd.domain, nd.op_type) not in local]
