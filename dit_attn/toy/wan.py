"""A tiny random-weight Wan 2.1 text-to-video pipeline built from configs in memory (nothing is downloaded).

The shapes follow diffusers' own dummy components for its Wan tests: a 2-block transformer with 2 heads
of 12 (rotary split 4 + 4 + 4 over frames, height, width), patch (1, 2, 2), 16 latent channels, RMS norm
across heads; a Wan VAE with spatial factor 8 and temporal factor 4; the 2-layer, 32-wide T5 encoder and
in-memory tokenizer of the other toy pipelines. At 5 frames of 32×32 pixels a call has 2 latent frames of
2×2 tokens: 8 video tokens, and `max_sequence_length` text tokens for the cross-attention.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from .configs import TEXT_HIDDEN, _t5_encoder, make_t5_tokenizer

__all__ = ["WAN22_BOUNDARY_RATIO", "WAN_I2V_RUN", "WAN_RUN", "build_wan22_i2v_pipeline", "build_wan22_pipeline",
           "build_wan_i2v_pipeline", "build_wan_pipeline"]

WAN_RUN = dict(num_frames=5, height=32, width=32, max_sequence_length=16)  # a call's size in the tests
# Wan 2.2 A14B's: with the toy scheduler (shift 7) a 4-step run gives timesteps 1000, 934 to `transformer` and
# 781, 47 to `transformer_2`, a 3-step run 1000, 877 and 47
WAN22_BOUNDARY_RATIO = 0.875
# Wan's cross-attention takes the last 512 context tokens as the text when the model has image context
WAN_I2V_RUN = dict(num_frames=5, height=32, width=32, max_sequence_length=512)


def _components(num_layers: int, num_heads: int, head_dim: int, seed: int, in_channels: int = 16,
                image_dim: int | None = None) -> dict:
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=num_heads, attention_head_dim=head_dim, in_channels=in_channels,
        out_channels=16, text_dim=TEXT_HIDDEN, freq_dim=256, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=image_dim,
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    tokenizer = make_t5_tokenizer()
    return dict(tokenizer=tokenizer, text_encoder=_t5_encoder(tokenizer, seed + 2), vae=vae,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), transformer=transformer)


def build_wan_pipeline(*, num_layers: int = 2, num_heads: int = 2, head_dim: int = 12, seed: int = 0) -> WanPipeline:
    return WanPipeline(**_components(num_layers, num_heads, head_dim, seed))


def build_wan22_pipeline(*, num_layers: int = 2, num_heads: int = 2, head_dim: int = 12, seed: int = 0,
                         num_layers_2: int | None = None, num_heads_2: int | None = None) -> WanPipeline:
    """Wan 2.2 text-to-video with two experts: `transformer` (the high-noise steps, at or above the boundary
    timestep) and `transformer_2` (the rest), different random weights; `num_layers_2` / `num_heads_2` give
    the second expert another shape."""
    components = _components(num_layers, num_heads, head_dim, seed)
    second = _components(num_layers if num_layers_2 is None else num_layers_2,
                         num_heads if num_heads_2 is None else num_heads_2, head_dim, seed + 10)["transformer"]
    return WanPipeline(**components, transformer_2=second, boundary_ratio=WAN22_BOUNDARY_RATIO)


def build_wan22_i2v_pipeline(*, num_layers: int = 2, num_heads: int = 2, head_dim: int = 12,
                             seed: int = 0) -> WanImageToVideoPipeline:
    """Wan 2.2 image-to-video with two experts, as Wan 2.2 I2V A14B: the image enters as 16 condition channels
    (+ 4 mask) beside the 16 latent ones, no image encoder (no image context in the cross-attention)."""
    components = _components(num_layers, num_heads, head_dim, seed, in_channels=36)
    second = _components(num_layers, num_heads, head_dim, seed + 10, in_channels=36)["transformer"]
    return WanImageToVideoPipeline(**components, transformer_2=second, boundary_ratio=WAN22_BOUNDARY_RATIO,
                                   image_encoder=None, image_processor=None)


def build_wan_i2v_pipeline(*, num_layers: int = 2, num_heads: int = 2, head_dim: int = 12,
                           seed: int = 0) -> WanImageToVideoPipeline:
    """Wan 2.1 image-to-video: 16 latent + 4 mask + 16 condition channels in, a 2-layer CLIP vision encoder
    (4 wide, one token per pixel of its 32×32 input) whose states ride in the cross-attention before the text."""
    torch.manual_seed(seed + 3)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        intermediate_size=16, patch_size=1)).eval()
    return WanImageToVideoPipeline(**_components(num_layers, num_heads, head_dim, seed, in_channels=36, image_dim=4),
                                   image_encoder=image_encoder,
                                   image_processor=CLIPImageProcessor(crop_size=32, size=32))
