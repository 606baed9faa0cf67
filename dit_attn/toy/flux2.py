"""Tiny random-weight FLUX.2 pipelines built from configs in memory (nothing is downloaded).

The shapes follow diffusers' own dummy components for its Flux2 tests: a transformer with 4 input
channels (1 latent channel patchified 2×2), 16-wide heads (`head_dim`) split into 4 rotary axes, and a
FLUX.2 VAE of one latent channel, here with three levels (spatial factor 4) so that a reference image of the
pipelines' minimum 64×64 pixels stays small. At 32×32 pixels a call has 4×4 = 16 image tokens; a
64×64 reference image adds 8×8 = 64.

`build_flux2_pipeline` is the guidance-distilled `Flux2Pipeline` without a text encoder (its Mistral 3
processor cannot be built offline): pass `prompt_embeds` (`flux2_prompt_embeds`).
`build_flux2_klein_pipeline` is `Flux2KleinPipeline` (true CFG) with a 27-layer, 16-wide Qwen3 text
encoder (the pipeline stacks its hidden states 9, 18 and 27: 48-wide text states) and a byte-level BPE
tokenizer built here with a Qwen chat template; a call has `max_sequence_length` text tokens.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel

from .configs import _WORDS, _apply_merges, _byte_chars

__all__ = ["FLUX2_TEXT_DIM", "build_flux2_klein_pipeline", "build_flux2_pipeline", "flux2_prompt_embeds",
           "make_flux2_tokenizer"]

_TEXT_HIDDEN = 16
FLUX2_TEXT_DIM = 3 * _TEXT_HIDDEN  # three stacked hidden states of the text encoder
_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _transformer(num_layers: int, num_single_layers: int, num_heads: int, head_dim: int, guidance_embeds: bool,
                 seed: int):
    if head_dim % 8:
        raise ValueError(f"head_dim must be a multiple of 8 (four even rotary axes of head_dim/4), got {head_dim}")
    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=head_dim, num_attention_heads=num_heads, joint_attention_dim=FLUX2_TEXT_DIM,
        timestep_guidance_channels=256, axes_dims_rope=(head_dim // 4,) * 4, guidance_embeds=guidance_embeds,
    ).eval()


def _vae(seed: int) -> AutoencoderKLFlux2:
    torch.manual_seed(seed)
    return AutoencoderKLFlux2(
        sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(4, 4, 4), layers_per_block=1, latent_channels=1,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()


def make_flux2_tokenizer():
    """A byte-level BPE Qwen2 tokenizer: every byte, each toy word as one token (with and without its
    leading space), Qwen's chat special tokens and a minimal chat template."""
    from transformers import Qwen2Tokenizer

    byte_chars = _byte_chars()
    space = byte_chars[ord(" ")]
    tokens = list(byte_chars)
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(("user", "assistant") + _WORDS):
        for piece in (word, space + word):
            symbols = _apply_merges(list(piece), ranks)
            while len(symbols) > 1:
                ranks[(symbols[0], symbols[1])] = len(ranks)
                tokens.append(symbols[0] + symbols[1])
                symbols = _apply_merges(symbols, ranks)
    tokens += list(_SPECIAL)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=list(ranks), pad_token=_SPECIAL[0])
    tokenizer.add_special_tokens({"additional_special_tokens": list(_SPECIAL[1:])})
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def _text_encoder(tokenizer, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=_TEXT_HIDDEN, intermediate_size=_TEXT_HIDDEN, num_hidden_layers=27,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


def build_flux2_pipeline(*, num_layers: int = 2, num_single_layers: int = 2, num_heads: int = 4, head_dim: int = 16,
                         seed: int = 0) -> Flux2Pipeline:
    """A random-weight Flux2Pipeline (guidance embedding, no text encoder: pass `prompt_embeds`)."""
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(seed), text_encoder=None,
                         tokenizer=None,
                         transformer=_transformer(num_layers, num_single_layers, num_heads, head_dim, True, seed))


def build_flux2_klein_pipeline(*, num_layers: int = 2, num_single_layers: int = 2, num_heads: int = 4,
                               head_dim: int = 16, text_encoder: bool = True, seed: int = 0) -> Flux2KleinPipeline:
    """A random-weight Flux2KleinPipeline (no guidance embedding, CFG for guidance_scale > 1);
    `text_encoder=False` leaves the encoder and tokenizer out (then pass `prompt_embeds`)."""
    tokenizer = encoder = None
    if text_encoder:
        tokenizer = make_flux2_tokenizer()
        encoder = _text_encoder(tokenizer, seed)
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(seed), text_encoder=encoder,
                              tokenizer=tokenizer,
                              transformer=_transformer(num_layers, num_single_layers, num_heads, head_dim, False, seed))


def flux2_prompt_embeds(batch: int = 1, tokens: int = 8, seed: int = 0) -> torch.Tensor:
    """Random text states (batch, tokens, FLUX2_TEXT_DIM) for a pipeline without a text encoder."""
    return torch.randn(batch, tokens, FLUX2_TEXT_DIM, generator=torch.Generator().manual_seed(seed))
