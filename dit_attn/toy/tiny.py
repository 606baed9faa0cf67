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
import os
import re
import shutil

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from .. import kernels
from ..hooks.zero_tokens import collapse_zero_tokens
from ..processors.sd3 import SD3AttnProcessor
from ..processors.state import EditState
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
    # one normalisation group: per-channel groups (32 of 32 channels) act as instance norm,
    # erase each channel's flat level (the colour of a plain background) and teach the
    # decoder blob-shaped "droplet" artefacts to smuggle it through (measured: 24 dB, colour shifts)
    block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=1, sample_size=64,
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


def make_transformer(seed: int, num_layers: int = TRANSFORMER_CONFIG["num_layers"]) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**{**TRANSFORMER_CONFIG, "num_layers": num_layers})


def assemble_pipeline(transformer, vae, seed: int) -> StableDiffusion3Pipeline:
    tokenizer, tokenizer_2 = make_tokenizer(), make_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), vae=vae.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        text_encoder=make_text_encoder(tokenizer, seed), tokenizer=tokenizer,
        text_encoder_2=make_text_encoder(tokenizer_2, seed + 1), tokenizer_2=tokenizer_2,
        text_encoder_3=None, tokenizer_3=None,
    )


class ZeroTokenBias(SD3AttnProcessor):
    """Training processor: SD3 joint attention where the last text token stands for n
    identical zero tokens (key logit + log n); otherwise the stock joint-attention math."""

    def __init__(self, zero_tokens: int = PIPELINE_ZERO_TOKENS):
        super().__init__(layer=0, state=EditState())
        # a tensor, so the trainer can change it in place under torch.compile without recompiling
        self.log_n = torch.tensor(math.log(zero_tokens))

    def attend(self, query, key, value, image_tokens: int, pool=None) -> torch.Tensor:
        # under bfloat16 autocast the projections are bfloat16, but the CPU's bfloat16
        # attention backward is ~3× slower than float32's: attend in float32
        dtype = query.dtype
        query, key, value = query.float(), key.float(), value.float()
        mask = None  # image-only attention has no zero token
        if key.shape[2] != image_tokens:
            bias = torch.zeros(key.shape[2], dtype=query.dtype, device=query.device)
            bias[-1] = self.log_n
            mask = bias.expand(query.shape[2], -1)
        with torch.autocast(query.device.type, enabled=False):
            return kernels.attention(query, key, value, attn_mask=mask).to(dtype)


SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "tiny")  # package data
# dit-attn's commands call the tiny model with one zero "T5" token (no bias): the model was trained
# for 1 to 256 of them (ZeroTokenBias with a random log n), and its figures and presets were measured so
FAST_CALL = {"max_sequence_length": 1}


def export_half(pipeline_dir: str, out_dir: str) -> str:
    """Save a trained pipeline's weights in float16 (half the bytes; loads back as float32)."""
    pipe = StableDiffusion3Pipeline.from_pretrained(pipeline_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.to(torch.float16)
    tmp = out_dir.rstrip("/") + ".partial"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    info = os.path.join(pipeline_dir, "dit_attn_training.json")
    if os.path.exists(info):
        shutil.copy(info, tmp)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def load_shipped(dtype: torch.dtype | None = None) -> StableDiffusion3Pipeline:
    if not os.path.isfile(os.path.join(SHIPPED_DIR, "model_index.json")):
        raise ValueError(f"the tiny model's weights are not in this installation ({SHIPPED_DIR} is missing)")
    pipe = StableDiffusion3Pipeline.from_pretrained(
        SHIPPED_DIR, text_encoder_3=None, tokenizer_3=None, dtype=dtype or torch.float32
    )
    pipe.dit_attn_call_defaults = dict(FAST_CALL)
    collapse_zero_tokens(pipe)  # the bare call's 256 zero "T5" tokens run as one, with the same result
    return pipe
