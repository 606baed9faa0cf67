"""The executable definition: materialise every attention map and blend the maps.

O(B·H·S²) memory; for tests and small shapes only.
"""
from __future__ import annotations

import math

import torch

from .plan import AttentionPlan, Perturbation


def target_map(logits: torch.Tensor, current: torch.Tensor, p: Perturbation, image: slice) -> torch.Tensor:
    """The map T of one perturbation, shape (B, H, S, S) like `logits`."""
    seq_len = logits.shape[-1]
    if p.scope == "joint":
        if p.target == "identity":
            return torch.eye(seq_len, dtype=logits.dtype, device=logits.device).expand_as(logits)
        return torch.full_like(logits, 1.0 / seq_len)
    # image scope: edit the image→image logits of image queries; text queries keep their map
    edited = logits.clone()
    block = edited[..., image, image]
    if p.target == "identity":
        n = block.shape[-1]
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=logits.device)
        block = block.masked_fill(off_diagonal, float("-inf"))
    else:
        block = block.mean(dim=-1, keepdim=True).expand_as(block)
    edited[..., image, image] = block
    target = current.clone()
    target[..., image, :] = torch.softmax(edited[..., image, :], dim=-1)
    return target


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, scale: float | None = None
) -> torch.Tensor:
    """(B, H, S, D) inputs → (B, H, S, D); maps computed in float32 (float64 stays float64)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = (x.to(compute) for x in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (qf @ kf.transpose(-1, -2)) * scale
    attn = torch.softmax(logits, dim=-1)
    image = plan.image_slice(q.shape[-2])
    for p in plan.perturbations:
        u = p.u.to(device=logits.device, dtype=compute)[:, :, None, None]
        attn = (1 - u) * attn + u * target_map(logits, attn, p, image)
    return (attn @ vf).to(q.dtype)
