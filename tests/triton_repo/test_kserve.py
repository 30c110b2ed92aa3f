"""`python -m triton_repo.build ... --kserve`: the InferenceService, validated against KServe's own CRD schema
(tests/data/kserve/README.md), and the start-up step that rebuilds the plan where it runs.

The tensorrt form is generated from a FAKE plan (as in tests/triton_repo/test_triton_config.py): only its presence and
profile matter to the generator; the start-up step is run for real with TensorRT-RTX on this CPU. It is also
generated from a CPU export without any plan (`--runtime none`, the `artifacts` fixture): the pod builds it.
"""

from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from export.core.errors import OptionError, OutputExistsError
from export.core.folder import sha256
from export.engine.profiles import profile_max_batch
from export.rebuild import engine_shapes, verify_artifacts
from triton_repo import build as repo_build, kserve
from triton_repo.build import RepoOptions, build_repository
from triton_repo.config import parse_config
from triton_repo.kserve import KServeOptions
from triton_repo.testing import import_or_skip, tiny_artifacts

yaml = pytest.importorskip("yaml", reason="pip install 'mvt-deploy[kserve]'")
jsonschema = pytest.importorskip("jsonschema", reason="pip install 'mvt-deploy[kserve]'")
import_or_skip("tritonclient.grpc.model_config_pb2")  # the repository generator needs the serve extra

SCHEMA = Path(__file__).parents[1] / "data" / "kserve" / "inferenceservice-v1beta1.schema.json.gz"
HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None and importlib.util.find_spec("polygraphy") is not None


def strict(schema):
    """The API server's strict field validation: an object that lists its properties takes no others."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    return [strict(v) for v in schema] if isinstance(schema, list) else schema


@pytest.fixture(scope="module")
def validator():
    schema = strict(json.loads(gzip.decompress(SCHEMA.read_bytes())))
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return cls(schema)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tiny_artifacts(tmp_path_factory.mktemp("kserve"), max_batch=4)


@pytest.fixture(scope="module")
def plan_artifacts(artifacts, tmp_path_factory):
    """FAKE engine artifacts: a placeholder model.plan recorded (with its hash) in the manifest and a max-batch-4
    profile. Never served: the start-up step replaces it."""
    folder = Path(shutil.copytree(artifacts, tmp_path_factory.mktemp("fake-plan") / "artifacts"))
    plan = folder / "model.plan"
    plan.write_bytes(b"placeholder, not a TensorRT engine")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engine"] = {"built": True, "runtime": "tensorrt", "version": "fake", "gpu": {"name": "workstation"},
                          "profiles": {"pixel_values": {"min": [1, 3, 56, 56], "opt": [2, 3, 56, 56],
                                                        "max": [4, 3, 56, 56]}}}
    manifest["artifacts"]["model.plan"] = {"sha256": sha256(plan), "bytes": plan.stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _build(art: Path, root: Path, backend: str, max_batch: int | None = None, **kwargs) -> tuple[Path, dict]:
    options = KServeOptions(storage_uri="s3://models/mvt/repository", **kwargs)
    repo = build_repository(RepoOptions(art, root / "repository", backend=backend, max_batch=max_batch,
                                        kserve=options), log=lambda _: None).out
    isvc = yaml.safe_load((root / "kserve" / "inferenceservice.yaml").read_text())
    return repo, isvc


def test_tensorrt_form_inference_service(plan_artifacts, tmp_path, validator):
    repo, isvc = _build(plan_artifacts, tmp_path, "tensorrt", image="reg.example/mvt-triton:25.10")
    assert list(validator.iter_errors(isvc)) == []
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert isvc["metadata"]["name"] == "embed"
    assert isvc["metadata"]["annotations"]["storage.kserve.io/readonly"] == "false"  # the step writes the plan
    predictor = isvc["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 3)
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("concurrency", 4)  # the engine's max batch
    model = predictor["model"]
    assert model["modelFormat"] == {"name": "triton"} and model["runtime"] == "kserve-tritonserver"
    assert model["storageUri"] == "s3://models/mvt/repository" and model["image"] == "reg.example/mvt-triton:25.10"
    assert model["resources"]["requests"]["nvidia.com/gpu"] == model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert model["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    shell, flag, script, name = model["command"]
    assert (shell, flag, name) == ("/bin/sh", "-c", "mvt-start")
    assert "python3 -m export.build_engine --artifacts /mnt/models/encoder/artifacts --runtime tensorrt " \
        "--max-batch 4" in script
    assert script.splitlines()[0] == "set -e" and script.splitlines()[-1] == 'exec "$@"'
    # kserve/ is a sibling of the repository, never inside it (Triton would load it as a model)
    assert (tmp_path / "kserve").is_dir() and not (repo / "kserve").exists()
    assert {p.name for p in (tmp_path / "kserve").iterdir()} == {"inferenceservice.yaml", "README.md", "Dockerfile"}
    dockerfile = (tmp_path / "kserve" / "Dockerfile").read_text()
    assert "--no-deps /opt/mvt-deploy" in dockerfile and '"tensorrt-cu12==${TENSORRT_VERSION}"' in dockerfile
    assert "python3 -m triton_repo.versions --check-image" in dockerfile
    readme = (tmp_path / "kserve" / "README.md").read_text()
    assert "kubectl apply -f" in readme and "aws s3 sync" in readme and "rebuilt for the node's GPU" in readme
    # the image's Triton release and TensorRT (triton_repo/versions.py), and the RoPE lowering the pod may choose
    assert "The release must be 25.05 or later:" in readme
    assert "as the Dockerfile checks: releases 25.05-25.07" in readme
    assert "`engine-<rope>-<attention>.onnx`" in readme and "`rope_lowering`" in readme
    assert "## GPU memory per encoder instance (an estimate)" in (repo / "README.md").read_text()
    # the export folder travels in the repository, intact, for the start-up step
    copied = repo / "encoder" / "artifacts"
    assert verify_artifacts(copied, json.loads((copied / "manifest.json").read_text())) >= 3
    assert (repo / "encoder" / "1" / "model.plan").is_file()


def test_python_form_needs_no_gpu_and_no_start_step(artifacts, tmp_path, validator):
    repo, isvc = _build(artifacts, tmp_path, "python", min_replicas=0, max_replicas=5, scale_metric="rps",
                        scale_target=20)
    assert list(validator.iter_errors(isvc)) == []
    predictor = isvc["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"], predictor["scaleMetric"], predictor["scaleTarget"]) \
        == (0, 5, "rps", 20)
    model = predictor["model"]
    assert "nvidia.com/gpu" not in model["resources"]["requests"]
    assert "command" not in model  # the runtime's own command line
    assert model["image"] == kserve.PLACEHOLDER_IMAGE
    assert "storage.kserve.io/readonly" not in isvc["metadata"]["annotations"]
    assert not (repo / "encoder" / "artifacts").exists()
    dockerfile = (tmp_path / "kserve" / "Dockerfile").read_text()
    assert "onnxruntime" in dockerfile and "numpy<2" in dockerfile and "TENSORRT_VERSION" not in dockerfile


def test_schema_check_catches_mistakes(plan_artifacts, tmp_path, validator):
    """The validation has teeth: a misspelled field, a wrong enum and a wrong type each fail."""
    _, isvc = _build(plan_artifacts, tmp_path, "tensorrt")
    for path, value in ((("spec", "predictor", "minReplica"), 1), (("spec", "predictor", "scaleMetric"), "latency"),
                        (("spec", "predictor", "model", "modelFormat"), "triton")):
        broken = copy.deepcopy(isvc)
        node = broken
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert list(validator.iter_errors(broken)), path


def test_placeholders_are_flagged(plan_artifacts, tmp_path):
    lines: list[str] = []
    build_repository(RepoOptions(plan_artifacts, tmp_path / "repository", backend="tensorrt", kserve=KServeOptions()),
                     log=lines.append)
    assert "set --storage-uri and --image (placeholders now)" in lines[-2]
    model = yaml.safe_load((tmp_path / "kserve" / "inferenceservice.yaml").read_text())["spec"]["predictor"]["model"]
    assert model["storageUri"] == kserve.PLACEHOLDER_URI and model["image"] == kserve.PLACEHOLDER_IMAGE


def test_existing_kserve_folder_needs_force(artifacts, tmp_path):
    (tmp_path / "kserve").mkdir()
    (tmp_path / "kserve" / "mine.yaml").write_text("keep")
    options = KServeOptions(storage_uri="gs://b/repo")
    with pytest.raises(OutputExistsError, match="--force"):
        build_repository(RepoOptions(artifacts, tmp_path / "repository", backend="python", kserve=options),
                         log=lambda _: None)
    assert (tmp_path / "kserve" / "mine.yaml").read_text() == "keep"
    assert not (tmp_path / "repository").exists()  # nothing half-written
    build_repository(RepoOptions(artifacts, tmp_path / "repository", backend="python", kserve=options, force=True),
                     log=lambda _: None)
    assert {p.name for p in (tmp_path / "kserve").iterdir()} == {"inferenceservice.yaml", "README.md", "Dockerfile"}


@pytest.mark.parametrize("options, message", [
    (KServeOptions(storage_uri="my-bucket/repo"), "--storage-uri my-bucket/repo is not a location"),
    (KServeOptions(max_replicas=0), "--max-replicas 0 must be at least 1"),
    (KServeOptions(min_replicas=4, max_replicas=2), "at least --min-replicas (4)"),
    (KServeOptions(scale_target=0), "--scale-target 0 must be at least 1"),
    (KServeOptions(name="Embed_Model"), "use embed-model"),
])
def test_bad_options_write_nothing(artifacts, tmp_path, options, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_repository(RepoOptions(artifacts, tmp_path / "repository", backend="python", kserve=options),
                         log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_cli(artifacts, tmp_path, capsys):
    argv = ["--artifacts", str(artifacts), "--out", str(tmp_path / "deploy" / "repository"), "--backend", "python",
            "--name", "rice_embed", "--kserve", "--storage-uri", "pvc://models/rice", "--max-replicas", "2"]
    assert repo_build.main(argv) == 0
    isvc = yaml.safe_load((tmp_path / "deploy" / "kserve" / "inferenceservice.yaml").read_text())
    assert isvc["metadata"]["name"] == "rice-embed"  # a DNS-1035 label from the ensemble name
    assert isvc["spec"]["predictor"]["maxReplicas"] == 2
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == "pvc://models/rice"
    native = ["--artifacts", str(artifacts), "--out", str(tmp_path / "r2"), "--kserve", "--preprocess", "native"]
    assert repo_build.main(native) == 2
    assert "--kserve writes an InferenceService for the crop ensemble" in capsys.readouterr().err


@pytest.mark.parametrize("version, expected", [
    ("10.8.0.43", None),  # below 10.9 (25.02 and older): the image is not built, no start step runs
    ("10.11.0.33", "decomposed"),  # 10.9-10.14 (25.07's): the plugin's kernel compiler is not in the image
    ("10.16.0.72", "onnx23"),  # 10.15 on: RotaryEmbedding
])
def test_start_step_has_what_its_lowering_needs(artifacts, tmp_path, version, expected):
    """A 2D-RoPE export's KServe files, at each TensorRT band the image may carry: the lowering the start step's
    rebuild picks (engine_lowering, asked with the modules the generated Dockerfile installs) builds with those."""
    from export.core.manifest import read_manifest
    from export.graph.lowering import BUILD_MODULES, MIN_TENSORRT, engine_lowering, unbuildable
    from triton_repo import versions
    from triton_repo.testing import installed_modules

    repo, isvc = _build(artifacts, tmp_path, "tensorrt", image="reg.example/mvt-triton:25.07")
    manifest = read_manifest(repo / "encoder" / "artifacts")  # what the pod's start step reads
    assert manifest.rope == "auto" and manifest.rope_lowering == "custom"  # 2D RoPE, the portable op
    assert "python3 -m export.build_engine --artifacts /mnt/models/encoder/artifacts --runtime tensorrt " \
        in isvc["spec"]["predictor"]["model"]["command"][2]
    modules = installed_modules((tmp_path / "kserve" / "Dockerfile").read_text())
    assert {"export", "onnx", "polygraphy", "tensorrt"} <= modules and not {"triton", "torch"} & modules
    problem = versions.image_problem("12.9.1.010", version, None)  # the Dockerfile's check, at docker build
    if expected is None:
        assert "is outside tensorrt-cu12>=10.9,<11" in problem
        return
    assert problem is None
    engine = ("tensorrt", version)
    lowering, why = engine_lowering(manifest.rope, engine, modules.__contains__)
    assert (lowering, why) == (expected, None)
    assert set(BUILD_MODULES.get(lowering, ())) <= modules and unbuildable(lowering, engine, modules.__contains__) \
        is None
    assert tuple(int(p) for p in version.split(".")[:2]) >= MIN_TENSORRT.get(lowering, (0, 0))
    # an image that adds the plugin's kernel compiler gets the plugin on 10.9-10.14, and has what it needs
    richer = modules | {"triton", "torch"}
    lowering, _ = engine_lowering(manifest.rope, engine, richer.__contains__)
    assert lowering == ("plugin" if expected == "decomposed" else expected)
    assert set(BUILD_MODULES.get(lowering, ())) <= richer


def _run_start_step(repo: Path, isvc: dict, runtime: str, *extra: str) -> subprocess.CompletedProcess:
    """The generated serving container's command with /mnt/models -> `repo` and `echo SERVED ...` for
    tritonserver; `runtime` and `extra` (RTX targets) stand in for the image's TensorRT."""
    script = isvc["spec"]["predictor"]["model"]["command"][2].replace(kserve.MOUNT, str(repo))
    assert "--runtime tensorrt " in script
    script = script.replace("--runtime tensorrt ", " ".join(["--runtime", runtime, *extra, ""]), 1)
    bindir = Path(sys.executable).parent  # python3 of the test environment, as the image's would be
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["/bin/sh", "-c", script, "mvt-start", "echo", "SERVED", "--model-store=/mnt/models"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parents[2])


def test_start_step_without_tensorrt_fails_before_serving(plan_artifacts, tmp_path):
    pytest.importorskip("polygraphy")
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("datacenter TensorRT is installed: this checks the machine without it")
    repo, isvc = _build(plan_artifacts, tmp_path, "tensorrt")
    before = (repo / "encoder" / "1" / "model.plan").read_bytes()
    proc = _run_start_step(repo, isvc, "tensorrt")
    assert proc.returncode == 2 and "SERVED" not in proc.stdout  # set -e: no server on a stale plan
    assert "install mvt-deploy[tensorrt]" in proc.stderr
    assert (repo / "encoder" / "1" / "model.plan").read_bytes() == before


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt-rtx / polygraphy not installed (extra: tensorrt-rtx)")
def test_start_step_rebuilds_the_plan_then_execs_the_server(plan_artifacts, tmp_path):
    """The start-up step end to end on this CPU, with TensorRT-RTX standing in for the image's TensorRT."""
    repo, isvc = _build(plan_artifacts, tmp_path, "tensorrt")
    proc = _run_start_step(repo, isvc, "tensorrt-rtx", "--compute-capability", "8.9")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("SERVED --model-store=/mnt/models")  # exec'd the runtime's command line
    served, rebuilt = repo / "encoder" / "1" / "model.plan", repo / "encoder" / "artifacts" / "model.plan"
    assert served.read_bytes() == rebuilt.read_bytes() and served.stat().st_size > 10_000
    manifest = json.loads((repo / "encoder" / "artifacts" / "manifest.json").read_text())
    assert manifest["engine"]["runtime"] == "tensorrt-rtx" and manifest["engine"]["sha256"] == sha256(served)
    assert manifest["engine_history"][-1]["gpu"] == {"name": "workstation"}
    # the hard-linked originals in the export folder are untouched (the step replaces files, never edits them)
    assert (plan_artifacts / "model.plan").read_bytes() == b"placeholder, not a TensorRT engine"
    assert json.loads((plan_artifacts / "manifest.json").read_text())["engine"]["version"] == "fake"


# --- a CPU export (`--runtime none`, no plan): the tensorrt form's plan is built by the pod's start-up step

def test_cpu_export_serves_as_tensorrt_under_kserve(artifacts, tmp_path, capsys, validator):
    out = tmp_path / "deploy" / "repository"
    argv = ["--artifacts", str(artifacts), "--out", str(out), "--backend", "tensorrt", "--kserve",
            "--storage-uri", "s3://models/mvt/repository", "--image", "reg.example/mvt-triton:25.10"]
    assert repo_build.main(argv) == 0
    log = capsys.readouterr().out
    assert f"{artifacts} has no model.plan: no engine requested (--runtime none)" in log
    assert "the KServe start-up step builds model.plan on each serving node (--max-batch 4)" in log
    isvc = yaml.safe_load((tmp_path / "deploy" / "kserve" / "inferenceservice.yaml").read_text())
    assert list(validator.iter_errors(isvc)) == []
    assert isvc["metadata"]["annotations"]["mvt-deploy/encoder-form"] == "tensorrt"
    predictor = isvc["spec"]["predictor"]
    assert predictor["scaleTarget"] == 4 and predictor["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    script = predictor["model"]["command"][2]
    assert "--runtime tensorrt --max-batch 4 " in script and "mkdir -p /mnt/models/encoder/1" in script
    # the config is the tensorrt_plan one, complete from the manifest alone
    manifest = json.loads((artifacts / "manifest.json").read_text())
    assert manifest["engine"]["built"] is False and manifest["interface"]["max_batch"] == 4
    enc = parse_config(out / "encoder" / "config.pbtxt")
    assert enc.platform == "tensorrt_plan" and enc.default_model_filename == "model.plan"
    assert enc.instance_group[0].kind == enc.instance_group[0].KIND_GPU
    shapes = engine_shapes(manifest, 4)  # what the pod's rebuild builds: one profile (a fixed resolution)
    assert isinstance(shapes, dict)
    profile = shapes["pixel_values"]
    assert enc.max_batch_size == profile["max"][0] == 4
    assert [(i.name, list(i.dims)) for i in enc.input] == [("pixel_values", profile["max"][1:])]
    # 56x56 in patches of 14 plus the class token: 17 tokens of width 64
    assert {o.name: list(o.dims) for o in enc.output} == {"last_hidden_state": [17, 64], "pooler_output": [64]}
    assert parse_config(out / "embed" / "config.pbtxt").max_batch_size == 4
    # Triton loads encoder/1/model.plan: absent until the start-up step copies it there; warm-up needs no plan
    assert (out / "encoder" / "1").is_dir() and list((out / "encoder" / "1").iterdir()) == []
    assert (out / "encoder" / "warmup" / "pixel_values").stat().st_size == 3 * 56 * 56 * 4
    copied = out / "encoder" / "artifacts"
    assert verify_artifacts(copied, json.loads((copied / "manifest.json").read_text())) >= 2
    readme = (tmp_path / "deploy" / "kserve" / "README.md").read_text()
    assert "holds no plan of its own" in readme and "`encoder/1/` is empty" in readme and "--max-batch 4" in readme
    repo_readme = (out / "README.md").read_text()
    assert "builds on each serving node" in repo_readme
    # one profile, one context; the weights from model.onnx until a pod has built the plan
    assert "holds one execution context" in repo_readme and "(the size of model.onnx: no plan yet)" in repo_readme
    assert "It needs Triton 25.05 or later" in repo_readme
    assert "execution_context_allocation_strategy" not in (out / "encoder" / "config.pbtxt").read_text()


def test_cpu_export_without_kserve_is_refused_as_before(artifacts, tmp_path):
    """A local repository cannot serve a plan that does not exist; and the default form is unchanged."""
    message = (f"--backend tensorrt needs {artifacts}/model.plan and its optimization profile in the manifest "
               "(no engine requested (--runtime none)); build the engine on a GPU machine, or use --backend "
               "onnxruntime|python")
    with pytest.raises(OptionError) as err:
        build_repository(RepoOptions(artifacts, tmp_path / "repository", backend="tensorrt"), log=lambda _: None)
    assert str(err.value) == message
    assert list(tmp_path.iterdir()) == []
    result = build_repository(RepoOptions(artifacts, tmp_path / "repository", kserve=KServeOptions()),
                              log=lambda _: None)
    assert result.backend == "onnxruntime"  # no --backend: the first form that serves the export as it is
    assert parse_config(result.out / "encoder" / "config.pbtxt").platform == "onnxruntime_onnx"


def test_max_batch_above_the_exports_is_passed_to_the_pod(artifacts, tmp_path):
    repo, isvc = _build(artifacts, tmp_path, "tensorrt", max_batch=16)
    assert "--runtime tensorrt --max-batch 16 " in isvc["spec"]["predictor"]["model"]["command"][2]
    assert isvc["spec"]["predictor"]["scaleTarget"] == 16
    for model in ("encoder", "preprocess", "embed"):
        assert parse_config(repo / model / "config.pbtxt").max_batch_size == 16, model
    assert json.loads((repo / "mvt_repository.json").read_text())["max_batch"] == 16
    with pytest.raises(OptionError, match="--max-batch 0 must be at least 1"):
        _build(artifacts, tmp_path / "zero", "tensorrt", max_batch=0)


@pytest.mark.parametrize("runtime, max_batch, served", [
    ("tensorrt", None, True),  # the plan the pod keeps on the GPU that built it: it goes into encoder/1/
    ("tensorrt", 8, False),  # its profile stops at 4: the pod builds one for 8
    ("tensorrt-rtx", None, False),  # Triton's TensorRT backend cannot load it
])
def test_recorded_plan_is_placed_only_when_the_pod_keeps_it(plan_artifacts, tmp_path, runtime, max_batch, served):
    folder = Path(shutil.copytree(plan_artifacts, tmp_path / "artifacts"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engine"]["runtime"] = runtime
    (folder / "manifest.json").write_text(json.dumps(manifest))
    repo, isvc = _build(folder, tmp_path, "tensorrt", max_batch=max_batch)
    assert (repo / "encoder" / "1" / "model.plan").is_file() == served
    assert (repo / "encoder" / "1").is_dir()
    wanted = max_batch or 4
    assert f"--max-batch {wanted} " in isvc["spec"]["predictor"]["model"]["command"][2]
    assert parse_config(repo / "encoder" / "config.pbtxt").max_batch_size == wanted
    if not served:  # without --kserve the same request is refused, as before
        with pytest.raises(OptionError, match="built with tensorrt-rtx|larger than the engine's optimization"):
            build_repository(RepoOptions(folder, tmp_path / "local", backend="tensorrt", max_batch=max_batch),
                             log=lambda _: None)


def test_export_the_pod_cannot_build_is_refused(artifacts, tmp_path):
    folder = Path(shutil.copytree(artifacts, tmp_path / "artifacts"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["precision"], manifest["options"]["quant_target"] = "int8", "cpu"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(OptionError, match=re.escape("holds a --quant-target cpu int8 graph for onnxruntime on CPUs, "
                                                    "which the pod's start-up step cannot build")):
        _build(folder, tmp_path / "deploy", "tensorrt")
    assert not (tmp_path / "deploy").exists()


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt-rtx / polygraphy not installed (extra: tensorrt-rtx)")
def test_start_step_builds_the_plan_a_cpu_export_lacks(artifacts, tmp_path):
    """From `--runtime none` to a served plan: the generated start-up step, TensorRT-RTX standing in."""
    repo, isvc = _build(artifacts, tmp_path, "tensorrt", max_batch=6)
    (repo / "encoder" / "1").rmdir()  # as after `aws s3 sync`: an object store keeps no empty folder
    proc = _run_start_step(repo, isvc, "tensorrt-rtx", "--compute-capability", "8.9")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("SERVED --model-store=/mnt/models")
    served, rebuilt = repo / "encoder" / "1" / "model.plan", repo / "encoder" / "artifacts" / "model.plan"
    assert served.read_bytes() == rebuilt.read_bytes() and served.stat().st_size > 10_000
    assert sorted(p.name for p in served.parent.iterdir()) == ["model.plan"]  # no .tmp left behind
    manifest = json.loads((repo / "encoder" / "artifacts" / "manifest.json").read_text())
    assert manifest["engine"]["built"] is True and manifest["engine"]["sha256"] == sha256(served)
    # the plan's profile is the one the config was written for (max batch 6, above the export's 4)
    assert manifest["engine"]["profiles"] == engine_shapes(manifest, 6)
    assert profile_max_batch(manifest["engine"]["profiles"]) \
        == parse_config(repo / "encoder" / "config.pbtxt").max_batch_size == 6
    assert not (artifacts / "model.plan").exists()  # the export folder itself is untouched
    assert json.loads((artifacts / "manifest.json").read_text())["engine"]["built"] is False
