"""Per-step cost of HeadGuidance on a FLUX.2-shaped model, against the stock step.

Model: a random-weight Flux2Transformer2DModel built from a config (no downloads), FLUX.2's block
layout scaled to CPU: 4 double + 8 single blocks (12 layers) × 4 heads × 64 (hidden 256, MLP ratio
3, four rotary axes of 16); 128×128 px → 16×16 = 256 image tokens and 64 random text tokens (48 wide)
per row. Flux2Pipeline (guidance-distilled): one 1-row transformer call a step.

Configurations, interleaved in rounds with the order rotated every round: the stock step, and
HeadGuidance on every head of one layer at 2/3 depth (layer 8, a single block; u=1, joint scope) with
and without the shared prefix. Each step is stamped by `callback_on_step_end` (wall and process CPU
time); step 0 (warm-up) falls outside every interval. Reported: the median interval, and the ratio to
the stock step as the median over rounds of (this config / stock in the same round). "ideal" is the
ratio of transformer rows × blocks; the stock step with 2 rows a call (two images) shows what a second
row costs without any edit.

Run:  python benchmarks/guidance_step_flux2.py [--threads 1] [--rounds 5] [--steps 6]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

DOUBLE, SINGLE, HEADS, HEAD_DIM = 4, 8, 4, 64
PIXELS, TEXT_TOKENS = 128, 64
LAYER = 2 * (DOUBLE + SINGLE) // 3  # layer 8 of 12: single block 4
SCALE = 3.0


def step_intervals(pipe, edit, steps: int, embeds, rows: int = 1) -> list[tuple[float, float]]:
    import dit_attn as da

    stamps = []

    def on_step_end(p, i, t, kw):
        stamps.append((time.perf_counter(), time.process_time()))
        return {}

    handle = da.apply(pipe, edit) if edit is not None else contextlib.nullcontext()
    with handle, torch.inference_mode():
        pipe(prompt_embeds=embeds, height=PIXELS, width=PIXELS, num_inference_steps=steps, guidance_scale=4.0,
             output_type="latent", generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step_end,
             num_images_per_prompt=rows)
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    if args.threads < 1 or args.rounds < 1 or args.steps < 2:
        raise SystemExit("--threads and --rounds must be >= 1, --steps >= 2")
    torch.set_num_threads(args.threads)

    import dit_attn as da
    from dit_attn.toy.flux2 import build_flux2_pipeline, flux2_prompt_embeds

    pipe = build_flux2_pipeline(num_layers=DOUBLE, num_single_layers=SINGLE, num_heads=HEADS, head_dim=HEAD_DIM)
    pipe.set_progress_bar_config(disable=True)
    embeds = flux2_prompt_embeds(1, TEXT_TOKENS)
    n = DOUBLE + SINGLE
    configs = {  # name: (edit, rows x blocks, rows per call)
        "stock": (None, n, 1),
        "stock, 2 rows (num_images_per_prompt=2)": (None, 2 * n, 2),
        f"ours L{LAYER} share_prefix=False": (da.HeadGuidance(heads=[f"L{LAYER}"], scale=SCALE, share_prefix=False), 2 * n, 1),
        f"ours L{LAYER} share_prefix=True": (da.HeadGuidance(heads=[f"L{LAYER}"], scale=SCALE, share_prefix=True),
                                             LAYER + 2 * (n - LAYER), 1),
    }
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    print(f"model: {DOUBLE} double + {SINGLE} single blocks, {HEADS} heads x {HEAD_DIM} (hidden {HEADS * HEAD_DIM}); "
          f"{(PIXELS // 8) ** 2} image + {TEXT_TOKENS} text tokens per row; {args.steps} steps x {args.rounds} rounds")
    names = list(configs)
    for name in names:  # warm-up
        step_intervals(pipe, configs[name][0], 2, embeds, configs[name][2])
    intervals = {name: [] for name in names}
    per_round = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            dt = step_intervals(pipe, configs[name][0], args.steps, embeds, configs[name][2])
            intervals[name] += dt
            per_round[name].append(tuple(statistics.median(x) for x in zip(*dt)))
        print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    print("| config | ms/step | ratio vs stock | CPU ms/step | CPU ratio vs stock | ideal (rows x blocks) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        wall, cpu = (1e3 * statistics.median(x) for x in zip(*intervals[name]))
        ratios = [statistics.median(a[j] / b[j] for a, b in zip(per_round[name], per_round["stock"])) for j in (0, 1)]
        ideal = configs[name][1] / n
        print(f"| {name} | {wall:.2f} | {ratios[0]:.3f} | {cpu:.2f} | {ratios[1]:.3f} | {ideal:.3f} |")


if __name__ == "__main__":
    main()
