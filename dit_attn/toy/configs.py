"""Tiny random-weight SD3 / FLUX pipelines for tests and demos.

Every component (transformer, VAE, text encoders, tokenizers, scheduler) is built
from a config in memory, so nothing is downloaded. The weights are random: the
pipelines produce noise-like images, but they exercise exactly the same code paths
(attention processors, CFG batching, PAG, img2img, inpainting, save/reload) as the
real models, in a few tens of milliseconds on one CPU thread.

Sizes at the default 32x32 resolution (VAE scale factor 2):

* SD3: 16x16x16 latents (16 channels: the SD3 inpaint pipeline refuses anything but
  16 or 33), patch 2 -> 64 image tokens; text tokens per transformer call
  = 16 CLIP tokens + ``max_sequence_length`` zero "T5" tokens (pipeline default 256,
  pass e.g. ``max_sequence_length=8`` to keep calls small).
* FLUX: 4x16x16 latents packed 2x2 -> 64 image tokens of 16 channels; text tokens
  = ``max_sequence_length`` T5 tokens (pipeline default 512, pass e.g. 16).

``StableDiffusion3PAGPipeline`` does not accept the SD3 pipeline's IP-adapter slots
(``image_encoder``, ``feature_extractor``): build it from ``pipeline_components(pipe)``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

__all__ = [
    "TEXT_MAX_LENGTH",
    "build_demo_pipeline",
    "build_flux_pipeline",
    "build_sd3_pipeline",
    "make_clip_tokenizer",
    "make_t5_tokenizer",
    "pipeline_components",
    "save_demo_pipeline",
]

#: Padded length of the CLIP tokenizers (real models use 77).
TEXT_MAX_LENGTH = 16
#: Hidden size of every tiny text encoder.
TEXT_HIDDEN = 32
#: Words that get their own token (through a chain of BPE merges / a Unigram piece).
_WORDS = (
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "painting", "sign", "that", "says",
    "red", "green", "blue", "yellow", "white", "black", "dark", "circle", "square", "triangle",
    "cat", "dog", "blurry", "bright", "small", "large",
)  # fmt: skip


def _byte_chars() -> list[str]:
    """The 256 printable characters that byte-level BPE uses to stand for the 256 bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly merge the best-ranked adjacent pair."""
    while len(symbols) > 1:
        best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def make_clip_tokenizer(max_length: int = TEXT_MAX_LENGTH, words: tuple[str, ...] = _WORDS) -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer built in memory.

    The vocabulary holds every byte (alone and word-final, ``</w>``), one token per
    word in ``words`` (lowercase, as CLIP lowercases its input) and the two special
    tokens last, as in real CLIP. Each word gets merges appended until BPE turns it into
    one token; a merge appended later never changes how an earlier word is split.
    """
    byte_chars = _byte_chars()
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _apply_merges([*word[:-1], word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
            tokens.append(symbols[0] + symbols[1])
            symbols = _apply_merges(symbols, ranks)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=list(ranks), model_max_length=max_length)


def make_t5_tokenizer(max_length: int = 512) -> T5TokenizerFast:
    """A Unigram T5 tokenizer built in memory: whole words, single characters, 100 extra ids."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in _WORDS]
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()"
    pieces += [(c, -4.0) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=100, model_max_length=max_length)


def _clip_config(tokenizer: CLIPTokenizer, projection_dim: int = TEXT_HIDDEN) -> CLIPTextConfig:
    """Config of a 2-layer, 32-wide CLIP text encoder matching ``tokenizer``."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_encoder(tokenizer: T5TokenizerFast, seed: int) -> T5EncoderModel:
    """A 2-layer T5 v1.1-style encoder with ``d_model = 32``."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=TEXT_HIDDEN,
        d_kv=8,
        d_ff=2 * TEXT_HIDDEN,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _vae(seed: int, latent_channels: int, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """A 2-level KL autoencoder (3 -> ``latent_channels``, spatial factor 2)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def build_sd3_pipeline(
    *,
    num_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 16,
    qk_norm: str | None = None,
    dual_attention_layers: tuple[int, ...] = (),
    sample_size: int = 16,
    seed: int = 0,
) -> StableDiffusion3Pipeline:
    """A random-weight SD3 (``qk_norm=None``) or SD3.5 (``qk_norm="rms_norm"``) pipeline.

    Transformer and VAE use 16 latent channels, as the real SD3 does.
    Two CLIP encoders (32 wide, projection 32) give 64-d token features and a 64-d
    pooled vector; there is no T5 (``text_encoder_3=None``), so the pipeline appends
    ``max_sequence_length`` zero tokens. ``joint_attention_dim`` is 64 = the two CLIP
    widths concatenated (a smaller value would silently crop the second encoder).
    The default output size is ``sample_size * 2`` pixels (32x32).
    """
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=2 * TEXT_HIDDEN,
        caption_projection_dim=num_heads * head_dim,
        pooled_projection_dim=2 * TEXT_HIDDEN,
        pos_embed_max_size=64,
        qk_norm=qk_norm,
        dual_attention_layers=tuple(dual_attention_layers),
    ).eval()
    vae = _vae(seed, 16, scaling_factor=1.5305, shift_factor=0.0609)
    tokenizer, tokenizer_2 = make_clip_tokenizer(), make_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer)).eval()
    torch.manual_seed(seed + 1)  # the two encoders must differ
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2)).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def flux_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary axes of a FLUX-layout model: `head_dim` split as (t, h, w) with t = head_dim // 4 and the
    rest shared between h and w (both even), e.g. (4, 6, 6) for 16."""
    t_dim = head_dim // 4 // 2 * 2
    h_dim = (head_dim - t_dim) // 4 * 2
    return head_dim - 2 * h_dim, h_dim, h_dim


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1's flow-matching schedule: shift 3 with resolution-dependent (dynamic) shifting."""
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def text_embeds(prompt: str, length: int = 8, seed: int | None = None) -> torch.Tensor:
    """Deterministic stand-in text states (1, length, TEXT_HIDDEN) for a prompt, for pipelines built without
    their text encoder."""
    seed = seed if seed is not None else sum(ord(c) * (i + 1) for i, c in enumerate(prompt)) % (2**31)
    return torch.randn(1, length, TEXT_HIDDEN, generator=torch.Generator().manual_seed(seed))


def build_flux_pipeline(
    *,
    num_layers: int = 1,
    num_single_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 16,
    guidance_embeds: bool = True,
    seed: int = 0,
) -> FluxPipeline:
    """A random-weight FLUX.1 pipeline (guidance-distilled "dev" style by default).

    CLIP (32 wide) gives the 32-d pooled vector, a 2-layer T5 (``d_model=32``) the text
    tokens. Rotary axes: `flux_rope_axes`.
    """
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=TEXT_HIDDEN,
        pooled_projection_dim=TEXT_HIDDEN,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=flux_rope_axes(head_dim),
    ).eval()
    vae = _vae(seed, 4, scaling_factor=0.3611, shift_factor=0.1159)
    tokenizer, tokenizer_2 = make_clip_tokenizer(), make_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(tokenizer)).eval()
    text_encoder_2 = _t5_encoder(tokenizer_2, seed)
    return FluxPipeline(
        transformer=transformer,
        scheduler=flux_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


def pipeline_components(pipe: DiffusionPipeline) -> dict[str, Any]:
    """``pipe.components`` without the empty IP-adapter slots (``image_encoder``,
    ``feature_extractor``), so it can be passed to pipelines that lack them, e.g.
    ``StableDiffusion3PAGPipeline(**pipeline_components(pipe), pag_applied_layers=...)``.
    """
    drop = {"image_encoder", "feature_extractor"}
    return {k: v for k, v in pipe.components.items() if not (k in drop and v is None)}


def save_demo_pipeline(path: str | os.PathLike, family: str = "sd3", seed: int = 0) -> str:
    """Build a slightly larger tiny pipeline and save it (safetensors) to ``path``.

    ``family="sd3"``: SD3.5-style, 4 layers x 4 heads x 16, RMS q/k norm. Reload with
    ``StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)``.
    ``family="flux"``: 2 double + 2 single blocks x 4 heads x 16; reload with
    ``FluxPipeline.from_pretrained(path)``. Returns ``path`` as a string.
    """
    if family == "sd3":
        pipe = build_demo_pipeline(seed=seed)
    elif family == "flux":
        pipe = build_flux_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=16, seed=seed)
    else:
        raise ValueError(f"unknown family {family!r}; expected 'sd3' or 'flux'")
    path = os.fspath(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_demo_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """The in-memory "demo" model of the CLI: SD3.5-style, 4 layers x 4 heads x 16, random weights."""
    pipe = build_sd3_pipeline(num_layers=4, num_heads=4, head_dim=16, qk_norm="rms_norm", seed=seed)
    return pipe
