"""Token features as RGB (PCA): PyTorch next to a deployed runner, one PCA basis, one PNG.

    .venv/bin/python scripts/visualize_features.py --artifacts artifacts/demo
    .venv/bin/python scripts/visualize_features.py --artifacts DIR --image cat.jpg --size 448 448  # dynamic export
    .venv/bin/python scripts/visualize_features.py --artifacts DIR --image cat.jpg --native-max-pixels 4194304
    .venv/bin/python scripts/visualize_features.py --artifacts DIR --runner triton --url 127.0.0.1:8000
    .venv/bin/python scripts/visualize_features.py --artifacts DIR --runner tensorrt                # GPU

The reference is the PyTorch model named in DIR/manifest.json; --runner runs DIR/model.onnx
(onnxruntime), DIR/model.plan (TensorRT or TensorRT-RTX, as the manifest says it was built) or the
served ensemble (Triton, at the export's resolution: the server preprocesses). The PNG shows the
image as the model sees it, the PCA-RGB map of PyTorch's patch tokens and that of the runner's
tokens, projected on PyTorch's basis (export/check/features.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from export.core.cli import EXIT_OK, add_artifacts, add_runner, add_served_model, add_url, command, run_cli
from export.engine.profiles import add_native_budget_arguments
from export.runners.base import RUNNER_KINDS  # numpy only: -h stays light

RUNNERS = tuple(k for k in RUNNER_KINDS if k != "torch")  # torch is the reference itself


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_artifacts(p, required=True)
    p.add_argument("--image", type=Path, help="an image file (default: scikit-image's astronaut)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="resolution (default: the export's; others need a --dynamic-resolution export)")
    add_native_budget_arguments(p, "native mode", prefix="native-", max_help=(
        "native mode (a --dynamic-resolution export): resize as --preprocess native serves, smart_resize within "
        "N pixels, so the image is encoded at its own grid (instead of --size)"))
    add_runner(p, choices=RUNNERS, default="onnxruntime", aliases=["--backend"])
    p.add_argument("--onnx", type=Path, help="another ONNX file to run instead of DIR/model.onnx")
    add_url(p, note="HTTP, with --runner triton")
    add_served_model(p, aliases=["--triton-model"])
    p.add_argument("--output", default="last_hidden_state", help="token output to show (last_hidden_state, "
                   "or hidden_state for a --hidden-layer export)")
    p.add_argument("--out", type=Path, help="PNG path (default: DIR/features-<runner>-<H>x<W>.png)")
    return p


def run(args, log=print) -> dict:
    from PIL import Image

    from export.check.features import feature_figure
    from export.core.errors import OptionError
    from export.core.folder import FEATURES_PNG
    from export.core.images import pixel_values, sample_photos
    from export.core.interface import INPUT_NAME
    from export.core.manifest import read_manifest
    from export.graph.trace import ExportShape, export_shape, validate_image_size
    from export.models.loading import reference_checkpoint
    from export.runners.base import Runner, image_feed, ort_mode_for
    from export.runners.ort import OnnxRuntimeRunner
    from export.runners.pyt import TorchRunner
    from export.runners.select import runner_for_artifacts

    manifest = read_manifest(args.artifacts)
    log(f"loading the PyTorch reference ({manifest.checkpoint or 'demo'}) ...")
    ckpt = reference_checkpoint(manifest)
    shape = export_shape(manifest)
    image = Image.open(args.image).convert("RGB") if args.image else sample_photos(1)[0]
    native = getattr(args, "native_max_pixels", None) is not None
    if native:
        from triton_repo.modes import native_pixels

        if args.size:
            raise OptionError("--native-max-pixels chooses the size from the image; drop --size")
        if not shape.dynamic_resolution:
            raise OptionError(f"--native-max-pixels: {args.artifacts} takes only {shape.height}x{shape.width}; "
                              "export with --dynamic-resolution to encode images at their native grid")
        if args.runner == "triton":
            raise OptionError("--runner triton serves the crop ensemble here; native mode compares pixel-fed "
                              "runners (onnxruntime, tensorrt)")
        pixels = native_pixels(ckpt.processor, image, ckpt.patch_size, args.native_max_pixels,
                               args.native_min_pixels, args.resize_factor)  # (1, 3, h', w')
    h, w = (pixels.shape[2], pixels.shape[3]) if native else (args.size or (shape.height, shape.width))
    validate_image_size(h, w, ckpt.patch_size)
    if (h, w) != (shape.height, shape.width):
        if not shape.dynamic_resolution:
            raise OptionError(f"--size {h} {w}: {args.artifacts} takes only {shape.height}x{shape.width}; "
                              "export with --dynamic-resolution to use other resolutions")
        if args.runner == "triton":
            raise OptionError("--runner triton: the server preprocesses to the export's resolution; drop --size")
    token_outputs = [n for n in ckpt.family.output_names(shape.hidden_layer) if n != ckpt.family.pooled_output]
    if args.output not in token_outputs:
        raise OptionError(f"--output {args.output}: this export's token outputs are {', '.join(token_outputs)}")
    if args.runner == "triton" and not args.url:
        raise OptionError("--runner triton needs --url HOST:PORT")
    if not native:
        pixels = pixel_values(ckpt.processor, [image], (h, w)).numpy()  # (1, 3, H, W)

    if args.runner == "onnxruntime":  # refuse a size that will not fit before PyTorch spends minutes on it
        from export.core.folder import ONNX_NAME
        from export.graph.footprint import check_fits, estimate_peak

        graph = args.onnx or args.artifacts / ONNX_NAME
        asked = f"--native-max-pixels {args.native_max_pixels}" if native else f"--size {h} {w}"
        check_fits(estimate_peak(graph, {INPUT_NAME: pixels.shape}), what=f"{asked} ({graph.name} in onnxruntime)",
                   change=f"use a smaller {'--native-max-pixels' if native else '--size'}"
                          + ("" if manifest.attention_lowering == "mha" else
                             ", or re-export with --attention mha (memory linear in the tokens)"))
    size = ExportShape(h, w, shape.dynamic_resolution, shape.hidden_layer)
    with TorchRunner(ckpt, size, [args.output]) as reference_runner:
        reference = reference_runner.infer({INPUT_NAME: pixels})[args.output]  # (1, S, C)
    runner: Runner
    if args.runner == "onnxruntime" and args.onnx:
        runner = OnnxRuntimeRunner(args.onnx, ort_mode_for(manifest.precision),
                                   output_names=[args.output])
    else:  # the engine in the runtime that built it (manifest.json), or the served ensemble
        runner = runner_for_artifacts(args.artifacts, args.runner, output_names=[args.output], url=args.url,
                                      model=args.served_model, manifest=manifest)
    label = f"{runner.name}, {manifest.precision}"
    with runner:
        deployed = runner.infer(image_feed(runner, pixels, [image]))[args.output]  # (1, S, C)
    out = args.out or args.artifacts / FEATURES_PNG.format(backend=args.runner, native="native-" if native else "",
                                                           height=h, width=w)
    title = f"{manifest.source}: {args.output}"
    facts = feature_figure(reference[0], deployed[0], pixels[0], ckpt.patch_size, ckpt.processor, out, label, title,
                           prefix_tokens=ckpt.family.prefix_tokens)
    facts.update(png=str(out), backend=args.runner, native=native, size=[h, w])  # "backend": the key it always had
    log(json.dumps(facts))
    log(f"wrote {out}")
    return facts


@command(FileNotFoundError)
def main(argv: list[str] | None = None) -> int:
    run(parser().parse_args(argv))  # an MvtError or a missing file: exit 2 (command())
    return EXIT_OK


if __name__ == "__main__":
    run_cli(main)
