"""The test command's parallel layout (pyproject: -n auto --dist loadgroup, conftest.py's groups) does what it says.

Two silent breaks seen: conftest's marks added after pytest-xdist had read them, and pytest 9.2 with pytest-xdist
3.8 (xdist renames Item._nodeid, which pytest 9.2 no longer reads). Either way every test ran anywhere and each
worker built the module fixtures (exports, served repositories) again: the same tests, minutes slower.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHARED = '''
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def export():
    with open(Path(__file__).with_name("setups.log"), "a") as log:
        log.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")


@pytest.mark.parametrize("i", range(6))
def test_shared(export, i):
    pass
'''

INDEPENDENT = '''
import os
import time
from pathlib import Path

import pytest


@pytest.mark.parametrize("i", range(6))
def test_alone(i):
    time.sleep(0.3)  # long enough that both workers take some
    with open(Path(__file__).with_name("workers.log"), "a") as log:
        log.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")
'''


def test_a_module_fixture_is_built_once_and_independent_tests_spread(tmp_path):
    (tmp_path / "conftest.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('project_conftest', {str(ROOT / 'conftest.py')!r})\n"
        "project = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(project)\n"
        "pytest_collection_modifyitems = project.pytest_collection_modifyitems\n")
    (tmp_path / "test_shared.py").write_text(SHARED)
    (tmp_path / "test_independent.py").write_text(INDEPENDENT)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
                          "--dist", "loadgroup", "-o", "addopts=", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    setups = (tmp_path / "setups.log").read_text().split()
    assert len(setups) == 1, f"the module fixture was built {len(setups)} times (workers {setups}): no grouping"
    assert set((tmp_path / "workers.log").read_text().split()) == {"gw0", "gw1"}
