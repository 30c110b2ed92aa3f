"""Per-layer fallback: the quantized layers whose error hurts the outputs most go back to float.

Smoothing (smooth.py) fixes the activation ranges, but some models still amplify a small error:
an early attention with saturated softmax turns 1% noise in its inputs into a different attention
pattern (measured on the outlier test models: int8 on the patch embedding alone drops a token's
cosine to 0.77). Rule, on calibration images only (never the parity photos):

    1. run the Q/DQ graph and the fp32 graph; if every output's minimum row cosine meets its target,
       stop (the usual case: one extra pass over FALLBACK_IMAGES images)
    2. else rank the quantized layers by the damage each does alone (only that layer quantized)
    3. return layers to float, one at a time, until the targets are met, at most MAX_KEPT_FRACTION of
       them (a quarter for int8, half for fp8). int8: each step the one among the SEARCH_POOL worst alone
       that, with those already returned, leaves the smallest shortfall (greedy forward selection); they
       then stay in fp32, as judged. fp8 keeps its own fallback (OWN_FALLBACK): the order of the damage
       each does alone, kept in the rest's precision

Targets: the parity threshold of each output (export.models.families.TOLERANCES) with three quarters of its allowance
kept as margin, because photos calibration never saw do worse than the calibration images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.precision.qdq import prune_unused_qdq

# Calibration feeds used to judge (the first ones: distinct photographs; at most --calib-count). Each
# judgement runs the model once per feed, so this bounds the cost on large models. int8: 16, not 8: on the
# 2D-RoPE outlier model (gain 80, 3 layers) 8 images chose a fourth layer that left the held-out token cosine
# at 0.972, 16 one that reaches 0.983 (a saturated attention makes the token error depend on the images).
FALLBACK_IMAGES = 16
# fp8 keeps its own fallback as it was before issue 23: 8 images, the layers returned in the order of the
# damage each does alone, half of them at most, kept in the rest's precision. The int8 changes (greedy
# search, 16 images, fp32) measured worse on the CLIP outlier model's fp8 held-out pooled cosine (0.982
# against 0.993).
OWN_FALLBACK = {"fp8": {"images": 8, "greedy": False, "fp32": False}}
INT8_FALLBACK = {"images": FALLBACK_IMAGES, "greedy": True, "fp32": True}


def fallback_style(precision: str) -> dict:
    """{"images", "greedy", "fp32"}: how the fallback judges and returns layers for `precision`."""
    return OWN_FALLBACK.get(precision, INT8_FALLBACK)
MARGIN = 0.25  # target = 1 - MARGIN * (1 - parity threshold): 0.99 -> 0.9975, 0.98 -> 0.995
# Beyond this fraction of its layers in float, the low precision is not worth having: say so instead of hiding it.
# int8: a quarter (issue 23: outlier splitting keeps the outlier models within it). fp8 keeps its own budget,
# half: it is not split or smoothed (a float format), and its outlier models need more (docs/precision.md#fp8).
MAX_KEPT_FRACTION = {"int8": 0.25, "fp8": 0.5}
# Ranking runs the model once per quantized layer (289 in MLCD-bigG: hours on a CPU). Above this many
# layers the fallback reports the miss instead of ranking; parity then judges the graph as it is.
MAX_RANKED_LAYERS = 64
# The greedy search (keep_sensitive_layers_out) chooses among this many layers that do the most damage alone
# (or the budget, if larger): each step runs the model once per candidate.
SEARCH_POOL = 8
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")


def cosine_targets(precision: str, outputs: list[str]) -> dict[str, float]:
    """{output: minimum row cosine the Q/DQ graph must reach against fp32 on calibration images}."""
    from export.core.metrics import thresholds_for
    from export.models.families import TOLERANCES

    targets = {}
    for name in outputs:
        threshold = thresholds_for(TOLERANCES, precision, name).get("min_cosine")
        if threshold is not None:
            targets[name] = 1 - MARGIN * (1 - threshold)
    return targets


def quantized_layers(model) -> list:
    """Nodes of QUANTIZED_OPS whose weight (input 1) comes from a DequantizeLinear."""
    producers = {o: n for n in model.graph.node for o in n.output}
    return [n for n in model.graph.node if n.op_type in QUANTIZED_OPS and len(n.input) > 1
            and getattr(producers.get(n.input[1]), "op_type", None) == "DequantizeLinear"]


def restore(qdq, src, names: set[str]):
    """A copy of the Q/DQ model `qdq` where the nodes `names` read what they read in `src` (the float
    model it was quantized from: same node names) and their outputs skip their own Q/DQ."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    graph = model.graph
    float_nodes = {n.name: n for n in src.graph.node if n.name in names}
    have = {t.name for t in graph.initializer}
    src_inits = {t.name: t for t in src.graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    quantized = {n.name for n in quantized_layers(qdq)} - set(names)
    touched: set[str] = set()  # float tensors around the restored nodes
    for node in graph.node:
        if node.name not in float_nodes:
            continue
        del node.input[:]
        node.input.extend(float_nodes[node.name].input)
        for name in node.input:
            if name in src_inits and name not in have:
                graph.initializer.append(src_inits[name])
                have.add(name)
        touched.update(node.input)
        touched.update(node.output)
    # A Q/DQ pair on those tensors now rounds only for float consumers (the output's next op, a Shape
    # the quantizer rewired): they read the float tensor again; still-quantized layers keep the pair.
    for x in touched:
        for q in consumers.get(x, []):
            if q.op_type != "QuantizeLinear":
                continue
            for dq in consumers.get(q.output[0], []):
                for user in consumers.get(dq.output[0], []):
                    if user.name not in quantized:
                        user.input[:] = [x if i == dq.output[0] else i for i in user.input]
    prune_unused_qdq(graph)
    return model


def _outputs(model, feeds: list[dict], names: list[str], folder: Path, mode: str = "exact") -> dict[str, np.ndarray]:
    """{output: rows (N, C)} over all feeds; "exact" runs Q/DQ as float simulation (as TensorRT computes).

    `model`: a path, or a ModelProto whose weights may live in external files in `folder` (it is
    written there beside them, graph only, for the session's lifetime)."""
    import onnx

    from export.runners.ort import ort_session

    if isinstance(model, onnx.ModelProto):
        probe = Path(folder) / ".fallback-probe.onnx"
        onnx.save(model, str(probe))
        try:
            session = ort_session(probe, mode)
        finally:
            probe.unlink(missing_ok=True)
    else:
        session = ort_session(Path(model), mode)
    rows: dict[str, list] = {n: [] for n in names}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            rows[name].append(value.reshape(-1, value.shape[-1]))  # (tokens or images, C)
    return {n: np.concatenate(v) for n, v in rows.items()}


def _min_cosines(reference: dict, actual: dict) -> dict[str, float]:
    from export.core.metrics import compare

    return {n: round(compare(reference[n], actual[n])["min_cosine"], 6) for n in reference}


def _shortfall(cosines: dict[str, float], targets: dict[str, float]) -> float:
    """Worst (1 - cosine) / (1 - target) over outputs: <= 1 meets every target."""
    return max((1 - cosines[n]) / max(1 - t, 1e-12) for n, t in targets.items())


def keep_sensitive_layers_out(src: Path, qdq: Path, feeds: list[dict], precision: str, *,
                              reference: dict[str, list[np.ndarray]] | None = None, log=print) -> dict:
    """Apply the fallback rule to the Q/DQ model at `qdq` (rewritten in place when layers go back to
    float), quantized from the float model at `src`. Returns the report for the manifest.

    reference: the fp32 model's outputs on the first FALLBACK_IMAGES feeds, one array per feed
    (stats.collect_stats keep_outputs, from the recipe's statistics pass); None: run `src` here."""
    import onnx

    # Graphs only: the weights stay in their files (model.onnx.data, qdq.onnx.data beside them), so
    # a large model is never held twice; the candidates below reference the same files.
    src_model = onnx.load(str(src), load_external_data=False)
    qdq_model = onnx.load(str(qdq), load_external_data=False)
    # The quantizer writes every weight's DequantizeLinear at the top; each right before its layer,
    # a run holds one layer's float weights instead of all of them (8.2 GiB on MLCD-bigG before).
    from export.precision.fp16 import topological_sort

    topological_sort(qdq_model.graph)
    folder = Path(qdq).parent
    names = [o.name for o in qdq_model.graph.output]
    targets = cosine_targets(precision, names)
    style = fallback_style(precision)
    feeds = feeds[:style["images"]]
    report: dict = {
        "rule": f"judge the Q/DQ graph against fp32 on {len(feeds)} calibration images; when an output's minimum "
                f"cosine misses its target, return layers to float one at a time "
                f"({'greedy: the one leaving the smallest shortfall' if style['greedy'] else 'worst alone first'}), "
                f"until every target is met (at most {MAX_KEPT_FRACTION[precision]:.0%} of the quantized layers)",
        "targets_min_cosine": {n: round(t, 6) for n, t in targets.items()},
        "kept_out_of_low_precision": [],
    }
    if not targets or not feeds:
        report["skipped"] = "no cosine targets or no calibration images"
        return report
    if reference is not None and all(len(reference.get(n, [])) >= len(feeds) for n in targets):
        reference_rows = {n: np.concatenate([v.reshape(-1, v.shape[-1]) for v in reference[n][:len(feeds)]])
                          for n in targets}  # (tokens or images, C), as _outputs returns them
    else:
        reference_rows = _outputs(src, feeds, list(targets), folder, "optimized")  # fp32: fusions keep it exact
    everywhere = _min_cosines(reference_rows, _outputs(qdq_model, feeds, list(targets), folder))
    report["all_quantized"] = everywhere
    if _shortfall(everywhere, targets) <= 1:
        report["met_target"] = True
        log(f"      every quantized layer kept in {precision}: calibration-image cosines {everywhere} meet the targets")
        return report

    layers = [n.name for n in quantized_layers(qdq_model)]
    if len(layers) > MAX_RANKED_LAYERS:
        report["met_target"] = False
        report["skipped"] = (f"{len(layers)} quantized layers: ranking them runs the model {len(layers)} times "
                             f"(more than {MAX_RANKED_LAYERS}); every layer stays in {precision}")
        log(f"      warning: {precision} everywhere misses the calibration targets ({everywhere}) and "
            f"{report['skipped']}; consider fp16")
        return report
    ops = {n.name: n.op_type for n in qdq_model.graph.node}
    log(f"      {precision} everywhere misses the targets on calibration images ({everywhere}); measuring each "
        f"of {len(layers)} quantized layers alone ({len(layers)} runs over {len(feeds)} images)")
    alone = {}
    for name in layers:
        only = restore(qdq_model, src_model, set(layers) - {name})
        alone[name] = _min_cosines(reference_rows, _outputs(only, feeds, list(targets), folder))
    ranked = sorted(layers, key=lambda n: -_shortfall(alone[n], targets))
    budget = int(MAX_KEPT_FRACTION[precision] * len(layers))
    # Greedy forward selection among the layers that do the most damage alone: errors interact (two
    # layers can each pass alone and fail together, and restoring the worst one alone may not be the best
    # first step), so each step returns the candidate that leaves the smallest shortfall together with
    # those already kept. On the 2D-RoPE outlier model (gain 80, 3 layers) the alone-ranking order kept
    # 4 of 19 for a held-out token cosine of 0.972; the greedy choice meets the targets with fewer.
    pool = ranked[:max(budget, SEARCH_POOL)] if style["greedy"] else ranked[:budget]
    kept: list[str] = []
    steps: list[dict[str, float]] = []
    candidate, cosines = qdq_model, everywhere
    while len(kept) < budget and _shortfall(cosines, targets) > 1:
        best = None
        # greedy: every candidate left; otherwise the next one in the order of the damage each does alone
        for name in [n for n in pool if n not in kept][:None if style["greedy"] else 1]:
            trial = restore(qdq_model, src_model, set(kept + [name]))
            trial_cosines = _min_cosines(reference_rows, _outputs(trial, feeds, list(targets), folder))
            if best is None or _shortfall(trial_cosines, targets) < _shortfall(best[2], targets):
                best = (name, trial, trial_cosines)
        if best is None:
            break
        kept.append(best[0])
        candidate, cosines = best[1], best[2]
        steps.append(cosines)
    report["met_target"] = _shortfall(cosines, targets) <= 1
    report["result"] = cosines
    report["kept_out_of_low_precision"] = [
        {"node": n, "op_type": ops[n], f"min_cosine_with_only_this_layer_in_{precision}": alone[n],
         "min_cosine_after_this_step": steps[i],
         "why": (f"step {i + 1} of the greedy search: returning it to float with the {i} before left the smallest "
                 if style["greedy"] else f"step {i + 1}, in the order of the damage each does alone: ") +
                f"shortfall ({_shortfall(steps[i], targets):.1f}x the allowed 1 - cosine); alone in {precision} it "
                f"does {_shortfall(alone[n], targets):.1f}x (rank {ranked.index(n) + 1} of {len(layers)})"}
        for i, n in enumerate(kept)]
    for entry in report["kept_out_of_low_precision"]:
        log(f"      keeping {entry['node']} ({entry['op_type']}) out of {precision}: {entry['why']}")
    if not report["met_target"]:
        log(f"      warning: {precision} still misses the calibration targets with {len(kept)} of {len(layers)} "
            f"layers in float ({cosines}); consider fp16")
    onnx.save(candidate, str(qdq))  # graph only: its external weights stay where they are
    return report
