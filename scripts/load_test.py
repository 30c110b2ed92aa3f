"""Bounded load test of the served ensemble, on loopback only; compares with onnxruntime run directly.

    .venv/bin/python scripts/load_test.py                          # tiny 2D-RoPE model, own server
    .venv/bin/python scripts/load_test.py --artifacts artifacts/demo --requests 500 --concurrency 8
    .venv/bin/python scripts/load_test.py --url 127.0.0.1:8000      # a server already running here

Sends --requests real photographs (JPEG/PNG bytes, one image per request) from --concurrency
threads, then prints throughput, p50/p99 latency and the error count (exit 1 if any request
failed), the encoder's executions (dynamic batching), and the throughput of the same model.onnx
in onnxruntime in this process (no server, no preprocessing) at batch 1 and at the max batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--artifacts", type=Path, help="export.build_engine output to serve (default: a tiny model)")
    src.add_argument("--repo", type=Path, help="a generated repository to serve")
    src.add_argument("--url", help="HTTP (or with --protocol grpc, gRPC) address of a running server, loopback only")
    p.add_argument("--model", default="embed", help="ensemble name (default: embed)")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--instances", type=int, default=1,
                   help="model instances when this script builds the repository")
    p.add_argument("--threads", type=int, default=0,
                   help="onnxruntime intra-op threads (server and direct; 0: default)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p


def run_load(url: str, protocol: str, model: str, images: list[bytes], requests: int, concurrency: int,
             after_warmup=lambda: None, output: str | None = None) -> dict:
    """`output`: the one output to request (the repository's pooled output); None: every served output."""
    from export.backend import IMAGE_INPUT, TritonRunner

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


def direct_onnxruntime(onnx_path: Path, pixels: np.ndarray, batch: int, seconds: float = 5.0, threads: int = 0,
                       output: str = "pooler_output") -> dict:
    """The same model.onnx in onnxruntime, here, on preprocessed pixels: images per second."""
    from export.backend import OnnxRuntimeRunner
    from export.families import INPUT_NAME

    feed = {INPUT_NAME: np.repeat(pixels[None], batch, axis=0)}  # (B, 3, H, W)
    with OnnxRuntimeRunner(onnx_path, "optimized", output_names=[output], threads=threads) as runner:
        runner.infer(feed)
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            runner.infer(feed)
            runs += 1
        wall = time.perf_counter() - start
    return {"batch": batch, "images_per_s": round(runs * batch / wall, 1), "ms_per_run": round(wall / runs * 1000, 2)}


def _repo_info(repo) -> dict:
    from triton_repo.build import REPO_INFO

    return json.loads((Path(repo) / REPO_INFO).read_text())


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from triton_repo.build import RepoOptions, build_repository
    from triton_repo.preprocessing import ClipPreprocessing, pixel_values_from_bytes
    from triton_repo.server import TritonServer, free_port, model_statistics
    from triton_repo.testing import photo_bytes, tiny_artifacts

    if args.requests < 1 or not 1 <= args.concurrency <= 64:
        print("error: --requests must be >= 1 and --concurrency 1..64 (a bounded test)", file=sys.stderr)
        return 2
    images = list(photo_bytes().values())
    work = Path(tempfile.mkdtemp(prefix="mvt-load-"))
    server = None
    repo = args.repo
    if args.url:
        if args.url.rsplit(":", 1)[0] not in LOOPBACK:
            print(f"error: --url {args.url} is not a loopback address; this test only talks to 127.0.0.1",
                  file=sys.stderr)
            return 2
        url, http_url = args.url, args.url if args.protocol == "http" else None
    else:
        if repo is None:
            artifacts = args.artifacts or tiny_artifacts(work)
            repo = build_repository(RepoOptions(artifacts, work / "repo", backend="python", name=args.model,
                                                instances=args.instances, intra_op_threads=args.threads),
                                    log=print).out
        server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
        server.__enter__()
        url = server.http_url if args.protocol == "http" else server.grpc_url
        http_url = server.http_url
    try:
        stats_before = {}

        def snapshot():
            if http_url:
                stats_before.update(model_statistics(http_url, "encoder"))

        pooled = _repo_info(repo).get("pooled_output") if repo is not None else None
        report: dict = {"server": run_load(url, args.protocol, args.model, images, args.requests, args.concurrency,
                                           after_warmup=snapshot, output=pooled)}
        if stats_before and http_url:
            after = model_statistics(http_url, "encoder")
            inferences = after["inference_count"] - stats_before["inference_count"]
            executions = after["execution_count"] - stats_before["execution_count"]
            report["encoder"] = {"inferences": inferences, "executions": executions,
                                 "mean_batch": round(inferences / max(executions, 1), 2)}
    finally:
        if server is not None:
            server.stop()
    if repo is not None:
        info = _repo_info(repo)
        onnx_path = Path(repo) / "encoder" / "1" / "model.onnx"
        cfg = ClipPreprocessing.from_file(Path(repo) / "preprocess" / "1" / "preprocessor_config.json")
        pixels = pixel_values_from_bytes(images[0], cfg)
        if onnx_path.is_file():
            report["direct_onnxruntime"] = [direct_onnxruntime(onnx_path, pixels, b, threads=args.threads,
                                                               output=info.get("pooled_output", "pooler_output"))
                                            for b in sorted({1, info["max_batch"]})]
        report["model"] = {k: info["model"].get(k) for k in ("family", "hidden_size", "num_hidden_layers",
                                                              "native_image_size")}

    s = report["server"]
    print(f"\n{s['requests']} requests ({s['protocol']}, concurrency {s['concurrency']}, one image each) "
          f"in {s['seconds']} s")
    print(f"  throughput {s['throughput_rps']} req/s   p50 {s['p50_ms']} ms   p99 {s['p99_ms']} ms   "
          f"errors {s['errors']}")
    if "encoder" in report:
        e = report["encoder"]
        print(f"  encoder: {e['inferences']} images in {e['executions']} executions (mean batch {e['mean_batch']})")
    for d in report.get("direct_onnxruntime", []):
        print(f"  direct onnxruntime, batch {d['batch']}: {d['images_per_s']} images/s ({d['ms_per_run']} ms per run)")
    if s["first_errors"]:
        print("  first errors:", *s["first_errors"], sep="\n    ")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if s["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
