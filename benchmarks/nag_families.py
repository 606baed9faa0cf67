"""NAG's cost beyond SD3/FLUX.1/Chroma: plain (no guidance), NAG and CFG with the same negative prompt, side by
side in one run, on config-built Z-Image, HunyuanImage 2.1, Bria, LongCat-Image, Ovis-Image, Qwen-Image, FLUX.2
[klein] and HunyuanVideo 1.5 (the negative prompt as extra text tokens of each row; there also NAG on the row path,
for comparison), latents out, best of --repeats runs.

At --size 128 every toy has 1024 image tokens (Qwen-Image's, FLUX.2's and HunyuanImage's at twice the size);
HunyuanVideo 1.5 makes 9 frames at half the size (1280 video tokens at --size 128). A "guider" entry of a condition's
settings is set as the pipeline's guider (HunyuanVideo 1.5 takes its CFG scale from it).

--per-prompt: calls of two prompts, NAG with a negative prompt per prompt ('a blue square', 'a dog'); every family keeps
its token path there.

Run:  python benchmarks/nag_families.py [--threads 1] [--size 128] [--steps 8] [--repeats 3] [--only Z-Image]
                                        [--per-prompt]
"""
from __future__ import annotations

import argparse

import torch

import dit_attn as da
from dit_attn.families import family_of
from dit_attn.hooks import nag_tokens
from timing import best_of

NEGATIVE = "a blue square"


def cases(size: int):
    """(name, pipeline, call settings, plain settings, CFG settings) per family."""
    from dit_attn.toy.bria import build_bria_pipeline
    from dit_attn.toy.flux2 import build_flux2_klein_pipeline
    from dit_attn.toy.hunyuan_image import build_hunyuan_image_pipeline
    from dit_attn.toy.hunyuan_video15 import build_hunyuan_video15_pipeline
    from dit_attn.toy.longcat_image import build_longcat_image_pipeline
    from dit_attn.toy.ovis_image import build_ovis_image_pipeline
    from dit_attn.toy.qwen_image import build_qwen_image_pipeline
    from dit_attn.toy.z_image import build_z_image_pipeline

    z = build_z_image_pipeline(num_layers=4, num_heads=4, head_dim=32)
    yield "Z-Image 4 × 4 heads × 32", z, {}, dict(guidance_scale=0.0), dict(guidance_scale=3.0, negative_prompt=NEGATIVE)
    hy = build_hunyuan_image_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=32, guidance_embeds=True)
    distilled = dict(distilled_guidance_scale=3.25)
    # its toy VAE halves the image tokens of the others' per side too: twice the size
    yield (f"HunyuanImage 2+2 × 4 heads × 32 (distilled, {2 * size}×{2 * size})", hy,
           dict(height=2 * size, width=2 * size), distilled, None)
    bria = build_bria_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=32, text_encoder=True)
    yield "Bria 2+2 × 4 heads × 32", bria, dict(max_sequence_length=16), dict(guidance_scale=1.0), dict(guidance_scale=3.0, negative_prompt=NEGATIVE)
    longcat = build_longcat_image_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=32, text_encoder=True)
    yield ("LongCat-Image 2+2 × 4 heads × 32", longcat, dict(enable_prompt_rewrite=False), dict(guidance_scale=1.0),
           dict(guidance_scale=3.0, negative_prompt=NEGATIVE))
    ovis = build_ovis_image_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=32, text_encoder=True)
    yield "Ovis-Image 2+2 × 4 heads × 32", ovis, dict(max_sequence_length=16), dict(guidance_scale=1.0), dict(guidance_scale=3.0, negative_prompt=NEGATIVE)
    klein = build_flux2_klein_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=32)
    negative, _ = klein.encode_prompt(NEGATIVE, max_sequence_length=32)  # its call takes the negative as embeddings
    qwen = build_qwen_image_pipeline(num_layers=4, num_heads=4, head_dim=32)
    # the toy VAEs of Qwen-Image and FLUX.2 halve the image tokens of the others' per side: twice the size
    yield (f"Qwen-Image 4 × 4 heads × 32 ({2 * size}×{2 * size})", qwen,
           dict(max_sequence_length=16, height=2 * size, width=2 * size), dict(true_cfg_scale=1.0),
           dict(true_cfg_scale=3.0, negative_prompt=NEGATIVE))
    yield (f"FLUX.2 [klein] 2+2 × 4 heads × 32 ({2 * size}×{2 * size})", klein,
           dict(max_sequence_length=32, height=2 * size, width=2 * size), dict(guidance_scale=1.0),
           dict(guidance_scale=3.0, negative_prompt_embeds=negative))
    video = build_hunyuan_video15_pipeline(num_layers=4, num_heads=4, head_dim=32, guidance_scale=1.0)
    yield (f"HunyuanVideo 1.5 4 × 4 heads × 32 (9 × {size // 2}×{size // 2})", video,
           dict(num_frames=9, height=size // 2, width=size // 2), dict(guider=video.guider.new(guidance_scale=1.0)),
           dict(guider=video.guider.new(guidance_scale=3.0), negative_prompt=NEGATIVE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per condition")
    parser.add_argument("--only", default="", help="the models whose name contains this text (default: all)")
    parser.add_argument("--per-prompt", action="store_true", help="two prompts, a negative prompt per prompt")
    args = parser.parse_args()
    prompt, nag_negative = "a red circle", NEGATIVE
    if args.per_prompt:
        prompt, nag_negative = ["a red circle", "a cat"], [NEGATIVE, "a dog"]
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {args.threads}; {args.size}×{args.size}, {args.steps} steps, "
          f"prompt {prompt!r}, NAG's negative prompt {nag_negative!r} (CFG's 'a blue square')")
    print("| model | plain s | NAG s (× plain) | NAG as rows s (× plain) | CFG s (× plain) |\n|---|---|---|---|---|")
    for name, pipe, common, plain_kwargs, cfg_kwargs in cases(args.size):
        if args.only not in name:
            continue
        pipe.set_progress_bar_config(disable=True)

        def generate(guider=None, **kwargs):
            if guider is not None:
                pipe.guider = guider
            size = dict(height=args.size, width=args.size)
            pipe(prompt=prompt, num_inference_steps=args.steps, output_type="latent",
                 generator=torch.Generator().manual_seed(0), **{**size, **common}, **kwargs)

        plain = best_of(lambda: generate(**plain_kwargs), args.repeats)
        with da.apply(pipe, da.NAG(nag_negative)):
            nag = best_of(lambda: generate(**plain_kwargs), args.repeats)
        rows = "(its path)"
        if family_of(pipe.transformer).name in nag_tokens.TOKEN_FAMILIES:
            with nag_tokens.row_path(), da.apply(pipe, da.NAG(nag_negative)):
                seconds = best_of(lambda: generate(**plain_kwargs), args.repeats)
            rows = f"{seconds:.3f} ({seconds / plain:.2f}×)"
        cfg = "—"
        if cfg_kwargs is not None and args.per_prompt and isinstance(cfg_kwargs.get("negative_prompt"), str):
            cfg_kwargs = {**cfg_kwargs, "negative_prompt": [cfg_kwargs["negative_prompt"]] * len(prompt)}
        if cfg_kwargs is not None:
            seconds = best_of(lambda: generate(**cfg_kwargs), args.repeats)
            cfg = f"{seconds:.3f} ({seconds / plain:.2f}×)"
        print(f"| {name} | {plain:.3f} | {nag:.3f} ({nag / plain:.2f}×) | {rows} | {cfg} |")


if __name__ == "__main__":
    main()
