"""Ovis-Image (`OvisImageTransformer2DModel`): FLUX.1's attention math and layout (double blocks, then single
blocks; [text ; image]; 2×2-packed latents with position ids) in its own classes. `OvisImageAttnProcessor` is
`FluxAttnProcessor` op for op (same projections, RMS q/k norms, concatenation, rotary, dispatch with the
module's mask), so dit-attn's FLUX.1 processor serves it. No pooled text or guidance inputs; text ids are
(0, i, i), image ids (0, row, col). CFG is a second call under cache context "uncond" after the "cond" one.

The model has no `AttentionMixin`: its processors are reached through each attention module's `processor`.
Its text encoder is Qwen3 behind a chat template: text edits are not wired here (no tiny encoder to test
them on). Ovis-Image's weights differ from FLUX.1's: `flux:*` presets are refused (a different family).
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
    rows = CallRows(
        call_args=("hidden_states", "encoder_hidden_states", "timestep"),
        block_stream_args=("hidden_states", "encoder_hidden_states", "x"),  # "x": norm_out's input
        block_call_args=("temb", "conditioning_embedding"),  # per-row inputs of blocks and of norm_out
        controlnet_args=(),
    )
    nag = False  # not tested on this family
    reference_tokens_trail = False
    text_edits_unsupported = ("Ovis-Image's prompts go through Qwen3 behind a chat template; "
                              "text edits are not wired for this family")

    def attention_processors(self, transformer) -> dict:
        return {f"{name}.processor": module.processor for name, module in _attention_modules(transformer)}

    def set_processors(self, transformer, processors: dict) -> None:
        for key, processor in processors.items():
            transformer.get_submodule(key.removesuffix(".processor")).set_processor(processor)

    def conditional_rows(self, pipe, batch: int, call: dict, context: str | None):
        """The "cond" call is conditional; the CFG call under cache context "uncond" is left stock."""
        if context == "uncond":
            return None
        return torch.arange(batch)

    def encode_prompts(self, pipe, prompts, max_sequence_length):
        raise NotImplementedError(f"text edits on Ovis-Image: {self.text_edits_unsupported}")

    def predict(self, transformer, x_t, embeds, pooled, t, latent_hw, guidance=1.0):
        device, dtype = transformer.device, transformer.dtype
        return transformer(hidden_states=x_t.to(device, dtype), encoder_hidden_states=embeds.to(device, dtype),
                           timestep=t.to(device, dtype), img_ids=image_ids(*latent_hw).to(device, dtype),
                           txt_ids=ovis_text_ids(embeds.shape[1]).to(device, dtype)).sample
