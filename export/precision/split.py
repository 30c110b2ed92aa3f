"""Outlier-channel splitting: a LayerNorm's few outlier channels take a float path; the rest is int8.

Trained ViTs carry a few LayerNorm output channels 30-100x larger than the rest. Smoothing (smooth.py)
moves part of that range into the weights, but both sides still pay: the ordinary channels keep a few
int8 levels, the weight rows of the outlier channels take most of each output channel's weight range.
On the outlier test models the error left lands in the attention logits, which the outlier channels
dominate (q and k both carry them), and a saturated softmax turns it into a different attention
pattern. Splitting (LLM.int8()'s decomposition, Dettmers et al., arXiv:2208.07339, with the channels
found on calibration images instead of per batch) keeps those channels out of int8 altogether, for a
LayerNorm output X [.., C] whose every consumer is a linear layer X @ W, outlier channels O:

    X ──> Mul(X, mask)   (mask: 0 on O, 1 elsewhere) ──> Q/DQ ──> MatMul(·, W)   int8, as before ──┐
      └─> Gather(X, O, axis=-1) [.., |O|] ──> MatMul(·, W[O, :])   float, K = |O| ──────────── Add ─> Y

Y = X @ W up to float rounding. The int8 path sees no outlier (its range is the ordinary channels'),
its weights keep their own range, and the outlier channels' contribution is exact to fp16. The side
path is a GEMM of depth |O| (2-8): its cost is |O| / C of the layer's. The graph stays plain MatMul
with Q/DQ plus pointwise Mul/Add and a Gather, which TensorRT fuses or runs as such.

Attention's V projection is carried further. Added back into V, the outlier part would reach the int8
out_proj inside softmax · V (range 37 against 1.3 without it on the CLIP-style outlier model, one per-tensor
scale for both). So V keeps the int8 part (and its bias); the outlier channels ride through the same attention
as |O| extra columns of every head, and their result goes around out_proj in float:

    P_h · [V_h | X_O] = [P_h · V_h | P_h · X_O]     (one attention, head size d + |O|; Split after it)
    out_proj(merge(P_h · V_h)) [int8] + merge_h(P_h · X_O) @ M [float, depth heads x |O|]
    M[h |O| + i, :] = Wv[O_i, head h columns] @ Wo[head h rows, :]

Exact by linearity; the V projection's bias stays in V. The widened V keeps attention one op, so its
lowerings (MultiHeadAttention, the opset-23 Attention: export/graph/attention.py) still apply; a side MatMul
reading the softmax output would leave every such layer decomposed. Only the traced pattern is rewritten
(V MatMul [-> Add(bias)] -> Reshape [B, N, h, d] -> Transpose -> MatMul(P, ·) -> Transpose/Reshape head
merge -> out_proj MatMul); any other V is split as the other linear layers are. The out_proj's int8 input is
then a tensor the fp32 model does not have: one short statistics pass over the split model measures it.

Measured against smoothing, rotation and other calibration methods on the outlier models:
docs/precision.md#activation-outliers-smoothing-splitting-and-the-per-layer-fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.graph.attention import transpose_perm

# A channel is an outlier when its peak |X_j| on the calibration images exceeds this many times the median
# channel's (smooth.MIN_SPREAD: the same rule decides that a LayerNorm needs either treatment).
OUTLIER_RATIO = 4.0
# Split only a few channels: the side path's depth is their number, and beyond a handful the LayerNorm is
# not "a few channels" any more (smoothing handles it instead).
MAX_SPLIT_CHANNELS = 8
# Nodes of the float side path end with this: the quantizer leaves them alone (qdq.quantizable_nodes).
FLOAT_PATH_SUFFIX = "/outlier_float"
SPLIT_DTYPES = ("int8",)  # fp8 is a float format: outliers cost it no precision (smooth.SMOOTHED_DTYPES_WHY)


def outlier_channels(peaks: np.ndarray, ratio: float = OUTLIER_RATIO) -> list[int]:
    """Channels whose peak exceeds `ratio` x the median peak, largest first."""
    peaks = np.asarray(peaks, np.float64)
    median = float(np.median(peaks))
    return [int(c) for c in np.argsort(-peaks) if peaks[c] > ratio * median]


def split_outlier_channels(path: Path, dst: Path, stats: dict, feeds: list[dict], *, dtype: str = "int8",
                           log=print) -> tuple[dict, dict]:
    """Split the outlier channels of the fp32 model at `path` into `dst` (written only when something was
    split). `stats`: per-channel statistics of smooth.smoothing_tensors (the recipe's one pass); `feeds`: the
    calibration inputs, run through `dst` only when a split was carried through attention (its out_proj's
    int8 input exists only there).

    Returns (report for the manifest, {new tensor: stats.TensorStats} for the tensors the quantizer will
    calibrate that the fp32 model does not have: the masked activations, the int8 layers' renamed outputs and
    the out_proj inputs that attention now carries without the outlier part)."""
    import onnx
    from onnx import numpy_helper

    from export.precision.smooth import smoothable

    path, dst = Path(path), Path(dst)
    report: dict[str, Any] = {
        "method": "outlier channels of a LayerNorm output X feeding only linear layers take a float path: "
                  "Gather(X, O) @ W[O] added to the int8 MatMul of X with those channels masked to 0 "
                  "(LLM.int8()-style decomposition, channels fixed from the calibration images); for attention's "
                  "V projection the outlier channels ride through attention as extra columns of every head and "
                  "their part is added after out_proj (merge_h(P_h Gather(X, O)) @ M), so that out_proj's int8 "
                  "input is the int8 path's alone",
        "rule": f"channels whose peak |X_j| exceeds {OUTLIER_RATIO:g} x the median channel's, when at most "
                f"{MAX_SPLIT_CHANNELS}; more are left to smoothing",
        "split": [],
    }
    derived: dict = {}
    if dtype not in SPLIT_DTYPES:
        report["skipped"] = "fp8 E4M3 is a float format: outlier channels cost it no precision"
        return report, derived
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    edit = _GraphEdit(graph, set(inits) | {o for n in graph.node for o in n.output})
    graph_readers = _readers(graph)  # the rewrites below change a layer's own nodes, never who reads whom elsewhere
    shapes: dict[str, list[Dim]] = {}  # shape inference, run once a split LayerNorm is found (most models have none)
    carried_inputs: list[str] = []  # out_proj inputs that attention now carries without the outlier part

    for target in smoothable(model)[0]:
        peaks = stats[target.tensor].channel_max_abs  # (C,)
        channels = outlier_channels(peaks)
        if not channels or len(channels) > MAX_SPLIT_CHANNELS:
            continue
        shapes = shapes or _inferred_shapes(model)  # before the first rewrite: on the graph as traced
        x = target.tensor
        keep = np.ones(len(peaks), np.float32)  # (C,)
        keep[channels] = 0
        mask, index = edit.constant(keep, f"{x}/outlier_mask"), edit.constant(np.array(channels, np.int64),
                                                                             f"{x}/outlier_channels")
        masked, picked = edit.fresh(f"{x}/masked"), edit.fresh(f"{x}/outliers")  # (.., C) int8, (.., |O|) float
        edit.add("Mul", [x, mask], [masked], f"{x}/mask")
        edit.add("Gather", [x, index], [picked], f"{x}/gather_outliers", axis=-1)
        derived[masked] = stats[x].masked(keep.astype(bool))
        through_attention = []
        for linear in target.linears:
            weight = numpy_helper.to_array(inits[linear.input[1]], str(path.parent))  # W (C, out)
            y = linear.output[0]
            int8_part = edit.fresh(f"{y}/int8_part")
            linear.input[0], linear.output[0] = masked, int8_part
            if y in stats:  # outputs are not quantized; the quantizer still asks for a range
                derived[int8_part] = stats[y]
            site = _attention_site(model, y, shapes, inits, graph_readers)
            if site is None:
                rows = edit.constant(weight[channels], f"{linear.input[1]}/outlier_rows")  # (|O|, out)
                float_part = edit.fresh(f"{y}/outlier_part")
                edit.add("MatMul", [picked, rows], [float_part], linear.name + FLOAT_PATH_SUFFIX)
                edit.add("Add", [int8_part, float_part], [y], f"{linear.name}/add_outliers")
                continue
            site.first.input[:] = [int8_part if i == y else i for i in site.first.input]  # V: the int8 part alone
            out_weight = numpy_helper.to_array(inits[site.out_proj.input[1]], str(path.parent))  # Wo (h d, out)
            out = site.out_proj.output[0]
            carried_inputs.append(_through_attention(edit, site, picked, weight[channels], out_weight,
                                                     shapes[site.attention.input[1]]))
            if out in stats:  # out_proj's output, now renamed to its int8 part: a range as for y above
                derived[site.out_proj.output[0]] = stats[out]
            through_attention.append({"v_projection": linear.name, "out_projection": site.out_proj.name,
                                      "heads": site.heads, "float_depth": site.heads * len(channels)})
            log(f"      carrying the split of {linear.name} through attention: {len(channels)} outlier columns per "
                f"head, added after {site.out_proj.name} in float (depth {site.heads} x {len(channels)})")
        entry = {
            "layernorm": target.layernorm.name, "tensor": x, "linear_layers": [n.name for n in target.linears],
            "outlier_channels": channels, "outlier_peaks": [round(float(peaks[c]), 3) for c in channels],
            "channel_peak_median": round(float(np.median(peaks)), 4),
            "why": f"channels {', '.join(map(str, channels))} peak at up to "
                   f"{float(np.max(peaks)) / max(float(np.median(peaks)), 1e-30):.1f} x the median channel; "
                   f"they take a float path of depth {len(channels)}, the int8 path keeps the ordinary range"}
        if through_attention:
            entry["through_attention"] = through_attention
        report["split"].append(entry)
        log(f"      splitting {len(channels)} outlier channels of {target.layernorm.name} into a float path "
            f"({', '.join(n.name for n in target.linears)})")
    if report["split"]:
        from export.precision.fp16 import topological_sort

        graph.node.extend(edit.nodes)
        graph.initializer.extend(edit.initializers)
        graph.value_info.extend(edit.value_info)
        topological_sort(graph)
        onnx.save(model, str(dst))  # other weights keep pointing at the source's data file (same folder)
    if carried_inputs:
        from export.precision.stats import collect_stats

        run = collect_stats(dst, feeds, carried_inputs, model=model, log=log,
                            desc="statistics of the out_proj inputs carried without the outliers (split model)")
        derived.update(run.stats)
        report["through_attention_statistics"] = {"tensors": len(carried_inputs), "batches": run.batches,
                                                  "seconds": round(run.seconds, 2)}
    return report, derived


class _GraphEdit:
    """Nodes, initializers and value_info to add to a graph, under names no tensor or node has yet."""

    def __init__(self, graph, names: set[str]):
        self.names = names | {n.name for n in graph.node}
        self.nodes: list = []
        self.initializers: list = []
        self.value_info: list = []

    def fresh(self, name: str, suffix: str = "") -> str:
        """`name` + `suffix`, with "_" added to `name` until no tensor or node has it."""
        while name + suffix in self.names:
            name += "_"
        self.names.add(name + suffix)
        return name + suffix

    def constant(self, value: np.ndarray, name: str) -> str:
        from onnx import numpy_helper

        name = self.fresh(name)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def add(self, op: str, inputs: list[str], outputs: list[str], name: str, **attributes) -> None:
        from onnx import helper

        # A side path's MatMul keeps FLOAT_PATH_SUFFIX last (the quantizer skips it): uniqueness goes before it.
        stem = name.removesuffix(FLOAT_PATH_SUFFIX)
        self.nodes.append(helper.make_node(op, inputs, outputs, name=self.fresh(stem, name[len(stem):]),
                                           **attributes))


def _through_attention(edit: _GraphEdit, site: _AttentionSite, picked: str, v_rows: np.ndarray,
                       out_weight: np.ndarray, v_shape: list[Dim]) -> str:
    """Rewrite `site` so that its V (already the int8 part) carries the outlier channels `picked` [B, N, |O|] as
    |O| extra columns of every head, and their part of out_proj's output is added after it in float (the module
    docstring). v_rows: Wv[O] [|O|, h d]; out_weight: Wo [h d, out]; v_shape: V's [B, h, N, d]. Returns out_proj's
    renamed int8 input, whose statistics the fp32 model cannot give."""
    import onnx
    from onnx import helper

    heads, d, k = site.heads, site.head_dim, len(v_rows)
    per_head = v_rows.reshape(k, heads, d).transpose(1, 0, 2).astype(np.float64)  # (h, |O|, d)
    m = np.einsum("hkd,hdc->hkc", per_head, out_weight.reshape(heads, d, -1).astype(np.float64))  # (h, |O|, out)
    rows = edit.constant(m.reshape(heads * k, -1).astype(np.float32), f"{site.out_proj.input[1]}/outlier_rows")
    v, o = site.attention.input[1], site.attention.output[0]
    z, out = site.out_proj.input[0], site.out_proj.output[0]
    lifted, spread, wide = (edit.fresh(f"{v}/outliers_{s}") for s in ("lifted", "per_head", "wide"))
    o_wide, o_outliers, o_order, o_merged = (edit.fresh(f"{o}/{s}") for s in
                                             ("wide", "outliers", "outliers_ordered", "outliers_merged"))
    z_int8, out_int8, out_outliers = edit.fresh(f"{z}/int8_part"), edit.fresh(f"{out}/int8_part"), edit.fresh(
        f"{out}/outlier_part")
    site.attention.input[1], site.attention.output[0] = wide, o_wide
    site.last.output[0] = site.out_proj.input[0] = z_int8
    site.out_proj.output[0] = out_int8
    perm = [{"B": 0, "N": 2}[axis] for axis in site.leading] + [1, 3]  # (B, h, N, |O|) -> out_proj input's order
    edit.add("Unsqueeze", [picked, edit.constant(np.array([1], np.int64), f"{v}/head_axis")], [lifted],
             f"{v}/lift_outliers")  # (B, 1, N, |O|)
    edit.add("Expand", [lifted, edit.constant(np.array([1, heads, 1, 1], np.int64), f"{v}/heads")], [spread],
             f"{v}/outliers_per_head")  # (B, h, N, |O|)
    edit.add("Concat", [v, spread], [wide], f"{v}/widen", axis=-1)  # (B, h, N, d + |O|)
    edit.add("Split", [o_wide, edit.constant(np.array([d, k], np.int64), f"{o}/sizes")], [o, o_outliers],
             f"{o}/split", axis=-1)  # (B, h, N, d), (B, h, N, |O|)
    edit.add("Transpose", [o_outliers], [o_order], f"{o}/order_outliers", perm=perm)  # (B, N, h, |O|) or (N, B, ..)
    edit.add("Reshape", [o_order, edit.constant(np.array([0, 0, -1], np.int64), f"{o}/merge")], [o_merged],
             f"{o}/merge_outliers")  # (.., .., h |O|)
    edit.add("MatMul", [o_merged, rows], [out_outliers], site.out_proj.name + FLOAT_PATH_SUFFIX)  # K = h |O|
    edit.add("Add", [out_int8, out_outliers], [out], f"{site.out_proj.name}/add_outliers")
    # The widened V's static shape: the attention lowerings take the head size from it (export/graph/attention.py).
    b, n = v_shape[0], v_shape[2]
    edit.value_info += [helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, [b, heads, n, d + k])
                        for t in (wide, o_wide)]
    return z_int8


def float_path_nodes(model, kept: list[str]) -> list[str]:
    """The nodes of `model`'s split float paths, which stay fp32 where the rest of an int8 graph is fp16: each
    Gather of outlier channels, each outlier part's MatMul and the Add that joins it to its layer (the outlier
    channels are the model's largest values and dominate the attention logits; in fp32 their part is exact, for
    GEMMs of depth |O|); and the mask on the input of the layers in `kept` (the fallback's, in fp32), so that they
    read what the fallback judged. The outlier models are chaotic at the token level: with these in fp16, one ulp
    of layer 0's q moved held-out figures (model.onnx) across the parity thresholds: 2D-RoPE (gain 80, 3 layers)
    tokens 0.944 (0.9865 with them in fp32), CLIP-style (gain 100, bias 4) pooled 0.9947 (0.9965)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    readers = _readers(model.graph)
    kept_names = set(kept)
    found: list[str] = []
    for node in model.graph.node:
        if node.op_type == "Gather" and node.name.startswith(f"{node.input[0]}/gather_outliers"):
            found.append(node.name)
        for add in readers.get(node.output[0], []) if node.output else []:
            if add.op_type == "Add" and add.name.startswith(f"{node.name}/add_outliers"):
                side = [producer[i] for i in add.input if i in producer and producer[i] is not node]
                found += [add.name] + [n.name for n in side if n.name.endswith(FLOAT_PATH_SUFFIX)]
        mask = producer.get(node.input[0]) if node.name in kept_names and node.input else None
        if mask is not None and mask.op_type == "Mul" and mask.name.startswith(f"{mask.input[0]}/mask"):
            found.append(mask.name)
    return list(dict.fromkeys(found))


Dim = int | str | None  # a static size, a named dynamic one, or unknown


@dataclass
class _AttentionSite:
    """Where a V projection's output goes: its first reader (the bias Add or the head split), the MatMul(P, V),
    the head merge's last node before out_proj, and out_proj; V's heads and head size; the leading axes of
    out_proj's input, "B" and "N" in their order (2D-RoPE models merge the heads to [N, B, C])."""

    first: Any
    attention: Any
    last: Any
    out_proj: Any
    heads: int
    head_dim: int
    leading: tuple[str, ...]


def _inferred_shapes(model) -> dict[str, list[Dim]]:
    """{tensor: dims} from onnx shape inference on the graph alone (the weights are not needed)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        t = v.type.tensor_type
        if t.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in t.shape.dim]
    return shapes


def _attention_site(model, y: str, shapes: dict[str, list[Dim]], inits: dict,
                    readers: dict[str, list]) -> _AttentionSite | None:
    """The traced attention that V = `y` (a linear layer's output [B, N, C]) feeds, or None for any other reader:

        y [-> Add(bias)] -> Reshape [B, N, h, d] -> Transpose (0 2 1 3) -> MatMul(P, ·) [B, h, N, d]
          -> Reshape / Transpose ... -> [B, N, h d] or [N, B, h d] -> MatMul(·, Wo) (out_proj, constant Wo)

    Every tensor on the way has that one reader, so rewriting it changes nothing else."""
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:  # Unsqueeze and Split take their axes / sizes as inputs from opset 13
        return None
    outputs = {o.name for o in graph.output}

    def only_reader(name: str):
        nodes = readers.get(name, [])
        return nodes[0] if len(nodes) == 1 and name not in outputs else None

    first = node = only_reader(y)
    if node is not None and node.op_type == "Add":
        bias = node.input[1] if node.input[0] == y else node.input[0]
        width = (shapes.get(y) or [None])[-1]
        if bias not in inits or list(inits[bias].dims) not in ([], [1], [width]):
            return None
        node = only_reader(node.output[0])
    if node is None or node.op_type != "Reshape":
        return None
    before, after = shapes.get(node.input[0]), shapes.get(node.output[0])
    if not before or not after or len(before) != 3 or len(after) != 4 or after[:2] != before[:2] or None in after:
        return None
    heads, head_dim = after[2], after[3]
    if not isinstance(heads, int) or not isinstance(head_dim, int) or heads * head_dim != before[2]:
        return None
    split = only_reader(node.output[0])
    if split is None or split.op_type != "Transpose" or transpose_perm(split) != [0, 2, 1, 3]:
        return None
    attention = only_reader(split.output[0])
    if attention is None or attention.op_type != "MatMul" or list(attention.input).index(split.output[0]) != 1:
        return None
    # The head merge: follow [B, h, N, d] through Reshape / Transpose to out_proj, axes labelled by what they hold.
    axes: list[tuple[str, ...]] = [("B",), ("H",), ("N",), ("D",)]
    sizes: list[Dim] = [after[0], heads, after[1], head_dim]
    tensor, last = attention.output[0], attention
    while True:
        reader = only_reader(tensor)
        if reader is None or reader.input[0] != tensor:
            return None
        if reader.op_type == "Transpose":
            perm = transpose_perm(reader)
            if sorted(perm) != list(range(len(axes))):
                return None
            axes, sizes = [axes[p] for p in perm], [sizes[p] for p in perm]
        elif reader.op_type == "Reshape":
            merged = _merge_axes(axes, sizes, shapes.get(reader.output[0]))
            if merged is None:
                return None
            axes, sizes = merged
        elif reader.op_type == "MatMul":
            weight = inits.get(reader.input[1])
            if (weight is None or len(weight.dims) != 2 or weight.dims[0] != heads * head_dim or len(axes) != 3
                    or axes[-1] != ("H", "D") or sorted(axes[:-1]) != [("B",), ("N",)] or last is attention):
                return None
            return _AttentionSite(first, attention, last, reader, heads, head_dim, tuple(a[0] for a in axes[:-1]))
        else:
            return None
        tensor, last = reader.output[0], reader


def _merge_axes(axes: list[tuple[str, ...]], sizes: list[Dim], out: list[Dim] | None):
    """(axes, sizes) after a Reshape to `out` that keeps or merges neighbouring axes (row-major), else None."""
    if not out or None in out:
        return None
    merged, i = [], 0
    for size in out:
        if i < len(axes) and sizes[i] == size:
            merged.append(axes[i])
            i += 1
            continue
        group: tuple[str, ...] = ()
        product = 1
        while i < len(axes) and isinstance(sizes[i], int) and isinstance(size, int) and product < size:
            group, product, i = group + axes[i], product * int(sizes[i] or 0), i + 1
        if not group or product != size:
            return None
        merged.append(group)
    return (merged, list(out)) if i == len(axes) else None


def _readers(graph) -> dict[str, list]:
    """{tensor: the nodes that read it}."""
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers
