"""Quality of CLEAR local attention on the tiny model at 128×128 (a 16×16 token grid):
PSNR of local vs full attention images (same prompts, seeds, steps) and judge adherence,
zero-shot and with distilled weights (`dit-attn distill-clear`).

Run:  python benchmarks/local_quality.py [--radius 4] [--weights clear.safetensors] [--n 32]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import numpy as np
import torch

import dit_attn as da
from dit_attn.loading import call_defaults, load_pipeline
from dit_attn.toy.evaluate import held_out_prompts
from dit_attn.toy.judge import adherence


def psnr(a, b) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def images(pipe, prompts, size: int, steps: int, edits=()):
    out = []
    with da.apply(pipe, *edits) if edits else contextlib.nullcontext():
        for i, prompt in enumerate(prompts):
            out += pipe(prompt, generator=torch.Generator().manual_seed(i), height=size, width=size,
                        num_inference_steps=steps, **call_defaults(pipe)).images
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--radius", type=float, default=4)
    parser.add_argument("--downsample", type=int, default=None)
    parser.add_argument("--weights", default=None, help="distilled weights (distill-clear) to compare as well")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n", type=int, default=32, help="held-out shape prompts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    prompts = held_out_prompts("shape", args.n)
    start = time.perf_counter()
    full = images(pipe, prompts, args.size, args.steps)
    rows = {"full attention": full}
    local = da.LocalAttention(args.radius, downsample=args.downsample)
    rows[f"local r={args.radius:g}, zero-shot"] = images(pipe, prompts, args.size, args.steps, (local,))
    if args.weights:
        distilled = da.LocalAttention(args.radius, downsample=args.downsample, weights=args.weights)
        rows[f"local r={args.radius:g}, distilled"] = images(pipe, prompts, args.size, args.steps, (distilled,))
    report = {"settings": vars(args), "seconds": None, "rows": {}}
    print(f"tiny model, {args.size}x{args.size}, {args.n} held-out shape prompts, {args.steps} steps, threads {args.threads}")
    print("attention | PSNR vs full (dB) | judge adherence")
    for name, imgs in rows.items():
        value = float(np.mean([psnr(a, b) for a, b in zip(imgs, full)])) if name != "full attention" else float("inf")
        score = float(adherence(imgs, prompts).mean())
        report["rows"][name] = {"psnr_vs_full": value, "adherence": score}
        print(f"{name} | {value:.2f} | {score:.3f}")
    report["seconds"] = round(time.perf_counter() - start, 1)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(f"({report['seconds']} s)")


if __name__ == "__main__":
    main()
