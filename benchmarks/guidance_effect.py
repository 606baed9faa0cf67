"""Does a head set beat no guidance on new prompts, and by how much? Paired gains ± standard error.

Generates each held-out (prompt, seed) pair without perturbation guidance and with each
head set (HeadGuidance at --scale, u = 1), scores every objective on the same images, and
prints each set's mean and paired gain over no guidance with its standard error. Prompts
come from the held-out stream of benchmarks/hunt_quality.py (shapes and signs 2:1 when an
objective is the judge, else shapes).

Run:  python benchmarks/guidance_effect.py --heads L2 L2H4,L2H2,L2H0 --objectives judge judge:soft
      [--prompts 96] [--seeds 100 101 102 103] [--cfg 1] [--scale 3] [--threads 1] [--out effect.json]
"""
from __future__ import annotations

import argparse
import json

import torch

import dit_attn as da
from dit_attn.guidance.objectives import get_objective
from dit_attn.guidance.search import mean, paired_gain
from dit_attn.loading import load_pipeline
from hunt_quality import HELD_OUT_STREAM, cfg_label, pair_scores, prompts_for  # the sibling benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--heads", nargs="+", required=True, help="head sets, each comma-separated: L2 L2H4,L2H2")
    parser.add_argument("--objectives", nargs="+", default=["judge"])
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102, 103])
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the pipeline's; 1 turns it off)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="guidance_effect.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    kind = "judge" if any(name.startswith("judge") for name in args.objectives) else "color"
    prompts = prompts_for(kind, HELD_OUT_STREAM, args.prompts)
    objectives = {name: get_objective(name) for name in args.objectives}
    score = lambda edit=None: pair_scores(pipe, objectives, prompts, args.seeds, args.steps, edit, cfg=args.cfg)  # noqa: E731
    unguided = score()
    report = {"settings": vars(args), "no guidance": {n: mean(v) for n, v in unguided.items()}, "head sets": {}}
    print(f"torch {torch.__version__}, threads {args.threads}, {args.prompts} prompts x {len(args.seeds)} seeds, "
          f"{args.steps} steps, s={args.scale}, cfg {cfg_label(args)}")
    print("| heads | " + " | ".join(f"{n}: mean (gain ± se)" for n in objectives) + " |")
    print("|---|" + "---|" * len(objectives))
    print("| no guidance | " + " | ".join(f"{report['no guidance'][n]:.4f}" for n in objectives) + " |")
    for heads in args.heads:
        guided = score(da.HeadGuidance(heads=heads.split(","), scale=args.scale, u=1.0))
        report["head sets"][heads] = {n: {"mean": mean(guided[n]), "gain": paired_gain(guided[n], unguided[n])}
                                      for n in objectives}
        cells = [f"{r['mean']:.4f} ({r['gain'][0]:+.4f} ± {r['gain'][1]:.4f})" for r in report["head sets"][heads].values()]
        print(f"| {heads} | " + " | ".join(cells) + " |", flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
