"""perf_analyzer support (triton_repo/perf_analyzer.py) and scripts/load_test.py.

Unit tests: the --input-data encoder (Triton's 4-byte length prefix, round trip to the JPEG), the CSV
parser (on the CSV perf_analyzer 2.51 wrote here), the command, the missing-install error. The
`triton_server` tests run the real perf_analyzer for a few seconds against a served tiny model; they skip
without the server environment or perf_analyzer, and fail instead under MVT_REQUIRE_TRITON_SERVER=1
(scripts/setup_server_env.sh installs both).
"""

from __future__ import annotations

import base64
import json
import struct

import pytest

from export.models.testing import load_script
from triton_repo.perf_analyzer import (
    PerfAnalyzerError,
    PerfAnalyzerInstall,
    PerfAnalyzerUnavailable,
    PerfOptions,
    bytes_element,
    find_perf_analyzer,
    input_data_json,
    parse_csv,
    perf_analyzer_command,
    write_input_data,
)

# Written by perf_analyzer 2.51 (-f) against the tiny served model on this machine.
CSV_251 = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
    "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency\n"
    "2,59.8793,197,5595,1,119,7942,194,0,14123,18555,20949,25560\n"
)


def _load_test():
    return load_script("load_test")


def _decode_elements(raw: bytes) -> list[bytes]:
    """Triton's BYTES serialization read back independently: <uint32 LE length><bytes>, repeated."""
    out, i = [], 0
    while i < len(raw):
        (n,) = struct.unpack_from("<I", raw, i)
        out.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    assert i == len(raw), "trailing bytes after the last element"
    return out


# ------------------------------------------------------------------------------------------ unit tests

def test_bytes_element_has_little_endian_length_prefix():
    data = bytes(range(256)) * 3 + b"x"  # 769 bytes: 0x0301, so byte order matters
    element = bytes_element(data)
    assert element[:4] == b"\x01\x03\x00\x00" and element[4:] == data
    assert bytes_element(b"") == b"\x00\x00\x00\x00"


def test_input_data_json_decodes_back_to_the_jpegs():
    from triton_repo.testing import photo_bytes

    photos = photo_bytes()
    images = [photos["astronaut.jpg"], photos["chelsea.jpg"], photos["coffee.png"]]
    doc = json.loads(json.dumps(input_data_json(images)))  # what perf_analyzer reads: plain JSON
    assert list(doc) == ["data"] and len(doc["data"]) == 3  # one request per image, round-robin
    for entry, image in zip(doc["data"], images):
        assert list(entry) == ["image"]  # the ensemble's input (export.models.families.IMAGE_INPUT)
        raw = base64.b64decode(entry["image"]["b64"], validate=True)
        assert _decode_elements(raw) == [image]  # one element: the [1] BYTES tensor of a batch-1 request
    assert base64.b64decode(doc["data"][0]["image"]["b64"])[4:6] == b"\xff\xd8"  # a JPEG after the prefix


def test_input_data_written_atomically(tmp_path):
    path = write_input_data([b"abc"], tmp_path / "sub" / "in.json", input_name="img")
    assert json.loads(path.read_text()) == {"data": [{"img": {"b64": base64.b64encode(b"\x03\0\0\0abc").decode()}}]}
    assert [p.name for p in path.parent.iterdir()] == ["in.json"]  # no .partial left behind


def test_too_short_window_is_refused(tmp_path):
    from export.core.errors import OptionError

    install = PerfAnalyzerInstall(tmp_path / "perf_analyzer", tmp_path)
    with pytest.raises(OptionError, match="at least 500 ms"):
        from triton_repo.perf_analyzer import run_perf_analyzer

        run_perf_analyzer([b"x"], PerfOptions("127.0.0.1:1", window_ms=100), install, log=lambda _: None)


def test_input_data_needs_an_image():
    from export.core.errors import OptionError

    with pytest.raises(OptionError, match="at least one image"):
        input_data_json([])


def test_parse_csv_of_perf_analyzer_251():
    (r,) = parse_csv(CSV_251)
    assert r.concurrency == 2 and r.throughput == pytest.approx(59.88)
    assert (r.p50_ms, r.p90_ms, r.p95_ms, r.p99_ms) == (14.123, 18.555, 20.949, 25.56)  # usec -> ms
    assert r.server_queue_ms == 0.001 and r.server_compute_ms == pytest.approx(0.119 + 7.942 + 0.194)


def test_parse_csv_sorts_levels_and_ignores_the_metrics_table():
    header, row = CSV_251.splitlines()
    text = "\n".join([header, row.replace("2,59.8793", "8,71.5", 1), row]) + "\n\nServer Metrics\nGPU,x\n1,2\n"
    results = parse_csv(text)
    assert [r.concurrency for r in results] == [2, 8] and results[1].throughput == 71.5


@pytest.mark.parametrize("text", ["", "Request Rate,Inferences/Second\n1,2\n", "Concurrency,Inferences/Second\n"])
def test_parse_csv_rejects_other_tables(text):
    with pytest.raises(PerfAnalyzerError, match="not a perf_analyzer concurrency CSV"):
        parse_csv(text)


def test_command_uses_real_data_and_fixed_time_windows(tmp_path):
    install = PerfAnalyzerInstall(tmp_path / "bin" / "perf_analyzer", tmp_path / "lib")
    cmd = perf_analyzer_command(install, PerfOptions("127.0.0.1:8000", window_ms=2500), tmp_path / "in.json",
                                tmp_path / "out.csv", 4)
    joined = " ".join(cmd)
    assert cmd[0] == str(install.binary)
    for part in ("-m embed", "-u 127.0.0.1:8000", "-i http", f"--input-data {tmp_path / 'in.json'}",
                 "--concurrency-range 4:4:1", "--measurement-mode time_windows", "--measurement-interval 2500",
                 "--max-trials 3", f"-f {tmp_path / 'out.csv'}"):
        assert part in joined, part
    env = install.environment({"LD_LIBRARY_PATH": "/other"})
    assert env["LD_LIBRARY_PATH"] == f"{tmp_path / 'lib'}:/other"


def test_missing_perf_analyzer_names_the_setup_command(tmp_path):
    with pytest.raises(PerfAnalyzerUnavailable, match="setup_perf_analyzer.sh"):
        find_perf_analyzer(tmp_path / "no-server-env")


def test_load_test_perf_analyzer_flag_without_install_is_exit_2(tmp_path, monkeypatch, capsys):
    from triton_repo.server import SERVER_ENV_VAR

    monkeypatch.setenv(SERVER_ENV_VAR, str(tmp_path / "empty-env"))
    assert _load_test().main(["--perf-analyzer"]) == 2
    assert "setup_perf_analyzer.sh" in capsys.readouterr().err


def test_served_vs_direct_divides_by_the_direct_figures_around_each_round():
    served = iter([30.0, 60.0, 45.0])
    direct = iter([(40.0, 20.0), (20.0, 20.0), (60.0, 20.0), (40.0, 20.0)])
    out = _load_test().served_vs_direct(lambda: next(served), lambda: next(direct), 3, 8, 4)
    assert out["model_only"]["ratios"] == [1.0, 1.5, 0.9]  # 30/30, 60/40, 45/50
    assert out["model_only"]["ratio"] == 1.0 and out["with_preprocessing"]["ratio"] == 2.25


# ------------------------------------------------------------------------------------------ real runs

@pytest.fixture(scope="module")
def served_tiny(tmp_path_factory):
    from triton_repo.build import RepoOptions, build_repository
    from triton_repo.server import TritonServer, free_port
    from triton_repo.testing import import_or_skip, skip_unless_required, tiny_artifacts, tritonserver_or_skip

    import_or_skip("tritonclient.http")
    install = tritonserver_or_skip()
    try:
        perf = find_perf_analyzer()
    except PerfAnalyzerUnavailable as exc:
        skip_unless_required(str(exc))
    root = tmp_path_factory.mktemp("perf-analyzer")
    # intra_op_threads 0: the encoder's default, a run per image on every core (backend_models/encoder.py)
    repo = build_repository(RepoOptions(tiny_artifacts(root), root / "repo", backend="python", max_batch=8),
                            log=lambda _: None).out
    with TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                      install=install, ready_timeout_s=90) as server:
        yield server, perf, repo


@pytest.mark.triton_server
def test_perf_analyzer_measures_the_served_ensemble(served_tiny):
    from triton_repo.perf_analyzer import run_perf_analyzer
    from triton_repo.server import model_statistics
    from triton_repo.testing import photo_bytes

    server, perf, _ = served_tiny
    before = model_statistics(server.http_url, "encoder")["inference_count"]
    (result,) = run_perf_analyzer(list(photo_bytes().values()),
                                  PerfOptions(server.http_url, concurrencies=[2], window_ms=1000), perf,
                                  log=lambda _: None)
    assert result.concurrency == 2 and result.throughput > 0
    assert 0 < result.p50_ms <= result.p99_ms
    # zero errors: perf_analyzer exits non-zero on any failed request; the server answered at least 3 windows' worth
    served = model_statistics(server.http_url, "encoder")["inference_count"] - before
    assert served >= 3 * result.throughput * 0.5, (served, result)


@pytest.mark.triton_server
def test_perf_analyzer_reports_a_failing_request(served_tiny):
    from triton_repo.perf_analyzer import run_perf_analyzer

    server, perf, _ = served_tiny
    with pytest.raises(PerfAnalyzerError, match="preprocess"):
        run_perf_analyzer([b"not an image"], PerfOptions(server.http_url, concurrencies=[1], window_ms=500), perf,
                          log=lambda _: None)
    assert server.is_ready()


@pytest.mark.triton_server
def test_fault_checks_pass_on_a_healthy_server(served_tiny):
    from triton_repo.testing import photo_bytes

    server, _, _ = served_tiny
    out = _load_test().fault_checks(server.http_url, "http", "embed", list(photo_bytes().values()))
    assert out["problems"] == [] and out["bad_sent"] == 3 and out["good_sent"] == 6


@pytest.mark.triton_server
def test_batch_parallel_encoder_matches_onnxruntime(served_tiny):
    """A batch of 5 through the served encoder (a run per image on concurrent workers, then concatenated) equals
    model.onnx run directly on the same pixels, row for row and in order."""
    import numpy as np

    from export.core.interface import INPUT_NAME
    from export.core.preprocessing import ClipPreprocessing, pixel_values_from_bytes
    from export.runners.ort import OnnxRuntimeRunner
    from triton_repo.testing import photo_bytes

    httpclient = pytest.importorskip("tritonclient.http")
    server, _, repo = served_tiny
    cfg = ClipPreprocessing.from_file(repo / "preprocess" / "1" / "preprocessor_config.json")
    photos = list(photo_bytes().values())
    pixels = np.stack([pixel_values_from_bytes(photos[i % len(photos)], cfg) for i in range(5)])  # (5, 3, H, W)
    with httpclient.InferenceServerClient(server.http_url) as client:
        inp = httpclient.InferInput(INPUT_NAME, list(pixels.shape), "FP32")
        inp.set_data_from_numpy(pixels)
        served = client.infer("encoder", [inp]).as_numpy("last_hidden_state")
    with OnnxRuntimeRunner(repo / "encoder" / "1" / "model.onnx", output_names=["last_hidden_state"]) as runner:
        direct = runner.infer({INPUT_NAME: pixels})["last_hidden_state"]
    assert served.shape == direct.shape and served.shape[0] == 5
    np.testing.assert_allclose(served, direct, rtol=1e-4, atol=1e-4)
    assert not np.allclose(served[0], served[1])  # different photos: a mixed-up order would show
