"""`dit-attn generate` (batch generation with edits) and `dit-attn heads` (a model's layer/head map)."""
from __future__ import annotations

import os
import sys

from .common import TINY, add_model_options, size_argument, warn_skipped

GUIDANCE_TARGETS = ("identity", "uniform")
GUIDANCE_SCOPES = ("joint", "image")


def load_items(args) -> list:
    from ..workflows.batch import Item, read_prompts

    if args.prompts_file is None:
        if not args.prompts:
            raise ValueError("give one or more prompts, or --prompts FILE")
        return [Item(i, p) for i, p in enumerate(args.prompts)]
    if args.prompts:
        raise ValueError("give prompts either as arguments or with --prompts FILE, not both")
    items, bad = read_prompts(args.prompts_file)
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
    }


def cmd_generate(args) -> int:
    from ..workflows.batch import generate_batch, shard_from_launcher

    num_shards, shard_index = shard_from_launcher(args.num_shards, args.shard_index)
    device = args.device
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one GPU per launched process
    report = None
    try:
        report = generate_batch(load_items(args), run_settings(args), args.out, batch_size=args.batch_size,
                                num_shards=num_shards, shard_index=shard_index, device=device)
    finally:
        if report is not None:
            print(f"dit-attn generate: {report.done} done, {report.skipped} already finished (skipped), "
                  f"{len(report.failed)} failed -> {args.out}")
            for item, reason in report.failed:
                print(f"  failed #{item.index} {item.prompt!r}: {reason}", file=sys.stderr)
    return 1 if report.failed else 0


def cmd_heads(args) -> int:
    from ..handle import layers
    from ..heads import PRESETS, format_layers
    from .common import load

    print(format_layers(layers(load(args))))
    if args.presets:
        print("\npresets:")
        for name, preset in PRESETS.items():
            print(f"  {name:<24} {','.join(preset.heads):<24} {preset.provenance}")
    return 0


def add_guidance_options(parser) -> None:
    """HeadGuidance's settings as options (see `da.HeadGuidance`)."""
    parser.add_argument("--pag-scale", type=float, default=3.0,
                        help="perturbation guidance scale s: HeadGuidance's scale (stored as \"scale\" in the HeadGuidance "
                             "edit of the PNG/manifest settings)")
    parser.add_argument("--u", type=float, default=1.0, help="SoftPAG strength in [0, 1]")
    parser.add_argument("--target", default="identity", choices=GUIDANCE_TARGETS)
    parser.add_argument("--scope", default="joint", choices=GUIDANCE_SCOPES)


def add_commands(sub) -> None:
    gen = sub.add_parser("generate", help="generate images, optionally with head-level perturbation guidance")
    gen.add_argument("prompts", nargs="*", help="one or more prompts (or --prompts FILE)")
    gen.add_argument("--prompts", dest="prompts_file", default=None,
                     help=".txt (a prompt a line), .jsonl (objects with 'prompt' and per-line settings) or .csv (a 'prompt' column)")
    gen.add_argument("--batch-size", type=int, default=1, help="prompts per pipeline call (items with the same settings)")
    gen.add_argument("--num-shards", type=int, default=1, help="split the items into this many shards")
    gen.add_argument("--shard-index", type=int, default=0, help="which shard this process generates (0-based)")
    gen.add_argument("--num-inference-steps", "--steps", dest="num_inference_steps", type=int, default=20,
                     help="denoising steps (--steps: the older name)")
    gen.add_argument("--guidance-scale", "--cfg", dest="guidance_scale", type=float, default=None,
                     help="classifier-free guidance scale (pipeline default if omitted; --cfg: the older name)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed + i")
    gen.add_argument("--size", type=size_argument, default=None,
                     help="N or WIDTHxHEIGHT in pixels (stored as height and width; default: the model's)")
    gen.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: the model's call defaults)")
    gen.add_argument("--heads", default=None, help="heads to guide away from, e.g. 'L1H10,L11H15' or 'L2' or 'sd3:dark'")
    add_guidance_options(gen)
    gen.add_argument("--start", type=float, default=0.0, help="first guided fraction of the steps")
    gen.add_argument("--end", type=float, default=1.0, help="guidance stops at this fraction of the steps")
    gen.add_argument("--local-radius", type=float, default=None,
                     help="CLEAR local attention: image tokens attend within this radius (in tokens) + all text")
    gen.add_argument("--local-downsample", type=int, default=None, help="also attend to pooled keys (factor, e.g. 4)")
    gen.add_argument("--local-weights", default=None, help="safetensors from `dit-attn distill-clear` for this radius")
    add_model_options(gen, TINY)
    gen.add_argument("--out", default="out",
                     help="output directory (PNGs + manifest.jsonl); each PNG's settings rebuild it: "
                          "dit_attn.workflows.batch.regenerate(png)")
    gen.set_defaults(func=cmd_generate)

    heads = sub.add_parser("heads", help="print a model's layer/head map")
    add_model_options(heads, TINY)
    heads.add_argument("--presets", action="store_true", help="also list the named head presets")
    heads.set_defaults(func=cmd_heads)
