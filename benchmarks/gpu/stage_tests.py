"""Stage (a): tests/test_triton.py, tests/test_kernels.py and tests/test_lse.py on the GPU
(DIT_ATTN_TEST_DEVICE=cuda: the Triton kernels compiled, not interpreted, in float32, float16 and bfloat16
against the reference; the kernels' other backends on CUDA tensors; the CUDA ops that give NAG's merge its
log-sum-exp). One row per test with its outcome and
time. Dry run: the same files on the CPU, the interpreter-heavy kernel comparisons left out.
Launch settings are the kernels' fixed fallbacks (DIT_ATTN_AUTOTUNE=0).
Needs pytest and diffusers (tests/conftest.py builds toy pipelines)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree

import report

FILES = ("tests/test_triton.py", "tests/test_kernels.py", "tests/test_lse.py")
# the quick tests first, then each long Triton comparison on its own, so that one running out of
# time leaves the others' outcomes; the dry run (the interpreter) takes the quick ones only
QUICK = ("-k", "not matches_reference")
LONG = ("test_triton_kernel_matches_reference_in_interpreter_and_in_pipelines",
        "test_triton_backward_matches_reference_dense_and_local_and_trains_a_transformer",
        "test_triton_backward_matches_reference_at_every_tuned_block_size")


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


def _stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_pytest(out: report.Report, name: str, selection: list[str], env: dict, junit: str, limit: float) -> None:
    """One pytest run; its tests become rows (from the junit file, or from the -v lines when stopped)."""
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", f"--junitxml={junit}", *selection]
    # its own process group: stopping pytest must stop the test scripts it started too
    process = subprocess.Popen(command, cwd=report.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: (_stop(process), sys.exit(124)))  # run.sh's stage limit
    try:
        output, _ = process.communicate(timeout=max(limit, 1))
    except subprocess.TimeoutExpired:
        _stop(process)
        output, _ = process.communicate()
        out.note(f"{name}: stopped after {limit:.0f} s (the stage's time); rows are the tests it had finished")
        for row in finished_tests(output):
            out.add("tests", row)
        return
    finally:
        signal.signal(signal.SIGTERM, previous)
    tail = output.strip().splitlines()
    out.note(f"{name}: pytest exit status {process.returncode}: {tail[-1] if tail else ''}")
    if process.returncode:
        out.data.setdefault("pytest_output_tails", {})[name] = "\n".join(tail[-60:])
    rows = outcomes(junit) if os.path.exists(junit) else []
    for row in rows:
        out.add("tests", row)
        print(f"  {row['outcome']:8} {row['s']:6.1f} s  {row['test']}", flush=True)


def main() -> None:
    args = report.arguments(__doc__.split("\n")[0])
    device = report.device(args.dry_run)
    deadline = time.monotonic() + int(os.environ.get("PYTEST_LIMIT_S", "145"))  # run.sh: the stage's limit less 15 s
    out = report.Report(args.out, "tests", f"Kernel tests on {device}", args.dry_run)
    out.section("tests", ["test", "outcome", "s", "detail"])
    # fixed launch settings: tuning is tested with stand-ins, and timing every candidate would
    # compile each kernel variant five times
    env = dict(os.environ, DIT_ATTN_TEST_DEVICE=device, DIT_ATTN_AUTOTUNE="0")
    env.pop("TRITON_INTERPRET", None)  # the tests set it where they need it (CPU subprocesses)
    out.note(f"DIT_ATTN_TEST_DEVICE={device} DIT_ATTN_AUTOTUNE=0 python -m pytest {' '.join(FILES)}")
    runs = [("quick tests", [*FILES, *QUICK])]
    if not args.dry_run:
        runs += [(test, [f"{FILES[0]}::{test}"]) for test in LONG]
    for i, (name, selection) in enumerate(runs):
        junit = os.path.join(args.out, f"tests-junit-{i}.xml")
        run_pytest(out, name, selection, env, junit, deadline - time.monotonic())
    out.write()


if __name__ == "__main__":
    main()
