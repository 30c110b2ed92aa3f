"""The zoo matrix: every model x precision through `python -m export.build_engine`, at full size.

    .venv/bin/python scripts/zoo_matrix.py                                  # 4 models x fp32/fp16/int8/fp8
    .venv/bin/python scripts/zoo_matrix.py --models rice-l-560 --precisions fp16 int8
    .venv/bin/python scripts/zoo_matrix.py --report docs/zoo_matrix          # -> .md and .json
    .venv/bin/python scripts/zoo_matrix.py --models unicom-l-14-336 --precisions fp32 --append

Each cell is one build in its own process, under `/usr/bin/time -v` (peak RSS of the whole process),
with --random-weights (the real architectures, no download) and --runtime none (the ONNX side; engine
builds are a GPU matter). The table: time per step (from manifest.json), peak RSS against the fp32
weight bytes and against the model's own fp32 row, parity worst values and PASSED/FAILED, artifact
sizes, written after every cell. Cells run one after another: they are memory-bound on a 24 GiB
machine. Not part of the test suite (MLCD-bigG alone takes tens of minutes on 2 cores).
Exit status: 0 when every cell PASSED within the memory bound, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from export.core.manifest import Manifest

from export.core.cli import EXIT_FAILED, EXIT_OK, run_cli

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("mlcd-b-32", "mlcd-l-336", "rice-l-560", "mlcd-bigg-448")
PRECISIONS = ("fp32", "fp16", "int8", "fp8")
# The bounds: bigG's peak RSS at most 2.5x its fp32 weight bytes, and no precision more than
# 25% above the same model's fp32 export.
WEIGHT_FACTOR_BOUND = {"mlcd-bigg-448": 2.5}
PRECISION_OVER_FP32_BOUND = 1.25


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/zoo_matrix.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), help=f"zoo aliases (default: {' '.join(MODELS)})")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--work", type=Path, default=Path("artifacts/zoo"), help="where builds go (default: artifacts/zoo)")
    p.add_argument("--report", type=Path, default=Path("docs/zoo_matrix"),
                   help="report path without suffix: writes .md and .json (default: docs/zoo_matrix)")
    p.add_argument("--calib-count", type=int, help="passed to build_engine (default: its default)")
    p.add_argument("--keep", action="store_true", help="keep each build's folder (bigG fp32 is 7.4 GB)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per cell (default: 3600)")
    p.add_argument("--append", action="store_true",
                   help="merge into the existing report: these cells replace the same model x precision there")
    return p.parse_args(argv)


def run_cell(model: str, precision: str, args) -> dict:
    out = args.work / f"{model}-{precision}"
    cmd = [sys.executable, "-m", "export.build_engine", "--model", model, "--random-weights",
           "--precision", precision, "--out", str(out), "--force", "--runtime", "none"]
    if args.calib_count:
        cmd += ["--calib-count", str(args.calib_count)]
    log = args.work / f"{model}-{precision}.log"
    print(f"== {model} {precision}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=args.timeout)
            code: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = time.perf_counter() - start
    text = log.read_text(errors="replace")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    cell: dict = {"model": model, "precision": precision, "exit": code, "seconds": round(seconds, 1),
            "peak_rss_gib": round(int(rss.group(1)) / 1024**2, 2) if rss else None, "log": str(log)}
    from export.core.folder import MANIFEST_NAME
    from export.core.manifest import read_manifest

    if code == 0 or (out / MANIFEST_NAME).exists():
        manifest = read_manifest(out)
        cell.update({
            "steps_s": manifest.timings_s,
            "parity_passed": manifest.parity_passed,
            "parity_worst": manifest.parity_worst,
            "pooled_output": manifest.pooled_output,
            "onnx_checker": manifest.onnx_checker,
            "artifact_bytes": {name: record.size for name, record in manifest.artifacts.items()},
            "calibration": manifest.precision_recipe.get("calibration"),
            "smoothing": _smoothing_summary(manifest),
        })
    else:
        cell["error"] = "\n".join(text.strip().splitlines()[-5:])
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    print(f"   exit {code}, {seconds:.0f} s, peak RSS {cell['peak_rss_gib']} GiB, "
          f"parity {'PASSED' if cell.get('parity_passed') else 'FAILED'}", flush=True)
    return cell


def _smoothing_summary(manifest: Manifest):
    smoothing = manifest.precision_recipe.get("smoothing")
    if not isinstance(smoothing, dict):
        return None
    return {k: v for k, v in smoothing.items() if not isinstance(v, (list, dict))}


def fp32_weight_bytes(model: str) -> int:
    """Parameter bytes of the architecture in fp32, from a meta-device build (shapes only, no memory)."""
    import torch

    from export.models.loading import load_checkpoint

    with torch.device("meta"):
        ckpt = load_checkpoint(model, random_weights=True)
    return 4 * sum(p.numel() for p in ckpt.model.parameters())


def judge(cells: list[dict], weights: dict[str, int]) -> None:
    """Add `within_bounds` and the ratios to every cell."""
    fp32 = {c["model"]: c["peak_rss_gib"] for c in cells if c["precision"] == "fp32" and c["peak_rss_gib"]}
    for c in cells:
        rss = c["peak_rss_gib"]
        w = weights.get(c["model"])
        c["rss_over_weights"] = round(rss * 1024**3 / w, 2) if rss and w else None
        c["rss_over_fp32"] = round(rss / fp32[c["model"]], 2) if rss and c["model"] in fp32 else None
        bound = WEIGHT_FACTOR_BOUND.get(c["model"])
        ok = c["exit"] == 0 and bool(c.get("parity_passed"))
        if bound and c["rss_over_weights"] is not None:
            ok &= c["rss_over_weights"] <= bound
        if c["rss_over_fp32"] is not None:
            ok &= c["rss_over_fp32"] <= PRECISION_OVER_FP32_BOUND
        c["within_bounds"] = ok


def markdown(cells: list[dict], weights: dict[str, int], meta: dict) -> str:
    from export.core.folder import ONNX_NAME

    lines = [f"# Zoo matrix ({meta['date']})", "",
             f"`python scripts/zoo_matrix.py` on {meta['machine']}; `--random-weights --runtime none`, "
             f"calibration {meta['calib_count']} images; peak RSS from `/usr/bin/time -v`.", "",
             "| model | precision | result | total | load | trace | reference | precision step | parity | "
             "peak RSS | / fp32 weights | / own fp32 | worst pooled cosine | model.onnx(+data) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        steps = c.get("steps_s", {})

        def step(prefix: str) -> str:
            v = next((v for k, v in steps.items() if k.startswith(prefix)), None)
            return "-" if v is None else f"{v:.0f} s"

        worst = (c.get("parity_worst") or {}).get(c.get("pooled_output") or "pooler_output", {}).get("min_cosine")
        size = sum(v for k, v in (c.get("artifact_bytes") or {}).items() if k.startswith(ONNX_NAME))
        if c.get("within_bounds"):
            result = "PASSED"
        elif c["exit"] == 0 and c.get("parity_passed"):
            result = "parity PASSED, memory over bound"
        else:
            ran_parity = c.get("parity_passed") is not None  # an exit 1 without a manifest is a crash
            result = ("parity FAILED" if c["exit"] in (0, 1) and ran_parity
                      else "failed (exit 1, see its log)" if c["exit"] == 1
                      else f"did not finish (exit {c['exit']})")
        lines.append(
            f"| {c['model']} | {c['precision']} | {result} | {c['seconds']:.0f} s | {step('Loading')} | "
            f"{step('Tracing')} | {step('Running the PyTorch')} | {step('Applying')} | {step('Checking parity')} | "
            f"{c['peak_rss_gib']} GiB | {c.get('rss_over_weights')} | {c.get('rss_over_fp32')} | "
            f"{'-' if worst is None else f'{worst:.6f}'} | {size / 1e9:.2f} GB |")
    lines += ["", "fp32 weight bytes: " + ", ".join(f"{m} {w / 1e9:.2f} GB" for m, w in weights.items()),
              f"Bounds: bigG peak RSS <= {WEIGHT_FACTOR_BOUND['mlcd-bigg-448']} x fp32 weights; every precision "
              f"<= {PRECISION_OVER_FP32_BOUND} x the model's fp32 peak.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    weights = {m: fp32_weight_bytes(m) for m in args.models}
    report_json = args.report.with_suffix(".json")
    old = json.loads(report_json.read_text()) if args.append and report_json.exists() else None
    cells: list[dict] = []
    for m in args.models:
        for p in args.precisions:
            cells.append(run_cell(m, p, args))
            # after every cell: a matrix of hours keeps what it measured when a later cell is stopped
            merged = write_report(args, old, weights, cells)
    return EXIT_OK if all(c["within_bounds"] for c in merged) else EXIT_FAILED


def write_report(args, old: dict | None, weights: dict, cells: list[dict]) -> list[dict]:
    """Judge `cells` (merged into the `old` report: these cells replace the same model x precision) and
    write the Markdown and JSON report; returns the merged cells."""
    if old is not None:
        new = {(c["model"], c["precision"]) for c in cells}
        weights = {**old["weights"], **weights}
        cells = [c for c in old["cells"] if (c["model"], c["precision"]) not in new] + cells
        from export.models.zoo import ZOO

        models = list(MODELS) + [e.alias for e in ZOO if e.alias not in MODELS]  # the four first
        order = {(m, p): i for i, (m, p) in enumerate((m, p) for m in models for p in PRECISIONS)}
        cells.sort(key=lambda c: order.get((c["model"], c["precision"]), len(order)))
    judge(cells, weights)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {_cores()} cores, {_mem_gib()} GiB",
            "calib_count": args.calib_count or "default"}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.with_suffix(".json").write_text(json.dumps({"meta": meta, "weights": weights, "cells": cells},
                                                           indent=2) + "\n")
    md = args.report.with_suffix(".md")
    md.write_text(markdown(cells, weights, meta) + _notes(md))
    print(f"wrote {args.report.with_suffix('.md')} and .json")
    return cells


NOTES_HEADING = "## Notes"  # from this heading on, the Markdown report is hand-written and kept


def _notes(md: Path) -> str:
    """The hand-written notes of the existing report (its NOTES_HEADING section), to carry over."""
    text = md.read_text() if md.exists() else ""
    at = text.find("\n" + NOTES_HEADING)
    return "" if at < 0 else "\n" + text[at + 1:]


def _cores() -> int:
    import os

    return os.cpu_count() or 0


def _mem_gib() -> int:
    try:
        kb = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")))
        return round(kb / 1024**2)
    except (OSError, StopIteration):
        return 0


if __name__ == "__main__":
    run_cli(main)
