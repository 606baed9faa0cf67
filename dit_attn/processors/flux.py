"""Processor for FLUX double-stream and single-stream attention ([text ; image] order).

Reproduces diffusers' FluxAttnProcessor (projections, RMS q/k norms, rotary) and hands
the attention call to `dit_attn.kernels.attention` with this layer's plan.
"""
from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ..hooks.private import flux_qkv_projections
from .dispatch import DispatchingProcessor
from .state import POOL_MODULE


class FluxAttnProcessor(DispatchingProcessor):
    """One instance per attention module; `layer` numbers single blocks after double blocks."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        query, key, value, encoder_query, encoder_key, encoder_value = flux_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            encoder_key, encoder_value = self.state.patch_text(self.layer, encoder_key, encoder_value)
            query, key, value = self.state.nag_image_inputs(self.layer, (query, key, value))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        elif self.layer in self.state.patch_layers and self.state.call.rows is not None:
            # single block: the text tokens lead the joint sequence
            text_len = self.state.call.text_len
            text_key, text_value = self.state.patch_text(self.layer, key[:, :text_len], value[:, :text_len])
            key = torch.cat([text_key, key[:, text_len:]], dim=1)
            value = torch.cat([text_value, value[:, text_len:]], dim=1)
        if attn.added_kv_proj_dim is None:
            query, key, value = self.state.nag_image_inputs(self.layer, (query, key, value), self.state.call.text_len)

        if attention_mask is not None:  # rows whose text a TextPatch replaces take their source rows' mask (Chroma)
            attention_mask, _ = self.state.patch_text(self.layer, attention_mask, attention_mask)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        seq_len = query.shape[1]
        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.state.call.text_len
        plan = self.state.plan(self.layer, query.shape[0], (text_len, seq_len), getattr(attn, POOL_MODULE, None))
        hidden_states = self.attend(query, key, value, plan, attention_mask, seq_len - text_len)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = self.state.nag_guide(self.layer, hidden_states, slice(text_len, None))

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states
