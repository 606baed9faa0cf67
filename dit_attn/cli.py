"""The `dit-attn` command: `generate` images with head guidance, print a model's `heads`, serve the web `app`."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

import torch

from .edits import HeadGuidance, LocalAttention
from .heads import PRESETS, format_layers
from .loading import TINY, call_defaults, call_options

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class SizeError(ValueError, argparse.ArgumentTypeError):
    pass


def parse_size(text: str) -> tuple[int, int]:
    """'64' → (64, 64); '96x64' → (height 64, width 96) as WIDTHxHEIGHT."""
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip())
    if match is None:
        raise SizeError(f"size must be N or WIDTHxHEIGHT (e.g. 64 or 96x64), got {text!r}")
    width = int(match.group(1))
    height = int(match.group(2) or width)
    return height, width


def parse_heads(text: str) -> list:
    """'L1H10,L11H15,sd3:dark' → ['L1H10', 'L11H15', 'sd3:dark']."""
    return [part.strip() for part in text.split(",") if part.strip()]


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def item_file(item) -> str:
    """The PNG name of an item: its index fixes the order, the slug makes it readable."""
    return f"{item.index:05d}-{slug(item.prompt)}.png"


def write_png_atomic(image, path: str, settings: dict, tmp_prefix: str = ".partial-") -> None:
    """Save a PNG whose text chunk `dit-attn` holds the settings; never leaves a partial file."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("dit-attn", json.dumps(settings, sort_keys=True))
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix, suffix=".png.tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def item_settings(args, item) -> dict:
    """The full settings of one item: command-line values, then the item's own overrides."""
    settings = {
        "prompt": item.prompt, "model": args.model, "seed": args.seed + item.index, "steps": args.steps,
        "cfg": args.cfg, "size": args.size, "dtype": args.dtype, "heads": args.heads, "pag_scale": args.pag_scale,
        "u": args.u, "target": args.target, "scope": args.scope, "start": args.start, "end": args.end,
        "local_radius": args.local_radius, "local_downsample": args.local_downsample, "local_weights": args.local_weights,
    }
    settings.update(item.overrides)
    if isinstance(settings["size"], str):
        settings["size"] = parse_size(settings["size"])
    height, width = settings.pop("size") or (None, None)
    settings["width"], settings["height"] = width, height
    settings["heads"] = parse_heads(settings["heads"]) if isinstance(settings["heads"], str) else settings["heads"]
    return settings


def edits_for(settings: dict) -> tuple:
    """The edits one item asks for: head guidance and/or CLEAR local attention."""
    edits = []
    if settings["heads"]:
        edits.append(HeadGuidance(
            heads=settings["heads"], scale=settings["pag_scale"], u=settings["u"], target=settings["target"],
            scope=settings["scope"], start=settings["start"], end=settings["end"],
        ))
    radius, downsample, weights = (settings.get(k) for k in ("local_radius", "local_downsample", "local_weights"))
    if radius is not None:
        edits.append(LocalAttention(radius, downsample=downsample, weights=weights))
    elif downsample is not None or weights is not None:
        raise ValueError("--local-downsample and --local-weights need --local-radius")
    return tuple(edits)


def pipeline_kwargs(settings: dict) -> dict:
    size = (settings["height"], settings["width"]) if settings["height"] else None
    return {"num_inference_steps": settings["steps"], **call_options(settings["cfg"], size)}


def load_items(args) -> list:
    from .pipelines.batch import Item, read_prompts

    if args.prompts_file is None:
        if not args.prompts:
            raise ValueError("give one or more prompts, or --prompts FILE")
        return [Item(i, p) for i, p in enumerate(args.prompts)]
    if args.prompts:
        raise ValueError("give prompts either as arguments or with --prompts FILE, not both")
    items, bad = read_prompts(args.prompts_file)
    for line in bad:
        print(f"dit-attn: {args.prompts_file}:{line.line}: skipped: {line.reason}", file=sys.stderr)
    return items


def batches(ready: list, size: int) -> list[list]:
    """Consecutive items whose settings differ only in prompt and seed, at most `size` a batch."""
    if size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {size}")
    groups: list[list] = []
    last_key = None
    for entry in ready:
        key = {k: v for k, v in entry[1].items() if k not in ("prompt", "seed")}
        if groups and len(groups[-1]) < size and key == last_key:
            groups[-1].append(entry)
        else:
            groups.append([entry])
        last_key = key
    return groups


def shard_from_launcher(args) -> None:
    """Under `accelerate launch --num_processes N` (or torchrun), each process takes its own shard.

    Read from the launcher's RANK / WORLD_SIZE: no process group is needed to split work,
    and accelerate's state reports a single process on a CPU-only machine.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.num_shards == 1 and world > 1:
        args.num_shards, args.shard_index = world, int(os.environ.get("RANK", "0"))


def cmd_generate(args) -> int:
    from tqdm.auto import tqdm

    from .apply import apply
    from .loading import load_pipeline
    from .pipelines.batch import Item, Manifest, shard

    shard_from_launcher(args)
    items = shard(load_items(args), args.num_shards, args.shard_index)
    command_line_edits = edits_for(item_settings(args, Item(0, "")))  # bad settings fail before loading a model
    os.makedirs(args.out, exist_ok=True)
    tmp_prefix = f".partial-{args.shard_index}-of-{args.num_shards}-"
    for name in os.listdir(args.out):  # left by a killed run of this shard
        if name.startswith(tmp_prefix) and name.endswith(".png.tmp"):
            os.unlink(os.path.join(args.out, name))
    manifest = Manifest(args.out, args.num_shards, args.shard_index)
    finished = manifest.finished()
    todo = [item for item in items if item_file(item) not in finished]
    skipped, failed, done = len(items) - len(todo), [], 0
    device = args.device
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one GPU per launched process
    pipe = load_pipeline(args.model, torch_dtype=DTYPES[args.dtype], device=device) if todo else None
    if pipe is not None:
        pipe.set_progress_bar_config(disable=True)
        if command_line_edits:
            apply(pipe, *command_line_edits).remove()  # heads or layers outside the model fail here, once
    ready = []
    for item in todo:
        try:
            settings = item_settings(args, item)
            ready.append((item, settings, edits_for(settings)))
        except (ValueError, TypeError) as err:
            failed.append((item, str(err)))
    handle, handle_edits = None, ()
    progress = tqdm(total=len(ready), desc="generate", unit="image")
    try:
        for group in batches(ready, args.batch_size):
            edits, settings = group[0][2], group[0][1]
            try:
                if edits != handle_edits:
                    if handle is not None:
                        handle.remove()
                    handle, handle_edits = None, ()  # stays so if apply fails
                    if edits:
                        handle = apply(pipe, *edits)
                    handle_edits = edits
                generators = [torch.Generator(device="cpu").manual_seed(s["seed"]) for _, s, _ in group]
                images = pipe([item.prompt for item, _, _ in group], generator=generators, **call_defaults(pipe),
                              **pipeline_kwargs(settings)).images
            except (ValueError, TypeError, RuntimeError) as err:  # e.g. out of memory at one size: go on
                failed.extend((item, f"{type(err).__name__}: {err}") for item, _, _ in group)
                progress.update(len(group))
                continue
            for (item, own_settings, _), image in zip(group, images):
                name = item_file(item)
                write_png_atomic(image, os.path.join(args.out, name), own_settings, tmp_prefix)
                manifest.append({"file": name, **own_settings})
                done += 1
            progress.update(len(group))
    finally:
        progress.close()
        if handle is not None:
            handle.remove()
        print(f"dit-attn generate: {done} done, {skipped} already finished (skipped), {len(failed)} failed -> {args.out}")
        for item, reason in failed:
            print(f"  failed #{item.index} {item.prompt!r}: {reason}", file=sys.stderr)
    return 1 if failed else 0


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


def search_inputs(args):
    """(objective, prompts, pipeline) of `hunt`/`atlas`; a missing objective model fails before the pipeline loads."""
    from .guidance.objectives import get_objective
    from .loading import load_pipeline
    from .pipelines.batch import read_prompts

    objective = get_objective(args.objective)
    items, bad = read_prompts(args.prompts_file)
    for line in bad:
        print(f"dit-attn: {args.prompts_file}:{line.line}: skipped: {line.reason}", file=sys.stderr)
    pipe = load_pipeline(args.model, torch_dtype=DTYPES[args.dtype], device=args.device)
    pipe.set_progress_bar_config(disable=True)
    return objective, [item.prompt for item in items], pipe


def cmd_atlas(args) -> int:
    from .guidance.atlas import atlas, render_html, render_png

    objective, prompts, pipe = search_inputs(args)
    result = atlas(pipe, objective, prompts, args.seeds, u=args.u, scale=args.pag_scale, steps=args.steps, cfg=args.cfg,
                   size=args.size, batch_size=args.batch_size, target=args.target, scope=args.scope,
                   max_sequence_length=args.max_sequence_length,
                   checkpoint=args.out + ".checkpoint.json")
    result.settings["objective"] = args.objective
    result.save(args.out + ".json")
    render_png(result, args.out + ".png")
    render_html(result, args.out + ".html")
    print(f"dit-attn atlas: {len(result.scores)} heads -> {args.out}.png, {args.out}.html, {args.out}.json")
    return 0


def cmd_hunt(args) -> int:
    from .guidance.search import hunt

    objective, prompts, pipe = search_inputs(args)
    result = hunt(
        pipe, objective, prompts, args.seeds, k=args.k, rounds=args.rounds, u=args.u,
        scale=args.pag_scale, steps=args.steps, cfg=args.cfg, size=args.size, candidates=parse_heads(args.candidates)
        if args.candidates else None, checkpoint=args.checkpoint or args.out + ".checkpoint", batch_size=args.batch_size,
        target=args.target, scope=args.scope,
        max_sequence_length=args.max_sequence_length, min_z=args.min_z, confirm_seeds=args.confirm_seeds,
        confirm_top=args.confirm_top, confirm_together=args.confirm_together,
    )
    result.settings["objective"] = args.objective
    if int(os.environ.get("RANK", "0")) == 0:
        result.save(args.out)
        print(f"dit-attn hunt: selected {','.join(result.selected)} -> {args.out}")
    return 0


def cmd_app(args) -> int:
    try:
        from .app import ModelRegistry, serve
    except ImportError as err:
        raise ValueError(f"the web app needs gradio: pip install -e \".[app]\" ({err})") from err

    registry = ModelRegistry(args.model_dirs, device=args.device, torch_dtype=DTYPES[args.dtype])
    serve(registry, host=args.host, port=args.port, concurrency=args.concurrency, max_queue=args.max_queue)
    return 0


def add_search_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `hunt` and `atlas`: model, objective, prompts and the guidance used to score heads."""
    parser.add_argument("--model", default=TINY, help="local pipeline directory, hub id, or an embedded model: 'tiny' (default), 'demo'")
    parser.add_argument("--objective", required=True, help="judge, judge:soft, color:<name>, clip-score[:model], pickscore[:model], aesthetic:<dir>")
    parser.add_argument("--prompts", dest="prompts_file", required=True, help="prompt file: .txt, .jsonl or .csv")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="each prompt is generated with each seed")
    parser.add_argument("--u", type=float, default=1.0, help="SoftPAG strength while scoring")
    parser.add_argument("--pag-scale", type=float, default=3.0, help="perturbation guidance scale s")
    parser.add_argument("--target", default="identity", choices=["identity", "uniform"])
    parser.add_argument("--scope", default="joint", choices=["joint", "image"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (pipeline default if omitted)")
    parser.add_argument("--size", type=parse_size, default=None, help="N or WIDTHxHEIGHT in pixels")
    parser.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (the tiny model needs only 1)")
    parser.add_argument("--batch-size", type=int, default=4, help="heads scored per pipeline call")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--device", default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dit-attn", description="Attention editing and head guidance for diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images, optionally with head-level perturbation guidance")
    gen.add_argument("prompts", nargs="*", help="one or more prompts (or --prompts FILE)")
    gen.add_argument("--prompts", dest="prompts_file", default=None,
                     help=".txt (a prompt a line), .jsonl (objects with 'prompt' and per-line settings) or .csv (a 'prompt' column)")
    gen.add_argument("--batch-size", type=int, default=1, help="prompts per pipeline call (items with the same settings)")
    gen.add_argument("--num-shards", type=int, default=1, help="split the items into this many shards")
    gen.add_argument("--shard-index", type=int, default=0, help="which shard this process generates (0-based)")
    gen.add_argument("--model", default=TINY, help="local pipeline directory, hub id, or an embedded model: 'tiny' (default), 'demo'")
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
    gen.add_argument("--local-radius", type=float, default=None,
                     help="CLEAR local attention: image tokens attend within this radius (in tokens) + all text")
    gen.add_argument("--local-downsample", type=int, default=None, help="also attend to pooled keys (factor, e.g. 4)")
    gen.add_argument("--local-weights", default=None, help="safetensors from `dit-attn distill-clear` for this radius")
    gen.add_argument("--dtype", default="float32", choices=list(DTYPES))
    gen.add_argument("--device", default=None, help="e.g. cuda; default: where the pipeline loads")
    gen.add_argument("--out", default="out", help="output directory (PNGs + manifest.jsonl)")
    gen.set_defaults(func=cmd_generate)

    heads = sub.add_parser("heads", help="print a model's layer/head map")
    heads.add_argument("--model", default=TINY, help="local pipeline directory, hub id, or an embedded model: 'tiny' (default), 'demo'")
    heads.add_argument("--presets", action="store_true", help="also list the named head presets")
    heads.set_defaults(func=cmd_heads)
    hunt = sub.add_parser("hunt", help="search the heads whose guidance serves an objective (HeadHunter)")
    add_search_options(hunt)
    hunt.add_argument("--k", type=int, default=3, help="heads added per round")
    hunt.add_argument("--rounds", type=int, default=5)
    hunt.add_argument("--min-z", type=float, default=None,
                      help="a head joins only if its paired gain over the current selection exceeds this many "
                           "standard errors; the hunt stops at a round where none does (default: plain top-k)")
    hunt.add_argument("--confirm-seeds", type=int, nargs="+", default=None,
                      help="with --min-z: fresh seeds on which each round's best candidates are scored again; "
                           "only those scores decide who joins")
    hunt.add_argument("--confirm-top", type=int, default=None, help="candidates confirmed per round (default 3k)")
    hunt.add_argument("--confirm-together", action="store_true",
                      help="with --confirm-seeds: confirm each round's top k as one set (all join or none), for "
                           "heads too weak to confirm one by one")
    hunt.add_argument("--candidates", default=None, help="heads to search over, e.g. 'L0,L1H2' (default: all)")
    hunt.add_argument("--checkpoint", default=None, help="resume file (default: OUT.checkpoint)")
    hunt.add_argument("--out", default="hunt.json", help="result: selected heads, every round's scores, settings")
    hunt.set_defaults(func=cmd_hunt)
    atlas = sub.add_parser("atlas", help="picture every head's effect on an objective (PNG heatmap + HTML page)")
    add_search_options(atlas)
    atlas.add_argument("--out", default="atlas", help="writes OUT.png, OUT.html, OUT.json (resume: OUT.checkpoint.json)")
    atlas.set_defaults(func=cmd_atlas)
    app = sub.add_parser("app", help="serve the web app (Gradio) on this machine")
    app.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    app.add_argument("--port", type=int, default=7860)
    app.add_argument("--model-dir", dest="model_dirs", action="append", default=[], metavar="DIR",
                     help="a diffusers pipeline directory the page may offer (repeatable); the embedded models are always offered")
    app.add_argument("--concurrency", type=int, default=1, help="generations running at once")
    app.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more are refused")
    app.add_argument("--dtype", default="float32", choices=list(DTYPES))
    app.add_argument("--device", default=None, help="e.g. cuda; default: where the pipeline loads")
    app.set_defaults(func=cmd_app)
    from .localization.cli import add_commands as add_localization_commands

    add_localization_commands(sub)  # localize, edit-text
    from .ic.cli import add_command as add_ic_command

    add_ic_command(sub)  # ic
    sub.add_parser("train-tiny", help="train the embedded tiny model from scratch (dit-attn train-tiny --help)")
    sub.add_parser("distill-clear", help="distil a model into CLEAR local attention (dit-attn distill-clear --help)")
    sub.add_parser("train-lora", help="train a LoRA: text layers, all layers, or in-context sets (dit-attn train-lora --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # optional-backend notices are noise on the command line
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-tiny"]:  # its own parser, one option per training setting
        from .models.train_tiny import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["train-lora"]:
        from .localization.train_lora import main as train_lora_main

        return train_lora_main(argv[1:])
    if argv[:1] == ["distill-clear"]:
        from .pipelines.distill_clear import main as distill_main

        return distill_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as err:
        print(f"dit-attn: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
