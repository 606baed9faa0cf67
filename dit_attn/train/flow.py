"""Flow-matching training inputs for SD3 and FLUX transformers: latents in the pipeline's layout,
text features, and one transformer prediction at flow time t for any latent size.

x_t = (1 − t)·x0 + t·n, target n − x0. SD3 takes timestep 1000·t on (B, C, h, w) latents;
FLUX takes t on packed (B, (h/2)(w/2), 4C) latents with image position ids (0, row, col),
zero text ids and, for guidance-distilled models, a guidance value.
"""
from __future__ import annotations

import torch

from ..heads import model_family
from ..ic.latents import encode, pack


def latents_of(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """Training latents of images (B, 3, H, W) in [-1, 1], in the layout the pipeline's transformer takes."""
    z = encode(pipe, pixels).float()
    return pack(z) if model_family(pipe.transformer) == "flux" else z


def text_features(pipe, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token features (B, S, D), pooled features (B, P)) from the pipeline's own encoders."""
    if model_family(pipe.transformer) == "flux":
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=max_sequence_length)
    else:
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
    return embeds.float(), pooled.float()


def image_ids(h: int, w: int) -> torch.Tensor:
    """FLUX position ids (S, 3) of an h × w latent grid packed into (h/2)·(w/2) tokens: (0, row, col)."""
    rows = torch.arange(h // 2).repeat_interleave(w // 2)
    cols = torch.arange(w // 2).repeat(h // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).float()


def predict(transformer, x_t: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor, t: torch.Tensor,
            latent_hw: tuple[int, int], guidance: float = 1.0) -> torch.Tensor:
    """The transformer's velocity prediction (n − x0) for noisy latents x_t at flow time t ∈ (0, 1) (B,)."""
    device, dtype = transformer.device, transformer.dtype
    x_t, embeds, pooled = (v.to(device, dtype) for v in (x_t, embeds, pooled))
    if model_family(transformer) == "sd3":
        return transformer(hidden_states=x_t, encoder_hidden_states=embeds, pooled_projections=pooled,
                           timestep=(t * 1000).to(device, dtype)).sample
    guide = torch.full((x_t.shape[0],), float(guidance), device=device, dtype=dtype) \
        if transformer.config.guidance_embeds else None
    return transformer(hidden_states=x_t, encoder_hidden_states=embeds, pooled_projections=pooled,
                       timestep=t.to(device, dtype), img_ids=image_ids(*latent_hw).to(device, dtype),
                       txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype), guidance=guide).sample
