"""Processor for HunyuanVideo 1.5's joint attention ([video ; context] order, double-stream blocks only).

Reproduces diffusers' HunyuanVideo15AttnProcessor2_0 (q/k/v projections, RMS q/k norms, rotary on the video
tokens, the context projected with `add_*_proj` and its own norms) and hands the attention call to
`dit_attn.kernels.attention` with this layer's plan; with no plan it makes the stock dispatch call under
the stock mask (keys and queries of the context padding both masked).

TextPatch gives a target row its source row's context keys, values and context key mask (its own context
queries keep their own mask); NAG's negative rows take their positive rows' video q/k/v (after rotary: every
row has the same video positions) and NAG combines the video tokens' outputs. On NAG's token path
(`hooks.nag_tokens`) each row's context is [context ; negative context], attended under key masks only (the
padding queries' outputs are never read).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from ..hooks.nag_tokens_flux import image_first_nag_token_attend
from .dispatch import DispatchingProcessor
from .hunyuan_image import project_outputs, project_qkv
from .state import POOL_MODULE


class HunyuanVideo15AttnProcessor(DispatchingProcessor):
    """One instance per block's `attn`."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query, key, value = project_qkv(attn, hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        video_tokens = query.shape[1]
        query, key, value = self.state.nag_image_inputs(self.layer, (query, key, value))
        if encoder_hidden_states is not None:
            context_query, context_key, context_value = project_qkv(
                attn, encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q,
                attn.norm_added_k)
            context_key, context_value = self.state.patch_text(self.layer, context_key, context_value)
            query, key, value = (torch.cat([x, c], dim=1) for x, c in
                                 zip((query, key, value), (context_query, context_key, context_value)))

        batch, seq_len = query.shape[:2]
        keep = F.pad(attention_mask, (seq_len - attention_mask.shape[1], 0), value=True).bool()
        tokens = self.state.nag_tokens_at(self.layer, batch)
        if tokens is not None:  # NAG's negative context after each row's: [video ; context ; negative context]
            hidden_states = image_first_nag_token_attend(self, attn, query, key, value, keep, video_tokens, tokens[0],
                                                         tokens[1], video_tokens)
            return project_outputs(attn, hidden_states, encoder_hidden_states.shape[1])
        key_mask, _ = self.state.patch_text(self.layer, attention_mask, attention_mask)
        keys_kept = keep if key_mask is attention_mask else F.pad(key_mask, (seq_len - key_mask.shape[1], 0), value=True).bool()
        plan = self.state.plan(self.layer, batch, (0, video_tokens), getattr(attn, POOL_MODULE, None))
        if plan is None and keys_kept is keep:
            rows = keep.view(batch, 1, 1, seq_len).repeat(1, 1, seq_len, 1)
            mask = (rows & rows.transpose(2, 3)).bool()
        elif plan is None:  # a patched layer: the row's own queries over its source row's keys
            mask = keep[:, None, :, None] & keys_kept[:, None, None, :]
        else:
            # a key mask: a padding query of the stock mask sees no key (a NaN softmax in the kernels); its
            # row is never read, since padding keys are masked in every block and the context is not output
            mask = keys_kept[:, None, None, :]
        hidden_states = self.attend(query, key, value, plan, mask, video_tokens)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        hidden_states = self.state.nag_guide(self.layer, hidden_states, slice(0, video_tokens))

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = project_outputs(attn, hidden_states, encoder_hidden_states.shape[1])
        return hidden_states, encoder_hidden_states
