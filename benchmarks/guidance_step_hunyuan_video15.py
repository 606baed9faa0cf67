"""Per-step cost of HeadGuidance on a HunyuanVideo 1.5-shaped model, against the stock CFG step and diffusers'
own PAG guider.

Model: a random-weight HunyuanVideo15Transformer3DModel built from a config (no downloads), scaled to CPU:
4 double-stream blocks × 4 heads × 64 (hidden 256, MLP ratio 2, rotary axes 16 + 16 + 32); 9 frames of
32×32 px → 5 latent frames of 8×8 = 320 video tokens, and 12 Qwen + 8 ByT5 + 4 image-context tokens per row.
HunyuanVideo15Pipeline with a guider object, CFG scale 4, batch 1.

Configurations, interleaved in rounds with the order rotated every round: the stock CFG step (2 one-row
calls), HeadGuidance on every head of layer 2 (u=1, joint scope; the conditional call widened to 2 rows),
and diffusers' PerturbedAttentionGuidance on block 2 (a third one-row call; 0.42.1's guider hook needs the
stock processor in its registry, registered here). Each step is stamped in `scheduler.step`; step 0 (where
diffusers' PAG does not perturb) falls outside every interval. Reported: the median interval, the ratio to
the stock step as the median over rounds of (this config / stock in the same round), "ideal" (transformer
rows a step / stock's), and the largest difference of the final latents to diffusers' PAG guider (ours
started at step 1 as PAG is).

Run:  python benchmarks/guidance_step_hunyuan_video15.py [--threads 1] [--rounds 5] [--steps 6]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

LAYERS, HEADS, HEAD_DIM, LAYER = 4, 4, 64, 2
RUN = dict(num_frames=9, height=32, width=32)
CFG, SCALE = 4.0, 2.0


def register_stock_processor_for_diffusers_guiders() -> None:
    from diffusers.hooks._helpers import AttentionProcessorMetadata, AttentionProcessorRegistry
    from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

    def skipped(attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        return hidden_states, encoder_hidden_states

    AttentionProcessorRegistry.register(HunyuanVideo15AttnProcessor2_0,
                                        AttentionProcessorMetadata(skip_processor_output_fn=skipped))


def run(pipe, guider, edit, steps: int) -> tuple[list[float], torch.Tensor]:
    """Wall seconds of steps 1..N-1 and the final latents."""
    import dit_attn as da

    stamps = []
    original = pipe.scheduler.step

    def step(*args, **kwargs):
        out = original(*args, **kwargs)
        stamps.append(time.perf_counter())
        return out

    pipe.guider = guider
    pipe.scheduler.step = step  # set before apply, so HeadGuidance's term is in what it times
    try:
        with da.apply(pipe, edit) if edit is not None else contextlib.nullcontext(), torch.inference_mode():
            latents = pipe(prompt="a red circle", num_inference_steps=steps, output_type="latent",
                           generator=torch.Generator().manual_seed(0), **RUN).frames
    finally:
        del pipe.scheduler.step
    return [b - a for a, b in zip(stamps, stamps[1:])], latents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    if args.threads < 1 or args.rounds < 1 or args.steps < 2:
        raise SystemExit("--threads and --rounds must be >= 1, --steps >= 2")
    torch.set_num_threads(args.threads)

    from diffusers import ClassifierFreeGuidance, PerturbedAttentionGuidance

    import dit_attn as da
    from dit_attn.toy.hunyuan_video15 import build_hunyuan_video15_pipeline

    register_stock_processor_for_diffusers_guiders()
    pipe = build_hunyuan_video15_pipeline(num_layers=LAYERS, num_heads=HEADS, head_dim=HEAD_DIM)
    pipe.set_progress_bar_config(disable=True)
    pag = dict(guidance_scale=CFG, perturbed_guidance_scale=SCALE, perturbed_guidance_start=0.0,
               perturbed_guidance_stop=1.0, perturbed_guidance_layers=[LAYER])
    configs = {  # name: (guider factory, edit, transformer rows a step)
        "stock CFG": (lambda: ClassifierFreeGuidance(guidance_scale=CFG), None, 2),
        f"ours L{LAYER} (CFG guider)": (lambda: ClassifierFreeGuidance(guidance_scale=CFG),
                                        da.HeadGuidance(heads=[f"L{LAYER}"], scale=SCALE, start=0.5 / args.steps), 3),
        f"diffusers PAG guider, block {LAYER}": (lambda: PerturbedAttentionGuidance(**pag), None, 3),
    }
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    print(f"model: {LAYERS} double blocks, {HEADS} heads x {HEAD_DIM}; 320 video + 24 context tokens a row; "
          f"{args.steps} steps x {args.rounds} rounds")
    names = list(configs)
    latents = {}
    for name in names:  # warm-up, and the final latents
        latents[name] = run(pipe, configs[name][0](), configs[name][1], args.steps)[1]
    intervals = {name: [] for name in names}
    per_round = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            dt = run(pipe, configs[name][0](), configs[name][1], args.steps)[0]
            intervals[name] += dt
            per_round[name].append(statistics.median(dt))
        print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    reference = latents[names[2]]
    print("| config | ms/step | ratio vs stock | ideal (rows) | max abs diff of final latents to diffusers' PAG |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        ratio = statistics.median(a / b for a, b in zip(per_round[name], per_round[names[0]]))
        diff = (latents[name] - reference).abs().max().item()
        print(f"| {name} | {1e3 * statistics.median(intervals[name]):.2f} | {ratio:.3f} | "
              f"{configs[name][2] / 2:.3f} | {diff:.2e} |")


if __name__ == "__main__":
    main()
