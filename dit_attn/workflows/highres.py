"""High-resolution workflow with CLEAR local attention (REFERENCE §4):
generate at the model's own resolution with full attention, upscale the image, then
img2img at the target size with local attention (cost linear in the pixels), a
length-adjusted attention scale, and, for FLUX, NTK-scaled rotary embeddings.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image

from ..handle import apply
from ..edits import LocalAttention
from ..families import family_of
from ..limits import check_call


@dataclass
class HighResResult:
    image: Image.Image
    base_image: Image.Image


def image_tokens(transformer, height: int, width: int, vae_scale: int) -> int:
    patch = family_of(transformer).latent_patch(transformer)
    return (height // vae_scale // patch) * (width // vae_scale // patch)


@contextmanager
def ntk_rotary(transformer, factor: float):
    """FLUX: stretch the rotary base by NTK-aware scaling for a `factor`× longer side; SD3: nothing to do."""
    pos_embed = getattr(transformer, "pos_embed", None)
    if not family_of(transformer).rotary or factor <= 1 or not hasattr(pos_embed, "theta"):
        yield
        return
    original = pos_embed.theta
    dim = max(pos_embed.axes_dim)
    pos_embed.theta = original * factor ** (dim / (dim - 2))
    try:
        yield
    finally:
        pos_embed.theta = original


def generate_highres(pipe, prompt: str, height: int, width: int, *, radius: float, base_height: int | None = None,
                     base_width: int | None = None, strength: float = 0.7, num_inference_steps: int = 20,
                     seed: int = 0, downsample: int | None = None, weights=None, ntk: bool = True,
                     adjust_scale: bool = True, **pipe_kwargs) -> HighResResult:
    """Low-res → upscale → img2img with LocalAttention. Returns the final and the base image."""
    from diffusers import AutoPipelineForImage2Image

    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    vae_scale = getattr(pipe, "vae_scale_factor", 8)
    default = pipe.default_sample_size * vae_scale if hasattr(pipe, "default_sample_size") else 1024
    base_height, base_width = base_height or default, base_width or default
    check_call(pipe, height=height, width=width, num_inference_steps=num_inference_steps)  # before the base image
    check_call(pipe, height=base_height, width=base_width)
    if height < base_height or width < base_width:
        raise ValueError(f"the target {width}x{height} must be at least the base size {base_width}x{base_height}")
    generator = torch.Generator().manual_seed(seed)
    base = pipe(prompt=prompt, height=base_height, width=base_width, num_inference_steps=num_inference_steps,
                generator=generator, **pipe_kwargs).images[0]
    upscaled = base.resize((width, height), Image.LANCZOS)
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    transformer = img2img.transformer
    train_tokens = image_tokens(transformer, base_height, base_width, vae_scale) if adjust_scale else None
    edit = LocalAttention(radius, downsample=downsample, weights=weights, train_tokens=train_tokens)
    factor = math.sqrt((height * width) / (base_height * base_width)) if ntk else 1.0
    with apply(img2img, edit), ntk_rotary(transformer, factor):
        image = img2img(prompt, image=upscaled, strength=strength, height=height, width=width,
                        num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed),
                        **pipe_kwargs).images[0]
    return HighResResult(image, base)
