"""A random-weight Ovis-Image pipeline built from configs (FLUX.1's block layout, 16 latent channels).

Ovis-Image encodes prompts with Qwen3 behind a chat template, not built tiny here: the pipeline has
`text_encoder=None` and `tokenizer=None` and is called with `prompt_embeds` (and `negative_prompt_embeds`
when CFG is on, since the stock pipeline would encode an empty negative prompt otherwise) and
`negative_prompt=None` (its default "" may not be given with `negative_prompt_embeds`).
"""
from __future__ import annotations

import torch
from diffusers import OvisImagePipeline, OvisImageTransformer2DModel

from .configs import TEXT_HIDDEN, _vae, flux_rope_axes, flux_scheduler, text_embeds

__all__ = ["build_ovis_image_pipeline", "text_embeds"]


def build_ovis_image_pipeline(*, num_layers: int = 1, num_single_layers: int = 2, num_heads: int = 2,
                              head_dim: int = 16, seed: int = 0) -> OvisImagePipeline:
    """Rotary axes from `flux_rope_axes`; text states are TEXT_HIDDEN wide."""
    torch.manual_seed(seed)
    transformer = OvisImageTransformer2DModel(
        patch_size=1,
        in_channels=64,
        out_channels=64,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=TEXT_HIDDEN,
        axes_dims_rope=flux_rope_axes(head_dim),
    ).eval()
    scheduler = flux_scheduler()
    return OvisImagePipeline(scheduler=scheduler, vae=_vae(seed, 16, 0.3611, 0.1159), text_encoder=None,
                             tokenizer=None, transformer=transformer)
