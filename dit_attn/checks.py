"""Argument checks and choices shared by edits and kernels (no torch import: edits stay light)."""
from __future__ import annotations

import math


def check_fraction(name: str, value) -> None:
    """A ValueError naming `name` unless `value` is a real number in [0, 1] (not a bool, not NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


TARGETS = ("identity", "uniform")  # what a perturbed head's attention map moves toward
SCOPES = ("joint", "image")  # the whole joint sequence, or image->image attention of image queries only


MAX_LOCAL_RADIUS = 4096.0  # tokens: beyond any image grid (a larger radius is full attention; 1e308 overflows its square)


def check_radius(radius) -> None:
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius <= 0:
        raise ValueError(f"radius must be a finite number > 0 (in tokens), got {radius!r}")
    if radius > MAX_LOCAL_RADIUS:
        raise ValueError(f"radius must be at most {MAX_LOCAL_RADIUS:g} tokens (beyond any image grid), got {radius!r}")


WINDOW_SHAPES = ("ellipsoid", "box")  # a 3-D local window: (dt/rt)² + (dh/rh)² + (dw/rw)² < 1, or |dt| < rt, |dh| < rh, |dw| < rw


def check_window_shape(shape) -> None:
    if shape not in WINDOW_SHAPES:
        raise ValueError(f"shape must be one of {', '.join(map(repr, WINDOW_SHAPES))} (the 3-D window), got {shape!r}")
