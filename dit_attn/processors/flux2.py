"""Processors for FLUX.2's double-stream `Flux2Attention` and single-stream `Flux2ParallelSelfAttention`
([text ; image] order).

They reproduce diffusers' `Flux2AttnProcessor` / `Flux2ParallelSelfAttnProcessor` (projections, RMS q/k
norms, 4-axis rotary; the single block's fused QKV+MLP input projection and fused output projection) and
hand the attention call to `dit_attn.kernels.attention` with this layer's plan.

The plan's image tokens are [text_len, S): with reference images that range holds the generated tokens and
the reference tokens after them, so scope="image" perturbs attention among all image tokens, generated and
reference alike. At a LocalAttention layer the plan's image range ends at the generated grid and the
reference tokens join the text as global tokens (`local_image_stop`).
"""
from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ..hooks.nag_tokens_flux import nag_token_outputs
from .flux import FluxLayoutProcessor


def _refuse_kv_cache(kv_cache_mode) -> None:
    if kv_cache_mode is not None:
        raise NotImplementedError(
            f"dit-attn does not edit FLUX.2's KV-cache calls (kv_cache_mode={kv_cache_mode!r}, Flux2KleinKVPipeline): "
            "they reuse the reference tokens' keys and values across steps; use Flux2KleinPipeline"
        )


def _projections(attn, hidden_states, encoder_hidden_states):
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        encoder_query = encoder_key = encoder_value = None
        if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
            encoder_query, encoder_key, encoder_value = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        return query, key, value, encoder_query, encoder_key, encoder_value
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    encoder_query = encoder_key = encoder_value = None
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        encoder_query = attn.add_q_proj(encoder_hidden_states)
        encoder_key = attn.add_k_proj(encoder_hidden_states)
        encoder_value = attn.add_v_proj(encoder_hidden_states)
    return query, key, value, encoder_query, encoder_key, encoder_value


class Flux2AttnProcessor(FluxLayoutProcessor):
    """Double-stream blocks; one instance per attention module."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 kv_cache=None, kv_cache_mode=None, num_ref_tokens: int = 0):
        _refuse_kv_cache(kv_cache_mode)
        query, key, value = self.joint_inputs(attn, *_projections(attn, hidden_states, encoder_hidden_states))
        tokens = self.state.nag_tokens_at(self.layer, hidden_states.shape[0])
        if tokens is not None:  # NAG's negative text as extra text tokens of each row
            text, image = nag_token_outputs(self, attn, query, key, value, attention_mask, image_rotary_emb, tokens)
            return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(text)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.state.call.text_len
        hidden_states = self.attend_joint(attn, query, key, value, text_len, attention_mask)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class Flux2SingleAttnProcessor(FluxLayoutProcessor):
    """Single-stream (parallel) blocks: attention and MLP share the input and output projections."""

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None, kv_cache=None,
                 kv_cache_mode=None, num_txt_tokens: int = 0, num_ref_tokens: int = 0):
        _refuse_kv_cache(kv_cache_mode)
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        # split by the global QKV:MLP ratio, as the stock processor does (the same with column sharding)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)

        query, key, value = self.joint_inputs(attn, *qkv.chunk(3, dim=-1))  # the text tokens lead the sequence
        tokens = self.state.nag_tokens_at(self.layer, hidden_states.shape[0])
        if tokens is not None:  # NAG's negative text as extra text tokens of each row
            hidden_states = torch.cat(
                nag_token_outputs(self, attn, query, key, value, attention_mask, image_rotary_emb, tokens), dim=1)
        else:
            if image_rotary_emb is not None:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
            hidden_states = self.attend_joint(attn, query, key, value, self.state.call.text_len, attention_mask)
        mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)
        return attn.to_out(torch.cat([hidden_states, mlp_hidden_states], dim=-1))
