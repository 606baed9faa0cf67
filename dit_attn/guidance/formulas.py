"""Guidance arithmetic on denoiser outputs: pure functions, no model state."""
from __future__ import annotations

import torch


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG (Ho & Salimans 2022, Eq. 6): ε = ε_u + g·(ε_c − ε_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def perturbation_guidance(eps: torch.Tensor, eps_cond: torch.Tensor, eps_perturbed: torch.Tensor, scale: float) -> torch.Tensor:
    """Perturbed-attention guidance (PAG, Ahn et al. 2024, Eq. 9; HeadHunter, Eq. 5).

    `eps` is the prediction to guide: ε_c without CFG, or the CFG result
    ε_u + g·(ε_c − ε_u) with it; returns eps + s·(ε_c − ε_p), ε_p being the prediction
    of the perturbed model on the conditional prompt.
    """
    return eps + scale * (eps_cond - eps_perturbed)
