"""Shape accuracy of the tiny model split by which optional attributes a prompt names.

Shape prompts may name a size and a position; when they don't, the world draws a random one.
If the model averaged over the placements a prompt leaves open, prompts naming both would
come out far better than prompts naming neither.

Run:  python benchmarks/tiny_shape_by_prompt.py [--model tiny] [--n 100] [--threads 2]
"""
from __future__ import annotations

import argparse
import collections

import numpy as np
import torch

from dit_attn.loading import load_pipeline
from dit_attn.toy.data import parse_caption
from dit_attn.toy.evaluate import generate, held_out_prompts
from dit_attn.toy.judge import judge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--n", type=int, default=100, help="held-out shape prompts")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    prompts = held_out_prompts("shape", args.n)
    hits = collections.defaultdict(list)
    for prompt, reading in zip(prompts, judge(generate(pipe, prompts))):
        attrs = parse_caption(prompt)
        named = " + ".join(name for name in ("size", "position") if getattr(attrs, name)) or "neither"
        hits[named].append(reading["shape"][0] == attrs.shape)
        hits["all"].append(reading["shape"][0] == attrs.shape)
    print(f"model {args.model}, {args.n} held-out shape prompts, threads {args.threads}")
    for named, values in sorted(hits.items()):
        print(f"prompt names {named}: shape right {np.mean(values):.2f} ({len(values)} prompts)")


if __name__ == "__main__":
    main()
