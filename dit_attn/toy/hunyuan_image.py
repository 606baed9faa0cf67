"""A tiny random-weight HunyuanImage 2.1 pipeline built from configs in memory (nothing is downloaded).

The shapes follow diffusers' own dummy components for its HunyuanImage 2.1 tests: a transformer
with 4 latent channels, patch size 1, a 1-layer token refiner and a ByT5 projection; a 4-level
HunyuanImage VAE (spatial factor 8); a 2-layer Qwen2.5-VL text encoder (16 wide, with the
byte-level tokenizer of `toy.qwen_image`) and a 2-layer, 32-wide T5 encoder with diffusers'
`ByT5Tokenizer` for quoted glyph text; `AdaptiveProjectedMixGuidance` guiders (CFG for the
first `apg_start + 1` steps, APG after) unless the transformer is guidance-distilled.

The pipeline pads every prompt to `tokenizer_max_length` Qwen tokens (1000 in diffusers) and
`tokenizer_2_max_length` ByT5 tokens (128); both are plain pipeline attributes, set here to
`text_tokens` and `glyph_tokens` so a call has few text tokens (all calls carry the padding mask).
At 32×32 pixels a call has 4×4 = 16 image tokens.
"""
from __future__ import annotations

import torch
from diffusers import (
    AdaptiveProjectedMixGuidance,
    AutoencoderKLHunyuanImage,
    FlowMatchEulerDiscreteScheduler,
    HunyuanImagePipeline,
    HunyuanImageTransformer2DModel,
)
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from .qwen_image import QWEN_TEXT_HIDDEN, _text_encoder, make_qwen_tokenizer

__all__ = ["GLYPH_HIDDEN", "build_hunyuan_image_pipeline"]

GLYPH_HIDDEN = 32


def _glyph_encoder(seed: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(d_model=GLYPH_HIDDEN, d_kv=4, d_ff=16, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
                      relative_attention_max_distance=32, vocab_size=384, feed_forward_proj="gated-gelu",
                      dense_act_fn="gelu_new", is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
    return T5EncoderModel(config).eval()


def build_hunyuan_image_pipeline(
    *,
    num_layers: int = 2,
    num_single_layers: int = 2,
    num_heads: int = 4,
    head_dim: int = 8,
    guidance_embeds: bool = False,
    apg_start: int = 2,
    text_tokens: int = 12,
    glyph_tokens: int = 8,
    seed: int = 0,
) -> HunyuanImagePipeline:
    """A random-weight HunyuanImagePipeline; rotary axes split `head_dim` in two halves (rows, cols).
    `guidance_embeds=True` builds a guidance-distilled transformer and no guiders (one call a step)."""
    if head_dim % 4:
        raise ValueError(f"head_dim must be a multiple of 4 (two rotary axes of even sizes), got {head_dim}")
    torch.manual_seed(seed)
    transformer = HunyuanImageTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=num_heads,
        attention_head_dim=head_dim,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        num_refiner_layers=1,
        patch_size=(1, 1),
        guidance_embeds=guidance_embeds,
        text_embed_dim=QWEN_TEXT_HIDDEN,
        text_embed_2_dim=GLYPH_HIDDEN,
        rope_axes_dim=(head_dim // 2, head_dim // 2),
    ).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanImage(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
        scaling_factor=0.476986, spatial_compression_ratio=8, sample_size=128,
    ).eval()
    guider = ocr_guider = None
    if not guidance_embeds:
        guider = AdaptiveProjectedMixGuidance(adaptive_projected_guidance_start_step=apg_start)
        ocr_guider = AdaptiveProjectedMixGuidance(adaptive_projected_guidance_start_step=apg_start + 1)
    tokenizer = make_qwen_tokenizer()
    pipe = HunyuanImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), vae=vae, text_encoder=_text_encoder(tokenizer, seed),
        tokenizer=tokenizer, text_encoder_2=_glyph_encoder(seed), tokenizer_2=ByT5Tokenizer(), transformer=transformer,
        guider=guider, ocr_guider=ocr_guider,
    )
    pipe.tokenizer_max_length = text_tokens
    pipe.tokenizer_2_max_length = glyph_tokens
    return pipe
