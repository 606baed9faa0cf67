"""Capture on Wan: a pipeline call plain, with cross maps (attn2, every video query × chosen text tokens) and
with self maps (attn1, a few video locations × every video key), side by side in one run on a config-built
Wan 2.1 pipeline (latents out, best of 3, CFG on: one captured call per step).

Run:  python benchmarks/capture_wan.py [--threads 1] [--frames 17] [--size 128] [--steps 4]
"""
from __future__ import annotations

import argparse

import torch

import dit_attn as da
from dit_attn.toy.wan import build_wan_pipeline
from timing import best_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = build_wan_pipeline(num_layers=4, num_heads=4, head_dim=32)
    pipe.set_progress_bar_config(disable=True)
    run = dict(num_inference_steps=args.steps, output_type="latent", num_frames=args.frames, height=args.size,
               width=args.size, max_sequence_length=512, guidance_scale=3.0)

    def generate():
        pipe("a red circle on a blue square", generator=torch.Generator().manual_seed(0), **run)

    plain = best_of(generate)
    rows = [("plain", plain, "")]
    for name, edit in (("cross, 4 text tokens, every layer and head", da.Capture(kind="cross", tokens=[0, 1, 2, 3])),
                       ("cross, all 512 text tokens", da.Capture(kind="cross")),
                       ("self, 4 locations", da.Capture(kind="self", tokens=[0, 5, 17, 40]))):
        with da.apply(pipe, edit) as handle:
            seconds = best_of(generate)
            size = handle.maps.maps.numel() * 4
        rows.append((name, seconds, f"{size / 2**20:.2f} MiB"))
    latent_frames = (args.frames - 1) // 4 + 1
    tokens = latent_frames * (args.size // 16) ** 2
    print(f"torch {torch.__version__}, threads {args.threads}; Wan toy 4 blocks × 4 heads × 32, {args.frames} frames "
          f"{args.size}×{args.size} = {tokens} video tokens, 512 text tokens, {args.steps} steps, CFG 3")
    print("| run | seconds | vs plain | maps |\n|---|---|---|---|")
    for name, seconds, size in rows:
        print(f"| {name} | {seconds:.3f} | {seconds / plain:.2f}× | {size} |")


if __name__ == "__main__":
    main()
