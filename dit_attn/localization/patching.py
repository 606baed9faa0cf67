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

from ..guidance.rows import FLUX_PIPELINES, GUIDED_PIPELINES, SD3_PIPELINES, conditional_rows
from ..guidance.schedule import denoising_step

# transformer inputs that carry one entry per row (image/text ids and kwargs dicts do not)
BATCH_ARGS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")
_CONTROLNET_ARGS = ("block_controlnet_hidden_states", "controlnet_block_samples", "controlnet_single_block_samples")


def check_text_pipeline(pipe, edit_name: str) -> None:
    name = type(pipe).__name__
    if name not in GUIDED_PIPELINES:
        raise TypeError(f"{edit_name} does not support {name}; supported pipelines: {', '.join(GUIDED_PIPELINES)}")


def encode_prompts(pipe, prompts: list[str], text_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Text states (N, text_len, D) and pooled embeddings (N, P) of `prompts`, encoded by
    the pipeline's own `encode_prompt` at the sequence length of the current call."""
    name = type(pipe).__name__
    with torch.no_grad():
        if name in SD3_PIPELINES:
            # SD3 text states are CLIP tokens (padded to the tokenizer length) followed by T5 tokens
            max_sequence_length = text_len - pipe.tokenizer_max_length
            if max_sequence_length < 1:
                raise ValueError(f"cannot read max_sequence_length from a call with {text_len} text tokens")
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
            )
        elif name in FLUX_PIPELINES:
            embeds, pooled, _ = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1, max_sequence_length=text_len,
            )
        else:
            raise TypeError(f"cannot encode prompts for {name}; supported pipelines: {', '.join(GUIDED_PIPELINES)}")
    return embeds.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)


@dataclass(frozen=True)
class PatchRows:
    """The source rows of one call.

    sources: {target row: source row}, source rows numbered from the call's batch on.
    targets: (N,) the target row of each source row (its latents, timestep, guidance).
    embeds: (N, S, D) and pooled: (N, P), the source prompts' text inputs.
    patch_end: the first layer that runs without the source rows.
    """

    sources: dict[int, int]
    targets: torch.Tensor
    embeds: torch.Tensor
    pooled: torch.Tensor
    patch_end: int

    def extend(self, kwargs: dict) -> dict:
        """The call's inputs with the source rows appended."""
        out = dict(kwargs)
        batch = kwargs["hidden_states"].shape[0]
        text = kwargs["encoder_hidden_states"]
        if self.embeds.shape[1:] != text.shape[1:]:
            raise RuntimeError(
                f"TextPatch: the source prompt encodes to {tuple(self.embeds.shape[1:])} text states, "
                f"the call has {tuple(text.shape[1:])}"
            )
        for name in BATCH_ARGS:
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
                out[name] = torch.cat([value, value.index_select(0, self.targets.to(value.device))])
        out["encoder_hidden_states"] = torch.cat([text, self.embeds.to(text)])
        pooled = kwargs.get("pooled_projections")
        if pooled is not None:
            out["pooled_projections"] = torch.cat([pooled, self.pooled.to(pooled)])
        return out


class TextPatchController:
    """Decides which calls are patched and with which source prompts.

    prompts_for(n): the source prompt of each of the n conditional rows of a call, or None
    for a row to leave alone.
    """

    def __init__(self, pipe, layers: tuple[int, ...], start: float, prompts_for: Callable[[int], list[str | None]]):
        self.pipe = pipe
        self.layers = layers
        self.start = start
        self.prompts_for = prompts_for
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache_key = None
        self._last_step = None

    def install(self) -> None:
        """Hook into the pipeline (nothing to do for a plain TextPatch)."""

    def unwrap(self) -> None:
        self._cache, self._cache_key, self._last_step = {}, None, None

    def sources_for_call(self, batch: int, kwargs: dict, context: str | None) -> PatchRows | None:
        step, total = denoising_step(self.pipe)
        if step / total < self.start:
            return None
        timesteps = self.pipe.scheduler.timesteps
        if self._last_step is not None and self._last_step[0] is timesteps and self._last_step[1] == step:
            # the conditional call comes first; a second call in the same step is a negative
            # (FLUX true CFG without cache contexts) or skip-layer call
            return None
        cond = conditional_rows(self.pipe, batch, kwargs, context)
        if cond is None:
            return None
        if any(kwargs.get(name) is not None for name in _CONTROLNET_ARGS):
            raise NotImplementedError("TextPatch does not support ControlNet residuals yet")
        prompts = self.prompts_for(len(cond))
        rows = [(int(c), p) for c, p in zip(cond, prompts) if p is not None]
        self._last_step = (timesteps, step)
        if not rows:
            return None
        embeds, pooled = self._encoded([p for _, p in rows], kwargs)
        return PatchRows(
            sources={c: batch + k for k, (c, _) in enumerate(rows)},
            targets=torch.tensor([c for c, _ in rows], dtype=torch.long),
            embeds=embeds,
            pooled=pooled,
            patch_end=max(self.layers) + 1,
        )

    def _encoded(self, prompts: list[str], kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode each distinct prompt once per generation (a new run has a new schedule tensor)."""
        text = kwargs["encoder_hidden_states"]
        key = (self.pipe.scheduler.timesteps, text.shape[1], text.device, text.dtype)
        if self._cache_key is None or key[0] is not self._cache_key[0] or key[1:] != self._cache_key[1:]:
            self._cache, self._cache_key = {}, key
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            embeds, pooled = encode_prompts(self.pipe, missing, text.shape[1], text.device, text.dtype)
            for i, prompt in enumerate(missing):
                self._cache[prompt] = (embeds[i : i + 1], pooled[i : i + 1])
        return (torch.cat([self._cache[p][0] for p in prompts]), torch.cat([self._cache[p][1] for p in prompts]))
