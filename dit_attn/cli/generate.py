"""`dit-attn generate` (batch generation with edits) and `dit-attn heads` (a model's layer/head map)."""
from __future__ import annotations

import os
import sys

from .common import (TINY, add_model_options, check_call_flags, check_input_file, check_out_dir, check_prompt,
                     finite_float, radius_argument, size_argument, warn_skipped)

GUIDANCE_TARGETS = ("identity", "uniform")
GUIDANCE_SCOPES = ("joint", "image")


def load_items(args) -> list:
    from ..workflows.batch import Item, read_prompts

    if args.prompts_file is None:
        if not args.prompts:
            raise ValueError("give one or more prompts, or --prompts FILE")
        for i, prompt in enumerate(args.prompts):
            check_prompt(f"prompt {i + 1}" if len(args.prompts) > 1 else "the prompt", prompt)
        return [Item(i, p.strip()) for i, p in enumerate(args.prompts)]
    if args.prompts:
        raise ValueError("give prompts either as arguments or with --prompts FILE, not both")
    items, bad = read_prompts(check_input_file("--prompts", args.prompts_file))
    warn_skipped(args.prompts_file, bad)
    return items


def run_settings(args) -> dict:
    """The options of the run that each item starts from (see `workflows.batch.item_settings`): the
    keys of `workflows.batch.SETTING_TYPES` (one a flag: --num-inference-steps is num_inference_steps)
    plus model and dtype. --size (WIDTHxHEIGHT) arrives parsed as (height, width)."""
    height, width = args.size or (None, None)
    return {
        "model": args.model, "seed": args.seed, "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale, "height": height, "width": width, "dtype": args.dtype,
        "max_sequence_length": args.max_sequence_length, "heads": args.heads, "pag_scale": args.pag_scale, "u": args.u,
        "target": args.target, "scope": args.scope, "start": args.start, "end": args.end, "local_radius": args.local_radius,
        "local_downsample": args.local_downsample, "local_weights": args.local_weights,
        "nag_negative": args.nag_negative, "nag_scale": args.nag_scale, "nag_tau": args.nag_tau, "nag_alpha": args.nag_alpha,
        "num_frames": args.num_frames, "fps": args.fps,
    }


def check_generate(args) -> None:
    """The flags of `generate` against the limits, before the prompts are read or a model loads."""
    from ..limits import check_fps, check_frames, check_seed, whole_number

    check_call_flags(args)  # the guidance and local options are finite (finite_float); their edits check the rest
    check_seed(args.seed, "--seed")
    if args.num_frames is not None:
        check_frames(args.num_frames, "--num-frames")
    if args.fps is not None:
        check_fps(args.fps, "--fps")
    whole_number("--batch-size", args.batch_size, 1)
    if args.local_weights is not None:
        from ..local_attention import check_weights_file

        check_weights_file(check_input_file("--local-weights", args.local_weights), "--local-weights")
    check_out_dir("--out", args.out)


def report_lines(report, limit: int = 10) -> None:
    for item, reason in report.redone[:limit]:
        print(f"  redone #{item.index} {item.prompt!r}: {reason}", file=sys.stderr)
    if len(report.redone) > limit:
        print(f"  ... and {len(report.redone) - limit} more redone", file=sys.stderr)
    for item, reason in report.failed:
        print(f"  failed #{item.index} {item.prompt!r}: {reason}", file=sys.stderr)


def cmd_generate(args) -> int:
    from ..limits import check_device
    from ..workflows.batch import generate_batch, shard_from_launcher

    check_generate(args)
    num_shards, shard_index = shard_from_launcher(args.num_shards, args.shard_index)
    device = args.device
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one GPU per launched process
        check_device(device)
    report = None
    try:
        report = generate_batch(load_items(args), run_settings(args), args.out, batch_size=args.batch_size,
                                num_shards=num_shards, shard_index=shard_index, device=device,
                                overwrite=not args.no_overwrite, video_format=args.video_format)
    finally:
        if report is not None:
            redone = f" ({len(report.redone)} of them redone)" if report.redone else ""
            print(f"dit-attn generate: {report.done} done{redone}, {report.skipped} already finished (skipped), "
                  f"{len(report.failed)} failed -> {args.out}")
            report_lines(report)
    return 1 if report.failed else 0


def cmd_heads(args) -> int:
    from ..handle import experts, layers
    from ..heads import EXPERTS, PRESETS, format_layers
    from .common import load

    pipe = load(args)
    models = experts(pipe)
    if "" in models:
        print(format_layers(layers(pipe)))
    for n, name in enumerate(name for name in models if name):
        if n:
            print()
        print(f"{name} ({EXPERTS[name]}; address its heads as {name}:L<layer>H<head>):")
        print(format_layers(layers(pipe, expert=name)))
    if args.presets:
        print("\npresets:")
        for name, preset in PRESETS.items():
            print(f"  {name:<24} {','.join(preset.heads):<24} {preset.provenance}")
    return 0


def add_guidance_options(parser) -> None:
    """HeadGuidance's settings as options (see `da.HeadGuidance`)."""
    parser.add_argument("--pag-scale", type=finite_float, default=3.0,
                        help="perturbation guidance scale s: HeadGuidance's scale (stored as \"scale\" in the HeadGuidance "
                             "edit of the PNG/manifest settings)")
    parser.add_argument("--u", type=finite_float, default=1.0, help="SoftPAG strength in [0, 1]")
    parser.add_argument("--target", default="identity", choices=GUIDANCE_TARGETS)
    parser.add_argument("--scope", default="joint", choices=GUIDANCE_SCOPES)


def add_commands(sub) -> None:
    gen = sub.add_parser("generate", help="generate images (videos on a video model), optionally with head-level "
                                          "perturbation guidance")
    gen.add_argument("prompts", nargs="*", help="one or more prompts (or --prompts FILE)")
    gen.add_argument("--prompts", dest="prompts_file", default=None,
                     help=".txt (a prompt a line), .jsonl (objects with 'prompt' and per-line settings) or .csv (a 'prompt' column)")
    gen.add_argument("--batch-size", type=int, default=1, help="prompts per pipeline call (items with the same settings)")
    gen.add_argument("--num-shards", type=int, default=1, help="split the items into this many shards")
    gen.add_argument("--shard-index", type=int, default=0, help="which shard this process generates (0-based)")
    gen.add_argument("--num-inference-steps", "--steps", dest="num_inference_steps", type=int, default=20,
                     help="denoising steps (--steps: the older name)")
    gen.add_argument("--guidance-scale", "--cfg", dest="guidance_scale", type=finite_float, default=None,
                     help="classifier-free guidance scale (pipeline default if omitted; --cfg: the older name)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed + i")
    gen.add_argument("--size", type=size_argument, default=None,
                     help="N or WIDTHxHEIGHT in pixels (stored as height and width; default: the model's)")
    gen.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: the model's call defaults)")
    gen.add_argument("--heads", default=None, help="heads to guide away from, e.g. 'L1H10,L11H15' or 'L2' or 'sd3:dark'")
    add_guidance_options(gen)
    gen.add_argument("--start", type=finite_float, default=0.0, help="first guided fraction of the steps")
    gen.add_argument("--end", type=finite_float, default=1.0, help="guidance stops at this fraction of the steps")
    gen.add_argument("--local-radius", type=radius_argument, default=None,
                     help="CLEAR local attention: image tokens attend within this radius (in tokens) + all text; "
                          "on video models FRAMES,HEIGHT,WIDTH radii (e.g. 1,4,4)")
    gen.add_argument("--local-downsample", type=int, default=None, help="also attend to pooled keys (factor, e.g. 4)")
    gen.add_argument("--local-weights", default=None, help="safetensors from `dit-attn distill-clear` for this radius")
    gen.add_argument("--nag-negative", default=None,
                     help="Normalized Attention Guidance away from this negative prompt (da.NAG; works with CFG off)")
    gen.add_argument("--nag-scale", type=finite_float, default=None, help="NAG scale (default 5.0; 1: no guidance)")
    gen.add_argument("--nag-tau", type=finite_float, default=None, help="NAG normalization threshold (default 2.5)")
    gen.add_argument("--nag-alpha", type=finite_float, default=None, help="NAG blending in [0, 1] (default: the model's, 0.125 on SD3, 0.25 elsewhere)")
    gen.add_argument("--num-frames", "--frames", dest="num_frames", type=int, default=None,
                     help="video models: frames per video (Wan: 4k + 1; default: the model's)")
    gen.add_argument("--fps", type=finite_float, default=None, help="video models: frames per second of the file (default 16)")
    gen.add_argument("--video-format", default=None, choices=("mp4", "gif", "webp"),
                     help="video models: mp4 (needs the 'video' extra, imageio-ffmpeg), gif or lossless webp "
                          "(default: mp4 where it can be written, else gif)")
    add_model_options(gen, TINY)
    gen.add_argument("--out", default="out",
                     help="output directory (PNGs, or videos each with a <video>.json sidecar, + manifest.jsonl); "
                          "each file's settings rebuild it: dit_attn.workflows.batch.regenerate(path)")
    gen.add_argument("--no-overwrite", action="store_true",
                     help="stop (before loading the model) if an item's PNG or manifest line in --out was made with "
                          "other settings, instead of generating it again; missing or damaged PNGs are still redone")
    gen.set_defaults(func=cmd_generate)

    heads = sub.add_parser("heads", help="print a model's layer/head map")
    add_model_options(heads, TINY)
    heads.add_argument("--presets", action="store_true", help="also list the named head presets")
    heads.set_defaults(func=cmd_heads)
