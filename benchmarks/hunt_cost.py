"""What each head-search strategy costs for an equally good selection, on the tiny model.

Per objective:
1. Ground truth: every head's exact paired gain (HeadGuidance on that head alone vs none) on
   held-out pairs (--truth-prompts × 2 seeds the hunts never see).
2. Screening quality: the gradient scores of one screening pass over the hunt pairs against
   those gains (Spearman correlation, top-3 and top-5 overlap).
3. Each strategy's hunt on the hunt pairs (--hunt-prompts × 2 seeds, k heads in one round):
   its cost in generations, a backward pass counted by its measured time in generations of
   the same batch; its wall time; and the held-out gain of its selection (mean ± standard
   error on the truth pairs). "as good" = within one standard error of the exhaustive hunt's.
4. Scale: on a config-built SD3-shaped model (24 layers × 24 heads, small width), the time of
   one screening pass over all 576 heads against one guided generation of the same pair.

Run:  python benchmarks/hunt_cost.py [--objectives color:red color:yellow judge:soft] [--threads 1]
      [--steps 8] [--hunt-prompts 8] [--truth-prompts 16] [--k 3] [--out hunt_cost.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

import dit_attn as da
from dit_attn.guidance.objectives import get_objective
from dit_attn.guidance.screening import screen_heads
from dit_attn.guidance.search import SearchSettings, candidate_heads, head_name, paired_gain, race_pairs, score_pairs
from dit_attn.io import write_json_atomic
from dit_attn.loading import call_defaults, load_pipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hunt_quality import HELD_OUT_STREAM, HUNT_STREAM, prompts_for  # noqa: E402

HUNT_SEEDS, TRUTH_SEEDS = [0, 1], [100, 101]


def strategies(screen_pairs: list[int]) -> list[tuple[str, str, dict]]:
    """(label, strategy, extra hunt settings) of each hunt the benchmark runs."""
    return [("exhaustive", "exhaustive", {}), ("race", "race", {}), ("screen+race", "screen+race", {}),
            *((f"screen+race, {n} pairs screened", "screen+race", {"screen_pairs": n}) for n in screen_pairs)]


def settings_for(pipe, objective: str, prompts, seeds, args) -> SearchSettings:
    heads = candidate_heads(pipe)
    return SearchSettings(objective, tuple(prompts), tuple(seeds), k=1, rounds=1, u=1.0, scale=args.scale,
                          num_inference_steps=args.steps, guidance_scale=None, height=None, width=None,
                          candidates=tuple(head_name(h) for h in heads), target="identity", scope="joint",
                          batch_size=args.batch_size, max_sequence_length=call_defaults(pipe).get("max_sequence_length"))


def truth(pipe, score_fn, settings: SearchSettings) -> tuple[list[float], dict[str, list[float]]]:
    """(per-pair scores without guidance, each head's per-pair scores with its guidance alone) on the truth pairs."""
    baseline = score_pairs(pipe, score_fn, settings, [set()])[0][0]
    heads = candidate_heads(pipe)
    scores = {}
    for start in range(0, len(heads), settings.batch_size):
        batch = heads[start : start + settings.batch_size]
        per_pair, _ = score_pairs(pipe, score_fn, settings, [{h} for h in batch])
        scores.update({head_name(h): values for h, values in zip(batch, per_pair)})
    return baseline, scores


def ranks(values: list[float]) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(len(values))
    for value in set(values):  # ties share their mean rank
        where = [i for i, v in enumerate(values) if v == value]
        out[where] = out[where].mean()
    return out


def spearman(a: list[float], b: list[float]) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def top(scores: dict[str, float], n: int) -> set[str]:
    return set(sorted(scores, key=lambda name: -scores[name])[:n])


def seconds_per_generation(pipe, settings: SearchSettings) -> float:
    """Wall time of one guided batch of `batch_size` pairs, per image."""
    pairs = [(p, s) for p in settings.prompts for s in settings.seeds][: settings.batch_size]
    head = candidate_heads(pipe)[0]
    began = time.perf_counter()
    score_pairs(pipe, lambda images, prompts: [0.0] * len(images), settings, [{head}], pairs)
    return (time.perf_counter() - began) / len(pairs)


def measure(pipe, name: str, args) -> dict:
    score_fn = get_objective(name)
    hunt_prompts = prompts_for(name, HUNT_STREAM, args.hunt_prompts)
    truth_prompts = prompts_for(name, HELD_OUT_STREAM, args.truth_prompts)
    truth_settings = settings_for(pipe, name, truth_prompts, TRUTH_SEEDS, args)
    cache = f"{os.path.splitext(args.out)[0]}.truth.{name.replace(':', '-')}.json"
    key = {"prompts": truth_prompts, "seeds": TRUTH_SEEDS, "steps": args.steps, "scale": args.scale}
    stored = json.load(open(cache)) if os.path.exists(cache) else {}
    if stored.get("key") == key:  # the same truth pairs and settings: reuse the measured ground truth
        baseline, per_head, truth_seconds = stored["baseline"], stored["per_head"], stored["seconds"]
    else:
        began = time.perf_counter()
        baseline, per_head = truth(pipe, score_fn, truth_settings)
        truth_seconds = time.perf_counter() - began
        write_json_atomic(cache, {"key": key, "baseline": baseline, "per_head": per_head, "seconds": truth_seconds})
    gains = {n: paired_gain(v, baseline) for n, v in per_head.items()}
    hunt_settings = settings_for(pipe, name, hunt_prompts, HUNT_SEEDS, args)
    per_image = seconds_per_generation(pipe, hunt_settings)

    screened = screen_heads(pipe, name, hunt_prompts, HUNT_SEEDS, u=1.0, scale=args.scale, num_inference_steps=args.steps,
                            batch_size=args.batch_size, progress=False)
    names = list(gains)
    exact = {n: gains[n][0] for n in names}

    def agreement(result) -> dict:
        return {"spearman": spearman([result.scores[n] for n in names], [exact[n] for n in names]),
                "top3_overlap": len(top(result.scores, 3) & top(exact, 3)),
                "top5_overlap": len(top(result.scores, 5) & top(exact, 5))}

    few = screen_heads(pipe, name, [p for p, _ in race_pairs(hunt_settings)[:4]], [0], u=1.0, scale=args.scale,
                       num_inference_steps=args.steps, batch_size=args.batch_size, progress=False)
    quality = {**agreement(screened), "four_pairs": agreement(few), "screen_seconds": screened.seconds,
               "screen_pairs": screened.pairs, "screen_in_generations": screened.seconds / per_image}
    hunts = {}
    for label, strategy, extra in strategies(args.screen_pairs):
        began = time.perf_counter()
        result = da.hunt(pipe, name, hunt_prompts, HUNT_SEEDS, k=args.k, rounds=1, u=1.0, scale=args.scale,
                         num_inference_steps=args.steps, batch_size=args.batch_size, strategy=strategy, progress=False,
                         **extra)
        seconds = time.perf_counter() - began
        generations = sum(sum(spent.values()) for spent in result.spent)
        # a backward pass over a batch of pairs costs what its measured time buys in generations
        screened_pairs = extra.get("screen_pairs", screened.pairs)
        backward_cost = quality["screen_in_generations"] * screened_pairs / screened.pairs \
            if result.backward_passes else 0.0
        held = score_pairs(pipe, score_fn, truth_settings, [set(candidate_heads(pipe, result.selected))])[0][0]
        hunts[label] = {"selected": result.selected, "generations": generations,
                           "cost": generations + backward_cost, "seconds": seconds,
                           "held_out_gain": paired_gain(held, baseline)}
    best, best_se = hunts["exhaustive"]["held_out_gain"]
    for strategy, entry in hunts.items():
        entry["cost_vs_exhaustive"] = entry["cost"] / hunts["exhaustive"]["cost"]
        entry["as_good"] = entry["held_out_gain"][0] >= best - best_se
    return {"objective": name, "truth_pairs": len(baseline), "truth_seconds": truth_seconds,
            "seconds_per_generation": per_image, "screening": quality, "hunts": hunts,
            "best_true_heads": sorted(names, key=lambda n: -gains[n][0])[:5]}


SCALE_PHASES = ("generation", "screen", "screen-checkpointed")


def scale_phase(phase: str, args) -> dict:
    """One phase on a 24 × 24-head SD3-shaped model, in a process of its own: (seconds, peak RSS in MiB)."""
    import resource

    from dit_attn.toy.configs import build_sd3_pipeline

    pipe = build_sd3_pipeline(num_layers=24, num_heads=24, head_dim=8, seed=0)
    pipe.set_progress_bar_config(disable=True)
    run = dict(num_inference_steps=args.scale_steps, height=args.scale_size, width=args.scale_size,
               max_sequence_length=8, guidance_scale=3.0)
    heads = candidate_heads(pipe)
    prompt = "a red circle"
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def go():
        if phase == "generation":
            with da.apply(pipe, da.HeadGuidance(heads=[heads[0]], scale=args.scale)):
                pipe(prompt, generator=torch.Generator().manual_seed(0), **run)
        else:
            screen_heads(pipe, "color:red", [prompt], [0], scale=args.scale, batch_size=1, progress=False,
                         checkpointing=phase == "screen-checkpointed", **run)

    go()  # warm-up
    began = time.perf_counter()
    go()
    return {"seconds": time.perf_counter() - began, "heads": len(heads), "built_rss_mib": built,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def scale_check(args) -> dict:
    """One screening pass over all heads of a 24 × 24-head SD3-shaped model vs one guided generation, each
    phase in a fresh process so that its peak memory is its own."""
    import subprocess

    phases = {}
    for phase in SCALE_PHASES:
        command = [sys.executable, os.path.abspath(__file__), "--scale-phase", phase, "--threads", str(args.threads),
                   "--scale-steps", str(args.scale_steps), "--scale-size", str(args.scale_size)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        phases[phase] = json.loads(done.stdout.strip().splitlines()[-1])
    one = phases["generation"]["seconds"]
    return {"heads": phases["generation"]["heads"], "steps": args.scale_steps, "size": args.scale_size,
            "phases": phases, **{f"{p}_vs_generation": phases[p]["seconds"] / one for p in SCALE_PHASES[1:]}}


def print_report(report: dict) -> None:
    q = report["screening"]
    print(f"\n{report['objective']}: ground truth on {report['truth_pairs']} pairs ({report['truth_seconds']:.0f} s); "
          f"{report['seconds_per_generation'] * 1000:.0f} ms per generation; best true heads {report['best_true_heads']}")
    print(f"screening: Spearman {q['spearman']:+.2f}, top-3 overlap {q['top3_overlap']}/3, top-5 overlap "
          f"{q['top5_overlap']}/5, {q['screen_seconds']:.1f} s for {q['screen_pairs']} pairs "
          f"(= {q['screen_in_generations']:.1f} generations); on 4 pairs: Spearman {q['four_pairs']['spearman']:+.2f}, "
          f"top-3 {q['four_pairs']['top3_overlap']}/3, top-5 {q['four_pairs']['top5_overlap']}/5")
    print("| strategy | selected | generations | cost (generations) | vs exhaustive | wall s | held-out gain | as good |")
    print("|---|---|---|---|---|---|---|---|")
    for strategy, e in report["hunts"].items():
        gain, se = e["held_out_gain"]
        print(f"| {strategy} | {','.join(e['selected'])} | {e['generations']} | {e['cost']:.0f} | "
              f"{e['cost_vs_exhaustive']:.2f} | {e['seconds']:.0f} | {gain:+.4f} ± {se:.4f} | {'yes' if e['as_good'] else 'no'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", nargs="*", default=["color:red", "color:yellow", "judge:soft"])
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hunt-prompts", type=int, default=8)
    parser.add_argument("--truth-prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--screen-pairs", type=int, nargs="*", default=[4, 8],
                        help="also hunt with screen+race screening only this many pairs")
    parser.add_argument("--scale-steps", type=int, default=4)
    parser.add_argument("--scale-size", type=int, default=64)
    parser.add_argument("--scale-phase", choices=SCALE_PHASES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="hunt_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.scale_phase:
        print(json.dumps(scale_phase(args.scale_phase, args)))
        return
    print(f"torch {torch.__version__}, threads {args.threads}, load {os.getloadavg()[0]:.2f}, tiny model (36 heads), "
          f"{args.steps} steps, hunt pairs {args.hunt_prompts}x{len(HUNT_SEEDS)}, truth pairs "
          f"{args.truth_prompts}x{len(TRUTH_SEEDS)}, k {args.k}, batch {args.batch_size}")
    pipe = load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    reports = []
    for name in args.objectives:
        reports.append(measure(pipe, name, args))
        print_report(reports[-1])
    out = {"threads": args.threads, "steps": args.steps, "objectives": reports}
    if not args.skip_scale:
        out["scale"] = scale_check(args)
        s, p = out["scale"], out["scale"]["phases"]
        print(f"\nscale: SD3-shaped 24 layers x 24 heads ({s['heads']} heads), {s['steps']} steps, {s['size']}x{s['size']}, "
              f"one (prompt, seed) pair; {s['heads']} generations for one exhaustive pair")
        print("| phase | seconds | vs one generation | peak RSS MiB (model built: MiB) |")
        print("|---|---|---|---|")
        for phase in SCALE_PHASES:
            print(f"| {phase} | {p[phase]['seconds']:.2f} | {p[phase]['seconds'] / p['generation']['seconds']:.1f}x | "
                  f"{p[phase]['peak_rss_mib']:.0f} ({p[phase]['built_rss_mib']:.0f}) |")
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
