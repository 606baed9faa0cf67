"""Tiny random-weight HunyuanVideo 1.5 pipelines (text-to-video and image-to-video) built from configs in
memory (nothing is downloaded).

The shapes follow diffusers' own dummy components for its HunyuanVideo 1.5 tests: a transformer with
4 latent channels (9 in: latents, condition latents, mask), patch size 1, a 1-layer token refiner, MLP
ratio 2; a 2-level HunyuanVideo 1.5 VAE (spatial factor 4, temporal factor 2); the 2-layer, 16-wide
Qwen2.5-VL text encoder of `toy.qwen_image` with the chat-template tokenizer of `toy.z_image`, and the 2-layer T5 glyph
encoder of `toy.hunyuan_image` with diffusers' `ByT5Tokenizer`; a `ClassifierFreeGuidance` guider.

The pipeline pads every prompt to `tokenizer_max_length` Qwen tokens (1000 in diffusers), `tokenizer_2_max_length`
ByT5 tokens (256) and `vision_num_semantic_tokens` image-context tokens (729, all zero and masked for
text-to-video); all are plain pipeline attributes, set here to `text_tokens`, `glyph_tokens` and
`image_tokens`, with a short system message and its own template length as the crop. At 5 frames of 16×16
pixels a call has 3 latent frames of 4×4 tokens: 48 video tokens.
"""
from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo15,
    ClassifierFreeGuidance,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15ImageToVideoPipeline,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
)
from transformers import ByT5Tokenizer, SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from .hunyuan_image import GLYPH_HIDDEN, _glyph_encoder
from .qwen_image import QWEN_TEXT_HIDDEN, _text_encoder
from .z_image import make_z_image_tokenizer

__all__ = ["HUNYUAN_VIDEO15_RUN", "build_hunyuan_video15_i2v_pipeline", "build_hunyuan_video15_pipeline"]

HUNYUAN_VIDEO15_RUN = dict(num_frames=5, height=16, width=16)  # a call's size in the tests
LATENT_CHANNELS = 4
IMAGE_HIDDEN = 12  # the image encoder's width (the transformer's image_embed_dim)
SYSTEM_MESSAGE = "Describe the video."


def _template_length(tokenizer, system_message: str) -> int:
    """Tokens of the chat template before the user's prompt (what the pipeline crops from the text states)."""
    marker = "\x00"
    text = tokenizer.apply_chat_template([{"role": "system", "content": system_message},
                                          {"role": "user", "content": marker}], add_generation_prompt=True,
                                         tokenize=False)
    return len(tokenizer(text[:text.index(marker)]).input_ids)


def _components(num_layers: int, num_heads: int, head_dim: int, guidance_scale: float, text_tokens: int,
                glyph_tokens: int, image_tokens: int, seed: int, task_type: str) -> tuple[dict, dict]:
    if head_dim % 8:
        raise ValueError(f"head_dim must be a multiple of 8 (rotary axes of even sizes over frames, rows, cols), "
                         f"got {head_dim}")
    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=2 * LATENT_CHANNELS + 1, out_channels=LATENT_CHANNELS, num_attention_heads=num_heads,
        attention_head_dim=head_dim, num_layers=num_layers, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1,
        patch_size_t=1, text_embed_dim=QWEN_TEXT_HIDDEN, text_embed_2_dim=GLYPH_HIDDEN, image_embed_dim=IMAGE_HIDDEN,
        rope_axes_dim=(head_dim // 4, head_dim // 4, head_dim // 2), target_size=16, task_type=task_type,
    ).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo15(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(16, 16), layers_per_block=1,
        spatial_compression_ratio=4, temporal_compression_ratio=2, downsample_match_channel=False,
        upsample_match_channel=False,
    ).eval()
    tokenizer = make_z_image_tokenizer()  # the Qwen tokenizer with Qwen's chat template
    components = dict(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder=_text_encoder(tokenizer, seed), tokenizer=tokenizer, text_encoder_2=_glyph_encoder(seed),
        tokenizer_2=ByT5Tokenizer(), guider=ClassifierFreeGuidance(guidance_scale=guidance_scale),
    )
    sizes = dict(tokenizer_max_length=text_tokens, tokenizer_2_max_length=glyph_tokens,
                 vision_num_semantic_tokens=image_tokens, system_message=SYSTEM_MESSAGE,
                 prompt_template_encode_start_idx=_template_length(tokenizer, SYSTEM_MESSAGE))
    return components, sizes


def _sized(pipe, sizes: dict):
    for name, value in sizes.items():
        setattr(pipe, name, value)
    return pipe


def build_hunyuan_video15_pipeline(*, num_layers: int = 2, num_heads: int = 4, head_dim: int = 8,
                                   guidance_scale: float = 4.0, text_tokens: int = 12, glyph_tokens: int = 8,
                                   image_tokens: int = 4, seed: int = 0) -> HunyuanVideo15Pipeline:
    """A random-weight HunyuanVideo15Pipeline; `guidance_scale=1.0` makes its guider one call a step."""
    components, sizes = _components(num_layers, num_heads, head_dim, guidance_scale, text_tokens, glyph_tokens,
                                    image_tokens, seed, "t2v")
    return _sized(HunyuanVideo15Pipeline(**components), sizes)


def build_hunyuan_video15_i2v_pipeline(*, num_layers: int = 2, num_heads: int = 4, head_dim: int = 8,
                                       guidance_scale: float = 4.0, text_tokens: int = 12, glyph_tokens: int = 8,
                                       seed: int = 0) -> HunyuanVideo15ImageToVideoPipeline:
    """A random-weight HunyuanVideo15ImageToVideoPipeline with a 2-layer, 12-wide SigLIP vision encoder on 16×16
    images in 8×8 patches: 4 image-context tokens a row."""
    components, sizes = _components(num_layers, num_heads, head_dim, guidance_scale, text_tokens, glyph_tokens, 4,
                                    seed, "i2v")
    torch.manual_seed(seed + 3)
    image_encoder = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=IMAGE_HIDDEN, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=16,
        patch_size=8)).eval()
    processor = SiglipImageProcessor(size={"height": 16, "width": 16})
    pipe = HunyuanVideo15ImageToVideoPipeline(**components, image_encoder=image_encoder, feature_extractor=processor)
    return _sized(pipe, sizes)
