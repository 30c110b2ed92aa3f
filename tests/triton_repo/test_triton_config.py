"""The repository generator: every config.pbtxt is Triton's protobuf, parsed back; options are validated.

No server here (test_triton_server.py serves the python-backend repository). The artifacts are
exported with `runtime="none"`, so these tests are the same where TensorRT is installed. The
tensorrt_plan repository is generated from a FAKE plan file: only the presence of model.plan and
the manifest's engine profile are faked, to check the generated config against the protobuf. It is
never served and proves nothing about an engine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from export.core.errors import OptionError
from triton_repo.build import RepoOptions, build_repository, parser
from triton_repo.config import config_text, encoder_config, parse_config, preferred_batch_sizes
from triton_repo.forms import BACKENDS, FORMS, cli_help
from triton_repo.interface import EncoderInterface, TensorSpec
from triton_repo.layout import validate_model_name
from triton_repo.testing import import_or_skip, tiny_artifacts

model_config_pb2 = import_or_skip("tritonclient.grpc.model_config_pb2")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A tiny 2D-RoPE model exported with hidden_states[-2] as a third output."""
    return tiny_artifacts(tmp_path_factory.mktemp("triton-config"), hidden_layer=-2)


@pytest.fixture(scope="module")
def plan_artifacts(artifacts, tmp_path_factory):
    """FAKE engine artifacts: a placeholder model.plan and an engine profile of max batch 4 in the manifest.
    Only for validating the generated tensorrt_plan config; this file is not an engine and is never served."""
    return _with_fake_plan(artifacts, tmp_path_factory.mktemp("fake-plan") / "artifacts")


def _with_fake_plan(artifacts: Path, folder: Path) -> Path:
    """A copy of `artifacts` in `folder` with a placeholder model.plan and a max-batch-4 profile."""
    shutil.copytree(artifacts, folder)
    (folder / "model.plan").write_bytes(b"placeholder, not a TensorRT engine")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engine"] = {"built": True, "runtime": "tensorrt", "version": "fake",
                          "profiles": {"pixel_values": {"min": [1, 3, 56, 56], "opt": [2, 3, 56, 56],
                                                        "max": [4, 3, 56, 56]}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _configs(repo: Path) -> dict:
    return {p.parent.name: parse_config(p) for p in sorted(repo.glob("*/config.pbtxt"))}


def test_python_backend_repository(artifacts, tmp_path):
    result = build_repository(RepoOptions(artifacts, tmp_path / "repo", backend="python", instances=2, max_batch=6),
                              log=lambda _: None)
    repo = result.out
    cfgs = _configs(repo)
    assert set(cfgs) == {"embed", "encoder", "preprocess"}
    enc, pre, ens = cfgs["encoder"], cfgs["preprocess"], cfgs["embed"]
    assert enc.backend == "python"
    assert (repo / "encoder/1/model.py").is_file() and (repo / "encoder/1/model.onnx").is_file()
    assert [i.name for i in enc.input] == ["pixel_values"] and list(enc.input[0].dims) == [3, 56, 56]
    assert [o.name for o in enc.output] == ["last_hidden_state", "pooler_output", "hidden_state"]
    assert enc.instance_group[0].count == 2 and enc.instance_group[0].kind == enc.instance_group[0].KIND_CPU
    assert enc.max_batch_size == pre.max_batch_size == ens.max_batch_size == 6
    assert list(enc.dynamic_batching.preferred_batch_size) == [4, 6]
    # warm-up with a real photograph: the files are what Triton reads
    w = enc.model_warmup[0]
    assert (repo / "encoder/warmup" / w.inputs["pixel_values"].input_data_file).stat().st_size == 3 * 56 * 56 * 4
    data = (repo / "preprocess/warmup" / pre.model_warmup[0].inputs["image"].input_data_file).read_bytes()
    assert int.from_bytes(data[:4], "little") == len(data) - 4 and data[4:6] == b"\xff\xd8"  # length + JPEG
    # preprocess: bytes in, the encoder's input out; its recipe travels with it
    from tritonclient.grpc.model_config_pb2 import DataType

    assert pre.input[0].data_type == DataType.Value("TYPE_STRING") and list(pre.input[0].dims) == [1]
    assert list(pre.output[0].dims) == [3, 56, 56]
    for f in ("model.py", "preprocessing.py", "preprocessor_config.json"):
        assert (repo / "preprocess/1" / f).is_file()
    # the ensemble wires image -> preprocess -> encoder -> every output
    assert ens.platform == "ensemble" and [i.name for i in ens.input] == ["image"]
    assert [o.name for o in ens.output] == ["last_hidden_state", "pooler_output", "hidden_state"]
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["preprocess", "encoder"]
    # every version folder holds a file: object stores (KServe's storageUri) drop empty folders
    assert all(any((model / "1").iterdir()) for model in repo.iterdir() if (model / "config.pbtxt").is_file())
    readme = (repo / "README.md").read_text()
    assert "tritonserver --model-repository" in readme and "python -m triton_repo.serve" in readme
    assert 'client.infer("embed"' in readme and FORMS["python"].readme in readme


def test_onnxruntime_repository(artifacts, tmp_path):
    repo = build_repository(RepoOptions(artifacts, tmp_path / "repo", backend="onnxruntime", name="clip_embed"),
                            log=lambda _: None).out
    cfgs = _configs(repo)
    enc = cfgs["encoder"]
    assert enc.platform == "onnxruntime_onnx" and not (repo / "encoder/1/model.py").exists()
    assert (repo / "encoder/1/model.onnx").is_file()
    assert enc.instance_group[0].kind == enc.instance_group[0].KIND_AUTO
    assert cfgs["clip_embed"].max_batch_size == 8  # the manifest's max batch


def test_tensorrt_plan_repository_from_fake_plan(plan_artifacts, tmp_path):
    repo = build_repository(RepoOptions(plan_artifacts, tmp_path / "repo"), log=lambda _: None).out  # default: tensorrt
    enc = _configs(repo)["encoder"]
    assert enc.platform == "tensorrt_plan" and enc.default_model_filename == "model.plan"
    assert (repo / "encoder/1/model.plan").is_file() and not (repo / "encoder/1/model.onnx").exists()
    assert enc.max_batch_size == 4  # derived from the engine profile
    assert enc.instance_group[0].kind == enc.instance_group[0].KIND_GPU
    assert list(enc.instance_group[0].profile) == []  # one profile: Triton's default (profile 0) is it
    assert [list(o.dims) for o in enc.output] == [[17, 64], [64], [17, 64]]  # 1 + (56/14)^2 tokens
    assert FORMS["tensorrt"].readme.format(engine_version="fake") in (repo / "README.md").read_text()
    with pytest.raises(OptionError, match="optimization profile allows \\(4\\)"):
        build_repository(RepoOptions(plan_artifacts, tmp_path / "repo2", max_batch=8), log=lambda _: None)


def test_tensorrt_needs_a_plan(artifacts, tmp_path):
    with pytest.raises(OptionError, match="--backend tensorrt needs"):
        build_repository(RepoOptions(artifacts, tmp_path / "repo", backend="tensorrt"), log=lambda _: None)


@pytest.mark.parametrize("name", ["../embed", "a/b", "..", "", ".hidden", "a\\b", "encoder", "preprocess"])
def test_bad_model_names_are_refused(artifacts, tmp_path, name):
    with pytest.raises(OptionError, match="--name"):
        build_repository(RepoOptions(artifacts, tmp_path / "repo", backend="python", name=name), log=lambda _: None)
    assert not (tmp_path / "repo").exists()


def test_good_model_names():
    for name in ("embed", "rice-l_560", "mlcd.v2"):
        assert validate_model_name(name) == name


def test_existing_repository_needs_force(artifacts, tmp_path):
    opts = RepoOptions(artifacts, tmp_path / "repo", backend="python")
    build_repository(opts, log=lambda _: None)
    with pytest.raises(Exception, match="--force"):
        build_repository(opts, log=lambda _: None)
    opts.force = True
    build_repository(opts, log=lambda _: None)


def test_missing_artifacts_say_what_to_do(tmp_path):
    with pytest.raises(OptionError, match="export.build_engine"):
        build_repository(RepoOptions(tmp_path, tmp_path / "repo"), log=lambda _: None)


def test_misspelled_field_is_caught_offline():
    from google.protobuf import text_format

    with pytest.raises(text_format.ParseError):
        parse_config('name: "x"\nmax_batch_sise: 8\n')


def test_preferred_batch_sizes():
    assert preferred_batch_sizes(1) == [1]
    assert preferred_batch_sizes(8) == [4, 8]
    assert preferred_batch_sizes(32) == [4, 8, 16, 32]


def test_cli(artifacts, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "triton_repo.build", "--artifacts", str(artifacts), "--out",
                           str(tmp_path / "repo"), "--backend", "python", "--name", "embed", "--max-batch", "4"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert parse_config(tmp_path / "repo/embed/config.pbtxt").max_batch_size == 4
    proc = subprocess.run([sys.executable, "-m", "triton_repo.build", "--artifacts", str(artifacts), "--out",
                           str(tmp_path / "repo3"), "--name", "../x"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 2 and "not a valid model name" in proc.stderr


@pytest.mark.parametrize("module", ["triton_repo.build", "triton_repo.serve"])
def test_help_needs_no_server(module):
    proc = subprocess.run([sys.executable, "-m", module, "-h"], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout


def test_server_env_with_numpy_2_is_refused(tmp_path):
    """The python backend silently corrupts tensors with numpy 2: an env with it is refused, with the fix."""
    import numpy

    from triton_repo.server import ServerUnavailable, find_tritonserver

    if int(numpy.__version__.split(".")[0]) < 2:
        pytest.skip("this interpreter has numpy < 2")
    (tmp_path / "bin").mkdir()
    python = tmp_path / "bin" / "python3"  # an "environment" whose python is this venv's (numpy 2)
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    with pytest.raises(ServerUnavailable, match="numpy 2.*setup_server_env.sh"):
        find_tritonserver(tmp_path)
    with pytest.raises(ServerUnavailable, match="no server environment"):
        find_tritonserver(tmp_path / "missing")


def test_tensorrt_rtx_plan_is_not_offered_to_the_tensorrt_backend(plan_artifacts, tmp_path):
    """Triton's TensorRT backend links datacenter TensorRT; a TensorRT-RTX plan would not load."""
    folder = tmp_path / "rtx"
    shutil.copytree(plan_artifacts, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engine"]["runtime"] = "tensorrt-rtx"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = build_repository(RepoOptions(folder, tmp_path / "repo"), log=lambda _: None)
    assert result.backend == "onnxruntime"  # the default steps around the plan
    assert _configs(result.out)["encoder"].platform == "onnxruntime_onnx"
    with pytest.raises(OptionError, match="built with tensorrt-rtx"):
        build_repository(RepoOptions(folder, tmp_path / "repo2", backend="tensorrt"), log=lambda _: None)


def test_registry_covers_every_backend_choice():
    """--backend offers exactly the registered forms, and each form's encoder config is valid protobuf."""
    (action,) = [a for a in parser()._actions if "--backend" in a.option_strings]
    assert tuple(action.choices) == BACKENDS == tuple(FORMS) == ("tensorrt", "onnxruntime", "python")
    iface = EncoderInterface(TensorSpec("pixel_values", (3, 56, 56)),
                             (TensorSpec("pooler_output", (64,)),), (56, 56))
    for name, spec in FORMS.items():
        assert name in cli_help() and spec.readme and spec.model_files
        assert (spec.platform is None) != (spec.backend is None), f"{name}: a platform or a backend, not both"
        assert spec.needs_engine != spec.needs_portable_graph, f"{name} serves either model.plan or model.onnx"
        cfg = parse_config(config_text(encoder_config(name, iface, max_batch=4)))  # read back as Triton does
        assert cfg.platform == (spec.platform or "") and cfg.backend == (spec.backend or "")
        assert cfg.default_model_filename == (spec.default_model_filename or "")
        assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.Kind.Value(spec.kind)
    assert FORMS["tensorrt"].engine_runtimes == ("tensorrt",)  # a TensorRT-RTX plan is not for Triton's backend
    # several optimization profiles: the TensorRT instance group names them all (only that form takes the field)
    for name, spec in FORMS.items():
        cfg = parse_config(config_text(encoder_config(name, iface, max_batch=4, profiles=3)))
        assert list(cfg.instance_group[0].profile) == (["0", "1", "2"] if spec.needs_engine else [])
        # one context per listed profile, each allocated for its own profile (tensorrt_backend r25.05's spelling)
        strategy = {k: v.string_value for k, v in cfg.parameters.items()}.get("execution_context_allocation_strategy")
        assert strategy == ("ON_PROFILE_CHANGE" if spec.needs_engine else None), name
        one = parse_config(config_text(encoder_config(name, iface, max_batch=4)))  # one profile: static is the same
        assert "execution_context_allocation_strategy" not in one.parameters
    with pytest.raises(OptionError, match="choose one of tensorrt, onnxruntime, python"):
        encoder_config("tensorrt-rtx", iface, max_batch=4)


@pytest.fixture(scope="module")
def plugin_form_artifacts(artifacts, tmp_path_factory):
    """Artifacts whose model.onnx holds the body-less TensorRT plugin form of RoPE2D, as older exports
    with `--rope plugin` (or `auto` on TensorRT 10.9-10.14) wrote it."""
    import onnx

    from export.graph.lowering import lower_rope

    folder = tmp_path_factory.mktemp("plugin-form") / "artifacts"
    shutil.copytree(artifacts, folder)
    onnx.save(lower_rope(onnx.load(str(folder / "model.onnx")), "plugin"), str(folder / "model.onnx"))
    return folder


@pytest.mark.parametrize("backend", ["onnxruntime", "python", None])
def test_plugin_form_graph_is_refused_where_onnxruntime_runs_it(plugin_form_artifacts, tmp_path, backend):
    with pytest.raises(OptionError, match=r"mvt\.RoPE2D nodes without a function body") as err:
        build_repository(RepoOptions(plugin_form_artifacts, tmp_path / "repo", backend=backend), log=lambda _: None)
    assert "re-export" in str(err.value) and "--backend tensorrt" in str(err.value)
    assert not (tmp_path / "repo").exists()


def test_plugin_form_graph_still_serves_its_engine(plugin_form_artifacts, plan_artifacts, tmp_path):
    """The refusal is the onnxruntime forms': the same graph beside an engine defaults to tensorrt."""
    folder = tmp_path / "artifacts"
    shutil.copytree(plugin_form_artifacts, folder)
    shutil.copy(plan_artifacts / "model.plan", folder / "model.plan")
    shutil.copy(plan_artifacts / "manifest.json", folder / "manifest.json")
    result = build_repository(RepoOptions(folder, tmp_path / "repo"), log=lambda _: None)
    assert result.backend == "tensorrt" and _configs(result.out)["encoder"].platform == "tensorrt_plan"


def test_cli_refuses_a_plugin_form_graph_with_exit_2(plugin_form_artifacts, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "triton_repo.build", "--artifacts", str(plugin_form_artifacts),
                           "--out", str(tmp_path / "repo"), "--backend", "python"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 2, proc.stderr
    assert "onnxruntime cannot run" in proc.stderr and "--backend tensorrt" in proc.stderr


# ------------------------------------------------------------------ UNICOM: embedding, no class token, --normalize

@pytest.fixture(scope="module")
def unicom_artifacts(tmp_path_factory):
    """A tiny UNICOM model exported from its released-format .pt file."""
    return tiny_artifacts(tmp_path_factory.mktemp("triton-unicom"), "unicom", max_batch=4)


def test_unicom_repository_answers_the_embedding(unicom_artifacts, tmp_path):
    repo = build_repository(RepoOptions(unicom_artifacts, tmp_path / "repo", backend="python"), log=lambda _: None).out
    cfgs = _configs(repo)
    assert set(cfgs) == {"embed", "encoder", "preprocess"}  # no normalize step by default
    ens = cfgs["embed"]
    assert [(o.name, list(o.dims)) for o in ens.output] == [("last_hidden_state", [-1, 128]), ("embedding", [96])]
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["preprocess", "encoder"]
    assert dict(ens.ensemble_scheduling.step[1].output_map) == {"last_hidden_state": "last_hidden_state",
                                                                 "embedding": "embedding"}
    readme = (repo / "README.md").read_text()
    assert 'InferRequestedOutput("embedding")' in readme and "(1, 96)" in readme and "L2-normalized" not in readme
    info = json.loads((repo / "mvt_repository.json").read_text())
    assert info["pooled_output"] == "embedding" and info["normalized"] is False


def test_normalize_adds_a_step_for_the_pooled_output_only(unicom_artifacts, tmp_path):
    repo = build_repository(RepoOptions(unicom_artifacts, tmp_path / "repo", backend="python", normalize=True,
                                        instances=2), log=lambda _: None).out
    cfgs = _configs(repo)
    norm, ens = cfgs["normalize"], cfgs["embed"]
    assert norm.backend == "python" and (repo / "normalize/1/model.py").is_file()
    assert [(i.name, list(i.dims)) for i in norm.input] == [("unnormalized", [96])]
    assert [(o.name, list(o.dims)) for o in norm.output] == [("normalized", [96])]
    assert norm.max_batch_size == ens.max_batch_size == 4 and norm.instance_group[0].count == 2
    steps = ens.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["preprocess", "encoder", "normalize"]
    assert dict(steps[1].output_map) == {"last_hidden_state": "last_hidden_state", "embedding": "_embedding"}
    assert dict(steps[2].input_map) == {"unnormalized": "_embedding"}
    assert dict(steps[2].output_map) == {"normalized": "embedding"}
    assert [o.name for o in ens.output] == ["last_hidden_state", "embedding"]  # same names for clients
    assert "L2-normalized" in (repo / "README.md").read_text()
    with pytest.raises(OptionError, match="--name normalize is taken"):
        build_repository(RepoOptions(unicom_artifacts, tmp_path / "r2", backend="python", name="normalize"),
                         log=lambda _: None)


def test_unicom_engine_sequence_has_no_class_token(unicom_artifacts, tmp_path):
    """FAKE plan, as plan_artifacts: the engine's exact sequence length is the 16 patches, without a class token."""
    folder = _with_fake_plan(unicom_artifacts, tmp_path / "artifacts")
    enc = _configs(build_repository(RepoOptions(folder, tmp_path / "repo"), log=lambda _: None).out)["encoder"]
    assert [list(o.dims) for o in enc.output] == [[16, 128], [96]]


def test_cli_normalize_flag(unicom_artifacts, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "triton_repo.build", "--artifacts", str(unicom_artifacts), "--out",
                           str(tmp_path / "repo"), "--backend", "python", "--normalize"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert "-> normalize" in proc.stdout and (tmp_path / "repo/normalize/config.pbtxt").is_file()
