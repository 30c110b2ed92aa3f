"""Peak-memory estimates from the graph's shapes (export.graph.footprint) and the refusals built on them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from export.core.errors import MemoryBudgetError
from export.core.interface import INPUT_NAME
from export.core.memory import available_bytes
from export.graph import footprint
from export.graph.attention import lower_attention
from export.graph.footprint import check_fits, estimate_peak, weightless
from export.runners.ort import OnnxRuntimeRunner


@pytest.fixture(scope="module")
def graphs(exported, tmp_path_factory):
    """The tiny RoPE model's any-resolution graph with decomposed and mha attention, as files."""
    ckpt, _, path = exported("mlcd-rope2d")
    folder = tmp_path_factory.mktemp("footprint")
    files = {}
    for form in ("decomposed", "mha"):
        files[form] = folder / f"{form}.onnx"
        onnx.save(lower_attention(onnx.load(str(path)), form), str(files[form]))
    return ckpt, files


def _tokens(ckpt, side: int) -> int:
    return (side // ckpt.patch_size) ** 2 + 1


def test_decomposed_attention_is_dominated_by_the_scores(graphs):
    ckpt, files = graphs
    side = 14 * 40
    estimate = estimate_peak(files["decomposed"], {INPUT_NAME: (2, 3, side, side)})
    s, heads = _tokens(ckpt, side), ckpt.config.num_attention_heads
    name, shape, size = estimate.largest
    assert shape == (2, heads, s, s) and size == 2 * heads * s * s * 4  # (B, H, S, S) float32
    assert estimate.activations >= 2 * size  # the scores and their softmax live at once
    weights = sum(int(np.prod(t.dims)) * 4 for t in onnx.load(str(files["decomposed"])).graph.initializer
                  if t.data_type == onnx.TensorProto.FLOAT)
    assert estimate.weights == pytest.approx(weights * footprint.WEIGHT_COPIES, rel=0.01)


def test_mha_grows_linearly_in_the_tokens(graphs):
    ckpt, files = graphs
    light = weightless(files["mha"])  # parsed once, estimated at many sizes
    small, large = (estimate_peak(light, {INPUT_NAME: (1, 3, side, side)}).activations for side in (14 * 40, 14 * 80))
    ratio = _tokens(ckpt, 14 * 80) / _tokens(ckpt, 14 * 40)  # ~4
    assert large / small == pytest.approx(ratio, rel=0.1)  # not ratio^2: no [S, S] tensor
    decomposed = [estimate_peak(files["decomposed"], {INPUT_NAME: (1, 3, side, side)}).activations
                  for side in (14 * 40, 14 * 80)]
    assert decomposed[1] / decomposed[0] > 0.8 * ratio ** 2


def test_check_fits_refuses_with_the_estimate_and_what_to_change(graphs):
    _, files = graphs
    estimate = estimate_peak(files["decomposed"], {INPUT_NAME: (1, 3, 560, 560)})
    assert check_fits(estimate, what="x", change="y", available=10 * estimate.total) is estimate
    with pytest.raises(MemoryBudgetError, match=r"--size 560 560 would need about .* GiB .*use a smaller --size"):
        check_fits(estimate, what="--size 560 560", change="use a smaller --size", available=estimate.total // 2)
    # a loaded session only adds its activations
    check_fits(estimate, what="x", change="y", available=int(estimate.activations / footprint.HEADROOM) + 1,
               session_loaded=True)


def test_runner_refuses_before_running_and_remembers_what_fits(graphs, monkeypatch):
    _, files = graphs
    with OnnxRuntimeRunner(files["decomposed"], providers=["CPUExecutionProvider"]) as runner:
        pixels = np.zeros((1, 3, 56, 56), np.float32)
        runner.infer({INPUT_NAME: pixels})
        first = runner.last_estimate
        runner.infer({INPUT_NAME: pixels[:, :, :28, :42]})  # smaller on every axis: not estimated again
        assert runner.last_estimate is first
        monkeypatch.setattr(footprint, "available_bytes", lambda: 64 * 1024**2)
        with pytest.raises(MemoryBudgetError, match="--attention mha"):
            runner.infer({INPUT_NAME: np.zeros((1, 3, 1400, 1400), np.float32)})


def test_available_memory_is_read_on_linux():
    free = available_bytes()
    assert free is None or free > 0
