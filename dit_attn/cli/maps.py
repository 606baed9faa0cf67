"""`dit-attn maps`: generate an image and write its attention maps as heatmap PNGs plus a JSON index (a video
model: the video and one animated WebP overlay per map, on the (frame, row, col) token grid)."""
from __future__ import annotations

import os

from .common import TINY, add_model_options, check_call_flags, check_out_dir, check_prompt, finite_float
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

    from ..capture import overlay, overlay_frames
    from ..handle import apply
    from ..io import write_json_atomic, write_png_atomic
    from ..limits import check_fps, check_frames, check_seed, check_video_size
    from ..loading import call_defaults
    from ..video import DEFAULT_FPS, write_video_atomic
    from ..workflows.batch import makes_videos, pipeline_output
    from .common import load

    check_seed(args.seed, "--seed")
    frames = None if args.num_frames is None else check_frames(args.num_frames, "--num-frames")
    fps = DEFAULT_FPS if args.fps is None else check_fps(args.fps, "--fps")
    pipe = load(args)
    settings = {k: v for k, v in call_settings(args).items() if v is not None}
    videos = makes_videos(pipe)
    if videos:
        check_video_size(pipe, frames, settings.get("height"), settings.get("width"))
        if frames is not None:
            settings["num_frames"] = frames
    elif args.num_frames is not None or args.fps is not None:
        raise ValueError(f"--num-frames and --fps are for video models; {type(pipe).__name__} makes images")
    call = {**call_defaults(pipe), **settings}
    if args.max_sequence_length is not None:
        call["max_sequence_length"] = args.max_sequence_length
    with apply(pipe, edit) as handle:
        output = pipe(args.prompt, generator=torch.Generator().manual_seed(args.seed), **call,
                      **({"output_type": "pil"} if videos else {}))
        image = pipeline_output(pipe, output)[0]
        result = handle.maps
    record = {"prompt": args.prompt, "seed": args.seed, "model": args.model, "call": call,
              "capture": edit.to_dict(), **result.settings()}
    if videos:
        record["fps"] = fps
        suffix, image_name = "webp", "video.webp"
        write_video_atomic(image, os.path.join(args.out, image_name), record, fps, "webp")

        def write(drawn_map, name):
            drawn = overlay_frames(image, drawn_map, temporal_factor=pipe.vae_scale_factor_temporal)
            write_video_atomic(drawn, os.path.join(args.out, name), record, fps, "webp")
    else:
        suffix, image_name = "png", "image.png"
        write_png_atomic(image, os.path.join(args.out, image_name), record)

        def write(drawn_map, name):
            write_png_atomic(overlay(image, drawn_map), os.path.join(args.out, name))
    maps = result.maps[0]  # the one conditional row: (layers, heads, tokens, [frames,] H, W)
    files = []
    for li, layer in enumerate(result.layers):
        for ti, token in enumerate(result.tokens):
            label = token.replace(",", "-")
            chosen = [("mean", f"L{layer}", maps[li, :, ti].mean(dim=0))] if not args.per_head else [
                (head, f"L{layer}H{head}", maps[li, hi, ti]) for hi, head in enumerate(result.heads)]
            for head, prefix, values in chosen:
                name = f"{prefix}_{label}.{suffix}"
                write(values, name)
                files.append({"file": name, "layer": layer, "head": head, "token": token,
                              "shape": list(values.shape), "mean_probability": float(values.mean())})
    axes = ["frame", "row", "col"] if videos else ["row", "col"]
    write_json_atomic(os.path.join(args.out, INDEX), {**record, "image": image_name, "axes": axes, "maps": files})
    print(f"dit-attn maps: {len(files)} maps of {len(result.layers)} layers -> {os.path.join(args.out, INDEX)}")
    return 0


def add_commands(sub) -> None:
    maps = sub.add_parser("maps", help="generate an image or video and write its attention maps (heatmap PNGs or "
                                       "animated WebPs + maps.json)")
    maps.add_argument("prompt", help="the prompt")
    maps.add_argument("--kind", default="cross", choices=("cross", "self", "concept"),
                      help="cross: image attention on words/text tokens; self: chosen image locations over the image; "
                           "concept: ConceptAttention maps of --words (softmax over the concepts)")
    maps.add_argument("--words", default=None,
                      help="comma-separated words of the prompt (default: every word); --kind concept: the concepts")
    maps.add_argument("--tokens", default=None, help="comma-separated text-token indices instead of words")
    maps.add_argument("--locations", default=None,
                      help="--kind self: row,col cells of the token grid, e.g. '4,4;0,7' (a video: frame,row,col)")
    maps.add_argument("--layers", default=None, help="comma-separated layer indices (default: every layer)")
    maps.add_argument("--heads", default=None, help="comma-separated head indices (default: every head)")
    maps.add_argument("--capture-steps", default=None, help="comma-separated denoising steps to average (default: every step)")
    maps.add_argument("--per-head", action="store_true", help="one PNG per head (default: the mean over the heads)")
    add_call_options(maps)
    maps.add_argument("--seed", type=int, default=0)
    maps.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: the model's call defaults)")
    maps.add_argument("--num-frames", "--frames", dest="num_frames", type=int, default=None,
                      help="video models: frames of the video (Wan: 4k + 1; default: the model's)")
    maps.add_argument("--fps", type=finite_float, default=None,
                      help="video models: frames per second of the WebPs (default 16)")
    add_model_options(maps, TINY)
    maps.add_argument("--out", default="maps", help="output folder: image.png and one PNG per map (a video: video.webp "
                                                     "and one animated WebP per map), maps.json")
    maps.set_defaults(func=cmd_maps)
