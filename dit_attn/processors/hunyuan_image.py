"""Processor for HunyuanImage 2.1 double-stream and single-stream attention ([image ; text] order).

Reproduces diffusers' HunyuanImageAttnProcessor (q/k/v projections, RMS q/k norms, rotary on the
image tokens; a double block projects the text with its own `add_*_proj`, a single block gets the
text as `encoder_hidden_states` and projects the joint sequence) and hands the attention call to
`dit_attn.kernels.attention` with this layer's plan; with no plan it makes the stock dispatch call.
TextPatch gives a target row its source row's text keys, values and text key mask; NAG's negative rows
take their positive rows' image q/k/v (after rotary: every row has the same image positions). On NAG's token path
(`hooks.nag_tokens`) each row's text is [text ; negative text]: the image queries and the text attend [image ; text]
(Z⁺), the image queries and the negative text [image ; negative text] (Z⁻).
"""
from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ..hooks.nag_tokens_flux import image_first_nag_token_attend
from .dispatch import DispatchingProcessor
from .state import POOL_MODULE


def project_qkv(attn, states: torch.Tensor, q_proj, k_proj, v_proj, norm_q, norm_k):
    """(B, S, H·D) states → q, k, v (B, S, H, D), q and k normed where the module has the norms."""
    query = q_proj(states).unflatten(2, (attn.heads, -1))
    key = k_proj(states).unflatten(2, (attn.heads, -1))
    value = v_proj(states).unflatten(2, (attn.heads, -1))
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value


def project_outputs(attn, hidden_states: torch.Tensor, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint output [image ; text] split and put through the module's output projections where it has them."""
    hidden_states, encoder_hidden_states = hidden_states[:, :-text_len], hidden_states[:, -text_len:]
    if getattr(attn, "to_out", None) is not None:
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
    if getattr(attn, "to_add_out", None) is not None:
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    return hidden_states, encoder_hidden_states


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

        query, key, value = project_qkv(attn, hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)

        if image_rotary_emb is not None:
            if single:
                query = torch.cat([apply_rotary_emb(query[:, :-text_len], image_rotary_emb, sequence_dim=1),
                                   query[:, -text_len:]], dim=1)
                key = torch.cat([apply_rotary_emb(key[:, :-text_len], image_rotary_emb, sequence_dim=1),
                                 key[:, -text_len:]], dim=1)
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        image_tokens = query.shape[1] - (text_len if single else 0)
        if single:
            query, key, value = self._nag_image_inputs(image_tokens, query, key, value)
            key, value = self._patch_text_tokens(image_tokens, key, value)
        else:
            query, key, value = self.state.nag_image_inputs(self.layer, (query, key, value))
        if attention_mask is not None and text_len:
            attention_mask = self._patch_text_mask(attention_mask, text_len)

        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query, encoder_key, encoder_value = project_qkv(
                attn, encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q,
                attn.norm_added_k)
            encoder_key, encoder_value = self.state.patch_text(self.layer, encoder_key, encoder_value)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        tokens = self.state.nag_tokens_at(self.layer, query.shape[0])
        if tokens is not None:  # NAG's negative text after each row's text: [image ; text ; negative text]
            keys = attention_mask.reshape(attention_mask.shape[0], -1) if attention_mask is not None else None
            hidden_states = image_first_nag_token_attend(self, attn, query, key, value, keys, image_tokens, tokens[0],
                                                         tokens[1], image_tokens)
        else:
            plan = self.state.plan(self.layer, query.shape[0], (0, image_tokens), getattr(attn, POOL_MODULE, None))
            hidden_states = self.attend(query, key, value, plan, attention_mask, image_tokens)
            hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
            hidden_states = self.state.nag_guide(self.layer, hidden_states, slice(0, image_tokens))

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = project_outputs(attn, hidden_states, text_len)
        return hidden_states, encoder_hidden_states

    def _nag_image_inputs(self, image_tokens: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        images = self.state.nag_image_inputs(self.layer, tuple(x[:, :image_tokens] for x in tensors))
        return tuple(torch.cat([image, x[:, image_tokens:]], dim=1) for image, x in zip(images, tensors))

    def _patch_text_tokens(self, start: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TextPatch in a single block: (B, S, H, D) keys/values whose tokens from `start` on are text."""
        if self.layer not in self.state.patch_layers:
            return key, value
        text_key, text_value = self.state.patch_text(self.layer, key[:, start:], value[:, start:])
        return torch.cat([key[:, :start], text_key], dim=1), torch.cat([value[:, :start], text_value], dim=1)

    def _patch_text_mask(self, mask: torch.Tensor, text_len: int) -> torch.Tensor:
        """TextPatch: the target rows take their source rows' text key mask, (B, 1, 1, S) with the text last."""
        if self.layer not in self.state.patch_layers:
            return mask
        text_mask, _ = self.state.patch_text(self.layer, mask[..., -text_len:], mask[..., -text_len:])
        return torch.cat([mask[..., :-text_len], text_mask], dim=-1)
