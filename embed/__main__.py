"""python -m embed: a thin layer over embed.embed_images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from embed.job import DEFAULT_BATCH_SIZE, DEFAULT_ROWS_PER_PART
from embed.worker import RUNTIME_CHOICES
from export.core.cli import EXIT_OK, add_artifacts, add_force, add_runner, command, run_cli

EPILOG = """\
output: DST is a folder of Parquet parts (read it whole: pandas.read_parquet(DST) or
pyarrow.parquet.read_table(DST)), one row per image: path (absolute), embedding (list<float32>, null
when the image could not be read or decoded), error (why, null when embedded). DST/_embed.json records
the model (manifest sha256), the output and the normalization; a rerun with the same DST embeds only
the images it does not hold yet, and refuses a different model or normalization (--force starts over).
Parts are written under a temporary name and renamed when complete: a killed run leaves only complete
parts.

exit status: 0 done (error rows included), 2 bad input or a refused output folder

examples:
  python -m embed --artifacts artifacts/demo --images photos/ --out embeddings/
  python -m embed --artifacts artifacts/demo --images 'photos/**/*.jpg' --out embeddings/ --normalize
  python -m embed --artifacts artifacts/demo --images list.txt --out embeddings/ --ray --actors 2
  python -m embed --artifacts /shared/artifacts --images /shared/list.txt --out /shared/emb --ray auto --actors 8
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m embed",
        description="Embed images into Parquet with an export folder's deployable graph and its served "
                    "preprocessing, in this process or on Ray Data; resumable.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_artifacts(p, required=True)
    p.add_argument("--images", required=True, metavar="SRC",
                   help="a folder (recursive), a glob (quote it) or a list file with one image path per line")
    p.add_argument("--out", required=True, type=Path, metavar="DST", help="output folder of Parquet parts")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray Data: a local Ray started here without ADDRESS, else the cluster at ADDRESS "
                        "(auto, ray://HOST:10001, HOST:6379), whose workers see the same paths")
    p.add_argument("--actors", type=int, metavar="N", help="Ray actors, one model each (default: 1; needs --ray)")
    add_runner(p, choices=RUNTIME_CHOICES, default="auto", aliases=["--runtime"])
    p.add_argument("--normalize", action="store_true", help="L2-normalize each embedding (cosine = inner product)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                   help=f"images per model call (default: {DEFAULT_BATCH_SIZE})")
    p.add_argument("--rows-per-part", type=int, default=DEFAULT_ROWS_PER_PART, metavar="N",
                   help=f"rows per Parquet part: what a killed run may redo (default: {DEFAULT_ROWS_PER_PART})")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="onnxruntime intra-op threads per model (default: onnxruntime's; on a local Ray, the "
                        "cores divided among the actors)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_force(p, what="delete the rows DST holds and start over")
    return p


@command()
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from embed.job import embed_images

    # an MvtError: bad input or a refused output folder, exit 2 (command())
    embed_images(args.artifacts, args.images, args.out, ray=args.ray, normalize=args.normalize,
                 batch_size=args.batch_size, actors=args.actors, runtime=args.runner, force=args.force,
                 rows_per_part=args.rows_per_part, threads=args.threads, progress=not args.no_progress,
                 log=lambda line: print(line, file=sys.stderr))
    return EXIT_OK


if __name__ == "__main__":
    run_cli(main)
