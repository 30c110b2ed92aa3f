"""Triton's own load generator, `perf_analyzer`: find it, feed it real images, run it, read its CSV.

scripts/setup_perf_analyzer.sh (called by scripts/setup_server_env.sh) unpacks the binary from the
tritonclient 2.51.0 manylinux wheel into `<server env>/perf_analyzer/bin/` and links the two libraries
it loads even on a CPU (libb64.so.0d, libcudart.so.12, bundled by nvidia-pytriton) into `lib/`;
`run_perf_analyzer` puts that folder on LD_LIBRARY_PATH. Facts used (perf_analyzer docs,
`docs/input_data.md`, and its 2.51 `--help`):

- `--input-data FILE.json`: {"data": [{input: value}, ...]}, one entry per request, used round-robin;
  binary content may be given as {"b64": ...}, and for STRING/BYTES each element is a 4-byte
  little-endian length followed by its bytes, the length included in what is base64-encoded;
- `-f FILE.csv`: one row per concurrency; latencies in microseconds;
- time windows (`--measurement-interval`), three per level, accepted whatever their spread
  (`--stability-percentage 1000 --max-trials 3`): a shared CPU rarely gives 3 windows within 10 %;
- a failed request stops the run with a non-zero exit status (2.51 has no error column), so a
  successful run is a run without errors;
- 2.51 cannot choose outputs: every request asks for all of the ensemble's outputs.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import struct
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from export.core.errors import MvtError, OptionError
from export.core.interface import IMAGE_INPUT
from triton_repo.server import server_env

SETUP_COMMAND = "bash scripts/setup_perf_analyzer.sh"
PERF_ANALYZER_DIR = "perf_analyzer"  # inside the server environment: bin/, lib/, wheels/
REQUIRED_LIBS = ("libb64.so.0d", "libcudart.so.12")
MEASUREMENT_WINDOWS = 3  # perf_analyzer reports over its last 3 windows
ACCEPT_ANY_PERCENT = 1000  # a stability threshold every measurement meets: the level ends after 3 windows


class PerfAnalyzerUnavailable(MvtError):
    """No usable perf_analyzer here; the message says which setup command installs it."""


class PerfAnalyzerError(MvtError):
    """perf_analyzer ran and failed (a request failed, the server went away, a bad option)."""


@dataclass(frozen=True)
class PerfAnalyzerInstall:
    binary: Path  # <server env>/perf_analyzer/bin/perf_analyzer
    lib_dir: Path  # libb64.so.0d and libcudart.so.12 under their plain names

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(self.lib_dir), env.get("LD_LIBRARY_PATH")) if p)
        return env


def find_perf_analyzer(env: Path | str | None = None) -> PerfAnalyzerInstall:
    """perf_analyzer as scripts/setup_perf_analyzer.sh installs it; PerfAnalyzerUnavailable says what is missing."""
    folder = server_env(env) / PERF_ANALYZER_DIR
    install = PerfAnalyzerInstall(folder / "bin" / "perf_analyzer", folder / "lib")
    missing = [p for p in (install.binary, *(install.lib_dir / n for n in REQUIRED_LIBS)) if not p.exists()]
    if missing:
        raise PerfAnalyzerUnavailable(f"perf_analyzer is not installed ({', '.join(map(str, missing))} missing); "
                                      f"run {SETUP_COMMAND} (or scripts/setup_server_env.sh, which calls it)")
    if not os.access(install.binary, os.X_OK):
        raise PerfAnalyzerUnavailable(f"{install.binary} is not executable; rerun {SETUP_COMMAND}")
    return install


# ------------------------------------------------------------------------------------------ input data

def bytes_element(data: bytes) -> bytes:
    """One BYTES/STRING tensor element as Triton serializes it: <uint32 little-endian length><bytes>."""
    return struct.pack("<I", len(data)) + data


def input_data_json(images: Sequence[bytes], input_name: str = IMAGE_INPUT) -> dict:
    """perf_analyzer's --input-data document: one request per image, each a [1] BYTES tensor holding it."""
    if not images:
        raise OptionError("perf_analyzer input data needs at least one image")
    return {"data": [{input_name: {"b64": base64.b64encode(bytes_element(data)).decode("ascii")}}
                     for data in images]}


def write_input_data(images: Sequence[bytes], path: Path, input_name: str = IMAGE_INPUT) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(input_data_json(images, input_name)))
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------ results

@dataclass(frozen=True)
class PerfResult:
    """One concurrency level of perf_analyzer's CSV (client side), latencies in milliseconds."""

    concurrency: int
    throughput: float  # inferences (here: images) per second
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    avg_ms: float | None  # client-side average (`Avg latency`), when the CSV has it
    server_queue_ms: float | None  # mean time requests waited in the ensemble's queues
    server_compute_ms: float | None  # mean compute (input + infer + output) in the server

    def as_dict(self) -> dict:
        return asdict(self)


def _ms(row: dict[str, str], column: str) -> float | None:
    value = row.get(column)
    return None if value in (None, "") else round(float(value) / 1000.0, 3)  # usec -> ms


def parse_csv(text: str) -> list[PerfResult]:
    """perf_analyzer's `-f` CSV -> one PerfResult per concurrency, sorted by concurrency.

    The first table is the client view (header starting with `Concurrency`); anything after a blank line
    (the server-metrics table of --collect-metrics) is ignored.
    """
    table = text.strip().split("\n\n")[0]
    rows = list(csv.DictReader(io.StringIO(table)))
    required = ("Concurrency", "Inferences/Second", "p50 latency", "p90 latency", "p95 latency", "p99 latency")
    if not rows or any(c not in rows[0] for c in required):
        header = table.splitlines()[0] if table else "(empty)"
        raise PerfAnalyzerError(f"not a perf_analyzer concurrency CSV (header: {header}); expected the columns "
                                f"{', '.join(required)}")
    results = []
    for row in rows:
        compute = [_ms(row, c) for c in ("Server Compute Input", "Server Compute Infer", "Server Compute Output")]
        results.append(PerfResult(
            concurrency=int(row["Concurrency"]), throughput=round(float(row["Inferences/Second"]), 2),
            p50_ms=_ms(row, "p50 latency") or 0.0, p90_ms=_ms(row, "p90 latency") or 0.0,
            p95_ms=_ms(row, "p95 latency") or 0.0, p99_ms=_ms(row, "p99 latency") or 0.0,
            avg_ms=_ms(row, "Avg latency"), server_queue_ms=_ms(row, "Server Queue"),
            server_compute_ms=None if None in compute else round(sum(c for c in compute if c is not None), 3)))
    return sorted(results, key=lambda r: r.concurrency)


# ------------------------------------------------------------------------------------------ running

@dataclass
class PerfOptions:
    url: str  # host:port of the server's HTTP (or gRPC) endpoint
    model: str = "embed"
    protocol: str = "http"
    concurrencies: Sequence[int] = (1, 2, 4, 8)
    # Time windows of a fixed length, MEASUREMENT_WINDOWS of them per level, whatever their spread: on a
    # shared 2-core CPU the default stability search (3 windows within 10 %) often never converges, and
    # --request-count 100 reported 10.0, 11.11 and 12.5/s here (100 over whole seconds: coarse).
    window_ms: int = 5000
    timeout_s: float = 900.0


def perf_analyzer_command(install: PerfAnalyzerInstall, opts: PerfOptions, input_data: Path, csv_path: Path,
                          concurrency: int) -> list[str]:
    cmd = [str(install.binary), "-m", opts.model, "-u", opts.url, "-i", opts.protocol,
           "--input-data", str(input_data), "--concurrency-range", f"{concurrency}:{concurrency}:1",
           "--measurement-mode", "time_windows", "--measurement-interval", str(opts.window_ms),
           "--stability-percentage", str(ACCEPT_ANY_PERCENT), "--max-trials", str(MEASUREMENT_WINDOWS),
           "-f", str(csv_path)]
    return cmd


def run_perf_analyzer(images: Sequence[bytes], opts: PerfOptions, install: PerfAnalyzerInstall | None = None,
                      log=print) -> list[PerfResult]:
    """One perf_analyzer run per concurrency (each its own process: a failure names its level)."""
    install = install or find_perf_analyzer()
    if opts.protocol not in ("http", "grpc"):
        raise OptionError(f"protocol {opts.protocol!r} must be http or grpc")
    if opts.window_ms < 500:
        raise OptionError(f"measurement window {opts.window_ms} ms is too short; use at least 500 ms (a few "
                          "seconds on a 2-core CPU)")
    bad = [c for c in opts.concurrencies if not 1 <= int(c) <= 64]
    if bad or not opts.concurrencies:
        raise OptionError(f"concurrencies {list(opts.concurrencies)} must be 1..64 (a bounded test)")
    results = []
    with tempfile.TemporaryDirectory(prefix="mvt-perf-") as tmp:
        data = write_input_data(images, Path(tmp) / "input_data.json")
        for concurrency in opts.concurrencies:
            csv_path = Path(tmp) / f"c{concurrency}.csv"
            cmd = perf_analyzer_command(install, opts, data, csv_path, int(concurrency))
            log(f"perf_analyzer: concurrency {concurrency} ...")
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=install.environment(),
                                      timeout=opts.timeout_s)
            except subprocess.TimeoutExpired:
                raise PerfAnalyzerError(f"perf_analyzer at concurrency {concurrency} did not finish within "
                                        f"{opts.timeout_s:.0f} s; shorten the window or check the server's "
                                        "load") from None
            if proc.returncode != 0 or not csv_path.is_file():
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
                raise PerfAnalyzerError(f"perf_analyzer at concurrency {concurrency} failed (exit "
                                        f"{proc.returncode}): {' '.join(cmd)}\n{tail}")
            results.extend(parse_csv(csv_path.read_text()))
    return results
