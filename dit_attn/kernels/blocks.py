"""Block-sparse layout of CLEAR's local window, for kernels that work on token blocks
(flex_attention, Triton).

Tokens are ordered [text ; image in 2-D tile order ; pooled keys], so a block of
consecutive image tokens is a compact patch of the grid. Each (query block, key block)
pair is classified from the blocks' bounding boxes — empty, full (every pair allowed, no
mask needed) or partial (the exact circle is applied inside) — in O(blocks²) small
integer operations; no S×S mask is ever built.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

TILE = (8, 16)  # 128 cells: one flex block per tile away from the borders


def tile_order(grid: tuple[int, int], tile: tuple[int, int] = TILE) -> torch.Tensor:
    """Row-major image-token indices listed tile by tile (tiles row-major, cells row-major)."""
    rows, cols = grid
    index = torch.arange(rows * cols).view(rows, cols)
    pieces = []
    for y0 in range(0, rows, tile[0]):
        for x0 in range(0, cols, tile[1]):
            pieces.append(index[y0 : y0 + tile[0], x0 : x0 + tile[1]].flatten())
    return torch.cat(pieces)


def _block_boxes(kind: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, block: int, n_blocks: int):
    """Per block: which token kinds it holds (0 text, 1 image, 2 pooled) and the box of its image cells."""
    index = torch.arange(kind.numel()) // block
    has = torch.zeros(n_blocks, 3, dtype=torch.bool)
    has[index, kind] = True
    big = torch.iinfo(torch.long).max
    image = kind == 1

    def reduce(values, fill, how):
        return torch.full((n_blocks,), fill).scatter_reduce(0, index[image], values[image], how)

    return has, (reduce(ys, big, "amin"), reduce(ys, -big, "amax"), reduce(xs, big, "amin"), reduce(xs, -big, "amax"))


def _gap_squared(lo_a, hi_a, lo_b, hi_b, nearest: bool) -> torch.Tensor:
    """Per (a, b) block pair: the smallest (nearest) or largest squared 1-D distance between ranges."""
    if nearest:
        gap = torch.clamp(torch.maximum(lo_a[:, None] - hi_b[None, :], lo_b[None, :] - hi_a[:, None]), min=0)
    else:
        gap = torch.maximum(hi_a[:, None] - lo_b[None, :], hi_b[None, :] - lo_a[:, None])
    return gap * gap


def sparse_indices(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q blocks, kv blocks) bool → counts (1, 1, q blocks) and kv indices, selected first (1, 1, q blocks, kv blocks)."""
    counts = selected.sum(dim=1).to(torch.int32)
    order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return counts[None, None], order[None, None]


@dataclass(frozen=True)
class WindowBlocks:
    order: torch.Tensor  # (N_img,) row-major image index of each tile-ordered image token
    ys: torch.Tensor  # (seq_q,) grid row of each query-side token in the new order (text: 0)
    xs: torch.Tensor
    full: torch.Tensor  # (q blocks, kv blocks) bool
    partial: torch.Tensor
    seq_q: int  # text + image tokens
    seq_kv: int  # text + image + pooled tokens


@lru_cache(maxsize=16)
def window_blocks(grid: tuple[int, int], radius: float, text: int, pooled: int, block: int) -> WindowBlocks:
    rows, cols = grid
    n_img = rows * cols
    order = tile_order(grid)
    seq_q, seq_kv = text + n_img, text + n_img + pooled
    zeros_text, zeros_pool = torch.zeros(text, dtype=torch.long), torch.zeros(pooled, dtype=torch.long)
    kind = torch.cat([zeros_text, torch.ones(n_img, dtype=torch.long), torch.full((pooled,), 2)])
    ys = torch.cat([zeros_text, order // cols, zeros_pool])
    xs = torch.cat([zeros_text, order % cols, zeros_pool])
    n_q, n_kv = -(-seq_q // block), -(-seq_kv // block)
    has_kv, (ky0, ky1, kx0, kx1) = _block_boxes(kind, ys, xs, block, n_kv)
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
    return WindowBlocks(order, ys[:seq_q], xs[:seq_q], full, any_pair & ~full, seq_q, seq_kv)


@dataclass(frozen=True)
class Reordered:
    """q, k, v in block order: [text ; tile-ordered image] (+ pooled keys/values for k, v)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    permutation: torch.Tensor  # (seq,) original position of each reordered query-side token
    blocks: WindowBlocks

    def restore(self, out: torch.Tensor) -> torch.Tensor:
        """(B, H, seq, D) in block order → the original token order."""
        return torch.empty_like(out).index_copy(2, self.permutation, out)


def reorder(q, k, v, window, image: slice, block: int) -> Reordered:
    """(B, H, S, D) tensors with the image tokens at `image` → block order for `window`."""
    from .window import pool_grid

    seq = q.shape[-2]
    text_index = torch.cat([torch.arange(0, image.start), torch.arange(image.stop, seq)])
    pooled = (window.grid[0] // window.pool) * (window.grid[1] // window.pool) if window.pool else 0
    blocks = window_blocks(window.grid, float(window.radius), text_index.numel(), pooled, block)
    permutation = torch.cat([text_index, blocks.order + image.start]).to(q.device)
    qp, kp, vp = (x.index_select(2, permutation) for x in (q, k, v))
    if window.pool:
        kp = torch.cat([kp, pool_grid(k[:, :, image], window.grid, window.pool, window.pool_weight)], dim=2)
        vp = torch.cat([vp, pool_grid(v[:, :, image], window.grid, window.pool, window.pool_weight)], dim=2)
    return Reordered(qp, kp, vp, permutation, blocks)
