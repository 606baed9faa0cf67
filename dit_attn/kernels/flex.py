"""CLEAR local attention with torch flex_attention and a block-sparse mask.

Tokens are reordered to [text ; image in 2-D tile order ; pooled keys] so that a
128-token block is a compact patch of the grid. The BlockMask is built from block
bounding boxes — O(blocks²) small integers, never an S×S evaluation — and the exact
circle is applied by the mask_mod inside partially covered blocks. flex_attention is
compiled where torch.compile works (the first call of a shape compiles); eager
otherwise, or when DIT_ATTN_FLEX_COMPILE=0.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from functools import lru_cache

import torch

from .plan import AttentionPlan
from .sdpa import blend, sdpa_attention, text_segments
from .window import LocalWindow, pool_grid

logger = logging.getLogger(__name__)

BLOCK = 128
FLEX_TILE = (8, 16)  # one 128-token block per tile away from the borders


def tile_order(grid: tuple[int, int], tile: tuple[int, int] = FLEX_TILE) -> torch.Tensor:
    """Row-major image-token indices listed tile by tile (tiles row-major, cells row-major)."""
    rows, cols = grid
    index = torch.arange(rows * cols).view(rows, cols)
    pieces = []
    for y0 in range(0, rows, tile[0]):
        for x0 in range(0, cols, tile[1]):
            pieces.append(index[y0 : y0 + tile[0], x0 : x0 + tile[1]].flatten())
    return torch.cat(pieces)


def _block_boxes(kind: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, n_blocks: int):
    """Per block: which token kinds it holds (0 text, 1 image, 2 pooled) and the box of its image cells."""
    block = torch.arange(kind.numel()) // BLOCK
    has = torch.zeros(n_blocks, 3, dtype=torch.bool)
    has[block, kind] = True
    big = torch.iinfo(torch.long).max
    image = kind == 1
    lo_y = torch.full((n_blocks,), big).scatter_reduce(0, block[image], ys[image], "amin")
    hi_y = torch.full((n_blocks,), -big).scatter_reduce(0, block[image], ys[image], "amax")
    lo_x = torch.full((n_blocks,), big).scatter_reduce(0, block[image], xs[image], "amin")
    hi_x = torch.full((n_blocks,), -big).scatter_reduce(0, block[image], xs[image], "amax")
    return has, (lo_y, hi_y, lo_x, hi_x)


def _gap_squared(lo_a, hi_a, lo_b, hi_b, nearest: bool) -> torch.Tensor:
    """Per (a, b) block pair: the smallest (nearest) or largest squared 1-D distance between ranges."""
    if nearest:
        gap = torch.clamp(torch.maximum(lo_a[:, None] - hi_b[None, :], lo_b[None, :] - hi_a[:, None]), min=0)
    else:
        gap = torch.maximum(hi_a[:, None] - lo_b[None, :], hi_b[None, :] - lo_a[:, None])
    return gap * gap


def _sparse_indices(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q blocks, kv blocks) bool → counts (1, 1, q blocks) and indices (1, 1, q blocks, kv blocks)."""
    counts = selected.sum(dim=1).to(torch.int32)
    order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return counts[None, None], order[None, None]


@lru_cache(maxsize=16)
def local_block_mask(grid: tuple[int, int], radius: float, text: int, pooled: int, device: str):
    """BlockMask over [text ; tile-ordered image ; pooled keys]; cached per shape (bounded)."""
    from torch.nn.attention.flex_attention import BlockMask

    rows, cols = grid
    n_img = rows * cols
    order = tile_order(grid)
    seq_q, seq_kv = text + n_img, text + n_img + pooled
    kind = torch.cat([torch.zeros(text, dtype=torch.long), torch.ones(n_img, dtype=torch.long), torch.full((pooled,), 2)])
    ys = torch.cat([torch.zeros(text, dtype=torch.long), order // cols, torch.zeros(pooled, dtype=torch.long)])
    xs = torch.cat([torch.zeros(text, dtype=torch.long), order % cols, torch.zeros(pooled, dtype=torch.long)])
    n_q, n_kv = -(-seq_q // BLOCK), -(-seq_kv // BLOCK)
    has_kv, (ky0, ky1, kx0, kx1) = _block_boxes(kind, ys, xs, n_kv)
    has_q = has_kv[:n_q]
    qy0, qy1, qx0, qx1 = (t[:n_q] for t in (ky0, ky1, kx0, kx1))
    r2 = radius * radius
    near = _gap_squared(qy0, qy1, ky0, ky1, True) + _gap_squared(qx0, qx1, kx0, kx1, True) < r2
    within = _gap_squared(qy0, qy1, ky0, ky1, False) + _gap_squared(qx0, qx1, kx0, kx1, False) < r2
    q_text, q_image = has_q[:, 0][:, None], has_q[:, 1][:, None]
    kv_text, kv_image, kv_pool = (has_kv[:, i][None, :] for i in range(3))
    q_pure_image = q_image & ~q_text
    kv_pure_image = kv_image & ~kv_text & ~kv_pool
    # text queries see text and image keys, never pooled ones
    text_any = kv_text | kv_image
    text_full = text_any & ~kv_pool
    # image queries see text and pooled keys, and image keys in the circle
    image_any = kv_text | kv_pool | (kv_image & near)
    image_full = (~kv_image & (kv_text | kv_pool)) | (kv_pure_image & within)
    any_pair = torch.where(q_text, text_any, False) | torch.where(q_image, image_any, False)
    full = torch.where(q_pure_image, image_full, torch.where(q_image, False, text_full))
    partial = any_pair & ~full

    pos_y, pos_x = ys[:seq_q].to(device), xs[:seq_q].to(device)
    last = seq_q - 1

    def mask_mod(b, h, q_idx, kv_idx):
        q_is_image = q_idx >= text
        kv_is_image = (kv_idx >= text) & (kv_idx < seq_q)
        kv_is_pooled = kv_idx >= seq_q
        q_clamped, kv_clamped = torch.clamp(q_idx, max=last), torch.clamp(kv_idx, max=last)
        dy = pos_y[q_clamped] - pos_y[kv_clamped]
        dx = pos_x[q_clamped] - pos_x[kv_clamped]
        in_circle = dy * dy + dx * dx < r2
        return torch.where(q_is_image, ~kv_is_image | in_circle, ~kv_is_pooled)

    partial_counts, partial_index = _sparse_indices(partial)
    full_counts, full_index = _sparse_indices(full)
    return BlockMask.from_kv_blocks(
        partial_counts.to(device), partial_index.to(device), full_counts.to(device), full_index.to(device),
        BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(seq_q, seq_kv),
    ), order


_compiled_flex = None
_compile_failed = ""


def _flex(q, k, v, block_mask, scale):
    global _compiled_flex, _compile_failed
    from torch.nn.attention.flex_attention import flex_attention

    if not _compile_failed and os.environ.get("DIT_ATTN_FLEX_COMPILE", "1") != "0":
        try:
            if _compiled_flex is None:
                _compiled_flex = torch.compile(flex_attention, dynamic=False)
            return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale)
        except Exception as err:  # no compiler toolchain, unsupported dtype, ...
            _compile_failed = f"{type(err).__name__}: {err}"
            logger.warning("compiled flex_attention failed (%s); using eager flex_attention", _compile_failed.splitlines()[0])
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale)


def flex_local_attention(q, k, v, plan: AttentionPlan, scale: float | None = None) -> torch.Tensor:
    """(B, H, S, D) → (B, H, S, D): the plan's local window with flex_attention, then its perturbations."""
    window: LocalWindow = plan.window
    scale_value = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    seq = q.shape[-2]
    image = plan.image_slice(seq)
    if image.stop - image.start != window.tokens:
        raise ValueError(
            f"the local window's grid {window.grid[0]}×{window.grid[1]} = {window.tokens} tokens does not match "
            f"the {image.stop - image.start} image tokens of the call"
        )
    if window.covers_grid():  # every key is in every circle: stock attention
        return sdpa_attention(q, k, v, replace(plan, window=None), scale)
    text_index = torch.cat([torch.arange(s.start, s.stop) for s in text_segments(seq, image)] or [torch.zeros(0, dtype=torch.long)])
    pooled = (window.grid[0] // window.pool) * (window.grid[1] // window.pool) if window.pool else 0
    block_mask, order = local_block_mask(window.grid, float(window.radius), text_index.numel(), pooled, str(q.device))
    permutation = torch.cat([text_index, order + image.start]).to(q.device)
    qp, kp, vp = (x.index_select(2, permutation) for x in (q, k, v))
    if window.pool:
        kp = torch.cat([kp, pool_grid(k[:, :, image], window.grid, window.pool, window.pool_weight)], dim=2)
        vp = torch.cat([vp, pool_grid(v[:, :, image], window.grid, window.pool, window.pool_weight)], dim=2)
    out_permuted = _flex(qp, kp, vp, block_mask, scale_value)
    out = torch.empty_like(out_permuted).index_copy(2, permutation, out_permuted)
    for p in plan.perturbations:
        blend(out, q, k, v, p, image, scale_value)
    return out


__all__ = ["flex_local_attention", "local_block_mask", "tile_order"]
