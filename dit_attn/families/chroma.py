"""Chroma (`ChromaTransformer2DModel`): FLUX.1's attention (`FluxAttention`/`FluxAttnProcessor`) and
layout (double blocks, then single blocks; [text ; image]; 2×2-packed latents with position ids),
without pooled text or guidance inputs. Its pipelines always pass an attention mask over the text
padding, which the blocks turn into a float 0/1 mask *added* to the logits (stock behaviour the
processors keep); CFG is a second call with the negative prompt, without cache contexts.

Chroma's weights differ from FLUX.1's: `flux:*` presets are refused here (a different family).
"""
from __future__ import annotations

import torch

from .base import CallRows
from .flux import Flux, image_ids


class Chroma(Flux):
    name = "chroma"
    transformer_classes = ("ChromaTransformer2DModel",)
    stock_processors = ("FluxAttnProcessor",)
    guided_pipelines = ("ChromaPipeline", "ChromaImg2ImgPipeline")
    rows = CallRows(
        call_args=("hidden_states", "encoder_hidden_states", "timestep", "attention_mask"),
        block_stream_args=("hidden_states", "encoder_hidden_states", "x"),  # "x": norm_out's input
        block_call_args=("temb", "attention_mask", "emb"),  # per-row inputs of blocks and of norm_out
        controlnet_args=("controlnet_block_samples", "controlnet_single_block_samples"),
    )
    # a text edit's source rows would need their own prompt's attention mask in the call
    text_edits_unsupported = ("Chroma's calls mask each prompt's own padding, and a source prompt's mask "
                              "cannot ride in the target's call yet")

    def encode_prompts(self, pipe, prompts, max_sequence_length):
        raise NotImplementedError(f"text edits on Chroma: {self.text_edits_unsupported}")

    def predict(self, transformer, x_t, embeds, pooled, t, latent_hw, guidance=1.0):
        device, dtype = transformer.device, transformer.dtype
        return transformer(hidden_states=x_t.to(device, dtype), encoder_hidden_states=embeds.to(device, dtype),
                           timestep=t.to(device, dtype), img_ids=image_ids(*latent_hw).to(device, dtype),
                           txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)).sample
