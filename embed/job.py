"""embed_images: a folder, glob or list of images -> Parquet rows (path, embedding, error), in this process or
on Ray Data, resumable.

    from embed import embed_images
    result = embed_images("artifacts/demo", "photos/", "embeddings/")              # in-process, progress bar
    result = embed_images("artifacts/demo", "photos/", "embeddings/", ray="")      # local Ray, started here
    result = embed_images(..., ray="ray://head:10001", actors=8)                   # a cluster

Both modes run the same code on each batch (worker.Embedder: the served ensemble's preprocessing, then
the deployable graph) and write the same layout (store.py), so their rows are the same.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from export.core.errors import OptionError, require

DEFAULT_BATCH_SIZE = 32
DEFAULT_ROWS_PER_PART = 1024  # an interrupted run redoes at most this many images per writer


@dataclass
class EmbedResult:
    out: Path
    images: int  # named by the source
    skipped: int  # already in `out` from an earlier run
    embedded: int  # written by this run with a vector
    errors: int  # written by this run as error rows
    parts: int  # part files this run wrote
    seconds: float
    runtime: str
    mode: str  # "in-process" or "ray (<address>)"

    @property
    def images_per_s(self) -> float:
        return (self.embedded + self.errors) / self.seconds if self.seconds > 0 else 0.0


def embed_images(artifacts: Path | str, images: str | os.PathLike, out: Path | str, *,
                 ray: str | bool | None = None, normalize: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
                 actors: int | None = None, runtime: str = "auto", force: bool = False,
                 rows_per_part: int = DEFAULT_ROWS_PER_PART, threads: int = 0, progress: bool = True,
                 log: Callable[[str], None] = print) -> EmbedResult:
    """Embed every image `images` names (sources.image_paths) that `out` does not hold yet.

    ray: None/False in this process; True or "" a local Ray started here (or the one this process is
    already connected to); an address ("auto", "ray://host:10001", "host:6379") a cluster, whose workers
    must see `artifacts`, the images and `out` at the same paths (shared storage).
    normalize: L2-normalize each vector (as triton_repo.build --normalize serves it).
    actors: Ray actors, one model each (default 1; with --ray only). runtime: "auto" (the folder's plan
    where it can run, else onnxruntime), "onnxruntime" or "tensorrt". threads: onnxruntime intra-op
    threads per model (0: in-process onnxruntime's default; on Ray without GPUs the cores each actor
    reserves: a local Ray's cores divided among the actors, 1 on a cluster).
    force: delete the rows `out` holds and start over (otherwise `out` must hold the same model's rows).
    """
    from embed.sources import image_paths
    from embed.store import done_paths, output_identity, prepare_output
    from embed.worker import preprocessor_config, resolve_runtime
    from export.core.manifest import read_manifest

    t0 = time.perf_counter()
    if batch_size < 1 or rows_per_part < 1:
        raise OptionError(f"--batch-size ({batch_size}) and --rows-per-part ({rows_per_part}) must be at least 1")
    use_ray = ray is not None and ray is not False
    if actors is not None and not use_ray:
        raise OptionError("--actors sets the Ray actor pool; add --ray (a local Ray) or --ray ADDRESS")
    actors = 1 if actors is None else actors
    if actors < 1:
        raise OptionError(f"--actors {actors}: need at least 1")
    require("pyarrow", "embed")
    artifacts = Path(artifacts)
    manifest = read_manifest(artifacts)
    if manifest.projector:  # image_embeds rows for a language model, no one-vector-per-image output
        raise OptionError(f"{artifacts} is a --projector export (a VLM's image_embeds, no pooled output); embed a "
                          "tower export, or serve this one with triton_repo.build --preprocess anyres (docs/vlm.md)")
    preprocessor_config(artifacts)  # checked before anything is written
    identity = output_identity(manifest, manifest.pooled_output, normalize)
    paths = image_paths(images)
    out = Path(out)
    address = None if ray is True else (ray or None) if use_ray else None
    # Where the workers are this machine, decide the runtime here (errors early, one runtime for all);
    # on a cluster each actor decides where it runs.
    local = not use_ray or address is None
    chosen, reason = resolve_runtime(artifacts, runtime, manifest) if local else (runtime, None)
    if reason:
        log(f"embed: runtime onnxruntime (the plan cannot run here: {reason})")
    prepare_output(out, identity, force)
    done = done_paths(out)
    pending = [p for p in paths if p not in done]
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    mode = "in-process" if not use_ray else f"ray ({address or 'local'})"
    log(f"embed: {len(paths)} images, {len(paths) - len(pending)} already in {out}, {len(pending)} to embed "
        f"({mode}, {chosen}, batch {batch_size}{f', {actors} actors' if use_ray else ''})")
    if pending:
        if use_ray:
            require("ray.data", "embed")
            from embed.ray_job import run_on_ray

            run_on_ray(pending, out, artifacts=artifacts, runtime=chosen, normalize=normalize, identity=identity,
                       batch_size=batch_size, actors=actors, threads=threads, rows_per_part=rows_per_part,
                       address=address, run_id=run_id, progress=progress)
        else:
            run_in_process(pending, out, artifacts=artifacts, runtime=chosen, normalize=normalize,
                           identity=identity, batch_size=batch_size, threads=threads, rows_per_part=rows_per_part,
                           run_id=run_id, progress=progress)
    embedded, errors, parts = _count_run(out, run_id)
    result = EmbedResult(out, len(paths), len(paths) - len(pending), embedded, errors, parts,
                         time.perf_counter() - t0, chosen, mode)
    log(f"embed: wrote {embedded + errors} rows ({errors} errors) in {parts} parts to {out} "
        f"in {result.seconds:.1f} s")
    return result


def run_in_process(pending: list[str], out: Path, *, artifacts: Path, runtime: str, normalize: bool, identity: dict,
                   batch_size: int, threads: int, rows_per_part: int, run_id: str, progress: bool) -> None:
    """One model in this process; a part is written every `rows_per_part` rows, and one with the rest."""
    import pyarrow as pa
    from tqdm import tqdm

    from embed.store import write_part
    from embed.worker import Embedder

    pending_rows: list = []  # tables not yet in a part
    parts, errors = 0, 0

    def flush(final: bool) -> None:
        """Write parts of exactly rows_per_part rows (and, at the end, the rest)."""
        nonlocal pending_rows, parts
        table = pa.concat_tables(pending_rows) if pending_rows else None
        while table is not None and (table.num_rows >= rows_per_part or (final and table.num_rows)):
            write_part(out, table.slice(0, rows_per_part), f"{run_id}-{parts:05d}")
            table, parts = table.slice(rows_per_part), parts + 1
        pending_rows = [table] if table is not None and table.num_rows else []

    with Embedder(artifacts, runtime, normalize, threads) as model, \
            tqdm(total=len(pending), unit="img", desc="embed", disable=not progress) as bar:
        for start in range(0, len(pending), batch_size):
            table = model.table(pending[start:start + batch_size], identity)
            pending_rows.append(table)
            errors += table.num_rows - table.column("error").null_count
            bar.update(table.num_rows)
            bar.set_postfix(errors=errors, refresh=False)
            flush(final=False)
        flush(final=True)


def _count_run(out: Path, run_id: str) -> tuple[int, int, int]:
    """(rows with a vector, error rows, parts) that run `run_id` wrote."""
    import pyarrow.parquet as pq

    from embed.store import PART_PREFIX, part_files

    embedded = errors = parts = 0
    for part in part_files(out):
        if part.name.startswith(f"{PART_PREFIX}{run_id}-"):
            column = pq.read_table(part, columns=["error"]).column("error")
            errors += len(column) - column.null_count
            embedded += column.null_count
            parts += 1
    return embedded, errors, parts
