"""One seeded pipeline call with or without edits, the difference of two images, PNGs with settings."""
from __future__ import annotations

import contextlib
import os
import uuid
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..handle import apply
from ..io import slug, write_png_atomic
from ..loading import call_defaults
from .models import LoadedModel
from ..workflows.batch import edits_for, pipeline_kwargs


def run_pipeline(model: LoadedModel, settings: dict, on_step: Callable[[int], None] | None = None) -> Image.Image:
    """The image of `settings` (seeded, so the same settings give the same pixels); `on_step(done)` after each step."""
    edits = edits_for(settings)

    def step_ended(pipe, step: int, timestep, tensors: dict) -> dict:
        on_step(step + 1)
        return {}

    generator = torch.Generator(device="cpu").manual_seed(settings["seed"])
    with model.lock:
        with apply(model.pipe, *edits) if edits else contextlib.nullcontext():
            result = model.pipe(settings["prompt"], generator=generator, callback_on_step_end=step_ended if on_step else None,
                                **{**call_defaults(model.pipe), **pipeline_kwargs(settings)})
    return result.images[0]


def with_actual_size(settings: dict, image: Image.Image) -> dict:
    """Settings that record the size the model drew (the model's default when none was given)."""
    return {**settings, "width": image.width, "height": image.height}


def difference_image(first: Image.Image, second: Image.Image) -> tuple[Image.Image, int, float]:
    """|first − second| per channel, scaled so the largest difference is white.

    Returns (image, largest difference in 0-255, gain applied); identical inputs give black.
    """
    a, b = np.asarray(first.convert("RGB"), dtype=np.int16), np.asarray(second.convert("RGB"), dtype=np.int16)
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {first.size} and {second.size}")
    diff = np.abs(a - b)
    peak = int(diff.max())
    gain = 255.0 / peak if peak else 1.0
    amplified = np.clip(np.rint(diff * gain), 0, 255).astype(np.uint8)
    return Image.fromarray(amplified), peak, gain


def save_png(image: Image.Image, settings: dict, directory: str, kind: str) -> str:
    """A PNG in `directory` whose `dit-attn` text chunk holds `settings` (as `dit-attn generate` writes); its path."""
    os.makedirs(directory, exist_ok=True)
    name = f"{kind}-{settings.get('seed', 0)}-{slug(settings.get('prompt', ''), 32)}-{uuid.uuid4().hex[:8]}.png"
    path = os.path.join(directory, name)
    write_png_atomic(image, path, settings)
    return path
