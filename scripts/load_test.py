"""Bounded load test of the served ensemble, on loopback only; compares with onnxruntime run directly.

    .venv/bin/python scripts/load_test.py                          # tiny 2D-RoPE model, own server
    .venv/bin/python scripts/load_test.py --artifacts artifacts/demo --requests 500 --concurrency 8
    .venv/bin/python scripts/load_test.py --url 127.0.0.1:8000      # a server already running here
    .venv/bin/python scripts/load_test.py --artifacts artifacts/demo --perf-analyzer --concurrencies 1 2 4 8

Own client (default): sends --requests real photographs (JPEG/PNG bytes, one image per request) from
--concurrency threads, then prints throughput, p50/p99 latency and the error count (exit 1 if any
request failed), the encoder's executions (dynamic batching), and the throughput of the same
model.onnx in onnxruntime in this process (no server, no preprocessing) at batch 1 and at the max batch.

--perf-analyzer: the load comes from Triton's own `perf_analyzer` (scripts/setup_perf_analyzer.sh
installs it), 3 windows of --window-s seconds per level of --concurrencies, four photographs as JPEG
bytes as --input-data; per level: throughput, p50/p99 (client side), the batch the encoder's dynamic batcher
formed, the CPU it cost. "Direct" is the same model.onnx through the project's onnxruntime runner in
this process, with every image the clients keep in flight at the highest concurrency in one run (batch =
that concurrency, capped by the max batch): once on preprocessed pixels
(the model alone: the issue's reference) and once with decoding + preprocessing of each image included
(the same work the server does, on one thread). Direct and served runs at the highest concurrency
alternate (D S D S D ...) for --rounds; each served images/s over the mean of the direct figures
around it, the median over the rounds is the ratio.
CPU milliseconds per image (each server process from /proc, perf_analyzer, direct) give a second
figure that other load hardly moves: the CPU-budget ratio, direct model-only CPU per image (the served
encoder's onnxruntime settings) over everything the served path spends per image, the throughput
ratio to expect on otherwise idle cores. Writes --json/--markdown summaries.

Both modes end with the fault checks: corrupt, empty and truncated images sent among good ones, from
several threads; each bad one must be answered with its own error, every good one with its result
(exit 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from export.core.cli import EXIT_FAILED, EXIT_OK, add_artifacts, add_served_model, add_url, command, fail, run_cli

LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
DEFAULT_CONCURRENCIES = [1, 2, 4, 8]
GOAL_RATIO = 0.9  # served images/s at the highest concurrency >= 0.9 x direct onnxruntime (issue 13)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    add_artifacts(src, default="a tiny model; this script builds the repository and serves it")
    src.add_argument("--repo", type=Path, help="a generated repository to serve")
    add_url(src, note="HTTP, or gRPC with --protocol grpc; loopback only")
    add_served_model(p, aliases=["--model"])
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--instances", type=int, default=1,
                   help="model instances when this script builds the repository")
    p.add_argument("--threads", type=int, default=0,
                   help="onnxruntime intra-op threads (server and direct; 0: default)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--perf-analyzer", action="store_true",
                   help="generate the load with Triton's perf_analyzer (scripts/setup_perf_analyzer.sh)")
    p.add_argument("--concurrencies", type=int, nargs="+", default=DEFAULT_CONCURRENCIES, metavar="N",
                   help="--perf-analyzer: concurrency levels (default: 1 2 4 8)")
    p.add_argument("--window-s", type=float, default=5.0,
                   help="--perf-analyzer: seconds per measurement window, 3 windows per level (default: 5)")
    p.add_argument("--direct-seconds", type=float, default=5.0,
                   help="--perf-analyzer: seconds of each direct onnxruntime measurement (default: 5)")
    p.add_argument("--direct-threads", type=int, default=None,
                   help="--perf-analyzer: onnxruntime threads of the direct runs (default: --threads)")
    p.add_argument("--rounds", type=int, default=3,
                   help="--perf-analyzer: served/direct alternations at the top concurrency (default: 3)")
    p.add_argument("--markdown", type=Path, help="--perf-analyzer: also write a Markdown summary here")
    return p


def run_load(url: str, protocol: str, model: str, images: list[bytes], requests: int, concurrency: int,
             after_warmup=lambda: None, output: str | None = None) -> dict:
    """`output`: the one output to request (the repository's pooled output); None: every served output."""
    from export.core.interface import IMAGE_INPUT
    from export.runners.triton_client import TritonRunner

    local = threading.local()
    runners: list[TritonRunner] = []  # one client per thread; all deactivated at the end
    lock = threading.Lock()

    def runner() -> TritonRunner:
        if not hasattr(local, "runner"):
            local.runner = TritonRunner(url, model, None if output is None else [output], protocol=protocol)
            with lock:
                runners.append(local.runner)
        return local.runner.activate()  # a no-op once active

    def one(i: int):
        feed = {IMAGE_INPUT: np.array([[images[i % len(images)]]], dtype=np.object_)}  # (1, 1) bytes
        try:  # every failure is counted, none stops the run
            client = runner()  # connecting is not part of a request's latency
        except Exception as exc:
            return 0.0, f"{type(exc).__name__}: {exc}"
        start = time.perf_counter()
        try:
            out = client.infer(feed)
            err = None if out and all(v.shape[0] == 1 for v in out.values()) else "bad output shape"
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}"
        return time.perf_counter() - start, err

    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(one, range(min(concurrency, requests))))  # connect and warm up; not measured
            after_warmup()
            start = time.perf_counter()
            results = list(pool.map(one, range(requests)))
            wall = time.perf_counter() - start
    finally:
        for r in runners:
            r.deactivate()
    latencies = np.array([r[0] for r in results]) * 1000
    errors = [r[1] for r in results if r[1]]
    return {"requests": requests, "concurrency": concurrency, "protocol": protocol, "seconds": round(wall, 3),
            "throughput_rps": round(requests / wall, 1), "p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "p99_ms": round(float(np.percentile(latencies, 99)), 2), "errors": len(errors),
            "first_errors": errors[:3]}


def fault_checks(url: str, protocol: str, model: str, good: list[bytes], output: str | None = None,
                 threads: int = 4) -> dict:
    """Corrupt, empty and truncated images among good ones, from several threads: each bad request must get
    its own error (the preprocess step's message), each good one its result."""
    bad = {"corrupt": b"\x89PNG\r\n\x1a\n not a png at all", "empty": b"",
           "truncated": good[0][: max(1, len(good[0]) // 20)]}
    cases = [(name, data, True) for name, data in bad.items()]
    cases += [(f"good-{i}", good[i % len(good)], False) for i in range(2 * len(bad))]
    cases = [c for pair in zip(cases[:len(bad)], cases[len(bad):]) for c in pair] + cases[2 * len(bad):]
    from export.core.interface import IMAGE_INPUT
    from export.runners.triton_client import TritonRunner

    def one(case: tuple[str, bytes, bool]) -> str | None:
        name, data, is_bad = case
        with TritonRunner(url, model, None if output is None else [output], protocol=protocol) as client:
            try:
                out = client.infer({IMAGE_INPUT: np.array([[data]], dtype=np.object_)})  # (1, 1) bytes
            except Exception as exc:
                if is_bad and "preprocess" in str(exc):
                    return None
                return f"{name}: {type(exc).__name__}: {exc}"[:300]
        if is_bad:
            return f"{name}: answered with a result instead of an error"
        return None if out and all(v.shape[0] == 1 for v in out.values()) else f"{name}: bad output shape"

    with ThreadPoolExecutor(max_workers=threads) as pool:
        problems = [p for p in pool.map(one, cases) if p]
    return {"bad_sent": len(bad), "good_sent": len(cases) - len(bad), "problems": problems}


def jpeg_photos(count: int = 4, quality: int = 90) -> list[bytes]:
    """`count` scikit-image photographs (astronaut 512x512, coffee 400x600, chelsea 300x451, rocket 427x640)
    as JPEG bytes: what clients send (PNG decoding alone costs more than preprocessing a JPEG)."""
    from export.core.images import sample_photos
    from triton_repo.testing import encode

    return [encode(photo, "JPEG", quality=quality) for photo in sample_photos(count)]


def _cycled(rows: np.ndarray, batch: int) -> np.ndarray:
    """(N, ...) -> (batch, ...), the N rows repeated in order."""
    return rows[np.arange(batch) % rows.shape[0]]


def direct_onnxruntime(onnx_path: Path, pixels: np.ndarray, batch: int, seconds: float = 5.0, threads: int = 0,
                       output: str = "pooler_output", allow_spinning: bool = True) -> dict:
    """The same model.onnx in onnxruntime, here, on preprocessed pixels ((3, H, W) or (N, 3, H, W), cycled to
    the batch): images per second, and CPU milliseconds per image (all threads of this process).
    allow_spinning: the runner's default; the served encoder turns it off (backend_models/encoder.py)."""
    from export.core.interface import INPUT_NAME
    from export.runners.ort import OnnxRuntimeRunner

    rows = pixels[None] if pixels.ndim == 3 else pixels  # (N, 3, H, W)
    feed = {INPUT_NAME: _cycled(rows, batch)}  # (B, 3, H, W)
    with OnnxRuntimeRunner(onnx_path, "optimized", output_names=[output], threads=threads,
                           allow_spinning=allow_spinning) as runner:
        runner.infer(feed)
        runs, start, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            runner.infer(feed)
            runs += 1
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"batch": batch, "images_per_s": round(runs * batch / wall, 1), "ms_per_run": round(wall / runs * 1000, 2),
            "cpu_ms_per_image": round(cpu * 1000 / (runs * batch), 2)}


def direct_with_preprocessing(onnx_path: Path, images: list[bytes], cfg, batch: int, seconds: float = 5.0,
                              threads: int = 0, output: str = "pooler_output") -> dict:
    """Decode + preprocess `batch` images (one thread, the server's recipe), then onnxruntime on them: the
    served path's work without the server. Images per second."""
    from export.core.interface import INPUT_NAME
    from export.core.preprocessing import pixel_values_from_bytes
    from export.runners.ort import OnnxRuntimeRunner

    with OnnxRuntimeRunner(onnx_path, "optimized", output_names=[output], threads=threads) as runner:
        runs, start, cpu, i = -1, 0.0, 0.0, 0
        while runs < 0 or time.perf_counter() - start < seconds:
            pixels = np.stack([pixel_values_from_bytes(images[(i + k) % len(images)], cfg)
                               for k in range(batch)])  # (B, 3, H, W)
            runner.infer({INPUT_NAME: pixels})
            i += batch
            runs += 1
            if runs == 0:  # the first run warmed up; measure from here
                start, cpu = time.perf_counter(), time.process_time()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"batch": batch, "images_per_s": round(runs * batch / wall, 1), "ms_per_run": round(wall / runs * 1000, 2),
            "cpu_ms_per_image": round(cpu * 1000 / (runs * batch), 2), "preprocessing": "included"}


def _repo_info(repo) -> dict:
    from triton_repo.layout import REPO_INFO

    return json.loads((Path(repo) / REPO_INFO).read_text())


def machine_load() -> dict:
    """What else ran: the 1/5/15-minute load averages and the core count (the figures depend on them)."""
    one, five, fifteen = os.getloadavg()
    return {"cores": os.cpu_count(), "loadavg_1_5_15": [round(one, 2), round(five, 2), round(fifteen, 2)]}


def process_group_cpu(pgid: int | None) -> dict[str, float]:
    """CPU seconds (user + system) so far of each process in a process group, by role: `tritonserver`, and
    each python-backend stub under its model's name (its argv names the instance, e.g. `encoder_0_0`).
    Linux /proc only; {} elsewhere or without a group (a server not started here)."""
    if pgid is None or not Path("/proc").is_dir():
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # it exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) != pgid:
            continue
        role = "tritonserver"
        if argv and argv[0].endswith(b"triton_python_backend_stub") and len(argv) > 8:
            role = argv[8].decode(errors="replace").rsplit("_", 2)[0]  # "encoder_0_0" -> "encoder"
        out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def perf_analyzer_levels(url: str, http_url: str | None, protocol: str, model: str, images: list[bytes],
                         concurrencies: list[int], window_s: float, server_pgid: int | None = None) -> list[dict]:
    """perf_analyzer at each concurrency, with the batch the encoder's dynamic batcher formed meanwhile and
    the CPU milliseconds per image each server process (and perf_analyzer itself) spent."""
    import resource

    from triton_repo.perf_analyzer import PerfOptions, find_perf_analyzer, run_perf_analyzer
    from triton_repo.server import model_statistics

    install = find_perf_analyzer()
    levels = []
    for concurrency in concurrencies:
        before = model_statistics(http_url, "encoder") if http_url else None
        cpu_before = process_group_cpu(server_pgid)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        (result,) = run_perf_analyzer(images, PerfOptions(url, model, protocol, [concurrency],
                                                          int(window_s * 1000)), install, log=print)
        level = result.as_dict()
        served = 0
        if before is not None and http_url:
            after = model_statistics(http_url, "encoder")
            served = after["inference_count"] - before["inference_count"]
            level["encoder_mean_batch"] = round(served / max(after["execution_count"] - before["execution_count"], 1),
                                                2)
        if cpu_before and served:
            ended = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = {k: v - cpu_before.get(k, 0.0) for k, v in process_group_cpu(server_pgid).items()}
            cpu["server_total"] = sum(cpu.values())
            cpu["perf_analyzer"] = ended.ru_utime + ended.ru_stime - children.ru_utime - children.ru_stime
            # the whole perf_analyzer run (every window, and between them) over every image served meanwhile
            level["cpu_ms_per_image"] = {k: round(v * 1000 / served, 2) for k, v in cpu.items()}
        print(f"  concurrency {concurrency}: {level['throughput']} images/s, p50 {level['p50_ms']} ms, "
              f"p99 {level['p99_ms']} ms" + (f", encoder mean batch {level['encoder_mean_batch']}"
                                               if "encoder_mean_batch" in level else ""))
        if "cpu_ms_per_image" in level:
            print("    CPU ms per image: " + ", ".join(f"{k} {v}" for k, v in level["cpu_ms_per_image"].items()))
        levels.append(level)
    return levels


def markdown(report: dict) -> str:
    pa = report["perf_analyzer"]
    lines = [f"# Load test: `{report['ensemble']}` with perf_analyzer ({pa['protocol']}, 3 windows of "
             f"{pa['window_s']} s per level, one image per request)", "",
             f"Machine: {report['machine']['cores']} cores, load average before/after "
             f"{report['machine']['loadavg_1_5_15']} / {report.get('machine_after', {}).get('loadavg_1_5_15')}.",
             "", "| concurrency | images/s | p50 ms | p99 ms | encoder mean batch | CPU ms per image |",
             "|---|---|---|---|---|---|"]
    for lv in pa["levels"]:
        cpu = ", ".join(f"{k} {v}" for k, v in lv.get("cpu_ms_per_image", {}).items()) or "-"
        lines.append(f"| {lv['concurrency']} | {lv['throughput']} | {lv['p50_ms']} | {lv['p99_ms']} | "
                     f"{lv.get('encoder_mean_batch', '-')} | {cpu} |")
    if "ratio" in report:
        r = report["ratio"]
        lines += ["", f"Served vs direct onnxruntime (the same model.onnx through the project's runner, batch "
                      f"{r['batch']} = the concurrency: every image in flight in one run; threads: "
                      f"{r['direct_threads']}), alternated "
                      f"direct, served, direct, ... over {r['rounds']} rounds at concurrency {r['concurrency']}; "
                      "each served figure over the mean of the direct ones around it, median of the rounds:", "",
                  "| direct | direct images/s | served images/s | served / direct (rounds) | median |",
                  "|---|---|---|---|---|"]
        for key, label in (("model_only", "model only (preprocessed pixels)"),
                           ("with_preprocessing", "decode + preprocess (1 thread) + model")):
            d = r[key]
            lines.append(f"| {label} | {', '.join(map(str, d['direct_images_per_s']))} | "
                         f"{', '.join(map(str, r['served_images_per_s']))} | {', '.join(map(str, d['ratios']))} | "
                         f"**{d['ratio']}** |")
        if "cpu_ms_per_image" in r:
            c = r["cpu_ms_per_image"]
            lines += ["", "CPU milliseconds per image (user + system, medians over the rounds; less sensitive to other "
                          "load than images/s): served " + ", ".join(f"{k} {v}" for k, v in c["served"].items())
                      + f"; direct model only {c['direct_model_only']} (spinning threads), "
                        f"{c['direct_model_only_no_spinning']} (no spinning, as served), direct with preprocessing "
                        f"{c['direct_with_preprocessing']}.",
                      "", f"CPU-budget ratio (direct model only, no spinning / served server + perf_analyzer): "
                          f"**{r['cpu_budget_ratio']}**: the served/direct throughput ratio to expect on otherwise "
                          "idle cores, where both paths are CPU-bound (an estimate, not a measurement)."]
        lines += ["", f"Goal: served at concurrency {r['concurrency']} >= {GOAL_RATIO} x direct (model only): "
                      f"{'met' if r['model_only']['ratio'] >= GOAL_RATIO else 'not met'} by images/s."]
        load = report["machine"]["loadavg_1_5_15"][0]
        if load > report["machine"]["cores"]:
            lines += ["", f"Warning: load average {load} on {report['machine']['cores']} cores: other processes "
                          "took CPU during both measurements, and a process with more runnable threads (the server) "
                          "gets a larger share; trust the CPU-budget ratio over the images/s ratio here."]
    f = report["faults"]
    lines += ["", f"Fault checks: {f['bad_sent']} bad images among {f['good_sent']} good ones: "
                  f"{'each answered correctly' if not f['problems'] else '; '.join(f['problems'])}."]
    return "\n".join(lines) + "\n"


def served_vs_direct(served: Callable[[], float], direct: Callable[[], tuple[float, float]], rounds: int,
                     concurrency: int, batch: int) -> dict:
    """Served and direct images/s alternated, D0 S1 D1 S2 D2 ...: on a shared CPU the load drifts, so each
    served figure is divided by the mean of the direct figures measured right before and right after it,
    and the median over the rounds is the ratio. direct() -> (model only, with preprocessing)."""
    directs = [direct()]
    serveds = []
    for k in range(rounds):
        print(f"round {k + 1}/{rounds}: direct {directs[-1][0]} / {directs[-1][1]} images/s (model only / with "
              "preprocessing), then served ...")
        serveds.append(served())
        directs.append(direct())
    out: dict = {"concurrency": concurrency, "batch": batch, "rounds": rounds, "served_images_per_s": serveds}
    for i, key in enumerate(("model_only", "with_preprocessing")):
        values = [d[i] for d in directs]
        ratios = [s / max(statistics.mean([values[k], values[k + 1]]), 1e-9) for k, s in enumerate(serveds)]
        out[key] = {"direct_images_per_s": values, "ratios": [round(r, 3) for r in ratios],
                    "ratio": round(statistics.median(ratios), 3)}
    return out


@command()
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from export.core.folder import ONNX_NAME, PREPROCESSOR_CONFIG
    from export.core.preprocessing import ClipPreprocessing, pixel_values_from_bytes
    from triton_repo.layout import ENCODER, PREPROCESS
    from triton_repo.options import RepoOptions
    from triton_repo.repository import build_repository
    from triton_repo.server import TritonServer, free_port, model_statistics
    from triton_repo.testing import photo_bytes, tiny_artifacts

    levels_ok = 1 <= args.concurrency <= 64 and all(1 <= c <= 64 for c in args.concurrencies)
    if args.requests < 1 or args.rounds < 1 or args.window_s < 0.5 or not levels_ok:
        return fail("--requests and --rounds must be >= 1, --window-s >= 0.5 and --concurrency/--concurrencies "
                    "1..64 (a bounded test)")
    if args.perf_analyzer:
        from triton_repo.perf_analyzer import find_perf_analyzer

        find_perf_analyzer()  # before any work; PerfAnalyzerUnavailable (an MvtError): exit 2 (command())
    images = jpeg_photos() if args.perf_analyzer else list(photo_bytes().values())
    work = Path(tempfile.mkdtemp(prefix="mvt-load-"))
    server = None
    repo = args.repo
    if args.url:
        if args.url.rsplit(":", 1)[0] not in LOOPBACK:
            return fail(f"--url {args.url} is not a loopback address; this test only talks to 127.0.0.1")
        url, http_url = args.url, args.url if args.protocol == "http" else None
    elif repo is None:
        artifacts = args.artifacts or tiny_artifacts(work)
        repo = build_repository(RepoOptions(artifacts, work / "repo", backend="python", name=args.served_model,
                                            instances=args.instances, intra_op_threads=args.threads),
                                log=print).out
    info = _repo_info(repo) if repo is not None else None
    onnx_path = Path(repo) / ENCODER / "1" / ONNX_NAME if repo is not None else None
    pooled = info.get("pooled_output") if info else None
    report: dict = {"ensemble": args.served_model, "machine": machine_load()}
    cfg = (ClipPreprocessing.from_file(Path(repo) / PREPROCESS / "1" / PREPROCESSOR_CONFIG)
           if repo is not None else None)
    pixels = np.stack([pixel_values_from_bytes(b, cfg) for b in images]) if cfg is not None else None  # (N, 3, H, W)
    output = info.get("pooled_output", "pooler_output") if info else "pooler_output"
    has_onnx = onnx_path is not None and onnx_path.is_file() and pixels is not None
    if not args.url:
        server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
        server.__enter__()
        url = server.http_url if args.protocol == "http" else server.grpc_url
        http_url = server.http_url
    try:
        if args.perf_analyzer:
            from triton_repo.perf_analyzer import PerfAnalyzerError

            try:
                pgid = server.process.pid if server is not None and server.process is not None else None
                levels = perf_analyzer_levels(url, http_url, args.protocol, args.served_model, images,
                                              args.concurrencies, args.window_s, pgid)
                report["perf_analyzer"] = {
                    "protocol": args.protocol, "window_s": args.window_s, "levels": levels,
                    "outputs": "all the ensemble's outputs (perf_analyzer 2.51 requests every output)"}
                if has_onnx and info is not None:
                    assert onnx_path is not None and pixels is not None
                    top = levels[-1]
                    batch = int(min(top["concurrency"], info["max_batch"]))  # all the images in flight, one run
                    directs: list[tuple[dict, dict]] = []
                    direct_threads = args.threads if args.direct_threads is None else args.direct_threads
                    served_cpu: list[dict] = []

                    def served_once() -> float:
                        (level,) = perf_analyzer_levels(url, http_url, args.protocol, args.served_model, images,
                                                        [top["concurrency"]], args.window_s, pgid)
                        served_cpu.append(level.get("cpu_ms_per_image", {}))
                        return level["throughput"]

                    def direct_once() -> tuple[float, float]:
                        assert onnx_path is not None and pixels is not None
                        directs.append((direct_onnxruntime(onnx_path, pixels, batch, args.direct_seconds,
                                                           direct_threads, output),
                                        direct_with_preprocessing(onnx_path, images, cfg, batch, args.direct_seconds,
                                                                  direct_threads, output)))
                        return directs[-1][0]["images_per_s"], directs[-1][1]["images_per_s"]

                    ratio = served_vs_direct(served_once, direct_once, args.rounds, top["concurrency"], batch)
                    ratio["direct_threads"] = direct_threads or "onnxruntime default"
                    # CPU per image is far less sensitive to other load than images/s: the model alone with the
                    # served encoder's onnxruntime settings (no spinning) against everything the served path
                    # spends (server processes and the load generator, which share the cores with it)
                    quiet = direct_onnxruntime(onnx_path, pixels, batch, args.direct_seconds, direct_threads, output,
                                               allow_spinning=False)
                    ratio["direct_no_spinning"] = quiet
                    if served_cpu and served_cpu[0]:  # medians over the rounds
                        ratio["cpu_ms_per_image"] = {
                            "served": {k: round(statistics.median(c.get(k, 0.0) for c in served_cpu), 2)
                                       for k in served_cpu[0]},
                            "direct_model_only": round(statistics.median(d[0]["cpu_ms_per_image"] for d in directs), 2),
                            "direct_with_preprocessing": round(statistics.median(d[1]["cpu_ms_per_image"]
                                                                                 for d in directs), 2),
                            "direct_model_only_no_spinning": quiet["cpu_ms_per_image"]}
                        spent = ratio["cpu_ms_per_image"]["served"]
                        spent = spent.get("server_total", 0.0) + spent.get("perf_analyzer", 0.0)
                        # on otherwise idle cores, throughput is cores / CPU per image for both paths
                        ratio["cpu_budget_ratio"] = round(quiet["cpu_ms_per_image"] / max(spent, 1e-9), 3)
                    report["ratio"] = ratio
            except PerfAnalyzerError as exc:
                return fail(str(exc), EXIT_FAILED)
        else:
            stats_before = {}

            def snapshot():
                if http_url:
                    stats_before.update(model_statistics(http_url, "encoder"))

            report["server"] = run_load(url, args.protocol, args.served_model, images, args.requests, args.concurrency,
                                        after_warmup=snapshot, output=pooled)
            if stats_before and http_url:
                after = model_statistics(http_url, "encoder")
                inferences = after["inference_count"] - stats_before["inference_count"]
                executions = after["execution_count"] - stats_before["execution_count"]
                report["encoder"] = {"inferences": inferences, "executions": executions,
                                     "mean_batch": round(inferences / max(executions, 1), 2)}
        report["faults"] = fault_checks(url, args.protocol, args.served_model, images, pooled)
    finally:
        if server is not None:
            server.stop()
    report["machine_after"] = machine_load()
    if not args.perf_analyzer and has_onnx and info is not None and pixels is not None:
        assert onnx_path is not None
        report["direct_onnxruntime"] = [direct_onnxruntime(onnx_path, pixels[0], b, threads=args.threads,
                                                           output=output)
                                        for b in sorted({1, info["max_batch"]})]
    if info is not None:
        report["model"] = {k: info["model"].get(k) for k in ("family", "hidden_size", "num_hidden_layers",
                                                             "native_image_size")}
    failed = bool(report["faults"]["problems"])
    if args.perf_analyzer:
        text = markdown(report)
        print("\n" + text)
        if args.markdown:
            args.markdown.write_text(text)
    else:
        s = report["server"]
        failed = failed or bool(s["errors"])
        print(f"\n{s['requests']} requests ({s['protocol']}, concurrency {s['concurrency']}, one image each) "
              f"in {s['seconds']} s")
        print(f"  throughput {s['throughput_rps']} req/s   p50 {s['p50_ms']} ms   p99 {s['p99_ms']} ms   "
              f"errors {s['errors']}")
        if "encoder" in report:
            e = report["encoder"]
            print(f"  encoder: {e['inferences']} images in {e['executions']} executions (mean batch "
                  f"{e['mean_batch']})")
        for d in report.get("direct_onnxruntime", []):
            print(f"  direct onnxruntime, batch {d['batch']}: {d['images_per_s']} images/s "
                  f"({d['ms_per_run']} ms per run)")
        if s["first_errors"]:
            print("  first errors:", *s["first_errors"], sep="\n    ")
        f = report["faults"]
        print(f"  fault checks: {f['bad_sent']} bad images among {f['good_sent']} good ones: "
              + ("each answered correctly" if not f["problems"] else "; ".join(f["problems"])))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    run_cli(main)
