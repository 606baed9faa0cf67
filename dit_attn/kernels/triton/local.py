"""Triton flash-attention forward over CLEAR's block-sparse local window, with the SoftPAG
blends of any perturbations (joint and image scope) in the epilogue: one launch for a batch
mixing stock rows, perturbed rows and local attention.

Tokens are reordered to [text ; image in tile order ; pooled keys] (`kernels.blocks`).
Each query block visits only the key blocks its circles touch: blocks wholly inside every
circle without a mask, partially covered ones with the exact circle computed from the
tokens' grid positions. Online softmax with fp32 accumulation. The blend is `softpag`'s
epilogue: out = kept·A + w₁·V + w₂·mean V + w₃·T_id + w₄·T_uni per (row, head). The
image-scope targets do not depend on the window (the reference edits the full logits):
they need each image query's softmax over the text keys alone, which is one extra pass
over the leading `text` keys (cheap: text ≪ image tokens). A query block where no row keeps A
(u = 1) skips the window.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..blocks import reorder
from ..window import LocalWindow
from . import tuning
from .online import key_block, online_softmax_step
from .softpag import attend_range, blend_arguments, blend_epilogue, block_needs, launch_options
from .sparsity import Sparsity, window_sparsity


@triton.jit
def window_rule(rows, cols, qy, qx, PosY, PosX, text, seq_q, r2):
    """(rows, cols) bool: which pairs the window allows. Text queries see text and image keys
    (never pooled ones); image queries see text and pooled keys and image keys in the circle."""
    on_grid = cols < seq_q
    ky = tl.load(PosY + cols, mask=on_grid, other=0)
    kx = tl.load(PosX + cols, mask=on_grid, other=0)
    dy = qy[:, None] - ky[None, :]
    dx = qx[:, None] - kx[None, :]
    near = (dy * dy + dx * dx).to(tl.float32) < r2
    kv_image = (cols >= text) & on_grid
    q_image = rows >= text
    return tl.where(q_image[:, None], (~kv_image)[None, :] | near, on_grid[None, :])


@triton.jit
def _visit(q, acc, m, l, k_ptr, v_ptr, stride_ks, stride_vs, kv_block, rows, row_ok, qy, qx, PosY, PosX,
           text, seq_q, seq_kv, r2, scale, MASKED: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
           UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax (MASKED: apply the window rule pair by pair)."""
    cols, col_ok, scores, v = key_block(q, k_ptr, v_ptr, stride_ks, stride_vs, kv_block * BLOCK, seq_kv, scale, BLOCK,
                                        HEAD_DIM, UPCAST, PRECISION)
    allowed = col_ok[None, :] & row_ok[:, None]
    if MASKED:
        allowed = allowed & window_rule(rows, cols, qy, qx, PosY, PosX, text, seq_q, r2)
    return online_softmax_step(scores, allowed, v, acc, m, l, PRECISION)


@triton.jit
def _local_forward(
    Q, K, V, W, Means, Out, Lse, PosY, PosX, FullCount, FullIndex, PartCount, PartIndex,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os, heads, seq_q, seq_kv, text, n_kv_blocks, r2, scale,
    UNIFORM: tl.constexpr, IMAGE_SCOPE: tl.constexpr, BLEND: tl.constexpr, STORE_LSE: tl.constexpr,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = batch_head // heads
    h = batch_head % heads
    rows = block * BLOCK + tl.arange(0, BLOCK)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq_q
    q_ptr = Q + b * stride_qb + h * stride_qh
    k_ptr = K + b * stride_kb + h * stride_kh
    v_ptr = V + b * stride_vb + h * stride_vh
    needs_attention = True
    needs_text = False
    if BLEND:  # W holds the blend weights per (row, head), see softpag.blend_weights
        needs_attention, needs_text = block_needs(W, batch_head, block * BLOCK, block * BLOCK + BLOCK, text, seq_q)
    q = tl.load(q_ptr + rows[:, None] * stride_qs + dims[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m = tl.full([BLOCK], float("-inf"), tl.float32)  # empty partials: nothing skipped is ever read
    l = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    if needs_attention:
        qy = tl.load(PosY + rows, mask=row_ok, other=0)
        qx = tl.load(PosX + rows, mask=row_ok, other=0)
        n_full = tl.load(FullCount + block)
        for j in range(0, n_full):
            kv_block = tl.load(FullIndex + block * n_kv_blocks + j)
            acc, m, l = _visit(q, acc, m, l, k_ptr, v_ptr, stride_ks, stride_vs, kv_block, rows, row_ok, qy, qx,
                               PosY, PosX, text, seq_q, seq_kv, r2, scale, False, BLOCK, HEAD_DIM, UPCAST, PRECISION)
        n_partial = tl.load(PartCount + block)
        for j in range(0, n_partial):
            kv_block = tl.load(PartIndex + block * n_kv_blocks + j)
            acc, m, l = _visit(q, acc, m, l, k_ptr, v_ptr, stride_ks, stride_vs, kv_block, rows, row_ok, qy, qx,
                               PosY, PosX, text, seq_q, seq_kv, r2, scale, True, BLOCK, HEAD_DIM, UPCAST, PRECISION)
        if STORE_LSE:  # for the backward pass (which runs without a blend)
            tl.store(Lse + batch_head * seq_q + rows, m + tl.log(l), mask=row_ok)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    if BLEND:
        text_m = tl.full([BLOCK], float("-inf"), tl.float32)
        text_l = tl.zeros([BLOCK], tl.float32)
        text_acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
        if IMAGE_SCOPE:
            if needs_text:  # the leading `text` keys alone, for the image-scope targets
                text_m, text_l, text_acc = attend_range(q, k_ptr, v_ptr, stride_ks, stride_vs, 0, text, scale,
                                                        BLOCK, BLOCK, HEAD_DIM, UPCAST, PRECISION)
        out = blend_epilogue(out, q, rows, row_ok, rows >= text, k_ptr, v_ptr, stride_ks, stride_vs, W, Means,
                             batch_head, text_m, text_l, text_acc, seq_q - text, scale, UNIFORM, IMAGE_SCOPE, HEAD_DIM)
    o_ptr = Out + b * stride_ob + h * stride_oh
    tl.store(o_ptr + rows[:, None] * stride_os + dims[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None])


def local_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: LocalWindow, image: slice,
                           perturbations=(), scale: float | None = None, config: dict | None = None) -> torch.Tensor:
    """(B, H, S, D) → (B, H, S, D): local window attention with the SoftPAG blends of
    `perturbations` (any number, joint and image scope, folded into one epilogue).
    config: block, num_warps (default: tuned on a GPU, see `tuning`)."""
    window.check_tokens(image)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    launch = functools.partial(_launch_local, q, k, v, window, image, tuple(perturbations), scale)
    return launch(config or tuning.choose("local", q, launch))


def window_tokens(q, k, v, window: LocalWindow, image: slice, block: int):
    """The tokens in the window's block order and the (cached) block lists of that layout."""
    tokens = reorder(q, k, v, window, image, block)
    b = tokens.blocks
    sparsity = window_sparsity(window.grid, float(window.radius), b.seq_q - window.tokens, b.seq_kv - b.seq_q,
                               block, q.device)
    return tokens, sparsity


def _launch_local(q, k, v, window: LocalWindow, image: slice, perturbations: tuple, scale: float,
                  config: dict) -> torch.Tensor:
    tokens, sparsity = window_tokens(q, k, v, window, image, config["block"])
    out = torch.empty_like(tokens.q)
    launch_local_forward(tokens.q, tokens.k.contiguous(), tokens.v.contiguous(), out, sparsity, scale, perturbations,
                         num_warps=config["num_warps"])
    return tokens.restore(out)


def launch_local_forward(q, k, v, out: torch.Tensor, sparsity: Sparsity, scale: float, perturbations: tuple = (),
                         lse: torch.Tensor | None = None, num_warps: int = 4) -> None:
    """Run the block-sparse forward on tokens in block order into `out`, blending `perturbations`;
    with `lse` (B·H·seq_q float32, contiguous) also store each row's log-sum-exp."""
    batch, heads, seq_q, dim = q.shape
    s = sparsity
    weights, means, flags = blend_arguments(k, v, seq_q, slice(s.text, seq_q), perturbations)
    _local_forward[(triton.cdiv(seq_q, s.block), batch * heads)](
        q, k, v, weights, means, out, weights if lse is None else lse, s.pos_y, s.pos_x,
        s.full_count, s.full_index, s.part_count, s.part_index,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        heads, seq_q, s.seq_kv, s.text, s.full_index.shape[1], s.r2, scale,
        BLEND=bool(perturbations), STORE_LSE=lse is not None,
        BLOCK=s.block, HEAD_DIM=dim, num_warps=num_warps, **flags, **launch_options(q),
    )
