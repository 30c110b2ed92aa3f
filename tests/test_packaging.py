"""Packaging: our top-level import names are ours alone, and the locks are what set-up installs.

transformers 5.25 imports Hugging Face's `kernels` whenever a model module loads; our package was called
`kernels` too and came first on sys.path, so every fresh install broke. The check below turns the next such
collision into a test failure instead of a user's ImportError.
"""

from __future__ import annotations

import importlib.metadata as md
import re
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"mvt-deploy", "mvt_deploy"}


def our_top_level_packages() -> list[str]:
    """The import names this distribution ships (pyproject's package patterns), each checked to exist here."""
    # [tool.setuptools.packages.find] include = ["export*", ...] (tomllib is 3.11+; we support 3.10)
    block = re.search(r"^\[tool\.setuptools\.packages\.find\]\s*include\s*=\s*\[([^\]]*)\]",
                      (ROOT / "pyproject.toml").read_text(), re.M)
    assert block, "pyproject.toml has no [tool.setuptools.packages.find] include list"
    names = sorted({p.rstrip("*") for p in re.findall(r'"([^"]+)"', block.group(1))})
    for name in names:
        assert (ROOT / name / "__init__.py").is_file(), f"pyproject ships {name!r} but {name}/ is not a package"
    return names


def shadowed(names: list[str], distributions: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """{import name: other distributions that ship it} for each of `names` another distribution also ships."""
    return {n: sorted(set(distributions[n]) - OURS) for n in names if set(distributions.get(n, ())) - OURS}


def test_no_top_level_package_is_shipped_by_another_distribution():
    clashes = shadowed(our_top_level_packages(), md.packages_distributions())
    assert not clashes, (f"top-level packages also shipped by other installed distributions: {clashes}; rename ours "
                         "(one of them shadows the other, whichever comes first on sys.path)")


def test_the_check_catches_a_clash():
    # The old name: Hugging Face's `kernels` distribution ships a top-level `kernels` package.
    dists = {"kernels": ["kernels"], "export": ["mvt-deploy"], "mvt_kernels": ["mvt-deploy"]}
    assert shadowed(["kernels", "export", "mvt_kernels"], dists) == {"kernels": ["kernels"]}
    assert shadowed(["export"], dists) == {}


def test_transformers_imports_its_kernels_integration():
    """The failure users met: loading a model module imported our package in place of Hugging Face's."""
    pytest.importorskip("transformers")
    from transformers.models.mlcd import modeling_mlcd  # imports transformers.integrations.hub_kernels

    assert modeling_mlcd.MLCDVisionModel.__name__ == "MLCDVisionModel"


LOCK_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", re.M)


def _name(name: str) -> str:
    """A distribution name in its normal form (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked(path: Path) -> dict[str, str]:
    return {_name(n): v for n, v in LOCK_LINE.findall(path.read_text())}


def test_every_lock_entry_carries_hashes():
    for lock in ("dev.txt", "server.txt"):
        text = (ROOT / "locks" / lock).read_text()
        entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 1)[1])
        for entry in entries:
            if LOCK_LINE.match(entry):
                assert "--hash=sha256:" in entry, f"locks/{lock}: {entry.splitlines()[0]} has no hash"


def test_the_environment_is_the_lock():
    """.venv holds exactly the locked versions (scripts/setup.sh syncs it), torch aside (TORCH_SPEC may replace it)."""
    locked = _locked(ROOT / "locks" / "dev.txt")
    assert len(locked) > 50, "locks/dev.txt lists almost nothing"
    installed = {_name(d.metadata["Name"]): d.version for d in md.distributions()}
    if any(installed.get(n) != locked[n] for n in ("transformers", "onnxruntime", "numpy")):
        pytest.skip("this environment was not installed from locks/dev.txt (scripts/setup.sh does that)")
    differ = {n: (v, installed.get(n)) for n, v in locked.items() if n != "torch" and installed.get(n) != v}
    assert not differ, f"{{name: (locked, installed)}}: {differ}"


def test_server_lock_keeps_numpy_below_2_and_onnxruntime_of_the_dev_lock():
    dev, server = _locked(ROOT / "locks" / "dev.txt"), _locked(ROOT / "locks" / "server.txt")
    assert int(server["numpy"].split(".")[0]) < 2
    assert server["onnxruntime"] == dev["onnxruntime"]
    assert "nvidia-pytriton" in server and "tritonclient" not in server  # installed without its dependencies
