"""Processor for SD3 / SD3.5 joint attention ([image ; text] order).

Reproduces diffusers' JointAttnProcessor2_0 step by step and hands the attention
call to `dit_attn.kernels.attention` with this layer's plan.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0

from .. import kernels
from ..hooks import nag_tokens_flux
from .ip_adapter import take_over_image_prompt
from .state import POOL_MODULE, EditState, LayerProcessor, nag_guided_rows


def _split_heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """(B, S, H·D) → (B, H, S, D)."""
    return x.view(x.shape[0], -1, heads, head_dim).transpose(1, 2)


class SD3AttnProcessor(LayerProcessor):
    """One instance per attention module. `joint` is False for SD3.5's image-only attn2."""

    def __init__(self, layer: int = -1, state: EditState | None = None, joint: bool = True):
        super().__init__(layer, state)
        self.joint = joint

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, image_tokens: int,
               pool=None, negative: tuple[torch.Tensor, ...] | None = None):
        """The attention call, (B, H, S, D) with [image ; text] tokens. negative: NAG's second (q, k, v) of the
        same rows, [image ; negative text], attended with the same plan: then (output, negative output); where
        the layer's attention is plain SDPA and `hooks.nag_tokens_flux.shares_image_keys` the image keys' part of
        both runs once."""
        plan = self.state.plan(self.layer, query.shape[0], (0, image_tokens), pool, perturbed=self.joint)
        scale = self.state.scale_for(self.layer, image_tokens, query.shape[-1])
        if (negative is not None and plan is None and scale is None
                and nag_tokens_flux.shares_image_keys(query, self.state.capture, image_tokens)):
            return nag_tokens_flux.image_first_attention_sharing_image_keys((query, key, value), negative, image_tokens)
        backend = self.state.backend_for(plan)
        if self.state.capture is not None and self.joint:
            self.state.capture.record(self.layer, query, key, plan, None, (0, image_tokens), scale, "BHSD", self.state.call)
            out = kernels.attention(query, key, value, plan, scale=scale, backend=backend)
            self.state.capture.record_output(self.layer, out, "BHSD", self.state.call)
        else:
            out = kernels.attention(query, key, value, plan, scale=scale, backend=backend)
        if negative is None:
            return out
        return out, kernels.attention(*negative, plan, scale=scale, backend=backend)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        hidden_states, encoder_hidden_states, _ = self.attention(attn, hidden_states, encoder_hidden_states)
        return self.output(attn, hidden_states, encoder_hidden_states)

    def attention(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
        """(image output before `to_out`, text output after `to_add_out` or None, the image tokens' q/k/v
        projections (B, H, S, D) before the q/k norms)."""
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query, key, value = (_split_heads(x, attn.heads, head_dim) for x in (query, key, value))
        image_projections = query, key, value
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            tokens = self.state.nag_tokens_at(self.layer, batch_size)
            if tokens is not None and self._image_queries_only(attn, residual.shape[1], batch_size):
                return self._nag_tokens_image_queries(attn, (query, key, value), encoder_hidden_states, tokens,
                                                      image_projections)
            context_query = _split_heads(attn.add_q_proj(encoder_hidden_states), attn.heads, head_dim)
            if attn.norm_added_q is not None:
                context_query = attn.norm_added_q(context_query)
            context_key, context_value = self._text_keys_values(attn, encoder_hidden_states, head_dim)
            if tokens is not None:
                return self._nag_tokens_attention(attn, (query, key, value), (context_query, context_key, context_value),
                                                  tokens, image_projections)
            query, key, value = self.state.nag_image_inputs(self.layer, (query, key, value))
            query = torch.cat([query, context_query], dim=2)
            key = torch.cat([key, context_key], dim=2)
            value = torch.cat([value, context_value], dim=2)

        hidden_states = self.attend(query, key, value, residual.shape[1], getattr(attn, POOL_MODULE, None))
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states = self.state.nag_guide(self.layer, hidden_states, slice(0, residual.shape[1]))
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states, image_projections

    def _nag_tokens_attention(self, attn, image: tuple, text: tuple, tokens: tuple[int, torch.Tensor],
                              image_projections: tuple):
        """NAG on the token path (`hooks.nag_tokens`): the text is [positive ; negative]; the image queries and
        the positive text attend [image ; positive text], the negative text [image ; negative text]; the guided
        rows' image outputs combine Z⁺ with Z⁻."""
        text_len, rows = tokens
        image_tokens = image[0].shape[2]
        positive = [torch.cat([x, t[:, :, :text_len]], dim=2) for x, t in zip(image, text)]
        negative = [torch.cat([x, t[:, :, text_len:]], dim=2) for x, t in zip(image, text)]
        outputs = self.attend(*positive, image_tokens, getattr(attn, POOL_MODULE, None), negative=negative)
        dtype = positive[0].dtype
        out, out_neg = (x.transpose(1, 2).flatten(2).to(dtype) for x in outputs)
        hidden_states = nag_guided_rows(self.state.nag, out[:, :image_tokens], out_neg[:, :image_tokens], rows)
        encoder_hidden_states = torch.cat([out[:, image_tokens:], out_neg[:, image_tokens:]], dim=1)
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states, image_projections

    def _text_keys_values(self, attn, text: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The text tokens' keys (after their norm) and values (B, H, S, D), with TextPatch's rows patched."""
        key = _split_heads(attn.add_k_proj(text), attn.heads, head_dim)
        value = _split_heads(attn.add_v_proj(text), attn.heads, head_dim)
        if attn.norm_added_k is not None:
            key = attn.norm_added_k(key)
        return self.state.patch_text(self.layer, key, value)

    def _image_queries_only(self, attn, image_tokens: int, batch: int) -> bool:
        """SD3's last block drops its text's attention output (`context_pre_only`): where the layer's attention is
        plain SDPA with nothing recorded, the token path attends the image queries only."""
        return (attn.context_pre_only and self.state.capture is None
                and self.state.plan(self.layer, batch, (0, image_tokens), getattr(attn, POOL_MODULE, None),
                                    perturbed=self.joint) is None
                and self.state.scale_for(self.layer, image_tokens, attn.inner_dim // attn.heads) is None)

    def _nag_tokens_image_queries(self, attn, image: tuple, text: torch.Tensor, tokens: tuple[int, torch.Tensor],
                                  image_projections: tuple):
        """`_nag_tokens_attention` at a `context_pre_only` block: the image queries attend [image ; positive text]
        (Z⁺) and [image ; negative text] (Z⁻); the text output is empty."""
        text_len, rows = tokens
        query, key, value = image
        context_key, context_value = self._text_keys_values(attn, text, query.shape[-1])
        parts = slice(0, text_len), slice(text_len, None)
        if nag_tokens_flux.shares_image_keys(query, None, query.shape[2]):
            none = query[:, :, :0]
            texts = ((context_key[:, :, part], context_value[:, :, part]) for part in parts)
            outputs = nag_tokens_flux.attention_sharing_image_keys(query, none, none, (key, value), *texts)
        else:
            outputs = (F.scaled_dot_product_attention(query, torch.cat([key, context_key[:, :, part]], dim=2),
                                                      torch.cat([value, context_value[:, :, part]], dim=2))
                       for part in parts)
        out, out_neg = (x.transpose(1, 2).flatten(2).to(query.dtype) for x in outputs)
        # the block unpacks two outputs and drops the text's
        return nag_guided_rows(self.state.nag, out, out_neg, rows), out[:, :0], image_projections

    @staticmethod
    def output(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class SD3IPAdapterProcessor(SD3AttnProcessor, SD3IPAdapterJointAttnProcessor2_0):
    """SD3AttnProcessor with the image-prompt branch of diffusers' SD3IPAdapterJointAttnProcessor2_0, whose
    modules (`norm_ip`, `to_k_ip`, `to_v_ip`, its own q/k norms) and `scale` it takes over: the image
    tokens' queries attend, unedited, to [image keys ; IP-Adapter image keys], added to the image output
    before `to_out`. It is an SD3IPAdapterJointAttnProcessor2_0 to diffusers (`set_ip_adapter_scale`,
    `unload_ip_adapter`, the checkpoint keys)."""

    def __init__(self, layer: int = -1, state: EditState | None = None, joint: bool = True,
                 image_prompt: SD3IPAdapterJointAttnProcessor2_0 | None = None):
        torch.nn.Module.__init__(self)
        SD3AttnProcessor.__init__(self, layer, state, joint)
        take_over_image_prompt(self, image_prompt)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        ip_hidden_states: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ):
        hidden_states, encoder_hidden_states, (query, key, value) = self.attention(attn, hidden_states, encoder_hidden_states)
        if self.scale != 0 and ip_hidden_states is not None:
            batch_size, head_dim = query.shape[0], query.shape[-1]
            states = self.norm_ip(ip_hidden_states, temb=temb)
            ip_key = _split_heads(self.to_k_ip(states), attn.heads, head_dim)
            ip_value = _split_heads(self.to_v_ip(states), attn.heads, head_dim)
            key = torch.cat([self.norm_k(key), self.norm_ip_k(ip_key)], dim=2)
            value = torch.cat([value, ip_value], dim=2)
            states = F.scaled_dot_product_attention(self.norm_q(query), key, value, dropout_p=0.0, is_causal=False)
            states = states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
            hidden_states = hidden_states + states * self.scale
        return self.output(attn, hidden_states, encoder_hidden_states)
