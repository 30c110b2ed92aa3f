"""The parity ledger on a tiny 2D-RoPE export: every CPU stage measured, the others skipped with a
reason, outputs written; the metrics and invariants can fail; layer tensors found in both families."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from export.core.images import HELD_OUT_PHOTOS, VIEWS, held_out_photos
from export.core.interface import INPUT_NAME
from export.core.metrics import nn_agreement
from export.pipeline import BuildOptions, build
from export.precision.calibration import SKIMAGE_CALIBRATION
from export.runners.ort import OnnxRuntimeRunner
from parity_tests.agreement import LEDGER_EXTRA, ledger_thresholds
from parity_tests.invariants import batch_sizes_to_try, check_invariants
from parity_tests.ledger import LedgerOptions, main, run_ledger

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ledger(tiny_folders, tmp_path_factory):
    art = tmp_path_factory.mktemp("ledger") / "artifacts"
    # runtime "none": no engine whatever is installed, so the ledger is the same on a GPU machine
    build(BuildOptions(model=str(tiny_folders["mlcd-rope2d"]), out=art, parity=False, max_batch=4, runtime="none"),
          log=lambda _: None)
    result = run_ledger(LedgerOptions(art), log=lambda _: None)
    return art, result


def test_ledger_writes_json_markdown_and_plots(ledger):
    art, result = ledger
    out = art / "ledger"
    assert result.out == out and result.passed, result.checklist()
    data = json.loads((out / "parity.json").read_text())
    assert data["passed"] is True and data["thresholds"]["int8"]["pooler_output"]["nn_top1"] == 0.8
    markdown = (out / "ledger.md").read_text()
    assert "| stage | output | max_abs" in markdown and markdown.rstrip().endswith("**PASSED**")
    for png in ("stages.png", "layers.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    assert result.checklist().splitlines()[-1] == "PASSED"


def test_every_cpu_stage_is_measured_with_every_metric(ledger):
    _, result = ledger
    stages = {s["name"]: s for s in result.data["stages"]}
    expected = {"deployed", "fp32-custom", "fp32-onnx23", "fp32-decomposed", "fp32-plugin", "fp16", "int8",
                "int8-cpu"}
    assert expected <= set(stages)
    measured = {(r["stage"], r["output"]): r for r in result.data["measured"]}
    for stage in expected:
        for output in ("last_hidden_state", "pooler_output"):
            row = measured[(stage, output)]
            assert {"max_abs", "mean_abs", "min_cosine", "rel_l2", "sqnr_db"} <= set(row)
        pooled = measured[(stage, "pooler_output")]
        assert 0.0 <= pooled["nn_top5"] <= 1.0 and 0.0 <= pooled["nn_top1"] <= 1.0
    # fp32 stages are exact to float rounding; precision is ordered fp32 > fp16 > int8
    sqnr = {s: measured[(s, "last_hidden_state")]["sqnr_db"] for s in ("fp32-custom", "fp16", "int8")}
    assert sqnr["fp32-custom"] > sqnr["fp16"] > sqnr["int8"] > 20
    assert measured[("fp32-onnx23", "pooler_output")]["nn_top1"] == 1.0
    assert not stages["int8-cpu"]["enforced"]  # reported beside the judged int8, not judged


def test_unavailable_stages_are_skipped_with_a_reason(ledger):
    art, result = ledger
    stages = {s["name"]: s for s in result.data["stages"]}
    assert stages["tensorrt"]["skip_reason"].startswith(f"no engine in {art}")  # and the build's reason
    assert "--url" in stages["triton"]["skip_reason"]
    assert not any(r["stage"] in ("tensorrt", "triton") for r in result.data["measured"])
    lines = result.checklist().splitlines()
    assert any(line.strip().startswith("[skip] tensorrt") for line in lines)
    assert any(line.strip().startswith("[skip] triton") for line in lines)
    assert "skipped: no server given" in (art / "ledger" / "ledger.md").read_text()


def test_invariants_hold_on_every_stage(ledger):
    _, result = ledger
    inv = result.data["invariants"]
    assert inv["max_batch_tried"] == 4  # the export's max_batch
    for stage, results in inv["results"].items():
        assert {r["name"] for r in results} == {"identical rows", "batch size", "slot"}
        limit = LEDGER_EXTRA[{"fp16": "fp16"}.get(stage, "int8" if "int8" in stage else "fp32")]["invariants"]
        assert all(r["worst_rel_l2"] <= limit["invariant_rel_l2"] for r in results), (stage, results)


def test_per_layer_divergence_grows_with_lower_precision(ledger):
    _, result = ledger
    layers = result.data["layers"]
    assert all(layers["map"]["tensors"]) and len(layers["map"]["tensors"]) == 3  # embeddings + 2 layers
    series = layers["stages"]
    assert set(series) == {"fp32-custom", "fp16", "int8"}
    for i in range(3):
        assert series["fp32-custom"][i]["rel_l2"] < 1e-5 < series["fp16"][i]["rel_l2"] < series["int8"][i]["rel_l2"]


def test_nn_agreement_can_fail():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32))
    emb = np.repeat(centres, 5, axis=0) + 0.05 * rng.normal(size=(20, 32))  # 4 clusters of 5 near-duplicates
    same = nn_agreement(emb, emb + 1e-6 * rng.normal(size=emb.shape))
    assert same == {"nn_top1": 1.0, "nn_top5": 1.0}
    shuffled = nn_agreement(emb, emb[rng.permutation(20)])
    limits = ledger_thresholds()["int8"]["pooler_output"]
    assert shuffled["nn_top1"] < limits["nn_top1"] and shuffled["nn_top5"] < limits["nn_top5"]
    with pytest.raises(ValueError):
        nn_agreement(emb[:2], emb[:2])


def _graph(path, batch_dependent: bool):
    """x [B, 3, H, W] -> pooler_output [B, 3] = spatial mean (minus the batch mean when batch_dependent),
    last_hidden_state [B, 1, 3]."""
    nodes = [helper.make_node("ReduceMean", [INPUT_NAME, "axes_hw"], ["pooled"], keepdims=0)]  # (B, 3)
    if batch_dependent:
        nodes += [helper.make_node("ReduceMean", ["pooled", "axes_b"], ["batch_mean"], keepdims=1),  # (1, 3)
                  helper.make_node("Sub", ["pooled", "batch_mean"], ["pooler_output"])]
    else:
        nodes += [helper.make_node("Identity", ["pooled"], ["pooler_output"])]
    nodes += [helper.make_node("Unsqueeze", ["pooler_output", "axes_s"], ["last_hidden_state"])]  # (B, 1, 3)
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", 1, 3]),
         helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor("axes_hw", TensorProto.INT64, [2], [2, 3]),
         helper.make_tensor("axes_b", TensorProto.INT64, [1], [0]),
         helper.make_tensor("axes_s", TensorProto.INT64, [1], [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.mark.parametrize("batch_dependent", [False, True])
def test_invariants_catch_a_batch_dependent_graph(tmp_path, batch_dependent):
    pixels = np.random.default_rng(1).normal(size=(5, 3, 8, 8)).astype(np.float32)
    with OnnxRuntimeRunner(_graph(tmp_path / "g.onnx", batch_dependent), "optimized") as runner:
        results = {r.name: r.worst_rel_l2 for r in check_invariants(runner, pixels, [None] * 5, max_batch=5)}
    limit = LEDGER_EXTRA["fp32"]["invariants"]["invariant_rel_l2"]
    if batch_dependent:
        assert results["batch size"] > 100 * limit
    else:
        assert max(results.values()) <= limit


def test_invariant_batch_sizes():
    assert batch_sizes_to_try(1) == [1]
    assert batch_sizes_to_try(32) == [1, 2, 3, 4, 8, 16, 32]
    assert batch_sizes_to_try(6) == [1, 2, 3, 4, 6]


@pytest.mark.parametrize("family", ["mlcd-rope2d", "clip-vision"])
def test_layer_tensors_are_found_in_both_families(exported, family):
    from export.core.images import pixel_values
    from parity_tests.layers import layer_divergence, locate_layers, reference_hidden_states

    ckpt, shape, path = exported(family)
    pixels = pixel_values(ckpt.processor, [p.image for p in held_out_photos(2)], (shape.height, shape.width)).numpy()
    reference = reference_hidden_states(ckpt, pixels)
    layer_map = locate_layers(path, reference, pixels)
    assert len(layer_map.names) == ckpt.config.num_hidden_layers + 1
    assert all(layer_map.names), layer_map
    assert len(set(layer_map.names)) == len(layer_map.names)  # one tensor per depth
    rows = layer_divergence(path, layer_map, reference, pixels)
    assert all(r["rel_l2"] < 1e-5 for r in rows)


def test_held_out_photos_never_calibrate():
    assert not set(HELD_OUT_PHOTOS) & set(SKIMAGE_CALIBRATION)
    photos = held_out_photos()
    assert len(photos) == len(HELD_OUT_PHOTOS) * len(VIEWS) >= 48 and len({p.name for p in photos}) == len(photos)
    # every prefix of one round covers every photograph, each in a different view
    first = photos[:len(HELD_OUT_PHOTOS)]
    assert {p.identity for p in first} == set(HELD_OUT_PHOTOS) and len({p.name.split("/")[1] for p in first}) > 1


def test_cli_bad_input_exits_2(tmp_path, capsys):
    assert main(["--artifacts", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["--artifacts", str(tmp_path)]) == 2  # no manifest.json
    assert "manifest.json" in capsys.readouterr().err


def test_cli_unknown_stage_exits_2(ledger, capsys):
    art, _ = ledger
    assert main(["--artifacts", str(art), "--stages", "fp64"]) == 2
    assert "fp64" in capsys.readouterr().err


def test_an_unreachable_server_fails_the_ledger(ledger, tmp_path):
    art, _ = ledger
    code = main(["--artifacts", str(art), "--stages", "triton", "--url", "127.0.0.1:9", "--out", str(tmp_path),
                 "--no-plots", "--photos", "4"])
    assert code == 1
    data = json.loads((tmp_path / "parity.json").read_text())
    triton = next(s for s in data["stages"] if s["name"] == "triton")
    assert any("could not run" in n for n in triton["notes"]) and data["passed"] is False
