"""A tiny random-weight Wan 2.1 text-to-video pipeline built from configs in memory (nothing is downloaded).

The shapes follow diffusers' own dummy components for its Wan tests: a 2-block transformer with 2 heads
of 12 (rotary split 4 + 4 + 4 over frames, height, width), patch (1, 2, 2), 16 latent channels, RMS norm
across heads; a Wan VAE with spatial factor 8 and temporal factor 4; the 2-layer, 32-wide T5 encoder and
in-memory tokenizer of the other toy pipelines. At 5 frames of 32×32 pixels a call has 2 latent frames of
2×2 tokens: 8 video tokens, and `max_sequence_length` text tokens for the cross-attention.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

from .configs import TEXT_HIDDEN, _t5_encoder, make_t5_tokenizer

__all__ = ["WAN_RUN", "build_wan_pipeline"]

WAN_RUN = dict(num_frames=5, height=32, width=32, max_sequence_length=16)  # a call's size in the tests


def build_wan_pipeline(*, num_layers: int = 2, num_heads: int = 2, head_dim: int = 12, seed: int = 0) -> WanPipeline:
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=num_heads, attention_head_dim=head_dim, in_channels=16,
        out_channels=16, text_dim=TEXT_HIDDEN, freq_dim=256, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    tokenizer = make_t5_tokenizer()
    return WanPipeline(tokenizer=tokenizer, text_encoder=_t5_encoder(tokenizer, seed + 2), vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), transformer=transformer)
