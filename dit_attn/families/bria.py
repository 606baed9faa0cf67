"""Bria 3.2 (`BriaTransformer2DModel`): FLUX.1's attention math and layout (double blocks, then single blocks;
[text ; image]; 2×2-packed latents with position ids) in its own classes. `BriaAttnProcessor` is
`FluxAttnProcessor` op for op (same projections, RMS q/k norms, concatenation, rotary, dispatch with the
module's mask), so dit-attn's FLUX.1 processor serves it. No pooled text or guidance inputs in its pipeline;
text ids are zeros, image ids (0, row, col); the model takes the scheduler's timestep (0-1000) as is.
CFG is one batched call, rows [uncond ; cond] (then an optional std renormalisation and clipping).

The model has no `AttentionMixin`: its processors are reached through each attention module's `processor`.
Text edits: the pipeline zero-pads every prompt's T5 states to `max_sequence_length` (no mask), so a source
or negative prompt rides at the call's length as FLUX.1's does. Bria's weights differ from FLUX.1's:
`flux:*` presets are refused (a different family).
"""
from __future__ import annotations

import torch

from .base import CallRows
from .flux import Flux, image_ids
from .ovis_image import OvisImage


class Bria(Flux):
    name = "bria"
    transformer_classes = ("BriaTransformer2DModel",)
    stock_processors = ("BriaAttnProcessor",)
    guided_pipelines = ("BriaPipeline",)
    negative_embeds_extra = ""  # the calls take no text mask
    rows = CallRows(
        call_args=("hidden_states", "encoder_hidden_states", "timestep"),
        block_stream_args=("hidden_states", "encoder_hidden_states", "x"),  # "x": norm_out's input
        block_call_args=("temb", "conditioning_embedding"),  # per-row inputs of blocks and of norm_out
        controlnet_args=("controlnet_block_samples", "controlnet_single_block_samples"),
    )
    reference_tokens_trail = False

    attention_processors = OvisImage.attention_processors  # each module's `processor`, both block lists
    set_processors = OvisImage.set_processors

    def processor_for(self, key: str, layer: int, state):
        from ..processors.flux import BriaProcessor

        return BriaProcessor(layer, state)

    def conditional_rows(self, pipe, batch: int, call: dict, context: str | None):
        """With CFG the call is [uncond ; cond]: the second half is conditional."""
        if pipe.do_classifier_free_guidance:
            if batch % 2:
                raise RuntimeError(f"a Bria CFG call with an odd number of rows ({batch})")
            return range(batch // 2, batch)
        return range(batch)

    def encode_prompts(self, pipe, prompts, max_sequence_length):
        """(T5 states (N, S, D) zero-padded to `max_sequence_length`, a mask of ones (N, S): Bria passes none)."""
        embeds, _, _ = pipe.encode_prompt(prompt=list(prompts), do_classifier_free_guidance=False, num_images_per_prompt=1,
                                          max_sequence_length=max_sequence_length or 128)
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)

    def predict(self, transformer, x_t, embeds, pooled, t, latent_hw, guidance=1.0):
        """The model takes the timestep on the scheduler's 0-1000 scale (no ×1000 inside, unlike FLUX.1)."""
        device, dtype = transformer.device, transformer.dtype
        return transformer(hidden_states=x_t.to(device, dtype), encoder_hidden_states=embeds.to(device, dtype),
                           timestep=(1000 * t).to(device, dtype), img_ids=image_ids(*latent_hw).to(device, dtype),
                           txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)).sample
