"""Processor for Wan's self-attention (`attn1` of every block).

Reproduces diffusers' WanAttnProcessor for a self-attention call (q/k/v projections, fused or not; RMS
norms across heads before the head split; real interleaved rotary on (frames, height, width)) and hands
the attention call to `dit_attn.kernels.attention` with this layer's plan; with no plan it makes the stock
dispatch call. Every token is a video token.
"""
from __future__ import annotations

import torch

from .dispatch import DispatchingProcessor
from .state import POOL_MODULE


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary: pairs (x[2i], x[2i+1]) rotated by the angle whose cos/sin the tables hold twice."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class WanSelfAttnProcessor(DispatchingProcessor):
    """One instance per `attn1` module."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("dit-attn's Wan processor serves the self-attention (attn1) only")
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _rotate(query, *rotary_emb)
            key = _rotate(key, *rotary_emb)

        plan = self.state.plan(self.layer, query.shape[0], None, getattr(attn, POOL_MODULE, None))
        hidden_states = self.attend(query, key, value, plan, attention_mask, query.shape[1])
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)
