"""The Python API under `python -m triton_repo.build`: build_repository(RepoOptions(...)) writes the crop
ensemble (crop.py) or a ragged mode's repository (ragged.py)."""

from __future__ import annotations

from typing import Callable

from export.core.errors import OptionError
from triton_repo.crop import build_crop
from triton_repo.export_folder import read_artifacts
from triton_repo.modes import CROP, check_projector_mode
from triton_repo.options import RepoOptions, RepoResult
from triton_repo.ragged import build_ragged


def build_repository(opts: RepoOptions, log: Callable[[str], None] = print) -> RepoResult:
    """Export artifacts (opts.artifacts) -> a Triton model repository (opts.out), published whole or not at all."""
    if opts.kserve and opts.preprocess != CROP:
        raise OptionError(f"--kserve writes an InferenceService for the crop ensemble; drop --preprocess "
                          f"{opts.preprocess}")
    if opts.preprocess != CROP:  # anyres | native: ragged answers, not an ensemble
        return build_ragged(opts, log)
    check_projector_mode(opts, read_artifacts(opts.artifacts))  # the crop ensemble serves towers
    return build_crop(opts, log)
