"""Panels ⇄ canvas by exact-ratio tiling: no gutters, no edge detection, pixel-exact round trips."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from .layout import Layout

ImageLike = Image.Image | torch.Tensor


def _hw(image: ImageLike) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, torch.Tensor) and image.ndim >= 2:
        return int(image.shape[-2]), int(image.shape[-1])
    raise TypeError(f"images must be PIL images or tensors (..., H, W), got {type(image).__name__}")


def compose(images: Sequence[ImageLike], layout: Layout | str | tuple[int, int] | None = None) -> ImageLike:
    """One canvas from panels in row-major order (all the same size; PIL images, or tensors (..., C, H, W)).

    `layout` None puts the panels in one row. Returns a PIL image (mode of the first panel) or a tensor.
    """
    if isinstance(images, (Image.Image, torch.Tensor)) or not isinstance(images, Sequence) or not images:
        raise TypeError("compose needs a non-empty list of panels (PIL images or tensors)")
    layout = Layout(1, len(images)) if layout is None else Layout.parse(layout)
    if len(images) != layout.panels:
        raise ValueError(f"a {layout} layout takes {layout.panels} panels, got {len(images)}")
    sizes = {_hw(im) for im in images}
    if len(sizes) != 1:
        raise ValueError(f"all panels must have the same size, got (H, W) sizes {sorted(sizes)}")
    (h, w), first = sizes.pop(), images[0]
    if isinstance(first, Image.Image):
        if not all(isinstance(im, Image.Image) for im in images):
            raise TypeError("give all panels as PIL images or all as tensors")
        canvas = Image.new(first.mode, (w * layout.cols, h * layout.rows))
        for k, im in enumerate(images):
            r, c = layout.position(k)
            canvas.paste(im.convert(first.mode), (c * w, r * h))
        return canvas
    if not all(isinstance(im, torch.Tensor) for im in images):
        raise TypeError("give all panels as PIL images or all as tensors")
    rows = [torch.cat(list(images[r * layout.cols:(r + 1) * layout.cols]), dim=-1) for r in range(layout.rows)]
    return torch.cat(rows, dim=-2)


def split(image: ImageLike, layout: Layout | str | tuple[int, int]) -> list[ImageLike]:
    """The panels of a canvas in row-major order, by exact ratio (PIL image, or tensor (..., H, W)).

    Raises ValueError naming the nearest valid sizes when the canvas does not divide into the grid.
    """
    layout = Layout.parse(layout)
    height, width = _hw(image)
    ph, pw = layout.check_size(height, width)
    panels = []
    for k in range(layout.panels):
        r, c = layout.position(k)
        if isinstance(image, Image.Image):
            panels.append(image.crop((c * pw, r * ph, (c + 1) * pw, (r + 1) * ph)))
        else:
            panels.append(image[..., r * ph:(r + 1) * ph, c * pw:(c + 1) * pw])
    return panels
