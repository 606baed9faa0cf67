"""Entries of the edited attention map for image queries and chosen key columns, as `kernels.reference`
defines the map.

The base map is the softmax over every key the query may see (the pipeline's mask added, a local
window's keys only, its pooled keys included): a column is exp(logit − the row's log-sum-exp). Each
SoftPAG perturbation then blends its target map in, column by column: A ← (1 − u)·A + u·T. Queries
are taken chunk by chunk, so a captured call never holds the S×S map.
"""
from __future__ import annotations

import math

import torch

from ..kernels.plan import Perturbation
from ..kernels.window import LocalWindow, LocalWindow3D, in_window_3d, pool_grid

CHUNK_BYTES = 4 << 20  # float32 logits of one chunk of query rows


def _window_keys(positions: torch.Tensor, seq_len: int, image: slice, window) -> torch.Tensor:
    """(n, S) bool: the keys the image queries at `positions` see in the window (every text key)."""
    cell = positions - image.start
    if isinstance(window, LocalWindow3D):  # video: the ellipsoid (or box) around each query's (frame, row, col)
        t, y, x = (axis.to(positions.device) for axis in window.positions())
        inside = in_window_3d(t[cell][:, None] - t[None], y[cell][:, None] - y[None], x[cell][:, None] - x[None],
                              window.radius, window.shape)
    else:
        cols = window.grid[1]
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


def _columns(logits: torch.Tensor, lse: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    return (logits[..., columns] - lse).exp_()


def _base_columns(logits, bias, q, k, positions, columns, image: slice, window: LocalWindow | None,
                  scale: float) -> torch.Tensor:
    """Columns of the base map: softmax over the keys the query sees, from the row's log-sum-exp.
    `logits` is overwritten."""
    if bias is not None:
        logits.add_(bias)
    if window is not None:
        logits.masked_fill_(~_window_keys(positions, logits.shape[-1], image, window), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    if window is not None and window.pool:
        weight = window.pool_weight.to(k.dtype)
        pooled = (q @ pool_grid(k[:, :, image], window.grid, window.pool, weight).transpose(-1, -2)) * scale
        if bias is not None:  # a pooled key stands for image keys: it gets the query's (constant) image-key bias
            pooled = pooled + bias[..., image][..., :1]
        lse = torch.logaddexp(lse, torch.logsumexp(pooled, dim=-1, keepdim=True))
    return _columns(logits, lse, columns)


def _target_columns(logits, bias, positions, columns, image: slice, p: Perturbation) -> torch.Tensor:
    """Columns of T for image queries (rows `positions`); `logits` are the raw q·k logits of those rows."""
    batch, heads, n, seq_len = logits.shape
    if p.scope == "joint":
        if p.target == "identity":
            return (positions[:, None] == columns[None]).to(logits.dtype).expand(batch, heads, n, columns.numel())
        if bias is None:
            return torch.full((batch, heads, n, columns.numel()), 1.0 / seq_len, dtype=logits.dtype, device=logits.device)
        full = bias.expand(batch, heads, n, seq_len)
        return _columns(full, torch.logsumexp(full, dim=-1, keepdim=True), columns)
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
    if bias is not None:
        edited.add_(bias)
    return _columns(edited, torch.logsumexp(edited, dim=-1, keepdim=True), columns)


def edited_columns(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, columns: torch.Tensor, image: slice,
                   scale: float | None = None, bias: torch.Tensor | None = None, window: LocalWindow | None = None,
                   perturbations: tuple[Perturbation, ...] = ()) -> torch.Tensor:
    """(B, H, n, C) float32 entries of the edited attention map: rows of the image queries at `positions` (n,),
    key columns `columns` (C,), normalised over every key the query sees.

    q, k: (B, H, S, D); bias: the pipeline's mask as a float bias broadcastable to (B, H, S, S);
    perturbations: their u already (B, H) for these rows and heads.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k = q.to(compute), k.to(compute)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    queries = q[:, :, positions]
    logits = (queries @ k.transpose(-1, -2)).mul_(scale)
    raw = logits.clone() if perturbations else None
    row_bias = _query_rows(bias, positions)
    out = _base_columns(logits, row_bias, queries, k, positions, columns, image, window, scale)
    for p in perturbations:
        u = p.u.to(device=out.device, dtype=compute)[:, :, None, None]
        out = (1 - u) * out + u * _target_columns(raw, row_bias, positions, columns, image, p)
    return out


def chunks(positions: torch.Tensor, batch: int, heads: int, seq_len: int) -> list[torch.Tensor]:
    """`positions` split so one chunk's (B, H, n, S) float32 logits stay under CHUNK_BYTES."""
    size = max(1, CHUNK_BYTES // (4 * max(batch * heads * seq_len, 1)))
    return list(positions.split(size))
