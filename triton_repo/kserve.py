"""`python -m triton_repo.build ... --kserve`: a KServe InferenceService for the generated repository.

Writes `kserve/` beside the repository (a sibling of --out, never inside it: Triton loads every folder of
its repository as a model, and KServe hands the storageUri's root to Triton as the repository):

    deploy/repository/   -> uploaded to --storage-uri (KServe's storage initializer copies it to /mnt/models)
    deploy/kserve/       -> inferenceservice.yaml, README.md (+ Dockerfile for engine forms): kubectl's side

The InferenceService runs on KServe's Triton runtime (`kserve-tritonserver`, model format `triton`).
For an engine form (`tensorrt`) the plan is rebuilt where it runs: the repository carries the export
folder as `encoder/artifacts/` (a non-numeric folder in a model, which Triton ignores: "ignore version
directory 'artifacts' which fails to convert to integral number", tritonserver 2.51, measured), and the
serving container starts with `python -m export.build_engine --artifacts` before it execs the runtime's
own `tritonserver` command line. Why a start-up step and not an initContainer: KServe's pod webhook
appends its storage-initializer after the predictor's initContainers
(pkg/webhook/admission/pod/storage_initializer_injector.go), so an initContainer would run before the
model is downloaded; the serving container runs after it, on the node's GPU, with the serving image's
TensorRT, which is exactly the pairing a plan needs. Hence the export needs no plan at all: one made on
a CPU machine (`--runtime none`), or with a TensorRT-RTX plan, leaves `encoder/1/` empty until that step fills it.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from export.core.errors import OptionError, require
from export.core.folder import MANIFEST_NAME, PLAN_NAME
from triton_repo import versions
from triton_repo.layout import link_or_copy
from triton_repo.options import PLACEHOLDER_IMAGE, PLACEHOLDER_URI, KServeOptions  # with RepoOptions, which holds one

if TYPE_CHECKING:
    from triton_repo.export_folder import Artifacts
    from triton_repo.forms import EncoderForm

KSERVE_DIR = "kserve"  # beside the repository: <parent of --out>/kserve/
ISVC_FILE = "inferenceservice.yaml"
API_VERSION = "serving.kserve.io/v1beta1"
MODEL_FORMAT = "triton"  # the kserve-tritonserver runtime's format for a whole Triton repository
RUNTIME = "kserve-tritonserver"  # KServe's ClusterServingRuntime for Triton
# The runtime's container (charts/kserve-runtime-configs/files/runtimes/resources.yaml): tritonserver
# --model-store=/mnt/models --grpc-port=9000 --http-port=8080, running as uid 1000, as does the storage
# initializer (python/storage-initializer.Dockerfile: USER 1000), so the start-up step may write its files.
MOUNT = "/mnt/models"
HTTP_PORT = 8080
READY_PATH = "/v2/health/ready"  # Triton's readiness: every model loaded
ARTIFACTS_DIR = "artifacts"  # <encoder>/artifacts/ in the repository, for engine forms
READONLY_ANNOTATION = "storage.kserve.io/readonly"  # "false": the start-up step rewrites model.plan
GPU_RESOURCE = "nvidia.com/gpu"
SCALE_METRICS = ("concurrency", "rps", "cpu", "memory")  # the CRD's enum for predictor.scaleMetric
STORAGE_SCHEMES = ("s3://", "gs://", "pvc://", "hdfs://", "webhdfs://", "https://", "http://")
TIMING_CACHE = "/tmp/mvt-deploy-timing.cache"  # the runtime's uid may have no writable home


def kserve_dir(repository: Path) -> Path:
    return Path(repository).parent / KSERVE_DIR


def isvc_name(name: str) -> str:
    """A DNS-1035 label (KServe's rule for InferenceService names): lowercase letters, digits and '-'."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not label or not label[0].isalpha():
        label = f"mvt-{label}".rstrip("-")
    return label[:63].rstrip("-")


def check_options(options: KServeOptions, form: str | None = None) -> None:
    """Refuse what KServe or the serving image cannot take (form: the encoder form, for its minimum Triton)."""
    if options.min_replicas < 0:
        raise OptionError(f"--min-replicas {options.min_replicas} must be 0 or more")
    if options.max_replicas < max(1, options.min_replicas):
        raise OptionError(f"--max-replicas {options.max_replicas} must be at least 1 and at least --min-replicas "
                          f"({options.min_replicas})")
    if options.scale_metric not in SCALE_METRICS:
        raise OptionError(f"--scale-metric {options.scale_metric} is unknown; choose one of {', '.join(SCALE_METRICS)}")
    if options.scale_target is not None and options.scale_target < 1:
        raise OptionError(f"--scale-target {options.scale_target} must be at least 1")
    if options.gpus is not None and options.gpus < 0:
        raise OptionError(f"--gpus {options.gpus} must be 0 or more")
    if not options.storage_uri.startswith(STORAGE_SCHEMES):
        raise OptionError(f"--storage-uri {options.storage_uri} is not a location KServe's storage initializer "
                          f"reads; use one of {', '.join(s + '...' for s in STORAGE_SCHEMES)}")
    if options.name is not None and isvc_name(options.name) != options.name:
        raise OptionError(f"InferenceService name {options.name} is not a DNS-1035 label; use "
                          f"{isvc_name(options.name)}")
    release = versions.image_release(options.image)
    if release is not None:  # KServe's own runtime image is one (tritonserver:23.05-py3, its resources.yaml)
        minimum = versions.minimum_release(form)
        older = (f"; and {release} is older than the {minimum} this output needs (docs/serving.md)"
                 if minimum and versions.release_key(release) < versions.release_key(minimum) else "")
        raise OptionError(f"--image {options.image} is a stock Triton image, without pillow and numpy<2 for the "
                          f"preprocess step (nor, for engines, what the start-up step runs){older}: build "
                          "kserve/Dockerfile (its TRITON_IMAGE build argument takes a Triton release) and pass the "
                          "image it makes")


def start_script(encoder: str, runtime: str, max_batch: int, mount: str = MOUNT) -> str:
    """The serving container's start: rebuild the plan for this node's GPU and this image's TensorRT (kept
    when the recorded plan already fits), put it where Triton loads it, then exec the runtime's command
    line, which KServe passes as arguments (it appends the runtime's args to the predictor's).

    max_batch: the encoder config's max_batch_size, passed as --max-batch so that the plan's profile holds
    it whatever the manifest's export-time max batch was."""
    artifacts = f"{mount}/{encoder}/{ARTIFACTS_DIR}"
    version = f"{mount}/{encoder}/1"
    plan = f"{version}/{PLAN_NAME}"
    return "\n".join([
        "set -e",
        f"python3 -m export.build_engine --artifacts {artifacts} --runtime {runtime} --max-batch {max_batch} "
        f"--timing-cache {TIMING_CACHE}",
        # an object store keeps no empty folder: the version folder of an export without a plan may be missing
        f"mkdir -p {version}",
        f"cp {artifacts}/{PLAN_NAME} {plan}.tmp",
        f"mv {plan}.tmp {plan}",
        'exec "$@"',
    ])


def resources(art: Artifacts, gpus: int) -> dict:
    """Memory from the model's size (a TensorRT build holds the weights about three times), at least 4 GiB."""
    weights = sum(int(record.size or 0) for record in art.manifest.artifacts.values())
    memory = f"{max(4, math.ceil(3 * weights / 1024**3))}Gi"
    requests: dict[str, str] = {"cpu": "2", "memory": memory}
    limits: dict[str, str] = {"cpu": "4", "memory": memory}
    if gpus:  # an extended resource: requests and limits must be equal
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(gpus)
    return {"requests": requests, "limits": limits}


def inference_service(options: KServeOptions, *, ensemble: str, encoder: str, spec: EncoderForm, art: Artifacts,
                      max_batch: int) -> dict:
    """The InferenceService (serving.kserve.io/v1beta1) as a plain dict, in the order it is written."""
    engine = spec.needs_engine
    gpus = options.gpus if options.gpus is not None else (1 if spec.kind == "KIND_GPU" else 0)
    model: dict = {
        "modelFormat": {"name": MODEL_FORMAT},
        "runtime": RUNTIME,
        "protocolVersion": "v2",
        "storageUri": options.storage_uri,
    }
    model["image"] = options.image
    if engine:
        # sh -c SCRIPT NAME ARGS...: the runtime's args (tritonserver ...) become "$@"
        model["command"] = ["/bin/sh", "-c", start_script(encoder, spec.engine_runtimes[0], max_batch), "mvt-start"]
    model["resources"] = resources(art, gpus)
    model["readinessProbe"] = {"httpGet": {"path": READY_PATH, "port": HTTP_PORT},
                               "initialDelaySeconds": 5, "periodSeconds": 10, "failureThreshold": 3}
    annotations = {"mvt-deploy/encoder-form": spec.name}
    if engine:
        annotations[READONLY_ANNOTATION] = "false"
    return {
        "apiVersion": API_VERSION,
        "kind": "InferenceService",
        "metadata": {"name": options.name or isvc_name(ensemble), "annotations": annotations,
                     "labels": {"app.kubernetes.io/part-of": "mvt-deploy"}},
        "spec": {"predictor": {
            "minReplicas": options.min_replicas,
            "maxReplicas": options.max_replicas,
            "scaleMetric": options.scale_metric,
            "scaleTarget": options.scale_target or max_batch,
            "model": model,
        }},
    }


def write_kserve(options: KServeOptions, *, stage: Path, out: Path, ensemble: str, encoder: str, spec: EncoderForm,
                 art: Artifacts, max_batch: int, force: bool, log: Callable[[str], None] = print,
                 plan_in_pod: str | None = None) -> Path:
    """Add what the start-up step needs to the repository being staged (`stage`, published as `out`), and
    write kserve/ beside `out` (staged, then renamed; an existing one is replaced only with `force`).

    plan_in_pod: why the repository holds no plan of its own (resolve.unserved_plan): every pod builds it."""
    from export.core.folder import staged_output

    yaml = require("yaml", "kserve")
    check_options(options, spec.name)
    folder = kserve_dir(out)
    if spec.needs_engine:  # the export folder, hard-linked: the start-up step rebuilds the plan from it
        for name in [MANIFEST_NAME, *sorted(art.manifest.artifacts)]:
            link_or_copy(art.folder / name, stage / encoder / ARTIFACTS_DIR / name)
    isvc = inference_service(options, ensemble=ensemble, encoder=encoder, spec=spec, art=art, max_batch=max_batch)
    with staged_output(folder, force) as kstage:
        (kstage / ISVC_FILE).write_text(to_yaml(yaml, isvc))
        (kstage / "README.md").write_text(kserve_readme(isvc, out, folder, spec, encoder, max_batch, plan_in_pod))
        (kstage / "Dockerfile").write_text(dockerfile(spec, folder))
    placeholders = [flag for flag, value in (("--storage-uri", options.storage_uri), ("--image", options.image))
                    if value in (PLACEHOLDER_URI, PLACEHOLDER_IMAGE)]
    note = f"; set {' and '.join(placeholders)} (placeholders now)" if placeholders else ""
    log(f"wrote {folder}/ ({ISVC_FILE}: InferenceService {isvc['metadata']['name']} on {RUNTIME}{note})")
    return folder


def to_yaml(yaml, data: dict) -> str:
    """YAML with multi-line strings (the start-up script) as literal blocks, readable in the manifest."""
    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value: str):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, width=120)


_RELEASES = f"{versions.minimum_release('tensorrt')}-{versions.LAST_CUDA12_RELEASE}"


def dockerfile(spec: EncoderForm, folder: Path) -> str:
    """The serving image: a Triton release from NGC plus what this repository's models need."""
    engine = spec.needs_engine
    base = versions.TRITON_IMAGE.format(release=versions.DEFAULT_TRITON_RELEASE)
    minimum = versions.minimum_release(spec.name)
    header = f"""\
# The serving image: a Triton release from NGC plus what this repository needs (KServe's stock runtime
# image has no pillow for the preprocess step). Build it from an mvt-deploy checkout:
#   docker build -f {folder}/Dockerfile -t <registry>/mvt-deploy-tritonserver:<yy.mm> .
# TRITON_IMAGE defaults to {base}{f"; {spec.name} needs {minimum} or later" if minimum else ""}
# (docs/serving.md: minimum Triton).
"""
    if engine:
        header += f"""\
# For another release pass --build-arg TRITON_IMAGE=nvcr.io/nvidia/tritonserver:<yy.mm>-py3 and
# --build-arg TENSORRT_VERSION=<that release's TensorRT> (NGC's release notes list it): the plan the start-up
# step builds with these bindings is loaded by Triton's TensorRT backend, and a plan runs only on the TensorRT
# release that built it. The build checks it against the image's libnvinfer, and that the image is CUDA
# {versions.TENSORRT_CUDA_MAJOR} with a TensorRT within {versions.tensorrt_requirement()} (pyproject.toml's
# `tensorrt` extra): releases {_RELEASES}.
# No triton or torch: where the export chose the RoPE plugin (TensorRT 10.9-10.14), whose build compiles its
# kernel with them, the start-up step lowers the RoPE to standard ONNX ops instead (export/rebuild.py).
"""
    body = f"""\
ARG TRITON_IMAGE={base}
FROM ${{TRITON_IMAGE}}
# the python backend's preprocess step (numpy < 2: numpy 2 corrupts its tensors, docs/serving.md)
RUN python3 -m pip install --no-cache-dir pillow "numpy<2"
"""
    if spec.model_py:  # onnxruntime inside the python backend
        body += 'RUN python3 -m pip install --no-cache-dir onnxruntime\n'
    if engine:
        body += f"""\
# the TensorRT inside {base}
ARG TENSORRT_VERSION={versions.DEFAULT_TENSORRT_VERSION}
COPY export /opt/mvt-deploy/export
COPY mvt_kernels /opt/mvt-deploy/mvt_kernels
COPY triton_repo /opt/mvt-deploy/triton_repo
COPY parity_tests /opt/mvt-deploy/parity_tests
COPY pyproject.toml README.md /opt/mvt-deploy/
# First the image's CUDA and TensorRT against pyproject.toml's tensorrt extra (triton_repo/versions.py); --no-deps:
# the start-up step needs neither torch nor transformers (it reads the manifest, not the checkpoint).
RUN PYTHONPATH=/opt/mvt-deploy python3 -m triton_repo.versions --check-image \\
 && python3 -m pip install --no-cache-dir --no-deps /opt/mvt-deploy \\
 && python3 -m pip install --no-cache-dir onnx "{versions.POLYGRAPHY_REQUIREMENT}" \\
    "{versions.TENSORRT_PACKAGE}==${{TENSORRT_VERSION}}"
"""
    return header + body


ENGINE_IMAGE_NEEDS = ("; mvt-deploy without its dependencies, onnx, polygraphy and the Python bindings of the "
                      "image's own TensorRT for the start-up step below")


def kserve_readme(isvc: dict, repo: Path, folder: Path, spec: EncoderForm, encoder: str, max_batch: int,
                  plan_in_pod: str | None = None) -> str:
    name = isvc["metadata"]["name"]
    minimum = versions.minimum_release(spec.name)
    release_line = f"The release must be {minimum} or later:" if minimum else "Any recent release serves it."
    image_range = "" if not spec.needs_engine else (
        f"\n- CUDA {versions.TENSORRT_CUDA_MAJOR} with a TensorRT within {versions.tensorrt_requirement()} "
        f"(pyproject.toml's `tensorrt` extra), as the Dockerfile checks: releases {_RELEASES}.")
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    uri = model["storageUri"]
    engine = ""
    if spec.needs_engine:
        built_here = "" if not plan_in_pod else f"""
The repository holds no plan of its own ({plan_in_pod}), as for any export made on a CPU
machine (`--runtime none`): `{encoder}/1/` is empty (an object store may drop it altogether; the step
creates it) and every pod builds the plan before Triton starts, so the repository does not load in a
plain `tritonserver` before that step has run.
"""
        engine = f"""
## The engine is rebuilt for the node's GPU

A TensorRT plan runs only on the GPU architecture and TensorRT release that built it. The repository
carries the export folder as `{encoder}/{ARTIFACTS_DIR}/` (Triton ignores a non-numeric folder in a model),
and the serving container starts with

```sh
{start_script(encoder, spec.engine_runtimes[0], max_batch)}
```
{built_here}
`--max-batch {max_batch}` is `{encoder}`'s `max_batch_size`: the plan's optimization profile is built for
exactly that batch (regenerate with `--max-batch N` to change both).

`export.build_engine --artifacts` checks every file against the manifest's sha256 (a changed folder is
refused and the pod fails to start, rather than serve something else), keeps the plan when the manifest
says it was built by this TensorRT for this GPU, and otherwise builds it for the node's GPU with the
image's TensorRT. So one repository serves every GPU type: a pod on an L4 builds for 8.9, one on an H100
for 9.0. Each pod starts from the storage copy, so every pod on a GPU other than the recorded one builds
(seconds for small models, minutes for bigG; readiness on `{READY_PATH}` turns true only once Triton has
loaded the plan, and Knative's `serving.knative.dev/progress-deadline`, 10 min by default, may need
raising). To skip that, run the same command once on a node of the serving type and upload the folder
again: its manifest then records that GPU and the pods keep the plan.
KServe's storage initializer and the runtime both run as uid 1000, and the annotation
`{READONLY_ANNOTATION}: "false"` makes `{MOUNT}` writable, so the step can replace `{PLAN_NAME}`.
To pin a GPU type, add a `nodeSelector` (e.g. `nvidia.com/gpu.product`) under `spec.predictor`.

The image has no triton or torch (see its Dockerfile). Where the export's engine graph uses the RoPE AOT
plugin (an export on TensorRT 10.9-10.14 with them installed), whose build compiles its kernel with them, the
step lowers the RoPE again to what this TensorRT builds with nothing more: RotaryEmbedding on 10.15 or later,
standard elementwise ops before. It keeps that graph as `engine-<rope>-<attention>.onnx` beside the export's
(recorded with its sha256) and the manifest's engine entry says which lowerings the plan was built from
(`rope_lowering`, `attention_lowering`, `rope_lowering_note`).
"""
    return f"""# KServe: InferenceService `{name}`

Generated by `python -m triton_repo.build ... --kserve` for the Triton repository `{repo}`
(encoder form `{spec.name}`). `{ISVC_FILE}` is a `{API_VERSION}` InferenceService on KServe's Triton
runtime (`{RUNTIME}`, model format `{MODEL_FORMAT}`): KServe's storage initializer copies `storageUri`
(the repository's root) to `{MOUNT}`, Triton's model store.

## From the repository to a running InferenceService

```sh
aws s3 sync {repo} {uri}          # 1. upload the repository (gsutil -m rsync -r for gs://)
kubectl apply -f {folder}/{ISVC_FILE}    # 2. create the InferenceService
kubectl wait --for=condition=Ready inferenceservice/{name} --timeout=30m   # 3. wait until it serves
```

`storageUri` is `{uri}`{" (a placeholder: regenerate with --storage-uri)" if uri == PLACEHOLDER_URI else ""}; KServe
needs the bucket's credentials as a ServiceAccount with a secret (KServe's storage docs).
Then call the ensemble over KServe's V2 protocol (Triton's HTTP API):
`kubectl get inferenceservice {name}` shows the URL; `tritonclient.http` works against it as in the
repository's README (host `<url host>:80`, plus the `Host` header your ingress needs).

Replicas {predictor["minReplicas"]} to {predictor["maxReplicas"]}, scaled on `{predictor["scaleMetric"]}` with target
{predictor["scaleTarget"]} per replica (`concurrency` and `rps` need KServe's Serverless mode; RawDeployment's HPA
takes `cpu` or `memory`: `--scale-metric cpu --scale-target 80`). Requests per replica:
{", ".join(f"{k} {v}" for k, v in model["resources"]["requests"].items())} (memory from the model's size).

## The image

`{model["image"]}`{" (a placeholder: regenerate with --image)" if model["image"] == PLACEHOLDER_IMAGE else ""}:
a Triton release from NGC plus what this repository needs (pillow and numpy<2 for the python preprocess
step{", onnxruntime for the encoder" if spec.model_py else ""}{ENGINE_IMAGE_NEEDS if spec.needs_engine else ""}).
Build it once per Triton release with `{folder}/Dockerfile` (its header says how) and push it where the
cluster pulls from. {release_line}
{versions.needs_text(spec.name)}{image_range}

KServe's own Triton runtime image (`tritonserver:23.05-py3` in its `kserve-tritonserver` ServingRuntime) is
older and lacks these steps' packages, which is why the InferenceService names this image.
{engine}"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("KServe (--kserve)")
    g.add_argument("--kserve", action="store_true",
                   help="also write kserve/ beside the repository: a KServe InferenceService on its Triton runtime "
                        "(tensorrt: the plan is built for the node's GPU when the pod starts; the export needs "
                        "none)")
    g.add_argument("--storage-uri", default=PLACEHOLDER_URI, metavar="URI",
                   help=f"where the repository will be uploaded (s3://, gs://, pvc://, ...) (default: the "
                        f"placeholder {PLACEHOLDER_URI})")
    g.add_argument("--image", default=PLACEHOLDER_IMAGE, metavar="IMAGE",
                   help="serving image, built from the kserve/Dockerfile this writes (default: the placeholder "
                        f"{PLACEHOLDER_IMAGE})")
    g.add_argument("--min-replicas", type=int, default=KServeOptions.min_replicas, metavar="N",
                   help=f"default: {KServeOptions.min_replicas} (0 scales to zero; a cold start loads the model)")
    g.add_argument("--max-replicas", type=int, default=KServeOptions.max_replicas, metavar="N",
                   help=f"default: {KServeOptions.max_replicas}")
    g.add_argument("--scale-metric", choices=SCALE_METRICS, default=KServeOptions.scale_metric,
                   help=f"autoscaling metric (default: {KServeOptions.scale_metric})")
    g.add_argument("--scale-target", type=int, metavar="N",
                   help="autoscaling target per replica (default: the max batch)")
    g.add_argument("--gpus", type=int, metavar="N", help="GPUs per replica (default: 1 for tensorrt, else 0)")


def options_from_args(args: argparse.Namespace) -> KServeOptions | None:
    if not args.kserve:
        return None
    return KServeOptions(storage_uri=args.storage_uri, image=args.image, min_replicas=args.min_replicas,
                         max_replicas=args.max_replicas, scale_metric=args.scale_metric,
                         scale_target=args.scale_target, gpus=args.gpus)
