"""The concept rows of `Capture(kind="concept")` (ConceptAttention, Helbling et al., ICML 2025).

After each captured transformer call, a second call runs the conditional rows again, each with one
extra row whose text is the concept words (appended as TextPatch's source rows are; nothing is
patched). At every captured layer that row takes its conditional row's image queries, keys and values
(`EditState.shared_image_layers`, as NAG's negative rows do), so the concept tokens attend to the image
while the image never sees them. The pipeline's own call is left as it is, so the image is the one
without the capture. The concept rows get their conditional row's pooled text embedding, so their
blocks modulate as the prompt's text does.

The concept prompt is encoded at the call's text length (FLUX.2 [dev] pads its text to it) and, on edit
pipelines (Qwen-Image-Edit), with the reference image the pipeline's own `encode_prompt` call got, as NAG's
negative prompt is; the concepts' positions are looked up in that text. Qwen-Image pads its text to the
call's longest prompt under a mask: a longer concept prompt keeps its own length, and the conditional rows'
text in the concept call is padded to it with masked zero states (their image tokens see none of them).
"""
from __future__ import annotations

import torch

from ..hooks.calls import take_rows
from ..hooks.pipeline import MethodWrap
from ..localization.patching import PatchRows, encode_prompts, encoder_call_inputs
from .words import word_positions


# families whose call text is padded to the longest prompt, with the text-mask input that masks the padding
MASKED_TEXT = {"qwen_image": "encoder_hidden_states_mask"}


def concept_prompt(words: tuple[str, ...]) -> str:
    return " ".join(words)


class ConceptRows:
    def __init__(self, pipe, family, layers: tuple[int, ...], words: tuple[str, ...]):
        self.pipe, self.family, self.layers, self.words = pipe, family, layers, words
        self.prompt = concept_prompt(words)
        self._cache: tuple | None = None  # (key, embeds, pooled, columns) of the concept prompt
        self.columns: list[list[int]] = []  # the concepts' text positions in the current concept call
        self._encoder_kwargs: dict = {}  # the family's encoder_inputs of the pipeline's own encode_prompt call
        self._encoding = False
        self._length: tuple = (None, 0)  # (key, tokens) of the concept prompt encoded alone
        self._wrap: MethodWrap | None = None

    def install(self) -> None:
        if self.family.encoder_inputs(self.pipe):
            self._wrap = MethodWrap(self.pipe, "encode_prompt", self._watching_encoder)

    def undo(self) -> None:
        if self._wrap is not None:
            self._wrap.undo()
            self._wrap = None
        self._cache, self._encoder_kwargs = None, {}

    def _watching_encoder(self, original):
        def encode_prompt(*args, **kwargs):
            if not self._encoding:
                inputs = encoder_call_inputs(self.family, self.pipe, kwargs)
                if any(inputs.get(name) is not self._encoder_kwargs.get(name) for name in inputs):
                    self._cache = None
                self._encoder_kwargs = inputs
            return original(*args, **kwargs)
        return encode_prompt

    def _encoded(self, call: dict) -> tuple[torch.Tensor, torch.Tensor]:
        text = call.get("encoder_hidden_states")
        where = text if isinstance(text, torch.Tensor) else self.pipe.transformer  # Z-Image: per-row caption lists
        text_len = text.shape[1] if isinstance(text, torch.Tensor) else self.family.text_length(call)
        if self.family.name in MASKED_TEXT and isinstance(text, torch.Tensor):
            text_len = max(text_len, self._own_length())
        return self.encoded(text_len, where.device, where.dtype)

    def _own_length(self) -> int:
        """The concept prompt's text tokens as the pipeline encodes it alone (no padding, no cut)."""
        key = (self.pipe.scheduler.timesteps, id(self._encoder_kwargs.get("image")))
        if self._length[0] != key:
            self._encoding = True
            try:
                with torch.no_grad():
                    embeds, _ = self.family.encode_prompts(self.pipe, [self.prompt], None, **self._encoder_kwargs)
            finally:
                self._encoding = False
            self._length = (key, embeds.shape[1])
        return self._length[1]

    def encoded(self, text_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The concept prompt's text inputs at `text_len` tokens (once per pipeline call); sets `columns`."""
        key = (self.pipe.scheduler.timesteps, text_len, device, dtype)
        if self._cache is None or key[0] is not self._cache[0][0] or key[1:] != self._cache[0][1:]:
            self._encoding = True
            try:
                embeds, pooled = encode_prompts(self.pipe, self.family, [self.prompt], text_len, device, dtype,
                                                self._encoder_kwargs)
            finally:
                self._encoding = False
            self._cache = (key, embeds, pooled, self._positions(text_len))
        self.columns = self._cache[3]
        return self._cache[1], self._cache[2]

    def _positions(self, text_len: int) -> list[list[int]]:
        """Each concept's positions in the concept row's text stream of `text_len` tokens."""
        image = self._encoder_kwargs.get("image")
        try:
            found = word_positions(self.pipe, self.family.name, self.prompt, self.words, text_len, image)
        except ValueError:  # a concept cut off at text_len (named below), or the lookup's own error
            found = word_positions(self.pipe, self.family.name, self.prompt, self.words, None, image)
        cut = [w for w, cols in zip(self.words, found) if not cols or max(cols) >= text_len]
        if cut:
            raise ValueError(f"Capture(kind='concept'): the concepts {cut} lie past this call's {text_len} text tokens "
                             f"(the concept prompt {self.prompt!r} rides in rows of the call's text length): give "
                             "fewer concepts, or a longer prompt or max_sequence_length")
        return found

    def call_for(self, call: dict, rows: torch.Tensor) -> tuple[dict, PatchRows]:
        """The inputs of `rows` of the call, and the concept rows to append to them (row i + R follows row i)."""
        count = rows.numel()
        batch = self.family.batch_size(call)
        cond = {name: take_rows(value, rows) if name in self.family.rows.call_args and _per_row(value, batch) else value
                for name, value in call.items()}
        embeds, pooled = self._encoded(call)
        if self.family.name in MASKED_TEXT and embeds.shape[1] > cond["encoder_hidden_states"].shape[1]:
            cond = _padded_text(cond, embeds.shape[1], MASKED_TEXT[self.family.name])
        own_pooled = cond.get("pooled_projections")
        if own_pooled is not None and own_pooled.shape[1:] == pooled.shape[1:]:
            pooled = own_pooled
        else:
            pooled = pooled.expand(count, *pooled.shape[1:])
        patch = PatchRows(sources={i: count + i for i in range(count)}, targets=torch.arange(count),
                          embeds=embeds.expand(count, *embeds.shape[1:]), pooled=pooled,
                          patch_end=max(self.layers) + 1, family=self.family)
        return cond, patch


def _padded_text(call: dict, length: int, mask_name: str) -> dict:
    """The call's text states padded to `length` tokens with zero states its mask hides."""
    text = call["encoder_hidden_states"]
    pad = length - text.shape[1]
    mask = call.get(mask_name)
    if mask is None:
        mask = torch.ones(text.shape[:2], dtype=torch.long, device=text.device)
    return {**call, "encoder_hidden_states": torch.nn.functional.pad(text, (0, 0, 0, pad)),
            mask_name: torch.nn.functional.pad(mask, (0, pad))}


def _per_row(value, batch: int) -> bool:
    if isinstance(value, torch.Tensor):
        return value.ndim > 0 and value.shape[0] == batch
    return isinstance(value, (list, tuple)) and len(value) == batch
