"""Processor for Z-Image's single-stream attention ([image ; caption] per sample).

Reproduces diffusers' ZSingleStreamAttnProcessor (projections, RMS q/k norms, complex
rotary from `freqs_cis`, the rows' bool key mask) and hands the attention call to
`dit_attn.kernels.attention` with this layer's plan. The image tokens lead every row
(0, n): every sample of a call has an image of the same size, and the padding the model
adds (its pad tokens after the image, zero rows after the caption) comes after them.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from .. import kernels
from .state import POOL_MODULE, LayerProcessor


def _rotate(x_in: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    with torch.amp.autocast("cuda", enabled=False):
        x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
        x_out = torch.view_as_real(x * freqs_cis.unsqueeze(2)).flatten(3)
        return x_out.type_as(x_in)


class ZImageAttnProcessor(LayerProcessor):
    """One instance per attention module of the main blocks."""

    _attention_backend = None
    _parallel_config = None

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
        if plan is None:  # nothing to edit here: the stock call, honouring diffusers' attention backends
            hidden_states = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )
        elif self._parallel_config is not None:
            raise NotImplementedError("dit-attn perturbations do not support context parallelism yet")
        else:
            hidden_states = kernels.attention(
                query, key, value, plan, layout="BSHD", attn_mask=attention_mask,
                backend=self.state.backend_for(plan),
                scale=self.state.scale_for(self.layer, image_len or seq_len, query.shape[-1]),
            )
        hidden_states = hidden_states.flatten(2, 3).to(dtype)

        output = attn.to_out[0](hidden_states)
        if len(attn.to_out) > 1:
            output = attn.to_out[1](output)
        return output
