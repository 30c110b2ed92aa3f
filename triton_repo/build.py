"""python -m triton_repo.build: export artifacts -> a Triton model repository (encoder, preprocess, ensemble).

    python -m triton_repo.build --artifacts artifacts/demo --out model_repository --backend python

The CLI only: a thin layer over `build_repository(RepoOptions(...))` (triton_repo/repository.py, importable
from here too); the encoder's forms (`--backend`) are the registry in triton_repo/forms.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from export.core.cli import EXIT_OK, add_artifacts, add_force, add_served_model, command, run_cli
from export.engine.profiles import add_native_budget_arguments
from triton_repo.forms import BACKENDS, cli_help
from triton_repo.kserve import add_arguments as add_kserve_arguments, options_from_args as kserve_options
from triton_repo.modes import EMBEDS_DTYPES, PREPROCESS_MODES, parse_pinpoints
from triton_repo.options import RepoOptions, RepoResult
from triton_repo.repository import build_repository

# the Python API users import from here too, beside the CLI
__all__ = ["RepoOptions", "RepoResult", "build_repository", "main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m triton_repo.build",
        description="Generate a Triton model repository (preprocess -> encoder ensemble) from export artifacts.",
    )
    add_artifacts(p, required=True)
    p.add_argument("--out", type=Path, required=True, metavar="REPO", help="model repository folder to write")
    p.add_argument("--backend", choices=BACKENDS, help=cli_help())
    add_served_model(p, aliases=["--name"])
    p.add_argument("--instances", type=int, default=1, metavar="N", help="instances per model (default: 1)")
    p.add_argument("--intra-op-threads", type=int, default=0, metavar="N",
                   help="--backend python: onnxruntime threads per encoder instance (default: 0 = one worker per "
                        "usable core, a one-thread run per image, batches overlapping)")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help="max batch (default: the manifest's; never above the engine's optimization profile)")
    p.add_argument("--normalize", action="store_true",
                   help="answer the pooled output (UNICOM: embedding) L2-normalized, for retrieval by inner "
                        "product (default: as the model computes it)")
    p.add_argument("--preprocess", choices=PREPROCESS_MODES, default="crop",
                   help="crop: one center crop per image, an ensemble (default); anyres: LLaVA-NeXT tiles; native: "
                        "smart_resize within a pixel budget (needs --dynamic-resolution artifacts). See README")
    p.add_argument("--grid-pinpoints", nargs="+", metavar="HxW",
                   help="anyres candidate resolutions, height x width (default for native size s: "
                        "sx2s 2sxs 2sx2s 3sxs sx3s)")
    p.add_argument("--embeds-dtype", choices=tuple(EMBEDS_DTYPES), default="float32",
                   help="--projector exports with --preprocess anyres: the type of the served image_embeds "
                        "(default: float32; float16 halves the bytes a VLM server receives)")
    add_native_budget_arguments(p, "native")
    add_force(p, what="the --out repository")
    add_kserve_arguments(p)
    return p


@command()
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    opts = RepoOptions(artifacts=args.artifacts, out=args.out, backend=args.backend, name=args.served_model,
                       instances=args.instances, max_batch=args.max_batch, force=args.force, normalize=args.normalize,
                       intra_op_threads=args.intra_op_threads, preprocess=args.preprocess,
                       resize_factor=args.resize_factor,
                       native_min_pixels=args.min_pixels, native_max_pixels=args.max_pixels,
                       embeds_dtype=args.embeds_dtype,
                       kserve=kserve_options(args))
    if args.grid_pinpoints:
        opts.grid_pinpoints = parse_pinpoints(args.grid_pinpoints)
    build_repository(opts)  # an MvtError: bad input, exit 2 (command())
    return EXIT_OK


if __name__ == "__main__":
    run_cli(main)
