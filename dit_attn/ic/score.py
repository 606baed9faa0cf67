"""Consistency of generated two-panel sets of the tiny world, read by the judge."""
from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from .canvas import split


def set_consistency(canvases: Sequence[Image.Image], captions: Sequence[str], model=None) -> list[dict]:
    """Judge each 128×64 canvas against its set caption (`[SET] two panels of the same ...`).

    Per set: `same_shape` (the judge reads one shape in both panels), `shape_right` (both are the
    captioned shape), `colors_right` (each panel's colour as captioned), `consistent` (same shape
    and both colours right) and the panels' judged labels.
    """
    from ..toy.data import parse_set_caption
    from ..toy.judge import judge

    if len(canvases) != len(captions):
        raise ValueError(f"got {len(canvases)} canvases but {len(captions)} captions")
    panels = [panel for canvas in canvases for panel in split(canvas, (1, 2))]
    reads = judge(panels, model) if panels else []
    out = []
    for i, text in enumerate(captions):
        s = parse_set_caption(text)
        left, right = reads[2 * i], reads[2 * i + 1]
        same = left["shape"][0] == right["shape"][0] and left["shape"][0] is not None
        colors = left["color"][0] == s.left_color and right["color"][0] == s.right_color
        out.append({
            "same_shape": same, "shape_right": left["shape"][0] == right["shape"][0] == s.shape,
            "colors_right": colors, "consistent": same and colors,
            "left": {k: v[0] for k, v in left.items() if k in ("shape", "color", "background")},
            "right": {k: v[0] for k, v in right.items() if k in ("shape", "color", "background")},
        })
    return out


def summarize(scores: Sequence[dict]) -> dict[str, float]:
    """Fractions of sets with each property."""
    n = max(1, len(scores))
    return {key: sum(s[key] for s in scores) / n for key in ("consistent", "same_shape", "shape_right", "colors_right")}
