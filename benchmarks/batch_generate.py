"""Batch generation throughput on the tiny model: `dit-attn generate --prompts FILE` one prompt
per pipeline call vs `--batch-size N`, same prompts and seeds, timed side by side in one run
(each into a fresh output directory), with the largest pixel difference between the two.
`--nag-negatives shared`: every line with the NAG negative prompt "red"; `per-line`: each line its own
(red, small, left in turn), so a batched call runs NAG with a negative prompt per prompt.

Run:  python benchmarks/batch_generate.py [--n 32] [--batch-size 8] [--threads 1] [--nag-negatives shared|per-line]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from dit_attn.cli import main as cli
from dit_attn.toy.evaluate import held_out_prompts


def run(prompts_file: str, out: str, batch_size: int, num_inference_steps: int) -> float:
    start = time.perf_counter()
    assert cli(["generate", "--prompts", prompts_file, "--batch-size", str(batch_size),
                "--num-inference-steps", str(num_inference_steps), "--out", out]) == 0
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-inference-steps", "--steps", dest="num_inference_steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nag-negatives", choices=("none", "shared", "per-line"), default="none")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        prompts = held_out_prompts("shape", args.n // 2) + held_out_prompts("sign", args.n - args.n // 2)
        prompts_file = os.path.join(work, "prompts.jsonl")
        with open(prompts_file, "w") as f:
            for i, prompt in enumerate(prompts):
                negative = {"none": {}, "shared": {"nag_negative": "red"},
                            "per-line": {"nag_negative": ("red", "small", "left")[i % 3]}}[args.nag_negatives]
                f.write(json.dumps({"prompt": prompt, **negative}) + "\n")
        run(prompts_file, os.path.join(work, "warm"), args.batch_size, 1)  # loads and warms the model
        one = run(prompts_file, os.path.join(work, "one"), 1, args.num_inference_steps)
        batched = run(prompts_file, os.path.join(work, "batched"), args.batch_size, args.num_inference_steps)
        diff = max(
            int(np.abs(np.asarray(Image.open(os.path.join(work, "one", name)), dtype=np.int16)
                       - np.asarray(Image.open(os.path.join(work, "batched", name)), dtype=np.int16)).max())
            for name in os.listdir(os.path.join(work, "one")) if name.endswith(".png")
        )
    negatives = "" if args.nag_negatives == "none" else f", NAG negative prompts {args.nag_negatives}"
    print(f"tiny model, {args.n} prompts{negatives}, {args.num_inference_steps} steps, threads {args.threads}, "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"one prompt per call: {one:.1f} s ({args.n / one:.2f} images/s)")
    print(f"--batch-size {args.batch_size}: {batched:.1f} s ({args.n / batched:.2f} images/s) -> {one / batched:.2f}x")
    print(f"largest pixel difference between the two: {diff}/255")


if __name__ == "__main__":
    main()
