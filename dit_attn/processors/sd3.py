"""Processor for SD3 / SD3.5 joint attention ([image ; text] order).

Reproduces diffusers' JointAttnProcessor2_0 step by step and hands the attention
call to `dit_attn.kernels.attention` with this layer's plan.
"""
from __future__ import annotations

import torch

from .. import kernels
from .state import POOL_MODULE, EditState, LayerProcessor


def _split_heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """(B, S, H·D) → (B, H, S, D)."""
    return x.view(x.shape[0], -1, heads, head_dim).transpose(1, 2)


class SD3AttnProcessor(LayerProcessor):
    """One instance per attention module. `joint` is False for SD3.5's image-only attn2."""

    def __init__(self, layer: int, state: EditState, joint: bool = True):
        super().__init__(layer, state)
        self.joint = joint

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, image_tokens: int,
               pool=None) -> torch.Tensor:
        """The attention call, (B, H, S, D) with [image ; text] tokens."""
        plan = self.state.plan(self.layer, query.shape[0], (0, image_tokens), pool, perturbed=self.joint)
        scale = self.state.scale_for(self.layer, image_tokens, query.shape[-1])
        if self.state.capture is not None and self.joint:
            self.state.capture.record(self.layer, query, key, plan, None, (0, image_tokens), scale, "BHSD", self.state.call)
            out = kernels.attention(query, key, value, plan, scale=scale, backend=self.state.backend_for(plan))
            self.state.capture.record_output(self.layer, out, "BHSD", self.state.call)
            return out
        return kernels.attention(query, key, value, plan, scale=scale, backend=self.state.backend_for(plan))

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query, key, value = (_split_heads(x, attn.heads, head_dim) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            context_query = attn.add_q_proj(encoder_hidden_states)
            context_key = attn.add_k_proj(encoder_hidden_states)
            context_value = attn.add_v_proj(encoder_hidden_states)
            context_query, context_key, context_value = (
                _split_heads(x, attn.heads, head_dim) for x in (context_query, context_key, context_value)
            )
            if attn.norm_added_q is not None:
                context_query = attn.norm_added_q(context_query)
            if attn.norm_added_k is not None:
                context_key = attn.norm_added_k(context_key)
            context_key, context_value = self.state.patch_text(self.layer, context_key, context_value)
            query, key, value = self.state.nag_image_inputs(self.layer, (query, key, value))
            query = torch.cat([query, context_query], dim=2)
            key = torch.cat([key, context_key], dim=2)
            value = torch.cat([value, context_value], dim=2)

        hidden_states = self.attend(query, key, value, residual.shape[1], getattr(attn, POOL_MODULE, None))
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states = self.state.nag_guide(self.layer, hidden_states, slice(0, residual.shape[1]))
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states
