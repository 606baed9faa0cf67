"""A tiny random-weight Z-Image pipeline built from configs in memory (nothing is downloaded).

The shapes follow diffusers' own dummy components for its Z-Image tests: a transformer of
width 32 with 2 heads (head dim 16 = rotary axes 8 + 4 + 4), 2 main blocks and 1 block in
each refiner, 16 latent channels patchified 2×2; a 2-level AutoencoderKL (spatial factor 2,
so 32×32 pixels are 16×16 latents, 8×8 = 64 image tokens); a 2-layer, 16-wide Qwen3 text
encoder. The tokenizer is the in-memory byte-level Qwen2 BPE of `toy.qwen_image` with a
Qwen-style chat template (the pipeline wraps each prompt in a user turn).

The model's pad tokens are created with `torch.empty`; they are set to ones here, as
diffusers' tests do, so that padded sequences are deterministic.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

from .qwen_image import make_qwen_tokenizer

__all__ = ["Z_IMAGE_TEXT_HIDDEN", "build_z_image_pipeline", "make_z_image_tokenizer"]

Z_IMAGE_TEXT_HIDDEN = 16
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_z_image_tokenizer() -> Qwen2Tokenizer:
    tokenizer = make_qwen_tokenizer()
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def _text_encoder(tokenizer: Qwen2Tokenizer, seed: int) -> Qwen3Model:
    config = Qwen3Config(
        hidden_size=Z_IMAGE_TEXT_HIDDEN,
        intermediate_size=Z_IMAGE_TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=Z_IMAGE_TEXT_HIDDEN // 2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen3Model(config).eval()


def build_z_image_pipeline(*, num_layers: int = 2, num_refiner_layers: int = 1, num_heads: int = 2, head_dim: int = 16,
                           text_encoder: bool = True, seed: int = 0) -> ZImagePipeline:
    """A random-weight ZImagePipeline; `text_encoder=False` leaves the encoder and tokenizer out (then pass
    `prompt_embeds` and, with CFG, `negative_prompt_embeds`: lists of (L, 16) tensors)."""
    if head_dim % 8:
        raise ValueError(f"head_dim must be a multiple of 8 (rotary axes D/2, D/4, D/4 of even sizes), got {head_dim}")
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=num_heads * head_dim,
        n_layers=num_layers,
        n_refiner_layers=num_refiner_layers,
        n_heads=num_heads,
        n_kv_heads=num_heads,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=Z_IMAGE_TEXT_HIDDEN,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[head_dim // 2, head_dim // 4, head_dim // 4],
        axes_lens=[256, 32, 32],
    ).eval()
    with torch.no_grad():
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        block_out_channels=[32, 64],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ).eval()
    tokenizer = encoder = None
    if text_encoder:
        tokenizer = make_z_image_tokenizer()
        encoder = _text_encoder(tokenizer, seed)
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=encoder,
                          tokenizer=tokenizer, transformer=transformer)
