"""python -m export.build_engine: checkpoint -> ONNX (+ TensorRT engine where TensorRT and a GPU exist).

A thin layer over export.pipeline.build (and, with --artifacts, export.rebuild.rebuild_engine); everything
it does is importable.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from export.core.cli import (
    EXIT_BAD_INPUT,
    EXIT_ENGINE_FAILED,
    EXIT_FAILED,
    EXIT_OK,
    add_force,
    command,
    fail,
    first_line,
    run_cli,
)
from export.core.errors import MvtError
from export.core.manifest import Manifest
from export.engine.profiles import add_native_budget_arguments
from export.engine.target import RUNTIME_CHOICES
from export.graph.attention import ATTENTION_CHOICES
from export.graph.lowering import ROPE_CHOICES
from export.pipeline import BuildOptions
from export.precision.calibration import CALIBRATION_BUDGET_TFLOPS, DEFAULT_COUNT, MIN_COUNT
from export.precision.qdq import CALIBRATION_METHODS
from export.precision.recipe import PRECISIONS, QUANT_TARGETS

EPILOG = """\
models: a checkpoint folder (config.json, *.safetensors, preprocessor_config.json), a hub id, a
UNICOM release file (FP16-ViT-B-32.pt, ...), or a zoo alias: rice-l-560, mlcd-bigg-448 (2D RoPE);
mlcd-l-336, mlcd-b-32 (CLIP-style); unicom-b-32, unicom-b-16, unicom-l-14, unicom-l-14-336 (UNICOM:
downloaded into ~/.cache/mvt-deploy/unicom and checked against their SHA-256).
Without --model: a small bundled 2D-RoPE demo with seeded random weights.

exit status: 0 done, 1 parity failed, 2 bad input (nothing written), 3 engine build failed (the ONNX
artifacts are kept; manifest.json engine.reason says why)

examples:
  python -m export.build_engine
  python -m export.build_engine --model ./rice-vit-large-patch14-560 --out artifacts/rice --hidden-layer -2
  python -m export.build_engine --model rice-l-560 --random-weights --dynamic-resolution
  python -m export.build_engine --model FP16-ViT-B-32.pt --precision fp16
  python -m export.build_engine --artifacts artifacts/rice --runtime tensorrt   # rebuild model.plan for this GPU

--artifacts DIR rebuilds DIR/model.plan for the GPU and TensorRT at hand from an existing export (no
checkpoint): every file is checked against the manifest's sha256 first (a changed folder is refused), the
new plan replaces the old one only when complete, and the manifest records it. Engine options apply
(--runtime, --compute-capability, --opt-level, --timing-cache, --max-batch, --force); a plan already built
for this target is kept unless --force.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export.build_engine",
        description="Export an MLCD/RICE vision encoder to ONNX with a custom 2D-RoPE op, check parity "
                    "against PyTorch on real photos, and build a TensorRT engine where possible.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", metavar="PATH_OR_ID",
                   help="checkpoint folder, UNICOM .pt file, hub id or zoo alias (default: demo)")
    p.add_argument("--out", metavar="DIR", type=Path, help="output folder (default: artifacts/<model>)")
    p.add_argument("--artifacts", metavar="DIR", type=Path,
                   help="rebuild DIR/model.plan of an existing export for the GPU and TensorRT here, after "
                        "checking the manifest's hashes (no checkpoint; see below)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="precision recipe: fp32, fp16 (fp32 islands), int8 or fp8 (Q/DQ + fp16) (default: fp32)")
    p.add_argument("--rope", choices=ROPE_CHOICES, default="auto",
                   help="RoPE lowering: custom op with function body, opset-23 RotaryEmbedding, plain ops, "
                        "or TensorRT plugin node (default: auto, the best for the target runtime)")
    p.add_argument("--attention", choices=ATTENTION_CHOICES, default="auto",
                   help="attention form: onnxruntime's MultiHeadAttention (mha: memory linear in the tokens), "
                        "opset-23 Attention (onnx23: TensorRT's fused IAttention, fp16), or the traced MatMul/Softmax/"
                        "MatMul (decomposed) (default: auto, mha in model.onnx and the engine's best in engine.onnx)")
    p.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"),
                   help="input resolution, multiples of the patch size (default: the checkpoint's)")
    p.add_argument("--dynamic-resolution", action="store_true",
                   help="one graph for any H and W that are multiples of the patch size; its engine also holds "
                        "every size of triton_repo.build --preprocess native at the budget below")
    add_native_budget_arguments(p, "with --dynamic-resolution, native mode")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help=f"largest batch for engines (default: {BuildOptions.max_batch}; --artifacts: the export's)")
    p.add_argument("--hidden-layer", type=int, metavar="N",
                   help="also output hidden_states[N] as `hidden_state` (e.g. -2 for LLaVA-style VLMs)")
    p.add_argument("--projector", action="store_true",
                   help="--model is a LLaVA-NeXT / LLaVA-OneVision checkpoint: export its tower with the feature "
                        "layer, class-token strategy and multi_modal_projector as one graph, pixel_values -> "
                        "image_embeds [B, S', H_llm] (without it such a checkpoint exports its tower). See docs/vlm.md")
    p.add_argument("--num-heads", type=int, metavar="N",
                   help="attention heads of a released weights file (UNICOM .pt), whose tensors do not say "
                        "(default: hidden size / 64, as in all four releases)")
    p.add_argument("--calib-images", type=Path, metavar="DIR",
                   help="calibration images (JPEG/PNG) for int8 and the fp16 overflow scan "
                        "(default: scikit-image's photographs)")
    p.add_argument("--calib-count", type=int, metavar="N",
                   help=f"calibration images to use (default: {DEFAULT_COUNT}, fewer down to {MIN_COUNT} for "
                        f"models over {CALIBRATION_BUDGET_TFLOPS / DEFAULT_COUNT:g} TFLOPs an image; the fp16 overflow "
                        "scan and int8 calibration each run the model once per image)")
    p.add_argument("--calib-method", choices=CALIBRATION_METHODS, default="max",
                   help="int8 calibration: max, entropy or percentile (default: max)")
    p.add_argument("--random-weights", action="store_true",
                   help="build a zoo architecture with seeded random weights (no download; for benchmarks)")
    p.add_argument("--quant-target", choices=QUANT_TARGETS, default="tensorrt",
                   help="int8/fp8 graph form: tensorrt (symmetric int8, fp16 elsewhere) or cpu (uint8 "
                        "activations, fp32 elsewhere: onnxruntime's integer kernels) (default: tensorrt)")
    p.add_argument("--runtime", choices=RUNTIME_CHOICES,
                   help="engine runtime: datacenter TensorRT (needs a GPU), TensorRT-RTX (builds on a CPU for "
                        "RTX GPUs) or none (default: tensorrt where it can build, else no engine)")
    p.add_argument("--compute-capability", action="append", metavar="X.Y", dest="compute_capabilities",
                   help="TensorRT-RTX target GPU architecture, repeatable (default: the visible GPU, "
                        "else 7.5 8.0 8.6 8.9 12.0)")
    p.add_argument("--opt-level", type=int, choices=range(6), metavar="0-5",
                   help="TensorRT builder optimization level (default: TensorRT's, 3)")
    p.add_argument("--timing-cache", type=Path, metavar="FILE",
                   help="TensorRT timing cache, reused across builds (default: ~/.cache/mvt-deploy/)")
    p.add_argument("--tf32", action="store_true",
                   help="let float32 layers run in TF32 on the GPU (faster; default: off, true float32, the "
                        "precision parity judges; the manifest's engine.tf32 says which)")
    p.add_argument("--skip-parity", action="store_true", help="do not run the onnxruntime parity check")
    add_force(p, what="the --out folder (with --artifacts: rebuild a plan that already fits this target)")
    return p


def _capabilities(values: list[str] | None) -> list[tuple[int, int]] | None:
    if not values:
        return None
    try:
        # exactly two numbers: "8" or "8.9.1" is an error here, not a crash in the engine step
        return [(int(major), int(minor)) for major, minor in (v.split(".") for v in values)]
    except ValueError:
        raise SystemExit(f"error: --compute-capability takes MAJOR.MINOR, e.g. 8.9; got {values}") from None


def _native_budget(args) -> dict | None:
    given = {"factor": args.resize_factor, "min_pixels": args.min_pixels, "max_pixels": args.max_pixels}
    return {k: v for k, v in given.items() if v is not None} or None


# Exit status (export.core.cli): 0 success, 1 parity failed, 2 bad input (nothing written), 3 the engine build
# failed (the ONNX artifacts, parity.json and manifest.json are written; manifest engine.reason says why).
EXIT_PARITY_FAILED = EXIT_FAILED
__all__ = ["EXIT_BAD_INPUT", "EXIT_ENGINE_FAILED", "EXIT_OK", "EXIT_PARITY_FAILED", "main", "parser"]


# Options that shape the export itself: with --artifacts the folder already fixed them.
ENGINE_OPTIONS = ("artifacts", "runtime", "compute_capabilities", "opt_level", "timing_cache", "max_batch", "force",
                  "tf32")


def _rebuild(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from export.rebuild import RebuildOptions, rebuild_engine

    flags = {a.dest: a.option_strings[0] for a in p._actions if a.option_strings}
    given = [flags[dest] for dest, value in vars(args).items()
             if dest not in ENGINE_OPTIONS and value != p.get_default(dest)]
    if given:
        return fail(f"--artifacts rebuilds the engine of an existing export; {', '.join(given)} shape(s) the "
                    "export itself: re-export with --model instead, or drop them")
    if args.runtime == "none":
        return fail("--artifacts builds an engine: --runtime none builds none; use tensorrt or tensorrt-rtx")
    opts = RebuildOptions(args.artifacts, runtime=args.runtime,
                          compute_capabilities=_capabilities(args.compute_capabilities),
                          optimization_level=args.opt_level, timing_cache=args.timing_cache,
                          max_batch=args.max_batch, force=args.force, tf32=True if args.tf32 else None)
    try:
        rebuild_engine(opts)
    except MvtError:
        raise  # bad input: command() reports it, exit 2
    except Exception as exc:  # TensorRT/Polygraphy raise many kinds; the folder is unchanged either way
        return fail(f"the engine build failed: {type(exc).__name__}: {first_line(exc)} "
                    f"({args.artifacts} is unchanged)", EXIT_ENGINE_FAILED)
    return EXIT_OK


@command()
def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.artifacts is not None:
        return _rebuild(p, args)
    from export.pipeline import build

    opts = BuildOptions(
        model=args.model, out=args.out, precision=args.precision, rope=args.rope, attention=args.attention,
        image_size=tuple(args.image_size) if args.image_size else None,
        dynamic_resolution=args.dynamic_resolution, native_budget=_native_budget(args),
        max_batch=BuildOptions.max_batch if args.max_batch is None else args.max_batch, hidden_layer=args.hidden_layer,
        num_heads=args.num_heads, calib_images=args.calib_images, calib_count=args.calib_count,
        calib_method=args.calib_method,
        quant_target=args.quant_target, force=args.force, random_weights=args.random_weights,
        parity=not args.skip_parity, runtime=args.runtime, optimization_level=args.opt_level,
        timing_cache=args.timing_cache, compute_capabilities=_capabilities(args.compute_capabilities),
        tf32=args.tf32, projector=args.projector,
    )
    result = build(opts)  # an MvtError: bad input, nothing written (command() reports it, exit 2)
    if result.parity_passed is False:
        return fail("parity thresholds failed (see the checklist above and parity.json)", EXIT_PARITY_FAILED)
    if result.engine_failed:
        return fail(f"the engine build failed: {Manifest.of(result.manifest).engine.reason} "
                    f"(the ONNX artifacts in {result.out} are complete)", EXIT_ENGINE_FAILED)
    return EXIT_OK


if __name__ == "__main__":
    run_cli(main)
