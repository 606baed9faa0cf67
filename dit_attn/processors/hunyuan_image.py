"""Processor for HunyuanImage 2.1 double-stream and single-stream attention ([image ; text] order).

Reproduces diffusers' HunyuanImageAttnProcessor (q/k/v projections, RMS q/k norms, rotary on the
image tokens; a double block projects the text with its own `add_*_proj`, a single block gets the
text as `encoder_hidden_states` and projects the joint sequence) and hands the attention call to
`dit_attn.kernels.attention` with this layer's plan; with no plan it makes the stock dispatch call.
"""
from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from .dispatch import DispatchingProcessor
from .state import POOL_MODULE


class HunyuanImageAttnProcessor(DispatchingProcessor):
    """One instance per attention module; `layer` numbers single blocks after double blocks."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        single = attn.add_q_proj is None and encoder_hidden_states is not None
        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
        if single:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            if single:
                query = torch.cat([apply_rotary_emb(query[:, :-text_len], image_rotary_emb, sequence_dim=1),
                                   query[:, -text_len:]], dim=1)
                key = torch.cat([apply_rotary_emb(key[:, :-text_len], image_rotary_emb, sequence_dim=1),
                                 key[:, -text_len:]], dim=1)
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        seq_len = query.shape[1]
        image_tokens = seq_len - text_len
        plan = self.state.plan(self.layer, query.shape[0], (0, image_tokens), getattr(attn, POOL_MODULE, None))
        hidden_states = self.attend(query, key, value, plan, attention_mask, image_tokens)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :-text_len], hidden_states[:, -text_len:]
            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states
