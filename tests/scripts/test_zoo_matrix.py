"""scripts/zoo_matrix.py's bookkeeping (the builds themselves are hours at full size: not in the tests):
the report is written after every cell and --append merges into the last one."""

from __future__ import annotations

import json

import pytest

from export.models.testing import load_script


def _script():
    return load_script("zoo_matrix")


def _cell(model: str, precision: str, rss: float) -> dict:
    return {"model": model, "precision": precision, "exit": 0, "seconds": 1.0, "peak_rss_gib": rss, "log": "-",
            "parity_passed": True, "steps_s": {}, "parity_worst": {}, "artifact_bytes": {}}


def test_report_after_every_cell_and_append(monkeypatch, tmp_path):
    zm = _script()
    rss = {"fp32": 4.0, "fp16": 4.5, "int8": 6.0}  # int8: 1.5x fp32, over the 1.25 bound

    def run_cell(model, precision, args):
        if precision == "fp8":
            raise KeyboardInterrupt  # stopped during the last cell
        return _cell(model, precision, rss[precision])

    monkeypatch.setattr(zm, "run_cell", run_cell)
    monkeypatch.setattr(zm, "fp32_weight_bytes", lambda model: 2 * 1024**3)
    report = tmp_path / "zoo"
    common = ["--work", str(tmp_path / "work"), "--report", str(report)]
    with pytest.raises(KeyboardInterrupt):
        zm.main(["--models", "mlcd-b-32", "--precisions", "fp32", "fp16", "fp8", *common])
    cells = json.loads(report.with_suffix(".json").read_text())["cells"]
    assert [(c["precision"], c["within_bounds"]) for c in cells] == [("fp32", True), ("fp16", True)]

    md = report.with_suffix(".md")
    md.write_text(md.read_text() + "\n## Notes\n\n- measured beside the test suite\n")  # written by hand
    assert zm.main(["--models", "unicom-b-32", "mlcd-b-32", "--precisions", "int8", "--append", *common]) == 1
    assert md.read_text().endswith("\n## Notes\n\n- measured beside the test suite\n")  # kept
    cells = json.loads(report.with_suffix(".json").read_text())["cells"]
    assert [(c["model"], c["precision"]) for c in cells] == [
        ("mlcd-b-32", "fp32"), ("mlcd-b-32", "fp16"), ("mlcd-b-32", "int8"), ("unicom-b-32", "int8")]
    judged = {(c["model"], c["precision"]): c for c in cells}
    assert judged[("mlcd-b-32", "int8")]["rss_over_fp32"] == 1.5 and not judged[("mlcd-b-32", "int8")]["within_bounds"]
    assert judged[("unicom-b-32", "int8")]["rss_over_fp32"] is None  # no fp32 row of its own yet
    assert "| unicom-b-32 | int8 |" in report.with_suffix(".md").read_text()
