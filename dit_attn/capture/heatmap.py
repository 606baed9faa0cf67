"""Heatmaps of captured maps over the generated image."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# the "inferno" colour map at five stops (black → purple → red → orange → pale yellow), interpolated linearly
_STOPS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def colorize(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] → (H, W, 3) uint8 colours."""
    position = np.clip(values, 0, 1) * (len(_STOPS) - 1)
    low = np.minimum(position.astype(np.int64), len(_STOPS) - 2)
    frac = (position - low)[..., None]
    return (_STOPS[low] * (1 - frac) + _STOPS[low + 1] * frac).round().astype(np.uint8)


def overlay(image: Image.Image, maps, alpha: float = 0.6, normalize: bool = True):
    """The image with a map blended over it: `maps` (H, W) gives one PIL image, (N, H, W) a list of N.

    Each map is resized (bilinear) from its token grid to the image, scaled to [0, 1] by its own maximum
    (normalize=True) or taken as is (probabilities), coloured and blended with weight `alpha`.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    values = torch.as_tensor(np.asarray(maps) if not isinstance(maps, torch.Tensor) else maps).detach().float().cpu()
    if values.ndim not in (2, 3):
        raise ValueError(f"maps must be (H, W) or (N, H, W), got shape {tuple(values.shape)}; "
                         "select a row, layer, head and token of a CaptureResult's maps first (or average them)")
    single = values.ndim == 2
    values = values[None] if single else values
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    resized = torch.nn.functional.interpolate(values[:, None], size=base.shape[:2], mode="bilinear",
                                              align_corners=False)[:, 0]
    out = []
    for heat in resized:
        if normalize:
            low, high = float(heat.min()), float(heat.max())
            heat = (heat - low) / (high - low) if high > low else torch.zeros_like(heat)
        colours = colorize(heat.numpy()).astype(np.float32)
        out.append(Image.fromarray((base * (1 - alpha) + colours * alpha).round().astype(np.uint8)))
    return out[0] if single else out
