"""The Text edit tab: a sign prompt and its twin with new quoted text patched into the text
layers (`da.edit_text`), optionally the prompt under a TextGuard blocklist."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from ..handle import apply
from ..edits import TextGuard
from ..loading import call_defaults
from ..io import parse_layer_groups
from ..localization.editing import TextEdit, edit_text
from ..localization.prompts import guarded_prompt
from ..localization.score import to_pil
from .models import LoadedModel

DEFAULT_SIGN_PROMPT = 'a sign that says "A" in red on a white background'
REPLACEMENT = "****"


def text_layers(text: str | None, model: LoadedModel) -> tuple[int, ...]:
    """Layers typed as '2' or '2,3' ('+' reads as ','); empty: the model's known text layers."""
    if text is None or not str(text).strip():
        known = model.text_layers()
        if not known:
            raise ValueError("give the text layers (e.g. '2' or '2,3'): none are on record for this model; "
                             "find them with `dit-attn localize --signs 20 --model ...`")
        return known
    groups = parse_layer_groups(str(text).replace("+", ","))
    return tuple(sorted({layer for group in groups for layer in group}))


def parse_blocklist(text: str | None) -> tuple[str, ...]:
    """Words separated by commas or new lines; empty: no guard."""
    return tuple(w.strip() for w in re.split(r"[,\n]", text or "") if w.strip())


@dataclass
class TextEditResult:
    edit: TextEdit
    guarded: Image.Image | None  # the prompt generated under the TextGuard (None without a blocklist)
    blocked: bool  # whether the prompt's quoted text has a blocked word (else the guarded image is the original)


def run_text_edit(model: LoadedModel, prompt: str, new_text: str, layers: tuple[int, ...], start: float, seed: int,
                  num_inference_steps: int, pipe_kwargs: dict, blocklist: tuple[str, ...] = (),
                  on_step: Callable[[int], None] | None = None) -> TextEditResult:
    """`edit_text` (original, then edited, from a CPU generator seeded `seed`) and, with a blocklist, the guarded
    original from the same seed; pipe_kwargs: guidance_scale, height, width (absent: the model's default) and
    other pipeline-call arguments. `on_step(done)` counts the steps of all the generations."""
    guard = TextGuard(blocklist, REPLACEMENT, layers) if blocklist else None  # checks the words before generating
    done = 0

    def step_ended(pipe, step, timestep, tensors) -> dict:
        nonlocal done
        done += 1
        on_step(done)
        return {}

    callback = {"callback_on_step_end": step_ended} if on_step else {}
    with model.lock:
        edit = edit_text(model.pipe, prompt, new_text, layers=layers, start=start,
                         generator=torch.Generator(device="cpu").manual_seed(seed), num_inference_steps=num_inference_steps,
                         **pipe_kwargs, **callback)
        guarded = None
        if guard is not None:
            with apply(model.pipe, guard):
                out = model.pipe(prompt=prompt, generator=torch.Generator(device="cpu").manual_seed(seed),
                                 num_inference_steps=num_inference_steps, output_type="pt",
                                 **{**call_defaults(model.pipe), **pipe_kwargs}, **callback)
            guarded = to_pil(out.images.float().cpu())[0]  # converted as edit_text converts its images
    blocked = bool(blocklist) and guarded_prompt(prompt, blocklist, REPLACEMENT) is not None
    return TextEditResult(edit, guarded, blocked)
