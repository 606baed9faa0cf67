"""Stage (c): one guided denoising step of random-weight transformers shaped like SD3-medium
(24 layers × 24 heads × 64) and FLUX.1 (19 double + 38 single layers × 24 heads × 128), bf16, at
1024² token counts (4096 image tokens; SD3 with 333 text tokens = 77 CLIP + 256 T5, FLUX with
512 T5 tokens): stock CFG vs HeadGuidance at one layer (2/3 depth, all heads, u = 1, prefix
shared) vs diffusers' StableDiffusion3PAGPipeline on the same layer; FLUX NAG (negative text as tokens: by default,
with the image keys shared by Z⁺ and Z⁻, with two attention calls; as rows) vs the unguided step and true CFG; and
FLUX local attention r = 16 at 2048² (16384 image tokens) vs full attention.

Per-step time from `callback_on_step_end` stamps (after a device synchronize): the gaps
between consecutive steps, the first step left out; configurations interleaved in rounds;
median over all rounds. Text encoders are tiny (the step does not run them); images are not
decoded (`output_type="latent"`). Needs diffusers (see README.md for wheels)."""
from __future__ import annotations

import contextlib
import statistics
import time

import torch

import report

PROMPT, NEGATIVE = "a photo of a red cat on a blue square", "blurry dark"
SD3_SHAPE = dict(num_layers=24, num_heads=24, head_dim=64)
FLUX_SHAPE = dict(num_layers=19, num_single_layers=38, num_heads=24, head_dim=128)
DRY_SD3_SHAPE = dict(num_layers=3, num_heads=2, head_dim=16)
DRY_FLUX_SHAPE = dict(num_layers=1, num_single_layers=2, num_heads=2, head_dim=16)


def build(kind: str, shape: dict, device: str, dtype: torch.dtype):
    """A pipeline with a random-weight transformer of `shape`, made on `device` (a 12B model is
    not worth initialising on a CPU)."""
    from dit_attn.toy.configs import build_flux_pipeline, build_sd3_pipeline

    with torch.device(device):
        pipe = build_sd3_pipeline(qk_norm=None, **shape) if kind == "sd3" else build_flux_pipeline(**shape)
    pipe = pipe.to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels_for(pipe, tokens_side: int) -> int:
    """The pixel size whose latent has tokens_side × tokens_side image tokens (2×2 patches or packing)."""
    return tokens_side * 2 * pipe.vae_scale_factor


def time_steps(pipe, device: str, steps: int, edit=None, within=contextlib.nullcontext, **call) -> list[float]:
    """ms of steps 2..N of one pipeline call (`within`: a context the call runs in)."""
    import dit_attn as da

    stamps = []

    def on_step_end(p, i, t, kwargs):
        report.synchronize(device)
        stamps.append(time.perf_counter())
        return {}

    handle = da.apply(pipe, edit) if edit is not None else contextlib.nullcontext()
    with within(), handle, torch.inference_mode():
        pipe(PROMPT, num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0),
             callback_on_step_end=on_step_end, **call)
    return [1e3 * (b - a) for a, b in zip(stamps, stamps[1:])]


@contextlib.contextmanager
def shared_image_keys_from(tokens):
    """NAG's token path forced to the shared-image-keys merge (0) or to two attention calls (None) on every device."""
    from dit_attn.hooks import nag_tokens_flux

    saved = nag_tokens_flux.SHARED_IMAGE_KEYS_FROM, nag_tokens_flux.SHARED_IMAGE_KEYS_FROM_CUDA
    nag_tokens_flux.SHARED_IMAGE_KEYS_FROM = nag_tokens_flux.SHARED_IMAGE_KEYS_FROM_CUDA = tokens
    try:
        yield
    finally:
        nag_tokens_flux.SHARED_IMAGE_KEYS_FROM, nag_tokens_flux.SHARED_IMAGE_KEYS_FROM_CUDA = saved


def run_group(out: report.Report, section: str, configs: list[tuple], device: str, steps: int, rounds: int,
              baseline: str) -> None:
    """Warm up each (name, pipe, edit, call[, context the call runs in]) once, then time them interleaved; one row
    each."""
    out.section(section, ["config", "ms/step", f"vs {baseline}"])
    timings = {name: [] for name, *_ in configs}
    for name, pipe, edit, call, *within in configs:
        try:
            time_steps(pipe, device, 2, edit, *within, **call)
        except Exception as err:
            out.error(f"{section} {name} (warm-up)", err)
            timings.pop(name)
    for r in range(rounds):
        for name, pipe, edit, call, *within in configs[r % len(configs):] + configs[: r % len(configs)]:
            if name in timings:
                timings[name] += time_steps(pipe, device, steps, edit, *within, **call)
    medians = {name: statistics.median(t) for name, t in timings.items() if t}
    for name, ms in medians.items():
        row = {"config": name, "ms/step": round(ms, 2),
               f"vs {baseline}": round(ms / medians[baseline], 3) if baseline in medians else ""}
        out.add(section, row)
        print(f"  {section}: {row}", flush=True)


def sd3_group(out, device, dtype, dry_run, steps, rounds) -> None:
    from diffusers import StableDiffusion3PAGPipeline

    import dit_attn as da
    from dit_attn.toy.configs import pipeline_components

    shape = DRY_SD3_SHAPE if dry_run else SD3_SHAPE
    pipe = build("sd3", shape, device, dtype)
    layer = 2 * shape["num_layers"] // 3
    pag = StableDiffusion3PAGPipeline(**pipeline_components(pipe), pag_applied_layers=[f"blocks.{layer}"])
    pag.set_progress_bar_config(disable=True)
    side = 8 if dry_run else 64
    px = pixels_for(pipe, side)
    text = 8 if dry_run else 333 - pipe.tokenizer.model_max_length  # zero "T5" tokens after the CLIP ones
    call = dict(height=px, width=px, guidance_scale=4.5, negative_prompt=NEGATIVE, max_sequence_length=text)
    section = f"SD3-medium shape ({shape['num_layers']} × {shape['num_heads']} × {shape['head_dim']}), {side * side} image tokens"
    guided = lambda scope: da.HeadGuidance(heads=[f"L{layer}"], scale=3.0, u=1.0, scope=scope, share_prefix=True)  # noqa: E731
    configs = [
        ("stock CFG 4.5", pipe, None, call),
        (f"HeadGuidance L{layer} image scope, prefix shared", pipe, guided("image"), call),
        (f"HeadGuidance L{layer} joint scope, prefix shared", pipe, guided("joint"), call),
        ("diffusers PAG", pag, None, dict(call, pag_scale=3.0)),
    ]
    run_group(out, section, configs, device, steps, rounds, "diffusers PAG")


def flux_groups(out, device, dtype, dry_run, steps, rounds) -> None:
    import dit_attn as da
    from dit_attn.hooks import nag_tokens

    shape = DRY_FLUX_SHAPE if dry_run else FLUX_SHAPE
    pipe = build("flux", shape, device, dtype)
    layers = shape["num_layers"] + shape["num_single_layers"]
    layer = 2 * layers // 3
    text = 8 if dry_run else 512
    side = 8 if dry_run else 64
    px = pixels_for(pipe, side)
    call = dict(height=px, width=px, guidance_scale=3.5, max_sequence_length=text)
    section = (f"FLUX.1 shape ({shape['num_layers']} + {shape['num_single_layers']} × {shape['num_heads']} × "
               f"{shape['head_dim']}), {side * side} image tokens")
    configs = [
        ("stock (guidance-distilled, 1 row)", pipe, None, call),
        ("stock true CFG 4", pipe, None, dict(call, negative_prompt=NEGATIVE, true_cfg_scale=4.0)),
        (f"HeadGuidance L{layer} joint scope, prefix shared", pipe,
         da.HeadGuidance(heads=[f"L{layer}"], scale=3.0, u=1.0, share_prefix=True), call),
    ]
    run_group(out, section, configs, device, steps, rounds, "stock true CFG 4")

    # NAG's negative prompt without CFG: its text as extra tokens of each row (the default, and forced to the
    # shared-image-keys merge or to two attention calls a layer), its negative rows through the blocks, and true
    # CFG's second pass
    section = f"FLUX.1 shape, NAG, {side * side} image tokens"
    nag = da.NAG(NEGATIVE)
    configs = [
        ("stock (guidance-distilled, 1 row)", pipe, None, call),
        ("NAG, negative text as tokens", pipe, nag, call),
        ("NAG, tokens, image keys shared", pipe, nag, call, lambda: shared_image_keys_from(0)),
        ("NAG, tokens, two attention calls", pipe, nag, call, lambda: shared_image_keys_from(None)),
        ("NAG, negative rows", pipe, nag, call, nag_tokens.row_path),
        ("stock true CFG 4", pipe, None, dict(call, negative_prompt=NEGATIVE, true_cfg_scale=4.0)),
    ]
    run_group(out, section, configs, device, steps, rounds, "stock (guidance-distilled, 1 row)")
    from dit_attn.kernels import lse

    out.note(f"NAG's log-sum-exp op on CUDA: {lse.verdicts() or 'none checked'}")

    side, radius = (8, 3) if dry_run else (128, 16)
    px = pixels_for(pipe, side)
    call = dict(height=px, width=px, guidance_scale=3.5, max_sequence_length=text)
    section = f"FLUX.1 shape, local attention, {side * side} image tokens"
    configs = [("full attention", pipe, None, call),
               (f"LocalAttention r={radius} (every layer)", pipe, da.LocalAttention(radius=radius), call)]
    run_group(out, section, configs, device, steps, rounds, "full attention")


def main() -> None:
    args = report.arguments(__doc__.split("\n")[0])
    device = report.device(args.dry_run)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the prompt-truncation notice, once per call
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    steps, rounds = (3, 1) if args.dry_run else (4, 2)
    out = report.Report(args.out, "steps", "Guided denoising steps", args.dry_run)
    out.note(f"{str(dtype).removeprefix('torch.')}, 1 prompt, {rounds} round(s) × {steps} steps per call, "
             f"{steps - 1} timed steps per call; HeadGuidance / PAG scale 3, u = 1, all heads of the layer")
    for name, group in (("SD3", sd3_group), ("FLUX.1", flux_groups)):
        start = time.perf_counter()
        try:
            group(out, device, dtype, args.dry_run, steps, rounds)
        except Exception as err:
            out.error(name, err)
        print(f"  {name} group: {time.perf_counter() - start:.0f} s", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    from dit_attn.kernels import selfcheck

    out.note(f"self-check verdicts in this process: {selfcheck.verdicts() or 'none (Triton not chosen)'}")


if __name__ == "__main__":
    main()
