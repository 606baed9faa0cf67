"""What a hunted head set buys on the tiny model, measured on prompts the hunt never saw.

For each objective: hunt (HeadHunter, u = 1 during the search) on the hunt prompts, pick
the best single layer (layer-level PAG, all heads, same scale) on the same prompts, then
score on held-out prompts and seeds: no perturbation guidance, the best layer, the hunted
heads, and the hunted heads' u-curve. Prints one table per objective (held-out means, and
each setting's paired gain over no guidance ± its standard error) and the search's wall
time; writes everything to --out (JSON). Hunts checkpoint beside --out (rerun to resume).

Run:  python benchmarks/hunt_quality.py [--objectives judge color:red color:blue] [--scale 3]
      [--k 1] [--rounds 2] [--steps 12] [--threads 1] [--out hunt_quality.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch

import dit_attn as da
from dit_attn.guidance.objectives import get_objective
from dit_attn.guidance.search import mean, paired_gain
from dit_attn.heads import model_layers
from dit_attn.loading import call_defaults, call_options, load_pipeline
from dit_attn.toy.data import make_example

U_CURVE = (0.0, 0.25, 0.5, 0.75, 1.0)
HUNT_STREAM, HELD_OUT_STREAM = 555_000, 666_000  # make_example stream seeds of the hunt and held-out prompts


def prompts_for(objective: str, stream_seed: int, n: int) -> list[str]:
    """Judge: shapes and signs (2:1); colour objectives: shapes of every colour."""
    if objective.startswith("judge"):
        shapes = [make_example(stream_seed, i, "shape").caption for i in range(n - n // 3)]
        return shapes + [make_example(stream_seed, i, "sign").caption for i in range(n // 3)]
    return [make_example(stream_seed, i, "shape").caption for i in range(n)]


def pair_scores(pipe, objectives: dict, prompts, seeds, steps: int, edit=None, batch: int = 8,
                cfg: float | None = None) -> dict[str, list[float]]:
    """{name: per-pair scores} of each objective on the same images (one per prompt and seed)."""
    pairs = [(p, s) for p in prompts for s in seeds]
    options = {**call_defaults(pipe), **call_options(cfg)}
    scores: dict[str, list[float]] = {name: [] for name in objectives}
    with da.apply(pipe, edit) if edit is not None else contextlib.nullcontext():
        for start in range(0, len(pairs), batch):
            chunk = pairs[start : start + batch]
            images = pipe([p for p, _ in chunk], generator=[torch.Generator().manual_seed(s) for _, s in chunk],
                          num_inference_steps=steps, height=64, width=64, **options).images
            for name, objective in objectives.items():
                scores[name] += [float(x) for x in objective(images, [p for p, _ in chunk])]
    return scores


def measure(pipe, name: str, args) -> dict:
    objective = get_objective(name)
    # the soft judge is a search aid: held-out images are also read by the verdict judge users know
    held_out_objectives = {name: objective, **({"judge": get_objective("judge")} if name == "judge:soft" else {})}
    hunt_prompts = prompts_for(name, HUNT_STREAM, args.hunt_prompts)
    held_out = prompts_for(name, HELD_OUT_STREAM, args.held_out_prompts)
    hunt_seeds, held_seeds = [0, 1], [100, 101]
    checkpoint = f"{os.path.splitext(args.out)[0]}.{name.replace(':', '-')}.checkpoint.json"
    began = time.perf_counter()
    result = da.hunt(pipe, name, hunt_prompts, seeds=hunt_seeds, k=args.k, rounds=args.rounds, u=1.0,
                     scale=args.scale, num_inference_steps=args.steps, guidance_scale=args.cfg,
                     candidates=args.candidates,
                     checkpoint=checkpoint, batch_size=args.batch_size,
                     min_z=args.min_z, confirm_seeds=args.confirm_seeds, confirm_top=args.confirm_top,
                     confirm_together=args.confirm_together)
    hunt_seconds = time.perf_counter() - began

    def guided(heads, u=1.0):
        return da.HeadGuidance(heads=list(heads), scale=args.scale, u=u)

    layers = [f"L{info.index}" for info in model_layers(pipe.transformer)]
    layer_scores = {layer: mean(pair_scores(pipe, {name: objective}, hunt_prompts, hunt_seeds, args.steps,
                                            guided([layer]), cfg=args.cfg)[name])
                    for layer in layers}
    best_layer = max(layer_scores, key=layer_scores.get)
    held_pairs = lambda edit=None: pair_scores(  # noqa: E731
        pipe, held_out_objectives, held_out, held_seeds, args.steps, edit, cfg=args.cfg)
    unguided = held_pairs()
    gains: dict[str, dict[str, list[float]]] = {}

    def held(edit, setting: str | None = None) -> dict[str, float]:
        scores = held_pairs(edit)
        if setting is not None:
            gains[setting] = {n: paired_gain(scores[n], unguided[n]) for n in scores}
        return {n: mean(values) for n, values in scores.items()}
    report = {
        "objective": name, "hunted": result.selected, "hunt_seconds": round(hunt_seconds, 1),
        "best_layer": best_layer, "best_layer_heads": pipe.transformer.config.num_attention_heads,
        "layer_scores_on_hunt_prompts": layer_scores,
        "hunt_prompts": len(hunt_prompts), "held_out_prompts": len(held_out), "seeds": [hunt_seeds, held_seeds],
        "held_out": {
            "no guidance": {n: mean(values) for n, values in unguided.items()},
            f"best layer {best_layer}": held(guided([best_layer]), f"best layer {best_layer}"),
        },
        "u_curve": {u: held(guided(result.selected, u), "hunted" if u == 1.0 else None)
                    for u in U_CURVE} if result.selected else {},
        "held_out_gain_over_no_guidance": gains,  # [mean, standard error] of the paired differences
        "min_z": args.min_z, "baselines": result.baselines, "gains": result.gains,
        "confirm_seeds": args.confirm_seeds, "confirmations": result.confirmations,
    }
    if result.selected:  # with --min-z, no head may qualify: then nothing is shipped
        report["held_out"]["hunted"] = report["u_curve"][1.0]
    return report


def cfg_label(args) -> str:
    return "default" if args.cfg is None else str(args.cfg)


def print_report(report: dict, args) -> None:
    print(f"\n{report['objective']}: hunted {report['hunted']} in {report['hunt_seconds']:.0f} s; "
          f"best layer on the hunt prompts {report['best_layer']} ({report['best_layer_heads']} heads)")
    names = list(report["held_out"]["no guidance"])
    print(f"| held-out ({report['held_out_prompts']} prompts x 2 seeds, s={args.scale}, cfg={cfg_label(args)}) | "
          + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for setting, values in report["held_out"].items():
        gain = report["held_out_gain_over_no_guidance"].get(setting)
        print(f"| {setting} | " + " | ".join(
            f"{values[n]:.4f}" + (f" ({gain[n][0]:+.4f} ± {gain[n][1]:.4f})" if gain else "") for n in names) + " |")
    print("u-curve of the hunted set: " + ", ".join(
        f"u={u}: " + "/".join(f"{v:.4f}" for v in values.values()) for u, values in report["u_curve"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--objectives", nargs="+", default=["judge", "color:red", "color:blue"])
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--cfg", type=float, default=None,
                        help="classifier-free guidance scale for every image (default: the pipeline's; 1 turns CFG off)")
    parser.add_argument("--hunt-prompts", type=int, default=12)
    parser.add_argument("--held-out-prompts", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--min-z", type=float, default=None, help="the hunt's significance threshold (see da.hunt)")
    parser.add_argument("--confirm-seeds", type=int, nargs="+", default=None,
                        help="fresh seeds for the hunt's confirmation stage (see da.hunt); not 0, 1 (hunt) or 100, 101 (held out)")
    parser.add_argument("--confirm-top", type=int, default=None)
    parser.add_argument("--confirm-together", action="store_true",
                        help="confirm each round's top k as one set (see da.hunt)")
    parser.add_argument("--candidates", nargs="+", default=None,
                        help="heads the hunt may pick from, e.g. L2 or L2H0 L2H4 (default: every head)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="hunt_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    print(f"torch {torch.__version__}, threads {args.threads}, model {args.model}, {args.steps} steps, "
          f"scale {args.scale}, k {args.k}, rounds {args.rounds}, cfg {cfg_label(args)}")
    reports = []
    for name in args.objectives:
        reports.append(measure(pipe, name, args))
        print_report(reports[-1], args)
        with open(args.out + ".tmp", "w") as f:
            json.dump({"settings": vars(args), "reports": reports}, f, indent=1)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
