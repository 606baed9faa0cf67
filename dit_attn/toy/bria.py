"""A random-weight Bria 3.2 pipeline built from configs (FLUX.1's block layout, 16 latent channels).

The pipeline has `text_encoder=None` and `tokenizer=None` and is called with `prompt_embeds` (and
`negative_prompt_embeds`, else its CFG uses zero negative states).
"""
from __future__ import annotations

import torch
from diffusers import BriaPipeline, BriaTransformer2DModel, FlowMatchEulerDiscreteScheduler

from .configs import TEXT_HIDDEN, _vae
from .longcat_image import text_embeds

__all__ = ["build_bria_pipeline", "text_embeds"]


def build_bria_pipeline(*, num_layers: int = 1, num_single_layers: int = 2, num_heads: int = 2,
                        head_dim: int = 16, seed: int = 0) -> BriaPipeline:
    """Rotary axes split `head_dim` like `build_flux_pipeline`; text states are TEXT_HIDDEN wide."""
    t_dim = head_dim // 4 // 2 * 2
    h_dim = (head_dim - t_dim) // 4 * 2
    torch.manual_seed(seed)
    transformer = BriaTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=TEXT_HIDDEN,
        axes_dims_rope=[head_dim - 2 * h_dim, h_dim, h_dim],
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return BriaPipeline(transformer=transformer, scheduler=scheduler, vae=_vae(seed, 16, 0.3611, 0.1159),
                        text_encoder=None, tokenizer=None)
