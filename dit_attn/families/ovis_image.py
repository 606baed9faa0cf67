"""Ovis-Image (`OvisImageTransformer2DModel`): FLUX.1's attention math and layout (double blocks, then single
blocks; [text ; image]; 2×2-packed latents with position ids) in its own classes. `OvisImageAttnProcessor` is
`FluxAttnProcessor` op for op (same projections, RMS q/k norms, concatenation, rotary, dispatch with the
module's mask), so dit-attn's FLUX.1 processor serves it. No pooled text or guidance inputs; text ids are
(0, i, i), image ids (0, row, col). CFG is a second call under cache context "uncond" after the "cond" one.

The model has no `AttentionMixin`: its processors are reached through each attention module's `processor`.
Its text encoder is Qwen3 behind a chat template; the pipeline pads every prompt to `max_sequence_length`
tokens and zeroes the padding (no mask), so a source or negative prompt rides at the call's length as
FLUX.1's does. Ovis-Image's weights differ from FLUX.1's: `flux:*` presets are refused (a different family).
"""
from __future__ import annotations

import torch

from .base import CallRows
from .flux import Flux, image_ids


def ovis_text_ids(length: int) -> torch.Tensor:
    ids = torch.zeros(length, 3)
    ids[:, 1] = ids[:, 2] = torch.arange(length).float()
    return ids


def _attention_modules(transformer):
    for block_list in ("transformer_blocks", "single_transformer_blocks"):
        for i, block in enumerate(getattr(transformer, block_list)):
            yield f"{block_list}.{i}.attn", block.attn


class OvisImage(Flux):
    name = "ovis_image"
    transformer_classes = ("OvisImageTransformer2DModel",)
    stock_processors = ("OvisImageAttnProcessor",)
    guided_pipelines = ("OvisImagePipeline",)
    negative_embeds_extra = ""  # the calls take no text mask
    rows = CallRows(
        call_args=("hidden_states", "encoder_hidden_states", "timestep"),
        block_stream_args=("hidden_states", "encoder_hidden_states", "x"),  # "x": norm_out's input
        block_call_args=("temb", "conditioning_embedding"),  # per-row inputs of blocks and of norm_out
        controlnet_args=(),
    )
    reference_tokens_trail = False

    def attention_processors(self, transformer) -> dict:
        return {f"{name}.processor": module.processor for name, module in _attention_modules(transformer)}

    def conditional_rows(self, pipe, batch: int, call: dict, context: str | None):
        """The "cond" call is conditional; the CFG call under cache context "uncond" is left stock."""
        if context == "uncond":
            return None
        return range(batch)

    def encode_prompts(self, pipe, prompts, max_sequence_length):
        """(Qwen3 states (N, S, D) padded to `max_sequence_length` (padding zeroed by the pipeline), a mask of
        ones (N, S): Ovis passes none)."""
        embeds = pipe.encode_prompt(prompt=list(prompts), do_classifier_free_guidance=False, num_images_per_prompt=1,
                                    max_sequence_length=max_sequence_length or 256)[0]
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)

    def predict(self, transformer, x_t, embeds, pooled, t, latent_hw, guidance=1.0):
        device, dtype = transformer.device, transformer.dtype
        return transformer(hidden_states=x_t.to(device, dtype), encoder_hidden_states=embeds.to(device, dtype),
                           timestep=t.to(device, dtype), img_ids=image_ids(*latent_hw).to(device, dtype),
                           txt_ids=ovis_text_ids(embeds.shape[1]).to(device, dtype)).sample
