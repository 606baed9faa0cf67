"""The `dit-attn` command: `generate` images with head guidance, print a model's `heads`."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

import torch

from .edits import HeadGuidance
from .heads import PRESETS, format_layers
from .loading import DEMO

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_size(text: str) -> tuple[int, int]:
    """'64' → (64, 64); '96x64' → (height 64, width 96) as WIDTHxHEIGHT."""
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"size must be N or WIDTHxHEIGHT (e.g. 64 or 96x64), got {text!r}")
    width = int(match.group(1))
    height = int(match.group(2) or width)
    return height, width


def parse_heads(text: str) -> list:
    """'L1H10,L11H15,sd3:dark' → ['L1H10', 'L11H15', 'sd3:dark']."""
    return [part.strip() for part in text.split(",") if part.strip()]


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def write_png_atomic(image, path: str, settings: dict) -> None:
    """Save a PNG whose text chunk `dit-attn` holds the settings; never leaves a partial file."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("dit-attn", json.dumps(settings, sort_keys=True))
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(suffix=".png.tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def append_manifest(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def guidance_from_args(args) -> HeadGuidance | None:
    if not args.heads:
        return None
    return HeadGuidance(
        heads=parse_heads(args.heads), scale=args.pag_scale, u=args.u, target=args.target, scope=args.scope,
        start=args.start, end=args.end,
    )


def cmd_generate(args) -> int:
    from tqdm.auto import tqdm

    from .apply import apply
    from .loading import load_pipeline

    edit = guidance_from_args(args)  # validate settings before loading a model
    pipe = load_pipeline(args.model, torch_dtype=DTYPES[args.dtype], device=args.device)
    pipe.set_progress_bar_config(disable=True)
    os.makedirs(args.out, exist_ok=True)
    manifest = os.path.join(args.out, "manifest.jsonl")
    call_kwargs = {"num_inference_steps": args.steps}
    if args.cfg is not None:
        call_kwargs["guidance_scale"] = args.cfg
    if args.size is not None:
        call_kwargs["height"], call_kwargs["width"] = args.size
    handle = apply(pipe, edit) if edit is not None else None
    try:
        for index, prompt in enumerate(tqdm(args.prompts, desc="generate", unit="image")):
            seed = args.seed + index
            settings = {
                "prompt": prompt, "model": args.model, "seed": seed, "steps": args.steps, "cfg": args.cfg,
                "size": list(args.size) if args.size else None, "dtype": args.dtype,
                "heads": parse_heads(args.heads) if args.heads else None, "pag_scale": args.pag_scale, "u": args.u,
                "target": args.target, "scope": args.scope, "start": args.start, "end": args.end,
            }
            generator = torch.Generator(device="cpu").manual_seed(seed)
            image = pipe(prompt, generator=generator, **call_kwargs).images[0]
            path = os.path.join(args.out, f"{index:05d}-{slug(prompt)}.png")
            write_png_atomic(image, path, settings)
            append_manifest(manifest, {"file": os.path.basename(path), **settings})
            tqdm.write(path)
    finally:
        if handle is not None:
            handle.remove()
    return 0


def cmd_heads(args) -> int:
    from .apply import layers
    from .loading import load_pipeline

    pipe = load_pipeline(args.model)
    print(format_layers(layers(pipe)))
    if args.presets:
        print("\npresets:")
        for name, preset in PRESETS.items():
            print(f"  {name:<24} {','.join(preset.heads):<24} {preset.provenance}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dit-attn", description="Attention editing and head guidance for diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images, optionally with head-level perturbation guidance")
    gen.add_argument("prompts", nargs="+", help="one or more prompts")
    gen.add_argument("--model", default=DEMO, help=f"local pipeline directory, hub id, or {DEMO!r} (default)")
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (pipeline default if omitted)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed + i")
    gen.add_argument("--size", type=parse_size, default=None, help="N or WIDTHxHEIGHT in pixels")
    gen.add_argument("--heads", default=None, help="heads to guide away from, e.g. 'L1H10,L11H15' or 'L2' or 'sd3:dark'")
    gen.add_argument("--pag-scale", type=float, default=3.0, help="perturbation guidance scale s")
    gen.add_argument("--u", type=float, default=1.0, help="SoftPAG strength in [0, 1]")
    gen.add_argument("--target", default="identity", choices=["identity", "uniform"])
    gen.add_argument("--scope", default="joint", choices=["joint", "image"])
    gen.add_argument("--start", type=float, default=0.0, help="first guided fraction of the steps")
    gen.add_argument("--end", type=float, default=1.0, help="guidance stops at this fraction of the steps")
    gen.add_argument("--dtype", default="float32", choices=list(DTYPES))
    gen.add_argument("--device", default=None, help="e.g. cuda; default: where the pipeline loads")
    gen.add_argument("--out", default="out", help="output directory (PNGs + manifest.jsonl)")
    gen.set_defaults(func=cmd_generate)

    heads = sub.add_parser("heads", help="print a model's layer/head map")
    heads.add_argument("--model", default=DEMO, help=f"local pipeline directory, hub id, or {DEMO!r} (default)")
    heads.add_argument("--presets", action="store_true", help="also list the named head presets")
    heads.set_defaults(func=cmd_heads)
    sub.add_parser("train-tiny", help="train the embedded tiny model from scratch (dit-attn train-tiny --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # optional-backend notices are noise on the command line
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-tiny"]:  # its own parser, one option per training setting
        from .models.train_tiny import main as train_main

        return train_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as err:
        print(f"dit-attn: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
