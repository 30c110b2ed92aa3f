"""The Triton releases and the TensorRT this project's output needs: the one place these versions are written.

The generated READMEs (triton_repo/readme.py, kserve.py) and the KServe Dockerfile read them from here;
tests/triton_repo/test_versions.py holds README.md and pyproject.toml's `tensorrt` extra to them.

Triton releases are NGC container tags (`nvcr.io/nvidia/tritonserver:<yy.mm>-py3`), compared as (yy, mm).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from export.core.errors import OptionError  # stdlib only below it, like export.core.cli


@dataclass(frozen=True)
class Need:
    """One thing the output needs from the Triton container, from the first release that has it."""

    release: str  # yy.mm
    what: str
    forms: tuple[str, ...]  # the encoder forms (triton_repo/forms.py) that need it
    older: str  # what happens on an older release
    source: str  # where the release comes from


NEEDS: tuple[Need, ...] = (
    Need("24.06", "the python encoder answers each request through its response sender in the default "
         "(non-decoupled) mode", ("python",),
         "its requests fail: older python backends allow response senders in decoupled models only",
         "python_backend README.md at r24.06: 'Starting from 24.06, models may choose to send the response using "
         "the InferenceResponseSender' (PRs #360, #364; absent at r24.05)"),
    Need("25.03", "TensorRT 10.9 or later, the `tensorrt` extra's range (strongly typed networks, and the RoPE "
         "plugin's ahead-of-time kernels from 10.9)", ("tensorrt",),
         "the plan is built by a TensorRT outside the tested range (the KServe Dockerfile refuses it)",
         "Triton's docs/introduction/compatibility.md: TensorRT 10.9.0.34 from the 25.03 release (its trtllm "
         "image; the KServe Dockerfile checks the -py3 image's own libnvinfer); TensorRT CHANGELOG 10.9: "
         "'Added support for Python AOT plugins'"),
    Need("25.05", "allocation on profile change (the TensorRT backend's `execution_context_allocation_strategy`)",
         ("tensorrt",),
         "the parameter is ignored: each execution context allocates for the largest profile (kSTATIC)",
         "tensorrt_backend src/model_state.cc ModelState::ParseParameters: reads the parameter at r25.05, empty "
         "at r25.04"),
)

# The TensorRT the engine is built with: pyproject.toml's `tensorrt` extra is "tensorrt-cu<CUDA>>=MIN,<BELOW" (a
# test holds the two together). A plan loads only in the Triton whose TensorRT built it, so the KServe image is a
# Triton release with a TensorRT in this range and this CUDA major (the Python bindings are per CUDA major).
TENSORRT_CUDA_MAJOR = 12
TENSORRT_PACKAGE = f"tensorrt-cu{TENSORRT_CUDA_MAJOR}"
TENSORRT_MIN = (10, 9)
TENSORRT_BELOW = (11,)
POLYGRAPHY_REQUIREMENT = "polygraphy>=0.53"  # the extra's other requirement: Polygraphy drives the build
# The last release on CUDA 12: 25.08 is CUDA 13.0.0 (Triton release notes 25.08: "based on CUDA 13.0.0.044";
# 25.06: "CUDA 12.9.1.010"; 25.07 is 2.59.1, a patch release of 25.06's 2.59.0, server build.py).
LAST_CUDA12_RELEASE = "25.07"

# The KServe Dockerfile's default base image and its TensorRT (build.py's DEFAULT_TRITON_VERSION_MAP at r25.07:
# release 2.59.1; TensorRT 10.11.0.33, as deployments of tritonserver:25.07-py3 report; the Dockerfile compares it
# with the image's libnvinfer and stops on a mismatch).
DEFAULT_TRITON_RELEASE = "25.07"
DEFAULT_TENSORRT_VERSION = "10.11.0.33"
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:{release}-py3"


def release_key(release: str) -> tuple[int, int]:
    """"25.05" -> (25, 5)."""
    yy, mm = release.split(".")
    return int(yy), int(mm)


def needs(form: str | None = None) -> tuple[Need, ...]:
    """What `form` needs (None: every form's)."""
    return tuple(n for n in NEEDS if form is None or form in n.forms)


def minimum_release(form: str | None = None) -> str:
    """The first Triton release with everything `form` needs (None: every form); "" when it needs nothing."""
    found = needs(form)
    return max((n.release for n in found), key=release_key) if found else ""


def tensorrt_requirement() -> str:
    """The `tensorrt` extra's requirement, as pyproject.toml spells it."""
    return f"{TENSORRT_PACKAGE}>={'.'.join(map(str, TENSORRT_MIN))},<{'.'.join(map(str, TENSORRT_BELOW))}"


def image_release(image: str) -> str | None:
    """The release of an NGC Triton image reference (nvcr.io/nvidia/tritonserver:25.05-py3 -> "25.05"); None for
    any other image (a registry of one's own: its base is the Dockerfile's business)."""
    m = re.fullmatch(r"(?:nvcr\.io/)?nvidia/tritonserver:(\d\d\.\d\d)(?:-.*)?", image)
    return m.group(1) if m else None


def needs_text(form: str | None = None) -> str:
    """One Markdown line per need of `form`: what, from which release, what an older one does."""
    return "\n".join(f"- {n.release}: {n.what}. Older releases: {n.older}." for n in needs(form))


# Where NGC images keep the TensorRT library Triton's backend links (libnvinfer.so.<major>.<minor>.<patch>).
LIBNVINFER_ROOTS = ("/usr/lib", "/usr/local", "/opt")


def libnvinfer_version(roots: tuple[str, ...] | None = None) -> tuple[str, str] | None:
    """(version, path) of the first libnvinfer.so.X.Y.Z under `roots` (None: LIBNVINFER_ROOTS; pip's tensorrt_libs
    ship only .so.X, so this is the image's own TensorRT); None without one."""
    from pathlib import Path

    for root in roots or LIBNVINFER_ROOTS:
        for path in sorted(Path(root).rglob("libnvinfer.so.*.*.*")) if Path(root).is_dir() else ():
            return path.name.removeprefix("libnvinfer.so."), str(path)
    return None


def image_problem(cuda_version: str | None, tensorrt_version: str | None,
                  libnvinfer: tuple[str, str] | None) -> str | None:
    """Why a Triton image with CUDA `cuda_version` (NGC's CUDA_VERSION) cannot serve plans built with
    TENSORRT_PACKAGE==`tensorrt_version`, given its own libnvinfer (libnvinfer_version); None: it can."""
    releases = f"{minimum_release('tensorrt')}-{LAST_CUDA12_RELEASE}"
    if not cuda_version or cuda_version.split(".")[0] != str(TENSORRT_CUDA_MAJOR):
        return (f"TRITON_IMAGE is CUDA {cuda_version or 'unknown (it sets no CUDA_VERSION)'}: mvt-deploy builds plans "
                f"with {tensorrt_requirement()} (pyproject.toml), for CUDA {TENSORRT_CUDA_MAJOR}; use a Triton "
                f"release from {releases}")
    parts = (tensorrt_version or "").split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts):
        return (f"TENSORRT_VERSION {tensorrt_version or '(empty)'} is not a version: pass --build-arg "
                "TENSORRT_VERSION=<the TensorRT of TRITON_IMAGE> (NGC's release notes list it)")
    version = tuple(int(p) for p in parts)
    if not TENSORRT_MIN <= version[:2] or version[:len(TENSORRT_BELOW)] >= TENSORRT_BELOW:
        return (f"TENSORRT_VERSION {tensorrt_version} is outside {tensorrt_requirement()} (pyproject.toml): use a "
                f"Triton release from {releases}")
    if libnvinfer is not None:
        have, path = libnvinfer
        if not (tensorrt_version == have or str(tensorrt_version).startswith(have + ".")):
            return (f"TENSORRT_VERSION {tensorrt_version} is not the TensorRT of TRITON_IMAGE ({path}): a plan loads "
                    f"only in the TensorRT that built it; pass --build-arg TENSORRT_VERSION={have}.<build>")
    return None


def main(argv: list[str] | None = None) -> int:
    """`python3 -m triton_repo.versions --check-image`: the KServe Dockerfile's check, in the image being built
    (CUDA_VERSION from the NGC image, TENSORRT_VERSION from the build argument); raises OptionError with the
    reason (run_cli: `error: ...`, exit 2, and the docker build stops)."""
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="python -m triton_repo.versions", description=main.__doc__)
    parser.add_argument("--check-image", action="store_true", required=True)
    parser.parse_args(argv)
    lib = libnvinfer_version()
    problem = image_problem(os.environ.get("CUDA_VERSION"), os.environ.get("TENSORRT_VERSION"), lib)
    if problem:
        raise OptionError(problem)
    where = f"the image's {lib[1]}" if lib else "no libnvinfer.so.X.Y.Z found in the image: trusted as given"
    print(f"TensorRT {os.environ['TENSORRT_VERSION']} for CUDA {os.environ['CUDA_VERSION']} ({where})")
    return 0


if __name__ == "__main__":
    from export.core.cli import run_cli  # stdlib only: it runs in the image before anything is installed

    run_cli(main)
