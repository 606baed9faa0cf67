"""`dit-attn maps`: generate an image and write its attention maps as heatmap PNGs plus a JSON index."""
from __future__ import annotations

import os

from .common import TINY, add_model_options, check_call_flags, check_out_dir, check_prompt
from .search import add_call_options, call_settings

INDEX = "maps.json"


def capture_edit(args):
    """The Capture of the flags (checked before the model loads)."""
    from ..capture.options import capture_from_fields

    return capture_from_fields(args.prompt, args.kind, words=args.words, tokens=args.tokens, locations=args.locations,
                               layers=args.layers, heads=args.heads, steps=args.capture_steps)


def cmd_maps(args) -> int:
    check_prompt("the prompt", args.prompt)
    check_call_flags(args)
    check_out_dir("--out", args.out)
    edit = capture_edit(args)

    import torch

    from ..capture import overlay
    from ..families import family_of
    from ..handle import apply
    from ..io import write_json_atomic, write_png_atomic
    from ..limits import check_seed
    from ..loading import call_defaults
    from .common import load

    check_seed(args.seed, "--seed")
    pipe = load(args)
    if family_of(pipe.transformer).makes_videos:
        raise NotImplementedError(f"dit-attn maps draws its maps over one image; {type(pipe).__name__} makes videos: "
                                  "capture them with da.Capture and draw them with da.capture.overlay_frames")
    settings = {k: v for k, v in call_settings(args).items() if v is not None}
    call = {**call_defaults(pipe), **settings}
    if args.max_sequence_length is not None:
        call["max_sequence_length"] = args.max_sequence_length
    with apply(pipe, edit) as handle:
        image = pipe(args.prompt, generator=torch.Generator().manual_seed(args.seed), **call).images[0]
        result = handle.maps
    record = {"prompt": args.prompt, "seed": args.seed, "model": args.model, "call": call,
              "capture": edit.to_dict(), **result.settings()}
    write_png_atomic(image, os.path.join(args.out, "image.png"), record)
    maps = result.maps[0]  # the one conditional row: (layers, heads, tokens, H, W)
    files = []
    for li, layer in enumerate(result.layers):
        per_token = maps[li].mean(dim=0) if not args.per_head else None
        for ti, token in enumerate(result.tokens):
            label = token.replace(",", "-")
            if per_token is not None:
                name = f"L{layer}_{label}.png"
                write_png_atomic(overlay(image, per_token[ti]), os.path.join(args.out, name))
                files.append({"file": name, "layer": layer, "head": "mean", "token": token,
                              "mean_probability": float(per_token[ti].mean())})
                continue
            for hi, head in enumerate(result.heads):
                name = f"L{layer}H{head}_{label}.png"
                write_png_atomic(overlay(image, maps[li, hi, ti]), os.path.join(args.out, name))
                files.append({"file": name, "layer": layer, "head": head, "token": token,
                              "mean_probability": float(maps[li, hi, ti].mean())})
    write_json_atomic(os.path.join(args.out, INDEX), {**record, "image": "image.png", "maps": files})
    print(f"dit-attn maps: {len(files)} maps of {len(result.layers)} layers -> {os.path.join(args.out, INDEX)}")
    return 0


def add_commands(sub) -> None:
    maps = sub.add_parser("maps", help="generate an image and write its attention maps (heatmap PNGs + maps.json)")
    maps.add_argument("prompt", help="the prompt")
    maps.add_argument("--kind", default="cross", choices=("cross", "self", "concept"),
                      help="cross: image attention on words/text tokens; self: chosen image locations over the image; "
                           "concept: ConceptAttention maps of --words (softmax over the concepts)")
    maps.add_argument("--words", default=None,
                      help="comma-separated words of the prompt (default: every word); --kind concept: the concepts")
    maps.add_argument("--tokens", default=None, help="comma-separated text-token indices instead of words")
    maps.add_argument("--locations", default=None, help="--kind self: row,col cells of the token grid, e.g. '4,4;0,7'")
    maps.add_argument("--layers", default=None, help="comma-separated layer indices (default: every layer)")
    maps.add_argument("--heads", default=None, help="comma-separated head indices (default: every head)")
    maps.add_argument("--capture-steps", default=None, help="comma-separated denoising steps to average (default: every step)")
    maps.add_argument("--per-head", action="store_true", help="one PNG per head (default: the mean over the heads)")
    add_call_options(maps)
    maps.add_argument("--seed", type=int, default=0)
    maps.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: the model's call defaults)")
    add_model_options(maps, TINY)
    maps.add_argument("--out", default="maps", help="output folder: image.png, one PNG per map, maps.json")
    maps.set_defaults(func=cmd_maps)
