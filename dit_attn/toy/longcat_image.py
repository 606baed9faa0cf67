"""A random-weight LongCat-Image pipeline built from configs (FLUX.1's block layout, 16 latent channels).

LongCat-Image encodes prompts with Qwen2.5-VL (a tokenizer, a VL processor and a generating model for its
prompt rewrite). By default the pipeline has `text_encoder=None` and is called with `prompt_embeds`
(`enable_prompt_rewrite=False`). `text_encoder=True` gives it Qwen-Image's tiny Qwen2.5-VL and tokenizer (16
wide: the transformer's text width follows) and pads prompts to `text_tokens` tokens instead of 512; there
is no VL processor, so call it with `enable_prompt_rewrite=False`. diffusers 0.42.1's `encode_prompt` takes `len(prompt)` even
when only `prompt_embeds` is given; the toy pipeline's `encode_prompt` (an instance attribute, the class is
stock) stands a list of empty prompts in for a missing prompt, one per row of `prompt_embeds`.
"""
from __future__ import annotations

import types

import torch
from diffusers import LongCatImagePipeline, LongCatImageTransformer2DModel

from .configs import TEXT_HIDDEN, _vae, flux_rope_axes, flux_scheduler, text_embeds

__all__ = ["build_longcat_image_pipeline", "text_embeds"]


def _encode_prompt_with_embeds(self, prompt=None, num_images_per_prompt=1, prompt_embeds=None):
    if prompt is None and prompt_embeds is not None:
        prompt = [""] * prompt_embeds.shape[0]
    return type(self).encode_prompt(self, prompt=prompt, num_images_per_prompt=num_images_per_prompt,
                                    prompt_embeds=prompt_embeds)


def build_longcat_image_pipeline(*, num_layers: int = 1, num_single_layers: int = 2, num_heads: int = 2,
                                 head_dim: int = 16, text_encoder: bool = False, text_tokens: int = 16,
                                 seed: int = 0) -> LongCatImagePipeline:
    """Rotary axes from `flux_rope_axes`; text states are TEXT_HIDDEN wide (the encoder's width with one)."""
    from .qwen_image import QWEN_TEXT_HIDDEN, _text_encoder, make_qwen_tokenizer

    torch.manual_seed(seed)
    transformer = LongCatImageTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=QWEN_TEXT_HIDDEN if text_encoder else TEXT_HIDDEN,
        pooled_projection_dim=TEXT_HIDDEN,
        axes_dims_rope=flux_rope_axes(head_dim),
    ).eval()
    scheduler = flux_scheduler()
    tokenizer = make_qwen_tokenizer() if text_encoder else None
    pipe = LongCatImagePipeline(scheduler=scheduler, vae=_vae(seed, 16, 0.3611, 0.1159),
                                text_encoder=_text_encoder(tokenizer, seed) if text_encoder else None,
                                tokenizer=tokenizer, text_processor=None, transformer=transformer)
    if text_encoder:
        pipe.tokenizer_max_length = text_tokens
    else:
        pipe.encode_prompt = types.MethodType(_encode_prompt_with_embeds, pipe)
    return pipe

