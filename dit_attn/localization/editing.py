"""`edit_text`: generate an image and its twin whose quoted text comes from a new prompt
through the text layers only (same seed), side by side."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from PIL import Image

from ..handle import apply, layers as layer_map
from ..edits import TextPatch
from .prompts import with_quoted_text
from .score import to_pil


@dataclass
class TextEdit:
    prompt: str
    source_prompt: str
    layers: tuple[int, ...]
    start: float
    seed: int
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


def edit_text(pipe, prompt: str, new_text: str, layers, start: float = 0.0, seed: int = 0, steps: int = 20,
              **pipe_kwargs) -> TextEdit:
    """The image of `prompt` and its edited twin: the first quoted text of the prompt
    replaced by `new_text`, patched into `layers` from the `start` fraction of the steps on."""
    from ..loading import call_defaults

    pipe_kwargs = {**call_defaults(pipe), **pipe_kwargs}
    if not isinstance(new_text, str) or not new_text.strip():
        raise ValueError(f"new_text must be a non-empty string, got {new_text!r}")
    source = with_quoted_text(prompt, new_text)
    edit = TextPatch(layers=layers, source_prompt=source, start=start)
    n_layers = len(layer_map(pipe))
    bad = [i for i in edit.layers if i >= n_layers]
    if bad:
        raise ValueError(f"layers {bad} do not exist: this model has layers 0-{n_layers - 1}")

    def run() -> tuple[Image.Image, float]:
        began = time.perf_counter()
        out = pipe(prompt, generator=torch.Generator(device="cpu").manual_seed(seed), num_inference_steps=steps,
                   output_type="pt", **pipe_kwargs)
        return to_pil(out.images.float().cpu())[0], time.perf_counter() - began

    original, t_original = run()
    with apply(pipe, edit):
        edited, t_edited = run()
    return TextEdit(prompt, source, edit.layers, start, seed, original, edited, t_original, t_edited)
