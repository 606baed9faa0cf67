"""One seeded pipeline call with or without edits, the difference of two images, PNGs (videos) with settings."""
from __future__ import annotations

import os
import uuid
from typing import Callable

import numpy as np
from PIL import Image

from ..io import slug, write_png_atomic
from .models import LoadedModel
from ..workflows.batch import render


def run_pipeline(model: LoadedModel, settings: dict, on_step: Callable[[int], None] | None = None) -> Image.Image:
    """The image of stored `settings` (seeded, so the same settings give the same pixels, as
    `workflows.batch.regenerate` of its PNG does); `on_step(done)` after each step."""
    with model.lock:
        return render(model.pipe, settings, **step_callback(model.pipe, on_step))


def step_callback(pipe, on_step: Callable[[int], None] | None) -> dict:
    """The pipeline-call argument that calls `on_step(done)` after each step; none where the pipeline takes no
    step callback (HunyuanVideo 1.5) or no `on_step` is given."""
    import inspect

    if on_step is None or "callback_on_step_end" not in inspect.signature(pipe.__call__).parameters:
        return {}

    def step_ended(pipe, step: int, timestep, tensors: dict) -> dict:
        on_step(step + 1)
        return {}

    return {"callback_on_step_end": step_ended}


def difference_image(first: Image.Image, second: Image.Image) -> tuple[Image.Image, int, float]:
    """|first − second| per channel, scaled so the largest difference is white.

    Returns (image, largest difference in 0-255, gain applied); identical inputs give black.
    """
    a, b = np.asarray(first.convert("RGB"), dtype=np.int16), np.asarray(second.convert("RGB"), dtype=np.int16)
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {first.size} and {second.size}")
    amplified, peak, gain = _amplified(np.abs(a - b))
    return Image.fromarray(amplified), peak, gain


def difference_frames(first: list, second: list) -> tuple[list, int, float]:
    """|first − second| of two videos frame by frame, with one gain for the whole video (its largest difference
    white): (frames, largest difference in 0-255, gain applied)."""
    if len(first) != len(second):
        raise ValueError(f"videos differ in length: {len(first)} and {len(second)} frames")
    a = np.stack([np.asarray(f.convert("RGB"), dtype=np.int16) for f in first])
    b = np.stack([np.asarray(f.convert("RGB"), dtype=np.int16) for f in second])
    if a.shape != b.shape:
        raise ValueError(f"videos differ in frame size: {first[0].size} and {second[0].size}")
    amplified, peak, gain = _amplified(np.abs(a - b))
    return [Image.fromarray(frame) for frame in amplified], peak, gain


def _amplified(diff: np.ndarray) -> tuple[np.ndarray, int, float]:
    """Differences scaled so the largest is 255: (uint8 array, largest difference, gain)."""
    peak = int(diff.max())
    gain = 255.0 / peak if peak else 1.0
    return np.clip(np.rint(diff * gain), 0, 255).astype(np.uint8), peak, gain


def save_video(frames: list, settings: dict, directory: str, kind: str) -> str:
    """An animated lossless WebP in `directory` (an image element plays it) with its `<name>.json` sidecar
    holding `settings` (as `dit-attn generate` writes videos); its path."""
    from ..video import write_video_atomic

    name = f"{kind}-{settings.get('seed', 0)}-{slug(settings.get('prompt', ''), 32)}-{uuid.uuid4().hex[:8]}.webp"
    path = os.path.join(directory, name)
    write_video_atomic(frames, path, settings, settings["fps"], "webp")
    return path


def save_png(image: Image.Image, settings: dict, directory: str, kind: str) -> str:
    """A PNG in `directory` whose `dit-attn` text chunk holds `settings` (as `dit-attn generate` writes); its path."""
    os.makedirs(directory, exist_ok=True)
    name = f"{kind}-{settings.get('seed', 0)}-{slug(settings.get('prompt', ''), 32)}-{uuid.uuid4().hex[:8]}.png"
    path = os.path.join(directory, name)
    write_png_atomic(image, path, settings)
    return path
