"""A random-weight Chroma pipeline built from configs (FLUX.1's block layout, a 2-layer T5)."""
from __future__ import annotations

import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

from .configs import TEXT_HIDDEN, _t5_encoder, _vae, make_t5_tokenizer


def build_chroma_pipeline(*, num_layers: int = 1, num_single_layers: int = 2, num_heads: int = 2, head_dim: int = 16,
                          seed: int = 0) -> ChromaPipeline:
    """Rotary axes split `head_dim` like `build_flux_pipeline`; the approximator is 2 layers, 32 wide."""
    t_dim = head_dim // 4 // 2 * 2
    h_dim = (head_dim - t_dim) // 4 * 2
    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=TEXT_HIDDEN,
        axes_dims_rope=(head_dim - 2 * h_dim, h_dim, h_dim),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=2,
    ).eval()
    tokenizer = make_t5_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return ChromaPipeline(transformer=transformer, scheduler=scheduler, vae=_vae(seed, 4, 0.3611, 0.1159),
                          text_encoder=_t5_encoder(tokenizer, seed), tokenizer=tokenizer)
