"""Processor for Z-Image's single-stream attention ([image ; caption] per sample).

Reproduces diffusers' ZSingleStreamAttnProcessor (projections, RMS q/k norms, complex
rotary from `freqs_cis`, the rows' bool key mask) and hands the attention call to
`dit_attn.kernels.attention` with this layer's plan. The image tokens lead every row
(0, n): every sample of a call has an image of the same size, and the padding the model
adds (its pad tokens after the image, zero rows after the caption) comes after them.
"""
from __future__ import annotations

import torch

from .dispatch import DispatchingProcessor
from .state import POOL_MODULE


def _rotate(x_in: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    with torch.amp.autocast("cuda", enabled=False):
        x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
        x_out = torch.view_as_real(x * freqs_cis.unsqueeze(2)).flatten(3)
        return x_out.type_as(x_in)


class ZImageAttnProcessor(DispatchingProcessor):
    """One instance per attention module of the main blocks."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query = _rotate(query, freqs_cis)
            key = _rotate(key, freqs_cis)
        dtype = query.dtype
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]

        seq_len = query.shape[1]
        image_len = self.state.call.image_len
        image_tokens = (0, image_len) if image_len is not None else None
        plan = self.state.plan(self.layer, query.shape[0], image_tokens, getattr(attn, POOL_MODULE, None))
        if plan is not None and image_len is None:
            raise ValueError("dit-attn edits on Z-Image need the call's image tokens: only calls with one image "
                             "size per call (not omni calls) are supported")
        hidden_states = self.attend(query, key, value, plan, attention_mask, image_len or seq_len)
        hidden_states = hidden_states.flatten(2, 3).to(dtype)

        output = attn.to_out[0](hidden_states)
        if len(attn.to_out) > 1:
            output = attn.to_out[1](output)
        return output
