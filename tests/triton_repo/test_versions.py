"""triton_repo/versions.py: the Triton releases and TensorRT the output needs, held to pyproject.toml, README.md and
the KServe Dockerfile that read them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from export.core.errors import OptionError
from triton_repo import kserve, versions
from triton_repo.forms import FORMS, form
from triton_repo.options import KServeOptions
from triton_repo.testing import pip_installs

ROOT = Path(__file__).parents[2]


def tensorrt_extra() -> dict[str, Requirement]:
    """pyproject.toml's `tensorrt` extra by name (tomllib is 3.11+; we support 3.10)."""
    block = re.search(r"^tensorrt\s*=\s*\[([^\]]*)\]", (ROOT / "pyproject.toml").read_text(), re.M)
    assert block, "pyproject.toml has no tensorrt extra"
    return {r.name: r for r in map(Requirement, re.findall(r'"([^"]+)"', block.group(1)))}


def test_dockerfile_installs_the_tensorrt_extra():
    """The image's bindings are the extra's package (the CUDA major with it), and the Dockerfile's version check is
    the extra's specifier: the plan the pod builds and the one an export builds come from the same TensorRT range."""
    extra = tensorrt_extra()
    assert set(extra) == {versions.TENSORRT_PACKAGE, "polygraphy"}
    assert extra[versions.TENSORRT_PACKAGE] == Requirement(versions.tensorrt_requirement())
    assert versions.TENSORRT_PACKAGE == f"tensorrt-cu{versions.TENSORRT_CUDA_MAJOR}"
    installed = pip_installs(kserve.dockerfile(form("tensorrt"), Path("deploy/kserve")))
    trt = [a for a in installed if a.startswith("tensorrt")]
    assert trt == [f"{versions.TENSORRT_PACKAGE}==${{TENSORRT_VERSION}}"]  # exactly the image's TensorRT
    assert extra["polygraphy"] == Requirement(versions.POLYGRAPHY_REQUIREMENT)
    assert versions.POLYGRAPHY_REQUIREMENT in installed
    default = re.search(r"^ARG TENSORRT_VERSION=(\S+)$", kserve.dockerfile(form("tensorrt"), Path(".")), re.M)[1]
    assert Version(default) in extra[versions.TENSORRT_PACKAGE].specifier
    spec = extra[versions.TENSORRT_PACKAGE].specifier
    cuda = f"{versions.TENSORRT_CUDA_MAJOR}.9.1.010"
    for v in ("10.0.1.6", "10.8.0.43", "10.9.0.34", "10.11.0.33", "10.13.3.9", "10.16.0.72", "11.0.0.1", "11.4.0.9"):
        assert (versions.image_problem(cuda, v, None) is None) == (Version(v) in spec), v
    assert "for CUDA 12" in versions.image_problem("13.0.2.006", default, None)  # 25.08 on: CUDA 13
    assert "sets no CUDA_VERSION" in versions.image_problem(None, default, None)
    for form_name, spec_ in FORMS.items():  # only the engine form installs TensorRT
        assert bool([a for a in pip_installs(kserve.dockerfile(spec_, Path("."))) if "tensorrt" in a]) \
            == spec_.needs_engine, form_name


def test_image_check_compares_the_images_own_tensorrt(tmp_path, monkeypatch, capsys):
    lib = tmp_path / "usr" / "lib" / "x86_64-linux-gnu" / "libnvinfer.so.10.11.0"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    (lib.parent / "libnvinfer.so.10").symlink_to(lib.name)  # the soname link is not a full version
    assert versions.libnvinfer_version((str(tmp_path / "usr"),)) == ("10.11.0", str(lib))
    assert versions.libnvinfer_version((str(tmp_path / "absent"),)) is None
    found = versions.libnvinfer_version((str(tmp_path),))
    assert versions.image_problem("12.9.1", "10.11.0.33", found) is None
    problem = versions.image_problem("12.9.1", "10.10.0.31", found)
    assert "is not the TensorRT of TRITON_IMAGE" in problem and "TENSORRT_VERSION=10.11.0.<build>" in problem
    # as the Dockerfile runs it: CUDA_VERSION from the NGC image, TENSORRT_VERSION from the build argument
    monkeypatch.setattr(versions, "LIBNVINFER_ROOTS", (str(tmp_path),))
    monkeypatch.setenv("CUDA_VERSION", "12.9.1.010")
    monkeypatch.setenv("TENSORRT_VERSION", "10.11.0.33")
    assert versions.main(["--check-image"]) == 0 and str(lib) in capsys.readouterr().out
    monkeypatch.setenv("TENSORRT_VERSION", "10.13.3.9")
    with pytest.raises(OptionError, match="a plan loads only in the TensorRT that built it"):
        versions.main(["--check-image"])
    monkeypatch.setenv("CUDA_VERSION", "13.0.2.006")
    with pytest.raises(OptionError, match="TRITON_IMAGE is CUDA 13.0.2.006"):
        versions.main(["--check-image"])


def test_image_check_stops_the_docker_build():
    """As the Dockerfile's RUN runs it, with the image's environment: a non-zero exit and one error line."""
    import subprocess
    import sys

    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "CUDA_VERSION": "12.9.1.010",
           "TENSORRT_VERSION": "10.8.0.43"}
    proc = subprocess.run([sys.executable, "-m", "triton_repo.versions", "--check-image"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: TENSORRT_VERSION 10.8.0.43 is outside")
    assert "Traceback" not in proc.stderr


def test_minimum_triton_is_one_table():
    """Each need's release, the minimum per form, and the KServe image's default base at or above it."""
    assert versions.minimum_release("python") == "24.06"  # response senders in the default mode
    assert versions.minimum_release("tensorrt") == "25.05"  # execution_context_allocation_strategy
    assert versions.minimum_release("onnxruntime") == ""
    assert versions.minimum_release() == max((n.release for n in versions.NEEDS), key=versions.release_key)
    for name, spec in FORMS.items():
        base = re.search(r"^ARG TRITON_IMAGE=(\S+)$", kserve.dockerfile(spec, Path(".")), re.M)[1]
        release = versions.image_release(base)
        assert base == versions.TRITON_IMAGE.format(release=versions.DEFAULT_TRITON_RELEASE)
        assert versions.release_key(release) >= versions.release_key(versions.minimum_release(name) or "0.0"), name
        if spec.needs_engine:  # and still CUDA 12, for the extra's bindings
            assert versions.release_key(release) <= versions.release_key(versions.LAST_CUDA12_RELEASE)
    assert versions.image_release("nvcr.io/nvidia/tritonserver:23.05-py3") == "23.05"
    assert versions.image_release("registry.example.com/mvt-deploy-tritonserver:25.07") is None


def test_readme_states_the_minimum_triton():
    readme = (ROOT / "README.md").read_text()
    minimum = versions.minimum_release()
    line = next(line for line in readme.splitlines() if "Minimum Triton" in line)
    assert f"{minimum}" in line
    for need in versions.NEEDS:
        assert need.release in readme, need.what
    serving = (ROOT / "docs" / "serving.md").read_text()
    for need in versions.NEEDS:
        assert need.release in serving and need.older.split(":")[0] in serving, need.what


@pytest.mark.parametrize("image, older", [("nvcr.io/nvidia/tritonserver:23.05-py3", True),  # KServe's runtime's
                                          ("nvcr.io/nvidia/tritonserver:25.07-py3", False)])
def test_stock_triton_image_is_refused(image, older):
    with pytest.raises(OptionError, match="is a stock Triton image") as err:
        kserve.check_options(KServeOptions(storage_uri="s3://b/r", image=image), "tensorrt")
    assert ("older than the 25.05 this output needs" in str(err.value)) == older
    kserve.check_options(KServeOptions(storage_uri="s3://b/r", image="reg.example/mvt-triton:25.07"), "tensorrt")
