"""What NAG costs on the tiny model: seconds per image of the unguided run (CFG off), NAG with the
negative text as extra tokens of each row (SD3's default), NAG with the negative text as extra rows
(the row path every family has), and CFG-style negative prompting (two passes), side by side.

The conditions run interleaved, one call of --images images each per round; the time of a
condition is the median over --rounds rounds after one warm-up round, divided by the images.

Run:  python benchmarks/nag_cost.py [--threads 1] [--rounds 5] [--steps 12] [--images 2] [--size 64]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import dit_attn as da
from dit_attn.hooks import nag_tokens
from dit_attn.loading import call_defaults, load_pipeline

PROMPT, NEGATIVE = "a circle on a white background", "red"


@contextlib.contextmanager
def row_path():
    """NAG on its row path: no family carries the negative text as tokens."""
    families, nag_tokens.TOKEN_FAMILIES = nag_tokens.TOKEN_FAMILIES, ()
    try:
        yield
    finally:
        nag_tokens.TOKEN_FAMILIES = families


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--cfg", type=float, default=4.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    options = {**call_defaults(pipe), "num_inference_steps": args.steps, "height": args.size, "width": args.size}

    def generate(guidance_scale=1.0, **extra):
        pipe([PROMPT] * args.images, generator=[torch.Generator().manual_seed(s) for s in range(args.images)],
             **{**options, "guidance_scale": guidance_scale}, **extra)

    def nag():
        with da.apply(pipe, da.NAG(NEGATIVE)):
            generate()

    def nag_rows():
        with row_path():
            nag()

    conditions = {
        "unguided (CFG off)": generate,
        "NAG, negative text as tokens": nag,
        "NAG, negative text as rows": nag_rows,
        f"CFG {args.cfg} with the negative prompt": lambda: generate(args.cfg, negative_prompt=NEGATIVE),
    }
    times = {name: [] for name in conditions}
    for round_ in range(args.rounds + 1):
        for name, run in conditions.items():
            start = time.perf_counter()
            with torch.no_grad():
                run()
            if round_:  # the first round warms up
                times[name].append((time.perf_counter() - start) / args.images)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, model {args.model}, {args.size}x{args.size}, "
          f"{args.steps} steps, {args.images} images per call, median of {args.rounds} rounds")
    base = statistics.median(times["unguided (CFG off)"])
    print(f"{'condition':<40} {'s/image':>8} {'vs unguided':>12}")
    for name, values in times.items():
        seconds = statistics.median(values)
        print(f"{name:<40} {seconds:8.3f} {seconds / base:11.2f}x")


if __name__ == "__main__":
    main()
