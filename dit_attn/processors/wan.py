"""Processors for Wan's attention: the self-attention `attn1` of every block (dit-attn's layer) and the
cross-attention `attn2` (its text keys/values are what TextPatch replaces).

Both reproduce diffusers' WanAttnProcessor (q/k/v projections, fused or not; RMS norms across heads before
the head split; real interleaved rotary on (frames, height, width)). `attn1` hands its attention call to
`dit_attn.kernels.attention` with this layer's plan, or makes the stock dispatch call with no plan; every
token is a video token. `attn2` always makes the stock dispatch calls: it is never perturbed.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from .dispatch import DispatchingProcessor
from .state import POOL_MODULE, nag_combination, LayerProcessor

TEXT_CONTEXT = 512  # Wan's cross-attention takes the last 512 context tokens as the text when it has image context


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary: pairs (x[2i], x[2i+1]) rotated by the angle whose cos/sin the tables hold twice."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


def _heads(attn, query, key, value, rotary_emb):
    """(B, S, H·D) projections → (B, S, H, D): Wan's RMS norms across heads on q and k, then its rotary."""
    query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
    return query, key, value


def _text_keys_values(attn, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """attn2's keys and values of text states (B, S, D) → (B, S, H, D): projections (fused or not), key norm."""
    if attn.fused_projections:
        key, value = attn.to_kv(text).chunk(2, dim=-1)
    else:
        key, value = attn.to_k(text), attn.to_v(text)
    return attn.norm_k(key).unflatten(2, (attn.heads, -1)), value.unflatten(2, (attn.heads, -1))


class WanSelfAttnProcessor(DispatchingProcessor):
    """One instance per `attn1` module."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("dit-attn's Wan self-attention processor serves attn1 only")
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = _heads(attn, query, key, value, rotary_emb)

        plan = self.state.plan(self.layer, query.shape[0], None, getattr(attn, POOL_MODULE, None))
        hidden_states = self.attend(query, key, value, plan, attention_mask, query.shape[1])
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


class WanCrossAttnProcessor(LayerProcessor):
    """One instance per `attn2` module; `layer` is its block's index (the layer of the block's attn1).

    Queries are the video tokens, keys/values the text states (for image-to-video the leading
    len − 512 context tokens are the image context, attended through `add_k_proj`/`add_v_proj` and
    summed). The text keys/values, after their norm, go through `EditState.patch_text`.
    """

    _attention_backend = None  # set by diffusers' set_attention_backend, copied over by `install`
    _parallel_config = None  # the stock cross-attention never uses it

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("dit-attn's Wan cross-attention processor serves attn2 only")
        image_context = None
        if attn.add_k_proj is not None:
            image_length = encoder_hidden_states.shape[1] - TEXT_CONTEXT
            image_context = encoder_hidden_states[:, :image_length]
            encoder_hidden_states = encoder_hidden_states[:, image_length:]
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key, value = _text_keys_values(attn, encoder_hidden_states)
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        key, value = self.state.patch_text(self.layer, key, value)
        if self.state.capture is not None:
            self.state.capture.record_cross(self.layer, query, key, self.state.call)

        image_out = None
        if image_context is not None:
            if attn.fused_projections:
                key_img, value_img = attn.to_added_kv(image_context).chunk(2, dim=-1)
            else:
                key_img, value_img = attn.add_k_proj(image_context), attn.add_v_proj(image_context)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            image_out = self._dispatch(query, key_img, value_img, None).flatten(2, 3).type_as(query)

        hidden_states = self._dispatch(query, key, value, attention_mask).flatten(2, 3).type_as(query)
        if self.state.capture is not None:
            self.state.capture.record_cross_output(self.layer, attn, hidden_states, self.state.call)
        hidden_states = self._negative_guided(attn, query, hidden_states)
        if image_out is not None:
            hidden_states = hidden_states + image_out
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)

    def _negative_guided(self, attn, query: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """NAG: the guided rows' text-attention output Z⁺ combined with Z⁻, the same queries on the negative
        text states of the call (no negative rows: text enters Wan only here)."""
        call, nag = self.state.call, self.state.nag
        if call.nag_text is None or nag is None or self.layer not in nag.layers:
            return hidden_states
        key, value = _text_keys_values(attn, call.nag_text)
        rows = call.nag_rows.to(query.device)
        n = rows.numel()
        # one negative text for every guided row, or each guided row's
        negative = self._dispatch(query.index_select(0, rows), key.expand(n, -1, -1, -1), value.expand(n, -1, -1, -1),
                                  None).flatten(2, 3).type_as(query)
        out = hidden_states.clone()
        out[rows] = nag_combination(nag, hidden_states[rows], negative).to(hidden_states.dtype)
        return out

    def _dispatch(self, query, key, value, attention_mask) -> torch.Tensor:
        return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend, parallel_config=None)
