"""A random-weight Bria 3.2 pipeline built from configs (FLUX.1's block layout, 16 latent channels).

By default the pipeline has `text_encoder=None` and `tokenizer=None` and is called with `prompt_embeds` (and
`negative_prompt_embeds`, else its CFG uses zero negative states); `text_encoder=True` gives it the 2-layer
T5 (`d_model = TEXT_HIDDEN`) and in-memory tokenizer of `toy.configs`, for the text edits.
"""
from __future__ import annotations

import torch
from diffusers import BriaPipeline, BriaTransformer2DModel

from .configs import TEXT_HIDDEN, _t5_encoder, _vae, flux_rope_axes, flux_scheduler, make_t5_tokenizer, text_embeds

__all__ = ["build_bria_pipeline", "text_embeds"]


def build_bria_pipeline(*, num_layers: int = 1, num_single_layers: int = 2, num_heads: int = 2,
                        head_dim: int = 16, text_encoder: bool = False, seed: int = 0) -> BriaPipeline:
    """Rotary axes from `flux_rope_axes`; text states are TEXT_HIDDEN wide."""
    torch.manual_seed(seed)
    transformer = BriaTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=TEXT_HIDDEN,
        axes_dims_rope=flux_rope_axes(head_dim),
    ).eval()
    scheduler = flux_scheduler()
    tokenizer = make_t5_tokenizer() if text_encoder else None
    encoder = _t5_encoder(tokenizer, seed) if text_encoder else None
    return BriaPipeline(transformer=transformer, scheduler=scheduler, vae=_vae(seed, 16, 0.3611, 0.1159),
                        text_encoder=encoder, tokenizer=tokenizer)
