"""A random-weight Chroma pipeline built from configs (FLUX.1's block layout, a 2-layer T5)."""
from __future__ import annotations

import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel

from .configs import TEXT_HIDDEN, _t5_encoder, _vae, flux_rope_axes, flux_scheduler, make_t5_tokenizer


def build_chroma_pipeline(*, num_layers: int = 1, num_single_layers: int = 2, num_heads: int = 2, head_dim: int = 16,
                          seed: int = 0) -> ChromaPipeline:
    """Rotary axes from `flux_rope_axes`; the approximator is 2 layers, 32 wide."""
    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=TEXT_HIDDEN,
        axes_dims_rope=flux_rope_axes(head_dim),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=2,
    ).eval()
    tokenizer = make_t5_tokenizer()
    scheduler = flux_scheduler()
    return ChromaPipeline(transformer=transformer, scheduler=scheduler, vae=_vae(seed, 4, 0.3611, 0.1159),
                          text_encoder=_t5_encoder(tokenizer, seed), tokenizer=tokenizer)
