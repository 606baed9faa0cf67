"""Does NAG make negative prompts work with CFG off on the tiny model?

Prompts leave one attribute open (the colour, the size or the position of a shape) and the
negative prompt names one value of it ("red", "small", "left"). Which value: for each prompt,
the one the unguided model draws most often on calibration seeds (--calibration-seeds, not
the held-out ones; ties to the first in the palette / list order), so that there is something
to remove. Then, on held-out seeds, same prompts and seeds in every condition:

- no guidance, CFG off (guidance_scale 1);
- NAG(negative) with CFG off, the defaults (scale 5, tau 2.5, alpha 0.125: the official SD3 code's, the tiny
  model being an SD3), and a sweep that moves one parameter at a time: scale 2 / 8, tau 1.5 / 4, alpha 0.25 / 0.5;
- CFG-style negative prompting: guidance_scale --cfg with negative_prompt (two passes).

Measures per condition: how often the judge reads the negated value; adherence (the share of
the attributes the positive prompt names, e.g. shape and background, that the judge reads);
seconds per image (median over calls; the conditions are interleaved per prompt, one call of
all its seeds each). Standard errors are over prompts (a prompt's seeds are not independent).

Run:  python benchmarks/nag_tiny.py [--prompts 12] [--seeds 100 101 102] [--steps 12]
      [--threads 1] [--out nag_tiny.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from collections import Counter

import torch

import dit_attn as da
from dit_attn.families import family_of
from dit_attn.loading import call_defaults, load_pipeline
from dit_attn.toy import data
from dit_attn.toy.judge import judge

PROMPT_STREAM = 777_000  # make_example stream of this benchmark's prompts (not the hunts' streams)
AXES = ("color", "size", "position")
# the attributes the model's training captions leave optional: its colour is always named, and a prompt without one
# falls outside what it learned (it draws one shape whatever the seed); the targets are also read on these alone
OPEN_AXES = ("size", "position")
VALUES = {"color": data.COLORS, "size": data.SIZES, "position": data.POSITIONS}
NAG_SWEEP = {  # one parameter at a time around the SD3 family's defaults (scale 5, tau 2.5, alpha 0.125)
    "NAG (defaults: scale 5, tau 2.5, alpha 0.125)": {},
    "NAG scale 2": {"scale": 2.0},
    "NAG scale 8": {"scale": 8.0},
    "NAG tau 1.5": {"tau": 1.5},
    "NAG tau 4": {"tau": 4.0},
    "NAG alpha 0.25": {"alpha": 0.25},
    "NAG alpha 0.5": {"alpha": 0.5},
}


def open_caption(attrs: data.Attributes, axis: str) -> str:
    """The caption of a shape with `axis` left out (the colour is not optional in the grammar)."""
    words = ["a"]
    if attrs.size is not None and axis != "size":
        words.append(attrs.size)
    if axis != "color":
        words.append(attrs.color)
    words.append(attrs.shape)
    if attrs.position is not None and axis != "position":
        words.append(attrs.position)
    return " ".join(words + ["on", "a", attrs.background, "background"])


def named(attrs: data.Attributes, axis: str) -> dict[str, str]:
    """The attributes the positive prompt names (what adherence checks)."""
    return {k: v for k, v in attrs.specified().items() if k != axis}


def prompts_for(axis: str, n: int) -> list[tuple[str, dict[str, str]]]:
    """n shape prompts of the stream that leave `axis` open, with the attributes each names."""
    out, i = [], 0
    while len(out) < n:
        attrs = make_attrs(i)
        i += 1
        if axis != "color" and getattr(attrs, axis) is not None:
            continue  # the size / position must not be named already
        out.append((open_caption(attrs, axis), named(attrs, axis)))
    return out


def make_attrs(i: int) -> data.Attributes:
    return data.make_example(PROMPT_STREAM, i, "shape").attrs


def generate(pipe, prompt, seeds, steps, edit=None, **options):
    """(judge readings, seconds) of one call: the prompt at every seed."""
    with da.apply(pipe, edit) if edit is not None else contextlib.nullcontext():
        t0 = time.perf_counter()
        images = pipe([prompt] * len(seeds), generator=[torch.Generator().manual_seed(s) for s in seeds],
                      num_inference_steps=steps, height=64, width=64, **{**call_defaults(pipe), **options}).images
        seconds = time.perf_counter() - t0
    return judge(images), seconds


def mean_se(per_prompt: list[float]) -> tuple[float, float]:
    m = statistics.fmean(per_prompt)
    se = statistics.stdev(per_prompt) / math.sqrt(len(per_prompt)) if len(per_prompt) > 1 else float("nan")
    return m, se


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--prompts", type=int, default=12, help="prompts per open attribute")
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102], help="held-out seeds")
    parser.add_argument("--calibration-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds that pick each prompt's negated value (unguided); not scored")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--cfg", type=float, default=4.0, help="guidance_scale of the CFG-style condition")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="nag_tiny.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    t_start = time.perf_counter()

    # prompts and their negated values (calibration seeds only)
    cases = []
    for axis in AXES:
        for prompt, wanted in prompts_for(axis, args.prompts):
            readings, _ = generate(pipe, prompt, args.calibration_seeds, args.steps, guidance_scale=1.0)
            counts = Counter(r[axis][0] for r in readings)
            options = [v for v in VALUES[axis] if not (axis == "color" and v == wanted["background"])]
            negated = max(options, key=lambda v: (counts[v], -options.index(v)))
            cases.append({"axis": axis, "prompt": prompt, "named": wanted, "negative": negated,
                          "calibration_counts": dict(counts)})

    defaults = da.NAG("red").resolved(family_of(pipe.transformer), type(pipe).__name__)
    if next(iter(NAG_SWEEP)) != f"NAG (defaults: scale {defaults.scale:g}, tau {defaults.tau:g}, alpha {defaults.alpha:g})":
        raise SystemExit(f"the sweep's first label names other defaults than {args.model}'s: {defaults}")
    conditions = {"no guidance (CFG off)": lambda c: (None, {"guidance_scale": 1.0})}
    for name, change in NAG_SWEEP.items():
        conditions[name] = lambda c, change=change: (da.NAG(c["negative"], **change), {"guidance_scale": 1.0})
    conditions[f"CFG {args.cfg:g} + negative_prompt"] = lambda c: (None, {"guidance_scale": args.cfg,
                                                                         "negative_prompt": c["negative"]})
    # warm-up: one call per condition (not timed, not scored)
    for make in conditions.values():
        edit, options = make(cases[0])
        generate(pipe, cases[0]["prompt"], args.seeds, args.steps, edit, **options)

    results = {name: {"negated": [], "adherence": [], "seconds_per_image": [], "readings": []} for name in conditions}
    for case in cases:  # interleaved: every condition on this prompt before the next prompt
        for name, make in conditions.items():
            edit, options = make(case)
            readings, seconds = generate(pipe, case["prompt"], args.seeds, args.steps, edit, **options)
            r = results[name]
            r["negated"].append(statistics.fmean(x[case["axis"]][0] == case["negative"] for x in readings))
            r["adherence"].append(statistics.fmean(
                statistics.fmean(x[k][0] == v for k, v in case["named"].items()) for x in readings))
            r["seconds_per_image"].append(seconds / len(args.seeds))
            r["readings"].append([{k: x[k][0] for k in ("shape", "color", "background", "size", "position")}
                                  for x in readings])

    base_name = next(iter(conditions))
    base_time = statistics.median(results[base_name]["seconds_per_image"])
    summary = {}
    for name, r in results.items():
        rate, rate_se = mean_se(r["negated"])
        adh, adh_se = mean_se(r["adherence"])
        t = statistics.median(r["seconds_per_image"])
        by_axis = {axis: statistics.fmean(v for v, c in zip(r["negated"], cases) if c["axis"] == axis) for axis in AXES}
        open_rate, open_se = mean_se([v for v, c in zip(r["negated"], cases) if c["axis"] in OPEN_AXES])
        open_adh, open_adh_se = mean_se([v for v, c in zip(r["adherence"], cases) if c["axis"] in OPEN_AXES])
        summary[name] = {"negated_rate": rate, "negated_se": rate_se, "adherence": adh, "adherence_se": adh_se,
                         "seconds_per_image": t, "time_ratio": t / base_time, "negated_by_axis": by_axis,
                         "open_negated_rate": open_rate, "open_negated_se": open_se, "open_adherence": open_adh,
                         "open_adherence_se": open_adh_se}

    n_images = len(cases) * len(args.seeds)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, 64x64, {args.steps} steps, "
          f"{len(cases)} prompts ({args.prompts} per open attribute: {', '.join(AXES)}) x {len(args.seeds)} "
          f"held-out seeds {args.seeds} = {n_images} images per condition, one call per prompt "
          f"(batch {len(args.seeds)}); negated value picked on calibration seeds {args.calibration_seeds}")
    print()
    print("| condition | negated-value rate ± se | adherence ± se | s/image | time ratio vs no guidance |")
    print("|---|---:|---:|---:|---:|")
    for name, s in summary.items():
        print(f"| {name} | {s['negated_rate']:.1%} ± {s['negated_se']:.1%} | {s['adherence']:.1%} ± "
              f"{s['adherence_se']:.1%} | {s['seconds_per_image']:.3f} | {s['time_ratio']:.2f}× |")
    print()
    print("| condition | " + " | ".join(f"negated {a}" for a in AXES) + f" | {' + '.join(OPEN_AXES)}: negated ± se "
          "| adherence ± se |")
    print("|---|" + "---:|" * (len(AXES) + 2))
    for name, s in summary.items():
        print(f"| {name} | " + " | ".join(f"{s['negated_by_axis'][a]:.1%}" for a in AXES)
              + f" | {s['open_negated_rate']:.1%} ± {s['open_negated_se']:.1%} | {s['open_adherence']:.1%} ± "
              f"{s['open_adherence_se']:.1%} |")

    base = summary[base_name]
    nag = summary[next(n for n in conditions if n.startswith("NAG (defaults"))]
    for label, prefix in (("all prompts", ""), (f"the {' and '.join(OPEN_AXES)} prompts", "open_")):
        print()
        print(f"Targets (NAG defaults vs no guidance), {label}:")
        rate, base_rate = nag[prefix + "negated_rate"], base[prefix + "negated_rate"]
        print(f"- negated rate at most half: {rate:.1%} vs {base_rate:.1%} / 2 = {base_rate / 2:.1%} -> "
              f"{'met' if rate <= base_rate / 2 else 'MISSED'}")
        drop = (base[prefix + "adherence"] - nag[prefix + "adherence"]) * 100
        print(f"- adherence within 2 points: {drop:+.1f} points lost -> {'met' if drop <= 2 else 'MISSED'}")
    print(f"- time at most 1.3x: {nag['time_ratio']:.2f}x -> {'met' if nag['time_ratio'] <= 1.3 else 'MISSED'}")
    keep = [n for n in NAG_SWEEP if (base["adherence"] - summary[n]["adherence"]) * 100 <= 2]
    best = min(keep or list(NAG_SWEEP), key=lambda n: summary[n]["negated_rate"])
    print(f"- sweep's lowest negated rate{' with adherence within 2 points' if keep else ' (none kept adherence within 2 points)'}: "
          f"{best} ({summary[best]['negated_rate']:.1%}, adherence {summary[best]['adherence']:.1%})")
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")

    with open(args.out, "w") as f:
        json.dump({"settings": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "cases": cases, "summary": summary, "best_nag": best,
                   "per_prompt": {n: {k: v for k, v in r.items()} for n, r in results.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
