"""Processor for FLUX double-stream and single-stream attention ([text ; image] order).

Reproduces diffusers' FluxAttnProcessor (projections, RMS q/k norms, rotary) and hands
the attention call to `dit_attn.kernels.attention` with this layer's plan.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

from ..hooks.private import flux_qkv_projections
from .dispatch import DispatchingProcessor
from .ip_adapter import take_over_image_prompt
from .state import POOL_MODULE


class FluxLayoutProcessor(DispatchingProcessor):
    """What the processors of FLUX-layout attention share ([text ; image]; FLUX.1's and FLUX.2's
    double and single blocks): the joint inputs and the attention call with its edits."""

    def joint_inputs(self, attn, query, key, value, encoder_query=None, encoder_key=None, encoder_value=None):
        """(B, S, H, D) joint q, k, v before rotary: heads split, q/k normed, TextPatch's text keys/values and
        NAG's image q/k/v put in. Without encoder projections (single blocks) the text tokens already lead."""
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if encoder_query is None:
            key, value = self.patch_leading_text(key, value)
            return self.state.nag_image_inputs(self.layer, (query, key, value), self.state.call.text_len)
        encoder_query, encoder_key, encoder_value = (
            x.unflatten(-1, (-1, attn.head_dim)) for x in (encoder_query, encoder_key, encoder_value))
        encoder_query = attn.norm_added_q(encoder_query)
        encoder_key = attn.norm_added_k(encoder_key)
        encoder_key, encoder_value = self.state.patch_text(self.layer, encoder_key, encoder_value)
        query, key, value = self.state.nag_image_inputs(self.layer, (query, key, value))
        return (torch.cat([encoder_query, query], dim=1), torch.cat([encoder_key, key], dim=1),
                torch.cat([encoder_value, value], dim=1))

    def patch_leading_text(self, key, value):
        """TextPatch where text and image share one projection: the text tokens lead the sequence."""
        if self.layer not in self.state.patch_layers or self.state.call.rows is None:
            return key, value
        text_len = self.state.call.text_len
        text_key, text_value = self.state.patch_text(self.layer, key[:, :text_len], value[:, :text_len])
        return torch.cat([text_key, key[:, text_len:]], dim=1), torch.cat([text_value, value[:, text_len:]], dim=1)

    def attend_joint(self, attn, query, key, value, text_len: int, attention_mask) -> torch.Tensor:
        """(B, S, H·D) joint attention output with this layer's plan, NAG's combination on the image tokens."""
        seq_len = query.shape[1]
        image_stop = self.local_image_stop(text_len, seq_len)
        plan = self.state.plan(self.layer, query.shape[0], (text_len, image_stop), getattr(attn, POOL_MODULE, None))
        out = self.attend(query, key, value, plan, attention_mask, image_stop - text_len).flatten(2, 3).to(query.dtype)
        return self.state.nag_guide(self.layer, out, slice(text_len, None))


class FluxAttnProcessor(FluxLayoutProcessor):
    """One instance per attention module; `layer` numbers single blocks after double blocks."""

    # FLUX.1's stock processor makes the split outputs contiguous before `to_out`; in bfloat16 the GEMM of a
    # strided input rounds differently, so a model whose stock processor does not (Bria) sets this False
    contiguous_outputs = True

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.attention(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)[0]

    def attention(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb):
        """(the stock processor's output, the image queries before rotary (B, S_img, H, D) or None in a single block)."""
        tokens = self.state.nag_tokens_at(self.layer, hidden_states.shape[0])
        if tokens is not None:  # NAG's negative text as extra text tokens of each row
            from ..hooks.nag_tokens_flux import nag_token_attention

            return nag_token_attention(self, attn, hidden_states, encoder_hidden_states, attention_mask,
                                       image_rotary_emb, tokens)
        query, key, value = self.joint_inputs(attn, *flux_qkv_projections(attn, hidden_states, encoder_hidden_states))
        if attention_mask is not None:  # rows whose text a TextPatch replaces take their source rows' mask (Chroma)
            attention_mask, _ = self.state.patch_text(self.layer, attention_mask, attention_mask)
        image_query = query[:, encoder_hidden_states.shape[1]:] if encoder_hidden_states is not None else None

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.state.call.text_len
        hidden_states = self.attend_joint(attn, query, key, value, text_len, attention_mask)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            if self.contiguous_outputs:
                hidden_states, encoder_hidden_states = hidden_states.contiguous(), encoder_hidden_states.contiguous()
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
            return (hidden_states, encoder_hidden_states), image_query
        return hidden_states, None


class BriaProcessor(FluxAttnProcessor):
    """FLUX.1's processor for Bria 3.2, whose stock processor hands `to_out` the split outputs as they are."""

    contiguous_outputs = False


class FluxIPAdapterProcessor(FluxAttnProcessor, FluxIPAdapterAttnProcessor):
    """FluxAttnProcessor with the image-prompt branch of diffusers' FluxIPAdapterAttnProcessor, whose
    projections (`to_k_ip`, `to_v_ip`) and `scale` it takes over: the image tokens' queries also attend
    to each IP-Adapter's image states, unedited, and the double block adds that output to its image
    stream. It is a FluxIPAdapterAttnProcessor to diffusers (`set_ip_adapter_scale`, `unload_ip_adapter`,
    the checkpoint keys)."""

    def __init__(self, layer: int = -1, state=None, image_prompt: FluxIPAdapterAttnProcessor | None = None):
        torch.nn.Module.__init__(self)
        FluxAttnProcessor.__init__(self, layer, state)
        take_over_image_prompt(self, image_prompt)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        ip_hidden_states: list[torch.Tensor] | None = None,
        ip_adapter_masks: torch.Tensor | None = None,
    ):
        out, image_query = self.attention(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if image_query is None:
            return out
        hidden_states, encoder_hidden_states = out
        batch_size = image_query.shape[0]
        ip_out = torch.zeros_like(hidden_states)
        for states, scale, to_k_ip, to_v_ip in zip(ip_hidden_states, self.scale, self.to_k_ip, self.to_v_ip):
            ip_key = to_k_ip(states).view(batch_size, -1, attn.heads, attn.head_dim)
            ip_value = to_v_ip(states).view(batch_size, -1, attn.heads, attn.head_dim)
            states = dispatch_attention_fn(image_query, ip_key, ip_value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                           backend=self._attention_backend, parallel_config=self._parallel_config)
            ip_out += scale * states.reshape(batch_size, -1, attn.heads * attn.head_dim).to(image_query.dtype)
        return hidden_states, encoder_hidden_states, ip_out
