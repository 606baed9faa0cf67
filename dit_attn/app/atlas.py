"""The Head atlas tab: check the form, bound the work, compute or load an atlas, write PNG/HTML/JSON.

The page offers only objectives that need no path (judge, the palette colours, CLIP score
and PickScore from their default hub ids), so no typed text makes the server read a file.
An atlas made by `dit-attn atlas` is loaded from an upload, never from a typed path.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import re
import uuid
from dataclasses import dataclass

from PIL import Image

from ..guidance.atlas import MAP_SIDE, Atlas, render_html, render_png
from ..limits import (MAX_THUMBNAIL_SIDE, MAX_UPLOAD_BYTES, check_guidance_scale, check_image_header, check_layer_heads,
                      check_seed, check_text, number, whole_number)
from .models import LoadedModel

MAX_PROMPTS = 8
MAX_SEEDS = 4
MAX_ATLAS_STEPS = 50
# (heads + 1) × prompts × seeds × steps denoising steps of one image: the tiny model's 36 heads
# with 2 prompts, 1 seed and 20 steps are 1480; the cap is ~10 minutes of one CPU core there.
MAX_ATLAS_WORK = 20_000
# An atlas of the largest layout (100 layers × 64 heads) has some 30,000 JSON values (scores, thumbnails, the heads
# in its settings); counting the separators first refuses a small file of millions of tiny values before parsing it.
MAX_ATLAS_SEPARATORS = 200_000
NOT_ATLAS = "not an atlas JSON (from `dit-attn atlas`)"


def objective_choices() -> list[str]:
    from ..toy.data import PALETTE

    return ["judge", "judge:soft", *(f"color:{name}" for name in PALETTE), "clip-score", "pickscore"]


@dataclass(frozen=True)
class AtlasRequest:
    objective: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    num_inference_steps: int
    u: float
    scale: float


def parse_prompts(text: str | None) -> tuple[str, ...]:
    prompts = tuple(line.strip() for line in check_text("prompts", text).splitlines() if line.strip())
    if not prompts:
        raise ValueError("no prompts: type one prompt a line")
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS} prompts in the page, got {len(prompts)} "
                         "(for more, run `dit-attn atlas --prompts FILE` from the command line)")
    return prompts


def parse_seeds(text) -> tuple[int, ...]:
    """'0 1' or '0, 1' (or a single number) → (0, 1)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = str(check_seed(text))
    parts = [p for p in re.split(r"[\s,]+", check_text("seeds", text, 1000).strip()) if p]
    if not parts:
        raise ValueError("no seeds: give one or more whole numbers, e.g. '0 1'")
    try:
        seeds = tuple(dict.fromkeys(int(p) for p in parts))
    except ValueError:
        raise ValueError(f"seeds must be whole numbers separated by spaces or commas, got {text!r}") from None
    if len(seeds) > MAX_SEEDS:
        raise ValueError(f"at most {MAX_SEEDS} seeds in the page, got {len(seeds)}")
    for seed in seeds:
        check_seed(seed)
    return seeds


def check_prompts_for(objective: str, prompts: tuple[str, ...]) -> None:
    """The judge reads only the tiny world's captions: refuse others before generating anything."""
    if objective.partition(":")[0] != "judge":
        return
    from ..toy.data import parse_caption

    for prompt in prompts:
        try:
            parse_caption(prompt)
        except ValueError as err:
            raise ValueError(f"the judge objective scores captions of the tiny model's world (e.g. 'a red circle on a "
                             f"white background'); cannot read {prompt!r}: {err}") from None


def atlas_request(objective, prompts_text, seeds_text, num_inference_steps, u, scale) -> AtlasRequest:
    choices = objective_choices()
    if objective not in choices:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(choices)}")
    prompts = parse_prompts(prompts_text)
    check_prompts_for(objective, prompts)
    return AtlasRequest(objective, prompts, parse_seeds(seeds_text),
                        whole_number("steps", num_inference_steps, 1, MAX_ATLAS_STEPS),
                        number("u", u, 0.0, 1.0), check_guidance_scale(scale, "guidance scale"))


def check_work(model: LoadedModel, request: AtlasRequest) -> int:
    """The number of image-steps the atlas costs; ValueError naming the cap when it is too many."""
    heads = sum(info.heads for info in model.layer_map)
    work = (heads + 1) * len(request.prompts) * len(request.seeds) * request.num_inference_steps
    if work > MAX_ATLAS_WORK:
        raise ValueError(
            f"this atlas needs {work} image-steps ((heads + 1) × prompts × seeds × steps = {heads + 1} × "
            f"{len(request.prompts)} × {len(request.seeds)} × {request.num_inference_steps}); the page allows at most "
            f"{MAX_ATLAS_WORK}: "
            "use fewer prompts, seeds or steps, or run `dit-attn atlas` from the command line")
    return work


def write_atlas(result: Atlas, directory: str, name: str) -> tuple[str, str, str]:
    """PNG, HTML and JSON of `result` in `directory` (fresh names); their paths."""
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, f"atlas-{name}-{uuid.uuid4().hex[:8]}")
    paths = base + ".png", base + ".html", base + ".json"
    render_png(result, paths[0])
    render_html(result, paths[1])
    result.save(paths[2])
    return paths


def _markdown_text(value) -> str:
    """`value` as literal Markdown text (an uploaded atlas's strings must not become links or HTML)."""
    return re.sub(r"([\\`*_{}\[\]()<>#+\-.!|~&])", r"\\\1", str(value))


def summarize(result: Atlas, top: int = 3) -> str:
    ranked = sorted(result.scores, key=result.delta)
    rises = ", ".join(f"{h} {result.delta(h):+.3g}" for h in reversed(ranked[-top:]))
    drops = ", ".join(f"{h} {result.delta(h):+.3g}" for h in ranked[:top])
    return (f"**{_markdown_text(result.settings.get('objective'))}**, {len(result.scores)} heads; baseline (no guidance) "
            f"{result.baseline:.4g}. Largest rises: {rises}. Largest drops: {drops}.")


def _field(data: dict, key: str, kind, what: str):
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{NOT_ATLAS}: {key!r} must be {what}")
    return value


def _check_thumbnail(head: str, text) -> None:
    """A base64 PNG of at most MAX_THUMBNAIL_SIDE px a side: its header is read and checked before it is decoded."""
    what = f"{NOT_ATLAS}: the thumbnail of {head}"
    if not isinstance(text, str):
        raise ValueError(f"{what} is not a base64 PNG")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not a base64 PNG") from None
    try:
        image = Image.open(io.BytesIO(data))
    except Exception:  # PIL raises OSError, SyntaxError, DecompressionBombError... for what is not an image
        raise ValueError(f"{what} is not a base64 PNG") from None
    if image.format != "PNG":
        raise ValueError(f"{what} is not a base64 PNG (it is {image.format})")
    check_image_header(image, what, max_side=MAX_THUMBNAIL_SIDE)
    try:
        image.load()  # bounded by the header just checked
    except Exception:
        raise ValueError(f"{what} is a broken PNG") from None


def _check_setting(settings: dict, key: str, kinds, max_chars: int) -> None:
    value = settings.get(key)
    if value is None:
        return
    if isinstance(value, str):
        check_text(f"{NOT_ATLAS}: its setting {key!r}", value, max_chars)
    elif isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"{NOT_ATLAS}: its setting {key!r} must be text or a number, got {type(value).__name__}")


def _check_maps(data: dict, scores: dict) -> tuple[dict, str | None]:
    """An atlas's optional head maps: for scored heads, rectangular grids of at most MAP_SIDE a side of finite
    numbers, and the word they map (text)."""
    maps, word = data.get("maps") or {}, data.get("maps_word")
    if not isinstance(maps, dict):
        raise ValueError(f"{NOT_ATLAS}: 'maps' must be an object of head -> rows of numbers")
    if not maps:
        return {}, None
    if not isinstance(word, str):
        raise ValueError(f"{NOT_ATLAS}: its maps need 'maps_word', the word they map")
    check_text(f"{NOT_ATLAS}: its 'maps_word'", word, 100)
    for head, rows in maps.items():
        if head not in scores:
            raise ValueError(f"{NOT_ATLAS}: a map for {head[:40]!r}, a head it does not score")
        if (not isinstance(rows, list) or not 0 < len(rows) <= MAP_SIDE
                or not all(isinstance(r, list) and 0 < len(r) <= MAP_SIDE and len(r) == len(rows[0]) for r in rows)):
            raise ValueError(f"{NOT_ATLAS}: the map of {head} must be rows of equal length, at most {MAP_SIDE} × {MAP_SIDE}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for r in rows for v in r):
            raise ValueError(f"{NOT_ATLAS}: the map of {head} holds a value that is not a finite number")
    return maps, word


def read_atlas(path: str) -> Atlas:
    """An uploaded atlas JSON, checked field by field against a real layout before anything is drawn: at most
    MAX_ATLAS_LAYERS layers × MAX_ATLAS_HEADS heads, thumbnails PNGs of at most MAX_THUMBNAIL_SIDE px (their headers
    checked before they are decoded), the file at most MAX_UPLOAD_BYTES."""
    size = os.path.getsize(path)
    if size > MAX_UPLOAD_BYTES:
        raise ValueError(f"the atlas file is {size / 2**20:.1f} MB, larger than the limit of {MAX_UPLOAD_BYTES // 2**20} MB")
    with open(path, "rb") as f:
        raw = f.read()
    separators = raw.count(b",") + raw.count(b":")
    if separators > MAX_ATLAS_SEPARATORS:
        raise ValueError(f"{NOT_ATLAS}: it holds {separators:,} values, more than an atlas of the largest layout "
                         f"(the limit is {MAX_ATLAS_SEPARATORS:,})")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{NOT_ATLAS}: {err}") from None
    except RecursionError:
        raise ValueError(f"{NOT_ATLAS}: it is nested too deeply") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise ValueError(f"{NOT_ATLAS}: {err}") from None
    del raw
    if not isinstance(data, dict):
        raise ValueError(f"{NOT_ATLAS}: expected an object")
    baseline = _field(data, "baseline", (int, float), "a number")
    scores = _field(data, "scores", dict, "an object of head -> score")
    thumbnails = _field(data, "thumbnails", dict, "an object of head -> PNG")
    layer_heads = _field(data, "layers", list, "a list of heads per layer")
    settings = _field(data, "settings", dict, "an object")
    if not math.isfinite(baseline):
        raise ValueError(f"{NOT_ATLAS}: 'baseline' must be a finite number")
    try:
        check_layer_heads(layer_heads, f"{NOT_ATLAS}: 'layers'")
    except ValueError as err:
        raise ValueError(f"{err} (integers > 0)") from None
    if not scores:
        raise ValueError(f"{NOT_ATLAS}: it scores no head")
    valid = {f"L{layer}H{head}" for layer, n in enumerate(layer_heads) for head in range(n)}
    for head, score in scores.items():
        if head not in valid:
            raise ValueError(f"{NOT_ATLAS}: head {head[:40]!r} is not in its {len(layer_heads)} layers")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"{NOT_ATLAS}: the score of {head} is not a finite number")
    for head in [*scores, "baseline"]:
        if head not in thumbnails:
            raise ValueError(f"{NOT_ATLAS}: no thumbnail for {head}")
        _check_thumbnail(head, thumbnails[head])
    _check_setting(settings, "objective", (), 200)
    for key in ("u", "scale"):
        _check_setting(settings, key, (int, float), 50)
    settings.setdefault("objective", "objective")
    settings.setdefault("u", "?")
    settings.setdefault("scale", "?")
    thumbnails = {head: thumbnails[head] for head in [*scores, "baseline"]}  # only those drawn are kept
    maps, maps_word = _check_maps(data, scores)
    return Atlas(float(baseline), {h: float(v) for h, v in scores.items()}, thumbnails, layer_heads, settings,
                 maps, maps_word)
