"""Writes the crop repository: the ensemble `image` bytes -> preprocess (one center crop per image) -> encoder
(-> normalize), batched, with kserve/ beside it for --kserve."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Callable

from export.core.folder import PLAN_NAME, staged_output
from export.core.interface import IMAGE_INPUT
from export.core.preprocessing import pixel_values_from_bytes
from triton_repo import config as tc
from triton_repo.export_folder import profile_count, read_artifacts
from triton_repo.interface import Warmup
from triton_repo.kserve import write_kserve
from triton_repo.layout import (
    ENCODER,
    HERE,
    NORMALIZE,
    PREPROCESS,
    check_options,
    copy_file,
    place_encoder,
    place_python_model,
    read_back,
    sample_jpeg,
    write_file,
    write_repo_info,
)
from triton_repo.options import RepoOptions, RepoResult
from triton_repo.readme import repository_readme
from triton_repo.resolve import encoder_interface, pooled_spec, resolve_form, resolve_max_batch, unserved_plan

ENSEMBLE_NOTE = "README.txt"  # in the ensemble's otherwise empty version folder


def build_crop(opts: RepoOptions, log: Callable[[str], None]) -> RepoResult:
    """The crop ensemble `opts.name` = preprocess -> encoder (-> normalize)."""
    name = check_options(opts, "ensemble name")
    art = read_artifacts(opts.artifacts)
    # --kserve: an engine form's pod builds its plan at start-up, so the export need not hold one
    in_pod = opts.kserve is not None
    spec = resolve_form(opts.backend, art, built_in_pod=in_pod)
    max_batch = resolve_max_batch(opts.max_batch, spec, art, built_in_pod=in_pod)
    no_plan = unserved_plan(spec, art, max_batch) if in_pod else None
    iface = encoder_interface(art, spec)  # from the manifest: the same with or without a plan
    tc.model_config_pb2()  # fail before any work when the serve extra is missing
    if no_plan:
        log(f"{ENCODER} [{spec.name}]: {no_plan}; the KServe start-up step builds {PLAN_NAME} on each serving "
            f"node (--max-batch {max_batch}) and puts it in {ENCODER}/1/, which stays empty until then")

    jpeg = sample_jpeg()
    pixels = pixel_values_from_bytes(jpeg, art.preprocessor)  # (3, H, W)
    result = RepoResult(Path(opts.out), spec.name, max_batch)
    with staged_output(Path(opts.out), opts.force) as stage:
        # preprocess: model.py + preprocessing.py + the checkpoint's preprocessor config
        pre = stage / PREPROCESS
        place_python_model(pre, "preprocess.py", art)
        # Triton reads TYPE_STRING warm-up data as <uint32 little-endian length><bytes> per element.
        write_file(pre / "warmup" / "image", struct.pack("<I", len(jpeg)) + jpeg)
        pre_cfg = tc.preprocess_config(
            name=PREPROCESS, max_batch=max_batch, instances=opts.instances, pixel_values=iface.input,
            warmup=Warmup("sample_photo", 1, {IMAGE_INPUT: ("TYPE_STRING", (1,), "image")}),
            parameters={"max_pixels": opts.max_pixels})
        result.models[PREPROCESS] = tc.write_config(pre_cfg, pre)

        # the plan Triton loads: the recorded one, or (no_plan) the one the pod's start-up step builds
        shapes: dict | list[dict] | None
        if no_plan:
            from export.rebuild import engine_shapes

            shapes = engine_shapes(art.manifest, max_batch)
        else:
            shapes = art.engine.profiles
        result.models[ENCODER] = place_encoder(stage, spec, art, iface, opts, max_batch=max_batch, pixels=pixels,
                                               profiles=profile_count(shapes), plan_in_pod=bool(no_plan))

        normalize = None
        if opts.normalize:
            pooled = pooled_spec(art, iface)
            copy_file(HERE / "backend_models" / "normalize.py", stage / NORMALIZE / "1" / "model.py")
            norm_cfg = tc.normalize_config(name=NORMALIZE, max_batch=max_batch, instances=opts.instances,
                                           width=pooled.dims[-1])
            result.models[NORMALIZE] = tc.write_config(norm_cfg, stage / NORMALIZE)
            normalize = (NORMALIZE, pooled.name)

        # An ensemble still needs a version folder, and object stores (S3, GCS: KServe's storageUri) keep no
        # empty folders, so it holds a note (Triton reads nothing in an ensemble's version folder).
        (stage / name / "1").mkdir(parents=True)
        write_file(stage / name / "1" / ENSEMBLE_NOTE, b"Version folder of a Triton ensemble; this note keeps it when "
                                                       b"the repository is copied to object storage.\n")
        ens_cfg = tc.ensemble_config(name=name, max_batch=max_batch, preprocess=PREPROCESS, encoder=ENCODER,
                                     interface=iface, normalize=normalize)
        result.models[name] = tc.write_config(ens_cfg, stage / name)

        read_back(result)
        if opts.kserve:  # kserve/ beside the repository (engine forms: + encoder/artifacts/ in it)
            write_kserve(opts.kserve, stage=stage, out=Path(opts.out), ensemble=name, encoder=ENCODER, spec=spec,
                         art=art, max_batch=max_batch, force=opts.force, log=log, plan_in_pod=no_plan)
        (stage / "README.md").write_text(repository_readme(name, spec, iface, max_batch, art, Path(opts.out),
                                                           opts.normalize, plan_in_pod=no_plan, profiles=shapes,
                                                           instances=opts.instances))
        write_repo_info(stage, opts, art, ensemble=name, preprocess=PREPROCESS, backend=spec.name,
                        max_batch=max_batch, image_size=list(iface.image_size), outputs=list(iface.output_names),
                        pooled_output=art.manifest.pooled_output, normalized=opts.normalize)
    steps = f"{PREPROCESS} -> {ENCODER} [{spec.name}]" + (f" -> {NORMALIZE}" if opts.normalize else "")
    log(f"wrote {opts.out}/ ({name} = {steps}, max batch {max_batch})")
    return result
