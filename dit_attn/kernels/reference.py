"""The executable definition: materialise every attention map.

The base map is softmax attention, restricted by the plan's local window (dense mask,
pooled keys appended); each perturbation then blends its target in, in order:
out ← (1 − u)·out + u·T·V. O(B·H·S²) memory; for tests and small shapes only.
"""
from __future__ import annotations

import math

import torch

from .plan import AttentionPlan, Perturbation
from .window import dense_mask, pool_grid


def target_output(logits: torch.Tensor, v: torch.Tensor, current: torch.Tensor, p: Perturbation, image: slice) -> torch.Tensor:
    """T·V of one perturbation; `logits` are the full (B, H, S, S) logits, `current` the output so far."""
    seq_len = logits.shape[-1]
    if p.scope == "joint":
        if p.target == "identity":
            return v
        return torch.full_like(logits, 1.0 / seq_len) @ v
    # image scope: edit the image→image logits of image queries; text queries keep their output
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
    target[..., image, :] = torch.softmax(edited[..., image, :], dim=-1) @ v
    return target


def base_output(logits, q, k, v, plan: AttentionPlan, image: slice, scale: float) -> torch.Tensor:
    window = plan.window
    if window is None:
        return torch.softmax(logits, dim=-1) @ v
    keys, values = k, v
    if window.pool:
        pooled_k = pool_grid(k[:, :, image], window.grid, window.pool, window.pool_weight)
        pooled_v = pool_grid(v[:, :, image], window.grid, window.pool, window.pool_weight)
        keys, values = torch.cat([k, pooled_k], dim=2), torch.cat([v, pooled_v], dim=2)
    allowed = dense_mask(q.shape[-2], image, window).to(logits.device)
    masked = ((q @ keys.transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf"))
    return torch.softmax(masked, dim=-1) @ values


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, scale: float | None = None
) -> torch.Tensor:
    """(B, H, S, D) inputs → (B, H, S, D); maps computed in float32 (float64 stays float64)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = (x.to(compute) for x in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (qf @ kf.transpose(-1, -2)) * scale
    image = plan.image_slice(q.shape[-2])
    out = base_output(logits, qf, kf, vf, plan, image, scale)
    for p in plan.perturbations:
        u = p.u.to(device=logits.device, dtype=compute)[:, :, None, None]
        out = (1 - u) * out + u * target_output(logits, vf, out, p, image)
    return out.to(q.dtype)
