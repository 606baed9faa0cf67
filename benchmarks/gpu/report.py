"""What every GPU stage shares: its command line, the machine's description, timers, and
writing a stage's tables as markdown and JSON (rewritten as rows arrive, so a stage cut short
by its time limit still leaves the rows it finished)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from timing import timer  # noqa: E402  (the stages' `report.timer`)


def arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="folder for <stage>.md and <stage>.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (Triton in its interpreter)")
    args = parser.parse_args()
    args.dry_run = args.dry_run or os.environ.get("DRY_RUN") == "1"
    if args.dry_run:  # read when triton is first imported (kernels import it lazily)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.makedirs(args.out, exist_ok=True)
    if args.dry_run:
        torch.set_num_threads(1)
    return args


def device(dry_run: bool) -> str:
    if dry_run:
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run (or DRY_RUN=1) on a CPU")
    return "cuda"


def machine() -> dict:
    """GPU, driver, CUDA, torch, triton, diffusers and Python versions, and the date."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("triton", "diffusers"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = "not installed"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            info["driver"] = "unknown"
    else:
        info["gpu"] = f"none (CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return info


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Report:
    """One stage's output: sections of rows (dicts), notes and errors, in <out>/<stage>.md and .json."""

    def __init__(self, out: str, stage: str, title: str, dry_run: bool):
        self.paths = (os.path.join(out, f"{stage}.md"), os.path.join(out, f"{stage}.json"))
        self.data = {"stage": stage, "title": title, "dry_run": dry_run, "machine": machine(),
                     "sections": {}, "notes": [], "errors": [], "seconds": 0.0}
        self.start = time.perf_counter()
        self.write()

    def section(self, name: str, columns: list[str]) -> list[dict]:
        self.data["sections"][name] = {"columns": columns, "rows": []}
        return self.data["sections"][name]["rows"]

    def add(self, section: str, row: dict) -> None:
        self.data["sections"][section]["rows"].append(row)
        self.write()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.write()

    def error(self, where: str, err: BaseException) -> None:
        message = f"{where}: {type(err).__name__}: {str(err).strip()[:500]}"
        print(f"ERROR {message}", file=sys.stderr, flush=True)
        self.data["errors"].append(message)
        self.write()

    def write(self) -> None:
        self.data["seconds"] = round(time.perf_counter() - self.start, 1)
        md_path, json_path = self.paths
        for path, text in ((json_path, json.dumps(self.data, indent=1)), (md_path, self.markdown())):
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)

    def markdown(self) -> str:
        m = self.data["machine"]
        lines = [f"# {self.data['title']}" + (" (dry run: tiny sizes on the CPU)" if self.data["dry_run"] else ""), "",
                 f"{m['date']}; GPU {m['gpu']}" + (f", driver {m['driver']}" if "driver" in m else "") +
                 f"; torch {m['torch']} (CUDA {m['cuda']}), triton {m['triton']}, diffusers {m['diffusers']}, "
                 f"Python {m['python']}; stage time {self.data['seconds']:.0f} s", ""]
        for name, section in self.data["sections"].items():
            columns = section["columns"]
            lines += [f"## {name}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in section["rows"]]
            lines.append("")
        lines += [f"- {n}" for n in self.data["notes"]]
        if self.data["errors"]:
            lines += ["", "## Errors", ""] + [f"- {e}" for e in self.data["errors"]]
        return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
    return str(value).replace("|", "\\|").replace("\n", " ")
