"""Run a real `tritonserver` on a model repository: locate it, prepare its backends, start, wait, stop.

On CPU machines the binary comes from the `nvidia-pytriton` wheel (tritonserver 2.51 with the python
backend), installed without its dependencies into the server environment (default `.server-venv`,
made by scripts/setup_server_env.sh; override with MVT_SERVER_ENV). Facts this module is built on
(measured; see the project's notes):

- the python-backend stub for the environment's Python minor version must sit in
  `<backend-dir>/python/`: we make a project-owned folder of symlinks and pass --backend-directory;
- the stub imports packages from the first `python3` on PATH (PYTHONPATH is ignored), so the
  server runs with the server environment's bin/ first on PATH;
- with numpy 2 in that environment tensors are silently corrupted, so we refuse to start with it;
- a stub that cannot start can hang the server: readiness is awaited with a deadline.

In production use the NGC container (`nvcr.io/nvidia/tritonserver:<yy.mm>-py3`), which has the
TensorRT and onnxruntime backends; `TritonServer(binary=...)` takes any binary.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from export.core.errors import MvtError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SERVER_ENV_VAR = "MVT_SERVER_ENV"
DEFAULT_READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
SETUP_HINT = ("run scripts/setup_server_env.sh (it creates .server-venv with the tritonserver wheel, numpy<2, "
              "onnxruntime, pillow)")


class ServerUnavailable(MvtError):
    """No usable tritonserver here; the message says how to get one."""


class ServerStartError(MvtError):
    """tritonserver exited or did not become ready in time; the message holds its log tail."""


@dataclass(frozen=True)
class ServerInstall:
    binary: Path  # .../pytriton/tritonserver/bin/tritonserver
    backends: Path  # the wheel's backends/ (python/libtriton_python.so, ...)
    stub: Path  # python_backend_stubs/<X.Y>/triton_python_backend_stub for the env's Python
    env: Path  # the server environment (its bin/python3 runs python-backend models)

    @property
    def python(self) -> Path:
        return self.env / "bin" / "python3"


def server_env(env: Path | str | None = None) -> Path:
    return Path(env or os.environ.get(SERVER_ENV_VAR) or PROJECT_ROOT / ".server-venv")


_PROBE = r"""
import importlib.util, json, sys
import numpy
spec = importlib.util.find_spec("pytriton")  # importing pytriton needs its dependencies; finding it does not
root = spec.submodule_search_locations[0] if spec else None
print(json.dumps({"root": root, "python": "%d.%d" % sys.version_info[:2], "numpy": numpy.__version__}))
"""


def find_tritonserver(env: Path | str | None = None) -> ServerInstall:
    """Locate the tritonserver binary of the server environment; ServerUnavailable says what is missing."""
    env = server_env(env)
    python = env / "bin" / "python3"
    if not python.exists():
        raise ServerUnavailable(f"no server environment at {env}; {SETUP_HINT}")
    try:
        proc = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServerUnavailable(f"cannot run {python}: {exc}; {SETUP_HINT}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise ServerUnavailable(f"{python} cannot import numpy ({last}); {SETUP_HINT}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if int(info["numpy"].split(".")[0]) >= 2:
        raise ServerUnavailable(
            f"{env} has numpy {info['numpy']}: the python backend silently corrupts tensors with numpy 2; "
            f"install numpy<2 there ({SETUP_HINT})")
    if info["root"] is None:
        raise ServerUnavailable(f"nvidia-pytriton is not installed in {env}; {SETUP_HINT}")
    root = Path(info["root"]) / "tritonserver"
    install = ServerInstall(root / "bin" / "tritonserver", root / "backends",
                            root / "python_backend_stubs" / info["python"] / "triton_python_backend_stub", env)
    for path in (install.binary, install.backends / "python" / "libtriton_python.so", install.stub):
        if not path.exists():
            raise ServerUnavailable(f"{path} is missing from the nvidia-pytriton wheel in {env}; {SETUP_HINT}")
    return install


def prepare_backend_dir(install: ServerInstall, folder: Path | None = None) -> Path:
    """A project-owned backend directory: the wheel's backends, plus the python stub inside python/."""
    folder = Path(folder or install.env / "mvt-triton-backends")
    for backend in sorted(p for p in install.backends.iterdir() if p.is_dir()):
        target = folder / backend.name
        target.mkdir(parents=True, exist_ok=True)
        files = [f for f in backend.iterdir() if f.is_file()]
        if backend.name == "python":
            files.append(install.stub)
        for f in files:
            link = target / f.name
            if link.is_symlink() and Path(os.readlink(link)) == f:
                continue
            if link.exists() or link.is_symlink():
                link.unlink()
            link.symlink_to(f)
    return folder


def free_port() -> int:
    """A loopback port nobody listens on now (tests give each server its own ports)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """One tritonserver process on a repository, on loopback ports; a context manager.

        with TritonServer(repo, http_port=free_port(), ...) as server:
            ...  # server.http_url, server.grpc_url
    """

    def __init__(self, repository: Path, *, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 install: ServerInstall | None = None, log_file: Path | None = None,
                 ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S, extra_args: list[str] | None = None):
        self.repository = Path(repository).resolve()
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.install = install
        self.log_file = Path(log_file) if log_file else self.repository.parent / f"tritonserver-{http_port}.log"
        self.ready_timeout_s = ready_timeout_s
        self.extra_args = list(extra_args or [])
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> list[str]:
        install = self.install or find_tritonserver()
        return [str(install.binary), f"--model-repository={self.repository}",
                f"--backend-directory={prepare_backend_dir(install)}",
                f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
                f"--metrics-port={self.metrics_port}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
                "--metrics-address=127.0.0.1", "--exit-on-error=true", "--strict-readiness=true",
                "--exit-timeout-secs=5", *self.extra_args]

    def start(self) -> "TritonServer":
        if not self.repository.is_dir():
            raise ServerStartError(f"model repository {self.repository} does not exist; "
                                   "generate it with python -m triton_repo.build")
        self.install = self.install or find_tritonserver()
        cmd = self.command()
        env = dict(os.environ)
        # The python-backend stub takes its packages from the first python3 on PATH.
        env["PATH"] = f"{self.install.env / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env.pop("PYTHONPATH", None)
        env.pop("PYTHONHOME", None)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "wb") as log:
            # A session of its own: stop() signals the server and the python stubs it forked, nothing else.
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float | None = None) -> "TritonServer":
        deadline = time.monotonic() + (timeout_s or self.ready_timeout_s)
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerStartError(f"tritonserver exited with code {self.process.returncode} before it was "
                                       f"ready; its log ({self.log_file}) ends with:\n{self.log_tail()}")
            if self.is_ready():
                return self
            time.sleep(0.25)  # polling a health endpoint, not timing anything
        self.stop()
        raise ServerStartError(
            f"tritonserver was not ready within {timeout_s or self.ready_timeout_s:.0f} s (a python-backend stub "
            f"that cannot start hangs it); its log ({self.log_file}) ends with:\n{self.log_tail()}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (a clean shutdown takes ~3 s), then SIGKILL of its process group after `timeout_s`."""
        proc, self.process = self.process, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stubs left behind by a hung server
        except (ProcessLookupError, PermissionError):
            pass
        return proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def model_statistics(http_url: str, model: str) -> dict:
    """The statistics endpoint for one model (inference_count, execution_count, ...), with no client library."""
    with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/stats", timeout=10) as r:
        stats = json.loads(r.read())["model_stats"]
    return next(s for s in stats if s["name"] == model)


def _probe(argv: list[str] | None = None) -> int:
    """python -m triton_repo.server: where is the server? (exit 2 with the reason when there is none)"""
    print(find_tritonserver())
    return 0


if __name__ == "__main__":  # pragma: no cover - a quick probe
    from export.core.cli import run_cli

    run_cli(_probe)
