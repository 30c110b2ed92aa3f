"""The attention forms side by side at the sizes users run: wall time, peak RSS and parity against PyTorch.

    .venv/bin/python scripts/benchmark_attention.py --artifacts artifacts/demo-dyn --sizes 336 560 1022 2044 \\
        --native-artifacts artifacts/rice-dyn --native-max-pixels 3240000 --markdown attention.md

One process tree: this process runs no model and loads no graph; each measurement is a child of it, so that
each peak RSS (the child's VmHWM in /proc) is that run's alone:

    torch  the PyTorch reference (the checkpoint the manifest names; its sdpa attention), once per case: it
           writes the case's pixels and tokens
    interleaved  with --repeats N > 1 and every form fitting: all forms' sessions in one child, runs
           interleaved, the median of each and its ratio to the first form (the timing comparison)
    ort    one attention form of the export's model.onnx (export.graph.attention: decomposed, the traced
           MatMul/Softmax/MatMul of exports before --attention; mha, model.onnx's form now) in onnxruntime,
           optimizations on, as the CLIs run it (export.runners.ort.OnnxRuntimeRunner, memory check on): one
           run after session creation; with --repeats N > 1, the median of N runs after a warm-up one

Cases: `--sizes S ...` square images of side S from --artifacts (a --dynamic-resolution export), and with
--native-artifacts one image resized as `--preprocess native` serves it within --native-max-pixels. A form
whose estimate does not fit is reported as refused, with the estimate (what the CLIs would say).
Parity: the minimum cosine over tokens of the form's output against PyTorch's.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from export.core.cli import EXIT_OK, add_artifacts, command, run_cli

FORMS = ("decomposed", "mha")
OUTPUT = "last_hidden_state"


def _status_mib(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process from /proc/self/status, in MiB. Not ru_maxrss: Linux carries
    that across fork and exec, so a child would report its parent's peak at the fork (VmHWM starts afresh
    with the new address space of exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # not Linux: KiB on most


def _peak_mib() -> float:
    return _status_mib("VmHWM")


def child_torch(artifacts: Path, size: list[int] | None, native_max_pixels: int | None, work: Path) -> dict:
    """The PyTorch reference of one case: writes pixels.npy and torch.npy under `work`."""
    import numpy as np

    from export.core.images import pixel_values, sample_photos
    from export.core.interface import INPUT_NAME
    from export.core.manifest import read_manifest
    from export.graph.trace import ExportShape, export_shape
    from export.models.loading import reference_checkpoint
    from export.runners.pyt import TorchRunner

    manifest = read_manifest(artifacts)
    ckpt = reference_checkpoint(manifest)
    image = sample_photos(1)[0]
    if native_max_pixels:
        from triton_repo.modes import native_pixels

        # a photo larger than the budget, as the budget is for (the sample is 512 x 512): native mode then
        # shrinks it to the largest grid within the budget (1792 x 1792 at 3,240,000 pixels, patch 14)
        side = int((native_max_pixels * 1.3) ** 0.5)
        image = image.resize((side, side))

        pixels = native_pixels(ckpt.processor, image, ckpt.patch_size, native_max_pixels)  # (1, 3, h', w')
    else:
        assert size is not None  # a --sizes case
        pixels = pixel_values(ckpt.processor, [image], (size[0], size[1])).numpy()  # (1, 3, H, W)
    h, w = pixels.shape[2:]
    shape = export_shape(manifest)
    start = time.perf_counter()
    with TorchRunner(ckpt, ExportShape(h, w, shape.dynamic_resolution, shape.hidden_layer), [OUTPUT]) as runner:
        tokens = runner.infer({INPUT_NAME: pixels})[OUTPUT]  # (1, S, C)
    seconds = time.perf_counter() - start
    np.save(work / "pixels.npy", pixels)
    np.save(work / "torch.npy", tokens)
    return {"size": [int(h), int(w)], "tokens": int(tokens.shape[1]), "wall_s": round(seconds, 2),
            "peak_rss_mib": _peak_mib()}


def child_ort(graph: Path, work: Path, form: str, repeats: int, threads: int) -> dict:
    """One form in onnxruntime on the case's pixels: writes <form>.npy under `work`."""
    import numpy as np

    from export.core.errors import MemoryBudgetError
    from export.core.interface import INPUT_NAME
    from export.runners.ort import OnnxRuntimeRunner

    pixels = np.load(work / "pixels.npy")
    start = time.perf_counter()
    runner = OnnxRuntimeRunner(graph, "optimized", providers=["CPUExecutionProvider"], output_names=[OUTPUT],
                               threads=threads)
    with runner:
        load = time.perf_counter() - start
        session_mib = _status_mib("VmRSS")
        try:
            runner.check_memory({INPUT_NAME: pixels})  # the estimate, outside the timed runs
            times = []
            for _ in range(repeats + (1 if repeats > 1 else 0)):
                start = time.perf_counter()
                tokens = runner.infer({INPUT_NAME: pixels})[OUTPUT]
                times.append(time.perf_counter() - start)
        except MemoryBudgetError as exc:
            return {"refused": str(exc), "estimate_gib": round(runner.last_estimate.total / 1024**3, 2)}
    np.save(work / f"{form}.npy", tokens)
    estimate = runner.last_estimate
    return {"wall_s": round(statistics.median(times[1:] if repeats > 1 else times), 2), "session_s": round(load, 2),
            "session_rss_mib": session_mib,
            "peak_rss_mib": _peak_mib(), "estimate_gib": round(estimate.total / 1024**3, 2) if estimate else None}


def child_interleaved(graphs: list[Path], work: Path, repeats: int, threads: int) -> dict:
    """Every form's session in one process, runs interleaved (A, B, A, B, ...) after one warm-up each, so
    that load from other processes falls on all forms alike: the median seconds of each, by position."""
    import numpy as np

    from export.core.interface import INPUT_NAME
    from export.runners.ort import OnnxRuntimeRunner

    feed = {INPUT_NAME: np.load(work / "pixels.npy")}
    runners = [OnnxRuntimeRunner(g, "optimized", providers=["CPUExecutionProvider"], output_names=[OUTPUT],
                                 threads=threads, memory_check=False).activate() for g in graphs]
    times: list[list[float]] = [[] for _ in runners]
    for runner in runners:
        runner.infer(feed)  # warm-up
    for _ in range(repeats):
        for runner, spent in zip(runners, times):
            start = time.perf_counter()
            runner.infer(feed)
            spent.append(time.perf_counter() - start)
    return {"median_s": [round(statistics.median(t), 3) for t in times]}


def _run_child(*args: str) -> dict:
    """This script as a child process; its last stdout line is its JSON result."""
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[:2]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_prepare(artifacts: Path, work: Path, forms: tuple[str, ...]) -> dict:
    """The graphs, in a child: a 1.2 GB model and its lowered copies never inflate the parent, whose memory
    every later child would otherwise share the machine with."""
    return {form: str(path) for form, path in _graphs(artifacts, work, forms).items()}


def _graphs(artifacts: Path, work: Path, forms: tuple[str, ...]) -> dict[str, Path]:
    """model.onnx of `artifacts` in each attention form (RoPE as it is), weights beside each as save_onnx decides."""
    import onnx

    from export.core.folder import ONNX_NAME, save_onnx
    from export.graph.attention import lower_attention

    model = onnx.load(str(artifacts / ONNX_NAME))
    graphs = {}
    for form in forms:
        path = work / form / ONNX_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        save_onnx(lower_attention(model, form), path)
        graphs[form] = path
    del model
    return graphs


def _min_cosine(reference, actual) -> float:
    import numpy as np

    ref, act = reference.reshape(-1, reference.shape[-1]), actual.reshape(-1, actual.shape[-1])  # (S, C)
    cos = (ref * act).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(act, axis=-1))
    return float(cos.min())


def benchmark(cases: list[tuple[Path, dict]], forms: tuple[str, ...], repeats: int, threads: int,
              log=print) -> list[dict]:
    import numpy as np

    from export.core.manifest import read_manifest

    rows = []
    graphs_of: dict[Path, dict[str, Path]] = {}
    with tempfile.TemporaryDirectory(prefix="attention-bench-") as tmp:
        root = Path(tmp)
        for index, (artifacts, case) in enumerate(cases):
            if artifacts not in graphs_of:
                made = _run_child("prepare", str(artifacts), str(root / f"graphs{len(graphs_of)}"), json.dumps(forms))
                graphs_of[artifacts] = {form: Path(path) for form, path in made.items()}
            work = root / f"case{index}"
            work.mkdir()
            label = f"native {case['native_max_pixels']} px" if case.get("native_max_pixels") else \
                f"{case['size'][0]}x{case['size'][1]}"
            log(f"{artifacts.name} {label}: PyTorch ...")
            torch_row = _run_child("torch", str(artifacts), json.dumps(case), str(work))
            reference = np.load(work / "torch.npy")
            manifest = read_manifest(artifacts)
            for form in forms:
                log(f"{artifacts.name} {label}: onnxruntime {form} ...")
                row = _run_child("ort", str(graphs_of[artifacts][form]), str(work), form, str(repeats), str(threads))
                if "refused" not in row:
                    row["min_cosine"] = round(_min_cosine(reference, np.load(work / f"{form}.npy")), 6)
                rows.append({"model": manifest.source, "case": label, "size": torch_row["size"],
                             "tokens": torch_row["tokens"], "form": form, **row, "torch": torch_row})
                log("      " + json.dumps(rows[-1]))
            case_rows = rows[-len(forms):]
            if repeats > 1 and len(forms) > 1 and not any("refused" in r for r in case_rows):
                log(f"{artifacts.name} {label}: interleaved timing ...")
                paired = _run_child("interleaved", json.dumps([str(graphs_of[artifacts][f]) for f in forms]),
                                    str(work), str(repeats), str(threads))
                for r, seconds in zip(case_rows, paired["median_s"]):
                    r["interleaved_s"] = seconds
                    r["ratio_to_first"] = round(seconds / paired["median_s"][0], 3)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | case | tokens | attention | wall (s) | interleaved median (s), ratio | peak RSS (GiB) | "
             "estimate (GiB) | min cosine vs PyTorch | PyTorch wall (s) / peak RSS (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        torch = f"{r['torch']['wall_s']} / {r['torch']['peak_rss_mib'] / 1024:.2f}"
        head = f"| {r['model']} | {r['case']} | {r['tokens']:,} | {r['form']} |"
        if "refused" in r:
            lines.append(f"{head} refused | - | - | {r['estimate_gib']} | - | {torch} |")
        else:
            paired = f"{r['interleaved_s']}, {r['ratio_to_first']}" if "interleaved_s" in r else "-"
            lines.append(f"{head} {r['wall_s']} | {paired} | {r['peak_rss_mib'] / 1024:.2f} | {r['estimate_gib']} | "
                         f"{r['min_cosine']:.6f} | {torch} |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_artifacts(p, required=True)  # a --dynamic-resolution export
    p.add_argument("--sizes", type=int, nargs="+", default=[336, 560, 1022, 2044], metavar="S",
                   help="square image sides, multiples of the patch size (default: 336 560 1022 2044: 577, 1,601, "
                        "5,330 and 21,317 tokens at patch 14)")
    p.add_argument("--native-artifacts", type=Path, metavar="DIR",
                   help="also one image in native mode from this --dynamic-resolution export")
    p.add_argument("--native-max-pixels", type=int, default=3_240_000, metavar="N",
                   help="the native budget (default: 3,240,000, LLaVA-OneVision-1.5's)")
    p.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS), help="attention forms (default: both)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per form (median; > 1 adds a warm-up run)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--markdown", type=Path, help="write the table here")
    p.add_argument("--json", type=Path, help="write the rows here")
    return p


@command()
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cases: list[tuple[Path, dict]] = [(args.artifacts, {"size": [s, s]}) for s in args.sizes]
    if args.native_artifacts:
        cases.append((args.native_artifacts, {"native_max_pixels": args.native_max_pixels}))
    rows = benchmark(cases, tuple(args.forms), args.repeats, args.threads)
    text = table(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return EXIT_OK


def _child(argv: list[str]) -> None:
    kind = argv[0]
    if kind == "prepare":
        result = child_prepare(Path(argv[1]), Path(argv[2]), tuple(json.loads(argv[3])))
    elif kind == "interleaved":
        result = child_interleaved([Path(g) for g in json.loads(argv[1])], Path(argv[2]), int(argv[3]), int(argv[4]))
    elif kind == "torch":
        artifacts, case, work = Path(argv[1]), json.loads(argv[2]), Path(argv[3])
        result = child_torch(artifacts, case.get("size"), case.get("native_max_pixels"), work)
    else:
        result = child_ort(Path(argv[1]), Path(argv[2]), argv[3], int(argv[4]), int(argv[5]))
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
    else:
        run_cli(main)
