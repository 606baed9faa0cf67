"""CLEAR local attention with torch flex_attention and a block-sparse mask.

Tokens are reordered to [text ; image in 2-D tile order ; pooled keys] so that a
128-token block is a compact patch of the grid. The BlockMask comes from block bounding
boxes (`blocks.window_blocks`: O(blocks²) small integers, never an S×S evaluation) and the
exact circle is applied by the mask_mod inside partially covered blocks. Video windows
(`LocalWindow3D`) order the tokens [text ; video in 3-D tile order] (`blocks3d`); their mask_mod
looks each pair's offset up in the window's table of allowed offsets. flex_attention is
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
from .sdpa import blend, sdpa_attention
from .blocks import reorder, sparse_indices, window_blocks
from .blocks3d import allowed_offsets, offset_reaches, video_window_blocks
from .window import LocalWindow, LocalWindow3D

logger = logging.getLogger(__name__)

BLOCK = 128


@lru_cache(maxsize=16)
def local_block_mask(grid: tuple[int, int], radius: float, text: int, pooled: int, device: str):
    """BlockMask over [text ; tile-ordered image ; pooled keys]; cached per shape (bounded)."""
    from torch.nn.attention.flex_attention import BlockMask

    blocks = window_blocks(grid, radius, text, pooled, BLOCK)
    seq_q, seq_kv = blocks.seq_q, blocks.seq_kv
    r2 = radius * radius
    pos_y, pos_x = blocks.ys.to(device), blocks.xs.to(device)
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

    partial_counts, partial_index = sparse_indices(blocks.partial)
    full_counts, full_index = sparse_indices(blocks.full)
    return BlockMask.from_kv_blocks(
        partial_counts.to(device), partial_index.to(device), full_counts.to(device), full_index.to(device),
        BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(seq_q, seq_kv),
    )


@lru_cache(maxsize=16)
def video_block_mask(grid: tuple[int, int, int], radius: tuple[float, float, float], shape: str, text: int,
                     device: str):
    """BlockMask over [text ; tile-ordered video]; cached per shape (bounded)."""
    from torch.nn.attention.flex_attention import BlockMask

    blocks = video_window_blocks(grid, radius, shape, text, BLOCK)
    pos_t, pos_y, pos_x = blocks.positions.to(device)
    table = allowed_offsets(grid, radius, shape).to(device)
    rt, ry, rx = offset_reaches(grid, radius)
    wide_y, wide_x = 2 * ry + 1, 2 * rx + 1
    last = blocks.seq - 1

    def mask_mod(b, h, q_idx, kv_idx):
        q_clamped, kv_clamped = torch.clamp(q_idx, max=last), torch.clamp(kv_idx, max=last)
        dt = pos_t[q_clamped] - pos_t[kv_clamped]
        dy = pos_y[q_clamped] - pos_y[kv_clamped]
        dx = pos_x[q_clamped] - pos_x[kv_clamped]
        reachable = (dt.abs() <= rt) & (dy.abs() <= ry) & (dx.abs() <= rx)
        offset = ((dt.clamp(-rt, rt) + rt) * wide_y + dy.clamp(-ry, ry) + ry) * wide_x + dx.clamp(-rx, rx) + rx
        return (q_idx < text) | (kv_idx < text) | (reachable & table[offset])

    partial_counts, partial_index = sparse_indices(blocks.partial)
    full_counts, full_index = sparse_indices(blocks.full)
    return BlockMask.from_kv_blocks(
        partial_counts.to(device), partial_index.to(device), full_counts.to(device), full_index.to(device),
        BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(blocks.seq, blocks.seq),
    )


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
    window: LocalWindow | LocalWindow3D = plan.window
    scale_value = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    seq = q.shape[-2]
    image = plan.image_slice(seq)
    window.check_tokens(image)
    if window.covers_grid():  # every key is in every window: stock attention
        return sdpa_attention(q, k, v, replace(plan, window=None), scale)
    if isinstance(window, LocalWindow3D):
        out = _video_flex(q, k, v, window, image, scale_value)
    else:
        tokens = reorder(q, k, v, window, image, BLOCK)
        text, pooled = tokens.blocks.seq_q - window.tokens, tokens.blocks.seq_kv - tokens.blocks.seq_q
        block_mask = local_block_mask(window.grid, float(window.radius), text, pooled, str(q.device))
        out = tokens.restore(_flex(tokens.q, tokens.k, tokens.v, block_mask, scale_value))
    for p in plan.perturbations:
        blend(out, q, k, v, p, image, scale_value)
    return out


def _video_flex(q, k, v, window: LocalWindow3D, image: slice, scale: float) -> torch.Tensor:
    seq = q.shape[-2]
    text = seq - window.tokens
    blocks = video_window_blocks(window.grid, window.radius, window.shape, text, BLOCK)
    text_index = torch.cat([torch.arange(0, image.start), torch.arange(image.stop, seq)])
    permutation = torch.cat([text_index, blocks.order + image.start]).to(q.device)
    block_mask = video_block_mask(window.grid, window.radius, window.shape, text, str(q.device))
    out = _flex(*(x.index_select(2, permutation) for x in (q, k, v)), block_mask, scale)
    return torch.empty_like(out).index_copy(2, permutation, out)


__all__ = ["flex_local_attention", "local_block_mask", "video_block_mask"]
