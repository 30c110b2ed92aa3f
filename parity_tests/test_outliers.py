"""Activation outliers (issue 9): trained ViTs carry a few LayerNorm output channels 10-100x the rest.

The outlier models (tiny_models.save_outlier_checkpoint: gain 60 on 2 of 96 channels of every
pre-attention and pre-MLP LayerNorm) are exported in both families, then:
- fp32 parity passes with scale-aware element-wise thresholds, and a wrong export still fails;
- int8 without the recipe misses pooled cosine 0.99 on held-out photos; the recipe (outlier-channel
  splitting, smoothing where a LayerNorm has more outliers, then the per-layer fallback) holds pooled
  >= 0.99 and tokens >= 0.98 on every held-out view with at most a quarter of the layers in float, on
  these models and on outlier models it was not tuned on (issue 23);
- fp8 is measured on them too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.core.images import held_out_photos, pixel_values
from export.core.interface import INPUT_NAME
from export.pipeline import BuildOptions, build

FAMILIES = ["mlcd-rope2d", "clip-vision"]
SIZE = (56, 56)


@pytest.fixture(scope="module")
def outliers(tmp_path_factory):
    """family -> (checkpoint, canonical fp32 model.onnx at 56x56, calibration feeds), built once."""
    from export.graph.trace import ExportShape, export_canonical
    from export.models.families import family_by_name
    from export.models.loading import load_folder
    from export.precision.calibration import calibration_feeds, calibration_images
    from parity_tests.tiny_models import save_outlier_checkpoint

    cache = {}

    def get(family: str):
        if family not in cache:
            root = tmp_path_factory.mktemp(f"outlier-{family}")
            ckpt = load_folder(save_outlier_checkpoint(family_by_name(family), root / "ckpt"))
            path = root / "fp32" / "model.onnx"
            path.parent.mkdir()
            export_canonical(ckpt, ExportShape(*SIZE), path)
            images, _ = calibration_images(None, log=lambda _: None)
            cache[family] = (ckpt, path, calibration_feeds(ckpt.processor, images, SIZE, INPUT_NAME))
        return cache[family]

    return get


def _held_out(ckpt, onnx_path) -> dict[str, float]:
    """Minimum cosine against PyTorch on the 28 held-out photo views, per output (Q/DQ as TensorRT runs it)."""
    from export.core.metrics import compare
    from export.runners.ort import OnnxRuntimeRunner
    from export.runners.pyt import TorchRunner

    x = pixel_values(ckpt.processor, [p.image for p in held_out_photos()], SIZE).numpy()
    with TorchRunner(ckpt) as torch_runner, OnnxRuntimeRunner(onnx_path, "exact") as ort_runner:
        ref, act = torch_runner.infer({INPUT_NAME: x}), ort_runner.infer({INPUT_NAME: x})
    return {name: compare(ref[name], act[name])["min_cosine"] for name in ("pooler_output", "last_hidden_state")}


def _build(folder, out, **kwargs):
    return build(BuildOptions(model=str(folder), out=out, runtime="none", **kwargs), log=lambda _: None)


def _channels(stats) -> np.ndarray:
    """Per-channel max |x| of one tensor's TensorStats (collected with per_channel)."""
    assert stats.channel_max_abs is not None
    return stats.channel_max_abs


def _folder(canonical):
    """The checkpoint folder beside an outlier model's canonical export (see the fixture)."""
    return canonical.parent.parent / "ckpt"


# ------------------------------------------------------------------------------------------ fp32

def test_outlier_models_have_outliers(outliers):
    from export.precision.smooth import MIN_SPREAD, smoothable, spread
    from export.precision.stats import collect_stats

    ckpt, path, feeds = outliers("mlcd-rope2d")
    targets, _ = smoothable(onnx.load(str(path), load_external_data=False))
    assert len(targets) == 2 * ckpt.config.num_hidden_layers  # both pre-norms of every layer
    tensors = [t.tensor for t in targets]
    stats = collect_stats(path, feeds[:2], tensors, per_channel=tensors, log=lambda _: None).stats
    assert all(spread(_channels(stats[t])) > 5 * MIN_SPREAD for t in tensors)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_parity_holds_at_outlier_magnitudes(outliers, family):
    """An absolute max-abs bound failed these correct exports; the scale-aware one passes them."""
    from export.check.parity import onnx_parity
    from export.graph.trace import ExportShape

    ckpt, path, _ = outliers(family)
    report = onnx_parity(ckpt, ExportShape(*SIZE), path)
    assert report.passed, report.checklist()
    hidden = [m for m in report.measured if m["output"] == "last_hidden_state"]
    assert max(m["max_abs"] / m["max_abs_rel"] for m in hidden) > 20  # magnitudes of a trained ViT, not ~3
    assert {c.metric for c in report.checks} >= {"min_cosine", "max_abs_rel"}


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_parity_still_fails_a_wrong_export(outliers, family, tmp_path):
    """Negative control at the same scale: the last linear layer's weights off by 0.1%.

    Its cosine still rounds to 1 (0.9999998), so only the element-wise check can catch it."""
    from onnx import numpy_helper

    from export.check.parity import onnx_parity
    from export.graph.trace import ExportShape

    ckpt, path, _ = outliers(family)
    model = onnx.load(str(path))
    weights = {t.name: t for t in model.graph.initializer}
    last = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights][-1]
    w = numpy_helper.to_array(weights[last.input[1]])
    noise = 1 + 1e-3 * np.random.default_rng(0).standard_normal(w.shape)
    weights[last.input[1]].CopyFrom(numpy_helper.from_array((w * noise).astype(np.float32), last.input[1]))
    wrong = tmp_path / "wrong.onnx"
    onnx.save(model, str(wrong))
    report = onnx_parity(ckpt, ExportShape(*SIZE), wrong)
    assert not report.passed
    failed = {c.metric for c in report.checks if not c.passed}
    assert failed == {"max_abs_rel"}, report.checklist()


def test_max_abs_rel_is_scale_free():
    from export.core.metrics import compare

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 17, 96)).astype(np.float32)
    act = ref + 1e-5 * rng.standard_normal(ref.shape).astype(np.float32)
    small, large = compare(ref, act), compare(1000 * ref, 1000 * act)
    assert large["max_abs"] > 500 * small["max_abs"]
    assert large["max_abs_rel"] == pytest.approx(small["max_abs_rel"], rel=1e-3)


# ------------------------------------------------------------------------------------------ smoothing

def test_smoothing_keeps_the_function_and_balances_the_channels(outliers, tmp_path):
    import shutil

    from export.precision.smooth import smooth_with_factors, smoothing_tensors
    from export.precision.stats import collect_stats
    from export.runners.ort import ort_session

    ckpt, canonical, feeds = outliers("clip-vision")
    folder = tmp_path / "m"
    shutil.copytree(canonical.parent, folder)
    src = folder / "model.onnx"
    # Every weight in model.onnx.data, as a > 2 GB model has them: smoothing must read and write there.
    model = onnx.load(str(src))
    onnx.save(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data")
    # The statistics the recipe collects in its one pass over the fp32 model (recipe._quantize).
    watched = smoothing_tensors(onnx.load(str(src), load_external_data=False), "int8")
    source_stats = collect_stats(src, feeds, watched, per_channel=watched, log=lambda _: None).stats
    report, factors = smooth_with_factors(src, feeds, dst=folder / "smoothed.onnx", stats=source_stats,
                                          log=lambda _: None)

    assert len(report["smoothed"]) == 2 * ckpt.config.num_hidden_layers
    assert set(factors) == {e["tensor"] for e in report["smoothed"]}
    for entry in report["smoothed"]:
        assert set(entry["outlier_channels"]) == {5, 70}  # OUTLIER_CHANNELS
        assert entry["spread_after"] < entry["spread"] / 4
    assert report["not_smoothed"]  # the embeddings' LayerNorm also feeds a residual Add: left alone
    smoothed = onnx.load(str(folder / "smoothed.onnx"), load_external_data=False)
    locations = {e.value for t in smoothed.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data", "smoothed.onnx.data"}  # rewritten tensors only in the new file

    x = feeds[0][INPUT_NAME]
    before = ort_session(src, "exact").run(None, {INPUT_NAME: x})
    after = ort_session(folder / "smoothed.onnx", "exact").run(None, {INPUT_NAME: x})
    for b, a in zip(before, after):
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b))
    tensors = [e["tensor"] for e in report["smoothed"]]
    stats = collect_stats(folder / "smoothed.onnx", feeds, tensors, per_channel=tensors, log=lambda _: None).stats
    for entry in report["smoothed"]:
        channel = _channels(stats[entry["tensor"]])
        assert channel.max() / np.median(channel) == pytest.approx(entry["spread_after"], rel=0.02)
        # Calibration ranges of the smoothed model follow from the fp32 model's per-channel ones.
        derived = source_stats[entry["tensor"]].divided(factors[entry["tensor"]])
        direct = stats[entry["tensor"]]
        assert (derived.min, derived.max) == pytest.approx((direct.min, direct.max), rel=1e-5)
        assert derived.channel_max_abs == pytest.approx(direct.channel_max_abs, rel=1e-5, abs=1e-6)


def test_smoothing_leaves_models_without_outliers_alone(exported, tmp_path):
    from export.core.images import sample_photos
    from export.precision.smooth import smooth_for_quantization

    ckpt, shape, canonical = exported("mlcd-rope2d")
    feeds = [{INPUT_NAME: pixel_values(ckpt.processor, sample_photos(2), (shape.height, shape.width)).numpy()}]
    dst = tmp_path / "smoothed.onnx"
    report = smooth_for_quantization(canonical, feeds, dst=dst, log=lambda _: None)
    assert report["smoothed"] == [] and not dst.exists()
    assert any("no outlier channels" in e["reason"] for e in report["not_smoothed"])
    assert smooth_for_quantization(canonical, feeds, dtype="fp8", dst=dst, log=lambda _: None)["skipped"]


def test_restoring_every_layer_gives_back_the_float_graph(outliers, tmp_path):
    from export.precision.fallback import quantized_layers, restore
    from export.precision.qdq import quantize_qdq
    from export.runners.ort import ort_session

    _, src, feeds = outliers("mlcd-rope2d")
    qdq = tmp_path / "qdq.onnx"
    quantize_qdq(src, qdq, feeds[:4], log=lambda _: None)
    q_model, f_model = onnx.load(str(qdq)), onnx.load(str(src))
    layers = {n.name for n in quantized_layers(q_model)}
    assert len(layers) == 1 + 6 * 2  # patch embedding + q, k, v, out, fc1, fc2 per layer
    every = restore(q_model, f_model, layers)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in every.graph.node)
    x = {INPUT_NAME: feeds[0][INPUT_NAME]}
    for a, b in zip(ort_session(every, "exact").run(None, x), ort_session(f_model, "exact").run(None, x)):
        np.testing.assert_array_equal(a, b)
    one = next(iter(sorted(layers)))
    partial = restore(q_model, f_model, {one})
    assert {n.name for n in quantized_layers(partial)} == layers - {one}


# ------------------------------------------------------------------------------------------ int8, fp8

@pytest.mark.parametrize("family", FAMILIES)
def test_int8_without_the_recipe_fails_on_outlier_models(outliers, family, tmp_path):
    """The test models are hard: plain Q/DQ (one per-tensor scale over the outlier channels) misses
    pooled cosine 0.99 on held-out photos."""
    from export.precision.fp16 import convert_file
    from export.precision.qdq import quantize_qdq

    ckpt, src, feeds = outliers(family)
    qdq = tmp_path / "qdq.onnx"
    quantize_qdq(src, qdq, feeds, log=lambda _: None)
    convert_file(qdq, tmp_path / "model.onnx", fp16=True)
    assert _held_out(ckpt, tmp_path / "model.onnx")["pooler_output"] < 0.99


def _int8_holds(result, out: Path, ckpt) -> None:
    """Item 4 of issue 23 on one outlier model: on every held-out view (parity.json is judged there) pooled
    >= 0.99 and tokens >= 0.98, with at most a quarter of the quantized layers kept in float."""
    parity = json.loads((out / "parity.json").read_text())
    assert result.parity_passed, parity["worst"]
    assert parity["views"] >= 48
    assert parity["worst"]["pooler_output"]["min_cosine"] >= 0.99
    assert parity["worst"]["last_hidden_state"]["min_cosine"] >= 0.98
    recipe = result.manifest["precision_recipe"]
    split = recipe["splitting"]["split"]
    assert len(split) == 2 * ckpt.config.num_hidden_layers and all(e["why"] for e in split)
    carried = [c for e in split for c in e.get("through_attention", [])]  # every layer's V, out_proj named
    assert len(carried) == ckpt.config.num_hidden_layers and all(c["out_projection"] for c in carried)
    fallback = recipe["fallback"]
    # a missed calibration target is allowed only as a recorded, reported miss (the held-out views pass)
    row = next(c for c in parity["checks"] if c["metric"] == "met_target")
    assert row["value"] == float(fallback["met_target"]) and row["enforced"] == fallback["met_target"]
    kept = fallback["kept_out_of_low_precision"]
    quantized = recipe["int8"]["quantized_nodes"]
    assert quantized == 1 + 6 * ckpt.config.num_hidden_layers  # the side paths are not counted as layers
    assert len(kept) <= quantized // 4 and all(e["why"] for e in kept)  # int8 stays int8
    # the layers kept out really have no Q/DQ (and run in fp32); the others do
    from export.precision.fallback import quantized_layers

    model = onnx.load(str(out / "model.onnx"))
    still = {n.name for n in quantized_layers(model)}
    assert not still & {e["node"] for e in kept} and len(still) == quantized - len(kept)
    assert set(recipe["fp32_nodes_from_fallback"]) == {e["node"] for e in kept}
    # the split's float paths stay fp32 in the fp16 rest (split.float_path_nodes)
    from export.precision.split import FLOAT_PATH_SUFFIX

    side = {n.name for n in model.graph.node if n.name.endswith(FLOAT_PATH_SUFFIX)}
    assert side and side <= set(recipe["fp32_nodes_from_splitting"])
    report = json.loads((out / "overflow_report.json").read_text())
    assert report["splitting"]["split"] == split and report["fallback"] == fallback


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_recipe_holds_on_outlier_models(outliers, family, tmp_path):
    ckpt, canonical, _ = outliers(family)
    out = tmp_path / "int8"
    _int8_holds(_build(_folder(canonical), out, precision="int8"), out, ckpt)


# Outlier models the recipe was not tuned on (issue 23): other gains, two- and three-channel patterns, CLIP-style
# and 2D RoPE, 3 and 6 layers, with and without a LayerNorm bias. Each attribute appears both ways (more, and
# the figures of every one: scripts/outlier_int8.py and the README's precision table).
UNSEEN = [
    pytest.param("mlcd-rope2d", 80, (5, 70), 3, None, id="rope-g80-c2-l3"),
    pytest.param("mlcd-rope2d", 30, (11, 47, 90), 6, None, id="rope-g30-c3-l6"),
    # held-out tokens 0.972 before the split was carried through attention (out_proj read softmax · V with the
    # outlier part in it: range 37 against 1.3); docs/precision.md
    pytest.param("clip-vision", 100, (11, 47, 90), 3, 4.0, id="clip-g100-c3-l3-bias"),
]
@pytest.mark.parametrize("family, gain, channels, layers, bias", UNSEEN)
def test_int8_recipe_holds_on_unseen_outlier_models(family, gain, channels, layers, bias, tmp_path):
    from export.models.families import family_by_name
    from export.models.loading import load_folder
    from parity_tests.tiny_models import save_outlier_checkpoint

    folder = save_outlier_checkpoint(family_by_name(family), tmp_path / "ckpt", gain=gain, channels=channels,
                                     layers=layers, bias=bias)
    out = tmp_path / "int8"
    _int8_holds(_build(folder, out, precision="int8"), out, load_folder(folder))


def test_splitting_keeps_the_function_and_the_int8_path_loses_the_outliers(outliers, tmp_path):
    import shutil

    from export.precision.qdq import calibration_tensors, quantizable_nodes
    from export.precision.smooth import MIN_SPREAD, smoothing_tensors, spread
    from export.precision.split import FLOAT_PATH_SUFFIX, split_outlier_channels
    from export.precision.stats import collect_stats
    from export.runners.ort import ort_session
    from parity_tests.tiny_models import OUTLIER_CHANNELS

    ckpt, canonical, feeds = outliers("mlcd-rope2d")
    folder = tmp_path / "m"
    shutil.copytree(canonical.parent, folder)
    src = folder / "model.onnx"
    graph = onnx.load(str(src), load_external_data=False)
    watched = smoothing_tensors(graph, "int8")
    stats = collect_stats(src, feeds, calibration_tensors(graph), per_channel=watched, log=lambda _: None).stats
    report, derived = split_outlier_channels(src, folder / "split.onnx", stats, feeds, log=lambda _: None)
    assert len(report["split"]) == 2 * ckpt.config.num_hidden_layers
    assert all(sorted(e["outlier_channels"]) == list(OUTLIER_CHANNELS) for e in report["split"])
    split = onnx.load(str(folder / "split.onnx"), load_external_data=False)
    side = [n for n in split.graph.node if n.name.endswith(FLOAT_PATH_SUFFIX)]
    # q, k and fc1 of every layer, and V's part after out_proj (carried through attention)
    assert len(side) == 4 * ckpt.config.num_hidden_layers
    carried = [c for e in report["split"] for c in e.get("through_attention", [])]
    assert {n.name for n in side} >= {c["out_projection"] + FLOAT_PATH_SUFFIX for c in carried}
    assert len(carried) == ckpt.config.num_hidden_layers
    assert not {n.name for n in side} & set(quantizable_nodes(split))
    assert set(quantizable_nodes(split)) == set(quantizable_nodes(graph))  # the same layers, still int8
    x = {INPUT_NAME: feeds[0][INPUT_NAME]}
    before, after = ort_session(src, "exact").run(None, x), ort_session(folder / "split.onnx", "exact").run(None, x)
    for b, a in zip(before, after):
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b))
    # what the int8 path quantizes: the ordinary channels' range, measured on the split model itself
    masked = [t for t in derived if t.endswith("/masked")]
    measured = collect_stats(folder / "split.onnx", feeds, masked, per_channel=masked, log=lambda _: None).stats
    for name in masked:
        kept = np.delete(_channels(measured[name]), list(OUTLIER_CHANNELS))
        assert spread(kept) < MIN_SPREAD and measured[name].max_abs < stats[name.removesuffix("/masked")].max_abs / 10
        assert derived[name].max == pytest.approx(measured[name].max, rel=1e-5)
    # out_proj's int8 input (softmax · V without the outlier part) was measured on the split model: a fraction of
    # what it reads in the fp32 model, where softmax · V carries the outlier channels
    out_proj = {n.name: n for n in split.graph.node}
    for entry in carried:
        x = out_proj[entry["out_projection"]].input[0]
        assert x not in stats and derived[x].max_abs < stats[x.removesuffix("/int8_part")].max_abs / 2


def test_int8_recipe_runs_the_fp32_model_once(outliers, tmp_path, monkeypatch):
    """The overflow scan, smoothing, calibration and the fallback's reference share one pass over
    the fp32 model (four before: about 3 minutes each on MLCD-bigG). The split model then runs once for the
    out_proj inputs that the split carried through attention (they exist only there)."""
    import shutil

    import export.runners.ort as ort_runners
    from export.core.folder import EXTERNAL_DATA_THRESHOLD
    from export.precision import apply_precision

    _, canonical, feeds = outliers("mlcd-rope2d")
    folder = tmp_path / "m"
    shutil.copytree(canonical.parent, folder)
    opened: list[str] = []
    original = ort_runners.ort_session

    def recording(model, *args, **kwargs):
        opened.append(Path(model).name if isinstance(model, (str, Path)) else "<bytes>")
        return original(model, *args, **kwargs)

    monkeypatch.setattr(ort_runners, "ort_session", recording)
    result = apply_precision(folder / "model.onnx", "int8", feeds, external_data_threshold=EXTERNAL_DATA_THRESHOLD,
                             log=lambda _: None)
    float_runs = [name for name in opened if name in ("model.onnx", "smoothed.onnx", "split.onnx")
                  or "stats-probe" in name]
    assert float_runs == [".stats-probe-model.onnx", ".stats-probe-split.onnx"], opened
    splitting = result.recipe["splitting"]
    carried = [c for e in splitting["split"] for c in e.get("through_attention", [])]
    assert carried and splitting["through_attention_statistics"]["tensors"] == len(carried)
    assert result.recipe["fallback"]["all_quantized"]


@pytest.fixture(scope="module")
def fp8_builds(outliers, tmp_path_factory):
    """family -> (BuildResult, held-out cosines) of the fp8 recipe on the outlier model, built once."""
    cache = {}

    def get(family: str):
        if family not in cache:
            ckpt, canonical, _ = outliers(family)
            out = tmp_path_factory.mktemp(f"fp8-{family}") / "out"
            result = _build(_folder(canonical), out, precision="fp8")
            cache[family] = result, _held_out(ckpt, out / "model.onnx")
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_recipe_reports_on_outlier_models(fp8_builds, family):
    """fp8 is not smoothed (a float format: outliers cost it no precision); the fallback runs and
    says what it kept out of fp8 and why."""
    result, held_out = fp8_builds(family)
    recipe = result.manifest["precision_recipe"]
    assert recipe["smoothing"]["smoothed"] == [] and "float format" in recipe["smoothing"]["skipped"]
    fallback = recipe["fallback"]
    assert fallback["all_quantized"]["pooler_output"] < fallback["targets_min_cosine"]["pooler_output"]
    assert fallback["kept_out_of_low_precision"] and all(e["why"] for e in fallback["kept_out_of_low_precision"])
    print(f"fp8 {family}: parity {result.manifest['parity']['worst']}, held-out {held_out}")


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_pooled_embedding_holds_on_outlier_models(fp8_builds, family):
    """fp8 scales are max |x| / 448 (qdq.py), as TensorRT and ModelOpt calibrate: the outlier channels
    fit (onnxruntime's std-based scales clipped them: held-out pooled cosine 0.17 / 0.50 before)."""
    result, held_out = fp8_builds(family)
    assert held_out["pooler_output"] >= 0.99, held_out
    assert result.manifest["parity"]["worst"]["pooler_output"]["min_cosine"] >= 0.99


@pytest.mark.parametrize("family", [
    pytest.param("mlcd-rope2d", marks=pytest.mark.xfail(
        strict=True, reason="measured on the 49 held-out views: minimum token cosine 0.979 (threshold 0.98; pooled "
                            "0.991) with 6 of 13 layers in float, fp8's own fallback, unchanged by issue 23: it "
                            "passed on the three parity photos judged before")),
    pytest.param("clip-vision", marks=pytest.mark.xfail(
        strict=True, reason="measured: the CLIP outlier model's fp8 last_hidden_state reaches minimum token "
                            "cosine 0.835 on the held-out views (threshold 0.98) while pooled is 0.993; the "
                            "fallback sees it on calibration images with 6 of 13 layers in float, its budget, "
                            "and warns to use fp16")),
])
def test_fp8_checklist_on_outlier_models(fp8_builds, family):
    result, _ = fp8_builds(family)
    assert result.parity_passed, result.manifest["parity"]["worst"]
