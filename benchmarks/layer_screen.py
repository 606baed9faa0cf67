"""Which objectives can perturbation guidance move at all? A screen before a hunt.

Generates one image per (prompt, seed) without perturbation guidance and with each whole
layer perturbed (HeadGuidance on all its heads), and scores every palette colour and the
judge on the same images: a table of each layer's paired gain (z = gain / standard error)
per objective. An objective no layer moves is a poor target for a head search.

Run:  python benchmarks/layer_screen.py [--prompts 24] [--scale 3] [--cfg 1] [--threads 1] [--out screen.json]
"""
from __future__ import annotations

import argparse
import json

import torch

import dit_attn as da
from dit_attn.guidance.objectives import get_objective
from dit_attn.guidance.search import mean, paired_gain
from dit_attn.heads import model_layers
from dit_attn.loading import load_pipeline
from dit_attn.toy.data import PALETTE, make_example
from hunt_quality import HUNT_STREAM, cfg_label, pair_scores  # the sibling benchmark: same generation, per-pair scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--prompts", type=int, default=24, help="shape prompts (hunt stream), each with seeds 0, 1")
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the pipeline's; 1 turns it off)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="layer_screen.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    prompts = [make_example(HUNT_STREAM, i, "shape").caption for i in range(args.prompts)]
    names = [f"color:{c}" for c in PALETTE] + ["judge"]
    objectives = {name: get_objective(name) for name in names}
    screen = lambda edit=None: pair_scores(pipe, objectives, prompts, [0, 1], args.steps, edit, cfg=args.cfg)  # noqa: E731
    base = screen()
    gains = {}
    for info in model_layers(pipe.transformer):
        guided = screen(da.HeadGuidance(heads=[f"L{info.index}"], scale=args.scale, u=1.0))
        gains[f"L{info.index}"] = {name: paired_gain(guided[name], base[name]) for name in names}
    print(f"torch {torch.__version__}, threads {args.threads}, {args.prompts} prompts x 2 seeds, {args.steps} steps, "
          f"s={args.scale}, cfg {cfg_label(args)}: each layer's paired gain (z)")
    print("| objective | no guidance | " + " | ".join(gains) + " |")
    print("|---|---:|" + "---:|" * len(gains))
    for name in names:
        cells = [f"{g[name][0]:+.4f} ({g[name][0] / max(g[name][1], 1e-12):+.1f})" for g in gains.values()]
        print(f"| {name} | {mean(base[name]):.4f} | " + " | ".join(cells) + " |")
    with open(args.out, "w") as f:
        json.dump({"settings": vars(args), "no_guidance": {n: mean(v) for n, v in base.items()},
                   "gains": gains}, f, indent=1)


if __name__ == "__main__":
    main()
