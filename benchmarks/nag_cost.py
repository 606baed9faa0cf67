"""What NAG costs on the tiny model: seconds per image of the unguided run (CFG off), NAG with the
negative text as extra tokens of each row (the default on SD3, FLUX.1 and Chroma), NAG with the negative
text as extra rows (the row path every family has), and CFG-style negative prompting (two passes), side by side.
"stock call, negative text appended" is one stock call on [prompt text ; negative text] (no NAG): the token path's
floor, what its extra tokens alone cost. Also the token path forced to compute the image keys' part once for both texts ("image keys shared", by default
from nag_tokens_flux.SHARED_IMAGE_KEYS_FROM image tokens on), forced to two attention calls per NAG layer, and, as an
ablation, with each NAG layer's output left Z⁺ ("Z+ kept": what the combination formula itself costs).

--model flux-toy: a random-weight FLUX.1 (guidance-distilled, 2 double + 4 single blocks, 4 heads × 32) with
--text-tokens T5 tokens; its CFG is true CFG (a second call with the negative prompt).

The conditions run interleaved, one call of --images images each per round; the time of a
condition is the median over --rounds rounds after one warm-up round, divided by the images. Each NAG call
includes its `da.apply` and removal (their cost alone is printed too).

Run:  python benchmarks/nag_cost.py [--model tiny|flux-toy] [--threads 1] [--rounds 5] [--steps 12] [--images 2]
                                    [--size 64] [--text-tokens 32]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import dit_attn as da
from dit_attn.families import family_of
from dit_attn.hooks import nag_tokens, nag_tokens_flux
from dit_attn.processors import state
from dit_attn.loading import call_defaults, load_pipeline

PROMPT, NEGATIVE = "a circle on a white background", "red"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--text-tokens", type=int, default=32, help="T5 tokens of the flux-toy's prompts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flux = args.model == "flux-toy"
    if flux:
        from diffusers.utils import logging

        from dit_attn.toy.configs import build_flux_pipeline

        logging.set_verbosity_error()  # the toy CLIP's 16-token truncation notice on every call

        pipe = build_flux_pipeline(num_layers=2, num_single_layers=4, num_heads=4, head_dim=32)
        defaults = {"max_sequence_length": args.text_tokens, "output_type": "latent"}
    else:
        pipe = load_pipeline(args.model)
        defaults = call_defaults(pipe)
    pipe.set_progress_bar_config(disable=True)
    options = {**defaults, "num_inference_steps": args.steps, "height": args.size, "width": args.size}

    def generate(cfg=None, **extra):
        # FLUX.1 is guidance-distilled: its guidance_scale is an input of the one call, its CFG is true CFG
        guidance = {} if flux else {"guidance_scale": 1.0}
        if cfg is not None:
            guidance = {"true_cfg_scale": cfg} if flux else {"guidance_scale": cfg}
        pipe([PROMPT] * args.images, generator=[torch.Generator().manual_seed(s) for s in range(args.images)],
             **options, **guidance, **extra)

    def nag():
        with da.apply(pipe, da.NAG(NEGATIVE)):
            generate()

    def encode(prompts):
        return family_of(pipe.transformer).encode_prompts(pipe, prompts, options.get("max_sequence_length"))

    def appended_text():
        # NAG's token path without NAG: one stock call on [prompt text ; negative text], both encoded in the call
        (embeds, pooled), (negative, _) = encode([PROMPT] * args.images), encode([NEGATIVE] * args.images)
        rest = {k: v for k, v in options.items() if k != "max_sequence_length"}
        pipe(prompt_embeds=torch.cat([embeds, negative], dim=1), pooled_prompt_embeds=pooled,
             generator=[torch.Generator().manual_seed(s) for s in range(args.images)], **rest,
             **({} if flux else {"guidance_scale": 1.0}))

    def nag_without_combination():
        # an ablation: the token path with each NAG layer's output left Z⁺ (what the combination formula itself costs)
        combination = state.nag_combination
        state.nag_combination = lambda setting, positive, negative: positive
        try:
            nag()
        finally:
            state.nag_combination = combination

    def nag_rows():
        with nag_tokens.row_path():
            nag()

    def nag_forcing(shared_from):
        def run():
            default, nag_tokens_flux.SHARED_IMAGE_KEYS_FROM = nag_tokens_flux.SHARED_IMAGE_KEYS_FROM, shared_from
            try:
                nag()
            finally:
                nag_tokens_flux.SHARED_IMAGE_KEYS_FROM = default
        return run

    conditions = {
        "unguided (CFG off)": generate,
        "stock call, negative text appended": appended_text,
        "NAG, negative text as tokens": nag,
        "NAG, tokens, image keys shared": nag_forcing(0),
        "NAG, tokens, two attention calls": nag_forcing(None),
        "NAG, tokens, Z+ kept (ablation)": nag_without_combination,
        "NAG, negative text as rows": nag_rows,
        f"CFG {args.cfg} with the negative prompt": lambda: generate(args.cfg, negative_prompt=NEGATIVE),
    }
    times = {name: [] for name in conditions}
    for round_ in range(args.rounds + 1):
        for name, run in conditions.items():
            start = time.perf_counter()
            with torch.no_grad():
                run()
            if round_:  # the first round warms up
                times[name].append((time.perf_counter() - start) / args.images)
    shapes = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: shapes.append((k["encoder_hidden_states"].shape[1], k["hidden_states"].shape)), with_kwargs=True)
    with torch.no_grad():
        generate()
    hook.remove()
    text, latents = shapes[0]
    image = latents[1] if flux else (latents[2] // 2) * (latents[3] // 2)  # SD3: 2×2 patches of the latent grid
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, model {args.model}, {args.size}x{args.size} "
          f"({text} text + {image} image tokens), {args.steps} steps, {args.images} images per call, "
          f"median of {args.rounds} rounds")
    edit, start = da.NAG(NEGATIVE), time.perf_counter()
    for _ in range(20):
        with da.apply(pipe, edit):
            pass
    print(f"apply and remove of the NAG edit: {(time.perf_counter() - start) / 20 * 1e3:.2f} ms a call")
    base = statistics.median(times["unguided (CFG off)"])
    print(f"{'condition':<40} {'s/image':>8} {'vs unguided':>12}")
    for name, values in times.items():
        seconds = statistics.median(values)
        print(f"{name:<40} {seconds:8.3f} {seconds / base:11.2f}x")


if __name__ == "__main__":
    main()
