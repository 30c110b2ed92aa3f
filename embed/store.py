"""The output folder: Parquet part files, each complete or absent, and what they were made from.

    DST/_embed.json                     what the embeddings are (artifacts, output, normalization)
    DST/part-<run>-<n>.parquet          rows: path (string), embedding (list<float32>, null for an error),
                                        error (string, null when embedded); Ray's parts: part-<run>-r<task>
    DST/.part-<run>-<n>.parquet.tmp     a part being written (removed by the next run if one was killed)

A part is written under its temporary name and renamed when complete (a rename within one folder is
atomic), so an interrupted run leaves only complete parts; the next run reads the paths already in
them and embeds the rest. Readers see one table: `pyarrow.parquet.read_table(DST)` and
`pandas.read_parquet(DST)` skip names that start with "." or "_".

pyarrow is imported inside functions: `import embed` and `python -m embed -h` work without it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from export.core.errors import OutputExistsError
from export.core.folder import ONNX_NAME, PREPROCESSOR_CONFIG
from export.core.manifest import Manifest, ManifestLike

SIDECAR_NAME = "_embed.json"
PART_PREFIX, PART_SUFFIX, TMP_SUFFIX = "part-", ".parquet", ".tmp"
METADATA_KEY = b"mvt_embed"  # Parquet schema metadata: the identity, as JSON, in every part
COLUMNS = ("path", "embedding", "error")
FORMAT = 1  # the layout above; a change that old readers cannot read bumps it


def output_identity(manifest: ManifestLike, output: str, normalize: bool) -> dict:
    """What decides the vectors: the deployed graph and preprocessing (their sha256 from manifest.json),
    the output embedded and the normalization. A rerun must match it to add to a folder. The runtime
    (onnxruntime or the plan) is not part of it: both run the same graph to fp32 rounding."""
    m = Manifest.of(manifest)
    return {
        "format": FORMAT,
        "model": m.source or m.checkpoint or "demo",
        "family": m.family,
        "precision": m.precision,
        "onnx_sha256": m.sha256(ONNX_NAME),
        "preprocessor_sha256": m.sha256(PREPROCESSOR_CONFIG),
        "output": output,
        "normalize": bool(normalize),
    }


def schema(identity: dict):
    import pyarrow as pa

    fields = [pa.field("path", pa.string(), nullable=False), pa.field("embedding", pa.list_(pa.float32())),
              pa.field("error", pa.string())]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(identity, sort_keys=True).encode()})


def part_files(out: Path) -> list[Path]:
    return sorted(p for p in Path(out).glob(f"{PART_PREFIX}*{PART_SUFFIX}") if p.is_file())


def _describe(identity: dict) -> str:
    return (f"{identity.get('model')} ({identity.get('precision')}, onnx sha256 "
            f"{str(identity.get('onnx_sha256'))[:12]}), output {identity.get('output')}, "
            f"normalize={identity.get('normalize')}")


def prepare_output(out: Path, identity: dict, force: bool) -> None:
    """Create `out` or check that it holds embeddings of the same identity; remove parts a killed run left
    half-written. force: delete this tool's files in `out` first (nothing else is touched)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; pass a folder (the output is a folder of Parquet parts)")
    sidecar = out / SIDECAR_NAME
    if out.is_dir() and force:
        for f in [*part_files(out), *out.glob(f".{PART_PREFIX}*{TMP_SUFFIX}"), sidecar]:
            f.unlink(missing_ok=True)
    if out.is_dir() and not sidecar.is_file() and any(out.iterdir()):
        raise OutputExistsError(f"--out {out} holds files that are not batch embeddings (no {SIDECAR_NAME}); "
                                "choose an empty or new folder")
    if sidecar.is_file():
        try:
            existing = json.loads(sidecar.read_text())
        except json.JSONDecodeError as exc:
            raise OutputExistsError(f"{sidecar} is not valid JSON ({exc}); delete it, or pass --force to start "
                                    "over") from None
        if existing != identity:
            differ = sorted(k for k in set(existing) | set(identity) if existing.get(k) != identity.get(k))
            raise OutputExistsError(
                f"--out {out} holds embeddings of {_describe(existing)}; this run would add {_describe(identity)} "
                f"(they differ in {', '.join(differ)}); use another --out, or --force to delete them and start over")
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(f".{PART_PREFIX}*{TMP_SUFFIX}"):  # a killed run's unfinished part: its rows are redone
        tmp.unlink(missing_ok=True)
    if not sidecar.is_file():
        tmp = sidecar.with_name(sidecar.name + TMP_SUFFIX)
        tmp.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
        tmp.replace(sidecar)


def done_paths(out: Path) -> set[str]:
    """The paths that have a row in `out` (embedded or an error): a rerun skips them."""
    import pyarrow.parquet as pq

    done: set[str] = set()
    for part in part_files(out):
        try:
            done.update(pq.read_table(part, columns=["path"]).column("path").to_pylist())
        except Exception as exc:  # not written by us (ours are renamed into place only when complete)
            raise OutputExistsError(f"{part} cannot be read ({type(exc).__name__}: {exc}); delete it and run "
                                    "again (its images will be embedded again)") from None
    return done


def write_part(out: Path, table, name: str) -> Path:
    """Write `table` as DST/part-<name>.parquet: under a temporary name first, synced, then renamed."""
    import pyarrow.parquet as pq

    final = Path(out) / f"{PART_PREFIX}{name}{PART_SUFFIX}"
    tmp = final.with_name(f".{final.name}{TMP_SUFFIX}")
    try:
        pq.write_table(table, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data reaches the disk before the name that says it is complete
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def read_embeddings(out: Path):
    """Every row of `out` as one pyarrow Table (path, embedding, error), parts in name order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = part_files(out)
    identity = json.loads((Path(out) / SIDECAR_NAME).read_text())
    if not parts:
        return schema(identity).empty_table()
    return pa.concat_tables([pq.read_table(p) for p in parts])


def remove_output(out: Path) -> None:
    """Delete an output folder written by this tool (tests and the benchmark start from nothing)."""
    out = Path(out)
    if out.is_dir() and (out / SIDECAR_NAME).is_file():
        shutil.rmtree(out)
