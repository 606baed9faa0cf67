"""LongCat-Image (`LongCatImageTransformer2DModel`): FLUX.1's attention math and layout (double blocks, then
single blocks; [text ; image]; 2×2-packed latents with position ids). `LongCatImageAttnProcessor` is
`FluxAttnProcessor` line for line (same `_get_qkv_projections`, RMS q/k norms, concatenation, rotary, dispatch
without a mask), so dit-attn's FLUX.1 processor serves it. No pooled text or guidance inputs; text ids are
(0, i, i), image ids (1, 512 + row, 512 + col). CFG is a second call under cache context "uncond" after the
"cond" one (then an optional CFG renorm before the scheduler step).

Its text encoder is Qwen2.5-VL (optionally behind a prompt rewrite); the pipeline pads every prompt to
`tokenizer_max_length` tokens (no mask), so a source or negative prompt rides at the call's length as
FLUX.1's does. LongCat's weights differ from FLUX.1's: `flux:*` presets are refused (a different family).
"""
from __future__ import annotations

import torch

from .base import CallRows
from .flux import Flux, grid_from_ids

TOKENIZER_MAX_LENGTH = 512  # the pipelines' offset of the image ids


def longcat_text_ids(length: int) -> torch.Tensor:
    ids = torch.zeros(length, 3)
    ids[:, 1] = ids[:, 2] = torch.arange(length).float()
    return ids


def longcat_image_ids(h: int, w: int) -> torch.Tensor:
    """Position ids (S, 3) of an h × w latent grid packed into (h/2)·(w/2) tokens: (1, 512 + row, 512 + col)."""
    rows = torch.arange(h // 2).repeat_interleave(w // 2)
    cols = torch.arange(w // 2).repeat(h // 2)
    return torch.stack([torch.ones_like(rows), rows + TOKENIZER_MAX_LENGTH, cols + TOKENIZER_MAX_LENGTH], dim=-1).float()


class LongCatImage(Flux):
    name = "longcat_image"
    transformer_classes = ("LongCatImageTransformer2DModel",)
    stock_processors = ("LongCatImageAttnProcessor",)
    guided_pipelines = ("LongCatImagePipeline",)
    negative_embeds_extra = ""  # the calls take no text mask
    rows = CallRows(
        call_args=("hidden_states", "encoder_hidden_states", "timestep"),
        block_stream_args=("hidden_states", "encoder_hidden_states", "x"),  # "x": norm_out's input
        block_call_args=("temb", "conditioning_embedding"),  # per-row inputs of blocks and of norm_out
        controlnet_args=(),
    )
    reference_tokens_trail = False  # the edit pipeline is not wired (not in guided_pipelines)

    def grid(self, transformer, call: dict):
        """FLUX.1's grid from the image ids, whose first coordinate is 1 for LongCat's generated image."""
        ids = call.get("img_ids")
        if ids is not None:
            ids = ids.clone()
            ids[..., 0] -= 1
        return grid_from_ids(ids, call["hidden_states"].shape[1])

    def conditional_rows(self, pipe, batch: int, call: dict, context: str | None):
        """The "cond" call is conditional; the CFG call under cache context "uncond" is left stock."""
        if context == "uncond":
            return None
        return range(batch)

    def encode_prompts(self, pipe, prompts, max_sequence_length):
        """(Qwen2.5-VL states (N, S, D) at the pipeline's own padded length `tokenizer_max_length`, a mask of
        ones (N, S): LongCat passes none). The prompts are encoded as given: the pipeline's optional prompt
        rewrite (a generation by its VL model) is not applied to source or negative prompts."""
        embeds, _ = pipe.encode_prompt(prompt=list(prompts), num_images_per_prompt=1)
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)

    def predict(self, transformer, x_t, embeds, pooled, t, latent_hw, guidance=1.0):
        device, dtype = transformer.device, transformer.dtype
        return transformer(hidden_states=x_t.to(device, dtype), encoder_hidden_states=embeds.to(device, dtype),
                           timestep=t.to(device, dtype), img_ids=longcat_image_ids(*latent_hw).to(device, dtype),
                           txt_ids=longcat_text_ids(embeds.shape[1]).to(device, dtype)).sample
