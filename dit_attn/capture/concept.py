"""The concept rows of `Capture(kind="concept")` (ConceptAttention, Helbling et al., ICML 2025).

After each captured transformer call, a second call runs the conditional rows again, each with one
extra row whose text is the concept words (appended as TextPatch's source rows are; nothing is
patched). At every captured layer that row takes its conditional row's image queries, keys and values
(`EditState.shared_image_layers`, as NAG's negative rows do), so the concept tokens attend to the image
while the image never sees them. The pipeline's own call is left as it is, so the image is the one
without the capture. The concept rows get their conditional row's pooled text embedding, so their
blocks modulate as the prompt's text does.
"""
from __future__ import annotations

import torch

from ..hooks.calls import take_rows
from ..localization.patching import PatchRows, encode_prompts


def concept_prompt(words: tuple[str, ...]) -> str:
    return " ".join(words)


class ConceptRows:
    def __init__(self, pipe, family, layers: tuple[int, ...], words: tuple[str, ...]):
        self.pipe, self.family, self.layers = pipe, family, layers
        self.prompt = concept_prompt(words)
        self._cache: tuple | None = None  # (key, embeds, pooled) of the concept prompt

    def _encoded(self, call: dict) -> tuple[torch.Tensor, torch.Tensor]:
        text = call.get("encoder_hidden_states")
        where = text if isinstance(text, torch.Tensor) else self.pipe.transformer  # Z-Image: per-row caption lists
        text_len = text.shape[1] if isinstance(text, torch.Tensor) else self.family.text_length(call)
        key = (self.pipe.scheduler.timesteps, text_len, where.device, where.dtype)
        if self._cache is None or key[0] is not self._cache[0][0] or key[1:] != self._cache[0][1:]:
            embeds, pooled = encode_prompts(self.pipe, self.family, [self.prompt], key[1], where.device, where.dtype)
            self._cache = (key, embeds, pooled)
        return self._cache[1], self._cache[2]

    def call_for(self, call: dict, rows: torch.Tensor) -> tuple[dict, PatchRows]:
        """The inputs of `rows` of the call, and the concept rows to append to them (row i + R follows row i)."""
        count = rows.numel()
        batch = self.family.batch_size(call)
        cond = {name: take_rows(value, rows) if name in self.family.rows.call_args and _per_row(value, batch) else value
                for name, value in call.items()}
        embeds, pooled = self._encoded(call)
        own_pooled = cond.get("pooled_projections")
        if own_pooled is not None and own_pooled.shape[1:] == pooled.shape[1:]:
            pooled = own_pooled
        else:
            pooled = pooled.expand(count, *pooled.shape[1:])
        patch = PatchRows(sources={i: count + i for i in range(count)}, targets=torch.arange(count),
                          embeds=embeds.expand(count, *embeds.shape[1:]), pooled=pooled,
                          patch_end=max(self.layers) + 1, family=self.family)
        return cond, patch


def _per_row(value, batch: int) -> bool:
    if isinstance(value, torch.Tensor):
        return value.ndim > 0 and value.shape[0] == batch
    return isinstance(value, (list, tuple)) and len(value) == batch
