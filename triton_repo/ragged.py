"""Writes the `--preprocess anyres|native` repository (modes.py has the modes and the wire format): the
`encoder` as in the crop ensemble, and the python model clients call (backend_models/ragged.py), which
preprocesses each image and calls the encoder through BLS."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from export.core import packing, preprocessing as pre
from export.core.folder import IMAGE_NEWLINE_NAME, staged_output
from triton_repo import config as tc
from triton_repo.export_folder import profile_count, read_artifacts
from triton_repo.layout import (
    ENCODER,
    check_options,
    copy_file,
    place_encoder,
    place_python_model,
    read_back,
    sample_jpeg,
    write_repo_info,
)
from triton_repo.modes import (
    ANYRES,
    COUNT_OUTPUT,
    ERROR_OUTPUT,
    GRID_OUTPUT,
    IMAGE_SIZES_OUTPUT,
    MODEL_PY,
    NATIVE,
    check_engine_profile,
    check_served_memory,
    encoder_interface,
    engine_profiles,
    plan,
    ragged_outputs,
)
from triton_repo.options import RepoOptions, RepoResult
from triton_repo.readme import ragged_readme
from triton_repo.resolve import resolve_form, resolve_max_batch
from triton_repo.vlm import packed_readme


def build_ragged(opts: RepoOptions, log: Callable[[str], None]) -> RepoResult:
    """The anyres / native repository: `encoder` (as in the crop ensemble) + the ragged model `opts.name`."""
    name = check_options(opts, "name")
    art = read_artifacts(opts.artifacts)
    rp = plan(opts, art)
    spec = resolve_form(opts.backend, art)
    max_batch = resolve_max_batch(opts.max_batch, spec, art)
    iface = encoder_interface(art, spec, rp)
    check_engine_profile(art, spec, rp, iface.input.name)
    if opts.kserve is None:  # a KServe pod's memory is its own, not this machine's
        check_served_memory(art, spec, rp, iface.input.name, max_batch, opts.instances)
    tc.model_config_pb2()  # fail before any work when the serve extra is missing

    jpeg = sample_jpeg()
    if rp.mode == ANYRES:
        tiles, _ = pre.anyres_pixel_values_from_bytes(jpeg, art.preprocessor, list(rp.pinpoints), rp.tile_size)
        pixels = tiles[0]  # (3, s, s): the whole image
    else:
        pixels = pre.native_pixel_values_from_bytes(jpeg, art.preprocessor, rp.factor, rp.min_pixels, rp.max_pixels)
    pooled = art.manifest.pooled_output
    served = tuple(o for o in iface.outputs if rp.mode == ANYRES or o.name != pooled)
    result = RepoResult(Path(opts.out), spec.name, max_batch)
    with staged_output(Path(opts.out), opts.force) as stage:
        result.models[ENCODER] = place_encoder(
            stage, spec, art, iface, opts, max_batch=max_batch, pixels=pixels,
            profiles=profile_count(art.engine.profiles),
            # two same-sized native images merged into a batch of 2 fit no native profile (one image each)
            dynamic_batching=not (spec.needs_engine and rp.mode == NATIVE))

        model = stage / name
        place_python_model(model, MODEL_PY, art)
        if rp.pack:  # the packing code and image_newline beside model.py
            copy_file(Path(packing.__file__).resolve(), model / "1" / "packing.py")
            if rp.newline:
                copy_file(art.folder / IMAGE_NEWLINE_NAME, model / "1" / IMAGE_NEWLINE_NAME)
        # No warm-up here: BLS cannot reach the encoder before every model has loaded.
        cfg = tc.ragged_config(name=name, instances=opts.instances, outputs=ragged_outputs(served, rp),
                               parameters={**rp.parameters(), "encoder": ENCODER, "encoder_input": iface.input.name,
                                           "encoder_max_batch": max_batch, "decode_max_pixels": opts.max_pixels,
                                           "outputs": ",".join(o.name for o in served)})
        result.models[name] = tc.write_config(cfg, model)

        read_back(result)
        readme = (packed_readme(name, spec, rp, served, max_batch, art, Path(opts.out)) if rp.pack
                  else ragged_readme(name, spec, rp, served, max_batch, art, Path(opts.out), opts.instances))
        (stage / "README.md").write_text(readme)
        write_repo_info(stage, opts, art, ensemble=name, preprocess=rp.mode, backend=spec.name, max_batch=max_batch,
                        image_size=[rp.tile_size, rp.tile_size],
                        outputs=[o.name for o in ragged_outputs(served, rp)] if rp.pack
                        else [o.name for o in served] + [COUNT_OUTPUT, GRID_OUTPUT, ERROR_OUTPUT],
                        pooled_output=pooled if rp.mode == ANYRES else None, normalized=False,
                        ragged={**rp.parameters(), "pinpoints": [list(p) for p in rp.pinpoints]},
                        # what a TensorRT engine for this mode needs (export.engine.build_engine takes the list as is)
                        engine_profiles=engine_profiles(rp, iface.input.name, max_batch),
                        # the language model's side of a --projector export (docs/vlm.md: how a VLM server reads it)
                        vlm={**art.manifest.vlm, "image_sizes_output": IMAGE_SIZES_OUTPUT} if rp.pack else None)
    log(f"wrote {opts.out}/ ({name} = {rp.mode} preprocessing -> BLS -> {ENCODER} [{spec.name}], "
        f"encoder max batch {max_batch})")
    return result
