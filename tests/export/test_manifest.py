"""manifest.json, the export folder's contract (export/core/manifest.py): one writer that stamps the layout
version, one reader that upgrades older layouts in one place, one accessor (and one fallback) per field.

An "old" manifest here is a new export's with what older versions lacked deleted: `schema`, and every field
an accessor has a fallback for.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from export.core.errors import OptionError
from export.core.folder import MANIFEST_NAME, ONNX_NAME, PREPROCESSOR_CONFIG
from export.core.manifest import (
    DEFAULT_MAX_BATCH,
    ENGINE_PARITY_NOTE,
    SCHEMA,
    Manifest,
    engine_entry,
    no_engine,
    read_manifest,
    upgrade,
    write_manifest,
)
from export.engine import EngineTarget
from triton_repo.testing import tiny_artifacts

GPU = {"name": "Simulated H100", "compute_capability": "9.0"}

# Every field an accessor falls back for: (section or None for the top level, key, accessor, the fallback).
FALLBACKS = [
    ("interface", "max_batch", lambda m: m.max_batch, DEFAULT_MAX_BATCH),
    ("interface", "pooled_output", lambda m: m.pooled_output, "pooler_output"),
    ("interface", "outputs", lambda m: m.output_names, []),
    ("interface", "hidden_layer", lambda m: m.hidden_layer, None),
    ("interface", "dynamic_resolution", lambda m: m.dynamic_resolution, False),
    ("interface", "native_budget", lambda m: m.native_budget, None),
    ("model", "prefix_tokens", lambda m: m.prefix_tokens, 1),
    ("options", "model", lambda m: m.checkpoint, None),
    ("options", "random_weights", lambda m: m.random_weights, False),
    ("options", "num_heads", lambda m: m.num_heads, None),
    ("options", "image_size", lambda m: m.image_size, None),
    ("options", "rope", lambda m: m.rope, "auto"),
    ("options", "quant_target", lambda m: m.quant_target, "tensorrt"),
    ("options", "calib_method", lambda m: m.calibration_options["calib_method"], "max"),
    (None, "precision", lambda m: m.precision, "fp32"),
    (None, "precision_recipe", lambda m: m.precision_recipe, {}),
    (None, "engine", lambda m: m.engine.built, False),
    (None, "engine_history", lambda m: m.engine_history, []),
    (None, "artifacts", lambda m: m.artifacts, {}),
    (None, "parity", lambda m: m.parity_passed, None),
    (None, "onnx_checker", lambda m: m.onnx_checker, None),
    (None, "timings_s", lambda m: m.timings_s, {}),
]
ENGINE_FALLBACKS = [
    ("runtime", lambda e: e.runtime, "tensorrt"),  # entries older than TensorRT-RTX support
    ("built", lambda e: e.built, False),
    ("failed", lambda e: e.failed, False),
    ("gpu", lambda e: e.gpu, {}),
    ("compute_capabilities", lambda e: e.compute_capabilities, []),
    ("profiles", lambda e: e.profiles, None),
    ("onnx", lambda e: e.onnx, None),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny export (max batch 4, hidden_states[-2], no engine); tests work on copies of its manifest."""
    return tiny_artifacts(tmp_path_factory.mktemp("manifest"), max_batch=4, hidden_layer=-2)


@pytest.fixture
def new(exported) -> dict:
    return json.loads((exported / MANIFEST_NAME).read_text())


def _old(new: dict) -> dict:
    """`new` as an older mvt-deploy wrote it: no schema, none of the fields with a fallback."""
    old = copy.deepcopy(new)
    del old["schema"]
    for section, key, _, _ in FALLBACKS:
        if section is not None and key != "outputs":  # a manifest has always listed its outputs
            old[section].pop(key, None)
    for key in ("precision_recipe", "onnx_checker"):
        old.pop(key)
    return old


def _folder(exported: Path, tmp_path: Path, manifest: dict) -> Path:
    """A copy of the export's files (links) with `manifest` as its manifest.json."""
    folder = tmp_path / "artifacts"
    folder.mkdir()
    for path in exported.iterdir():
        if path.name != MANIFEST_NAME:
            (folder / path.name).symlink_to(path)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


# ------------------------------------------------------------------ the writer

def test_the_export_writes_the_schema_first(exported, new):
    assert list(new)[0] == "schema" and new["schema"] == SCHEMA
    assert upgrade(new) == new and read_manifest(exported).data == new  # nothing to upgrade


def test_write_manifest_stamps_this_schema(tmp_path):
    written = write_manifest(tmp_path, {"model": {}, "schema": 0, "interface": {}})
    assert written == json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert list(written) == ["schema", "model", "interface"] and written["schema"] == SCHEMA


def test_the_rebuild_writes_the_schema_on_an_old_manifest(exported, new, tmp_path, monkeypatch):
    """export.rebuild rewrites the manifest through write_manifest: an old one comes back in this layout."""
    import shutil

    from export import engine as engines
    from export.rebuild import RebuildOptions, rebuild_engine

    folder = Path(shutil.copytree(exported, tmp_path / "copy"))
    old = _old(new)
    (folder / MANIFEST_NAME).write_text(json.dumps(old))

    def fake_build(target, onnx_path, plan_path, shapes, **kwargs):
        plan_path.write_bytes(b"not an engine")
        return {"runtime": target.runtime, "version": target.version, "profiles": shapes,
                "builder_optimization_level": None, "compute_capabilities": ["9.0"], "bytes": 13}

    monkeypatch.setattr(engines, "probe", lambda runtime: EngineTarget(runtime, "10.13.0", None, dict(GPU)))
    monkeypatch.setattr(engines, "build_engine", fake_build)
    result = rebuild_engine(RebuildOptions(folder), log=lambda _: None)
    rewritten = json.loads((folder / MANIFEST_NAME).read_text())
    assert list(rewritten)[0] == "schema" and rewritten["schema"] == SCHEMA
    assert rewritten["engine"] == result.engine and rewritten["engine"]["built"]
    # the old max batch fallback sized the plan: the export default
    assert rewritten["engine"]["profiles"]["pixel_values"]["max"][0] == DEFAULT_MAX_BATCH
    # nothing else changed: the upgrade adds the schema, it does not write the fallbacks in
    unchanged = {k: v for k, v in rewritten.items() if k not in ("schema", "engine", "engine_history", "artifacts")}
    assert unchanged == {k: v for k, v in old.items() if k not in ("engine", "artifacts")}


# ------------------------------------------------------------------ the reader: older layouts

def test_an_old_manifest_reads_with_every_fallback(exported, new, tmp_path):
    folder = _folder(exported, tmp_path, _old(new))
    m = read_manifest(folder)
    assert m.schema == SCHEMA
    for section, key, accessor, fallback in FALLBACKS:
        if (section is not None and key != "outputs") or key in ("precision_recipe", "onnx_checker"):
            assert accessor(m) == fallback, key
    assert m.max_batch == DEFAULT_MAX_BATCH and m.pooled_output == "pooler_output" and m.prefix_tokens == 1
    assert m.rope == "auto" and m.quant_target == "tensorrt" and m.precision_recipe == {}
    # what did not change still reads as recorded
    assert m.output_names == ["last_hidden_state", "pooler_output", "hidden_state"]
    assert m.precision == "fp32" and m.engine.reason == new["engine"]["reason"]
    assert m.sha256(ONNX_NAME) == new["artifacts"][ONNX_NAME]["sha256"]


def test_old_and_new_manifests_identify_the_same_embeddings(exported, new, tmp_path):
    """The reader's view of an old manifest decides what the new one decides (embed's identity, the artifacts)."""
    from embed.store import output_identity
    from export.rebuild import verify_artifacts

    old = read_manifest(_folder(exported, tmp_path, _old(new)))
    assert output_identity(old, old.pooled_output, True) == output_identity(new, "pooler_output", True)
    assert output_identity(old, "x", False)["preprocessor_sha256"] == new["artifacts"][PREPROCESSOR_CONFIG]["sha256"]
    assert verify_artifacts(exported, old) == len(new["artifacts"])


def test_the_first_engine_entries_are_upgraded():
    """Exports before TensorRT-RTX recorded {"tensorrt": version}: the upgrade names the runtime, in place."""
    profile = {"pixel_values": {"min": [1, 3, 56, 56], "opt": [2, 3, 56, 56], "max": [4, 3, 56, 56]}}
    legacy = {"interface": {}, "engine": {"built": True, "tensorrt": "10.3.0", "profiles": profile}}
    before = copy.deepcopy(legacy)
    upgraded = upgrade(legacy)
    assert legacy == before  # a new dict: the caller's is untouched
    assert upgraded["schema"] == SCHEMA
    assert list(upgraded["engine"].items()) == [("built", True), ("runtime", "tensorrt"), ("version", "10.3.0"),
                                                ("profiles", profile)]
    engine = Manifest.of(legacy).engine
    assert engine.built and engine.runtime == "tensorrt" and engine.version == "10.3.0" and engine.profiles == profile


def test_a_current_engine_entry_is_left_as_it_is():
    entry = {"built": True, "runtime": "tensorrt-rtx", "version": "1.7", "tensorrt": "unrelated"}
    assert upgrade({"schema": SCHEMA, "engine": entry})["engine"] == entry


@pytest.mark.parametrize("section, key, accessor, fallback", FALLBACKS,
                         ids=[f"{s or 'top'}.{k}" for s, k, _, _ in FALLBACKS])
def test_each_accessor_has_one_fallback(new, section, key, accessor, fallback):
    missing = copy.deepcopy(new)
    (missing if section is None else missing[section]).pop(key, None)  # engine_history: only after a rebuild
    assert accessor(Manifest.of(missing)) == fallback
    none = copy.deepcopy(new)
    (none if section is None else none[section])[key] = None  # recorded as null: the same fallback
    assert accessor(Manifest.of(none)) == fallback


@pytest.mark.parametrize("key, accessor, fallback", ENGINE_FALLBACKS, ids=[k for k, _, _ in ENGINE_FALLBACKS])
def test_each_engine_accessor_has_one_fallback(key, accessor, fallback):
    entry = {"built": True, "runtime": "tensorrt-rtx", "version": "1.7", "failed": True, "gpu": GPU,
             "compute_capabilities": ["8.9"], "profiles": {"pixel_values": {}}, "onnx": "engine.onnx"}
    assert accessor(Manifest.of({"engine": entry}).engine) != fallback
    del entry[key]
    assert accessor(Manifest.of({"engine": entry}).engine) == fallback


def test_the_accessors_read_what_the_export_recorded(new):
    m = Manifest.of(new)
    assert (m.max_batch, m.hidden_layer, m.pooled_output, m.prefix_tokens) == (4, -2, "pooler_output", 1)
    assert m.input_name == "pixel_values" and m.input_shape == ["batch", 3, 56, 56]
    assert m.output_shapes["pooler_output"] == ["batch", 64] and m.traced_size == m.native_image_size == (56, 56)
    assert m.patch_size == 14 and m.rope_lowering == "custom" and not m.dynamic_resolution
    assert m.engine.runtime == "none" and not m.engine.built and m.engine.reason
    assert set(m.artifacts) == set(new["artifacts"])
    assert m.artifacts[ONNX_NAME].size == new["artifacts"][ONNX_NAME]["bytes"]


def test_max_batch_falls_back_alike_in_every_reader(exported, new, tmp_path):
    """interface.max_batch missing: the Triton generator, the embedder and the rebuild all take the export
    default (they took 8, 0 and 32 before), the ledger caps its batches by it."""
    from embed.worker import engine_max_batch
    from export.rebuild import engine_shapes
    from triton_repo.export_folder import read_artifacts
    from triton_repo.forms import FORMS
    from triton_repo.resolve import resolve_max_batch

    old = _old(new)
    art = read_artifacts(_folder(exported, tmp_path, old))
    assert resolve_max_batch(None, FORMS["python"], art) == DEFAULT_MAX_BATCH
    assert engine_max_batch(old) == DEFAULT_MAX_BATCH  # a plan without a recorded profile
    shapes = engine_shapes(old, Manifest.of(old).max_batch)
    assert isinstance(shapes, dict) and shapes["pixel_values"]["max"][0] == DEFAULT_MAX_BATCH


# ------------------------------------------------------------------ the reader: refusals

@pytest.mark.parametrize("schema", [SCHEMA + 1, SCHEMA + 10])
def test_a_newer_schema_is_refused(exported, new, tmp_path, schema):
    future = {**new, "schema": schema}
    folder = _folder(exported, tmp_path, future)
    with pytest.raises(OptionError, match=f"manifest schema {schema}, newer than this mvt-deploy.*upgrade mvt-deploy"):
        read_manifest(folder)
    with pytest.raises(OptionError, match="upgrade mvt-deploy"):
        Manifest.of(future)
    from triton_repo.export_folder import read_artifacts

    with pytest.raises(OptionError, match="upgrade mvt-deploy"):
        read_artifacts(folder)


@pytest.mark.parametrize("schema", ["1", -1, 1.0, True, None])
def test_a_schema_that_is_not_a_version_is_refused(schema):
    with pytest.raises(OptionError, match="not a layout version"):
        upgrade({"schema": schema})


def test_a_folder_without_a_manifest_is_refused(tmp_path):
    with pytest.raises(OptionError, match="is not a folder; pass an export folder"):
        read_manifest(tmp_path / "missing")
    with pytest.raises(OptionError, match=f"has no {MANIFEST_NAME}; pass the folder export.build_engine wrote"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(OptionError, match="is not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("[]")
    with pytest.raises(OptionError, match="is not a manifest"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"options": {}, "model": {}}))
    with pytest.raises(OptionError, match="has no 'interface'; re-export the folder"):
        read_manifest(tmp_path)


# ------------------------------------------------------------------ the engine entry, built in one place

FACTS = {"runtime": "tensorrt", "version": "10.13.0", "profiles": {"pixel_values": {}},
         "builder_optimization_level": None, "compute_capabilities": ["9.0"], "bytes": 13}
TARGET = EngineTarget("tensorrt", "10.13.0", None, GPU)


def test_the_engine_entry_of_a_build():
    """The keys, in order, that pipeline.py wrote before the entry had one builder."""
    built = engine_entry(TARGET, onnx="engine.onnx", rope_lowering="plugin", facts=FACTS)
    assert list(built) == ["built", "runtime", "version", "onnx", "rope_lowering", "gpu", "profiles",
                           "builder_optimization_level", "compute_capabilities", "bytes", "parity"]
    assert built["built"] and built["onnx"] == "engine.onnx" and built["gpu"] == GPU
    assert built["parity"] == ENGINE_PARITY_NOTE
    failed = engine_entry(TARGET, onnx=ONNX_NAME, rope_lowering="onnx23", failure="RuntimeError: out of memory")
    assert failed == {"built": False, "failed": True, "runtime": "tensorrt", "version": "10.13.0", "onnx": ONNX_NAME,
                      "rope_lowering": "onnx23", "gpu": GPU, "reason": "RuntimeError: out of memory"}
    assert list(failed)[-1] == "reason"
    assert no_engine("none", "--runtime none") == {"built": False, "runtime": "none", "reason": "--runtime none"}


def test_the_engine_entry_of_a_rebuild():
    """The rebuild's keys: the build's, and what it adds, before the parity note."""
    rebuilt = engine_entry(TARGET, onnx=ONNX_NAME, rope_lowering="onnx23", facts=FACTS, sha256="ab", built_at="t",
                           rebuilt=True, build_seconds=1.0)
    assert set(rebuilt) == {"built", "runtime", "version", "profiles", "builder_optimization_level",
                            "compute_capabilities", "bytes", "onnx", "rope_lowering", "gpu", "sha256", "built_at",
                            "rebuilt", "build_seconds", "parity"}
    assert list(rebuilt)[-5:] == ["sha256", "built_at", "rebuilt", "build_seconds", "parity"]


def test_with_engine_keeps_the_old_one_in_history(new):
    m = Manifest.of(new)
    entry = engine_entry(TARGET, onnx=ONNX_NAME, rope_lowering="onnx23", facts=FACTS, sha256="ab")
    updated = m.with_engine(entry, "model.plan", "ab", 13)
    assert list(updated) == list(m.data) + ["engine_history"]  # fields keep their places
    assert updated["engine"] == entry and updated["artifacts"]["model.plan"] == {"sha256": "ab", "bytes": 13}
    assert updated["engine_history"] == [{"built": False, "runtime": "none", "reason": new["engine"]["reason"]}]
    again = Manifest(updated).with_engine(entry, "model.plan", "cd", 14)
    assert [h.get("sha256") for h in again["engine_history"]] == [None, "ab"]
    assert m.data == Manifest.of(new).data  # the view itself is not changed
