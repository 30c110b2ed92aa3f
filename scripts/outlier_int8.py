"""int8 (or fp8) on activation-outlier models: held-out pooled/token cosines and layers kept in float, per model.

    .venv/bin/python scripts/outlier_int8.py                          # every model in MODELS, this checkout
    .venv/bin/python scripts/outlier_int8.py --code-root ../old-checkout --label "before"   # another recipe
    .venv/bin/python scripts/outlier_int8.py --models rope-g80-c2-l3 --markdown out.md

Each model is a tiny checkpoint with the trained-ViT pattern (export.models.testing.save_outlier_checkpoint:
a few LayerNorm channels with a large gain, optionally a bias), exported with
`python -m export.build_engine --precision int8 --runtime none` from `--code-root` (a checkout of this project:
compare recipes on the same models), then judged here, by this checkout, on every held-out view
(export.core.images.held_out_photos) against PyTorch, with the Q/DQ graph run as TensorRT computes it
(onnxruntime "exact"). Not a test: the figures go to docs/precision.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from export.core.cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
SIZE = (56, 56)


@dataclass(frozen=True)
class OutlierModel:
    name: str
    family: str  # "mlcd-rope2d" or "clip-vision"
    gain: float
    channels: tuple[int, ...]
    layers: int | None = None  # None: the family's tiny depth (2)
    bias: float | None = None


MODELS = (
    OutlierModel("rope-g60-c2-l2 (project's)", "mlcd-rope2d", 60, (5, 70)),
    OutlierModel("clip-g60-c2-l2 (project's)", "clip-vision", 60, (5, 70)),
    OutlierModel("rope-g80-c2-l3", "mlcd-rope2d", 80, (5, 70), 3),
    OutlierModel("clip-g80-c2-l3", "clip-vision", 80, (5, 70), 3),
    OutlierModel("rope-g30-c3-l6", "mlcd-rope2d", 30, (11, 47, 90), 6),
    OutlierModel("clip-g100-c3-l3-bias", "clip-vision", 100, (11, 47, 90), 3, 4.0),
    OutlierModel("rope-g60-c3-l3-bias", "mlcd-rope2d", 60, (3, 50, 77), 3, -3.0),
    OutlierModel("clip-g40-c2-l6-bias", "clip-vision", 40, (20, 60), 6, 2.0),
)


def held_out(ckpt, onnx_path: Path) -> dict[str, float]:
    """Minimum cosine per output over every held-out view (Q/DQ as TensorRT computes it)."""
    from export.core.images import held_out_photos, pixel_values
    from export.core.interface import INPUT_NAME
    from export.core.metrics import compare
    from export.runners.ort import OnnxRuntimeRunner
    from export.runners.pyt import TorchRunner

    x = pixel_values(ckpt.processor, [p.image for p in held_out_photos()], SIZE).numpy()  # (49, 3, 56, 56)
    with TorchRunner(ckpt) as torch_runner, OnnxRuntimeRunner(onnx_path, "exact") as ort_runner:
        ref, act = torch_runner.infer({INPUT_NAME: x}), ort_runner.infer({INPUT_NAME: x})
    return {name: compare(ref[name], act[name])["min_cosine"] for name in ("pooler_output", "last_hidden_state")}


def measure(model: OutlierModel, code_root: Path, work: Path, precision: str = "int8") -> dict:
    from export.models.families import family_by_name
    from export.models.loading import load_folder
    from export.models.testing import save_outlier_checkpoint

    folder = save_outlier_checkpoint(family_by_name(model.family), work / "ckpt", gain=model.gain,
                                     channels=model.channels, layers=model.layers, bias=model.bias)
    out = work / precision
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "export.build_engine", "--model", str(folder), "--precision", precision,
                          "--runtime", "none", "--out", str(out), "--force"], env=env, cwd=code_root,
                         capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if not (out / "manifest.json").exists():
        raise RuntimeError(f"{model.name}: the build failed (exit {run.returncode}):\n"
                           f"{run.stdout[-2000:]}{run.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    recipe = manifest["precision_recipe"]
    fallback = recipe.get("fallback", {})
    cosines = held_out(load_folder(folder), out / "model.onnx")
    return {"model": model.name, "exit": run.returncode, "seconds": round(seconds, 1),
            "precision": precision, "quantized": recipe[precision]["quantized_nodes"],
            "kept": len(fallback.get("kept_out_of_low_precision", [])),
            "met_target": fallback.get("met_target", fallback.get("met")),  # "met" before issue 23
            "split": len(recipe.get("splitting", {}).get("split", [])),
            "smoothed": len(recipe["smoothing"]["smoothed"]),
            "pooled": cosines["pooler_output"], "tokens": cosines["last_hidden_state"]}


def markdown(rows: list[dict], label: str) -> str:
    lines = ["| model | recipe | held-out pooled | held-out tokens | layers in float | quarter | exit |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        quarter = "yes" if 4 * r["kept"] <= r["quantized"] else "no"
        lines.append(f"| {r['model']} | {label} | {r['pooled']:.4f} | {r['tokens']:.4f} "
                     f"| {r['kept']} of {r['quantized']} | {quarter} | {r['exit']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", help="names (the part before any space) from MODELS; default: all")
    p.add_argument("--code-root", type=Path, default=ROOT, help="the checkout whose recipe builds (default: this one)")
    p.add_argument("--label", default="this checkout", help="the recipe's name in the table")
    p.add_argument("--precision", default="int8", choices=("int8", "fp8"))
    p.add_argument("--markdown", type=Path, help="also write the table here")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    chosen = [m for m in MODELS if not args.models or m.name.split()[0] in args.models]
    rows = []
    for model in chosen:
        with tempfile.TemporaryDirectory(prefix="outlier-int8-") as tmp:
            rows.append(measure(model, args.code_root.resolve(), Path(tmp), args.precision))
        print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows, args.label)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
