"""benchmarks/gpu: a failing stage does not stop the others, and a stage's report keeps the rows it
finished. The whole script at tiny sizes: `benchmarks/gpu/run.sh OUT --dry-run` (about 1 min)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

GPU = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu")


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_every_stage_runs_and_is_listed_when_stages_fail(tmp_path):
    failing_python = tmp_path / "python"
    failing_python.write_text("#!/bin/sh\necho \"stage $2 failed\" >&2\nexit 3\n")
    failing_python.chmod(0o755)
    result = subprocess.run([os.path.join(GPU, "run.sh"), str(tmp_path / "out"), "--dry-run"], capture_output=True,
                            text=True, timeout=60, env=dict(os.environ, PYTHON=str(failing_python)))
    assert result.returncode == 0, result.stderr
    stages = json.loads((tmp_path / "out" / "stages.json").read_text())
    assert [s["stage"] for s in stages["stages"]] == ["selfcheck", "tests", "kernels", "steps"]
    assert {s["exit_status"] for s in stages["stages"]} == {3} and stages["dry_run"] is True
    assert "| steps | 3 |" in (tmp_path / "out" / "stages.md").read_text()


def test_report_keeps_finished_rows_and_errors(tmp_path):
    sys.path.insert(0, GPU)
    try:
        import report
        from stage_tests import finished_tests
    finally:
        sys.path.remove(GPU)
    out = report.Report(str(tmp_path), "demo", "Demo", dry_run=True)
    out.section("times", ["case", "ms"])
    out.add("times", {"case": "a|b", "ms": 1.23456})
    out.error("case c", RuntimeError("out of memory"))
    data = json.loads((tmp_path / "demo.json").read_text())
    assert data["sections"]["times"]["rows"] == [{"case": "a|b", "ms": 1.23456}]
    markdown = (tmp_path / "demo.md").read_text()
    assert "| a\\|b | 1.23 |" in markdown and "case c: RuntimeError: out of memory" in markdown
    lines = "tests/test_kernels.py::test_one PASSED [ 50%]\ntests/test_triton.py::test_two FAILED [100%]\nnoise"
    assert [(r["test"], r["outcome"]) for r in finished_tests(lines)] == [
        ("test_kernels.py::test_one", "passed"), ("test_triton.py::test_two", "failed")]
