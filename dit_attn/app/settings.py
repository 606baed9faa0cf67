"""Turn the page's form values into the stored settings of `dit-attn generate`, checking each one.

The settings are those `dit-attn generate` stores (see `workflows.batch.stored_settings`: diffusers'
names, the edits as their `to_dict()`; of the local attention options the page offers the radius and
the pooled-key downsample factor, not a weights file, which would be a path typed into the page), so
a PNG's `dit-attn` text chunk from the app and from `dit-attn generate` read the same, and
`workflows.batch.regenerate` rebuilds either.
"""
from __future__ import annotations

import math

from ..io import parse_heads, parse_size
from ..edits import HeadGuidance
from ..heads import normalize_heads, resolve_heads
from ..workflows.batch import edits_from_options, stored_settings
from .models import LoadedModel

MAX_STEPS = 200
MAX_SIDE = 2048
MAX_SEED = 2**63 - 1


def whole_number(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value != int(value):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {int(value)}")
    return int(value)


def number(name: str, value, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return float(value)


def collect_heads(text: str | None, picked=None, presets=None) -> list[str]:
    """Heads typed as text ('L1H0, L2'), ticked in the picker and chosen as presets, in that order, without repeats."""
    typed = parse_heads(text or "")
    normalize_heads(typed)  # syntax errors name the valid forms
    chosen = [*typed, *(picked or []), *(presets or [])]
    return list(dict.fromkeys(chosen))


def parse_image_size(text: str | None, model: LoadedModel) -> tuple[int | None, int | None]:
    """(height, width) from 'N' or 'WIDTHxHEIGHT'; (None, None) for the model's default size."""
    if text is None or not text.strip():
        return None, None
    height, width = parse_size(text)
    multiple = size_multiple(model.pipe)
    for side in (width, height):
        if not multiple <= side <= MAX_SIDE or side % multiple:
            raise ValueError(
                f"size sides must be multiples of {multiple} between {multiple} and {MAX_SIDE} on this model "
                f"(e.g. {8 * multiple} or {8 * multiple}x{4 * multiple}), got {text.strip()!r}"
            )
    return height, width


def size_multiple(pipe) -> int:
    """Image sides must divide into whole latent patches: VAE factor × transformer patch (2 for FLUX's packing)."""
    return int(pipe.vae_scale_factor) * int(getattr(pipe, "patch_size", 2))


def build_settings(model: LoadedModel, *, prompt: str, num_inference_steps, guidance_scale, seed, size: str | None,
                   heads: list[str], pag_scale, u, scope: str, target: str = "identity", local_radius=None, start=0.0,
                   end=1.0, local_downsample=None, dtype: str = "float32") -> dict:
    """Checked stored settings; heads are also checked against the model's layer/head map.

    pag_scale, u, scope, target: the HeadGuidance edit's scale and fields (no such edit without heads).
    local_radius: None (or 0) for full attention, else the CLEAR radius in tokens.
    start, end: the fractions of the steps between which head guidance is active.
    local_downsample: None (or 0) or the factor of CLEAR's pooled keys (needs a radius).
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: describe the image to generate")
    height, width = parse_image_size(size, model)
    seed = whole_number("seed", seed, 0, MAX_SEED)
    num_inference_steps = whole_number("steps", num_inference_steps, 1, MAX_STEPS)
    guidance_scale = number("CFG scale", guidance_scale, 0.0)
    options = {
        "heads": list(heads), "pag_scale": number("guidance scale", pag_scale, 0.0), "u": number("u", u, 0.0, 1.0),
        "target": target, "scope": scope, "start": number("guidance start", start, 0.0, 1.0),
        "end": number("guidance end", end, 0.0, 1.0), "local_radius": local_radius or None,
        "local_downsample": whole_number("local downsample", local_downsample, 2, 64) if local_downsample else None,
    }
    edits = edits_from_options(options)  # each edit checks its own fields
    for edit in edits:
        if isinstance(edit, HeadGuidance):
            resolve_heads(edit.heads, model.layer_map, model.family)
    return stored_settings(prompt.strip(), model=model.choice, seed=seed, num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale, height=height, width=width, dtype=dtype, edits=edits)
