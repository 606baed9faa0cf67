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

from ..hooks.nag_tokens_flux import attention_sharing_image_keys, layer_shares_image_keys
from .dispatch import DispatchingProcessor
from .state import POOL_MODULE, nag_combination


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
        image_len = self.state.call.image_len
        tokens = self.state.nag_tokens_at(self.layer, query.shape[0])
        if tokens is not None:
            hidden_states = self._nag_tokens_attention(attn, query, key, value, attention_mask, freqs_cis, tokens)
            output = attn.to_out[0](hidden_states)
            return attn.to_out[1](output) if len(attn.to_out) > 1 else output
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

        output = attn.to_out[0](hidden_states)
        if len(attn.to_out) > 1:
            output = attn.to_out[1](output)
        return output

    def _nag_tokens_attention(self, attn, query, key, value, attention_mask, freqs_cis, tokens) -> torch.Tensor:
        """NAG on the token path, from the (B, S, H, D) q/k/v after the q/k norms: the attention output (B, S, H·D)
        before `to_out`, the guided rows' image segment Z⁺ combined with Z⁻."""
        text_len, rows = tokens
        image_len = self.state.call.image_len
        segment = image_len + (-image_len) % SEQ_MULTI_OF
        n = segment + text_len  # [image ; caption]: the stock sequence
        if freqs_cis is not None:
            query, key = _rotate(query, freqs_cis), _rotate(key, freqs_cis)
        dtype = query.dtype
        plan = self.state.plan(self.layer, query.shape[0], (0, image_len), getattr(attn, POOL_MODULE, None))
        if plan is None and layer_shares_image_keys(self, query):
            # the caption's key mask (the rows' padding to the longest caption); the image keys and the negative
            # caption's are all valid, and every row keeps its own caption's
            bias = None
            if attention_mask is not None:
                keep = attention_mask[:, None, None, segment:n]
                bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))
            q, k, v = (x.transpose(1, 2) for x in (query, key, value))
            parts = slice(0, segment), slice(segment, n), slice(n, None)
            z_pos, text, z_neg, negative = attention_sharing_image_keys(
                *(q[:, :, part] for part in parts), *((k[:, :, part], v[:, :, part]) for part in parts), (bias, None))
            out = torch.cat([z_pos, text], dim=2).transpose(1, 2)
            out_neg = torch.cat([z_neg, negative], dim=2).transpose(1, 2)
        else:
            mask = attention_mask[:, None, None, :] if attention_mask is not None else None
            positive = [x[:, :n] for x in (query, key, value)]
            negative = [torch.cat([x[:, :segment], x[:, n:]], dim=1) for x in (query, key, value)]
            out = self.attend(*positive, plan, mask[..., :n] if mask is not None else None, image_len)
            out_neg = self._attention(*negative, plan, None, image_len)
        out, out_neg = out.flatten(2, 3).to(dtype), out_neg.flatten(2, 3).to(dtype)
        rows = rows.to(out.device)
        image = out[:, :segment].clone()
        image[rows] = nag_combination(self.state.nag, out[rows, :segment], out_neg[rows, :segment]).to(dtype)
        return torch.cat([image, out[:, segment:], out_neg[:, segment:]], dim=1)

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
