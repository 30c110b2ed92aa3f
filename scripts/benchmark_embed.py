"""Batch embedding throughput: in-process against a local Ray Data job with 1 and 2 actors, side by side.

    .venv/bin/python scripts/benchmark_embed.py                              # the demo model, 64 photos
    .venv/bin/python scripts/benchmark_embed.py --artifacts DIR --image-count 256 --actors 1 2 4 --json out.json

Each configuration embeds the same photo views (scikit-image photographs, flipped and cropped, as JPEG)
into its own fresh output folder with `embed.embed_images`: decode, preprocess, run the graph, write
Parquet. images/s = images / the job's wall time, model load and Parquet writes included. Ray is started
once before the Ray runs; its start-up is reported apart, not in any job's time (a cluster is up
already). The machine's load average (os.getloadavg) is printed before and after: on a shared machine
the figures move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from embed.worker import RUNTIME_CHOICES
from export.core.cli import EXIT_OK, add_artifacts, add_option, add_runner, command, run_cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_artifacts(p, default="artifacts/demo, exported into a temporary folder when absent")
    add_option(p, "--image-count", aliases=["--images"], type=int, default=64, metavar="N",
               help="photo views to embed (default: 64)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per model call (default: 16)")
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2], metavar="N",
                   help="Ray actor counts to run (default: 1 2)")
    add_runner(p, choices=RUNTIME_CHOICES, default="auto", aliases=["--runtime"])
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    return p


def write_photos(folder: Path, count: int) -> Path:
    """`count` JPEG files: the held-out photo views (export.core.images), cycled at a few sizes."""
    from export.core.images import held_out_photos

    folder.mkdir(parents=True, exist_ok=True)
    views = held_out_photos()
    for i in range(count):
        image: Any = views[i % len(views)].image  # an RGB PIL image
        scale = 1.0 - 0.25 * ((i // len(views)) % 3)  # later rounds at 100%, 75%, 50%: different files
        w, h = image.size
        image.resize((max(16, int(w * scale)), max(16, int(h * scale)))).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def demo_artifacts(tmp: Path) -> Path:
    from export.core.folder import MANIFEST_NAME
    from export.pipeline import BuildOptions, build

    default = Path(__file__).resolve().parents[1] / "artifacts" / "demo"
    if (default / MANIFEST_NAME).is_file():
        return default
    out = tmp / "demo"
    print(f"benchmark_embed: exporting the demo model into {out} (no artifacts/demo)", flush=True)
    build(BuildOptions(out=out, parity=False, runtime="none"), log=lambda _: None)
    return out


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@command()
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from embed import embed_images
    from embed.ray_job import start_ray
    from embed.worker import Embedder
    from export.core.manifest import read_manifest

    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="benchmark-embed-") as tmp_name:
        tmp = Path(tmp_name)
        artifacts = args.artifacts or demo_artifacts(tmp)
        manifest = read_manifest(artifacts)
        images = write_photos(tmp / "photos", args.image_count)
        load_before = load()
        print(f"benchmark_embed: {args.image_count} images, {manifest.source or 'demo'} "
              f"({manifest.hidden_size} hidden, {manifest.num_hidden_layers} layers), "
              f"batch {args.batch_size}, {os.cpu_count()} cores, load average {load_before}", flush=True)

        def run(name: str, **kwargs) -> None:
            result = embed_images(artifacts, images, tmp / name, batch_size=args.batch_size, runtime=args.runner,
                                  progress=False, log=lambda _: None, **kwargs)
            if result.errors or result.embedded != args.image_count:
                raise SystemExit(f"benchmark_embed: {name} embedded {result.embedded} of {args.image_count} images "
                                 f"({result.errors} errors)")
            runs.append({"config": name, "images": args.image_count, "seconds": result.seconds,
                         "images_per_s": result.images_per_s, "runtime": result.runtime, "load": load()})
            print(f"  {name:<18} {result.images_per_s:8.1f} images/s  ({result.seconds:.1f} s, load {load()})",
                  flush=True)

        t0 = time.perf_counter()
        with Embedder(artifacts, args.runner):  # the fixed cost inside every job's time below
            load_s = time.perf_counter() - t0
        print(f"  (one model load: {load_s:.1f} s, inside each job's time)", flush=True)
        run("in-process")
        t0 = time.perf_counter()
        started = start_ray(None)
        ray_start_s = time.perf_counter() - t0
        print(f"  (local Ray started in {ray_start_s:.1f} s, not counted below)", flush=True)
        try:
            for n in args.actors:
                run(f"ray-{n}-actor{'s' if n > 1 else ''}", ray=True, actors=n)
        finally:
            if started:
                import ray

                ray.shutdown()

    base = runs[0]["images_per_s"]
    print("\n| configuration | images/s | vs in-process |\n|---|---|---|")
    for r in runs:
        r["ratio_to_in_process"] = r["images_per_s"] / base if base else None
        print(f"| {r['config']} | {r['images_per_s']:.1f} | {r['ratio_to_in_process']:.2f}x |")
    print(f"\nload average before {load_before}, after {load()} (1, 5, 15 min); Ray start-up {ray_start_s:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "ray_start_s": ray_start_s, "model_load_s": load_s,
                                         "load_before": load_before,
                                         "load_after": load(), "cores": os.cpu_count(),
                                         "batch_size": args.batch_size}, indent=2) + "\n")
    return EXIT_OK


if __name__ == "__main__":
    run_cli(main)
