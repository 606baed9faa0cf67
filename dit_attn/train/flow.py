"""Flow-matching training inputs for any supported transformer: latents in the layout its family
takes, text features from the pipeline's own encoders, and one prediction at flow time t.

x_t = (1 − t)·x0 + t·n, target n − x0 (the family's spec makes the call: SD3 takes timestep
1000·t on (B, C, h, w) latents; FLUX t on packed tokens with position ids and a guidance value).
"""
from __future__ import annotations

import torch

from ..families import family_of
from ..ic.latents import encode


def latents_of(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """Training latents of images (B, 3, H, W) in [-1, 1], in the layout the pipeline's transformer takes."""
    family = family_of(pipe.transformer)
    return family.step_latents(family.call_latents(encode(pipe, pixels).float()))


def text_features(pipe, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token features (B, S, D), pooled features (B, P)) from the pipeline's own encoders."""
    embeds, pooled = family_of(pipe.transformer).encode_prompts(pipe, prompts, max_sequence_length)
    return embeds.float(), pooled.float()


def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, velocity target) at flow times t (B,): x_t = (1 − t)·x0 + t·n, target n − x0."""
    shape = (-1,) + (1,) * (x0.ndim - 1)
    tt = t.view(shape).to(x0)
    return (1 - tt) * x0 + tt * noise, noise - x0


def flow_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The flow-matching loss: mean squared error of a velocity prediction (any dtype, any device) against its
    target n − x0 (`noised`), in float32."""
    return torch.nn.functional.mse_loss(prediction.float(), target.to(prediction.device))


def predict(transformer, x_t: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor, t: torch.Tensor,
            latent_hw: tuple[int, int], guidance: float = 1.0) -> torch.Tensor:
    """The transformer's velocity prediction (n − x0) for noisy latents x_t at flow time t ∈ (0, 1) (B,)."""
    return family_of(transformer).predict(transformer, x_t, embeds, pooled, t, latent_hw, guidance)
