"""python -m triton_repo.serve REPO: run a real tritonserver on a generated repository, in the foreground.

Ctrl-C (SIGINT) or SIGTERM shuts it down cleanly; a server that is not ready within --ready-timeout
fails with its log tail. A thin layer over triton_repo.server.TritonServer.
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from export.core.cli import EXIT_FAILED, EXIT_OK, command, fail, run_cli
from triton_repo.server import DEFAULT_READY_TIMEOUT_S


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m triton_repo.serve",
        description="Serve a model repository made by triton_repo.build with tritonserver (loopback only). "
                    "The binary comes from the server environment (scripts/setup_server_env.sh; MVT_SERVER_ENV "
                    "overrides its path). In production run the NGC container instead (see the repository README).",
    )
    p.add_argument("repository", type=Path, metavar="REPO")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--ready-timeout", type=float, default=DEFAULT_READY_TIMEOUT_S, metavar="S",
                   help=f"seconds to wait for readiness (default: {DEFAULT_READY_TIMEOUT_S:.0f})")
    p.add_argument("--log-file", type=Path, help="server log (default: REPO/../tritonserver-<http port>.log)")
    return p


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


@command()
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from triton_repo.server import TritonServer

    server = TritonServer(args.repository, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, log_file=args.log_file, ready_timeout_s=args.ready_timeout)
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        server.wait_ready()
        print(f"tritonserver ready: http {server.http_url}, grpc {server.grpc_url}, "
              f"metrics 127.0.0.1:{server.metrics_port}; log {server.log_file}. Ctrl-C stops it.", flush=True)
        assert server.process is not None  # set by start()
        code = server.process.wait()
        return fail(f"tritonserver exited with code {code}; its log ends with:\n{server.log_tail()}", EXIT_FAILED)
    except _Stop as stop:
        print(f"{stop}: shutting down tritonserver ...", flush=True)
        stopped = server.stop()
        print(f"tritonserver stopped (exit code {stopped})", flush=True)
        return EXIT_OK
    finally:  # an MvtError (no server binary, not ready in time) goes on to command(): exit 2
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    run_cli(main)
