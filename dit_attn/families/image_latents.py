"""Image latents as the transformers see them, on the VAE's (B, C, h, w) latent grid: the shared
token packing and the AutoencoderKL scaling; each family spec says which it uses (`Family.encode_image_latents`)."""
from __future__ import annotations

import torch


def pack(latents: torch.Tensor) -> torch.Tensor:
    """2×2 token packing: (B, C, h, w) → (B, (h/2)·(w/2), 4C), 2×2 latent patches in row-major token order,
    channels (c, patch row, patch col)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack` for an h × w latent grid."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, 4C, h/2, w/2), the channels of each 2×2 patch stacked as (c, patch row, patch col)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b, d, h, w = latents.shape
    x = latents.reshape(b, d // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, d // 4, h * 2, w * 2)


def kl_scale(vae) -> tuple[float, float]:
    """(shift, scale) of an AutoencoderKL: the transformer sees (z − shift)·scale."""
    return float(getattr(vae.config, "shift_factor", None) or 0.0), float(vae.config.scaling_factor)


@torch.no_grad()
def encode_kl(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Shifted and scaled AutoencoderKL latents (the posterior's mode) of images (B, 3, H, W) in [-1, 1]."""
    shift, scale = kl_scale(vae)
    z = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
    return (z - shift) * scale


@torch.no_grad()
def decode_kl(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] from the latents of :func:`encode_kl`."""
    shift, scale = kl_scale(vae)
    return vae.decode(latents.to(device=vae.device, dtype=vae.dtype) / scale + shift).sample
