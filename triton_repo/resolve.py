"""What the generator decides from the options and the export folder, before it writes anything: which
encoder form serves it (or why none can), the max batch, the encoder's tensors, the output --normalize takes."""

from __future__ import annotations

from export.core.errors import OptionError
from export.core.folder import MANIFEST_NAME, PLAN_NAME
from export.engine.profiles import profile_max_batch
from triton_repo.export_folder import Artifacts
from triton_repo.forms import BACKENDS, FORMS, EncoderForm, form
from triton_repo.interface import EncoderInterface, TensorSpec


def refusal(spec: EncoderForm, art: Artifacts, *, built_in_pod: bool = False) -> str | None:
    """Why the `spec` form cannot serve these artifacts (the error message), or None when it can.

    built_in_pod (--kserve): an engine form's plan is built by the pod's start-up step from model.onnx and
    the manifest (export/rebuild.py), so the export needs no plan, only what that step reads."""
    others = "|".join(n for n in BACKENDS if n != spec.name)
    if spec.needs_engine and built_in_pod:
        return _pod_build_refusal(art, others)
    if spec.needs_engine:
        # Manifests older than TensorRT-RTX support name no runtime: theirs was datacenter TensorRT (the fallback).
        runtime = art.engine.runtime
        missing = (f"--backend {spec.name} needs {art.folder}/{PLAN_NAME} and its optimization profile in the "
                   f"manifest ({art.engine.reason or 'no engine was built'}); build the engine on a GPU "
                   f"machine, or use --backend {others}")
        if art.plan is None:
            return missing
        if runtime not in spec.engine_runtimes:
            return (f"{art.folder}/{PLAN_NAME} was built with {runtime}, which {spec.serves_with} cannot load; "
                    f"rebuild with `--runtime {spec.engine_runtimes[0]}` on a GPU machine, or use --backend {others}")
        if art.engine_max_batch is None:
            return missing
    if spec.needs_portable_graph:
        custom = art.nodes_without_body()
        if custom:  # one text for every such form, so that the default's error lists it once
            runs_onnx = "|".join(n for n, f in FORMS.items() if f.needs_portable_graph)
            engines = "|".join(n for n, f in FORMS.items() if f.needs_engine)
            return (f"{art.onnx} holds {', '.join(custom)} nodes without a function body (the TensorRT plugin "
                    "lowering, written by an older mvt-deploy or by hand), which onnxruntime cannot run: "
                    f"--backend {runs_onnx} would fail to load it; re-export the model with this version of "
                    "`python -m export.build_engine` (same options: model.onnx is then portable and the engine's "
                    f"lowering goes to engine.onnx), or serve the engine with --backend {engines}")
    return None


def _pod_build_refusal(art: Artifacts, others: str) -> str | None:
    """Why the KServe start-up step (export.rebuild.rebuild_engine) would refuse to build a plan from `art`."""
    from export.precision.recipe import cpu_quantized

    if not art.manifest.artifacts:
        return (f"--kserve builds the plan in the pod from the files {art.folder}/{MANIFEST_NAME} records, and "
                "it records none; re-export the folder with this version of `python -m export.build_engine`")
    precision = art.manifest.precision
    # rebuild_engine refuses this graph too (export/rebuild.py): it is shaped for onnxruntime on CPUs
    if cpu_quantized(precision, art.manifest.quant_target):
        return (f"{art.folder} holds a --quant-target cpu {precision} graph for onnxruntime on CPUs, which the pod's "
                f"start-up step cannot build into a TensorRT plan; re-export with --quant-target tensorrt, or use "
                f"--backend {others}")
    return None


def resolve_form(backend: str | None, art: Artifacts, *, built_in_pod: bool = False) -> EncoderForm:
    """The requested form if it can serve the artifacts; None: the first form (registry order) that can.

    built_in_pod (--kserve) applies to a requested form only: the default stays the first form that can
    serve the export as it is."""
    if backend is not None:
        spec = form(backend)
        problem = refusal(spec, art, built_in_pod=built_in_pod)
        if problem:
            raise OptionError(problem)
        return spec
    problems: dict[str, list[str]] = {}  # reason -> the forms it stops
    for spec in FORMS.values():
        problem = refusal(spec, art)
        if problem is None:
            return spec
        problems.setdefault(problem, []).append(spec.name)
    raise OptionError(f"no --backend can serve {art.folder}:\n"
                      + "\n".join(f"  {'|'.join(names)}: {p}" for p, names in problems.items()))


def resolve_max_batch(requested: int | None, spec: EncoderForm, art: Artifacts, *, built_in_pod: bool = False) -> int:
    """built_in_pod (--kserve): for an engine form, the max batch of the plan the start-up step builds with
    `--max-batch <this>` (kserve.start_script), so a larger --max-batch than the export's is passed through."""
    manifest_max = art.manifest.max_batch
    if requested is not None and requested < 1:
        raise OptionError(f"--max-batch {requested} must be at least 1")
    if not spec.needs_engine:
        return requested or manifest_max
    if built_in_pod:
        from export.rebuild import engine_shapes

        # default: a recorded plan Triton loads (the pod keeps it on the GPU that built it), else the export's
        wanted = requested or (art.engine_max_batch if refusal(spec, art) is None else None) or manifest_max
        served = profile_max_batch(engine_shapes(art.manifest, wanted))  # the profile export/rebuild.py builds
        assert served is not None  # engine_shapes always bounds the batch
        if requested is not None and served != requested:
            raise OptionError(f"--max-batch {requested}: the plan the pod builds from {art.folder} takes at most "
                              f"{served} images per batch in one of its optimization profiles; use --max-batch "
                              f"{served}")
        return served
    engine_max = art.engine_max_batch
    assert engine_max is not None  # refusal() turns away an engine form without a profile
    if requested is not None and requested > engine_max:
        raise OptionError(
            f"--max-batch {requested} is larger than the engine's optimization profile allows ({engine_max}); "
            f"use --max-batch {engine_max} or rebuild with `python -m export.build_engine --max-batch {requested}`"
        )
    return requested or engine_max


def unserved_plan(spec: EncoderForm, art: Artifacts, max_batch: int) -> str | None:
    """--kserve: why the export holds no plan the engine form's start-up step would keep (then every pod
    builds one and <encoder>/1/ starts empty), or None when it holds one (it goes into <encoder>/1/)."""
    from export.rebuild import engine_shapes

    if not spec.needs_engine:
        return None
    if art.plan is None:
        return f"{art.folder} has no {PLAN_NAME}: {art.engine.reason or 'no engine was built'}"
    runtime = art.engine.runtime  # as in refusal()
    if runtime not in spec.engine_runtimes:
        return f"{art.folder}/{PLAN_NAME} was built with {runtime}, which {spec.serves_with} cannot load"
    if art.engine.profiles != engine_shapes(art.manifest, max_batch):  # rebuild's own test (_same_target)
        return f"the optimization profile of {art.folder}/{PLAN_NAME} is not the one for max batch {max_batch}"
    return None


def encoder_interface(art: Artifacts, spec: EncoderForm) -> EncoderInterface:
    """Triton dims (no batch axis) from the manifest; symbolic axes become -1."""
    dims = tuple(d if isinstance(d, int) else -1 for d in art.manifest.input_shape[1:])  # (3, H, W)
    crop = art.preprocessor.output_size
    if crop is None:
        raise OptionError("the preprocessor config has no fixed output size (no center crop); "
                          "serving needs one resolution per batch")
    if dims[1] != -1 and tuple(dims[1:]) != crop:
        raise OptionError(f"the engine input is {dims[1]}x{dims[2]} but preprocessing crops {crop[0]}x{crop[1]}; "
                          f"re-export with --image-size {crop[0]} {crop[1]} or fix preprocessor_config.json")
    sequence = -1
    if spec.needs_engine:  # engines have one resolution: give TensorRT the exact sequence length
        patch = art.manifest.patch_size
        sequence = (crop[0] // patch) * (crop[1] // patch) + art.manifest.prefix_tokens  # (class token +) patches
    outputs = tuple(
        TensorSpec(name, tuple(d if isinstance(d, int) else (sequence if d == "sequence" else -1)
                               for d in shape[1:]))
        for name, shape in art.manifest.output_shapes.items()
    )
    return EncoderInterface(TensorSpec(art.manifest.input_name, dims), outputs, crop)


def pooled_spec(art: Artifacts, iface: EncoderInterface) -> TensorSpec:
    """The encoder output --normalize applies to: the manifest's pooled output, one vector per image."""
    name = art.manifest.pooled_output
    spec = next((o for o in iface.outputs if o.name == name), None)
    if spec is None or len(spec.dims) != 1 or spec.dims[0] < 1:
        raise OptionError(f"--normalize: the artifacts have no pooled output {name!r} of one vector per image; "
                          "re-export them with this version of python -m export.build_engine")
    return spec
