"""Turn the page's form values into the stored settings of `dit-attn generate`, checking each one.

The settings are those `dit-attn generate` stores (see `workflows.batch.stored_settings`: diffusers'
names, the edits as their `to_dict()`; of the local attention options the page offers the radius and
the pooled-key downsample factor, not a weights file, which would be a path typed into the page), so
a PNG's `dit-attn` text chunk from the app and from `dit-attn generate` read the same, and
`workflows.batch.regenerate` rebuilds either.
"""
from __future__ import annotations

from ..io import parse_heads, parse_size
from ..edits import HeadGuidance
from ..heads import heads_by_expert, normalize_heads, resolve_heads
from ..limits import (MAX_LIST_ITEMS, MAX_LOCAL_RADIUS, check_fps, check_frames, check_guidance_scale, check_image_size,
                      check_seed, check_steps, check_text, check_video_size, number, whole_number)
from ..workflows.batch import edits_from_options, makes_videos, stored_settings
from .models import LoadedModel

MAX_SIZE_CHARS = 32  # 'WIDTHxHEIGHT' of any size the machine can hold


def check_form_steps(value) -> int:
    """The page's Steps (num_inference_steps), by the limit every entry point applies."""
    return check_steps(value, "steps")


def check_form_seed(value) -> int:
    return check_seed(value, "seed")


def check_form_cfg(value) -> float | None:
    """The page's CFG scale (guidance_scale); None: the pipeline's default."""
    return None if value is None else check_guidance_scale(value, "CFG scale")


def check_names(name: str, values) -> list[str]:
    """A list field of the page (ticked heads, presets): at most MAX_LIST_ITEMS short strings (None: empty)."""
    if values is None:
        return []
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise ValueError(f"{name} must be a list of names, got {type(values).__name__}")
    if len(values) > MAX_LIST_ITEMS:
        raise ValueError(f"{name}: {len(values):,} items, more than the limit of {MAX_LIST_ITEMS:,}")
    return [check_text(name, value, 100) for value in values]


def collect_heads(text: str | None, picked=None, presets=None) -> list[str]:
    """Heads typed as text ('L1H0, L2'), ticked in the picker and chosen as presets, in that order, without repeats."""
    typed = parse_heads(check_text("heads", text))
    normalize_heads(typed)  # syntax errors name the valid forms
    chosen = [*typed, *check_names("picked heads", picked), *check_names("presets", presets)]
    return list(dict.fromkeys(chosen))


def parse_image_size(text: str | None, model: LoadedModel) -> tuple[int | None, int | None]:
    """(height, width) from 'N' or 'WIDTHxHEIGHT'; (None, None) for the model's default size. Checked by
    `limits.check_image_size` (whole tokens, the model's largest side, the machine's pixel budget) before
    anything is allocated."""
    if text is None or not str(text).strip():
        return None, None
    text = check_text("size", text, MAX_SIZE_CHARS)
    height, width = parse_size(text)
    check_image_size(model.pipe, height, width)
    return height, width


def video_options(model: LoadedModel, num_frames, fps, height, width) -> tuple[int | None, float | None]:
    """(num_frames, fps) of a video model's form, checked by the shared limits (its frame rule, the video pixel
    budget) before anything is allocated; None: the pipeline's default frames, the written video's default fps.
    0 is the page's empty number field, also the default. An image model ignores both fields."""
    if not makes_videos(model.pipe):
        return None, None
    frames = None if _empty(num_frames) else check_frames(num_frames, "frames")
    check_video_size(model.pipe, frames, height, width)
    return frames, (None if _empty(fps) else check_fps(fps))


def _empty(value) -> bool:
    return value is None or value == "" or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0)


def check_model_heads(heads: list[str], model: LoadedModel) -> None:
    """Every head address against the model's layer/head map (a two-expert model: each expert's, E1:/E2: prefixes)."""
    if model.expert_maps:
        for expert, specs in heads_by_expert(heads, model.expert_maps).items():
            resolve_heads(specs, model.expert_maps[expert], model.family)
    else:
        resolve_heads(heads, model.layer_map, model.family)


def _local_radius(value) -> float | None:
    """None (or 0) for full attention; else the radius, whose own checks (finite, > 0) are LocalAttention's."""
    if not value:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_LOCAL_RADIUS:
        raise ValueError(f"local attention radius must be at most {MAX_LOCAL_RADIUS:g} tokens (more is full attention), "
                         f"got {value:g}")
    return value


def build_settings(model: LoadedModel, *, prompt: str, num_inference_steps, guidance_scale, seed, size: str | None,
                   heads: list[str], pag_scale, u, scope: str, target: str = "identity", local_radius=None, start=0.0,
                   end=1.0, local_downsample=None, nag_negative=None, nag_scale=5.0, dtype: str = "float32",
                   num_frames=None, fps=None) -> dict:
    """Checked stored settings; heads are also checked against the model's layer/head map.

    pag_scale, u, scope, target: the HeadGuidance edit's scale and fields (no such edit without heads).
    local_radius: None (or 0) for full attention, else the CLEAR radius in tokens.
    start, end: the fractions of the steps between which head guidance is active.
    local_downsample: None (or 0) or the factor of CLEAR's pooled keys (needs a radius).
    nag_negative, nag_scale: a NAG negative prompt (empty: no NAG) and its scale.
    num_frames, fps: a video model's frame count (None: the pipeline's default) and the fps its video is written at.
    """
    if not check_text("prompt", prompt).strip():
        raise ValueError("the prompt is empty: describe the image to generate")
    height, width = parse_image_size(size, model)
    num_frames, fps = video_options(model, num_frames, fps, height, width)
    seed = check_form_seed(seed)
    num_inference_steps = check_form_steps(num_inference_steps)
    guidance_scale = check_guidance_scale(guidance_scale, "CFG scale")
    options = {
        "heads": list(heads), "pag_scale": check_guidance_scale(pag_scale, "guidance scale"), "u": number("u", u, 0.0, 1.0),
        "target": target, "scope": scope, "start": number("guidance start", start, 0.0, 1.0),
        "end": number("guidance end", end, 0.0, 1.0), "local_radius": _local_radius(local_radius),
        "local_downsample": whole_number("local downsample", local_downsample, 2, 64) if local_downsample else None,
    }
    negative = check_text("NAG negative prompt", nag_negative).strip()
    if negative:
        options["nag_negative"], options["nag_scale"] = negative, number("NAG scale", nag_scale, 1.0, 100.0)
    edits = edits_from_options(options)  # each edit checks its own fields
    for edit in edits:
        if isinstance(edit, HeadGuidance):
            check_model_heads(list(edit.heads), model)
    return stored_settings(prompt.strip(), model=model.choice, seed=seed, num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale, height=height, width=width, dtype=dtype, num_frames=num_frames,
                           fps=fps, edits=edits)
