"""Where the tiny model loses shapes: VAE, noise level, or the prompt's attributes.

1. VAE: judge shape+colour accuracy of decoded latents of fresh shape images, with latent
   noise σ ∈ {0, 0.1, 0.3} (how robust the decoder is to small latent errors).
2. SDEdit: noise real images' latents to flow time t0 (x = (1 − t0)·x0 + t0·n), denoise with
   the model from there (Euler, CFG), and read the shape: where along the noise levels the
   model stops keeping the shape it was given. t0 = 0 is the VAE round trip, t0 = 1 is
   generation from noise.
3. Generation from noise: shape and colour accuracy apart, and shape accuracy per size.

Run:  python benchmarks/tiny_diagnostics.py [--model tiny] [--n 32] [--cfg 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import collections

import numpy as np
import torch
from PIL import Image

from dit_attn.ic.latents import decode
from dit_attn.loading import call_defaults, load_pipeline
from dit_attn.toy.data import make_example, parse_caption
from dit_attn.toy.evaluate import HELD_OUT_SEED, generate
from dit_attn.toy.judge import judge
from dit_attn.train.flow import latents_of, predict, text_features


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] → PIL images."""
    return [Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()) for x in images]


def shape_hits(images, captions) -> list[bool]:
    return [r["shape"][0] == parse_caption(c).shape for r, c in zip(judge(images), captions)]


@torch.no_grad()
def sdedit(pipe, x0, captions, t0: float, cfg: float, steps: int = 28, seed: int = 0) -> torch.Tensor:
    """Denoise x0 noised to flow time t0 with the pipeline's transformer (Euler, CFG); decoded images."""
    length = call_defaults(pipe).get("max_sequence_length", 256)
    cond = text_features(pipe, captions, length)
    empty = text_features(pipe, [""] * len(captions), length)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    x = (1 - t0) * x0 + t0 * noise
    times = torch.linspace(t0, 0.0, max(round(steps * t0), 1) + 1)
    for now, then in zip(times[:-1], times[1:]):
        t = torch.full((2 * len(captions),), float(now))
        v = predict(pipe.transformer, torch.cat([x, x]), torch.cat([empty[0], cond[0]]),
                    torch.cat([empty[1], cond[1]]), t, tuple(x0.shape[-2:]))
        v_uncond, v_cond = v.chunk(2)
        x = x + (then - now) * (v_uncond + cfg * (v_cond - v_uncond))
    return decode(pipe, x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--n", type=int, default=32, help="shape images / prompts")
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    examples = [make_example(HELD_OUT_SEED, i, "shape") for i in range(args.n)]
    captions = [e.caption for e in examples]
    pixels = torch.stack([torch.from_numpy(np.array(e.image)).permute(2, 0, 1).float() / 127.5 - 1 for e in examples])
    x0 = latents_of(pipe, pixels)
    print(f"model {args.model}, {args.n} held-out shape images, CFG {args.cfg}, threads {args.threads}")

    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    for sigma in (0.0, 0.1, 0.3):
        images = to_pil(decode(pipe, x0 + sigma * noise))
        both = [h and r["color"][0] == parse_caption(c).color
                for h, r, c in zip(shape_hits(images, captions), judge(images), captions)]
        print(f"VAE decode of latents + {sigma}·noise: shape+colour {np.mean(both):.2f}")

    for t0 in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        images = to_pil(sdedit(pipe, x0, captions, t0, args.cfg))
        print(f"SDEdit from t0 = {t0}: shape {np.mean(shape_hits(images, captions)):.2f}")

    images = generate(pipe, captions, guidance_scale=args.cfg)
    readings = judge(images)
    attrs = [parse_caption(c) for c in captions]
    by_size = collections.defaultdict(list)
    for reading, a in zip(readings, attrs):
        by_size[a.size or "unspecified"].append(reading["shape"][0] == a.shape)
    print(f"generation (28 steps): shape {np.mean([r['shape'][0] == a.shape for r, a in zip(readings, attrs)]):.2f}, "
          f"colour {np.mean([r['color'][0] == a.color for r, a in zip(readings, attrs)]):.2f}; shape by size: "
          + ", ".join(f"{size} {np.mean(hits):.2f} ({len(hits)})" for size, hits in sorted(by_size.items())))


if __name__ == "__main__":
    main()
