"""python -m export.build_engine --artifacts DIR: rebuild model.plan from an export folder (no checkpoint).

A real TensorRT-RTX rebuild on this CPU; datacenter TensorRT through a fake builder that records what
it was given (as tests/export/test_cli.py fakes a failing build), since TensorRT needs a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from export import build_engine, engine as engines
from export.core.errors import EngineUnavailableError, OptionError
from export.core.folder import sha256
from export.graph import lowering
from export.rebuild import ArtifactsChangedError, RebuildOptions, engine_shapes, rebuild_engine, verify_artifacts
from mvt_kernels.names import PLUGIN_NAMESPACE
from triton_repo.testing import tiny_artifacts

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None and importlib.util.find_spec("polygraphy") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt-rtx / polygraphy not installed (extra: tensorrt-rtx)")

GPU = {"name": "Simulated H100", "compute_capability": "9.0", "cuda": "12.9", "driver": "575.1"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny 2D-RoPE export without an engine (max batch 4); tests work on copies."""
    return tiny_artifacts(tmp_path_factory.mktemp("rebuild"), max_batch=4)


@pytest.fixture
def folder(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "artifacts"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


class FakeBuilder:
    """Stands in for engines.build_engine: records its arguments, writes bytes, returns build facts."""

    def __init__(self, fail: bool = False):
        self.calls: list[dict] = []
        self.fail = fail

    def __call__(self, target, onnx_path, plan_path, shapes, **kwargs):
        lowered = onnx.load(str(onnx_path), load_external_data=False)
        self.calls.append({"target": target, "onnx": onnx_path, "shapes": shapes, "kwargs": kwargs,
                           "plugin_nodes": sum(any(a.name == "plugin_namespace" and a.s.decode() == PLUGIN_NAMESPACE
                                                   for a in n.attribute) for n in lowered.graph.node),
                           "ops": {(n.domain, n.op_type) for n in lowered.graph.node}})
        plan_path.write_bytes(b"engine for " + target.gpu["name"].encode() + bytes(len(self.calls)))
        if self.fail:
            raise RuntimeError("Builder failed: out of memory\nsecond line")
        return {"runtime": target.runtime, "version": target.version, "profiles": shapes,
                "builder_optimization_level": kwargs["optimization_level"],
                "compute_capabilities": [target.gpu["compute_capability"]], "bytes": plan_path.stat().st_size}


@pytest.fixture
def datacenter(monkeypatch):
    """A simulated GPU with datacenter TensorRT 10.13 (the AOT-plugin RoPE range), the plugin's kernel compiler
    (triton, torch) installed, and a fake builder."""
    builder = FakeBuilder()
    targets = {"gpu": dict(GPU)}
    monkeypatch.setattr(engines, "probe", lambda runtime: engines.EngineTarget(runtime, "10.13.0", None,
                                                                               dict(targets["gpu"])))
    monkeypatch.setattr(engines, "build_engine", builder)
    monkeypatch.setattr(lowering, "importable", lambda module: True)
    return builder, targets


def test_tampered_file_is_refused_and_nothing_changes(folder, capsys):
    config = folder / "preprocessor_config.json"
    data = config.read_bytes()
    config.write_bytes(data.replace(b"a", b"A", 1))  # one letter, same size: only the hash can tell
    assert config.stat().st_size == _manifest(folder)["artifacts"][config.name]["bytes"]  # same size: hash catches it
    before = _snapshot(folder)
    with pytest.raises(ArtifactsChangedError, match="preprocessor_config.json has sha256 .* the file changed"):
        rebuild_engine(RebuildOptions(folder, runtime="tensorrt-rtx"), log=lambda _: None)
    assert build_engine.main(["--artifacts", str(folder), "--runtime", "tensorrt-rtx"]) == build_engine.EXIT_BAD_INPUT
    assert "preprocessor_config.json" in capsys.readouterr().err
    assert _snapshot(folder) == before


def test_missing_or_resized_file_is_refused(folder):
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(ArtifactsChangedError, match=r"model.onnx is \d+ bytes but manifest.json records"):
        verify_artifacts(folder, _manifest(folder))
    (folder / "model.onnx").unlink()
    with pytest.raises(ArtifactsChangedError, match="model.onnx is missing"):
        verify_artifacts(folder, _manifest(folder))


@pytest.mark.parametrize("argv, flag", [(["--precision", "fp16"], "--precision"),
                                        (["--model", "mlcd-b-32"], "--model"),
                                        (["--rope", "onnx23", "--skip-parity"], "--rope, --skip-parity")])
def test_checkpoint_options_are_refused(folder, capsys, argv, flag):
    before = _snapshot(folder)
    assert build_engine.main(["--artifacts", str(folder), *argv]) == build_engine.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{flag} shape(s) the export itself" in err and "re-export with --model" in err
    assert _snapshot(folder) == before


def test_without_a_runtime_it_says_what_to_install(folder, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # an import of it fails, whatever is installed
    before = _snapshot(folder)
    with pytest.raises(EngineUnavailableError, match=r"tensorrt is not installed; install mvt-deploy\[tensorrt\] on a "
                                                     "machine with an NVIDIA GPU.*the folder is unchanged"):
        rebuild_engine(RebuildOptions(folder, runtime="tensorrt"), log=lambda _: None)
    assert build_engine.main(["--artifacts", str(folder), "--runtime", "tensorrt"]) == 2
    assert "mvt-deploy[tensorrt]" in capsys.readouterr().err
    assert _snapshot(folder) == before


def test_datacenter_tensorrt_rebuild_records_the_engine(folder, datacenter, tmp_path):
    builder, _ = datacenter
    cache = tmp_path / "timing.cache"
    result = rebuild_engine(RebuildOptions(folder, runtime="tensorrt", optimization_level=4, timing_cache=cache,
                                           max_batch=2), log=lambda _: None)
    (call,) = builder.calls
    # TensorRT 10.13 takes the AOT plugin (and decomposed attention for fp32): model.onnx (portable) was lowered,
    # then kept as engine-plugin-decomposed.onnx
    assert call["plugin_nodes"] > 0 and call["onnx"].name.startswith(".rebuild-")
    assert call["shapes"] == {"pixel_values": {"min": [1, 3, 56, 56], "opt": [1, 3, 56, 56], "max": [2, 3, 56, 56]}}
    assert call["kwargs"] == {"timing_cache": cache, "optimization_level": 4, "compute_capabilities": None,
                              "tf32": False}  # the export's choice, recorded (none: off)
    assert result.rebuilt
    manifest = _manifest(folder)
    engine = manifest["engine"]
    plan = folder / "model.plan"
    assert engine["built"] and engine["runtime"] == "tensorrt" and engine["version"] == "10.13.0"
    assert engine["gpu"] == GPU and engine["rope_lowering"] == "plugin" and engine["built_at"].endswith("Z")
    assert engine["onnx"] == "engine-plugin-decomposed.onnx" and engine["attention_lowering"] == "decomposed"
    assert "rope_lowering_note" not in engine  # the export's choice
    graph = folder / "engine-plugin-decomposed.onnx"
    assert manifest["artifacts"][graph.name] == {"sha256": sha256(graph), "bytes": graph.stat().st_size}
    assert engine["sha256"] == sha256(plan) == manifest["artifacts"]["model.plan"]["sha256"]
    assert manifest["artifacts"]["model.plan"]["bytes"] == plan.stat().st_size
    assert manifest["engine_history"] == [{"built": False, "runtime": "none",
                                           "reason": "no engine requested (--runtime none)"}]
    assert verify_artifacts(folder, manifest) == len(manifest["artifacts"])  # the new record is consistent
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_same_target_is_kept_unless_forced_and_another_gpu_rebuilds(folder, datacenter, capsys):
    builder, targets = datacenter
    argv = ["--artifacts", str(folder), "--runtime", "tensorrt", "--timing-cache", str(folder.parent / "t.cache")]
    assert build_engine.main(argv) == 0
    first = (folder / "model.plan").read_bytes()
    assert build_engine.main(argv) == 0 and len(builder.calls) == 1
    assert "kept (pass --force to rebuild it anyway)" in capsys.readouterr().out
    assert (folder / "model.plan").read_bytes() == first
    assert build_engine.main([*argv, "--force"]) == 0 and len(builder.calls) == 2
    targets["gpu"] = {**GPU, "name": "Simulated L4", "compute_capability": "8.9"}
    assert build_engine.main(argv) == 0 and len(builder.calls) == 3  # another GPU: rebuilt without --force
    manifest = _manifest(folder)
    assert manifest["engine"]["gpu"]["name"] == "Simulated L4"
    assert [h["gpu"]["name"] for h in manifest["engine_history"][1:]] == ["Simulated H100", "Simulated H100"]
    assert manifest["engine"]["sha256"] == sha256(folder / "model.plan")


def test_plan_from_the_export_itself_is_kept_on_the_same_gpu(tiny_folders, tmp_path, monkeypatch, capsys):
    """The profile and GPU the rebuild derives from the manifest are those the export recorded: an export
    that built its engine here (simulated TensorRT) is kept by a rebuild on the same GPU."""
    import export.pipeline as pipeline
    from export.pipeline import BuildOptions, build

    target = engines.EngineTarget("tensorrt", "10.16.0", None, dict(GPU))
    builder = FakeBuilder()
    monkeypatch.setattr(pipeline, "_engine_target", lambda opts: target)
    monkeypatch.setattr(engines, "probe", lambda runtime: target)
    monkeypatch.setattr(engines, "build_engine", builder)
    out = tmp_path / "out"
    build(BuildOptions(model=str(tiny_folders["clip-vision"]), out=out, parity=False, max_batch=6,
                       timing_cache=tmp_path / "t.cache"), log=lambda _: None)
    assert len(builder.calls) == 1 and (out / "model.plan").is_file()
    result = rebuild_engine(RebuildOptions(out, timing_cache=tmp_path / "t.cache"))  # runtime: the manifest's
    assert not result.rebuilt and len(builder.calls) == 1
    assert "kept (pass --force" in capsys.readouterr().out
    assert rebuild_engine(RebuildOptions(out, max_batch=3, timing_cache=tmp_path / "t.cache"),
                          log=lambda _: None).rebuilt  # another profile: rebuilt
    assert builder.calls[-1]["shapes"]["pixel_values"]["max"][0] == 3


def test_failed_build_leaves_the_folder_unchanged(folder, datacenter, monkeypatch, capsys):
    _, _ = datacenter
    monkeypatch.setattr(engines, "build_engine", FakeBuilder(fail=True))
    before = _snapshot(folder)
    argv = ["--artifacts", str(folder), "--runtime", "tensorrt", "--timing-cache", str(folder.parent / "t.cache")]
    assert build_engine.main(argv) == build_engine.EXIT_ENGINE_FAILED
    err = capsys.readouterr().err
    assert "the engine build failed: RuntimeError: Builder failed: out of memory" in err and "unchanged" in err
    assert "second line" not in err
    assert _snapshot(folder) == before  # no plan, no temporary graph or plan, the same manifest


def test_compute_capability_is_for_tensorrt_rtx_only(folder, capsys):
    assert build_engine.main(["--artifacts", str(folder), "--runtime", "tensorrt", "--compute-capability", "8.9"]) == 2
    assert "--compute-capability chooses TensorRT-RTX targets" in capsys.readouterr().err


@needs_rtx
def test_tensorrt_rtx_rebuild_on_cpu(folder, tmp_path):
    """A real engine from the export folder alone; a second run keeps it, --force and new targets rebuild it."""
    def cli(*argv):
        # a process per build: Polygraphy binds to one TensorRT flavour per process
        return subprocess.run([sys.executable, "-m", "export.build_engine", "--artifacts", str(folder),
                               "--runtime", "tensorrt-rtx", "--max-batch", "2", "--timing-cache",
                               str(tmp_path / "timing.cache"), *argv], capture_output=True, text=True, timeout=600)

    proc = cli("--compute-capability", "8.9")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[1/3] Checking" in proc.stdout and "files match their recorded sha256 and size" in proc.stdout
    manifest = _manifest(folder)
    engine, plan = manifest["engine"], folder / "model.plan"
    assert engine["built"] and engine["runtime"] == "tensorrt-rtx" and engine["compute_capabilities"] == ["8.9"]
    graph = "engine-onnx23-decomposed.onnx"  # lowered (fp32: decomposed attention), recorded
    assert engine["rope_lowering"] == "onnx23" and engine["onnx"] == graph
    assert manifest["artifacts"][graph]["sha256"] == sha256(folder / graph)
    assert engine["profiles"]["pixel_values"]["max"] == [2, 3, 56, 56]
    assert plan.stat().st_size == engine["bytes"] > 10_000
    assert engine["sha256"] == sha256(plan) == manifest["artifacts"]["model.plan"]["sha256"]
    assert "engine.onnx" not in manifest["artifacts"] and not list(folder.glob(".*"))
    mtime = plan.stat().st_mtime_ns

    proc = cli("--compute-capability", "8.9")
    assert proc.returncode == 0 and "kept (pass --force" in proc.stdout, proc.stderr[-3000:]
    assert plan.stat().st_mtime_ns == mtime

    proc = cli("--compute-capability", "12.0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = _manifest(folder)
    assert manifest["engine"]["compute_capabilities"] == ["12.0"]
    assert manifest["engine_history"][-1]["compute_capabilities"] == ["8.9"]
    assert manifest["engine"]["sha256"] == sha256(plan)


def test_a_dynamic_export_rebuilds_with_its_native_budget():
    """--dynamic-resolution engines hold the batched 0.5-1.5x profile plus every native-mode shape at the
    budget the export recorded (interface.native_budget), so a rebuilt plan serves --preprocess native."""
    budget = {"factor": 28, "min_pixels": 784, "max_pixels": 112 * 112}
    manifest = {"interface": {"inputs": {"pixel_values": {"shape": ["batch", 3, "height", "width"]}},
                              "dynamic_resolution": True, "native_budget": budget},
                "model": {"patch_size": 14, "native_image_size": [56, 56]}, "options": {}}
    shapes = engine_shapes(manifest, 4)
    assert isinstance(shapes, list)
    assert shapes[0] == engines.profiles("pixel_values", (56, 56), True, 14, 4)
    assert shapes[1:] == engines.native_profiles("pixel_values", 28, 784, 112 * 112)
    manifest["interface"]["native_budget"] = None  # a fixed-size export's (or an older manifest's)
    assert engine_shapes(manifest, 4) == shapes[0]


@pytest.mark.parametrize("flag", ["--max-pixels", "--min-pixels", "--resize-factor"])
def test_native_budget_needs_dynamic_resolution(flag, tmp_path, capsys):
    from export.build_engine import main

    assert main(["--out", str(tmp_path / "out"), flag, "28", "--runtime", "none"]) == 2
    assert "add --dynamic-resolution" in capsys.readouterr().err and not (tmp_path / "out").exists()


# --- where the export's lowering does not build: the KServe image has TensorRT but neither triton nor torch

@pytest.fixture(scope="module")
def plugin_export(tiny_folders, tmp_path_factory) -> Path:
    """A 2D-RoPE export made where TensorRT 10.13 and the plugin's kernel compiler are (simulated, fake
    builder): --rope auto gives engine.onnx in the AOT-plugin form, and a plan built from it."""
    import export.pipeline as pipeline
    from export.pipeline import BuildOptions, build

    target = engines.EngineTarget("tensorrt", "10.13.0", None, dict(GPU))
    out = tmp_path_factory.mktemp("plugin-export") / "artifacts"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "_engine_target", lambda opts: target)
        mp.setattr(engines, "build_engine", FakeBuilder())
        mp.setattr(lowering, "importable", lambda module: True)
        build(BuildOptions(model=str(tiny_folders["mlcd-rope2d"]), out=out, parity=False, max_batch=2,
                           timing_cache=out.parent / "t.cache"), log=lambda _: None)
    return out


def _outputs(path: Path, pixels) -> list:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": pixels})


@pytest.mark.parametrize("rope", ["auto", "plugin"])
@pytest.mark.parametrize("version, expected", [("10.12.0", "decomposed"), ("10.16.0", "onnx23")])
def test_pod_without_the_kernel_compiler_lowers_to_what_builds(plugin_export, tmp_path, monkeypatch, rope, version,
                                                              expected):
    import numpy as np

    folder = Path(shutil.copytree(plugin_export, tmp_path / "artifacts"))
    exported = _manifest(folder)
    assert (exported["engine"]["onnx"], exported["engine"]["rope_lowering"]) == ("engine.onnx", "plugin")
    exported["options"]["rope"] = rope  # the same files whether plugin was asked for or auto chose it
    (folder / "manifest.json").write_text(json.dumps(exported))
    before = _snapshot(folder)
    builder = FakeBuilder()
    l4 = {**GPU, "name": "Simulated L4", "compute_capability": "8.9"}
    monkeypatch.setattr(engines, "probe", lambda runtime: engines.EngineTarget(runtime, version, None, dict(l4)))
    monkeypatch.setattr(engines, "build_engine", builder)
    monkeypatch.setattr(lowering, "importable", lambda module: module not in ("triton", "torch"))
    logs: list[str] = []
    assert rebuild_engine(RebuildOptions(folder, timing_cache=tmp_path / "t.cache"), log=logs.append).rebuilt

    (call,) = builder.calls
    # nothing left that needs a plugin (or the compiler of its kernel): standard ops only
    assert call["plugin_nodes"] == 0 and {domain for domain, _ in call["ops"]} == {""}
    assert (("", "RotaryEmbedding") in call["ops"]) == (expected == "onnx23")
    name = f"engine-{expected}-decomposed.onnx"
    manifest = _manifest(folder)
    engine = manifest["engine"]
    assert (engine["rope_lowering"], engine["onnx"], engine["gpu"]["name"]) == (expected, name, "Simulated L4")
    if rope == "plugin":  # an explicit choice that does not build here is replaced, and the entry says why
        note = engine["rope_lowering_note"]
        assert "--rope plugin does not build" in note and "triton" in note
        assert any(engine["rope_lowering_note"] in line for line in logs)
    else:  # auto resolves to what builds here in the first place
        assert "rope_lowering_note" not in engine
    assert manifest["artifacts"][name] == {"sha256": sha256(folder / name), "bytes": (folder / name).stat().st_size}
    assert verify_artifacts(folder, manifest) == len(manifest["artifacts"])
    after = _snapshot(folder)  # the export's files as they were: only the plan and the manifest are replaced
    assert {k: v for k, v in after.items() if k not in ("model.plan", "manifest.json", name)} \
        == {k: v for k, v in before.items() if k not in ("model.plan", "manifest.json")}
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    # the graph the plan was built from computes what model.onnx does
    pixels = np.random.default_rng(0).standard_normal((2, 3, 56, 56)).astype(np.float32)
    for got, want in zip(_outputs(folder / name, pixels), _outputs(folder / "model.onnx", pixels)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # another GPU type: rebuilt from the recorded graph, which is checked and not lowered again
    monkeypatch.setattr(engines, "probe", lambda runtime: engines.EngineTarget(runtime, version, None, dict(GPU)))
    assert rebuild_engine(RebuildOptions(folder, timing_cache=tmp_path / "t.cache"), log=lambda _: None).rebuilt
    assert builder.calls[-1]["onnx"] == folder / name and _manifest(folder)["engine"]["onnx"] == name


def test_graph_exported_in_a_lowering_the_pod_cannot_build_is_refused(plugin_export, tmp_path, monkeypatch):
    """model.onnx exported as RotaryEmbedding (--rope onnx23) has no RoPE2D left to lower for TensorRT 10.12."""
    folder = Path(shutil.copytree(plugin_export, tmp_path / "artifacts"))
    manifest = _manifest(folder)
    manifest["options"]["rope"], manifest["rope_lowering"] = "onnx23", "onnx23"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    before = _snapshot(folder)
    monkeypatch.setattr(engines, "probe", lambda runtime: engines.EngineTarget(runtime, "10.12.0", None, dict(GPU)))
    monkeypatch.setattr(engines, "build_engine", FakeBuilder())
    monkeypatch.setattr(lowering, "importable", lambda module: module not in ("triton", "torch"))
    with pytest.raises(OptionError, match="has its RoPE as onnx23 .* re-export with --rope auto"):
        rebuild_engine(RebuildOptions(folder, timing_cache=tmp_path / "t.cache", force=True), log=lambda _: None)
    assert _snapshot(folder) == before
