"""Architecture of the embedded "tiny" model: an SD3-format pipeline for the synthetic world.

A 64×64 image → VAE (factor 4, 8 channels) → 16×16 latents → 64 image tokens (patch 2).
Text: two frozen random CLIP encoders over a word-level tokenizer of the caption
vocabulary (40 tokens, long enough for 2-panel set captions); no T5, so the stock
pipeline appends `max_sequence_length` (default 256) identical zero tokens.

Identical tokens act on attention like one token whose key logit is raised by log n,
so training runs with ONE zero token and an attention bias of log(256) on its key: the
same function as the stock pipeline's 256 zero tokens at a fraction of the cost
(`ZeroTokenBias`).
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from .configs import make_clip_tokenizer
from .data import VOCABULARY

CLIP_LENGTH = 40
CLIP_HIDDEN = 64
PIPELINE_ZERO_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length
LATENT_CHANNELS = 8

TRANSFORMER_CONFIG = dict(
    sample_size=16, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
    num_layers=6, attention_head_dim=32, num_attention_heads=6,
    joint_attention_dim=2 * CLIP_HIDDEN, caption_projection_dim=192, pooled_projection_dim=2 * CLIP_HIDDEN,
    qk_norm="rms_norm", pos_embed_max_size=32,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=32, sample_size=64,
    mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
)


def clip_words() -> tuple[str, ...]:
    """Lowercase word pieces of the caption vocabulary as CLIP's pre-tokenizer splits them."""
    pieces: dict[str, None] = {}
    for word in VOCABULARY:
        for piece in re.findall(r"[a-z0-9]+", word.lower()):
            if len(piece) > 1:
                pieces[piece] = None
    return tuple(pieces)


def make_tokenizer() -> CLIPTokenizer:
    return make_clip_tokenizer(max_length=CLIP_LENGTH, words=clip_words())


def make_text_encoder(tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModelWithProjection:
    """A frozen random CLIP encoder; embeddings redrawn at N(0, 1) so features are not tiny."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CLIP_HIDDEN, intermediate_size=2 * CLIP_HIDDEN,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=CLIP_LENGTH,
        projection_dim=CLIP_HIDDEN, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    encoder = CLIPTextModelWithProjection(config).eval().requires_grad_(False)
    embeddings = encoder.text_model.embeddings
    embeddings.token_embedding.weight.copy_(torch.randn(embeddings.token_embedding.weight.shape, generator=generator))
    embeddings.position_embedding.weight.copy_(0.3 * torch.randn(embeddings.position_embedding.weight.shape, generator=generator))
    return encoder


def make_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


def make_transformer(seed: int) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**TRANSFORMER_CONFIG)


def assemble_pipeline(transformer, vae, seed: int) -> StableDiffusion3Pipeline:
    tokenizer, tokenizer_2 = make_tokenizer(), make_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), vae=vae.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        text_encoder=make_text_encoder(tokenizer, seed), tokenizer=tokenizer,
        text_encoder_2=make_text_encoder(tokenizer_2, seed + 1), tokenizer_2=tokenizer_2,
        text_encoder_3=None, tokenizer_3=None,
    )


class ZeroTokenBias:
    """Training processor: SD3 joint attention where the last text token stands for n
    identical zero tokens (key logit + log n). Same math as diffusers' JointAttnProcessor2_0."""

    def __init__(self, zero_tokens: int = PIPELINE_ZERO_TOKENS):
        self.log_n = math.log(zero_tokens)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, n_img = hidden_states.shape[:2]
        heads = attn.heads

        def split(x):
            return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        bias = None
        if encoder_hidden_states is not None:
            cq = split(attn.add_q_proj(encoder_hidden_states))
            ck = split(attn.add_k_proj(encoder_hidden_states))
            cv = split(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
            bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
            bias[-1] = self.log_n
            bias = bias.expand(q.shape[2], -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(batch, -1, heads * q.shape[-1]).to(q.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        image, text = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return attn.to_out[1](attn.to_out[0](image)), text
