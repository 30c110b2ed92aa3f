"""Throughput and latency against batch size: PyTorch eager, onnxruntime (every RoPE lowering; fp32,
fp16, int8) and TensorRT (where present), on the same inputs in one run, with ratios to PyTorch.

    .venv/bin/python scripts/benchmark.py                     # the demo model (hidden 384, 6 layers, 224 px)
    .venv/bin/python scripts/benchmark.py --short             # CI: batch 1 and 2, 2 repeats
    .venv/bin/python scripts/benchmark.py --model PATH --batch-sizes 1 4 16 --repeats 20

Backends:
    torch-eager          transformers model, attn_implementation "sdpa", fp32, torch.no_grad
    ort-fp32-<lowering>  the canonical graph in each RoPE lowering (plugin: TensorRT only, skipped)
    ort-fp16             the fp16 recipe (fp16 compute, fp32 islands)
    ort-int8             the int8 recipe as deployed to TensorRT: Q/DQ on linear layers, fp16 elsewhere
    ort-int8-cpu         the int8 recipe with --quant-target cpu: uint8 activations, fp32 elsewhere
    tensorrt             the fp32 graph's engine where TensorRT and a GPU exist, its RoPE lowered as the export
                         lowers it for that TensorRT (`--rope auto`: onnx23 from 10.15, the AOT plugin 10.9-10.14,
                         decomposed below); timed on device buffers with CUDA events, the host<->device copies
                         reported apart (export/runners/trt_timing.py)

onnxruntime runs with its default (full) optimizations, as a CPU deployment would. Timing: every
backend is warmed up, then the repeats are interleaved (backend A, B, C, A, B, C, ...) so that load
from other processes spreads over all backends alike; the median is reported. Accuracy: the pooled
embeddings' (UNICOM: `embedding`) and tokens' minimum cosine against PyTorch at the largest batch size.

FLOPs per image (2 FLOPs per multiply-add; LayerNorm, softmax, activations and RoPE left out, < 1%):
    patch embedding   2 * N * (3 * p^2) * C                        N = (H/p) * (W/p) patches
    per layer         2 * (4 * S * C^2  +  2 * S * C * I  +  2 * S^2 * C)
                           q,k,v,out        MLP fc1, fc2     QK^T and AV        S = N + 1 tokens
    UNICOM head       2 * N * C^2  +  2 * C * E                    S = N (no class token)
    (RICE-ViT-L-14-560: 1,221 GFLOPs; UNICOM ViT-L/14@336: 382; the demo model at 224 px: 6.2 GFLOPs)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from export.core.cli import EXIT_OK, command, fail, run_cli
from export.core.gpus import gpu_peaks
from export.models.flops import flops_per_image

SHORT: dict[str, Any] = {"batch_sizes": [1, 2], "repeats": 2, "warmup": 1}
DEFAULT_BATCH_SIZES = [1, 2, 4, 8]
GOALS = {"ort-fp32": 1.5, "ort-int8": 2.5, "pooled_cosine": 0.99}  # the goals (mid-size model, batch 4)
TENSORRT = "tensorrt"  # the TensorRT row's backend name


def gpu_peak(name: str | None) -> float | None:
    """Dense fp16 tensor-core FLOP/s of the GPU named exactly `name` (export.core.gpus), for the "fraction of
    peak" figure; None when unknown."""
    peaks = gpu_peaks(name)
    return None if peaks is None else peaks.fp16_tflops * 1e12


# ---------------------------------------------------------------------------------------------- backends

def bench_outputs(family) -> tuple[str, str]:
    """(pooled output, token output) of a family: what the benchmark runs and compares."""
    return family.pooled_output, "last_hidden_state"


def torch_backend(ckpt, threads: int):
    """The transformers model with attn_implementation "sdpa" (PyTorch's fastest eager attention)."""
    import torch

    from export.runners.pyt import TorchRunner

    torch.set_num_threads(threads)
    ckpt.model.set_attn_implementation("sdpa")
    return TorchRunner(ckpt, output_names=bench_outputs(ckpt.family))


def ort_backend(path: Path, threads: int, outputs: tuple[str, ...]):
    from export.runners.ort import OnnxRuntimeRunner

    # No spin-waiting between runs: with runs interleaved across backends, idle spinning threads of one
    # session would steal the cores the next backend (PyTorch included) is timed on.
    return OnnxRuntimeRunner(path, "optimized", output_names=outputs, threads=threads, allow_spinning=False)


def tensorrt_lowering(rope_runtime: tuple[str, str] | None, has_rope: bool) -> str:
    """The RoPE lowering of the benchmark's TensorRT graph: the export's rule for that (runtime, version)
    (export.graph.lowering.resolve_rope("auto", ...): onnx23 from TensorRT 10.15 and on TensorRT-RTX, the AOT
    plugin on 10.9-10.14, decomposed below), "none" for a model without RoPE."""
    from export.graph.lowering import resolve_rope

    return resolve_rope("auto", rope_runtime) if has_rope else "none"


def tensorrt_backend(canonical: Path, has_rope: bool, work: Path, size, patch: int, max_batch: int, log,
                     outputs: tuple[str, ...]):
    """Build an engine for the fp32 canonical graph, lowered for this TensorRT; return (runner, facts: gpu,
    TensorRT version, RoPE lowering). Raises when it cannot run."""
    from export import engine as engines
    from export.core.interface import INPUT_NAME
    from export.runners.trt import TensorRTRunner
    from export.variants import lowered_graph

    target = engines.probe("tensorrt")
    if target.skip_reason:
        raise RuntimeError(target.skip_reason)
    lowering = tensorrt_lowering(target.rope_runtime, has_rope)
    folder = work / TENSORRT
    folder.mkdir(parents=True, exist_ok=True)
    graph = canonical if lowering == "none" else lowered_graph(canonical, lowering, folder / engines.ENGINE_ONNX_NAME)
    plan = folder / engines.PLAN_NAME
    log(f"      building the TensorRT {target.version} engine (RoPE: {lowering}) ...")
    shapes = engines.profiles(INPUT_NAME, tuple(size), False, patch, max_batch)
    engines.build_engine(target, graph, plan, shapes, timing_cache=engines.default_timing_cache(target))
    from export.runners.trt_timing import TIMING

    facts = {"gpu": target.gpu, "version": target.version, "rope_lowering": lowering, "timing": TIMING}
    return TensorRTRunner(plan, target.runtime, outputs), facts


def canonical_path(work: Path) -> Path:
    from export.core.folder import ONNX_NAME

    return work / "canonical" / ONNX_NAME


def prepare_graphs(ckpt, work: Path, log) -> tuple[dict[str, Path], dict[str, str]]:
    """{backend: model.onnx} for every onnxruntime backend, and {backend: skip reason}; the traced graph itself
    is at canonical_path(work)."""
    from export.core.folder import ONNX_NAME
    from export.graph.lowering import LOWERINGS
    from export.graph.trace import ExportShape, export_canonical
    from export.variants import lowered_graph, precision_graph

    h, w = ckpt.image_size
    shape = ExportShape(h, w)
    canonical = canonical_path(work)
    canonical.parent.mkdir(parents=True, exist_ok=True)
    log(f"      tracing {h}x{w} ...")
    export_canonical(ckpt, shape, canonical)
    graphs, skipped = {}, {}
    for lowering in (LOWERINGS if ckpt.family.has_rope else ("none",)):
        if lowering == "plugin":
            skipped["ort-fp32-plugin"] = "the plugin lowering runs only in TensorRT (onnxruntime would run the " \
                                         "same reference body as ort-fp32-custom)"
            continue
        name = f"ort-fp32-{lowering}"
        graphs[name] = canonical if lowering == "none" else lowered_graph(canonical, lowering,
                                                                          work / name / ONNX_NAME)
    for precision in ("fp16", "int8"):
        log(f"      applying the {precision} recipe ...")
        precision_graph(ckpt, shape, canonical, precision, work / f"ort-{precision}" / ONNX_NAME)
        graphs[f"ort-{precision}"] = work / f"ort-{precision}" / ONNX_NAME
    log("      int8 for CPUs (--quant-target cpu: uint8 activations, fp32 elsewhere) ...")
    dst = work / "ort-int8-cpu" / ONNX_NAME
    precision_graph(ckpt, shape, canonical, "int8", dst, quant_target="cpu")
    graphs["ort-int8-cpu"] = dst
    return graphs, skipped


# ---------------------------------------------------------------------------------------------- benchmark

def benchmark(model: str | None, batch_sizes: list[int], repeats: int, warmup: int, threads: int, work: Path,
              random_weights: bool = False, backends: list[str] | None = None, tensorrt: bool = True,
              log=print) -> dict:
    from tqdm.auto import tqdm

    from export.check.parity import _first_line
    from export.core.images import held_out_photos, pixel_values
    from export.core.interface import INPUT_NAME
    from export.models.loading import load_checkpoint

    log(f"[1/4] Loading {model or 'the demo model'} ...")
    ckpt = load_checkpoint(model, random_weights=random_weights)
    h, w = ckpt.image_size
    log("[2/4] Making the graphs ...")
    graphs, skipped = prepare_graphs(ckpt, work, log)
    runners = {"torch-eager": torch_backend(ckpt, threads)}
    for name, path in graphs.items():
        runners[name] = ort_backend(path, threads, bench_outputs(ckpt.family))
    gpu: dict = {}
    trt_facts: dict | None = None
    device_timer = None
    if tensorrt and (not backends or TENSORRT in backends):
        try:
            trt_runner, trt_facts = tensorrt_backend(canonical_path(work), ckpt.family.has_rope, work, (h, w),
                                                     ckpt.patch_size, max(batch_sizes), log,
                                                     bench_outputs(ckpt.family))
            gpu = trt_facts["gpu"]
            runners[TENSORRT] = trt_runner.activate()  # now: an engine that cannot run is a reason too
            from export.runners.trt_timing import DeviceTimer

            device_timer = DeviceTimer(trt_runner)
        except Exception as exc:  # no TensorRT / no GPU: a reason, not a crash
            skipped[TENSORRT] = f"{type(exc).__name__}: {_first_line(exc)}"
    else:
        skipped[TENSORRT] = "not requested (--no-tensorrt or --backends)"
    if backends:
        runners = {k: v for k, v in runners.items() if k == "torch-eager" or k in backends}

    photos = [p.image for p in held_out_photos()]
    pool = pixel_values(ckpt.processor, photos, (h, w)).numpy()  # (28, 3, H, W)
    inputs = {b: np.ascontiguousarray(pool[np.arange(b) % len(pool)]) for b in batch_sizes}  # (b, 3, H, W)

    log(f"[3/4] Timing {len(runners)} backends x batch {batch_sizes}: {warmup} warm-up, {repeats} repeats, "
        f"{threads} threads ...")
    flops = flops_per_image(ckpt.config, h, w)
    pooled, tokens = bench_outputs(ckpt.family)
    peak = gpu_peak(gpu.get("name"))
    results = []
    accuracy = {}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with contextlib.ExitStack() as active:  # every runner is deactivated at the end, whatever happens
        for runner in runners.values():
            active.enter_context(runner)
        for b in tqdm(batch_sizes, desc="      batch sizes"):
            feed = {INPUT_NAME: inputs[b]}
            outputs = {}
            for name, runner in runners.items():
                for _ in range(warmup):
                    outputs[name] = runner.infer(feed)
            if device_timer is not None:  # the engine on device buffers, for this batch's shapes
                try:
                    device_timer.prepare(feed)
                    for _ in range(warmup):
                        device_timer.measure()
                except Exception as exc:  # the row falls back to the host clock around infer, and says why
                    assert trt_facts is not None
                    trt_facts["timing"] = (f"host clock around TensorRTRunner.infer, copies included (device timing "
                                           f"failed: {type(exc).__name__}: {_first_line(exc)})")
                    device_timer = None
            times: dict[str, list[float]] = {name: [] for name in runners}
            host_seconds: list[float] = []  # TensorRTRunner.infer by the host clock: numpy in, numpy out
            device_samples = []
            for _ in range(repeats):
                for name, runner in runners.items():  # interleaved: contention hits every backend alike
                    start = time.perf_counter()
                    result = runner.infer(feed)
                    elapsed = time.perf_counter() - start
                    outputs[name] = result
                    if name == TENSORRT and device_timer is not None:
                        host_seconds.append(elapsed)
                        sample = device_timer.measure()  # the row's time: the engine alone
                        device_samples.append(sample)
                        elapsed = sample.compute_ms / 1e3
                    times[name].append(elapsed)
            ref = outputs["torch-eager"]
            base = statistics.median(times["torch-eager"])
            for name in runners:
                med = statistics.median(times[name])
                row = {"backend": name, "batch": b, "median_ms": round(med * 1e3, 3),
                       "min_ms": round(min(times[name]) * 1e3, 3), "images_per_s": round(b / med, 2),
                       "speedup_vs_torch": round(base / med, 3),
                       "pooled_min_cosine": _min_cosine(ref[pooled], outputs[name][pooled]),
                       "tokens_min_cosine": _min_cosine(ref[tokens], outputs[name][tokens])}
                row["tflops_achieved"] = round(flops["total"] * row["images_per_s"] / 1e12, 4)
                row["fraction_of_gpu_peak"] = round(flops["total"] * row["images_per_s"] / peak, 4) \
                    if (peak and name == TENSORRT) else None
                if name == TENSORRT and device_timer is not None and device_samples:
                    from export.runners.trt_timing import summarize

                    row["device_timing"] = summarize(device_samples, host_seconds)
                    # the device-buffer run computed what infer did: a wrong binding would show here
                    row["device_timing"]["max_abs_vs_infer"] = float(np.abs(
                        device_timer.outputs()[pooled] - outputs[name][pooled]).max())
                results.append(row)
            accuracy = {r["backend"]: r["pooled_min_cosine"] for r in results if r["batch"] == b}
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "model": {"source": ckpt.source, "family": ckpt.family.name, "hidden_size": ckpt.config.hidden_size,
                  "num_hidden_layers": ckpt.config.num_hidden_layers,
                  "num_attention_heads": ckpt.config.num_attention_heads, "image_size": [h, w],
                  "random_weights": ckpt.random_weights},
        "flops_per_image": flops,
        "settings": {"batch_sizes": batch_sizes, "repeats": repeats, "warmup": warmup, "threads": threads,
                     "statistic": "median of repeats after warm-up, repeats interleaved across backends",
                     "cpu_count": os.cpu_count(), "load_average_before": load_before,
                     "load_average_after": load_after},
        "gpu": gpu or None,
        "tensorrt": None if trt_facts is None else {"version": trt_facts["version"],
                                                    "rope_lowering": trt_facts["rope_lowering"],
                                                    "timing": trt_facts["timing"]},
        "gpu_peak_flops": peak,
        "fraction_of_gpu_peak": "per TensorRT row" if peak else "not measured: no GPU here",
        "skipped": skipped,
        "results": results,
        "pooled_min_cosine_at_largest_batch": accuracy,
        "goals": goals(results),
        "versions": _versions(),
    }


def goals(results: list[dict]) -> dict:
    """The issue's goals at batch 4 (or the largest batch measured below it), as measured."""
    batches = sorted({r["batch"] for r in results})
    batch = 4 if 4 in batches else batches[-1]
    at = {r["backend"]: r for r in results if r["batch"] == batch}
    out = {"batch": batch}
    for backend, goal in (("ort-fp32-custom", GOALS["ort-fp32"]), ("ort-fp32-onnx23", GOALS["ort-fp32"]),
                          ("ort-int8", GOALS["ort-int8"]), ("ort-int8-cpu", GOALS["ort-int8"])):
        if backend in at:
            r = at[backend]
            met = r["speedup_vs_torch"] >= goal and (goal < 2 or r["pooled_min_cosine"] >= GOALS["pooled_cosine"])
            out[backend] = {"speedup": r["speedup_vs_torch"], "goal": goal, "pooled_min_cosine": r["pooled_min_cosine"],
                            "met": bool(met)}
    return out


def _min_cosine(reference: np.ndarray, actual: np.ndarray) -> float:
    from export.core.metrics import row_cosines

    return round(float(row_cosines(reference, actual).min()), 6)


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "tensorrt"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def table(report: dict) -> str:
    """Markdown: one row per backend, one column group per batch size (images/s, x torch, cosine)."""
    batches = report["settings"]["batch_sizes"]
    backends = list(dict.fromkeys(r["backend"] for r in report["results"]))
    head = "| backend | " + " | ".join(f"b={b} img/s (ms) | x torch" for b in batches) + " | pooled cos |"
    lines = [head, "|---|" + "---|---|" * len(batches) + "---|"]
    for name in backends:
        cells = []
        for b in batches:
            r = next(r for r in report["results"] if r["backend"] == name and r["batch"] == b)
            cells.append(f"{r['images_per_s']:.1f} ({r['median_ms']:.1f}) | {r['speedup_vs_torch']:.2f}x")
        cos = report["pooled_min_cosine_at_largest_batch"].get(name)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {cos:.6f} |")
    for name, reason in report["skipped"].items():
        lines.append(f"| {name} | skipped: {reason} |")
    transfers = tensorrt_table(report)
    return "\n".join(lines) + (f"\n\n{transfers}" if transfers else "")


def tensorrt_table(report: dict) -> str:
    """Markdown: the TensorRT row's engine time beside the host<->device copies it leaves out, per batch size;
    empty when no engine was timed."""
    rows = [r for r in report["results"] if r["backend"] == TENSORRT and r.get("device_timing")]
    if not rows:
        return ""
    facts = report.get("tensorrt") or {}
    lines = [f"{TENSORRT} (TensorRT {facts.get('version')}, RoPE {facts.get('rope_lowering')}): "
             f"{facts.get('timing') or 'engine on device buffers'}",
             "",
             "| batch | engine ms | H2D ms (MB, GB/s) | D2H ms (MB, GB/s) | copies / (engine + copies) | "
             "infer from numpy, ms |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        t = r["device_timing"]
        share = "" if t["transfer_share"] is None else f"{100 * t['transfer_share']:.0f}%"
        host = "" if t["host_ms"] is None else f"{t['host_ms']:.2f}"
        lines.append(f"| {r['batch']} | {t['engine_ms']:.2f} | {t['h2d_ms']:.2f} ({t['h2d_MB']:.1f}, "
                     f"{t['h2d_GBps'] or 0:.1f}) | {t['d2h_ms']:.2f} ({t['d2h_MB']:.1f}, {t['d2h_GBps'] or 0:.1f}) | "
                     f"{share} | {host} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="demo (default), a checkpoint folder, a hub id or a zoo alias")
    p.add_argument("--random-weights", action="store_true", help="a zoo alias's architecture with random weights")
    p.add_argument("--batch-sizes", type=int, nargs="+", help=f"default {DEFAULT_BATCH_SIZES}")
    p.add_argument("--repeats", type=int, help="timed runs per backend and batch size (default 10)")
    p.add_argument("--warmup", type=int, help="untimed runs first (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads (default: all cores)")
    p.add_argument("--short", action="store_true", help=f"CI mode: {SHORT} unless given")
    p.add_argument("--backends", nargs="+", help="only these backends (torch-eager always runs: it is the baseline)")
    p.add_argument("--no-tensorrt", action="store_true", help="do not try TensorRT")
    p.add_argument("--out", type=Path, help="folder for benchmark.json and benchmark.png (default artifacts/benchmark)")
    p.add_argument("--work", type=Path, help="folder for the graphs (default: a temporary folder)")
    p.add_argument("--no-plot", action="store_true", help="skip benchmark.png (no matplotlib needed)")
    return p


@command()
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    batch_sizes = args.batch_sizes or (SHORT["batch_sizes"] if args.short else DEFAULT_BATCH_SIZES)
    repeats = args.repeats or (SHORT["repeats"] if args.short else 10)
    warmup = args.warmup if args.warmup is not None else (SHORT["warmup"] if args.short else 3)
    if min(batch_sizes) < 1 or repeats < 1 or warmup < 0:
        return fail("--batch-sizes and --repeats must be >= 1, --warmup >= 0")
    model = None if args.model == "demo" else args.model
    out = args.out or Path("artifacts") / "benchmark"
    with tempfile.TemporaryDirectory(prefix="mvt-bench-") as tmp:  # an MvtError: exit 2 (command())
        work = args.work or Path(tmp)
        report = benchmark(model, sorted(set(batch_sizes)), repeats, warmup, args.threads, work,
                           random_weights=args.random_weights, backends=args.backends,
                           tensorrt=not args.no_tensorrt)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(report, indent=1) + "\n")
    files = [out / "benchmark.json"]
    (out / "benchmark.md").write_text(table(report) + "\n")
    files.append(out / "benchmark.md")
    if not args.no_plot:
        from export.check.plots import plot_benchmark

        m = report["model"]
        title = (f"{m['source']} ({m['hidden_size']} wide, {m['num_hidden_layers']} layers, "
                 f"{m['image_size'][0]} px, {report['flops_per_image']['gflops']} GFLOPs/image), "
                 f"{report['settings']['threads']} threads")
        files.append(plot_benchmark(report["results"], out / "benchmark.png", title))
    print("[4/4] Results")
    print(table(report))
    print(f"FLOPs per image: {report['flops_per_image']['gflops']} G ({report['flops_per_image']['formula']})")
    for backend, goal in report["goals"].items():
        if isinstance(goal, dict):
            print(f"goal at batch {report['goals']['batch']}: {backend} {goal['speedup']:.2f}x >= {goal['goal']}x"
                  f"{' with pooled cosine >= 0.99' if goal['goal'] > 2 else ''}: {'met' if goal['met'] else 'NOT met'}")
    print(f"wrote {', '.join(str(f) for f in files)}")
    return EXIT_OK


if __name__ == "__main__":
    run_cli(main)
