"""Wheels of dit-attn's dependencies (and pytest's) for a GPU machine without a package index:
the versions installed here, torch and triton left out (not what they share with the others),
into one folder with a
requirements.txt that `run.sh` (WHEELS=<folder>) installs with `pip --no-index --find-links`.

    python benchmarks/gpu/wheels.py wheels [--python-version 3.11] [--platform manylinux_2_28_x86_64] [--skip numpy]
"""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import subprocess
import sys

from packaging.requirements import Requirement

ALREADY_THERE = ("torch", "triton")  # the GPU machine has these


def _key(name: str) -> str:
    return name.lower().replace("_", "-")


def closure(roots: tuple[str, ...]) -> dict[str, str]:
    """{distribution: installed version} of `roots` and everything they require here (no extras),
    torch and triton and what only they require left out."""
    found: dict[str, str] = {}
    stack = list(roots)
    while stack:
        name = stack.pop()
        if _key(name) in found or _key(name) in ALREADY_THERE:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found[_key(name)] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                stack.append(requirement.name)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="the GPU machine's Python (wheels with compiled code are per version)")
    parser.add_argument("--platform", default="manylinux_2_28_x86_64")
    parser.add_argument("--skip", nargs="*", default=[], help="distributions the GPU machine already has (e.g. numpy pillow)")
    args = parser.parse_args()
    skip = {_key(name) for name in args.skip} | {"dit-attn"}
    needed = {name: version for name, version in closure(("dit-attn", "pytest")).items() if name not in skip}
    os.makedirs(args.folder, exist_ok=True)
    requirements = os.path.join(args.folder, "requirements.txt")
    with open(requirements, "w") as f:
        f.writelines(f"{name}=={version}\n" for name, version in sorted(needed.items()))
    platforms = [args.platform]
    if args.platform.startswith("manylinux_2_28"):  # such machines take the older manylinux tags too
        platforms += ["manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", args.python_version, *(f"--platform={p}" for p in platforms),
               "-d", args.folder, "-r", requirements]
    print(f"{len(needed)} distributions -> {requirements}")
    return subprocess.run(command).returncode


if __name__ == "__main__":
    raise SystemExit(main())
