"""Block lists of the Triton kernels: which key blocks each query block visits (and the
transpose, for the backward's per-key-block programs), built once per layout, block size
and device. A layout's token order does not depend on the block size (`blocks.tile_order`
uses fixed tiles), so the same tokens have exact lists at any block size (`with_block`)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from ..blocks import window_blocks


def block_lists(selected: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) bool → per row the number of selected columns and their indices, selected first."""
    counts = selected.sum(dim=1).to(torch.int32)
    index = torch.argsort((~selected).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return counts.to(device), index.contiguous().to(device)


@dataclass(frozen=True)
class Sparsity:
    """Which key blocks each query block visits (and the transpose), plus the window's geometry."""

    full_count: torch.Tensor  # (q blocks,) int32
    full_index: torch.Tensor  # (q blocks, kv blocks) int32, visited blocks first
    part_count: torch.Tensor
    part_index: torch.Tensor
    full_count_t: torch.Tensor  # (kv blocks,): query blocks that visit each key block
    full_index_t: torch.Tensor  # (kv blocks, q blocks)
    part_count_t: torch.Tensor
    part_index_t: torch.Tensor
    pos_y: torch.Tensor  # (seq_q,) int32 grid row of each query-side token (dense: unused)
    pos_x: torch.Tensor
    seq_q: int
    seq_kv: int
    text: int
    r2: float
    block: int
    rebuild: Callable[[int], Sparsity]  # the same layout at another block size (cached)

    def with_block(self, block: int) -> Sparsity:
        """This layout's block lists for `block`-token blocks (same tokens, same order)."""
        return self if block == self.block else self.rebuild(block)


def block_sparsity(full: torch.Tensor, partial: torch.Tensor, pos_y: torch.Tensor, pos_x: torch.Tensor, seq_q: int,
                   seq_kv: int, text: int, r2: float, block: int, device,
                   rebuild: Callable[[int], Sparsity]) -> Sparsity:
    lists = [block_lists(m, device) for m in (full, partial, full.T, partial.T)]
    pos = [p.to(device=device, dtype=torch.int32) for p in (pos_y, pos_x)]
    return Sparsity(*lists[0], *lists[1], *lists[2], *lists[3], *pos, seq_q, seq_kv, text, r2, block, rebuild)


@functools.lru_cache(maxsize=32)
def dense_sparsity(seq: int, block: int, device, seq_kv: int | None = None) -> Sparsity:
    """Every (query block, key block) pair full: dense attention of `seq` queries over `seq_kv`
    keys (default: as many as queries)."""
    seq_kv = seq if seq_kv is None else seq_kv
    n_q, n_kv = -(-seq // block), -(-seq_kv // block)
    zeros = torch.zeros(seq, dtype=torch.int32)
    return block_sparsity(torch.ones(n_q, n_kv, dtype=torch.bool), torch.zeros(n_q, n_kv, dtype=torch.bool), zeros,
                          zeros, seq, seq_kv, 0, 0.0, block, device,
                          lambda other: dense_sparsity(seq, other, device, seq_kv))


@functools.lru_cache(maxsize=32)
def window_sparsity(grid: tuple[int, int], radius: float, text: int, pooled: int, block: int, device) -> Sparsity:
    """CLEAR's local window in the token order of `kernels.blocks.reorder`."""
    b = window_blocks(grid, radius, text, pooled, block)
    return block_sparsity(b.full, b.partial, b.ys, b.xs, b.seq_q, b.seq_kv, text, radius * radius, block, device,
                          lambda other: window_sparsity(grid, radius, text, pooled, other, device))


@dataclass(frozen=True)
class VideoSparsity:
    """A 3-D window's block lists over [text ; tile-ordered video] (`kernels.blocks3d`) and its exact rule."""

    full_count: torch.Tensor  # (blocks,) int32
    full_index: torch.Tensor  # (blocks, blocks) int32, visited blocks first
    part_count: torch.Tensor
    part_index: torch.Tensor
    positions: torch.Tensor  # (3, seq) int32 frame, row, col of each token (text: 0)
    table: torch.Tensor  # int8 allowed offsets, `blocks3d.allowed_offsets`
    reaches: tuple[int, int, int]
    order: torch.Tensor  # (N,) frame-major index of each tile-ordered video token
    text: int
    seq: int
    block: int


@functools.lru_cache(maxsize=32)
def video_sparsity(grid: tuple[int, int, int], radius: tuple[float, float, float], shape: str, text: int, block: int,
                   device) -> VideoSparsity:
    from ..blocks3d import allowed_offsets, offset_reaches, video_window_blocks

    b = video_window_blocks(grid, radius, shape, text, block)
    table = allowed_offsets(grid, radius, shape).to(device=device, dtype=torch.int8)
    return VideoSparsity(*block_lists(b.full, device), *block_lists(b.partial, device),
                         b.positions.to(device=device, dtype=torch.int32).contiguous(), table,
                         offset_reaches(grid, radius), b.order, text, b.seq, block)
