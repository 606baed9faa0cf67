"""TextPatch inside the pipeline's own transformer call.

On a patched step the call gets extra rows: one per conditional row, with that row's
latents and timestep and the source prompt's text states and pooled embedding. The
processors of the patched layers copy the source rows' text keys/values into the target
rows (`EditState.patch_text`); the blocks after the last patched layer run without the
source rows (`RowPlan`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..families import Family
from ..hooks.calls import take_rows
from ..hooks.pipeline import MethodWrap, prompt_count
from ..hooks.selection import CallSelector
from ..hooks.steps import denoising_step


def encode_prompts(pipe, family: Family, prompts: list[str], text_len: int, device, dtype,
                   encoder_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Text states (N, text_len, D) and pooled embeddings (N, P) of `prompts`, encoded by
    the pipeline's own `encode_prompt` at the sequence length of the current call (with the
    family's `encoder_inputs` of the pipeline's own encoding, `encoder_kwargs`)."""
    with torch.no_grad():
        embeds, pooled = family.encode_prompts(pipe, prompts, family.sequence_length_of_call(pipe, text_len),
                                               **(encoder_kwargs or {}))
    return embeds.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype if pooled.is_floating_point() else None)


def encoder_call_inputs(family: Family, pipe, kwargs: dict) -> dict:
    """The family's `encoder_inputs` among the keyword arguments of a pipeline's own `encode_prompt` call."""
    return {name: kwargs[name] for name in family.encoder_inputs(pipe) if name in kwargs}


@dataclass(frozen=True)
class PatchRows:
    """The source rows of one call.

    sources: {target row: source row}, source rows numbered from the call's batch on.
    targets: (N,) the target row of each source row (its latents, timestep, guidance).
    embeds: (N, S, D) and pooled: (N, P), the source prompts' text inputs (pooled: the second output of
        the family's `encode_prompts`, e.g. Qwen-Image's text mask).
    patch_end: the first layer that runs without the source rows.
    """

    sources: dict[int, int]
    targets: torch.Tensor
    embeds: torch.Tensor
    pooled: torch.Tensor
    patch_end: int
    family: Family
    text_padded: bool = True  # whether `pooled` marks padded text tokens (decided where the prompts were encoded)
    one_source: bool = True  # every source row has the same prompt

    def source_index(self, call_rows: torch.Tensor) -> torch.Tensor:
        """The source row (index into `embeds`) of each of `call_rows` (indices of the call's rows): a target row's
        own, 0 for a row that is no target."""
        rows = call_rows.cpu()
        index = torch.zeros(max(int(rows.max()), int(self.targets.max())) + 1, dtype=torch.long)
        index[self.targets] = torch.arange(len(self.targets))
        return index[rows].to(call_rows.device)

    def per_call_row(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """x (N, ...) of the source rows → (batch, ...), each of the call's rows its source's (`source_index`)."""
        if self.one_source:
            return x[:1].expand(batch, *x.shape[1:])
        return x.index_select(0, self.source_index(torch.arange(batch)).to(x.device))

    def extend(self, kwargs: dict) -> dict:
        """The call's inputs with the source rows appended."""
        out = dict(kwargs)
        batch = self.family.batch_size(kwargs)
        text = self.family.append_text_rows(kwargs, self.embeds, self.pooled, self.text_padded)
        for name in self.family.rows.call_args:
            value = kwargs.get(name)
            if name in text or value is None:
                continue
            if isinstance(value, (list, tuple)) and len(value) == batch:  # per-row lists (Z-Image's x)
                out[name] = type(value)(list(value) + list(take_rows(value, self.targets)))
            elif isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
                out[name] = torch.cat([value, value.index_select(0, self.targets.to(value.device))])
        out.update(text)
        return out


class TextPatchController:
    """Decides which calls are patched and with which source prompts.

    prompts_for(n): the source prompt of each of the n conditional rows of a call, or None
    for a row to leave alone.
    """

    def __init__(self, pipe, family: Family, layers: tuple[int, ...], start: float,
                 prompts_for: Callable[[int], list[str | None]], edit_name: str = "TextPatch", end: float = 1.0):
        self.pipe = pipe
        self.family = family
        self.layers = layers
        self.start = start
        self.end = end
        self.prompts_for = prompts_for
        self.selector = CallSelector(pipe, family, edit_name)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = {}  # {prompt: `_entries` entry}
        self._cache_key = None
        # the source prompts encoded when the pipeline encoded its own, {(prompt, text length, device, dtype):
        # `_entries` entry}: a compiled transformer call takes them without running a tokenizer in its graph
        self._prepared: dict[tuple, tuple[torch.Tensor, torch.Tensor, bool]] = {}
        self._last_encoding_size = 0  # entries of `_prepared` the pipeline's last encoding made
        self.encoder_kwargs: dict = {}  # the family's encoder_inputs from the pipeline's own encode_prompt call
        self._encoding = False  # inside the controller's own encoding (not the pipeline's)
        self._encoder_wrap: MethodWrap | None = None

    def install(self) -> None:
        """Watch the pipeline's own `encode_prompt` calls: for the inputs the encoding needs, and to encode the
        source prompts with them, before the transformer runs."""
        if hasattr(self.pipe, "encode_prompt"):
            self._encoder_wrap = MethodWrap(self.pipe, "encode_prompt", self._watching_encoder)

    def unwrap(self) -> None:
        self._cache, self._cache_key, self.encoder_kwargs, self._prepared = {}, None, {}, {}
        self.selector.reset()
        if self._encoder_wrap is not None:
            self._encoder_wrap.undo()
            self._encoder_wrap = None

    def _watches_encoder(self) -> bool:
        return bool(self.family.encoder_inputs(self.pipe))

    def _watching_encoder(self, original):
        def encode_prompt(*args, **kwargs):
            if self._encoding:
                return original(*args, **kwargs)
            if self._watches_encoder():
                self._pipeline_encodes(args, kwargs)
            result = original(*args, **kwargs)
            self._prepare_sources(result)
            return result
        return encode_prompt

    def _prepare_sources(self, result) -> None:
        """Encode the source prompts of the pipeline call that just encoded its prompts (`result`, whose first
        output is the (N, S, D) text states of its N prompts) at its text length, device and dtype. The entries of
        the pipeline's previous encoding stay (Qwen-Image's true CFG encodes the negative prompt at another length)."""
        kept = list(self._prepared.items())
        self._prepared = dict(kept[len(kept) - self._last_encoding_size:])
        self._last_encoding_size = 0
        text = result[0] if isinstance(result, tuple) and result else None
        if not isinstance(text, torch.Tensor) or text.ndim != 3:
            return  # a family whose calls take other text inputs: encoded at the call, as without compile
        try:
            prompts = sorted({p for p in self.prompts_for(text.shape[0]) if p is not None})
        except (ValueError, RuntimeError):  # the call raises it (e.g. TextGuard without prompt text)
            return
        if not prompts:
            return
        for p, entry in self._entries(prompts, text.shape[1], text.device, text.dtype).items():
            self._prepared[(p, text.shape[1], text.device, text.dtype)] = entry
        self._last_encoding_size = len(prompts)

    def _entries(self, prompts: list[str], text_len: int, device, dtype) -> dict[str, tuple]:
        """{prompt: (its text states, its extra input, whether its text is padded)}, encoded with the pipeline's own
        encoder; padding is read here, at the encoding, so that the transformer call (compiled or not) branches on no
        tensor value."""
        self._encoding = True
        try:
            embeds, pooled = encode_prompts(self.pipe, self.family, prompts, text_len, device, dtype, self.encoder_kwargs)
        finally:
            self._encoding = False
        return {p: (embeds[i : i + 1], pooled[i : i + 1], self.family.source_text_padded(pooled[i : i + 1]))
                for i, p in enumerate(prompts)}

    def _pipeline_encodes(self, args: tuple, kwargs: dict) -> None:
        """The pipeline calls its `encode_prompt` (keyword arguments, as every supported pipeline does)."""
        self.encoder_kwargs = encoder_call_inputs(self.family, self.pipe, kwargs)

    def sources_for_call(self, batch: int, kwargs: dict, context: str | None) -> PatchRows | None:
        step, total = denoising_step(self.pipe)
        if not self.start <= step / total < self.end:
            return None
        cond = self.selector.select_rows(batch, kwargs, context)
        if cond is None:
            return None
        prompts = self.prompts_for(len(cond))
        rows = [(int(c), p) for c, p in zip(cond, prompts) if p is not None]
        if not rows:
            return None
        embeds, pooled, text_padded = self._encoded([p for _, p in rows], kwargs)
        return PatchRows(
            sources={c: batch + k for k, (c, _) in enumerate(rows)},
            targets=torch.tensor([c for c, _ in rows], dtype=torch.long),
            embeds=embeds,
            pooled=pooled,
            patch_end=max(self.layers) + 1,
            family=self.family,
            text_padded=text_padded,
            one_source=len({p for _, p in rows}) == 1,
        )

    def _encoded(self, prompts: list[str], kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Encode each distinct prompt once per generation (a new run has a new schedule tensor)."""
        text = kwargs.get("encoder_hidden_states")
        # a family whose text is a per-row list (Z-Image's cap_feats) gets it in the transformer's device and dtype
        where = text if isinstance(text, torch.Tensor) else self.pipe.transformer
        text_len = text.shape[1] if isinstance(text, torch.Tensor) else self.family.text_length(kwargs)
        prepared = [self._prepared.get((p, text_len, where.device, where.dtype)) for p in prompts]
        if prompts and all(entry is not None for entry in prepared):
            return self._joined(prepared)
        key = (self.pipe.scheduler.timesteps, text_len, where.device, where.dtype)
        if self._cache_key is None or key[0] is not self._cache_key[0] or key[1:] != self._cache_key[1:]:
            self._cache, self._cache_key = {}, key
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            self._cache.update(self._entries(missing, text_len, where.device, where.dtype))
        return self._joined([self._cache[p] for p in prompts])

    @staticmethod
    def _joined(entries: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        return torch.cat([e[0] for e in entries]), torch.cat([e[1] for e in entries]), any(e[2] for e in entries)


class PerPromptNegativeController(TextPatchController):
    """NAG's controller with a negative prompt per prompt of the call (`NAG.per_prompt`): the rows of the call's
    prompt i (its images) take negative prompt i. The call's prompts are counted from its `check_inputs` arguments
    (a pipeline without one: its `encode_prompt`'s), and a call with another number of prompts is refused there,
    before anything runs."""

    def __init__(self, pipe, family: Family, layers: tuple[int, ...], nag):
        super().__init__(pipe, family, layers, nag.start, self._row_negatives, "NAG", nag.end)
        self.negatives = nag.negative_prompt
        self.count: int | None = None  # the prompts of the pipeline call running now
        self._check_wrap: MethodWrap | None = None

    @property
    def _checks_inputs(self) -> bool:
        return hasattr(type(self.pipe), "check_inputs")

    def install(self) -> None:
        super().install()
        if self._checks_inputs:
            self._check_wrap = MethodWrap(self.pipe, "check_inputs", self._counting)

    def unwrap(self) -> None:
        super().unwrap()
        if self._check_wrap is not None:
            self._check_wrap.undo()
            self._check_wrap = None

    def _counting(self, original):
        def check_inputs(*args, **kwargs):
            self._count(prompt_count(original, args, kwargs))
            return original(*args, **kwargs)
        return check_inputs

    def _watches_encoder(self) -> bool:
        return super()._watches_encoder() or not self._checks_inputs

    def _pipeline_encodes(self, args: tuple, kwargs: dict) -> None:
        super()._pipeline_encodes(args, kwargs)
        if not self._checks_inputs:
            self._count(prompt_count(type(self.pipe).encode_prompt.__get__(self.pipe), args, kwargs))

    def _count(self, count: int | None) -> None:
        if count is not None and count != len(self.negatives):
            raise ValueError(f"NAG has {len(self.negatives)} negative prompts and this call {count} prompts: give one "
                             "negative prompt per prompt, or one string for every prompt")
        self.count = count

    def _row_negatives(self, rows: int) -> list[str]:
        if self.count is None:
            raise ValueError("NAG with a negative prompt per prompt counts the call's prompts: call the pipeline "
                             "with prompt=... or prompt_embeds=...")
        if rows % self.count:
            raise RuntimeError(f"NAG: {rows} conditional rows for {self.count} prompts")
        per_prompt = rows // self.count
        return [self.negatives[i // per_prompt] for i in range(rows)]


class GivenNegativeController(PerPromptNegativeController):
    """NAG's controller with the negative prompt given as embeddings (`NAG.negative_prompt_embeds`): the negative
    rows take them, at each call's text length as the family takes them (`Family.given_negative`), and nothing is
    encoded. One given row is every prompt's; N rows are one per prompt, the call's prompts counted as
    `PerPromptNegativeController` counts them."""

    def __init__(self, pipe, family: Family, layers: tuple[int, ...], nag):
        super().__init__(pipe, family, layers, nag)
        self.nag = nag
        # a key per given row (the controllers key their source rows by prompt)
        self.negatives = [f"<NAG.negative_prompt_embeds[{i}]>" for i in range(nag.negative_prompt_embeds.shape[0])]
        if len(self.negatives) == 1:
            self.prompts_for = lambda rows: self.negatives * rows

    def install(self) -> None:
        if len(self.negatives) > 1:
            super().install()  # to count the call's prompts; with one row the pipeline's own encoding has nothing to tell

    def _prepare_sources(self, result) -> None:
        pass  # nothing to encode ahead of the call

    def _count(self, count: int | None) -> None:
        if count is not None and count != len(self.negatives):
            raise ValueError(f"NAG's negative_prompt_embeds have {len(self.negatives)} rows and this call {count} "
                             "prompts: give a row per prompt, or one row for every prompt")
        self.count = count

    def _encoded(self, prompts: list[str], kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, bool]:
        for name, call_input in (("negative_prompt_embeds", "encoder_hidden_states"),
                                 ("negative_pooled_prompt_embeds", "pooled_projections"),
                                 ("negative_prompt_embeds_2", "encoder_hidden_states_2")):
            given, width = getattr(self.nag, name), getattr(kwargs.get(call_input), "shape", (None,))[-1]
            if given is not None and width is not None and given.shape[-1] != width:
                raise ValueError(f"NAG's {name} are {given.shape[-1]} wide, this call's {call_input} {width}: encode the "
                                 "negative prompt with this pipeline's own encode_prompt")
        return super()._encoded(prompts, kwargs)

    def _entries(self, prompts: list[str], text_len: int, device, dtype) -> dict[str, tuple]:
        embeds, extra = self.family.given_negative(self.nag, text_len)
        embeds = embeds.to(device=device, dtype=dtype)
        extra = extra.to(device=device, dtype=dtype if extra.is_floating_point() else None)
        rows = {key: i for i, key in enumerate(self.negatives)}
        entries = {}
        for p in prompts:
            i = rows[p]
            row_extra = extra[i : i + 1]
            entries[p] = (embeds[i : i + 1], row_extra, self.family.source_text_padded(row_extra))
        return entries
