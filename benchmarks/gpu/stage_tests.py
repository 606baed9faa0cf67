"""Stage (a): tests/test_triton.py and tests/test_kernels.py on the GPU (DIT_ATTN_TEST_DEVICE=cuda:
the Triton kernels compiled, not interpreted, in float32, float16 and bfloat16 against the
reference; the kernels' other backends on CUDA tensors). One row per test with its outcome and
time. Dry run: the same files on the CPU, the interpreter-heavy kernel comparisons left out.
Needs pytest and diffusers (tests/conftest.py builds toy pipelines)."""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import report

FILES = ("tests/test_triton.py", "tests/test_kernels.py")
DRY_SELECTION = ("-k", "not matches_reference")  # the interpreter runs those for minutes


def outcomes(junit: str) -> list[dict]:
    rows = []
    for case in ElementTree.parse(junit).iter("testcase"):
        outcome, detail = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[kind]
                detail = ((found.get("message") or "").strip().splitlines() or [""])[0][:300]
                break
        rows.append({"test": f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}", "outcome": outcome,
                     "s": round(float(case.get("time", 0)), 1), "detail": detail})
    return rows


def finished_tests(verbose_output: str) -> list[dict]:
    """Outcomes from pytest -v lines ("tests/x.py::name PASSED [ 50%]"), for a run stopped before its junit file."""
    rows = []
    for line in verbose_output.splitlines():
        parts = line.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
            rows.append({"test": parts[0].split("/")[-1], "outcome": parts[1].lower(), "s": "", "detail": ""})
    return rows


def main() -> None:
    args = report.arguments(__doc__.split("\n")[0])
    device = report.device(args.dry_run)
    limit = int(os.environ.get("PYTEST_LIMIT_S", "145"))  # run.sh: the stage limit less time for the report
    out = report.Report(args.out, "tests", f"Kernel tests on {device}", args.dry_run)
    junit = os.path.join(args.out, "tests-junit.xml")
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", f"--junitxml={junit}", *FILES]
    if args.dry_run:
        command += DRY_SELECTION
    env = dict(os.environ, DIT_ATTN_TEST_DEVICE=device)
    env.pop("TRITON_INTERPRET", None)  # the tests set it where they need it (CPU subprocesses)
    out.note("command: DIT_ATTN_TEST_DEVICE=" + device + " " + " ".join(command[1:]))
    try:
        result = subprocess.run(command, cwd=report.ROOT, env=env, capture_output=True, text=True, timeout=limit)
        tail = (result.stdout + result.stderr).strip().splitlines()
        out.note(f"pytest exit status {result.returncode}: {tail[-1] if tail else ''}")
        if result.returncode:
            out.data["pytest_output_tail"] = "\n".join(tail[-60:])
    except subprocess.TimeoutExpired as stopped:
        out.note(f"pytest ran past {limit} s and was stopped: the rows are the tests it had finished")
        partial = stopped.stdout.decode() if isinstance(stopped.stdout, bytes) else (stopped.stdout or "")
        out.section("tests", ["test", "outcome", "s", "detail"])
        for row in finished_tests(partial):
            out.add("tests", row)
        return
    out.section("tests", ["test", "outcome", "s", "detail"])
    if os.path.exists(junit):
        for row in outcomes(junit):
            out.add("tests", row)
            print(f"  {row['outcome']:8} {row['s']:6.1f} s  {row['test']}", flush=True)
    out.write()


if __name__ == "__main__":
    main()
