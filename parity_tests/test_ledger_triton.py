"""The ledger's Triton stage against a real tritonserver (python backend, CPU) serving a tiny export.

Needs the server environment (scripts/setup_server_env.sh) and tritonclient; skips with the reason
otherwise (fails instead under MVT_REQUIRE_TRITON_SERVER=1: triton_repo.testing.skip_unless_required).
"""

from __future__ import annotations

import json

import pytest

from triton_repo.testing import import_or_skip

pytestmark = pytest.mark.triton_server
import_or_skip("tritonclient.http")


@pytest.fixture(scope="module")
def served_folder(tmp_path_factory):
    from triton_repo.build import RepoOptions, build_repository
    from triton_repo.server import TritonServer, free_port
    from triton_repo.testing import tiny_artifacts, tritonserver_or_skip

    install = tritonserver_or_skip()
    root = tmp_path_factory.mktemp("ledger-triton")
    artifacts = tiny_artifacts(root, max_batch=4)
    repo = build_repository(RepoOptions(artifacts, root / "repo", backend="python", max_batch=4,
                                        intra_op_threads=1), log=lambda _: None).out
    server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          install=install, ready_timeout_s=90)
    with server:
        yield artifacts, server.http_url


def test_ledger_measures_the_served_model(served_folder, tmp_path):
    from parity_tests.ledger import main

    artifacts, url = served_folder
    code = main(["--artifacts", str(artifacts), "--stages", "deployed", "triton", "--url", url,
                 "--out", str(tmp_path), "--photos", "14", "--no-plots"])
    data = json.loads((tmp_path / "parity.json").read_text())
    triton = next(s for s in data["stages"] if s["name"] == "triton")
    assert triton["skip_reason"] is None and not any("could not run" in n for n in triton["notes"]), triton
    rows = {r["output"]: r for r in data["measured"] if r["stage"] == "triton"}
    assert {"pooler_output", "last_hidden_state"} <= set(rows)
    assert rows["pooler_output"]["min_cosine"] > 0.9999 and rows["pooler_output"]["nn_top1"] == 1.0
    assert {r["name"] for r in data["invariants"]["results"]["triton"]} == {"identical rows", "batch size", "slot"}
    assert code == 0, [c for c in data["checks"] if not c["passed"]]
