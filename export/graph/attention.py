"""--attention lowerings: ONNX-to-ONNX rewrites of the traced attention, like the RoPE lowerings.

The exporter traces torch's scaled_dot_product_attention as standard ops (onnxscript's translation):

    q [B, H, S, D] --Mul(sqrt(scale))------------------------------.
    k [B, H, S, D] --(Reshape/Transpose/Reshape: k^T)--Mul(sqrt(scale))--> MatMul --> Softmax --> MatMul --> o
    v [B, H, S, D] ------------------------------------------------------------------------------'   [B, H, S, D]

The scores MatMul and the Softmax hold [B, H, S, S]: 16 x 16,530^2 x 4 bytes = 17.5 GB per layer for RICE-L
at the 3,240,000-pixel native budget. Each form below replaces the three nodes (and any Casts the fp16 recipe
put around the Softmax) and keeps the scaled q and k^T as they are, so RoPE2D still feeds q and k:

    decomposed  MatMul, Softmax, MatMul as traced (memory quadratic in S on every onnxruntime). TensorRT
                before 10.14 fuses this pattern itself; its fusion wants q or k scaled before the first
                MatMul, which the trace does (docs.nvidia.com/deeplearning/tensorrt, "Fused Attention").
    mha         com.microsoft.MultiHeadAttention (q, k, v as [B, S, H*D], num_heads, scale=1) with a
                model-local function body of the same name. onnxruntime's kernel takes precedence over the
                body: on the CPU its FlashAttention path (MlasFlashAttention, onnxruntime PR #20805; taken
                in contrib_ops/cpu/bert/multihead_attention.cc for float with no mask, bias or past) holds
                one block of scores per thread, so memory is linear in S; on CUDA it runs flash /
                memory-efficient kernels. The body (standard ops) lets the ONNX reference evaluator and
                onnx.checker read the graph.
    onnx23      the standard Attention (opset 23), q, k, v as [B, H, S, D], scale=1. TensorRT's ONNX parser
                maps it to IAttention from 10.14 (TensorRT 10.14 release notes: IAttention; onnx-tensorrt
                10.14 GA: "Added support for the Attention operator") and TensorRT-RTX 1.7's does too. The
                parser's IAttention is not decomposable, and a fused kernel exists for fp16/bf16 only:
                TensorRT-RTX 1.7 fails an fp32 build with "Attention operation was not supported by a
                dedicated kernel" (checked here, head sizes 16, 64, 104). onnxruntime 1.32's CPU kernel for
                it materializes the scores (6.6 GB peak at S = 16,384, 6 heads; measured), so it is an
                engine form, not the portable one.

V may have more columns per head than q and k: int8's outlier splitting carries a LayerNorm's outlier channels
through attention as extra columns of V (export/precision/split.py). MultiHeadAttention takes such a V (its
CPU FlashAttention too; on CUDA its flash kernel wants one head size and its memory-efficient one sizes in
multiples of 8, so such a layer takes the unfused kernel there: onnxruntime's multihead_attention.cc).
TensorRT's IAttention wants key and value of one shape ("Key and Value must have the same shape", TensorRT-RTX
1.7), so the onnx23 form pads q and k with zero columns, which leave q k^T as it was, and all three up to a
multiple of HEAD_SIZE_ALIGN (v's zero columns are sliced off the output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from export.core.errors import OptionError
from export.graph.lowering import major_minor

if TYPE_CHECKING:
    import onnx

ATTENTION_LOWERINGS = ("mha", "onnx23", "decomposed")
ATTENTION_CHOICES = ("auto",) + ATTENTION_LOWERINGS
PORTABLE_ATTENTION = "mha"  # model.onnx's form unless one is asked for by name
# com.microsoft.MultiHeadAttention: onnxruntime's contrib op (docs/ContribOperators.md, since onnxruntime 1.11)
MHA_DOMAIN = "com.microsoft"
MHA_OP = "MultiHeadAttention"
MHA_VERSION = 1
ATTENTION_OP = "Attention"  # the standard op, default domain
ATTENTION_OPSET = 23
IATTENTION_SINCE = (10, 14)  # TensorRT version whose ONNX parser maps Attention to IAttention
# A V widened by the outlier split is padded (q, k and v) up to a head size in multiples of this: flash-style fused
# attention kernels take head sizes in multiples of 8 (64 + 3 outlier columns would not be one).
HEAD_SIZE_ALIGN = 8
# Precisions whose attention runs in fp16 inside the graph (int8/fp8 quantize the linear layers, fp16 elsewhere)
HALF_ATTENTION_PRECISIONS = ("fp16", "int8", "fp8")


def resolve_attention(requested: str, engine: tuple[str, str] | None, precision: str = "fp32") -> str:
    """`auto`: the best form for the runtime that will run the graph.

    engine: (runtime, version) of the TensorRT that builds an engine here, or None (onnxruntime: `mha`).
    TensorRT >= 10.14 and TensorRT-RTX: `onnx23` (IAttention) when attention runs in fp16, else
    `decomposed` (no fp32 fused kernel, and the parser's IAttention may not fall back). Older TensorRT:
    `decomposed`, whose pattern its builder fuses.
    """
    if requested not in ATTENTION_CHOICES:
        raise OptionError(f"--attention {requested} is unknown; choose one of {', '.join(ATTENTION_CHOICES)}")
    if requested != "auto":
        return requested
    if engine is None:
        return PORTABLE_ATTENTION
    runtime, version = engine
    half = precision in HALF_ATTENTION_PRECISIONS
    if runtime == "tensorrt-rtx":
        return "onnx23" if half else "decomposed"
    return "onnx23" if half and major_minor(version) >= IATTENTION_SINCE else "decomposed"


def check_engine_attention(lowering: str, precision: str, runtime: str | None, version: str | None = None) -> None:
    """Refuse `--attention onnx23` where the engine build would fail, before any slow work: an fp32 engine, or a
    TensorRT (`version`, when known) whose ONNX parser has no Attention importer."""
    if lowering != "onnx23" or runtime not in ("tensorrt", "tensorrt-rtx"):
        return
    if precision not in HALF_ATTENTION_PRECISIONS:
        raise OptionError(f"--attention onnx23 with --precision {precision}: TensorRT's ONNX parser makes the "
                          "Attention op a fused IAttention, which has kernels for fp16/bf16 only; use --attention "
                          "decomposed (or auto) for an fp32 engine, or --precision fp16")
    if runtime == "tensorrt" and version and major_minor(version) < IATTENTION_SINCE:
        since = ".".join(map(str, IATTENTION_SINCE))
        raise OptionError(f"--attention onnx23: TensorRT {version}'s ONNX parser has no Attention importer (it "
                          f"came with {since}); use --attention decomposed (or auto), or TensorRT >= {since}")


@dataclass(frozen=True)
class AttentionSite:
    """One traced attention: the scaled q [B, H, S, D] and k^T [B, H, D, S], v [B, H, S, D], the output
    o [B, H, S, D], the nodes that compute it (scores MatMul, Casts, Softmax, output MatMul) and H."""

    q: str
    k_t: str
    v: str
    out: str
    nodes: tuple[str, ...]
    heads: int | None
    # The traced k^T, when it is onnxscript's translation of k.transpose(-2, -1) * sqrt(scale):
    #   Mul(Reshape(Transpose(Reshape(k, [-1, S, D]), [0, 2, 1]), [B, H, D, S]), c)
    # k [B, H, S, D] and c (a scalar): the forms scale k itself and skip the transposes. None: anything else.
    k: str | None = None
    k_scale: str | None = None
    k_nodes: tuple[str, ...] = ()  # the chain above, removed with the site
    v_extra: int = 0  # columns per head V has beyond q and k (value_info; split.py widens V)
    v_width: int = 0  # V's head size, where v_extra is known


def attention_sites(model: onnx.ModelProto) -> list[AttentionSite]:
    """Every MatMul -> [Cast] -> Softmax(axis -1) -> [Cast] -> MatMul chain whose intermediate tensors
    nothing else reads (so the rewrite removes them)."""
    import onnx

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for output in graph.output:  # a graph output is read too
        readers.setdefault(output.name, []).append(output)
    heads = _static_dims(model)
    widths = _static_dims(model, axis=3)  # head sizes of [B, H, S, D] tensors
    constants = {t.name: t for t in graph.initializer}
    sites = []
    for softmax in graph.node:
        if softmax.op_type != "Softmax" or _axis(softmax) != -1:
            continue
        chain = [softmax]
        up = producer.get(softmax.input[0])
        while up is not None and up.op_type == "Cast":
            chain.insert(0, up)
            up = producer.get(up.input[0])
        if up is None or up.op_type != "MatMul":
            continue
        scores = up
        chain.insert(0, scores)
        down = softmax
        while True:
            nxt = readers.get(down.output[0], [])
            if len(nxt) != 1:
                break
            down = nxt[0]
            if not isinstance(down, onnx.NodeProto) or down.op_type != "Cast":
                break
            chain.append(down)
        if not isinstance(down, onnx.NodeProto) or down.op_type != "MatMul" or down.input[0] != chain[-1].output[0]:
            continue
        chain.append(down)
        if any(len(readers.get(n.output[0], [])) != 1 for n in chain[:-1]):
            continue  # an intermediate is read elsewhere (an output, a statistic): leave it
        q, k_t = scores.input
        k, k_scale, k_nodes = _traced_key(k_t, producer, readers)
        v = down.input[1]
        if v in widths and q in widths:
            v_extra, v_width = widths[v] - widths[q], widths[v]
        else:  # value_info lost (a graph edited elsewhere): the split's own sizes
            v_extra, v_width = _widened_by_split(down.output[0], readers, constants)
        sites.append(AttentionSite(q, k_t, v, down.output[0], tuple(n.name for n in chain),
                                   heads.get(q, heads.get(v)), k, k_scale, k_nodes, max(v_extra, 0), v_width))
    return sites


def _traced_key(k_t: str, producer: dict, readers: dict) -> tuple[str | None, str | None, tuple[str, ...]]:
    """(k, its scale, the chain's node names) when `k_t` is the traced k^T chain (AttentionSite.k), else Nones."""
    mul = producer.get(k_t)
    if mul is None or mul.op_type != "Mul" or len(mul.input) != 2:
        return None, None, ()
    outer = producer.get(mul.input[0])
    flip = producer.get(outer.input[0]) if outer is not None and outer.op_type == "Reshape" else None
    inner = producer.get(flip.input[0]) if flip is not None and flip.op_type == "Transpose" else None
    if (inner is None or flip is None or outer is None or inner.op_type != "Reshape"
            or transpose_perm(flip) != [0, 2, 1]):
        return None, None, ()
    chain = (inner, flip, outer, mul)
    if any(len(readers.get(n.output[0], [])) != 1 for n in chain):
        return None, None, ()  # a link is read elsewhere: leave the chain
    return inner.input[0], mul.input[1], tuple(n.name for n in chain)


def transpose_perm(node) -> list[int]:
    """A Transpose node's perm attribute ([] when it has none)."""
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def lower_attention(model: onnx.ModelProto, lowering: str) -> onnx.ModelProto:
    """Return a copy of `model` with its traced attention in the `lowering` form."""
    import onnx

    from export.graph.lowering import set_default_opset
    from export.graph.rope_node import ensure_opset

    if lowering not in ATTENTION_LOWERINGS:
        raise OptionError(f"unknown attention lowering {lowering!r}; choose one of {', '.join(ATTENTION_LOWERINGS)}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _restore_decomposed(out)  # model.onnx in another form: back to the traced one first
    if lowering == "decomposed":
        return out
    sites = attention_sites(out)
    if not sites:
        return out
    _name_nodes(out)
    sites = attention_sites(out)  # again, with every node named
    replace = {site.nodes[-1]: site for site in sites}
    drop = {name for site in sites for name in site.nodes + site.k_nodes}
    new_nodes: list = []
    initializers: list = []
    for node in out.graph.node:
        if node.name in replace:
            site = replace[node.name]
            if lowering == "mha":
                nodes, inits = _mha_nodes(site)
            else:
                nodes, inits = _attention23_nodes(site)
            new_nodes += nodes
            initializers += inits
        elif node.name not in drop:
            new_nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    out.graph.initializer.extend(initializers)
    dropped = {o for n in model.graph.node if n.name in drop for o in n.output} - {s.out for s in sites}
    kept = [v for v in out.graph.value_info if v.name not in dropped]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)
    if lowering == "mha":
        ensure_opset(out, MHA_DOMAIN, MHA_VERSION)
        attach_mha_function(out)
    else:
        set_default_opset(out, ATTENTION_OPSET)  # the exporter's opset-18..20 ops mean the same at 23
    return out


def _restore_decomposed(model: onnx.ModelProto) -> None:
    """Rewrite the MultiHeadAttention / Attention forms this module writes back into the traced MatMul,
    Softmax, MatMul (in place), so that model.onnx in any form can be lowered for an engine. Where q is
    not float32 (the fp16 recipe's graphs) the Softmax gets its fp32 island back, as the recipe made it."""
    import onnx
    from onnx import helper

    graph = model.graph
    nodes_now = list(graph.node)  # one wrapper per node: the maps below key on their ids
    producer = {out: node for node in nodes_now for out in node.output}
    readers: dict[str, list] = {}
    for node in nodes_now:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input)}

    def up(name: str, op: str):
        node = producer.get(name)
        return node if node is not None and node.op_type == op else None

    def down(name: str, op: str):
        nodes = readers.get(name, [])
        return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op else None

    replace: dict[int, list] = {}  # id of the last removed node -> the nodes that take its place
    drop: set[int] = set()
    for node in nodes_now:
        if node.domain == MHA_DOMAIN and node.op_type == MHA_OP:
            q_flat, k_flat, v_flat = (up(name, "Reshape") for name in node.input[:3])
            q_t, k_t, v_t = (up(r.input[0], "Transpose") if r is not None else None for r in (q_flat, k_flat, v_flat))
            o_heads = down(node.output[0], "Reshape")
            o_t = down(o_heads.output[0], "Transpose") if o_heads is not None else None
            parts = [q_flat, k_flat, v_flat, q_t, k_t, v_t, o_heads, o_t]
            if q_t is None or k_t is None or v_t is None or o_t is None or None in parts:
                continue  # not one of ours
            q, v, out = q_t.input[0], v_t.input[0], o_t.output[0]
            removed = parts + [node]
            key = k_t.input[0]  # k^T [B, H, D, S] (perm 0 3 1 2), or the scaled k [B, H, S, D] (perm 0 2 1 3)
        elif node.domain in ("", "ai.onnx") and node.op_type == ATTENTION_OP:
            q, key, v, out = node.input[0], node.input[1], node.input[2], node.output[0]
            pads = [up(name, "Pad") for name in (q, key)]
            pads = pads if all(pad is not None and pad.name.endswith(("/attention/q_pad", "/attention/k_pad"))
                               for pad in pads) else []  # ours only: zero columns for a wider v
            if pads:
                q, key = pads[0].input[0], pads[1].input[0]
                v_pad, out_slice = up(v, "Pad"), down(out, "Slice")
                if v_pad is not None and out_slice is not None and v_pad.name.endswith("/attention/v_pad"):
                    v, out = v_pad.input[0], out_slice.output[0]  # the head size rounded up (HEAD_SIZE_ALIGN)
                    pads += [v_pad, out_slice]
            k = up(key, "Transpose")
            k = k if k is not None and k.name.endswith("/attention/k") else None  # ours only
            removed = pads + ([node] if k is None else [k, node])
            key = key if k is None else k.input[0]
            k_t = k
        else:
            continue
        p = out + "/decomposed/"
        n = helper.make_node
        nodes = []
        if k_t is None or transpose_perm(k_t) not in ([0, 3, 1, 2], [0, 1, 3, 2]):  # key is k [B, H, S, D]
            nodes.append(n("Transpose", [key], [p + "k_t"], perm=[0, 1, 3, 2], name=p + "k_t"))  # (B, H, D, S)
            key = p + "k_t"
        nodes.append(n("MatMul", [q, key], [p + "scores"], name=p + "scores"))  # (B, H, S, S)
        scores = p + "scores"
        elem = types.get(q, onnx.TensorProto.FLOAT)
        if elem not in (onnx.TensorProto.FLOAT, onnx.TensorProto.UNDEFINED):
            nodes.append(n("Cast", [scores], [p + "scores_f"], to=onnx.TensorProto.FLOAT, name=p + "scores_f"))
            scores = p + "scores_f"
        nodes.append(n("Softmax", [scores], [p + "weights"], axis=-1, name=p + "softmax"))
        weights = p + "weights"
        if scores != p + "scores":
            nodes.append(n("Cast", [weights], [p + "weights_h"], to=elem, name=p + "weights_h"))
            weights = p + "weights_h"
        nodes.append(n("MatMul", [weights, v], [out], name=p + "output"))  # (B, H, S, D)
        replace[id(removed[-1])] = nodes
        drop.update(id(r) for r in removed)
    if not replace:
        return
    new_nodes = []
    for node in nodes_now:
        if id(node) in replace:
            new_nodes += replace[id(node)]
        elif id(node) not in drop:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {name for node in graph.node for name in node.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    functions = [f for f in model.functions if not (f.domain == MHA_DOMAIN and f.name == MHA_OP)]
    del model.functions[:]
    model.functions.extend(functions)
    if not any(n.domain == MHA_DOMAIN for n in graph.node):
        opsets = [o for o in model.opset_import if o.domain != MHA_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(opsets)


def lower_graph(model: onnx.ModelProto, rope: str, attention: str) -> onnx.ModelProto:
    """`model` (canonical, or model.onnx in any form) with its RoPE (none: the model has none) and
    attention in the given forms: what model.onnx and engine.onnx are made with."""
    from export.graph.lowering import lower_rope

    lowered = model if rope == "none" else lower_rope(model, rope)
    return lower_attention(lowered, attention)


def lowered_attention(model: onnx.ModelProto) -> str:
    """Which form `model` holds: mha, onnx23, decomposed, or none (no attention found)."""
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    if (MHA_DOMAIN, MHA_OP) in ops:
        return "mha"
    if ("", ATTENTION_OP) in ops or ("ai.onnx", ATTENTION_OP) in ops:
        return "onnx23"
    return "decomposed" if attention_sites(model) else "none"


def _mha_nodes(site: AttentionSite):
    """q [B,H,S,D] -> [B,S,H*D]; k^T [B,H,D,S] -> [B,S,H*D]; v likewise; MHA; back to [B,H,S,D]."""
    from onnx import TensorProto, helper

    if site.heads is None:
        raise OptionError(f"--attention mha: the head count of {site.q} is not static in the graph; "
                          "use --attention decomposed")
    p = site.nodes[-1] + "/mha/"
    n = helper.make_node
    nodes = [
        n("Transpose", [site.q], [p + "q_bshd"], perm=[0, 2, 1, 3], name=p + "q_bshd"),  # (B, S, H, D)
        n("Reshape", [p + "q_bshd", p + "flat"], [p + "q"], name=p + "q_flat"),  # (B, S, H*D)
        *_key_bshd(site, p),  # (B, S, H, D)
        n("Reshape", [p + "k_bshd", p + "flat"], [p + "k"], name=p + "k_flat"),  # (B, S, H*D)
        n("Transpose", [site.v], [p + "v_bshd"], perm=[0, 2, 1, 3], name=p + "v_bshd"),  # (B, S, H, D)
        n("Reshape", [p + "v_bshd", p + "flat"], [p + "v"], name=p + "v_flat"),  # (B, S, H*D)
        # scale 1: q and k^T arrive scaled by sqrt(scale) each, as traced
        n(MHA_OP, [p + "q", p + "k", p + "v"], [p + "o"], domain=MHA_DOMAIN, num_heads=site.heads, scale=1.0,
          name=p + "attention"),  # (B, S, H*D)
        n("Reshape", [p + "o", p + "heads"], [p + "o_bshd"], name=p + "o_heads"),  # (B, S, H, D)
        n("Transpose", [p + "o_bshd"], [site.out], perm=[0, 2, 1, 3], name=p + "o_bhsd"),  # (B, H, S, D)
    ]
    inits = [helper.make_tensor(p + "flat", TensorProto.INT64, [3], [0, 0, -1]),
             helper.make_tensor(p + "heads", TensorProto.INT64, [4], [0, 0, site.heads, -1])]
    return nodes, inits


def _attention23_nodes(site: AttentionSite):
    """Attention(q [B,H,S,D], k [B,H,S,D], v [B,H,S,D], scale=1) -> [B,H,S,D]; q and k padded with zeros to v's
    head size where v is wider (the module docstring)."""
    from onnx import TensorProto, helper

    p = site.nodes[-1] + "/attention/"
    n = helper.make_node
    if site.k is not None and site.k_scale is not None:
        key = n("Mul", [site.k, site.k_scale], [p + "k"], name=p + "k")  # (B, H, S, D), scaled as k^T was
    else:
        key = n("Transpose", [site.k_t], [p + "k"], perm=[0, 1, 3, 2], name=p + "k")  # (B, H, S, D)
    nodes, inits, q, k, v, out = [key], [], site.q, p + "k", site.v, site.out
    if site.v_extra:  # IAttention wants k and v of one shape: zero columns leave q k^T (and v's part) as they were
        width = -(-site.v_width // HEAD_SIZE_ALIGN) * HEAD_SIZE_ALIGN
        qk_pad, v_pad = width - (site.v_width - site.v_extra), width - site.v_width
        inits.append(helper.make_tensor(p + "qk_pads", TensorProto.INT64, [8], [0] * 7 + [qk_pad]))
        nodes += [n("Pad", [q, p + "qk_pads"], [p + "q_padded"], name=p + "q_pad"),  # (B, H, S, width)
                  n("Pad", [k, p + "qk_pads"], [p + "k_padded"], name=p + "k_pad")]
        q, k = p + "q_padded", p + "k_padded"
        if v_pad:
            inits += [helper.make_tensor(p + "v_pads", TensorProto.INT64, [8], [0] * 7 + [v_pad]),
                      helper.make_tensor(p + "v_width", TensorProto.INT64, [1], [site.v_width]),
                      helper.make_tensor(p + "zero", TensorProto.INT64, [1], [0]),
                      helper.make_tensor(p + "last_axis", TensorProto.INT64, [1], [3])]
            nodes.append(n("Pad", [v, p + "v_pads"], [p + "v_padded"], name=p + "v_pad"))  # (B, H, S, width)
            v, out = p + "v_padded", p + "out_padded"
    # scale 1: q and k arrive scaled by sqrt(scale) each, which TensorRT's fusion asks for
    nodes.append(n(ATTENTION_OP, [q, k, v], [out], scale=1.0, name=p + "attention"))
    if out != site.out:  # (B, H, S, width) -> (B, H, S, v_width)
        nodes.append(n("Slice", [out, p + "zero", p + "v_width", p + "last_axis"], [site.out], name=p + "out_slice"))
    return nodes, inits


def _key_bshd(site: AttentionSite, p: str) -> list:
    """k as [B, S, H, D] under the name p + "k_bshd": from the traced k (scaled, one transpose, which
    onnxruntime cancels against the one the model put after RoPE) or from k^T [B, H, D, S]."""
    from onnx import helper

    if site.k is not None and site.k_scale is not None:
        return [helper.make_node("Mul", [site.k, site.k_scale], [p + "k_scaled"], name=p + "k_scaled"),
                helper.make_node("Transpose", [p + "k_scaled"], [p + "k_bshd"], perm=[0, 2, 1, 3], name=p + "k_bshd")]
    return [helper.make_node("Transpose", [site.k_t], [p + "k_bshd"], perm=[0, 3, 1, 2], name=p + "k_bshd")]


def mha_function_proto(opset: int) -> onnx.FunctionProto:
    """com.microsoft.MultiHeadAttention's meaning for our use in standard ops (no mask, bias or past):

        q, k, v [B, S, N*D] -> heads [B, N, S, D]; softmax(q k^T * scale) v -> [B, S, N*D]

    attributes num_heads (int), scale (float; our nodes always set it)."""
    import onnx
    from onnx import helper

    n = helper.make_node
    heads = onnx.AttributeProto(name="value_int", ref_attr_name="num_heads", type=onnx.AttributeProto.INT)
    scale = onnx.AttributeProto(name="value_float", ref_attr_name="scale", type=onnx.AttributeProto.FLOAT)
    const_heads = n("Constant", [], ["n"])
    const_heads.attribute.append(heads)
    const_scale = n("Constant", [], ["scale_f"])
    const_scale.attribute.append(scale)
    ints = onnx.TensorProto.INT64
    nodes = [
        const_heads,
        const_scale,
        n("Constant", [], ["zero_zero"], value=helper.make_tensor("zero_zero", ints, [2], [0, 0])),
        n("Constant", [], ["minus_one"], value=helper.make_tensor("minus_one", ints, [1], [-1])),
        n("Constant", [], ["axis0"], value=helper.make_tensor("axis0", ints, [1], [0])),
        n("Unsqueeze", ["n", "axis0"], ["n1"]),
        n("Concat", ["zero_zero", "n1", "minus_one"], ["split_heads"], axis=0),  # [0, 0, N, -1]
        n("Constant", [], ["merge_heads"], value=helper.make_tensor("merge_heads", ints, [3], [0, 0, -1])),
        n("Reshape", ["query", "split_heads"], ["q4"]),  # (B, S, N, D)
        n("Reshape", ["key", "split_heads"], ["k4"]),
        n("Reshape", ["value", "split_heads"], ["v4"]),
        n("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),  # (B, N, S, D)
        n("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),  # (B, N, D, S)
        n("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),  # (B, N, S, D)
        n("MatMul", ["qh", "kt"], ["raw"]),  # (B, N, S, S)
        n("CastLike", ["scale_f", "raw"], ["scale_t"]),
        n("Mul", ["raw", "scale_t"], ["scores"]),
        n("Softmax", ["scores"], ["weights"], axis=-1),
        n("MatMul", ["weights", "vh"], ["oh"]),  # (B, N, S, D)
        n("Transpose", ["oh"], ["o4"], perm=[0, 2, 1, 3]),  # (B, S, N, D)
        n("Reshape", ["o4", "merge_heads"], ["output"]),  # (B, S, N*D)
    ]
    return helper.make_function(MHA_DOMAIN, MHA_OP, inputs=["query", "key", "value"], outputs=["output"],
                                nodes=nodes, opset_imports=[helper.make_opsetid("", opset)],
                                attributes=["num_heads", "scale"])


def attach_mha_function(model: onnx.ModelProto) -> None:
    """Give the model its local MultiHeadAttention body (replacing an older one)."""
    keep = [f for f in model.functions if not (f.domain == MHA_DOMAIN and f.name == MHA_OP)]
    del model.functions[:]
    model.functions.extend(keep)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    model.functions.append(mha_function_proto(opset))


def _widened_by_split(out: str, readers: dict, constants: dict) -> tuple[int, int]:
    """(extra columns, V's head size) of an attention output that int8's outlier split cuts into [d, |O|]
    (export/precision/split.py: a Split on the last axis with constant sizes); (0, 0) for any other."""
    import onnx
    from onnx import numpy_helper

    nodes = readers.get(out, [])
    split = nodes[0] if len(nodes) == 1 and isinstance(nodes[0], onnx.NodeProto) else None
    if split is None or split.op_type != "Split" or len(split.input) < 2 or split.input[1] not in constants:
        return 0, 0
    if next((a.i for a in split.attribute if a.name == "axis"), 0) not in (-1, 3):
        return 0, 0
    sizes = numpy_helper.to_array(constants[split.input[1]]).tolist()
    return (int(sizes[1]), int(sum(sizes))) if len(sizes) == 2 else (0, 0)


def _static_dims(model: onnx.ModelProto, axis: int = 1) -> dict[str, int]:
    """Tensor name -> `axis` of a [B, H, S, D] tensor (1: the head count, 3: the head size), where the
    value_info says."""
    dims = {}
    for v in list(model.graph.value_info) + list(model.graph.input):
        shape = v.type.tensor_type.shape.dim
        if len(shape) == 4 and shape[axis].HasField("dim_value"):
            dims[v.name] = shape[axis].dim_value
    return dims


def _axis(node) -> int:
    for a in node.attribute:
        if a.name == "axis":
            return a.i
    return -1  # Softmax's default since opset 13


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name (the rewrite addresses nodes by name)."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)


