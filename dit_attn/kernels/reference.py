"""The executable definition: materialise every attention map.

The base map is softmax attention, restricted by the plan's local window (dense mask,
pooled keys appended); each perturbation then blends its target in, in order:
out ← (1 − u)·out + u·T·V. A pipeline's attention mask is added to the logits of the base
map and of every target (see `masks`). O(B·H·S²) memory; for tests and small shapes only.
"""
from __future__ import annotations

import math

import torch

from . import masks
from .plan import AttentionPlan, Perturbation
from .window import dense_mask, pool_grid


def with_bias(logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return logits if bias is None else logits + bias


def target_output(logits: torch.Tensor, bias: torch.Tensor | None, v: torch.Tensor, current: torch.Tensor,
                  p: Perturbation, image: slice) -> torch.Tensor:
    """T·V of one perturbation; `logits` are the full (B, H, S, S) q·k logits, `bias` the
    pipeline's mask as a float bias (or None), `current` the output so far."""
    seq_len = logits.shape[-1]
    if p.scope == "joint":
        if p.target == "identity":
            return v
        if bias is None:
            return torch.full_like(logits, 1.0 / seq_len) @ v
        return torch.softmax(bias.expand_as(logits), dim=-1) @ v
    # image scope: edit the image→image logits of image queries; text queries keep their output
    edited = logits.clone()
    block = edited[..., image, image]
    if p.target == "identity":
        n = block.shape[-1]
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=logits.device)
        block = block.masked_fill(off_diagonal, float("-inf"))
    elif bias is None:
        block = block.mean(dim=-1, keepdim=True).expand_as(block)
    else:  # the mean over the image keys the query may see
        seen = torch.isfinite(bias.expand_as(logits)[..., image, image])
        mean = (block * seen).sum(dim=-1, keepdim=True) / seen.sum(dim=-1, keepdim=True)
        block = mean.expand_as(block)
    edited[..., image, image] = block
    target = current.clone()
    target[..., image, :] = torch.softmax(with_bias(edited, bias)[..., image, :], dim=-1) @ v
    return target


def base_output(logits, bias, q, k, v, plan: AttentionPlan, image: slice, scale: float) -> torch.Tensor:
    window = plan.window
    if window is None:
        return torch.softmax(with_bias(logits, bias), dim=-1) @ v
    keys, values = k, v
    seq_len = q.shape[-2]
    pooled_cells = 0
    if window.pool:
        pooled_k = pool_grid(k[:, :, image], window.grid, window.pool, window.pool_weight)
        pooled_v = pool_grid(v[:, :, image], window.grid, window.pool, window.pool_weight)
        keys, values = torch.cat([k, pooled_k], dim=2), torch.cat([v, pooled_v], dim=2)
        pooled_cells = pooled_k.shape[-2]
    allowed = dense_mask(seq_len, image, window).to(logits.device)
    masked = ((q @ keys.transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf"))
    if bias is not None:
        # pooled keys stand for image keys: an image query gives them its (constant) image-key bias
        _, image_bias = masks.image_query_bias(bias, image)
        full = bias.expand(*bias.shape[:2], seq_len, seq_len)
        pooled = torch.zeros(*full.shape[:-1], pooled_cells, dtype=full.dtype, device=full.device)
        pooled[..., image, :] = image_bias
        masked = masked + torch.cat([full, pooled], dim=-1)
    return torch.softmax(masked, dim=-1) @ values


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, H, S, D) inputs → (B, H, S, D); maps computed in float32 (float64 stays float64)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = (x.to(compute) for x in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (qf @ kf.transpose(-1, -2)) * scale
    bias = masks.additive(masks.as_four_d(attn_mask, k.shape[-2]), compute) if attn_mask is not None else None
    image = plan.image_slice(q.shape[-2])
    out = base_output(logits, bias, qf, kf, vf, plan, image, scale)
    for p in plan.perturbations:
        u = p.u.to(device=logits.device, dtype=compute)[:, :, None, None]
        out = (1 - u) * out + u * target_output(logits, bias, vf, out, p, image)
    return out.to(q.dtype)
