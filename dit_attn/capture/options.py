"""A Capture from text fields (the CLI's flags, the app's form), every field checked before a model loads."""
from __future__ import annotations

from ..edits import Capture
from .words import check_words_in_prompt, prompt_words


def parse_indices(name: str, text: str | None) -> list[int] | None:
    """'0,3,5' → [0, 3, 5]; None or blank → None (every one)."""
    if text is None or not text.strip():
        return None
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated indices, e.g. 0,3,5; got {text!r}") from None
    if not values:
        raise ValueError(f"{name} is empty; give comma-separated indices, e.g. 0,3,5")
    return values


def parse_locations(name: str, text: str) -> list[tuple[int, ...]]:
    """'4,4;0,7' → [(4, 4), (0, 7)]: (row, col) cells of the token grid; a video's cells are frame,row,col."""
    cells = []
    for part in (p for p in text.replace(" ", "").split(";") if p):
        try:
            cell = tuple(int(v) for v in part.split(","))
        except ValueError:
            cell = ()
        if len(cell) not in (2, 3):
            raise ValueError(f"{name} takes row,col cells (a video: frame,row,col) separated by ';', e.g. '4,4;0,7'; "
                             f"got {text!r}")
        cells.append(cell)
    if not cells:
        raise ValueError(f"{name} is empty; give row,col cells separated by ';', e.g. '4,4;0,7'")
    return cells


def parse_words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def capture_from_fields(prompt: str, kind: str = "cross", words: str | None = None, tokens: str | None = None,
                        locations: str | None = None, layers: str | None = None, heads: str | None = None,
                        steps: list[int] | str | None = None, names: dict | None = None) -> Capture:
    """The Capture the fields describe. cross: `tokens` (indices) or `words` of the prompt (default: every word);
    self: `locations`; concept: `words` (the concepts). `names`: how the fields are called in messages."""
    names = {"words": "--words", "tokens": "--tokens", "locations": "--locations", "layers": "--layers",
             "heads": "--heads", "steps": "--capture-steps", "kind": "--kind", **(names or {})}
    if kind not in ("cross", "self", "concept"):
        raise ValueError(f"{names['kind']} must be one of cross, self, concept; got {kind!r}")
    layer_list, head_list = parse_indices(names["layers"], layers), parse_indices(names["heads"], heads)
    if isinstance(steps, str) or steps is None:
        steps = parse_indices(names["steps"], steps)
    if kind == "self":
        if locations is None or not locations.strip():
            raise ValueError(f"{names['kind']} self needs {names['locations']}, e.g. '4,4;0,7' (row,col cells of the "
                             "token grid)")
        chosen = parse_locations(names["locations"], locations)
    elif kind == "concept":
        chosen = parse_words(words or "")
        if not chosen:
            raise ValueError(f"{names['kind']} concept needs {names['words']}: the concept words (they need not be in "
                             "the prompt), e.g. cat,sky")
    elif tokens is not None and tokens.strip():
        chosen = parse_indices(names["tokens"], tokens)
    else:
        chosen = parse_words(words or "") or prompt_words(prompt)
        check_words_in_prompt(prompt, chosen)
    return Capture(layers=layer_list, heads=head_list, tokens=chosen, kind=kind, steps=steps)
