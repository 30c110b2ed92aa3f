"""Per-layer divergence: each encoder layer's hidden state, PyTorch against an ONNX graph.

Finding the layer outputs in the graph: the exporter names tensors after torch ops, not layers, and
precision recipes insert Casts and Q/DQ nodes, so the ledger does not trust graph patterns. It
matches values instead: every Add and LayerNormalization output of the fp32 graph is exposed, run
on one image, and for each of PyTorch's hidden_states[i] (embeddings + one per layer) the tensor
of the same shape with the smallest relative error is taken, provided that error is below
MATCH_REL_L2. The fp16 and int8 recipes keep node output names, so the same names are read
from those graphs (a name a recipe removed is reported as missing, never guessed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.core.interface import INPUT_NAME
from export.core.metrics import compare, rel_l2

CANDIDATE_OPS = ("Add", "LayerNormalization")
MATCH_REL_L2 = 1e-4  # an fp32 graph reproduces PyTorch to ~1e-6


@dataclass
class LayerMap:
    names: list[str | None]  # graph tensor per hidden_states index (0: embeddings), None: not found
    match_rel_l2: list[float | None]

    def to_json(self) -> dict:
        return {"tensors": self.names, "match_rel_l2": self.match_rel_l2}


def reference_hidden_states(ckpt, pixels) -> list[np.ndarray]:
    """PyTorch's hidden_states: L + 1 arrays [B, S, C] (embeddings, then after each layer)."""
    import torch

    native = ckpt.image_size == tuple(pixels.shape[-2:])
    extra = {} if native else dict(ckpt.family.resize_kwargs)
    with torch.no_grad():
        out = ckpt.model(pixel_values=torch.as_tensor(pixels), output_hidden_states=True, **extra)
    return [h.numpy() for h in out.hidden_states]


def _candidates(model) -> list[str]:
    return [o for n in model.graph.node if n.op_type in CANDIDATE_OPS for o in n.output[:1] if o]


def _run_exposed(path: Path, names: list[str], pixels: np.ndarray, mode: str = "exact") -> dict[str, np.ndarray]:
    """Run `path` with `names` added as graph outputs; {name: value} for those the graph has."""
    import onnx

    from export.runners.ort import OnnxRuntimeRunner

    model = onnx.load(str(path), load_external_data=False)
    produced = {o for n in model.graph.node for o in n.output}
    present = list(dict.fromkeys(n for n in names if n in produced))
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in present if n not in existing)
    probe = Path(path).with_name(f".layers-probe-{Path(path).stem}.onnx")  # sibling: external data resolves
    try:
        onnx.save(model, str(probe))
        with OnnxRuntimeRunner(probe, mode, output_names=present) as runner:
            values = runner.infer({INPUT_NAME: np.ascontiguousarray(pixels, np.float32)})
    finally:
        probe.unlink(missing_ok=True)
    return {n: v.astype(np.float32) for n, v in values.items()}


def locate_layers(fp32_path: Path, reference: list[np.ndarray], pixels: np.ndarray) -> LayerMap:
    """Find hidden_states[i] in the fp32 graph at `fp32_path` by value (see the module docstring)."""
    import onnx

    model = onnx.load(str(fp32_path), load_external_data=False)
    values = _run_exposed(fp32_path, _candidates(model), pixels, mode="exact")
    names, errors = [], []
    for ref in reference:  # (B, S, C) each
        best, best_err = None, None
        for name, value in values.items():  # graph order: the first of equal matches wins
            if value.shape != ref.shape:
                continue
            err = rel_l2(ref, value)
            if best_err is None or err < best_err:
                best, best_err = name, err
        ok = best_err is not None and best_err <= MATCH_REL_L2
        names.append(best if ok else None)
        errors.append(best_err)
    return LayerMap(names, errors)


def layer_divergence(path: Path, layer_map: LayerMap, reference: list[np.ndarray], pixels: np.ndarray,
                     mode: str = "exact") -> list[dict]:
    """Per hidden_states index: {"layer", "tensor", "rel_l2", "min_cosine", "max_abs"} (None when missing)."""
    wanted = [n for n in layer_map.names if n]
    values = _run_exposed(path, wanted, pixels, mode=mode)
    rows = []
    for i, (name, ref) in enumerate(zip(layer_map.names, reference)):
        row: dict = {"layer": i, "tensor": name, "rel_l2": None, "min_cosine": None, "max_abs": None}
        if name in values and values[name].shape == ref.shape:
            m = compare(ref, values[name])
            row.update(rel_l2=rel_l2(ref, values[name]), min_cosine=m["min_cosine"], max_abs=m["max_abs"])
        rows.append(row)
    return rows
