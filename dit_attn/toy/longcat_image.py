"""A random-weight LongCat-Image pipeline built from configs (FLUX.1's block layout, 16 latent channels).

LongCat-Image encodes prompts with Qwen2.5-VL (a tokenizer, a VL processor and a generating model for its
prompt rewrite), which cannot be built tiny offline: the pipeline has `text_encoder=None` and is called with
`prompt_embeds` (`enable_prompt_rewrite=False`). diffusers 0.42.1's `encode_prompt` takes `len(prompt)` even
when only `prompt_embeds` is given; the toy pipeline's `encode_prompt` (an instance attribute, the class is
stock) stands a list of empty prompts in for a missing prompt, one per row of `prompt_embeds`.
"""
from __future__ import annotations

import types

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LongCatImagePipeline, LongCatImageTransformer2DModel

from .configs import TEXT_HIDDEN, _vae


def _encode_prompt_with_embeds(self, prompt=None, num_images_per_prompt=1, prompt_embeds=None):
    if prompt is None and prompt_embeds is not None:
        prompt = [""] * prompt_embeds.shape[0]
    return type(self).encode_prompt(self, prompt=prompt, num_images_per_prompt=num_images_per_prompt,
                                    prompt_embeds=prompt_embeds)


def build_longcat_image_pipeline(*, num_layers: int = 1, num_single_layers: int = 2, num_heads: int = 2,
                                 head_dim: int = 16, seed: int = 0) -> LongCatImagePipeline:
    """Rotary axes split `head_dim` like `build_flux_pipeline`; text states are TEXT_HIDDEN wide."""
    t_dim = head_dim // 4 // 2 * 2
    h_dim = (head_dim - t_dim) // 4 * 2
    torch.manual_seed(seed)
    transformer = LongCatImageTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=TEXT_HIDDEN,
        pooled_projection_dim=TEXT_HIDDEN,
        axes_dims_rope=[head_dim - 2 * h_dim, h_dim, h_dim],
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = LongCatImagePipeline(scheduler=scheduler, vae=_vae(seed, 16, 0.3611, 0.1159), text_encoder=None,
                                tokenizer=None, text_processor=None, transformer=transformer)
    pipe.encode_prompt = types.MethodType(_encode_prompt_with_embeds, pipe)
    return pipe


def text_embeds(prompt: str, length: int = 8, seed: int | None = None) -> torch.Tensor:
    """Deterministic stand-in text states (1, length, TEXT_HIDDEN) for a prompt."""
    seed = seed if seed is not None else sum(ord(c) * (i + 1) for i, c in enumerate(prompt)) % (2**31)
    return torch.randn(1, length, TEXT_HIDDEN, generator=torch.Generator().manual_seed(seed))
