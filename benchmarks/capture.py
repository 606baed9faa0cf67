"""What `da.Capture` costs, and what its maps say on the tiny model.

1. Overhead: a config-built FLUX.1 pipeline (2 double + 2 single blocks, 4 heads × 32) at 1,024 and
   4,096 image tokens, per denoising step, plain call vs the same call with Capture(kind="cross") of
   every layer and head on 4 text tokens, of one layer ("cross L2"), kind="self" on 4 locations and
   kind="concept" on 4 concepts. Each measurement runs in its own process, timed with the default
   allocator; memory is the peak resident size during the pipeline call (ru_maxrss, measured in a
   second process whose allocator returns freed blocks at once) above the plain call's size before it,
   next to the size of the maps themselves.
2. Binding (tiny model): for held-out shape prompts, the share of the colour word's, the shape word's
   and the background word's cross-attention mass (mean over heads and steps) that falls on the
   shape's pixels (the generated image's pixels of the prompt's colour), per layer, next to the
   shape's area share (what a map with no preference would give).

Run:  python benchmarks/capture.py [--threads 1] [--steps 3] [--prompts 16] [--part overhead|binding|both]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

SIDES = {1024: 32, 4096: 64}  # image tokens → token grid side (FLUX toy: 4 px per token)


def _peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def one_run(tokens: int, mode: str, steps: int, threads: int) -> dict:
    import dit_attn as da
    from dit_attn.toy.configs import build_flux_pipeline

    torch.set_num_threads(threads)
    pipe = build_flux_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=32)
    pipe.set_progress_bar_config(disable=True)
    side = SIDES[tokens] * 4
    args = dict(height=side, width=side, guidance_scale=3.5, max_sequence_length=8, output_type="latent")
    prompt = "a red circle on a blue background"
    pipe(prompt, num_inference_steps=1, generator=torch.Generator().manual_seed(1), **args)  # warm
    edits = {"plain": (), "cross": (da.Capture(tokens=[0, 1, 2, 3]),),
             "cross L2": (da.Capture(layers=[2], tokens=[0, 1, 2, 3]),),
             "self": (da.Capture(kind="self", tokens=[0, 5, 100, tokens - 1]),),
             "concept": (da.Capture(kind="concept", tokens=["circle", "square", "blue", "green"]),)}[mode]
    handle = da.apply(pipe, *edits) if edits else None
    before = _peak_kb()
    start = time.perf_counter()
    pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **args)
    seconds = (time.perf_counter() - start) / steps
    peak = _peak_kb()
    maps_bytes = handle.maps.maps.numel() * 4 if handle is not None else 0
    return {"seconds_per_step": seconds, "rss_before_mb": before / 1024, "rss_peak_mb": peak / 1024,
            "maps_mb": maps_bytes / 2**20}


def overhead(steps: int, threads: int) -> None:
    print(f"FLUX.1 config-built (2+2 blocks, 4 heads x 32), {steps} steps, threads {threads}, "
          f"load {os.getloadavg()[0]:.2f}; memory: peak RSS of the call above the RSS before it")
    print(f"{'image tokens':>12} {'mode':>8} {'s/step':>8} {'ratio':>6} {'peak MB':>8} {'peak+ MB':>9} {'maps MB':>8}")
    for tokens in SIDES:
        results = {}
        for mode in ("plain", "cross", "cross L2", "self", "concept"):
            results[mode] = run_one(tokens, mode, steps, threads, {})  # time, with the default allocator
            # memory: with a fixed mmap threshold, freed blocks go back to the system, so the peak RSS is the
            # peak of live memory, not of the allocator's cache
            memory = run_one(tokens, mode, steps, threads, {"MALLOC_MMAP_THRESHOLD_": "131072"})
            results[mode].update(rss_before_mb=memory["rss_before_mb"], rss_peak_mb=memory["rss_peak_mb"])
        plain = results["plain"]
        for mode, r in results.items():
            # ru_maxrss is the process's peak so far: the warm-up call sets the floor, so compare peaks
            grown = r["rss_peak_mb"] - plain["rss_before_mb"]
            print(f"{tokens:>12} {mode:>8} {r['seconds_per_step']:>8.3f} {r['seconds_per_step'] / plain['seconds_per_step']:>6.2f} "
                  f"{r['rss_peak_mb']:>8.1f} {grown:>9.1f} {r['maps_mb']:>8.2f}")


def run_one(tokens: int, mode: str, steps: int, threads: int, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", str(tokens), mode, "--steps", str(steps),
                          "--threads", str(threads)], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def shape_mask(image, colour: str, background: str, cells: int) -> np.ndarray:
    """(cells, cells) share of each token cell's pixels nearer the prompt's colour than its background's."""
    from dit_attn.toy.data import PALETTE

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    near = lambda name: ((pixels - np.array(PALETTE[name], dtype=np.float32)) ** 2).sum(-1)  # noqa: E731
    mask = (near(colour) < near(background)).astype(np.float32)
    side = mask.shape[0] // cells
    return mask.reshape(cells, side, cells, side).mean(axis=(1, 3))


def binding(steps: int, prompts: int, threads: int) -> None:
    import dit_attn as da
    from dit_attn.loading import call_defaults, load_pipeline
    from dit_attn.toy.data import parse_caption
    from dit_attn.toy.evaluate import held_out_prompts

    torch.set_num_threads(threads)
    pipe = load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    layers = len(da.layers(pipe))
    shares = {role: [] for role in ("colour", "shape", "background")}
    areas = []
    for i, prompt in enumerate(held_out_prompts("shape", prompts)):
        attrs = parse_caption(prompt)
        words = [attrs.color, attrs.shape, attrs.background]
        with da.apply(pipe, da.Capture(tokens=words)) as handle:
            image = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(i),
                         **call_defaults(pipe)).images[0]
            result = handle.maps
        maps = result.maps[0].mean(dim=1)  # (layers, words, H, W), mean over heads
        mask = torch.from_numpy(shape_mask(image, attrs.color, attrs.background, result.grid[0]))
        for role, w in zip(shares, range(3)):
            mass = maps[:, w].flatten(1)
            shares[role].append(((mass * mask.flatten()).sum(1) / mass.sum(1)).numpy())
        areas.append(float(mask.mean()))
    print(f"\ntiny model, {prompts} held-out shape prompts, {steps} steps, threads {threads}: share of each word's "
          f"cross-attention mass on the shape's pixels (shape area: {np.mean(areas):.3f} of the image)")
    print(f"{'layer':>5} " + " ".join(f"{role:>10}" for role in shares))
    for layer in range(layers):
        print(f"{layer:>5} " + " ".join(f"{np.mean([s[layer] for s in values]):>10.3f}" for values in shares.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--part", default="both", choices=("overhead", "binding", "both"))
    parser.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_run(int(args.one[0]), args.one[1], args.steps, args.threads)))
        return
    if args.part in ("overhead", "both"):
        overhead(args.steps, args.threads)
    if args.part in ("binding", "both"):
        binding(20 if args.steps < 10 else args.steps, args.prompts, args.threads)


if __name__ == "__main__":
    main()
