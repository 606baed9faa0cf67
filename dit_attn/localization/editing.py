"""`edit_text`: generate an image (or a video) and its twin whose quoted text comes from a new
prompt through the text layers only (same starting noise), side by side."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from PIL import Image

from .. import limits
from ..handle import apply, layers as layer_map
from ..edits import TextPatch
from .localize import call_options, check_argument_names, check_output_size, check_steps, makes_videos
from .prompts import with_quoted_text
from .score import to_pil


@dataclass
class TextEdit:
    prompt: str
    source_prompt: str
    layers: tuple[int, ...]
    start: float
    seed: int  # the generator's initial_seed(): with a fresh generator, the one that reproduces both images
    original: Image.Image | list[Image.Image]  # a video: its frames
    edited: Image.Image | list[Image.Image]
    seconds_original: float
    seconds_edited: float

    @property
    def is_video(self) -> bool:
        return isinstance(self.original, list)

    @property
    def side_by_side(self) -> Image.Image | list[Image.Image]:
        """The original left, the edited right (a video: frame by frame)."""
        if self.is_video:
            return [side_by_side(a, b) for a, b in zip(self.original, self.edited)]
        return side_by_side(self.original, self.edited)


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    w, h = left.size
    canvas = Image.new("RGB", (2 * w, h), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (w, 0))
    return canvas


def edit_text(pipe, prompt: str, new_text: str, layers, start: float = 0.0, generator: torch.Generator | None = None,
              num_inference_steps: int = 20, guidance_scale: float | None = None, height: int | None = None,
              width: int | None = None, **pipe_kwargs) -> TextEdit:
    """The image of `prompt` and its edited twin: the first quoted text of the prompt
    replaced by `new_text`, patched into `layers` from the `start` fraction of the steps on.
    A video pipeline gives two videos (lists of PIL frames; pass num_frames in pipe_kwargs).

    Both images start from the generator's state as given (default: a CPU generator seeded 0):
    the original uses `generator`, the edited one a copy of its state taken before.
    num_inference_steps, guidance_scale, height, width: the pipeline call's (None: the
    pipeline's default); other pipe_kwargs go to the pipeline too."""
    from ..loading import call_defaults

    check_argument_names("edit_text", pipe_kwargs)
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be one torch.Generator (or None: seed 0), got {type(generator).__name__}")
    check_steps(num_inference_steps)
    limits.check_call(pipe, height=height, width=width, guidance_scale=guidance_scale)
    check_output_size(pipe, height, width, pipe_kwargs)
    pipe_kwargs = {**call_defaults(pipe), **pipe_kwargs, **call_options(guidance_scale, height, width)}
    if not isinstance(new_text, str) or not new_text.strip():
        raise ValueError(f"new_text must be a non-empty string, got {new_text!r}")
    source = with_quoted_text(prompt, new_text)
    edit = TextPatch(layers=layers, source_prompt=source, start=start)
    n_layers = len(layer_map(pipe))
    bad = [i for i in edit.layers if i >= n_layers]
    if bad:
        raise ValueError(f"layers {bad} do not exist: this model has layers 0-{n_layers - 1}")

    seed = generator.initial_seed()
    twin = torch.Generator(device=generator.device).set_state(generator.get_state())  # the same starting state

    videos = makes_videos(pipe)

    def run(g: torch.Generator) -> tuple[Image.Image | list[Image.Image], float]:
        began = time.perf_counter()
        out = pipe(prompt=prompt, generator=g, num_inference_steps=num_inference_steps, output_type="pt", **pipe_kwargs)
        seconds = time.perf_counter() - began
        if videos:
            return to_pil(out.frames[0].float().cpu()), seconds
        return to_pil(out.images.float().cpu())[0], seconds

    original, t_original = run(generator)
    with apply(pipe, edit):
        edited, t_edited = run(twin)
    return TextEdit(prompt, source, edit.layers, start, seed, original, edited, t_original, t_edited)
