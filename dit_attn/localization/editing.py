"""`edit_text`: generate an image and its twin whose quoted text comes from a new prompt
through the text layers only (same starting noise), side by side."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from PIL import Image

from .. import limits
from ..handle import apply, layers as layer_map
from ..edits import TextPatch
from ..families import check_image_pipeline
from .localize import call_options, check_argument_names, check_steps
from .prompts import with_quoted_text
from .score import to_pil


@dataclass
class TextEdit:
    prompt: str
    source_prompt: str
    layers: tuple[int, ...]
    start: float
    seed: int  # the generator's initial_seed(): with a fresh generator, the one that reproduces both images
    original: Image.Image
    edited: Image.Image
    seconds_original: float
    seconds_edited: float

    @property
    def side_by_side(self) -> Image.Image:
        w, h = self.original.size
        canvas = Image.new("RGB", (2 * w, h), "white")
        canvas.paste(self.original, (0, 0))
        canvas.paste(self.edited, (w, 0))
        return canvas


def edit_text(pipe, prompt: str, new_text: str, layers, start: float = 0.0, generator: torch.Generator | None = None,
              num_inference_steps: int = 20, guidance_scale: float | None = None, height: int | None = None,
              width: int | None = None, **pipe_kwargs) -> TextEdit:
    """The image of `prompt` and its edited twin: the first quoted text of the prompt
    replaced by `new_text`, patched into `layers` from the `start` fraction of the steps on.

    Both images start from the generator's state as given (default: a CPU generator seeded 0):
    the original uses `generator`, the edited one a copy of its state taken before.
    num_inference_steps, guidance_scale, height, width: the pipeline call's (None: the
    pipeline's default); other pipe_kwargs go to the pipeline too."""
    from ..loading import call_defaults

    check_argument_names("edit_text", pipe_kwargs)
    check_image_pipeline(pipe, "edit_text")
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be one torch.Generator (or None: seed 0), got {type(generator).__name__}")
    check_steps(num_inference_steps)
    limits.check_call(pipe, height=height, width=width, guidance_scale=guidance_scale)
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

    def run(g: torch.Generator) -> tuple[Image.Image, float]:
        began = time.perf_counter()
        out = pipe(prompt=prompt, generator=g, num_inference_steps=num_inference_steps, output_type="pt", **pipe_kwargs)
        return to_pil(out.images.float().cpu())[0], time.perf_counter() - began

    original, t_original = run(generator)
    with apply(pipe, edit):
        edited, t_edited = run(twin)
    return TextEdit(prompt, source, edit.layers, start, seed, original, edited, t_original, t_edited)
