"""Where a panel lives in a pipeline's latents: the VAE's (B, C, h, w) latent grid, which each family spec
converts to its pipelines' layouts (SD3 the grid itself; FLUX.1, FLUX.2, Qwen-Image 2×2-packed token rows)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..families import family_of
from ..families.base import Family
from .layout import Layout


@dataclass(frozen=True)
class LatentGrid:
    """The latent geometry of one canvas size in one pipeline."""

    family: Family
    height: int  # canvas pixels
    width: int
    vae_scale: int  # pixels per latent cell
    align: int  # pixels per transformer token (VAE scale × patch size; FLUX packs 2×2)
    channels: int  # VAE latent channels
    layout: Layout

    @property
    def packed(self) -> bool:
        """The denoising loop holds 2×2-packed latent tokens (B, S, 4C)."""
        return self.family.packs_latents

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.vae_scale, self.width // self.vae_scale

    def shape(self, batch: int = 1) -> tuple[int, ...]:
        """Shape of the pipeline call's `latents`."""
        h, w = self.latent_hw
        return tuple(self.to_pipeline(torch.empty(batch, self.channels, h, w, device="meta")).shape)

    def to_pipeline(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents in the layout of the pipeline call's `latents`."""
        return self.family.call_latents(latents)

    def to_steps(self, call_latents: torch.Tensor) -> torch.Tensor:
        """The call's `latents` in the layout of its denoising loop (what `callback_on_step_end` sees)."""
        return self.family.step_latents(call_latents)

    def from_output(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents from what a call with output_type="latent" returns."""
        return self.family.grid_of_output(pipe, latents, self.latent_hw)

    def panel_mask(self, panels) -> torch.Tensor:
        """Boolean mask over the denoising loop's latents, True on the given panels (broadcasts over batch and channels)."""
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
    vae_scale = getattr(pipe, "vae_scale_factor", None)
    if vae_scale is None:
        vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    vae_scale = int(vae_scale)
    patch = family_of(pipe.transformer).latent_patch(pipe.transformer)
    return vae_scale, vae_scale * patch


def check_image_latents(pipe):
    """The pipeline's family, when dit-attn encodes and decodes its image latents (in-context sets and the
    trainers); TypeError naming the supported families otherwise."""
    family = family_of(pipe.transformer)
    if not family.supports_image_latents():
        raise TypeError(family.image_latents_refusal())
    return family


def latent_grid(pipe, layout: Layout | str | tuple[int, int], height: int, width: int) -> LatentGrid:
    """The latent geometry of a `height` × `width` canvas; ValueError naming the nearest valid sizes
    when the panels would not be whole transformer tokens."""
    layout = Layout.parse(layout)
    family = check_image_latents(pipe)
    vae_scale, align = alignment(pipe)
    layout.check_size(height, width, align, what=f"canvas for {type(pipe).__name__} ({align} px a token)")
    return LatentGrid(family, height, width, vae_scale, align, family.latent_channels(pipe), layout)


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


def encode(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """VAE latents (B, C, h, w) of images (B, 3, H, W) in [-1, 1], scaled or normalised as the transformer sees
    them (the mode of the posterior: deterministic)."""
    return check_image_latents(pipe).encode_image_latents(pipe, pixels)


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] from latents (B, C, h, w) of :func:`encode`."""
    x = check_image_latents(pipe).decode_image_latents(pipe, latents)
    return (x.float().clamp(-1, 1) + 1) / 2
