"""The Maps tab: one generation with `da.Capture` and its attention maps as overlays plus maps.json (a video model:
one animated WebP overlay per word × layer, maps on the (frame, row, col) token grid)."""
from __future__ import annotations

import os
import uuid
from typing import Callable

from ..capture.options import capture_from_fields
from ..edits import Capture
from ..io import write_json_atomic
from ..limits import check_text, whole_number
from ..workflows.batch import edits_for, makes_videos, pipeline_kwargs, pipeline_output
from .generation import save_png, save_video, step_callback
from .models import LoadedModel

MAX_OVERLAYS = 64  # gallery images of one request (words × layers)
FIELD_NAMES = {"words": "words", "tokens": "token indices", "locations": "words", "layers": "layers",
               "heads": "heads", "steps": "capture steps", "kind": "kind"}


def maps_capture(prompt: str, num_inference_steps: int, kind, words_text, layers_text, heads_text, first_step,
                 last_step) -> Capture:
    """The Capture of the tab's fields; the step range within the generation's steps. self: the words field holds
    row,col cells of the token grid (a video: frame,row,col) separated by ';'."""
    if not prompt:
        raise ValueError("the prompt is empty: describe the image to generate")
    words = check_text("words", words_text, 2000)
    layers, heads = check_text("layers", layers_text, 2000), check_text("heads", heads_text, 2000)
    last = num_inference_steps - 1
    first = 0 if first_step is None else whole_number("first capture step", first_step, 0, last)
    final = last if last_step is None else whole_number("last capture step", last_step, 0, last)
    if first > final:
        raise ValueError(f"the first capture step ({first}) is after the last ({final})")
    steps = None if (first, final) == (0, last) else list(range(first, final + 1))
    return capture_from_fields(prompt, kind, words=words, locations=words, layers=layers, heads=heads, steps=steps,
                               names=FIELD_NAMES)


def check_overlays(capture: Capture, model: LoadedModel, per_layer: bool) -> None:
    """The gallery stays within MAX_OVERLAYS overlays (the layers and heads are checked when the Capture is
    applied)."""
    layers = len(capture.layers) if capture.layers is not None else len(model.layer_map)
    count = len(capture.tokens) * (layers if per_layer else 1)
    if count > MAX_OVERLAYS:
        raise ValueError(f"{count} overlays ({len(capture.tokens)} words × {layers} layers) is more than the page "
                         f"shows ({MAX_OVERLAYS}): choose fewer words or layers, or the mean over the layers")


def run_captured(model: LoadedModel, settings: dict, capture: Capture, on_step: Callable[[int], None] | None = None):
    """The image of stored `settings` generated with their edits and `capture` in one apply: (image, CaptureResult)."""
    import torch

    from ..handle import apply
    from ..loading import call_defaults, call_pipeline

    pipe = model.pipe
    generator = torch.Generator(device="cpu").manual_seed(settings["seed"])
    video = {"output_type": "pil"} if makes_videos(pipe) else {}
    with model.lock, apply(pipe, *edits_for(settings), capture) as handle:
        output = call_pipeline(pipe, prompt=settings["prompt"], generator=generator, **step_callback(pipe, on_step),
                               **{**call_defaults(pipe), **pipeline_kwargs(settings), **video})
        return pipeline_output(pipe, output)[0], handle.maps


def write_maps(image, result, settings: dict, capture: Capture, directory: str, per_layer: bool,
               temporal_factor: int = 1):
    """The image, one overlay per word (× layer when `per_layer`, else the mean over the layers; always the mean
    over the captured heads) and maps.json with every overlay's values: (image path, [(overlay path, caption)],
    maps.json path). A video (`image` its frames): the video and each overlay as animated WebPs, every value
    per (frame, row, col) of the video-token grid (`temporal_factor`: the pipeline's `vae_scale_factor_temporal`)."""
    from ..capture import overlay, overlay_frames

    videos = isinstance(image, list)
    maps = result.maps[0].mean(dim=1)  # the one conditional row, heads averaged: (layers, tokens, [F,] H, W)
    groups = [(str(layer), maps[i]) for i, layer in enumerate(result.layers)] if per_layer else [("mean", maps.mean(0))]
    record = {**settings, "capture": capture.to_dict(), **result.settings()}
    save = save_video if videos else save_png
    image_path = save(image, {**record, "image": "generated"}, directory, "maps-image")
    gallery, entries = [], []
    for layer, per_token in groups:
        for ti, token in enumerate(result.tokens):
            caption = f"{token} · layer {layer}" if layer != "mean" else f"{token} · mean of layers"
            drawn = (overlay_frames(image, per_token[ti], temporal_factor=temporal_factor) if videos
                     else overlay(image, per_token[ti]))
            path = save(drawn, {**record, "image": caption}, directory, "map")
            gallery.append((path, caption))
            entries.append({"file": os.path.basename(path), "layer": layer, "token": token,
                            "mean_probability": float(per_token[ti].mean()), "shape": list(per_token[ti].shape),
                            "values": rounded(per_token[ti])})
    index = os.path.join(directory, f"maps-{uuid.uuid4().hex[:8]}.json")
    axes = ["frame", "row", "col"] if videos else ["row", "col"]
    write_json_atomic(index, {**record, "image": os.path.basename(image_path), "axes": axes, "maps": entries})
    return image_path, gallery, index


def rounded(values) -> list:
    """A map's values as nested lists, 6 decimals."""
    return [round(float(v), 6) for v in values] if values.ndim == 1 else [rounded(part) for part in values]
