"""NAG on Wan costs one extra cross-attention per layer, not a second row: plain, NAG and CFG with the same
negative prompt, side by side in one run on a config-built Wan 2.1 pipeline (latents out, best of 3).

Run:  python benchmarks/nag_wan.py [--threads 1] [--frames 17] [--size 128] [--steps 8]
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
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = build_wan_pipeline(num_layers=4, num_heads=4, head_dim=32)
    pipe.set_progress_bar_config(disable=True)
    run = dict(num_inference_steps=args.steps, output_type="latent", num_frames=args.frames, height=args.size,
               width=args.size, max_sequence_length=64)

    def generate(**kwargs):
        pipe("a red circle", generator=torch.Generator().manual_seed(0), **run, **kwargs)

    plain = best_of(lambda: generate(guidance_scale=1.0))
    with da.apply(pipe, da.NAG("a blue square")):
        nag = best_of(lambda: generate(guidance_scale=1.0))
    cfg = best_of(lambda: generate(guidance_scale=3.0, negative_prompt="a blue square"))
    latent_frames = (args.frames - 1) // 4 + 1
    tokens = latent_frames * (args.size // 16) ** 2
    print(f"torch {torch.__version__}, threads {args.threads}; Wan toy 4 blocks × 4 heads × 32, {args.frames} frames "
          f"{args.size}×{args.size} = {tokens} video tokens, 64 text tokens, {args.steps} steps")
    print("| run | seconds | vs plain |\n|---|---|---|")
    for name, seconds in (("plain (no CFG)", plain), ("NAG", nag), ("CFG with the negative prompt", cfg)):
        print(f"| {name} | {seconds:.3f} | {seconds / plain:.2f}× |")


if __name__ == "__main__":
    main()
