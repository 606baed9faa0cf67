"""Kill `dit-attn generate` with SIGKILL again and again, resume it, and count what was lost.

Each cycle starts the same batch (the embedded tiny model, one step, 32 px) into one --out, waits a
random time — sometimes only while the model loads, mostly until it has written a few more images —
and kills it with -9. A last run finishes the batch. Then every item must be in the folder exactly once:
one manifest line per item, its PNG whole (verified through IEND) and holding that line's settings, no
temporary file left, and the lock free (the last run got it).

A PNG write takes about a millisecond of each item here, so plain kills rarely land inside one.
`--write-delay S` runs the same command with two pauses of S seconds added (by patching, in the child
process): after a PNG's bytes are written and before it is flushed and renamed, and after the rename
before its manifest line, so that many kills land in those two windows.

    .venv/bin/python benchmarks/kill_resume.py --cycles 20 --items 100
    .venv/bin/python benchmarks/kill_resume.py --cycles 20 --items 100 --write-delay 0.1
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

from dit_attn.io import verified_png_settings
from dit_attn.workflows.batch import LINE_ONLY

# `dit-attn generate` with pauses inside each PNG write and between the rename and the manifest line
SLOW_CHILD = """
import sys, time
import dit_attn.io as dio
import dit_attn.workflows.batch as batch
from dit_attn.cli import main

delay = float(sys.argv[1])
real_write_atomic, real_append = dio.write_atomic, batch.Manifest.append

def write_atomic(path, write, tmp_prefix=".partial-"):
    def slow(f):
        write(f)
        f.flush()
        time.sleep(delay)  # the whole image in the temporary file, not yet flushed or renamed
    real_write_atomic(path, slow, tmp_prefix)

def append(self, record):
    time.sleep(delay)  # the PNG renamed into place, its line not yet written
    real_append(self, record)

dio.write_atomic, batch.Manifest.append = write_atomic, append
sys.exit(main(["generate", *sys.argv[2:]]))
"""


def lines(manifest: str) -> list[dict]:
    if not os.path.exists(manifest):
        return []
    with open(manifest) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-delay", type=float, default=0.0,
                        help="seconds paused inside each PNG write and before each manifest line (0: none)")
    parser.add_argument("--keep", default=None, help="work in this folder (default: a temporary one)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = args.keep or tempfile.mkdtemp(prefix="kill-resume-")
    prompts = os.path.join(work, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("\n".join(f"a red circle number {i}" for i in range(args.items)) + "\n")
    out = os.path.join(work, "out")
    manifest = os.path.join(out, "manifest.jsonl")
    flags = ["--prompts", prompts, "--steps", "1", "--size", "32", "--out", out]
    command = [sys.executable, "-m", "dit_attn.cli", "generate", *flags]
    killed = [sys.executable, "-c", SLOW_CHILD, str(args.write_delay), *flags] if args.write_delay > 0 else command
    env = dict(os.environ, OMP_NUM_THREADS="1")
    kills_loading = kills_writing = mid_write = unrecorded = 0
    started = time.monotonic()
    for cycle in range(args.cycles):
        before = len(lines(manifest))
        if before >= args.items:
            break
        process = subprocess.Popen(killed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if rng.random() < 0.2:  # while the model loads (or the manifest is read)
            time.sleep(rng.uniform(0.2, 2.5))
        else:  # after a few more images, at a random point of the next one
            want = before + rng.randint(1, 3)
            deadline = time.monotonic() + 120
            while len(lines(manifest)) < want and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.15 + 2 * args.write_delay))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
        after = len(lines(manifest))
        partial = os.path.isdir(out) and any(f.endswith(".tmp") for f in os.listdir(out))
        mid_write += partial  # killed inside a PNG write: its temporary file is left for the next run to remove
        recorded = {r["file"] for r in lines(manifest)}
        orphan = os.path.isdir(out) and any(f.endswith(".png") and f not in recorded for f in os.listdir(out))
        unrecorded += orphan  # killed after a rename, before its line: the next run makes that item again
        if after == before:
            kills_loading += 1
        else:
            kills_writing += 1
        print(f"cycle {cycle + 1:>2}: killed with -9 after {after - before} new images ({after}/{args.items} recorded)"
              f"{', inside a PNG write' if partial else ''}{', between a rename and its line' if orphan else ''}", flush=True)
    final = subprocess.run(command, env=env, capture_output=True, text=True)
    records = lines(manifest)
    files = [r["file"] for r in records]
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    bad = []
    for record in records:
        try:
            if verified_png_settings(os.path.join(out, record["file"])) != {k: v for k, v in record.items() if k not in LINE_ONLY}:
                bad.append(record["file"])
        except ValueError:
            bad.append(record["file"])
    duplicates = len(files) - len(set(files))
    lost = args.items - len(set(files))
    temp = [f for f in os.listdir(out) if f.endswith(".tmp")]
    print()
    print("| cycles | killed before an image | killed while generating | inside a PNG write | between rename and line | "
          "items | manifest lines | duplicates | lost | bad PNGs | temp files left | last run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {kills_loading + kills_writing} | {kills_loading} | {kills_writing} | {mid_write} | {unrecorded} | {args.items} | "
          f"{len(records)} | "
          f"{duplicates} | {lost} | {len(bad)} | {len(temp)} | exit {final.returncode}: {final.stdout.strip()[:80]} |")
    print(f"\n{time.monotonic() - started:.0f} s; PNGs in the folder: {len(pngs)}; work folder: {work}")
    ok = final.returncode == 0 and not duplicates and not lost and not bad and not temp and len(pngs) == args.items
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
