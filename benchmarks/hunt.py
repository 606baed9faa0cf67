"""Head-search candidate throughput: dit-attn's batched scoring vs the naive loop.

Naive: one pipeline call per candidate (its M prompt/seed pairs in that call, the prompts
encoded each time, HeadGuidance on S ∪ {h} without a shared prefix) — the loop HeadHunter's
code runs. Batched: `dit_attn.guidance.search.score_batch`, several candidates per call
with per-row heads, prompts encoded once per call, shared prefix. Both score the same
candidates with the same seeds, so their scores must agree (printed: largest difference).
Each configuration is timed twice, interleaved, after one warm-up batch; the better time
of the two is kept.

Run:  python benchmarks/hunt.py [--model tiny] [--threads 1] [--candidates 24] [--batch-sizes 4 8 12]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import dit_attn as da
from dit_attn.guidance.objectives import get_objective
from dit_attn.guidance.search import SearchSettings, candidate_heads, generate, head_name, score_batch
from dit_attn.loading import call_defaults, load_pipeline
from dit_attn.toy.evaluate import held_out_prompts


def naive_scores(pipe, objective, settings: SearchSettings, heads) -> dict[str, float]:
    pairs = [(p, s) for p in settings.prompts for s in settings.seeds]
    scores = {}
    for head in heads:
        edit = da.HeadGuidance(heads=[head], scale=settings.scale, u=settings.u, share_prefix=False)
        with da.apply(pipe, edit):
            images = generate(pipe, settings, pairs)
        values = objective(images, [p for p, _ in pairs])
        scores[head_name(head)] = sum(values) / len(values)
    return scores


def batched_scores(pipe, objective, settings: SearchSettings, heads, batch_size: int) -> dict[str, float]:
    scores = {}
    for start in range(0, len(heads), batch_size):
        scores.update(score_batch(pipe, objective, settings, [], heads[start : start + batch_size]))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--objective", default="judge")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=4, help="held-out shape prompts (M pairs = prompts x seeds)")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--candidates", type=int, default=24)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 12])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    objective = get_objective(args.objective)
    heads = candidate_heads(pipe)[: args.candidates]
    defaults = call_defaults(pipe)
    settings = SearchSettings(args.objective, tuple(held_out_prompts("shape", args.prompts)), tuple(range(args.seeds)),
                              k=1, rounds=1, u=1.0, scale=3.0, num_inference_steps=args.steps, guidance_scale=None,
                              height=None, width=None, candidates=tuple(head_name(h) for h in heads), target="identity",
                              scope="joint", batch_size=1, max_sequence_length=defaults.get("max_sequence_length"))
    print(f"torch {torch.__version__}, threads {args.threads}, load {os.getloadavg()[0]:.2f}, model {args.model}, "
          f"{len(heads)} candidates x {args.prompts * args.seeds} pairs, {args.steps} steps, objective {args.objective}")
    configs = {"naive (one call per candidate)": lambda: naive_scores(pipe, objective, settings, heads)}
    for size in args.batch_sizes:
        configs[f"batched, {size} candidates per call"] = (lambda s: lambda: batched_scores(pipe, objective, settings, heads, s))(size)
    batched_scores(pipe, objective, settings, heads[:2], 2)  # warm-up
    times = {name: [] for name in configs}
    results = {}
    for _ in range(2):
        for name, run in configs.items():
            start = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - start)
    naive_name = next(iter(configs))
    naive = min(times[naive_name])
    print("configuration | seconds | candidates/s | speed-up | max |score difference| vs naive")
    for name in configs:
        best = min(times[name])
        diff = max(abs(results[name][h] - results[naive_name][h]) for h in results[naive_name])
        print(f"{name} | {best:.1f} | {len(heads) / best:.2f} | {naive / best:.2f}x | {diff:.2e}")


if __name__ == "__main__":
    main()
