"""Block-sparse layout of a 3-D (video) local window, for kernels that work on token blocks
(flex_attention, the Triton work bound).

Tokens are ordered [text ; video in 3-D tile order], so a block of consecutive video tokens is a
compact box of the (frames, rows, cols) grid. Each (query block, key block) pair is classified
from the blocks' bounding boxes — empty, full (every pair allowed) or partial — by the window's own
test (`window.in_window_3d`) on the boxes' nearest and farthest per-axis gaps: both tests are
monotone in each |offset|, so an empty pair has no allowed token pair and a full one no refused
pair. Inside partial blocks the exact rule is a lookup in `allowed_offsets`, the window's test
evaluated once per integer offset, so kernels agree with the dense-mask reference bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .window import in_window_3d, reach

TILE_3D = (2, 8, 8)  # 128 cells: one 128-token block per tile away from the borders


def video_tile_order(grid: tuple[int, int, int], tile: tuple[int, int, int] = TILE_3D) -> torch.Tensor:
    """Frame-major video-token indices listed tile by tile (tiles and their cells frame-, row-, col-major)."""
    index = torch.arange(grid[0] * grid[1] * grid[2]).view(grid)
    pieces = [index[t0:t0 + tile[0], y0:y0 + tile[1], x0:x0 + tile[2]].flatten()
              for t0 in range(0, grid[0], tile[0]) for y0 in range(0, grid[1], tile[1])
              for x0 in range(0, grid[2], tile[2])]
    return torch.cat(pieces)


def offset_reaches(grid: tuple[int, int, int], radius: tuple[float, float, float]) -> tuple[int, int, int]:
    """Per axis the largest |offset| a pair of the grid can have that the radius can allow."""
    return tuple(min(reach(r), n - 1) for r, n in zip(radius, grid))


def allowed_offsets(grid: tuple[int, int, int], radius: tuple[float, float, float], shape: str) -> torch.Tensor:
    """(2·Rt + 1) · (2·Ry + 1) · (2·Rx + 1) bool, flattened: the window allows offset (dt, dy, dx) at
    index ((dt + Rt)·(2·Ry + 1) + dy + Ry)·(2·Rx + 1) + dx + Rx, R = `offset_reaches`."""
    reaches = offset_reaches(grid, radius)
    offsets = torch.cartesian_prod(*[torch.arange(-r, r + 1) for r in reaches]).view(-1, 3)
    return in_window_3d(offsets[:, 0], offsets[:, 1], offsets[:, 2], radius, shape)


@dataclass(frozen=True)
class VideoWindowBlocks:
    order: torch.Tensor  # (N,) frame-major index of each tile-ordered video token
    positions: torch.Tensor  # (3, seq) frame, row, col of each token in the new order (text: 0)
    full: torch.Tensor  # (blocks, blocks) bool
    partial: torch.Tensor
    text: int
    seq: int  # text + video tokens (queries and keys alike)

    @property
    def visited(self) -> int:
        return int(self.full.sum() + self.partial.sum())


def _boxes(values: torch.Tensor, index: torch.Tensor, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block the smallest and largest value of its tokens (0 for blocks without any)."""
    low = torch.zeros(n_blocks, dtype=values.dtype).scatter_reduce(0, index, values, "amin", include_self=False)
    high = torch.zeros(n_blocks, dtype=values.dtype).scatter_reduce(0, index, values, "amax", include_self=False)
    return low, high


@lru_cache(maxsize=16)
def video_window_blocks(grid: tuple[int, int, int], radius: tuple[float, float, float], shape: str, text: int,
                        block: int, tile: tuple[int, int, int] = TILE_3D) -> VideoWindowBlocks:
    """O(blocks²) small integers per (grid, radius, shape, text, block, tile); never an S×S evaluation."""
    n = grid[0] * grid[1] * grid[2]
    order = video_tile_order(grid, tile)
    cells = torch.stack([order // (grid[1] * grid[2]), order // grid[2] % grid[1], order % grid[2]])
    positions = torch.cat([torch.zeros(3, text, dtype=torch.long), cells], dim=1)
    seq = text + n
    n_blocks = -(-seq // block)
    token_block = torch.arange(seq) // block
    is_text = torch.zeros(n_blocks, dtype=torch.bool).index_fill_(0, token_block[:text], True)
    has_video = torch.zeros(n_blocks, dtype=torch.bool).index_fill_(0, token_block[text:], True)
    video_block = token_block[text:]
    near_gap, far_gap = [], []
    for axis in range(3):
        low, high = _boxes(cells[axis], video_block, n_blocks)
        near_gap.append(torch.clamp(torch.maximum(low[:, None] - high[None, :], low[None, :] - high[:, None]), min=0))
        far_gap.append(torch.maximum(high[:, None] - low[None, :], high[None, :] - low[:, None]))
    near = in_window_3d(*near_gap, radius, shape)
    within = in_window_3d(*far_gap, radius, shape)
    # text queries see every key; video queries see every text key and the video keys in their window
    video_any = is_text[None, :] | (has_video[None, :] & near)
    video_full = ~has_video[None, :] | within
    q_video, q_text = has_video[:, None], is_text[:, None]
    any_pair = q_text | (q_video & video_any)
    full = ~q_video | video_full
    return VideoWindowBlocks(order, positions, full, any_pair & ~full, text, seq)
