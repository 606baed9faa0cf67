"""Where a panel lives in a pipeline's latents: SD3 (B, C, h, w) grids and FLUX packed (B, S, 4C) token rows."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..families import family_of
from .layout import Layout


def pack(latents: torch.Tensor) -> torch.Tensor:
    """FLUX packing: (B, C, h, w) → (B, (h/2)·(w/2), 4C), 2×2 latent patches in row-major token order."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack` for an h × w latent grid."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


@dataclass(frozen=True)
class LatentGrid:
    """The latent geometry of one canvas size in one pipeline."""

    packed: bool  # the transformer takes 2×2-packed latent tokens (FLUX)
    height: int  # canvas pixels
    width: int
    vae_scale: int  # pixels per latent cell
    align: int  # pixels per transformer token (VAE scale × patch size; FLUX packs 2×2)
    channels: int  # VAE latent channels
    layout: Layout

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.vae_scale, self.width // self.vae_scale

    def shape(self, batch: int = 1) -> tuple[int, ...]:
        """Shape of the pipeline's `latents` for this canvas."""
        h, w = self.latent_hw
        if self.packed:
            return batch, (h // 2) * (w // 2), self.channels * 4
        return batch, self.channels, h, w

    def to_pipeline(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents in the pipeline's layout (FLUX: packed)."""
        return pack(latents) if self.packed else latents

    def panel_mask(self, panels) -> torch.Tensor:
        """Boolean mask over the pipeline's latents, True on the given panels (broadcasts over batch and channels)."""
        h, w = self.latent_hw
        ph, pw = h // self.layout.rows, w // self.layout.cols
        cells = torch.zeros(h, w, dtype=torch.bool)
        for k in panels:
            r, c = self.layout.position(k)
            cells[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = True
        if self.packed:  # every 2×2 cell of a token lies in one panel (panels are token-aligned)
            return cells[::2, ::2].reshape(1, -1, 1)
        return cells[None, None]


def alignment(pipe) -> tuple[int, int]:
    """(VAE scale, pixels per token) of a pipeline."""
    vae_scale = int(getattr(pipe, "vae_scale_factor", 2 ** (len(pipe.vae.config.block_out_channels) - 1)))
    patch = family_of(pipe.transformer).latent_patch(pipe.transformer)
    return vae_scale, vae_scale * patch


def check_kl_latents(pipe):
    """The pipeline's family, when its latents are an AutoencoderKL's scaled latents (what dit-attn encodes and
    decodes for in-context sets and the trainers); TypeError naming the supported families otherwise."""
    family = family_of(pipe.transformer)
    if not family.image_latents_of_kl_vae:
        raise TypeError(f"in-context sets and the trainers encode images to AutoencoderKL latents; {family.name} "
                        "pipelines use another latent format (not supported yet): use an SD3/SD3.5 or a "
                        "FLUX.1-layout (FLUX.1, Chroma, LongCat-Image, ...) pipeline")
    return family


def latent_grid(pipe, layout: Layout | str | tuple[int, int], height: int, width: int) -> LatentGrid:
    """The latent geometry of a `height` × `width` canvas; ValueError naming the nearest valid sizes
    when the panels would not be whole transformer tokens."""
    layout = Layout.parse(layout)
    family = check_kl_latents(pipe)
    packed = family.packs_latents
    vae_scale, align = alignment(pipe)
    layout.check_size(height, width, align, what=f"canvas for {type(pipe).__name__} ({align} px a token)")
    return LatentGrid(packed, height, width, vae_scale, align, int(pipe.vae.config.latent_channels), layout)


def image_tensor(image: Image.Image | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] from a PIL image (or a (3, H, W) / (1, 3, H, W) tensor in [0, 1])."""
    if isinstance(image, Image.Image):
        if image.size != (width, height):
            raise ValueError(f"reference images must be panel-sized ({width}x{height} WxH), got {image.width}x{image.height}")
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    elif isinstance(image, torch.Tensor):
        x = image.float()[None] if image.ndim == 3 else image.float()
        if tuple(x.shape) != (1, 3, height, width):
            raise ValueError(f"reference tensors must be (3, {height}, {width}) in [0, 1], got {tuple(image.shape)}")
        x = x * 2 - 1
    else:
        raise TypeError(f"a reference must be a PIL image or a tensor, got {type(image).__name__}")
    return x


@torch.no_grad()
def encode(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """VAE latents (B, C, h, w) of images (B, 3, H, W) in [-1, 1], shifted and scaled as the transformer sees them
    (the mode of the posterior: deterministic)."""
    check_kl_latents(pipe)
    vae = pipe.vae
    z = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] from shifted and scaled latents (B, C, h, w) — the inverse of :func:`encode`."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + shift
    return (vae.decode(z).sample.float().clamp(-1, 1) + 1) / 2
