"""LLM-ready image features (docs/vlm.md): throughput of the served AnyRes + projector path against the same work
in-process, and how close each precision's rows and greedy generations stay to fp32.

    .venv/bin/python scripts/benchmark_vlm.py [--work DIR] [--images 16] [--concurrency 4] [--precisions fp16 int8 fp8]

The model: a demo-sized LLaVA-NeXT (the demo's 2D-RoPE tower, seeded random weights, 224 px tiles with the
2x2+1 pinpoints, a 2-layer Qwen2 language model of width 512), saved in the real file format, exported with
--projector and served with --preprocess anyres (python backend). Direct: `triton_repo.vlm.PackedEncoder` (the
same graph, preprocessing and packing, one image at a time, onnxruntime on every core). Served: `--concurrency`
client threads, each sending one image per request. Prints a markdown table; the figures depend on the load.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from export.core.cli import EXIT_OK, command, run_cli


def save_demo_vlm(folder: Path) -> Path:
    """The demo tower inside a LLaVA-NeXT, in the real file format (config, safetensors, processor)."""
    import torch
    import transformers

    from export.core.interface import CLIP_MEAN, CLIP_STD
    from export.core.preprocessing import default_grid_pinpoints
    from export.models.zoo import DEMO, DEMO_SEED

    if (folder / "config.json").is_file():
        return folder
    tile = int(DEMO.config["image_size"])
    pinpoints = [list(p) for p in default_grid_pinpoints(tile)]
    text = dict(model_type="qwen2", hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096)
    torch.manual_seed(DEMO_SEED)
    config = transformers.LlavaNextConfig(vision_config={**DEMO.config, "model_type": DEMO.model_type},
                                          text_config=text, image_token_index=1023, image_grid_pinpoints=pinpoints)
    transformers.LlavaNextForConditionalGeneration(config).eval().save_pretrained(folder)
    processor_class = getattr(transformers, "LlavaNextImageProcessorPil", None) or transformers.LlavaNextImageProcessor
    processor_class(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                    image_grid_pinpoints=pinpoints, image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(folder)
    return folder


def photos(count: int) -> list[bytes]:
    """`count` JPEGs cycled from the held-out photographs' views (several aspect ratios)."""
    from export.core.images import held_out_photos
    from triton_repo.testing import encode

    views = held_out_photos()
    return [encode(views[i % len(views)].image, "JPEG", quality=90) for i in range(count)]


def direct(artifacts: Path, images: list[bytes]) -> tuple[float, int]:
    """(seconds, rows) for every image through PackedEncoder, one after another (after one warm-up)."""
    from triton_repo.vlm import PackedEncoder

    encoder = PackedEncoder(artifacts)
    encoder.encode(images[0])
    start, rows = time.perf_counter(), 0
    for data in images:
        rows += encoder.encode(data)[0].shape[0]
    return time.perf_counter() - start, rows


def served(url: str, images: list[bytes], concurrency: int) -> tuple[float, int]:
    """(seconds, rows) for every image, one per request, `concurrency` requests in flight."""
    from triton_repo.vlm import image_embeds

    image_embeds(images[:1], url=url)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        counts = list(pool.map(lambda data: int(image_embeds([data], url=url).counts[0]), images))
    return time.perf_counter() - start, sum(counts)


def agreement(checkpoint: Path, reference: Path, artifacts: Path, images: list[bytes], tokens: int = 16) -> dict:
    """Rows of `artifacts` against `reference`'s (min row cosine) and greedy generations equal to fp32's."""
    import io

    import torch
    import transformers
    from PIL import Image

    from export.core.metrics import row_cosines
    from triton_repo.vlm import expand_image_tokens, image_embeds

    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(checkpoint).eval()
    token = model.config.image_token_id
    ref = image_embeds(images, artifacts=reference).per_image()
    got = image_embeds([Image.open(io.BytesIO(d)) for d in images], artifacts=artifacts).per_image()
    cosines, same = [], 0
    for a, b in zip(ref, got):
        cosines.append(float(row_cosines(a, b.astype(np.float32)).min()))
        outs = []
        for rows in (a, b):
            ids = torch.tensor([expand_image_tokens([5, token, 7, 9], [rows.shape[0]], token)])
            embeds = model.get_input_embeddings()(ids)
            embeds[ids == token] = torch.from_numpy(rows.astype(np.float32))
            with torch.no_grad():
                outs.append(model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids),
                                           max_new_tokens=tokens, do_sample=False)[0].tolist())
        same += outs[0] == outs[1]
    return {"min_row_cosine": min(cosines), "same_generation": f"{same}/{len(images)}"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/benchmark_vlm.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("artifacts/benchmark-vlm"), metavar="DIR",
                   help="checkpoint, exports and repository (kept between runs; default: artifacts/benchmark-vlm)")
    p.add_argument("--images", type=int, default=16, metavar="N", help="images per measurement (default: 16)")
    p.add_argument("--concurrency", type=int, default=4, metavar="C", help="requests in flight (default: 4)")
    p.add_argument("--precisions", nargs="*", default=["fp16", "int8", "fp8"],
                   help="exports compared with fp32 (rows and greedy generations; default: fp16 int8 fp8)")
    return p


@command()
def main(argv: list[str] | None = None) -> int:
    from export.pipeline import BuildOptions, build
    from triton_repo.options import RepoOptions
    from triton_repo.repository import build_repository
    from triton_repo.server import TritonServer, free_port

    args = parser().parse_args(argv)
    work = args.work
    checkpoint = save_demo_vlm(work / "checkpoint")
    exports = {}
    for precision in ["fp32", *args.precisions]:
        exports[precision] = work / precision
        if not (exports[precision] / "manifest.json").is_file():
            build(BuildOptions(model=str(checkpoint), out=exports[precision], projector=True, precision=precision,
                               runtime="none", parity=precision == "fp32", calib_count=8), log=lambda _: None)
    repo = build_repository(RepoOptions(exports["fp32"], work / "repo", backend="python", preprocess="anyres",
                                        force=True), log=lambda _: None).out
    images = photos(args.images)
    load = os.getloadavg()[0]
    seconds_direct, rows_direct = direct(exports["fp32"], images)
    with TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                      ready_timeout_s=120) as server:
        seconds_served, rows_served = served(server.http_url, images, args.concurrency)
    assert rows_served == rows_direct, (rows_served, rows_direct)
    n = len(images)
    print(f"load average before: {load:.1f}; {n} images, {rows_direct} rows ({rows_direct / n:.0f} per image)\n")
    print("| path | images/s | rows/s |\n|---|---|---|")
    for path, seconds, rows in (("direct (PackedEncoder, one image at a time)", seconds_direct, rows_direct),
                                (f"served (concurrency {args.concurrency})", seconds_served, rows_served)):
        print(f"| {path} | {n / seconds:.2f} | {rows / seconds:.0f} |")
    print(f"| served / direct | {seconds_direct / seconds_served:.2f} | |\n")
    if args.precisions:
        print("| precision | min row cosine vs fp32 | greedy 16 tokens equal to fp32's |\n|---|---|---|")
        for precision in args.precisions:
            a = agreement(checkpoint, exports["fp32"], exports[precision], images[:8])
            print(f"| {precision} | {a['min_row_cosine']:.5f} | {a['same_generation']} |")
    return EXIT_OK


if __name__ == "__main__":
    run_cli(main)
