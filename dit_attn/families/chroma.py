"""Chroma (`ChromaTransformer2DModel`): FLUX.1's attention (`FluxAttention`/`FluxAttnProcessor`) and
layout (double blocks, then single blocks; [text ; image]; 2×2-packed latents with position ids),
without pooled text or guidance inputs. Its pipelines always pass an attention mask over the text
padding, which the blocks turn into a float 0/1 mask *added* to the logits (stock behaviour the
processors keep); CFG is a second call with the negative prompt, without cache contexts. A text
edit's source rows carry their own prompt's mask. `ChromaInpaintPipeline` (diffusers 0.42.1) reads
`transformer.config.guidance_embeds`, which Chroma's config lacks: it runs once that is set (to False).

Chroma's weights differ from FLUX.1's: `flux:*` presets are refused here (a different family).
"""
from __future__ import annotations

import torch

from .base import CallRows, appended_text
from .flux import Flux, image_ids


class Chroma(Flux):
    name = "chroma"
    transformer_classes = ("ChromaTransformer2DModel",)
    stock_processors = ("FluxAttnProcessor",)
    guided_pipelines = ("ChromaPipeline", "ChromaImg2ImgPipeline", "ChromaInpaintPipeline")
    negative_embeds_extra, negative_mask_required = "mask", True  # the text mask the pipeline makes
    rows = CallRows(
        call_args=("hidden_states", "encoder_hidden_states", "timestep", "attention_mask"),
        block_stream_args=("hidden_states", "encoder_hidden_states", "x"),  # "x": norm_out's input
        block_call_args=("temb", "attention_mask", "emb"),  # per-row inputs of blocks and of norm_out
        controlnet_args=("controlnet_block_samples", "controlnet_single_block_samples"),
    )
    def encode_prompts(self, pipe, prompts, max_sequence_length):
        """(text states (N, S, D), text mask (N, S)): Chroma's own mask keeps each prompt's tokens and
        its first padding token."""
        embeds, _, mask, *_ = pipe.encode_prompt(prompt=list(prompts), do_classifier_free_guidance=False,
                                                 num_images_per_prompt=1, max_sequence_length=max_sequence_length or 512)
        return embeds, mask

    def append_text_rows(self, call: dict, embeds, extra, padded: bool = True) -> dict:
        """Source rows with their own prompt's mask over the text and the call's over the image tokens."""
        text = call["encoder_hidden_states"]
        out = {"encoder_hidden_states": appended_text(call, embeds)}
        mask = call.get("attention_mask")
        if mask is not None:
            image = mask[:1, text.shape[1]:].expand(embeds.shape[0], -1)
            out["attention_mask"] = torch.cat([mask, torch.cat([extra.to(mask), image], dim=1)])
        return out

    def predict(self, transformer, x_t, embeds, pooled, t, latent_hw, guidance=1.0):
        device, dtype = transformer.device, transformer.dtype
        return transformer(hidden_states=x_t.to(device, dtype), encoder_hidden_states=embeds.to(device, dtype),
                           timestep=t.to(device, dtype), img_ids=image_ids(*latent_hw).to(device, dtype),
                           txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)).sample
