"""Processor for Qwen-Image's dual-stream joint attention ([text ; image] order).

Reproduces diffusers' QwenDoubleStreamAttnProcessor2_0 (separate text/image projections,
RMS q/k norms, complex rotary with the image and text tables, the joint key mask built from
`encoder_hidden_states_mask`) and hands the attention call to `dit_attn.kernels.attention`
with this layer's plan.
"""
from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from ..hooks.nag_tokens_flux import nag_token_attend
from .dispatch import DispatchingProcessor
from .state import POOL_MODULE


class QwenImageAttnProcessor(DispatchingProcessor):
    """One instance per attention module (every block is dual-stream)."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            raise ValueError("Qwen-Image attention needs encoder_hidden_states (the text stream)")
        if attention_mask is not None:
            raise ValueError("Qwen-Image attention takes no external attention_mask: pass encoder_hidden_states_mask")

        tokens = self.state.nag_tokens_at(self.layer, hidden_states.shape[0])
        if encoder_hidden_states_mask is not None:
            # rows whose text keys/values a TextPatch replaces take their source rows' text mask with them
            text_mask, _ = self.state.patch_text(self.layer, encoder_hidden_states_mask, encoder_hidden_states_mask)
            image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            attention_mask = torch.cat([text_mask, image_mask], dim=1)[:, None, None, :]

        text_len = encoder_hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads
        img_query, img_key, img_value = (
            proj(hidden_states).unflatten(-1, (-1, head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        txt_query, txt_key, txt_value = (
            proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
            for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)

        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            if tokens is not None:  # NAG's negative text tokens sit at the positive text's positions
                txt_freqs = torch.cat([txt_freqs[: tokens[0]]] * 2)
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)
        txt_key, txt_value = self.state.patch_text(self.layer, txt_key, txt_value)
        # NAG: the negative rows take their positive rows' image queries/keys/values (their own text and text mask)
        img_query, img_key, img_value = self.state.nag_image_inputs(self.layer, (img_query, img_key, img_value))

        query = torch.cat([txt_query, img_query], dim=1)
        key = torch.cat([txt_key, img_key], dim=1)
        value = torch.cat([txt_value, img_value], dim=1)

        if tokens is not None:  # NAG's negative text as extra text tokens of each row
            txt_out, img_out = nag_token_attend(self, attn, query, key, value, attention_mask, tokens)
        else:
            image_stop = self.local_image_stop(text_len, query.shape[1])
            plan = self.state.plan(self.layer, query.shape[0], (text_len, image_stop), getattr(attn, POOL_MODULE, None))
            joint = self.attend(query, key, value, plan, attention_mask, image_stop - text_len)
            joint = joint.flatten(2, 3).to(query.dtype)
            joint = self.state.nag_guide(self.layer, joint, slice(text_len, None))
            txt_out, img_out = joint[:, :text_len], joint[:, text_len:]
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        txt_out = attn.to_add_out(txt_out.contiguous())
        return img_out, txt_out
