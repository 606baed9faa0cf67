"""Processor for Z-Image's single-stream attention ([image ; caption] per sample).

Reproduces diffusers' ZSingleStreamAttnProcessor (projections, RMS q/k norms, complex
rotary from `freqs_cis`, the rows' bool key mask) and hands the attention call to
`dit_attn.kernels.attention` with this layer's plan. The image tokens lead every row
(0, n): every sample of a call has an image of the same size, and the padding the model
adds (its pad tokens after the image, zero rows after the caption) comes after them.

Text edits act on the two segments of every row: the image segment (the image tokens and the
model's image pad tokens, up to the next multiple of 32) and the caption segment after it (the
caption, its pad tokens and the row's zero padding, with the row's key mask). TextPatch gives a
target row its source row's caption-segment keys, values and key mask, and its image tokens the
source row's rotary positions (Z-Image numbers the image after the padded caption, so the
image-caption offsets are the source run's; image-image attention sees relative positions only).
NAG's negative rows take their positive rows' image-segment q/k/v before rotary (rotated at the
negative row's positions), and the positive rows' image-segment outputs are combined. On NAG's token path
(`hooks.nag_tokens`) every row is [image segment ; caption segment ; negative caption segment]: the image queries
and the caption attend [image ; caption] (Z⁺), the image queries and the negative caption [image ; negative
caption] (Z⁻).
"""
from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

from ..hooks.nag_tokens_flux import image_first_nag_token_attend
from .dispatch import DispatchingProcessor
from .state import POOL_MODULE


def _rotate(x_in: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    with torch.amp.autocast("cuda", enabled=False):
        x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
        x_out = torch.view_as_real(x * freqs_cis.unsqueeze(2)).flatten(3)
        return x_out.type_as(x_in)


class ZImageAttnProcessor(DispatchingProcessor):
    """One instance per attention module of the main blocks."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        tokens = self.state.nag_tokens_at(self.layer, query.shape[0])
        if tokens is not None:
            hidden_states = self._nag_tokens_attention(attn, query, key, value, attention_mask, freqs_cis, tokens)
        else:
            hidden_states = self._attention_of_rows(attn, query, key, value, attention_mask, freqs_cis)
        output = attn.to_out[0](hidden_states)
        if len(attn.to_out) > 1:
            output = attn.to_out[1](output)
        return output

    def _attention_of_rows(self, attn, query, key, value, attention_mask, freqs_cis) -> torch.Tensor:
        """The attention output (B, S, H·D) before `to_out` from the (B, S, H, D) q/k/v after the q/k norms, with
        the text edits and NAG's row path acting on the rows' segments."""
        image_len = self.state.call.image_len
        segment = self._image_segment(image_len)
        if segment is not None:
            query, key, value = self._nag_image_inputs(segment, query, key, value)
            if freqs_cis is not None:
                freqs_cis = self._patch_segment(freqs_cis, 0, segment)
        if freqs_cis is not None:
            query = _rotate(query, freqs_cis)
            key = _rotate(key, freqs_cis)
        if segment is not None:
            key, value = self._patch_caption(segment, key, value)
            if attention_mask is not None:
                attention_mask = self._patch_segment(attention_mask, segment, None)
        dtype = query.dtype
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]

        seq_len = query.shape[1]
        image_tokens = (0, image_len) if image_len is not None else None
        plan = self.state.plan(self.layer, query.shape[0], image_tokens, getattr(attn, POOL_MODULE, None))
        if plan is not None and image_len is None:
            raise ValueError("dit-attn edits on Z-Image need the call's image tokens: only calls with one image "
                             "size per call (not omni calls) are supported")
        hidden_states = self.attend(query, key, value, plan, attention_mask, image_len or seq_len)
        hidden_states = hidden_states.flatten(2, 3).to(dtype)
        if segment is not None:
            hidden_states = self.state.nag_guide(self.layer, hidden_states, slice(0, segment))
        return hidden_states

    def _nag_tokens_attention(self, attn, query, key, value, attention_mask, freqs_cis, tokens) -> torch.Tensor:
        """NAG on the token path, from the (B, S, H, D) q/k/v after the q/k norms: the attention output (B, S, H·D)
        before `to_out` (the caption's key mask covers the rows' padding to the longest caption; the image keys
        and the negative caption's are all valid)."""
        text_len, rows = tokens
        image_len = self.state.call.image_len
        if freqs_cis is not None:
            query, key = _rotate(query, freqs_cis), _rotate(key, freqs_cis)
        segment = image_len + (-image_len) % SEQ_MULTI_OF
        return image_first_nag_token_attend(self, attn, query, key, value, attention_mask, segment, text_len, rows,
                                            image_len)

    def _image_segment(self, image_len: int | None) -> int | None:
        """Length of the image segment when a TextPatch, NAG or a concept Capture acts on this layer of the call."""
        nag = self.state.nag is not None and self.layer in self.state.nag.layers
        shared = nag or self.layer in self.state.shared_image_layers  # rows sharing image tokens (NAG, a concept Capture)
        if self.state.call.rows is None or not (shared or self.layer in self.state.patch_layers):
            return None
        if image_len is None:
            raise ValueError("text edits and NAG on Z-Image need the call's image tokens: only calls with one image "
                             "size per call (not omni calls) are supported")
        return image_len + (-image_len) % SEQ_MULTI_OF

    def _nag_image_inputs(self, segment: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        images = self.state.nag_image_inputs(self.layer, tuple(x[:, :segment] for x in tensors))
        return tuple(torch.cat([image, x[:, segment:]], dim=1) for image, x in zip(images, tensors))

    def _patch_segment(self, x: torch.Tensor, start: int, end: int | None) -> torch.Tensor:
        """TextPatch: tokens [start, end) of the target rows taken from their source rows."""
        part, _ = self.state.patch_text(self.layer, x[:, start:end], x[:, start:end])
        return torch.cat([x[:, :start], part] + ([x[:, end:]] if end is not None else []), dim=1)

    def _patch_caption(self, segment: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        text_key, text_value = self.state.patch_text(self.layer, key[:, segment:], value[:, segment:])
        return torch.cat([key[:, :segment], text_key], dim=1), torch.cat([value[:, :segment], text_value], dim=1)
