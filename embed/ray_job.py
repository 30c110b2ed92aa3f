"""The batch job on Ray Data: paths -> map_batches(EmbedActor, actor pool) -> PartsDatasink.

    from_items([{"path": p}, ...])                  the images still to embed (the driver lists them)
      .map_batches(EmbedActor, ActorPoolStrategy(size=N),       one model per actor (worker.Embedder), num_gpus=1 per
                   batch_format="pyarrow")          actor where the cluster has GPUs; each actor reads its
                                                    images from the shared path
      .write_datasink(PartsDatasink(out))           each write task writes one Parquet part with
                                                    store.write_part: temporary name, then rename

Ray's own write_parquet writes straight to the final name, so a killed job could leave a truncated
file; writing through store.write_part keeps the in-process layout and its guarantee (only complete
parts, a rerun skips their paths). This module imports ray at the top: job.py imports it only for --ray.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable

import ray
import ray.data
from ray.data import Datasink

from embed.worker import Embedder

# The Ray Data logger prints every scheduling step at INFO; the job's own lines and the progress bar say enough.
_QUIET = logging.WARNING


def start_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to Ray: a local one started here (address None; `num_cpus` cores, no dashboard), or the
    cluster at `address`. Returns whether this call connected (and so should disconnect); a process
    already connected keeps its connection."""
    if ray.is_initialized():
        return False
    logging.getLogger("ray.data").setLevel(_QUIET)
    if address is None:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, logging_level=_QUIET,
                 log_to_driver=False)
    else:
        ray.init(address=address, logging_level=_QUIET, log_to_driver=False)
    return True


class EmbedActor:
    """map_batches' callable class: one Embedder per actor, created once, fed pyarrow batches of paths."""

    def __init__(self, artifacts: str, runtime: str, normalize: bool, threads: int, identity: dict):
        self.identity = identity
        self.model = Embedder(artifacts, runtime, normalize, threads).activate()

    def __call__(self, batch) -> Any:
        return self.model.table(batch.column("path").to_pylist(), self.identity)  # pyarrow.Table


class PartsDatasink(Datasink[int]):
    """Each write task: its blocks -> one part, DST/part-<run>-r<task>.parquet (store.write_part). A retried
    task rewrites the same name. Returns the rows written."""

    def __init__(self, out: Path, run_id: str, rows_per_part: int):
        self.out, self.run_id, self.rows_per_part = str(out), run_id, rows_per_part

    def write(self, blocks: Iterable, ctx) -> int:
        import pyarrow as pa

        from embed.store import write_part

        tables = [b for b in blocks if b.num_rows]
        if not tables:
            return 0
        table = pa.concat_tables(tables)
        write_part(Path(self.out), table, f"{self.run_id}-r{ctx.task_idx:05d}")
        return table.num_rows

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_part

    def get_name(self) -> str:
        return "WriteParts"


def run_on_ray(pending: list[str], out: Path, *, artifacts: Path, runtime: str, normalize: bool, identity: dict,
               batch_size: int, actors: int, threads: int, rows_per_part: int, address: str | None, run_id: str,
               progress: bool) -> None:
    """Embed `pending` into `out` on Ray (see the module docstring). Each actor reserves one GPU where the
    cluster has GPUs; otherwise it reserves and computes on `threads` cores (default: on a local Ray the
    cores divided among the actors, on a cluster 1: start more actors rather than wider ones)."""
    connected = start_ray(address)
    context = ray.data.DataContext.get_current()
    progress_was = context.enable_progress_bars
    try:
        context.enable_progress_bars = progress
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0)
        if not gpus and not threads:
            threads = max(1, int(resources.get("CPU", 1)) // actors) if address is None else 1
        num_cpus = 1 if gpus else threads
        blocks = max(actors, -(-len(pending) // batch_size))  # at least one block per actor
        paths = ray.data.from_items([{"path": p} for p in pending], override_num_blocks=blocks)
        rows = paths.map_batches(
            EmbedActor,
            fn_constructor_kwargs=dict(artifacts=str(artifacts), runtime=runtime, normalize=normalize,
                                       threads=threads, identity=identity),
            batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if gpus else 0, num_cpus=num_cpus,
        )
        # Writing a part is light and must not wait for cores that the actors hold.
        rows.write_datasink(PartsDatasink(out, run_id, rows_per_part), ray_remote_args={"num_cpus": 0})
    finally:
        context.enable_progress_bars = progress_was
        if connected:
            ray.shutdown()
