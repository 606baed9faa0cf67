"""Triton flash-attention forward over a 3-D (video) local window, block-sparse over [text ; video in 3-D tile
order] (`kernels.blocks3d`): each query block visits only the key blocks its windows touch, full ones without a
mask, partial ones with the exact rule — a lookup in the window's table of allowed offsets, so the kernel keeps
exactly the pairs of the dense-mask reference. Online softmax with fp32 accumulation; the plan's perturbations
are blended afterwards (`sdpa.blend`), as the tiled backend does.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..window import LocalWindow3D
from .online import key_block, online_softmax_step
from .softpag import launch_options
from .sparsity import VideoSparsity, video_sparsity

BLOCK = 64


@triton.jit
def video_rule(rows, cols, qt, qy, qx, PosT, PosY, PosX, Table, text, seq, rt, ry, rx):
    """(rows, cols) bool: text queries and text keys see everything; video pairs by their offset's table entry."""
    on_grid = cols < seq
    kt = tl.load(PosT + cols, mask=on_grid, other=0)
    ky = tl.load(PosY + cols, mask=on_grid, other=0)
    kx = tl.load(PosX + cols, mask=on_grid, other=0)
    dt = qt[:, None] - kt[None, :]
    dy = qy[:, None] - ky[None, :]
    dx = qx[:, None] - kx[None, :]
    reachable = (dt <= rt) & (dt >= -rt) & (dy <= ry) & (dy >= -ry) & (dx <= rx) & (dx >= -rx) & on_grid[None, :]
    offset = ((dt + rt) * (2 * ry + 1) + dy + ry) * (2 * rx + 1) + dx + rx
    inside = tl.load(Table + offset, mask=reachable, other=0) != 0
    return (rows < text)[:, None] | (cols < text)[None, :] | inside


@triton.jit
def _video_visit(q, acc, m, l, k_ptr, v_ptr, stride_ks, stride_vs, kv_block, rows, row_ok, qt, qy, qx,
                 PosT, PosY, PosX, Table, text, seq, rt, ry, rx, scale, MASKED: tl.constexpr,
                 BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    cols, col_ok, scores, v = key_block(q, k_ptr, v_ptr, stride_ks, stride_vs, kv_block * BLOCK, seq, scale, BLOCK,
                                        HEAD_DIM, UPCAST, PRECISION)
    allowed = col_ok[None, :] & row_ok[:, None]
    if MASKED:
        allowed = allowed & video_rule(rows, cols, qt, qy, qx, PosT, PosY, PosX, Table, text, seq, rt, ry, rx)
    return online_softmax_step(scores, allowed, v, acc, m, l, PRECISION)


@triton.jit
def _video_forward(
    Q, K, V, Out, PosT, PosY, PosX, Table, FullCount, FullIndex, PartCount, PartIndex,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os, heads, seq, text, n_kv_blocks, rt, ry, rx, scale,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = batch_head // heads
    h = batch_head % heads
    rows = block * BLOCK + tl.arange(0, BLOCK)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq
    k_ptr = K + b * stride_kb + h * stride_kh
    v_ptr = V + b * stride_vb + h * stride_vh
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + dims[None, :], mask=row_ok[:, None],
                other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qt = tl.load(PosT + rows, mask=row_ok, other=0)
    qy = tl.load(PosY + rows, mask=row_ok, other=0)
    qx = tl.load(PosX + rows, mask=row_ok, other=0)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    for j in range(0, tl.load(FullCount + block)):
        kv_block = tl.load(FullIndex + block * n_kv_blocks + j)
        acc, m, l = _video_visit(q, acc, m, l, k_ptr, v_ptr, stride_ks, stride_vs, kv_block, rows, row_ok, qt, qy, qx,
                                 PosT, PosY, PosX, Table, text, seq, rt, ry, rx, scale, False, BLOCK, HEAD_DIM, UPCAST,
                                 PRECISION)
    for j in range(0, tl.load(PartCount + block)):
        kv_block = tl.load(PartIndex + block * n_kv_blocks + j)
        acc, m, l = _video_visit(q, acc, m, l, k_ptr, v_ptr, stride_ks, stride_vs, kv_block, rows, row_ok, qt, qy, qx,
                                 PosT, PosY, PosX, Table, text, seq, rt, ry, rx, scale, True, BLOCK, HEAD_DIM, UPCAST,
                                 PRECISION)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + dims[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])


def video_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: LocalWindow3D, image: slice,
                           scale: float | None = None, block: int = BLOCK, num_warps: int = 4) -> torch.Tensor:
    """(B, H, S, D) → (B, H, S, D): the 3-D local window (no perturbations), tokens reordered and restored."""
    window.check_tokens(image)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    seq = q.shape[-2]
    s: VideoSparsity = video_sparsity(window.grid, window.radius, window.shape, seq - window.tokens, block, q.device)
    text_index = torch.cat([torch.arange(0, image.start), torch.arange(image.stop, seq)])
    permutation = torch.cat([text_index, s.order + image.start]).to(q.device)
    qp, kp, vp = (x.index_select(2, permutation).contiguous() for x in (q, k, v))
    out = torch.empty_like(qp)
    batch, heads, _, dim = q.shape
    rt, ry, rx = s.reaches
    _video_forward[(triton.cdiv(seq, block), batch * heads)](
        qp, kp, vp, out, s.positions[0], s.positions[1], s.positions[2], s.table,
        s.full_count, s.full_index, s.part_count, s.part_index,
        *qp.stride()[:3], *kp.stride()[:3], *vp.stride()[:3], *out.stride()[:3],
        heads, seq, s.text, s.full_index.shape[1], rt, ry, rx, scale,
        BLOCK=block, HEAD_DIM=dim, num_warps=num_warps, **launch_options(q),
    )
    return torch.empty_like(out).index_copy(2, permutation, out)
