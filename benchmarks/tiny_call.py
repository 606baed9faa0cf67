"""The tiny model called the diffusers way (`pipe(prompt)`, 256 zero "T5" tokens collapsed to one by
the hook `load_pipeline` installs) against `**da.call_defaults(pipe)` (one zero token) and against the
uncollapsed stock call, side by side in one run.

    python benchmarks/tiny_call.py --threads 1 --repeats 5
"""
from __future__ import annotations

import argparse
import time

import torch

import dit_attn as da
from dit_attn.hooks.zero_tokens import collapse_zero_tokens


def seconds(pipe, repeats: int, **kwargs) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        pipe("a red circle on a white background", generator=torch.Generator().manual_seed(0), **kwargs)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=28)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = da.load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    options = dict(num_inference_steps=args.steps)
    seconds(pipe, 1, **options)  # warm-up
    collapsed = seconds(pipe, args.repeats, **options)
    defaults = seconds(pipe, args.repeats, **options, **da.call_defaults(pipe))
    pipe.transformer._dit_attn_zero_tokens.remove()
    stock = seconds(pipe, args.repeats, **options)
    collapse_zero_tokens(pipe)
    print(f"tiny model, 64x64, {args.steps} steps, CFG default, {args.threads} thread(s), best of {args.repeats}")
    print(f"{'call':<44} {'s/image':>8} {'vs call_defaults':>17}")
    for name, value in (("pipe(prompt), 256 zero tokens collapsed", collapsed),
                        ("pipe(prompt, **call_defaults(pipe)), 1 token", defaults),
                        ("pipe(prompt), 256 zero tokens (no hook)", stock)):
        print(f"{name:<44} {value:>8.3f} {value / defaults:>16.2f}x")


if __name__ == "__main__":
    main()
