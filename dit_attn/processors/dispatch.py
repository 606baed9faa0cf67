"""The attention call every diffusers-dispatch processor makes: the stock one when a layer has
nothing to edit, dit-attn's kernels otherwise."""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from .. import kernels
from .state import LayerProcessor


class DispatchingProcessor(LayerProcessor):
    """Base of the processors whose stock version calls diffusers' `dispatch_attention_fn`."""

    _attention_backend = None  # set by diffusers' set_attention_backend, copied over by `install`
    _parallel_config = None

    def local_image_stop(self, text_len: int, seq_len: int) -> int:
        """Where the image tokens of this layer's plan end in a [text ; image] sequence. At a local layer of
        a call with reference-image tokens after the generated grid (FLUX.1 Kontext, FLUX.2 with reference
        images, Qwen-Image-Edit), the grid's end: the reference tokens join the text as global tokens (every
        query sees them, their queries see everything)."""
        local, grid = self.state.local, self.state.call.grid
        if local is None or self.layer not in local.layers or grid is None or len(grid) != 2:
            return seq_len
        return min(seq_len, text_len + grid[0] * grid[1])

    def attend(self, query, key, value, plan, attention_mask, image_tokens: int) -> torch.Tensor:
        """(B, S, H, D) → (B, S, H, D). With no plan: diffusers' own call, so `attention_backend(...)` and
        `set_attention_backend` reach the layer; else the plan on dit-attn's kernels (image_tokens: the
        count the length-adjusted local scale uses)."""
        if self.state.capture is not None:
            self.state.capture.record(self.layer, query, key, plan, attention_mask, self.state.call.image_range,
                                      self.state.scale_for(self.layer, image_tokens, query.shape[-1]), "BSHD",
                                      self.state.call)
            out = self._attention(query, key, value, plan, attention_mask, image_tokens)
            self.state.capture.record_output(self.layer, out, "BSHD", self.state.call)
            return out
        return self._attention(query, key, value, plan, attention_mask, image_tokens)

    def _attention(self, query, key, value, plan, attention_mask, image_tokens: int) -> torch.Tensor:
        if plan is None:
            return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                         parallel_config=self._parallel_config)
        if self._parallel_config is not None:
            raise NotImplementedError("dit-attn perturbations do not support context parallelism yet")
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        return kernels.attention(query, key, value, plan, layout="BSHD", attn_mask=attention_mask,
                                 backend=self.state.backend_for(plan),
                                 scale=self.state.scale_for(self.layer, image_tokens, query.shape[-1]))
