"""FLUX.2 (`Flux2Transformer2DModel`): double blocks `transformer_blocks.i` (`Flux2Attention`) → layer i,
then single blocks `single_transformer_blocks.j` (`Flux2ParallelSelfAttention`, attention fused with the
MLP) → (number of double blocks) + j; [text ; image] tokens; 2×2-patchified latent tokens with 4-axis
position ids (t, row, col, l).

Pipelines: `Flux2Pipeline` (guidance-distilled, one call a step) and `Flux2KleinPipeline` (CFG as a second
call under `cache_context("uncond")`). With reference images the call's tokens are [text ; generated ;
reference] (the references' ids have t = 10, 20, ...) and the pipeline keeps the leading, generated tokens
of the prediction. The per-row modulation tensors (`temb_mod_img`, `temb_mod_txt`, `temb_mod`) are computed
once per call and mapped to each stage's rows.

The KV-cache variant (`Flux2KleinKVPipeline`, `kv_cache_mode=...`) reuses reference keys across steps: its
calls are refused by the processors.
"""
from __future__ import annotations

import torch

from ..heads import LayerInfo
from .base import CallRows, Family
from .flux import double_then_single_layer_of_key, double_then_single_layers, grid_from_ids
from .image_latents import pack, patchify, unpack, unpatchify


def image_ids(h: int, w: int) -> torch.Tensor:
    """Position ids (S, 4) of an h × w latent grid patchified into (h/2)·(w/2) tokens: (0, row, col, 0)."""
    rows = torch.arange(h // 2).repeat_interleave(w // 2)
    cols = torch.arange(w // 2).repeat(h // 2)
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, cols, zeros], dim=-1)


def normalised(vae, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's own latents (B, C, h, w) batch-normalised per patchified channel, as the pipelines feed the
    transformer; on the latent grid that is a normalisation per (channel, row parity, column parity)."""
    z = patchify(latents)
    mean, std = _statistics(vae, z)
    return unpatchify((z - mean) / std)


def denormalised(vae, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalised`, as the pipelines undo it before decoding."""
    z = patchify(latents)
    mean, std = _statistics(vae, z)
    return unpatchify(z * std + mean)


def _statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)


def text_ids(length: int) -> torch.Tensor:
    """Position ids (L, 4) of L text tokens: (0, 0, 0, l)."""
    l = torch.arange(length)
    zeros = torch.zeros_like(l)
    return torch.stack([zeros, zeros, zeros, l], dim=-1)


class Flux2(Family):
    name = "flux2"
    transformer_classes = ("Flux2Transformer2DModel",)
    # the KV-cache processors are replaced too, so that a KV-cache call is refused with its reason
    # (without kv_cache_mode they compute exactly what the plain ones do)
    stock_processors = ("Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor",
                        "Flux2KVAttnProcessor", "Flux2KVParallelSelfAttnProcessor")
    guided_pipelines = ("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinInpaintPipeline")
    rows = CallRows(
        call_args=("hidden_states", "encoder_hidden_states", "timestep", "guidance"),
        block_stream_args=("hidden_states", "encoder_hidden_states", "x"),  # "x": norm_out's input
        # per-row modulation of the double blocks, the single blocks and norm_out
        block_call_args=("temb_mod_img", "temb_mod_txt", "temb_mod", "conditioning_embedding"),
    )
    text_first = True
    rotary = True
    packs_latents = True
    reference_tokens_trail = True
    nag = True  # its processor applies NAG (nag_image_inputs / nag_guide)
    negative_embeds_extra = ""

    def layers(self, transformer) -> list[LayerInfo]:
        return double_then_single_layers(transformer)

    def layer_of_key(self, key: str, transformer) -> int:
        return double_then_single_layer_of_key(key, transformer)

    def processor_for(self, key: str, layer: int, state):
        from ..processors.flux2 import Flux2AttnProcessor, Flux2SingleAttnProcessor

        single = key.startswith("single_transformer_blocks.")
        return (Flux2SingleAttnProcessor if single else Flux2AttnProcessor)(layer, state)

    def fork_points(self, transformer):
        blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
        return [(block, i) for i, block in enumerate(blocks)] + [(transformer.norm_out, len(blocks))]

    def grid(self, transformer, call: dict):
        ids = call.get("img_ids")
        if ids is None:
            return None, "the call has no img_ids"
        ids = ids[0] if ids.ndim == 3 else ids
        return grid_from_ids(ids[:, :3].float(), call["hidden_states"].shape[1])

    def conditional_rows(self, pipe, batch: int, call: dict, context: str | None):
        """Flux2Pipeline makes one call a step; Flux2KleinPipeline makes the conditional call under cache context
        "cond" and, with CFG, the negative one under "uncond" (left stock)."""
        if context == "uncond":
            return None
        return range(batch)

    def encode_prompts(self, pipe, prompts, max_sequence_length):
        if getattr(pipe, "text_encoder", None) is None:
            raise ValueError(f"{type(pipe).__name__} has no text encoder: text edits on FLUX.2 encode their prompts with it")
        embeds, _ = pipe.encode_prompt(prompt=prompts, num_images_per_prompt=1,
                                       max_sequence_length=max_sequence_length or 512)
        return embeds, embeds.new_zeros(embeds.shape[0], 0)

    @torch.no_grad()
    def encode_image_latents(self, pipe, pixels):
        vae = pipe.vae
        return normalised(vae, vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode())

    @torch.no_grad()
    def decode_image_latents(self, pipe, latents):
        vae = pipe.vae
        return vae.decode(denormalised(vae, latents.to(device=vae.device, dtype=vae.dtype))).sample

    def call_latents(self, latents):
        return patchify(latents)  # the pipelines take (B, 4C, h/2, w/2) and pack them into tokens themselves

    def step_latents(self, call_latents):
        return pack(unpatchify(call_latents))

    def grid_of_output(self, pipe, latents, latent_hw):
        # output_type="latent": Flux2Pipeline returns its packed tokens, Flux2KleinPipeline the VAE's own latents
        if latents.ndim == 3:
            return unpack(latents, *latent_hw)
        return normalised(pipe.vae, latents)

    def latent_patch(self, transformer) -> int:
        return 2

    def predict(self, transformer, x_t, embeds, pooled, t, latent_hw, guidance=1.0):
        device, dtype = transformer.device, transformer.dtype
        guide = torch.full((x_t.shape[0],), float(guidance), device=device, dtype=dtype) \
            if transformer.config.guidance_embeds else None
        return transformer(hidden_states=x_t.to(device, dtype), encoder_hidden_states=embeds.to(device, dtype),
                           timestep=t.to(device, dtype), img_ids=image_ids(*latent_hw).to(device),
                           txt_ids=text_ids(embeds.shape[1]).to(device), guidance=guide).sample
