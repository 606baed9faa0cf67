"""Head atlas: every head's effect on an objective when guidance perturbs it alone.

`atlas(pipe, objective, prompts, seeds)` scores each head h by the mean objective of
images guided away from {h} (the first round of a head search), minus the objective of
the unguided images, and keeps one thumbnail per head; with `maps_word`, also each head's
cross-attention map of that word on the unguided image of the first (prompt, seed).
`render_png` draws a layers × heads heatmap with thumbnails; `render_html` writes a
self-contained page (images inline, each head's map beside its change). Resumable through
the checkpoint (scores, thumbnails and maps, written per batch).
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import asdict, dataclass, field

from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from ..heads import model_layers
from ..loading import sequence_length
from .objectives import get_objective
from ..families import check_image_pipeline
from .search import (candidate_heads, check_checkpoint_settings, checked_scores, generate, head_name, pairs_of, score_batch,
                     search_settings)
from ..io import write_atomic, write_json_atomic, write_text_atomic

THUMB = 48
MAP_SIDE = 32  # a head's map is kept at most this many tokens a side (larger grids are average-pooled)


@dataclass
class Atlas:
    baseline: float  # mean objective without guidance
    scores: dict[str, float]  # head -> mean objective with that head perturbed
    thumbnails: dict[str, str]  # head -> PNG (base64) of its first (prompt, seed) image; "baseline" too
    layers: list[int]  # heads per layer
    settings: dict
    maps: dict[str, list[list[float]]] = field(default_factory=dict)  # head -> its map of maps_word (token grid)
    maps_word: str | None = None

    def delta(self, head: str) -> float:
        return self.scores[head] - self.baseline

    def save(self, path: str) -> None:
        write_json_atomic(path, asdict(self))


def png_base64(image: Image.Image, size: int = THUMB) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").resize((size, size), Image.LANCZOS).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def atlas(pipe, objective, prompts, seeds=(0,), u: float = 1.0, scale: float = 3.0, num_inference_steps: int = 20,
          guidance_scale: float | None = None, height: int | None = None, width: int | None = None, batch_size: int = 4,
          target: str = "identity", scope: str = "joint", max_sequence_length: int | None = None,
          checkpoint: str | None = None, progress: bool = True, maps_word: str | None = None) -> Atlas:
    """Every head's mean objective when head guidance (u, scale, target, scope) perturbs it alone, over
    prompts × seeds, against no guidance. num_inference_steps, guidance_scale, height, width: the
    pipeline call's (None: the pipeline's default). checkpoint: JSON path written per batch; an existing
    one with the same settings is resumed (one written with the older names steps/cfg/size too).
    maps_word: a word of the first prompt; each head's cross-attention map of it (`Capture`, mean over
    the steps) on an unguided call of the first (prompt, seed), one extra generation."""
    check_image_pipeline(pipe, "atlas")
    if maps_word is not None:
        _check_maps_word(pipe, prompts, maps_word)
    score_fn = get_objective(objective)
    heads = candidate_heads(pipe)
    settings = search_settings(objective, prompts, seeds, 1, 1, u, scale, num_inference_steps, guidance_scale, height,
                               width, heads, target, scope, batch_size, sequence_length(pipe, max_sequence_length))
    state = {"baseline": None, "scores": {}, "thumbnails": {}, "maps": {}, "maps_word": maps_word}
    if checkpoint and os.path.exists(checkpoint):
        with open(checkpoint) as f:
            saved = json.load(f)
        check_checkpoint_settings(checkpoint, saved["settings"], settings, "use another path")
        if saved["state"].get("maps_word") != maps_word:
            raise ValueError(f"checkpoint {checkpoint!r} was written with maps_word={saved['state'].get('maps_word')!r}, "
                             f"not {maps_word!r}: use another path")
        state = {"maps": {}, **saved["state"]}

    def save() -> None:
        if checkpoint:
            write_json_atomic(checkpoint, {"settings": asdict(settings), "state": state})

    pairs = pairs_of(settings)
    if state["baseline"] is None:
        images = generate(pipe, settings, pairs)
        scores = checked_scores(score_fn, images, [p for p, _ in pairs])
        state["baseline"] = sum(scores) / len(scores)
        state["thumbnails"]["baseline"] = png_base64(images[0])
        save()
    if maps_word is not None and not state["maps"]:
        state["maps"] = head_maps(pipe, settings, pairs[0], maps_word)
        save()
    bar = tqdm(total=len(heads), desc="atlas", unit="head", disable=not progress)
    for start in range(0, len(heads), batch_size):
        batch = heads[start : start + batch_size]
        if all(head_name(h) in state["scores"] for h in batch):
            bar.update(len(batch))
            continue
        scores, images = score_batch(pipe, score_fn, settings, [], batch, keep_images=True)
        state["scores"].update(scores)
        state["thumbnails"].update({name: png_base64(image) for name, image in images.items()})
        save()
        bar.update(len(batch))
    bar.close()
    layer_heads = [info.heads for info in model_layers(pipe.transformer)]
    return Atlas(state["baseline"], state["scores"], state["thumbnails"], layer_heads, asdict(settings),
                 state.get("maps") or {}, maps_word)


def _check_maps_word(pipe, prompts, word) -> None:
    """The word is one word of the first prompt whose tokens this family's tokenizers find (before any generation)."""
    from ..capture.words import word_positions
    from ..families import family_of_pipeline

    if not isinstance(word, str) or not word.strip() or len(word.split()) != 1:
        raise ValueError(f"maps_word must be one word of the first prompt, got {word!r}")
    word_positions(pipe, family_of_pipeline(pipe).name, prompts[0], (word,))


def head_maps(pipe, settings, pair: tuple[str, int], word: str) -> dict[str, list[list[float]]]:
    """Each head's cross-attention map of `word` (mean over the steps) on the unguided call of `pair`:
    head name -> rows of the token grid (average-pooled to at most MAP_SIDE a side)."""
    import torch

    from ..edits import Capture
    from ..handle import apply

    with apply(pipe, Capture(tokens=[word])) as handle:
        generate(pipe, settings, [pair])
        result = handle.maps
    maps = result.maps[0, :, :, 0]  # (layers, heads, H, W)
    grid_h, grid_w = result.grid
    if max(grid_h, grid_w) > MAP_SIDE:
        maps = torch.nn.functional.adaptive_avg_pool2d(maps, (min(grid_h, MAP_SIDE), min(grid_w, MAP_SIDE)))
    return {f"L{layer}H{head}": maps[li, hi].tolist() for li, layer in enumerate(result.layers)
            for hi, head in enumerate(result.heads)}


def map_overlay_base64(result: Atlas, head: str, size: int = THUMB) -> str:
    """The head's map over the baseline thumbnail, as a base64 PNG."""
    import torch

    from ..capture.heatmap import overlay

    base = Image.open(io.BytesIO(base64.b64decode(result.thumbnails["baseline"]))).convert("RGB").resize((size, size))
    return png_base64(overlay(base, torch.tensor(result.maps[head], dtype=torch.float32)), size)


def _color(delta: float, extent: float) -> tuple[int, int, int]:
    """Diverging: blue (objective down) - white - red (objective up)."""
    x = max(-1.0, min(1.0, delta / extent)) if extent > 0 else 0.0
    if x >= 0:
        return 255, int(255 * (1 - x)), int(255 * (1 - x))
    return int(255 * (1 + x)), int(255 * (1 + x)), 255


def _extent(result: Atlas) -> float:
    return max((abs(result.delta(h)) for h in result.scores), default=0.0)


def render_png(result: Atlas, path: str) -> None:
    """Heatmap: a row per layer, a cell per head (thumbnail on a frame coloured by the change).

    The layout is checked first (at most limits.MAX_ATLAS_LAYERS layers × MAX_ATLAS_HEADS heads) and each
    thumbnail's header before it is decoded (at most MAX_THUMBNAIL_SIDE px a side), so the canvas is bounded."""
    from ..limits import MAX_THUMBNAIL_SIDE, check_image_header, check_layer_heads

    check_layer_heads(result.layers, "the atlas")
    cell, margin, label = THUMB + 8, 4, 40
    cell_width = cell + (THUMB + 2 if result.maps else 0)  # the head's map beside its thumbnail
    n_heads = max(result.layers)
    width, height = label + n_heads * cell_width + margin, 24 + len(result.layers) * cell + 24
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    extent = _extent(result)
    maps_note = f"; right: map of '{result.maps_word}'" if result.maps else ""
    draw.text((margin, 4), f"{result.settings['objective']}: change vs no guidance (baseline {result.baseline:.4g}, "
                           f"max |change| {extent:.3g}){maps_note}", fill="black", font=font)
    for layer, heads in enumerate(result.layers):
        y = 24 + layer * cell
        draw.text((margin, y + cell // 2 - 6), f"L{layer}", fill="black", font=font)
        for head in range(heads):
            name = f"L{layer}H{head}"
            x = label + head * cell_width
            if name not in result.scores:
                continue
            draw.rectangle([x, y, x + cell_width - 2, y + cell - 2], fill=_color(result.delta(name), extent))
            thumb = Image.open(io.BytesIO(base64.b64decode(result.thumbnails[name])))
            check_image_header(thumb, f"the thumbnail of {name}", max_side=MAX_THUMBNAIL_SIDE)
            canvas.paste(thumb, (x + 3, y + 3))
            if name in result.maps:
                canvas.paste(Image.open(io.BytesIO(base64.b64decode(map_overlay_base64(result, name)))),
                             (x + 5 + THUMB, y + 3))
    for head in range(n_heads):
        draw.text((label + head * cell_width + cell_width // 2 - 8, height - 20), f"H{head}", fill="black", font=font)
    write_atomic(path, lambda f: canvas.save(f, format="PNG"))


def render_html(result: Atlas, path: str) -> None:
    """One self-contained page: the table of heads, each cell coloured, with its thumbnail and numbers.

    Every string taken from the atlas (settings, thumbnails, names) is HTML-escaped: an atlas read from a file
    cannot put markup or script into the page."""
    from ..limits import check_layer_heads

    def text(value) -> str:
        return html.escape(str(value), quote=True)

    def number(value, spec: str) -> str:
        return text(format(value, spec)) if isinstance(value, (int, float)) and not isinstance(value, bool) else text(value)

    check_layer_heads(result.layers, "the atlas")
    extent = _extent(result)
    rows = []
    for layer, heads in enumerate(result.layers):
        cells = []
        for head in range(heads):
            name = f"L{layer}H{head}"
            if name not in result.scores:
                cells.append("<td></td>")
                continue
            r, g, b = _color(result.delta(name), extent)
            tip = f"{name}: {result.scores[name]:.4g} (change {result.delta(name):+.4g})"
            head_map = ""
            if name in result.maps:
                head_map = (f'<img class="map" src="data:image/png;base64,{text(map_overlay_base64(result, name))}" '
                            f'alt="{text(name)} map of {text(result.maps_word)}">')
            cells.append(f'<td style="background:rgb({r},{g},{b})" title="{text(tip)}">'
                         f'<img src="data:image/png;base64,{text(result.thumbnails[name])}" alt="{text(name)}">'
                         f'{head_map}<br>{text(format(result.delta(name), "+.3g"))}</td>')
        rows.append(f"<tr><th>L{layer}</th>{''.join(cells)}</tr>")
    header = "".join(f"<th>H{h}</th>" for h in range(max(result.layers)))
    settings = text(json.dumps(result.settings, indent=1))
    maps_note = ""
    if result.maps:
        maps_note = (f" Beside each thumbnail: the head's cross-attention map of “{text(result.maps_word)}” on the "
                     "unguided image of the first prompt (bright: more attention; hover to enlarge).")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dit-attn head atlas</title>
<style>body{{font-family:sans-serif}} td{{text-align:center;font-size:11px;padding:3px}} td img{{display:inline-block;margin:1px}}
td:hover img.map{{transform:scale(3);position:relative;z-index:1;outline:1px solid black}}</style>
</head><body>
<h1>Head atlas: {text(result.settings['objective'])}</h1>
<p>Each cell: the images with that head perturbed by head guidance (u={text(result.settings['u'])}, scale={text(result.settings['scale'])}),
and the change of the mean objective against no guidance (baseline {number(result.baseline, '.4g')};
<img style="display:inline" src="data:image/png;base64,{text(result.thumbnails['baseline'])}" alt="baseline">).
Red: the objective goes up; blue: down.{maps_note}</p>
<table><tr><th></th>{header}</tr>{''.join(rows)}</table>
<details><summary>settings</summary><pre>{settings}</pre></details>
</body></html>
"""
    write_text_atomic(path, page)
