"""Joint captions of a panel set: `[TASK] summary; [POS] panel 1; [POS] panel 2 ...` (In-Context LoRA)."""
from __future__ import annotations

from collections.abc import Sequence

from .layout import Layout

SEPARATOR = "; "


def _tag(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string, got {type(text).__name__}")
    bare = text.strip()
    if bare.startswith("[") and bare.endswith("]"):
        bare = bare[1:-1].strip()
    if not bare or any(c in bare for c in "[];"):
        raise ValueError(f"{what} must be a non-empty word without '[', ']' or ';' (e.g. 'SET' or 'LEFT'), got {text!r}")
    return bare


def caption(panels: Sequence[str], layout: Layout | str | tuple[int, int] | None = None, task_tag: str | None = None,
            summary: str | None = None, tags: Sequence[str] | None = None) -> str:
    """One caption for a set of panels, in row-major panel order.

    Format: ``[TASK] summary; [POS] panel 1; [POS] panel 2; ...`` — the head is left out
    without a task tag and a summary, and is ``[TASK]`` or ``summary`` alone with only one.
    Position tags come from the layout (:meth:`Layout.tags`: [LEFT]/[RIGHT], [TOP]/[BOTTOM],
    [TOP-LEFT]..., [PANEL-k] for one row or column, [ROW-r-COL-c] otherwise) unless `tags`
    gives one tag a panel (brackets optional). `layout` None means one row of panels.

    With task tag "SET" and summary "two panels of the same {shape}" this is exactly the
    tiny model's set caption (`dit_attn.toy.data.set_caption`).
    """
    if isinstance(panels, str) or not isinstance(panels, Sequence):
        raise TypeError("panels must be a list of panel captions (one string a panel)")
    layout = Layout(1, max(1, len(panels))) if layout is None else Layout.parse(layout)
    if len(panels) != layout.panels:
        raise ValueError(f"a {layout} layout has {layout.panels} panels, got {len(panels)} panel captions")
    for i, text in enumerate(panels):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"panel {i} needs a non-empty caption string, got {text!r}")
    if tags is None:
        names = layout.tags()
    else:
        if isinstance(tags, str) or len(tags) != layout.panels:
            raise ValueError(f"tags must be a list with one tag a panel ({layout.panels} for a {layout} layout), got {tags!r}")
        names = tuple(_tag(t, "a position tag") for t in tags)
    head = []
    if task_tag is not None:
        head.append(f"[{_tag(task_tag, 'task_tag')}]")
    if summary is not None and summary.strip():
        head.append(summary.strip())
    parts = [" ".join(head)] if head else []
    parts += [f"[{name}] {text.strip()}" for name, text in zip(names, panels)]
    return SEPARATOR.join(parts)
