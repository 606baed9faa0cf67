"""`dit-attn localize` and `dit-attn edit-text`."""
from __future__ import annotations

import argparse
import os

from ..io import parse_layer_groups, read_records
from .common import (DEMO, add_model_options, check_call_flags, check_input_file, check_out_dir, check_prompt, check_seeds,
                     finite_float, load)
from .search import add_call_options, call_settings

SCORES = ("judge (glyph probability x SSIM; the default on image models), ssim (the default on video models), "
          "easyocr:DIR or trocr:DIR (OCR F1 x SSIM, local weights)")


def read_pairs(path: str) -> list[tuple[str, str]]:
    """Pairs from a .jsonl (objects with prompt, source_prompt), .csv (those columns) or a
    text file with one `prompt<TAB>source prompt` a line (# comments)."""
    pairs = []
    for number, record in read_records(path, ("prompt", "source_prompt"), what="pairs file", text_suffixes=None):
        if isinstance(record, ValueError):
            raise ValueError(f"{path}:{number}: {record}")
        if not all(isinstance(record.get(k), str) for k in ("prompt", "source_prompt")):
            raise ValueError(f"{path}:{number}: expected an object with prompt and source_prompt")
        pairs.append((record["prompt"], record["source_prompt"]))
    return pairs


def make_score(name: str | None):
    """The score --score names (None: localize's default for the model)."""
    from ..localization.score import OCRScore, judge_score, ssim_score

    if name is None:
        return None
    if name == "judge":
        return judge_score
    if name == "ssim":
        return ssim_score
    kind, _, directory = name.partition(":")
    if kind in ("easyocr", "trocr") and directory:
        return getattr(OCRScore, kind)(directory)
    raise ValueError(f"unknown score {name!r}; use {SCORES}")


def pipeline_options(args) -> dict:
    """num_inference_steps, guidance_scale, height, width (None: the model's), and max_sequence_length and a
    video's num_frames if given."""
    extra = {name: getattr(args, name) for name in ("max_sequence_length", "num_frames") if getattr(args, name) is not None}
    return {**call_settings(args), **extra}


def check_video_flags(args, pipe) -> None:
    """--num-frames, --fps and --video-format only for a video model."""
    from ..localization.localize import makes_videos

    given = [flag for flag, value in (("--num-frames", args.num_frames), ("--fps", getattr(args, "fps", None)),
                                      ("--video-format", getattr(args, "video_format", None))) if value is not None]
    if given and not makes_videos(pipe):
        raise ValueError(f"{', '.join(given)}: for video models; {type(pipe).__name__} makes images")


def check_localization_flags(args) -> None:
    """The numbers and the output folder of `localize`/`edit-text`, before a model loads."""
    from ..limits import check_fps, check_frames, number, whole_number

    check_call_flags(args)
    number("--start", args.start, 0, 1)
    if args.num_frames is not None:
        check_frames(args.num_frames, "--num-frames")
    if args.command == "localize":
        check_seeds("--seeds", args.seeds)
        whole_number("--signs", args.signs, 0)
        check_seeds("--signs-seed", [args.signs_seed])
    else:
        check_seeds("--seed", [args.seed])
        check_prompt("the prompt", args.prompt)
        check_prompt("--text", args.text)
        if args.fps is not None:
            check_fps(args.fps, "--fps")
        if args.video_format is not None:
            from ..video import check_video_format

            check_video_format(args.video_format, "--video-format")
    check_out_dir("--out", args.out)


def cmd_localize(args) -> int:
    from ..localization.localize import localize, sign_pairs

    check_localization_flags(args)
    pairs = [tuple(p) for p in args.pair or []]
    if args.pairs_file:
        pairs += read_pairs(check_input_file("--pairs", args.pairs_file))
    for prompt, source in pairs:
        check_prompt("a pair's prompt", prompt)
        check_prompt("a pair's source prompt", source)
    if args.signs:
        pairs += [(p.prompt, p.source_prompt) for p in sign_pairs(args.signs, seed=args.signs_seed)]
    if not pairs:
        raise ValueError("give pairs: --pair PROMPT SOURCE_PROMPT (repeatable), --pairs FILE or --signs N")
    layers = parse_layer_groups(args.layers) if args.layers else None
    score = make_score(args.score)
    pipe = load(args)
    check_video_flags(args, pipe)
    result = localize(pipe, pairs, score=score, layers=layers, seeds=args.seeds, start=args.start, out=args.out,
                      **pipeline_options(args))
    top = result.top
    print(f"dit-attn localize: top {top.label} score {top.score:.4f} ({top.text_kv_share:.3%} of parameters in its "
          f"text K/V projections, {top.block_share:.2%} in its blocks) -> {os.path.join(args.out, 'localization.json')}")
    for entry in result.ranking[:5]:
        parts = ", ".join(f"{k} {v:.3f}" for k, v in entry.components.items() if k != "score")
        print(f"  {entry.label:<10} {entry.score:.4f}  ({parts})")
    return 0


def cmd_edit_text(args) -> int:
    import torch

    from ..io import write_png_atomic
    from ..localization.editing import edit_text
    from ..video import DEFAULT_FPS, check_video_format, write_video_atomic

    check_localization_flags(args)
    layers = [g[0] for g in parse_layer_groups(args.layers.replace("+", ","))]
    pipe = load(args)
    check_video_flags(args, pipe)
    result = edit_text(pipe, args.prompt, args.text, layers=layers, start=args.start,
                       generator=torch.Generator(device="cpu").manual_seed(args.seed), **pipeline_options(args))
    first = result.original[0] if result.is_video else result.original
    settings = {"prompt": result.prompt, "source_prompt": result.source_prompt, "layers": list(result.layers),
                "start": result.start, "seed": result.seed, "num_inference_steps": args.num_inference_steps,
                "guidance_scale": args.guidance_scale, "height": first.height, "width": first.width,
                "model": args.model, "dtype": args.dtype}
    outputs = (("original", result.original), ("edited", result.edited), ("side_by_side", result.side_by_side))
    os.makedirs(args.out, exist_ok=True)
    if result.is_video:
        video_format = check_video_format(args.video_format, "--video-format")
        fps = DEFAULT_FPS if args.fps is None else args.fps
        settings.update(num_frames=len(result.original), fps=fps)
        for name, frames in outputs:
            write_video_atomic(frames, os.path.join(args.out, f"{name}.{video_format}"), {**settings, "video": name}, fps,
                               video_format)
    else:
        for name, image in outputs:
            write_png_atomic(image, os.path.join(args.out, f"{name}.png"), {**settings, "image": name})
    print(f"dit-attn edit-text: {result.source_prompt!r} patched into layers {list(result.layers)} "
          f"({result.seconds_edited:.2f}s edited vs {result.seconds_original:.2f}s original) -> {args.out}")
    return 0


def add_common(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser, DEMO)
    add_call_options(parser)
    parser.add_argument("--start", type=finite_float, default=0.0, help="patch from this fraction of the steps on")
    parser.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: the model's)")
    parser.add_argument("--num-frames", "--frames", dest="num_frames", type=int, default=None,
                        help="video models: frames per video (Wan: 4k + 1; default: the model's)")


def add_commands(sub) -> None:
    """Add `localize` and `edit-text` to the `dit-attn` subcommands."""
    loc = sub.add_parser("localize", help="rank the layers by how much patching them moves the text of a prompt")
    loc.add_argument("--pair", nargs=2, action="append", metavar=("PROMPT", "SOURCE_PROMPT"),
                     help="a prompt and the prompt whose text to patch in (repeatable)")
    loc.add_argument("--pairs", dest="pairs_file", default=None, help=".jsonl/.csv (prompt, source_prompt) or prompt<TAB>source lines")
    loc.add_argument("--signs", type=int, default=0, help="add N sign pairs of the tiny model's world")
    loc.add_argument("--signs-seed", type=int, default=0)
    loc.add_argument("--layers", default=None, help="layers to patch, e.g. '0,3,5+6' (default: every layer alone)")
    loc.add_argument("--seeds", type=int, nargs="+", default=[0])
    loc.add_argument("--score", default=None, help=SCORES)
    loc.add_argument("--out", default="localization", help="directory for localization.json and localization.png")
    add_common(loc)
    loc.set_defaults(func=cmd_localize)

    edit = sub.add_parser("edit-text", help="generate a prompt and its twin with new quoted text patched into the text layers")
    edit.add_argument("prompt", help='a prompt with quoted text, e.g. \'a sign that says "A" in red on a white background\'')
    edit.add_argument("--text", required=True, help="the new text for the quotes")
    edit.add_argument("--layers", required=True, help="the text layers, e.g. '3' or '3,4' (from dit-attn localize)")
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument("--fps", type=finite_float, default=None, help="video models: frames per second of the files (default 16)")
    edit.add_argument("--video-format", default=None, choices=("mp4", "gif", "webp"),
                      help="video models: the files' format (default: mp4 with imageio-ffmpeg installed, else gif)")
    edit.add_argument("--out", default="edit", help="directory for original.png, edited.png, side_by_side.png (a video "
                                                     "model: original, edited and side_by_side videos, each with its sidecar)")
    add_common(edit)
    edit.set_defaults(func=cmd_edit_text)
