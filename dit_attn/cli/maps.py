"""`dit-attn maps`: generate an image and write its attention maps as heatmap PNGs plus a JSON index."""
from __future__ import annotations

import os

from .common import TINY, add_model_options, check_call_flags, check_out_dir, check_prompt
from .search import add_call_options, call_settings

INDEX = "maps.json"


def _indices(option: str, text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated indices, e.g. 0,3,5; got {text!r}") from None
    if not values:
        raise ValueError(f"{option} is empty; give comma-separated indices, e.g. 0,3,5")
    return values


def _locations(text: str) -> list[tuple[int, int]]:
    """'4,4;0,7' → [(4, 4), (0, 7)]: (row, col) cells of the token grid."""
    cells = []
    for part in (p for p in text.replace(" ", "").split(";") if p):
        try:
            row, col = (int(v) for v in part.split(","))
        except ValueError:
            raise ValueError(f"--locations takes row,col cells separated by ';', e.g. '4,4;0,7'; got {text!r}") from None
        cells.append((row, col))
    if not cells:
        raise ValueError("--locations is empty; give row,col cells separated by ';', e.g. '4,4;0,7'")
    return cells


def capture_edit(args):
    """The Capture of the flags (checked before the model loads)."""
    from ..capture.words import check_words_in_prompt, prompt_words
    from ..edits import Capture

    layers, heads, steps = _indices("--layers", args.layers), _indices("--heads", args.heads), _indices("--capture-steps", args.capture_steps)
    if args.kind == "self":
        if args.locations is None:
            raise ValueError("--kind self needs --locations, e.g. '4,4;0,7' (row,col cells of the token grid)")
        tokens = _locations(args.locations)
    elif args.kind == "concept":
        if args.words is None:
            raise ValueError("--kind concept needs --words: the concept words (they need not be in the prompt), e.g. cat,sky")
        tokens = [w.strip() for w in args.words.split(",") if w.strip()]
    elif args.tokens is not None:
        tokens = _indices("--tokens", args.tokens)
    else:
        tokens = [w.strip() for w in (args.words or ",".join(prompt_words(args.prompt))).split(",") if w.strip()]
        check_words_in_prompt(args.prompt, tokens)
    return Capture(layers=layers, heads=heads, tokens=tokens, kind=args.kind, steps=steps)


def cmd_maps(args) -> int:
    check_prompt("the prompt", args.prompt)
    check_call_flags(args)
    check_out_dir("--out", args.out)
    edit = capture_edit(args)

    import torch

    from ..capture import overlay
    from ..handle import apply
    from ..io import write_json_atomic, write_png_atomic
    from ..limits import check_seed
    from ..loading import call_defaults
    from .common import load

    check_seed(args.seed, "--seed")
    pipe = load(args)
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
