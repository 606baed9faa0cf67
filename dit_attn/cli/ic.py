"""`dit-attn ic`: generate an in-context set (canvas + panels PNGs), optionally with reference panels and a LoRA."""
from __future__ import annotations

import argparse
import os

from .common import (TINY, add_model_options, check_call_flags, check_input_file, check_out_dir, check_prompt, check_seeds,
                     finite_float, load, size_argument)


def parse_reference(text: str) -> tuple[int, str]:
    """'0=left.png' → (0, 'left.png')."""
    index, sep, path = text.partition("=")
    if not sep or not index.strip().isdigit() or not path:
        raise argparse.ArgumentTypeError(f"a reference is PANEL=IMAGE (e.g. 0=left.png), got {text!r}")
    return int(index), path


def open_reference(index: int, path: str):
    """A --reference image, read and size-checked before any model loads."""
    from PIL import Image

    from ..limits import check_pixels

    check_input_file("--reference", path)
    try:
        with Image.open(path) as image:
            check_pixels(image.height, image.width)  # from the header, before its pixels are decoded
            return image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"--reference {index}={path}: {err}") from None
    except Exception as err:  # PIL: UnidentifiedImageError, truncated data, decompression bombs
        raise ValueError(f"--reference {index}={path}: not an image this machine can read ({err})") from None


def check_ic_flags(args) -> None:
    """The numbers, files and output folder of `ic`, before a model loads."""
    check_call_flags(args, steps="steps", guidance="cfg")
    check_seeds("--seed", [args.seed])
    if args.caption is not None:
        check_prompt("the caption", args.caption)
    for k, panel in enumerate(args.panels):
        check_prompt(f"--panel {k + 1}", panel)
    if args.lora:
        from ..local_attention import check_lora_file

        if os.path.exists(args.lora):
            check_lora_file(args.lora)
    check_out_dir("--out", args.out)


def cmd_ic(args) -> int:
    from ..ic.captions import caption
    from ..ic.generate import generate_set
    from ..ic.layout import Layout
    from ..io import write_png_atomic
    from ..loading import call_options

    layout = Layout.parse(args.layout)
    if bool(args.caption) == bool(args.panels):
        raise ValueError("give the joint caption as an argument, or one --panel caption a panel (not both)")
    check_ic_flags(args)
    text = args.caption or caption(args.panels, layout, task_tag=args.task_tag, summary=args.summary,
                                   tags=[t.strip() for t in args.tags.split(",")] if args.tags else None)
    references = {index: open_reference(index, path) for index, path in args.references}
    pipe = load(args)
    if args.lora:
        from ..local_attention import check_lora_file

        check_lora_file(args.lora, pipe.transformer)  # shapes against this model, before diffusers loads it
        try:
            pipe.load_lora_weights(args.lora)
        except (ValueError, TypeError, KeyError, RuntimeError, OSError) as err:
            raise ValueError(f"--lora {args.lora!r}: cannot load it into {args.model!r}: {err}") from None
    options = call_options(args.cfg, None, args.max_sequence_length)
    result = generate_set(pipe, text, layout, size=args.size, reference=references or None, mode=args.mode,
                          seed=args.seed, decode=args.decode, num_inference_steps=args.steps, **options)
    settings = {**result.settings, "model": args.model, "lora": args.lora, "steps": args.steps, "cfg": args.cfg,
                "references": {str(k): p for k, p in args.references}}
    os.makedirs(args.out, exist_ok=True)
    write_png_atomic(result.canvas, os.path.join(args.out, "canvas.png"), {**settings, "image": "canvas"})
    for k, panel in enumerate(result.panels):
        write_png_atomic(panel, os.path.join(args.out, f"panel-{k}.png"), {**settings, "image": f"panel-{k}"})
    print(f"dit-attn ic: {result.layout} set {result.canvas.width}x{result.canvas.height}, mode {args.mode}, "
          f"reference panels {sorted(references)} -> {args.out}/canvas.png + {len(result.panels)} panels")
    return 0


def add_commands(sub) -> None:
    """Add `ic` to the `dit-attn` subcommands."""
    ic = sub.add_parser("ic", help="generate an in-context set: one joint caption, a canvas of panels (IC-LoRA)")
    ic.add_argument("caption", nargs="?", default=None, help="the joint caption (or give --panel captions)")
    ic.add_argument("--panel", dest="panels", action="append", default=[], help="one panel's caption (repeat, row-major order)")
    ic.add_argument("--task-tag", default=None, help="task tag of a caption built from --panel, e.g. SET")
    ic.add_argument("--summary", default=None, help="summary after the task tag")
    ic.add_argument("--tags", default=None, help="position tags, comma-separated (default: from the layout)")
    ic.add_argument("--layout", default="1x2", help="ROWSxCOLS, e.g. 1x2, 2x2, 3x1 (default 1x2)")
    ic.add_argument("--size", type=size_argument, default=None,
                    help="canvas WIDTHxHEIGHT in pixels (default: each panel at the model's default size)")
    ic.add_argument("--reference", dest="references", type=parse_reference, action="append", default=[],
                    metavar="PANEL=IMAGE", help="keep panel PANEL (0-based, row-major) as this panel-sized image (repeatable)")
    ic.add_argument("--mode", default="overwrite", choices=["overwrite", "fill"],
                    help="overwrite: reference latents put back every step (SD3/FLUX); fill: a FluxFillPipeline with a mask")
    ic.add_argument("--decode", default="canvas", choices=["canvas", "panels"], help="VAE-decode the whole canvas or each panel")
    ic.add_argument("--lora", default=None, help="a LoRA to load (e.g. from dit-attn train-lora --mode ic)")
    add_model_options(ic, TINY)
    ic.add_argument("--steps", type=int, default=20)
    ic.add_argument("--cfg", type=finite_float, default=None, help="guidance scale (pipeline default if omitted)")
    ic.add_argument("--seed", type=int, default=0)
    ic.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: the model's call defaults)")
    ic.add_argument("--out", default="set", help="directory for canvas.png and panel-K.png (settings in their text chunks)")
    ic.set_defaults(func=cmd_ic)
