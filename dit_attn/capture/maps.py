"""Rows of the edited attention map for a few image queries, as `kernels.reference` defines it.

The base map is the softmax over every key the query may see (the pipeline's mask added, a local
window's keys only, its pooled keys included); each SoftPAG perturbation then blends its target map
in: A ← (1 − u)·A + u·T. Only the rows of the queries asked for are built, chunk by chunk, so a
captured call never holds the S×S map.
"""
from __future__ import annotations

import math

import torch

from ..kernels.plan import Perturbation
from ..kernels.window import LocalWindow, pool_grid

CHUNK_BYTES = 16 << 20  # float32 logits of one chunk of query rows


def _window_keys(positions: torch.Tensor, seq_len: int, image: slice, window: LocalWindow) -> torch.Tensor:
    """(n, S) bool: the keys the image queries at `positions` see in the window (every text key)."""
    cols = window.grid[1]
    cell = positions - image.start
    qy, qx = cell // cols, cell % cols
    keys = torch.arange(image.stop - image.start, device=positions.device)
    ky, kx = keys // cols, keys % cols
    inside = (qy[:, None] - ky[None]) ** 2 + (qx[:, None] - kx[None]) ** 2 < window.radius**2
    allowed = torch.ones(positions.numel(), seq_len, dtype=torch.bool, device=positions.device)
    allowed[:, image] = inside
    return allowed


def _query_rows(bias: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor | None:
    if bias is None or bias.shape[-2] == 1:
        return bias
    return bias[..., positions, :]


def _base_rows(logits, bias, q, k, positions, image: slice, window: LocalWindow | None, scale: float) -> torch.Tensor:
    if window is None:
        return torch.softmax(logits if bias is None else logits + bias, dim=-1)
    seq_len = logits.shape[-1]
    masked = logits.masked_fill(~_window_keys(positions, seq_len, image, window), float("-inf"))
    if bias is not None:
        masked = masked + bias
    if not window.pool:
        return torch.softmax(masked, dim=-1)
    weight = window.pool_weight.to(k.dtype)
    pooled_k = pool_grid(k[:, :, image], window.grid, window.pool, weight)
    pooled = (q @ pooled_k.transpose(-1, -2)) * scale
    if bias is not None:  # a pooled key stands for image keys: it gets the query's (constant) image-key bias
        pooled = pooled + bias[..., image][..., :1]
    return torch.softmax(torch.cat([masked, pooled], dim=-1), dim=-1)[..., :seq_len]


def _target_rows(logits, bias, positions, image: slice, p: Perturbation) -> torch.Tensor:
    """Rows of T for image queries (rows `positions`), over the S keys."""
    batch, heads, n, seq_len = logits.shape
    if p.scope == "joint":
        if p.target == "identity":
            return torch.nn.functional.one_hot(positions, seq_len).to(logits.dtype).expand(batch, heads, n, seq_len)
        if bias is None:
            return torch.full_like(logits, 1.0 / seq_len)
        return torch.softmax(bias.expand(batch, heads, n, seq_len), dim=-1)
    edited = logits.clone()
    block = edited[..., image]
    if p.target == "identity":
        own = torch.nn.functional.one_hot(positions - image.start, block.shape[-1]).bool()
        block = block.masked_fill(~own, float("-inf"))
    elif bias is None:
        block = block.mean(dim=-1, keepdim=True).expand_as(block)
    else:  # the mean over the image keys the query may see
        seen = torch.isfinite(bias.expand_as(logits)[..., image])
        block = ((block * seen).sum(dim=-1, keepdim=True) / seen.sum(dim=-1, keepdim=True)).expand_as(block)
    edited[..., image] = block
    return torch.softmax(edited if bias is None else edited + bias, dim=-1)


def edited_rows(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, image: slice, scale: float | None = None,
                bias: torch.Tensor | None = None, window: LocalWindow | None = None,
                perturbations: tuple[Perturbation, ...] = ()) -> torch.Tensor:
    """(B, H, n, S) float32 rows of the edited attention map for image queries at `positions` (n,).

    q, k: (B, H, S, D); bias: the pipeline's mask as a float bias broadcastable to (B, H, S, S);
    perturbations: their u already (B, H) for these rows and heads.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k = q.to(compute), k.to(compute)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    queries = q[:, :, positions]
    logits = (queries @ k.transpose(-1, -2)) * scale
    row_bias = _query_rows(bias, positions)
    rows = _base_rows(logits, row_bias, queries, k, positions, image, window, scale)
    for p in perturbations:
        u = p.u.to(device=rows.device, dtype=compute)[:, :, None, None]
        rows = (1 - u) * rows + u * _target_rows(logits, row_bias, positions, image, p)
    return rows


def chunks(positions: torch.Tensor, batch: int, heads: int, seq_len: int) -> list[torch.Tensor]:
    """`positions` split so one chunk's (B, H, n, S) float32 rows stay under CHUNK_BYTES."""
    size = max(1, CHUNK_BYTES // (4 * max(batch * heads * seq_len, 1)))
    return list(positions.split(size))
