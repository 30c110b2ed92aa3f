"""A real tritonserver serves the generated repository (python backend, CPU), over HTTP and gRPC.

Needs the server environment (scripts/setup_server_env.sh: .server-venv with the nvidia-pytriton
wheel, numpy<2, onnxruntime, pillow) and tritonclient; skips with the reason otherwise, and fails
instead under MVT_REQUIRE_TRITON_SERVER=1 (triton_repo.testing.skip_unless_required). One server
for the whole session, on loopback ports, stopped at the end whatever happens.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from triton_repo.testing import (
    ServedRepository,
    bomb_png,
    cosine_rows,
    import_or_skip,
    photo_bytes,
    reference_pooler,
    tiny_artifacts,
    tritonserver_or_skip,
)

pytestmark = pytest.mark.triton_server
httpclient = import_or_skip("tritonclient.http")
grpcclient = import_or_skip("tritonclient.grpc")
InferenceServerException = import_or_skip("tritonclient.utils").InferenceServerException

MIN_COSINE = 0.9999
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    from triton_repo.build import RepoOptions, build_repository
    from triton_repo.server import TritonServer, free_port

    install = tritonserver_or_skip()
    root = tmp_path_factory.mktemp("triton-serve")
    artifacts = tiny_artifacts(root)
    repo = build_repository(RepoOptions(artifacts, root / "repo", backend="python", max_batch=8,
                                        intra_op_threads=1), log=lambda _: None).out
    server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          install=install, ready_timeout_s=90)
    with server:
        yield ServedRepository(server, repo, artifacts, root / "checkpoint")


@pytest.fixture(scope="session")
def photos():
    return photo_bytes()


@pytest.fixture(scope="session")
def references(served, photos):
    return {name: reference_pooler(served.checkpoint, [data])[0] for name, data in photos.items()}


def _http_infer(url: str, model: str, images: list[bytes], input_name: str = "image", output: str = "pooler_output"):
    with httpclient.InferenceServerClient(url) as client:
        inp = httpclient.InferInput(input_name, [len(images), 1], "BYTES")
        inp.set_data_from_numpy(np.array([[b] for b in images], dtype=np.object_))
        return client.infer(model, [inp]).as_numpy(output)


def _grpc_infer(url: str, model: str, images: list[bytes], pooled: str = "pooler_output"):
    with grpcclient.InferenceServerClient(url) as client:
        inp = grpcclient.InferInput("image", [len(images), 1], "BYTES")
        inp.set_data_from_numpy(np.array([[b] for b in images], dtype=np.object_))
        out = [grpcclient.InferRequestedOutput(pooled), grpcclient.InferRequestedOutput("last_hidden_state")]
        result = client.infer(model, [inp], outputs=out)
        return result.as_numpy(pooled), result.as_numpy("last_hidden_state")


def _assert_ready(served):
    assert served.server.is_ready(), f"server not ready after a bad request:\n{served.server.log_tail()}"


def test_http_jpeg_and_png_match_transformers(served, photos, references):
    for name, data in photos.items():
        out = _http_infer(served.http_url, served.ensemble, [data])
        cos = cosine_rows(out, references[name][None])
        assert out.shape == (1, 64) and cos.min() >= MIN_COSINE, (name, cos)


def test_grpc_batch_of_three_matches_transformers(served, photos, references):
    names = ["astronaut.jpg", "coffee.png", "chelsea.png"]
    pooled, hidden = _grpc_infer(served.grpc_url, served.ensemble, [photos[n] for n in names])
    assert pooled.shape == (3, 64) and hidden.shape == (3, 17, 64)
    cos = cosine_rows(pooled, np.stack([references[n] for n in names]))
    assert cos.min() >= MIN_COSINE, cos


def test_dynamic_batching_batches_concurrent_requests(served, photos):
    from triton_repo.server import model_statistics

    before = model_statistics(served.http_url, "encoder")
    requests = 48
    data = photos["chelsea.jpg"]

    def one(_):
        return _http_infer(served.http_url, served.ensemble, [data])

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(one, range(requests)))
    assert all(r.shape == (1, 64) for r in results)
    after = model_statistics(served.http_url, "encoder")
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == requests
    assert executions < requests, f"{executions} encoder executions for {requests} concurrent requests: no batching"


@pytest.mark.parametrize("case", ["corrupt", "empty", "bomb", "truncated"])
def test_bad_images_fail_their_own_request(served, photos, case):
    data = {"corrupt": b"\x89PNG\r\n\x1a\n definitely not a png", "empty": b"", "bomb": bomb_png(100_000, 100_000),
            "truncated": photos["astronaut.jpg"][:2000]}[case]
    with pytest.raises(InferenceServerException, match="preprocess:"):
        _http_infer(served.http_url, served.ensemble, [data])
    _assert_ready(served)
    # and the next good request is served
    assert _http_infer(served.http_url, served.ensemble, [photos["coffee.png"]]).shape == (1, 64)


def test_bad_image_over_grpc(served):
    with pytest.raises(InferenceServerException, match="pixels"):
        _grpc_infer(served.grpc_url, served.ensemble, [bomb_png(100_000, 100_000)])
    _assert_ready(served)


def test_wrong_input_name_is_a_request_error(served, photos):
    with pytest.raises(InferenceServerException, match="image|input"):
        _http_infer(served.http_url, served.ensemble, [photos["coffee.png"]], input_name="pixels")
    _assert_ready(served)


def test_serve_cli_runs_in_foreground_and_stops_on_sigterm(served, tmp_path):
    from triton_repo.server import free_port

    http = free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "triton_repo.serve", str(served.repository), "--http-port", str(http),
           "--grpc-port", str(free_port()), "--metrics-port", str(free_port()), "--log-file", str(log),
           "--ready-timeout", "90"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the CLI prints one line once the server is ready
        assert "tritonserver ready" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        images = [b"not an image"] * 0 or [photo_bytes()["coffee.png"]]
        assert _http_infer(f"127.0.0.1:{http}", "embed", images).shape == (1, 64)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "stopped" in out


def test_serve_cli_missing_repository_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "triton_repo.serve", str(tmp_path / "nothing")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_server_that_cannot_start_fails_with_its_log(tmp_path):
    """A repository whose model cannot load: the server exits and the error holds its log."""
    from triton_repo.server import ServerStartError, TritonServer, free_port

    install = tritonserver_or_skip()
    bad = tmp_path / "repo" / "broken"
    (bad / "1").mkdir(parents=True)
    (bad / "config.pbtxt").write_text('name: "broken"\nbackend: "no_such_backend"\nmax_batch_size: 1\n')
    server = TritonServer(tmp_path / "repo", http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          install=install, ready_timeout_s=60)
    start = time.monotonic()
    with pytest.raises(ServerStartError, match="broken|backend"):
        with server:
            pass
    assert time.monotonic() - start < 60
    assert server.process is None


# ------------------------------------------------------------------ UNICOM: a served embedding from JPEG bytes

@pytest.fixture(scope="module")
def served_unicom(tmp_path_factory):
    """A tiny UNICOM exported from its released-format .pt file, served as `embed` (as exported) and as
    `embed_normalized` (--normalize) by one server: the second repository's extra models are moved into the
    first (preprocess and encoder are the same files in both)."""
    import shutil

    from triton_repo.build import RepoOptions, build_repository
    from triton_repo.server import TritonServer, free_port

    install = tritonserver_or_skip()
    root = tmp_path_factory.mktemp("triton-unicom")
    artifacts = tiny_artifacts(root, "unicom", max_batch=4)
    repo = build_repository(RepoOptions(artifacts, root / "repo", backend="python", max_batch=4, intra_op_threads=1),
                            log=lambda _: None).out
    other = build_repository(RepoOptions(artifacts, root / "repo-normalized", backend="python", max_batch=4,
                                         intra_op_threads=1, name="embed_normalized", normalize=True),
                             log=lambda _: None).out
    for model in ("normalize", "embed_normalized"):
        shutil.copytree(other / model, repo / model)
    server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          install=install, ready_timeout_s=90)
    with server:
        yield ServedRepository(server, repo, artifacts, next((root / "checkpoint").glob("*.pt")))


def test_unicom_embedding_for_jpeg_bytes_matches_the_module(served_unicom, photos):
    for name in ("astronaut.jpg", "chelsea.jpg", "coffee.png"):
        data = photos[name]
        out = _http_infer(served_unicom.http_url, "embed", [data], output="embedding")
        ref = reference_pooler(served_unicom.checkpoint, [data])  # (1, 96): the head's output, unnormalized
        assert out.shape == (1, 96) and cosine_rows(out, ref).min() >= MIN_COSINE, name
        assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max(), name


def test_unicom_grpc_batch_of_three(served_unicom, photos):
    names = ["astronaut.jpg", "coffee.png", "chelsea.jpg"]
    images = [photos[n] for n in names]
    embedding, hidden = _grpc_infer(served_unicom.grpc_url, "embed", images, pooled="embedding")
    assert embedding.shape == (3, 96) and hidden.shape == (3, 16, 128)  # no class token: 4 x 4 patches
    ref = np.concatenate([reference_pooler(served_unicom.checkpoint, [b]) for b in images])
    assert cosine_rows(embedding, ref).min() >= MIN_COSINE
    tokens = np.concatenate([reference_pooler(served_unicom.checkpoint, [b], "last_hidden_state") for b in images])
    assert cosine_rows(hidden.reshape(-1, 128), tokens.reshape(-1, 128)).min() >= MIN_COSINE


def test_unicom_normalized_ensemble(served_unicom, photos):
    images = [photos["astronaut.jpg"], photos["chelsea.jpg"]]
    raw = _http_infer(served_unicom.http_url, "embed", images, output="embedding")
    unit = _http_infer(served_unicom.http_url, "embed_normalized", images, output="embedding")
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)  # off by default
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=0, atol=1e-6)
    _assert_ready(served_unicom)
