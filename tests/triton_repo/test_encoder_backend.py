"""The python-backend encoder (triton_repo/backend_models/encoder.py) in this process, under a stand-in for
Triton's `triton_python_backend_utils`: execute() queues each batch and returns; every request is answered
once, through its response sender, with its own rows, whichever run of which batch fails."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

WAIT_S = 60.0  # generous: the runs are milliseconds; only a lost response waits this long


def _request(pb, **inputs: np.ndarray):
    return pb.Request([pb.Tensor(name, array) for name, array in inputs.items()])


def _tensors(response) -> dict[str, np.ndarray]:
    return {t.name(): t.as_numpy() for t in response.output_tensors()}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    from triton_repo.build import RepoOptions, build_repository
    from triton_repo.testing import tiny_artifacts

    root = tmp_path_factory.mktemp("encoder-backend")
    return build_repository(RepoOptions(tiny_artifacts(root, max_batch=8), root / "repo", backend="python"),
                            log=lambda _: None).out


@pytest.fixture
def load(repo, monkeypatch):
    """load(cores=2, **parameters) -> (model, pb): the encoder's model.py, initialized on the tiny model."""
    from google.protobuf import json_format

    from triton_repo import config as tc
    from triton_repo.testing import fake_pb_utils

    pb = fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    models: list = []

    def make(cores: int = 2, **parameters: str):
        spec = importlib.util.spec_from_file_location("encoder_under_test", repo / "encoder" / "1" / "model.py")
        assert spec is not None and spec.loader is not None
        module: Any = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module._usable_cores = lambda: cores  # the same on any machine
        config = json_format.MessageToDict(tc.parse_config(repo / "encoder" / "config.pbtxt"),
                                           preserving_proto_field_name=True)
        config.setdefault("parameters", {}).update({k: {"string_value": v} for k, v in parameters.items()})
        model = module.TritonPythonModel()
        model.initialize({"model_repository": str(repo / "encoder"), "model_version": "1",
                          "model_config": json.dumps(config)})
        models.append(model)
        return model, pb

    yield make
    for model in models:
        model.finalize()


def _pixels(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 56, 56)).astype(np.float32)  # (n, 3, H, W)


def _answers(requests: list) -> list:
    """Each request's single response, after its final flag."""
    for r in requests:
        assert r.sender.answered.wait(WAIT_S), "a request was never answered"
    out = []
    for r in requests:
        assert len(r.sender.sent) == 1, r.sender.sent  # one response, sent with the final flag
        response, flags = r.sender.sent[0]
        assert flags == 1 and response is not None
        out.append(response)
    return out


def _direct(repo: Path, pixels: np.ndarray) -> dict[str, np.ndarray]:
    from export.runners.ort import OnnxRuntimeRunner

    with OnnxRuntimeRunner(repo / "encoder" / "1" / "model.onnx") as runner:
        return runner.infer({"pixel_values": pixels})


@pytest.mark.parametrize("parameters", [{}, {"batch_parallel": "0"}], ids=["per-image", "whole-batch"])
def test_every_request_gets_its_own_rows(load, repo, parameters):
    model, pb = load(**parameters)
    sizes = [1, 3, 2, 1]
    pixels = _pixels(sum(sizes), seed=0)  # (7, 3, H, W)
    bounds = np.cumsum([0, *sizes])
    requests = [_request(pb, pixel_values=pixels[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    assert model.execute(requests[:3]) is None  # answered through the senders
    assert model.execute(requests[3:]) is None  # the next batch while the first may still run
    direct = _direct(repo, pixels)
    for (a, b), response in zip(zip(bounds[:-1], bounds[1:]), _answers(requests)):
        assert not response.has_error()
        assert set(_tensors(response)) == set(model.output_names)
        for name in model.output_names:
            np.testing.assert_allclose(_tensors(response)[name], direct[name][a:b], rtol=1e-4, atol=1e-5)
    assert not np.allclose(direct["pooler_output"][0], direct["pooler_output"][1])  # a mix-up would show


def test_request_tensors_are_copied_before_execute_returns(load, repo):
    """The backend frees request tensors when execute returns; the queued runs must not read them."""
    model, pb = load()
    pixels = _pixels(2, seed=1)
    request = _request(pb, pixel_values=pixels.copy())
    model.execute([request])
    pb.get_input_tensor_by_name(request, "pixel_values").as_numpy()[:] = 0.0  # what freed, reused memory holds
    (response,) = _answers([request])
    np.testing.assert_allclose(_tensors(response)["pooler_output"], _direct(repo, pixels)["pooler_output"],
                               rtol=1e-4, atol=1e-5)


def test_a_failed_run_fails_its_batch_only(load, repo):
    model, pb = load()
    run = model.session.run

    def failing(names, feed):
        if np.any(feed["pixel_values"] == 7.0):  # the marked image
            raise RuntimeError("injected run failure")
        return run(names, feed)

    model.session = types.SimpleNamespace(run=failing)
    bad = _pixels(2, seed=2)
    bad[1] = 7.0
    batch = [_request(pb, pixel_values=bad), _request(pb, pixel_values=_pixels(1, seed=3))]
    missing = _request(pb, other=_pixels(1, seed=4))
    model.execute([*batch, missing])
    later_pixels = _pixels(1, seed=5)
    later = _request(pb, pixel_values=later_pixels)
    model.execute([later])
    answers = _answers([*batch, missing, later])
    assert all(a.has_error() and "injected run failure" in a.error().message() for a in answers[:2])
    assert answers[2].has_error() and "missing input pixel_values" in answers[2].error().message()
    assert not answers[3].has_error()  # the instance goes on
    np.testing.assert_allclose(_tensors(answers[3])["pooler_output"], _direct(repo, later_pixels)["pooler_output"],
                               rtol=1e-4, atol=1e-5)


def test_execute_waits_when_the_workers_are_full(load):
    """Two runs per worker may wait or run; beyond that execute blocks, so requests stay in Triton's queue."""
    model, pb = load(cores=2)
    release, started = threading.Event(), threading.Semaphore(0)
    calls: list = []
    run = model.session.run

    def held(names, feed):
        calls.append(1)
        started.release()
        release.wait(WAIT_S)
        return run(names, feed)

    model.session = types.SimpleNamespace(run=held)
    requests = [_request(pb, pixel_values=_pixels(1, seed=10 + i)) for i in range(6)]
    caller = threading.Thread(target=model.execute, args=(requests,))
    caller.start()
    try:
        assert started.acquire(timeout=WAIT_S) and started.acquire(timeout=WAIT_S)  # both workers busy
        caller.join(0.5)
        assert caller.is_alive(), "execute queued more than two runs per worker"
        assert len(calls) == 2
    finally:
        release.set()
        caller.join(WAIT_S)
    assert not caller.is_alive()
    assert all(not a.has_error() for a in _answers(requests))
