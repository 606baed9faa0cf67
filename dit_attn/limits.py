"""The limits every entry point checks before it allocates: the Python API, every CLI command and
every app endpoint call these functions, so one request cannot ask for more than the model or the
machine can give, and every refusal names the limit.

The image-size limits come from the model (its family's largest latent grid, e.g. SD3's position-
embedding table, and the pixels a token covers) and from the machine: `DIT_ATTN_MAX_PIXELS`
(pixels an image may have, default 4096×4096) is the memory budget's knob.
"""
from __future__ import annotations

import math
import os

MAX_STEPS = 1000
MAX_SEED = 2**63 - 1
MAX_UPLOAD_BYTES = 64 * 2**20
DEFAULT_MAX_PIXELS = 4096 * 4096


def whole_number(name: str, value, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high]; bools, fractions, NaN and infinities are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value != int(value):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if int(value) < low or (high is not None and int(value) > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {int(value)}")
    return int(value)


def number(name: str, value, low: float | None = None, high: float | None = None) -> float:
    """`value` as a finite float in [low, high] (either bound may be None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"in [{low}, {high}]" if low is not None and high is not None
                  else f">= {low}" if low is not None else f"<= {high}")
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return float(value)


def check_steps(steps, name: str = "num_inference_steps") -> int:
    return whole_number(name, steps, 1, MAX_STEPS)


def check_seed(seed, name: str = "seed") -> int:
    return whole_number(name, seed, 0, MAX_SEED)


def max_pixels() -> int:
    """The machine's pixel budget for one image (DIT_ATTN_MAX_PIXELS, default 4096×4096)."""
    text = os.environ.get("DIT_ATTN_MAX_PIXELS")
    if text is None:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"DIT_ATTN_MAX_PIXELS must be a whole number of pixels, got {text!r}") from None
    if value < 1:
        raise ValueError(f"DIT_ATTN_MAX_PIXELS must be >= 1, got {value}")
    return value


def check_pixels(height: int | None, width: int | None) -> None:
    """The machine's budget alone (no model needed): sides >= 1 and height × width within max_pixels()."""
    for name, side in (("height", height), ("width", width)):
        if side is not None:
            whole_number(name, side, 1)
    if height is not None and width is not None and height * width > max_pixels():
        raise ValueError(f"{width}x{height} is {height * width:,} pixels, more than this machine's budget of "
                         f"{max_pixels():,} (DIT_ATTN_MAX_PIXELS)")


def size_multiple(pipe) -> int:
    """Image sides must be whole transformer tokens: VAE scale × the pixels a latent token covers."""
    from .families import family_of

    vae_scale = int(getattr(pipe, "vae_scale_factor", 8))
    return vae_scale * family_of(pipe.transformer).latent_patch(pipe.transformer)


def max_side(pipe) -> int | None:
    """The largest image side the model can address (None: no limit from the model)."""
    from .families import family_of

    tokens = family_of(pipe.transformer).max_token_side(pipe.transformer)
    return None if tokens is None else tokens * size_multiple(pipe)


def check_image_size(pipe, height: int | None, width: int | None) -> None:
    """Refuse, before any allocation, a size the model cannot draw or the machine cannot hold.
    None: the pipeline's default size."""
    check_pixels(height, width)
    multiple, largest = size_multiple(pipe), max_side(pipe)
    for name, side in (("height", height), ("width", width)):
        if side is None:
            continue
        if side % multiple:
            raise ValueError(f"{name} must be a multiple of {multiple} px on this model (whole tokens), got {side}")
        if largest is not None and side > largest:
            raise ValueError(f"{name} {side} px is more than this model's largest side, {largest} px")
