"""IC-LoRA training data: set images with captions, or panels + a captions JSON composed into sets.

Two layouts of a data directory:

* **set images**: ``metadata.jsonl`` (objects with ``file_name`` and ``text``) or ``NAME.png`` +
  ``NAME.txt`` pairs, each image a whole canvas with its joint caption;
* **panels + ``sets.json``**::

      {"layout": "1x2", "task_tag": "SET", "tags": null,
       "sets": [{"panels": ["s0/left.png", "s0/right.png"],
                 "captions": ["a red circle on a blue background", "a green circle on a blue background"],
                 "summary": "two panels of the same circle"},
                {"panels": [...], "caption": "a full joint caption, used as is"}]}

  Paths are relative to the directory; panels of one set must share one size. Each set may
  override ``layout``, ``task_tag`` and ``tags``; ``captions`` (one a panel) are joined with
  :func:`dit_attn.ic.caption`, or ``caption`` gives the joint caption directly.
"""
from __future__ import annotations

import json
import os

from PIL import Image

from .canvas import compose
from .captions import caption as make_caption
from ..io import write_png_atomic, write_text_atomic
from .layout import Layout

SETS_JSON = "sets.json"


def _set_item(directory: str, entry: dict, defaults: dict, where: str) -> tuple[Image.Image, str]:
    if not isinstance(entry, dict) or not isinstance(entry.get("panels"), list):
        raise ValueError(f"{where}: a set is an object with 'panels' (a list of image paths) and 'captions' or 'caption'")
    layout = Layout.parse(entry.get("layout", defaults.get("layout")) or (1, len(entry["panels"])))
    images = []
    for name in entry["panels"]:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise ValueError(f"{where}: panel image not found: {path}")
        images.append(Image.open(path).convert("RGB"))
    try:
        canvas = compose(images, layout)
        if "caption" in entry:
            text = entry["caption"]
        elif "captions" in entry:
            text = make_caption(entry["captions"], layout, task_tag=entry.get("task_tag", defaults.get("task_tag")),
                                summary=entry.get("summary"), tags=entry.get("tags", defaults.get("tags")))
        else:
            raise ValueError("a set needs 'captions' (one a panel) or 'caption' (the joint caption)")
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err}") from None
    return canvas, text


def read_set_json(directory: str) -> list[tuple[Image.Image, str]]:
    """(canvas, joint caption) of every set in `directory`/sets.json (see the module docstring)."""
    path = os.path.join(directory, SETS_JSON)
    try:
        with open(path) as f:
            spec = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("sets"), list) or not spec["sets"]:
        raise ValueError(f"{path}: expected an object with a non-empty 'sets' list")
    return [_set_item(directory, entry, spec, f"{path}: set {i}") for i, entry in enumerate(spec["sets"])]


def read_set_data(directory: str) -> list[tuple[Image.Image | str, str]]:
    """(image or image path, caption) pairs of an IC training directory: sets.json if present, else set images."""
    from ..train.lora import read_captioned_images

    if os.path.isfile(os.path.join(directory, SETS_JSON)):
        return read_set_json(directory)
    return read_captioned_images(directory)


def write_set_data(directory: str, n: int, seed: int = 0, start: int = 0) -> int:
    """Render sets `start` .. `start`+n−1 of the tiny model's world (128×64, two panels with the same
    shape in two colours, `dit_attn.toy.data.make_set_example`) with their captions into
    `directory` (set-NNNNN.png + metadata.jsonl). Returns n."""
    from ..toy import data

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    os.makedirs(directory, exist_ok=True)
    rows = []
    for i in range(start, start + n):
        example = data.make_set_example(seed, i)
        name = f"set-{i:05d}.png"
        write_png_atomic(example.image, os.path.join(directory, name))
        rows.append(json.dumps({"file_name": name, "text": example.caption}))
    write_text_atomic(os.path.join(directory, "metadata.jsonl"), "\n".join(rows) + "\n")
    return n


def set_captions(n: int, seed: int, start: int = 0) -> list[str]:
    """Captions of sets `start` .. `start`+n−1 of the tiny world's stream `seed` (held-out prompts: another seed)."""
    from ..toy import data

    return [data.make_set_example(seed, i).caption for i in range(start, start + n)]
