"""Trainable Triton attention: block-sparse flash attention with a backward pass (dq, dk, dv).

Dense attention is the block-sparse pattern where every (query block, key block) pair is
full; CLEAR's local window is the pattern of `kernels.blocks` (partial pairs apply the
exact circle). The forward is the local-window kernel storing each row's log-sum-exp;
the backward recomputes the probabilities block by block (FlashAttention-2):
  P = exp(S − lse),  dV = Pᵀ dO,  dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O) + d lse),  dQ = dS K·scale,  dK = dSᵀ Q·scale,
with one program per query block for dQ and one per key block for dK, dV (no atomics), each
kernel at the block size and warps `tuning` picks for it (block lists rebuilt for that size).
The log-sum-exp is an output with a gradient (∂lse/∂S = P, hence the + d lse term).
SoftPAG blends (1 − u)·A + u·T stay outside, in torch, so autograd differentiates them. An
image-scope target T mixes each image query's attention over the text keys alone (this
kernel again, dense, with its differentiable lse) with one image key (`sdpa.image_key`).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..plan import AttentionPlan
from ..sdpa import image_key, take_text, text_segments, toward_image_key
from . import tuning
from .local import launch_local_forward, window_rule, window_tokens
from .softpag import launch_options
from .sparsity import Sparsity, dense_sparsity


@triton.jit
def _probabilities(q, k, rows, cols, row_ok, col_ok, qy, qx, lse, PosY, PosX, text, seq_q, r2, scale,
                   MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """The forward's attention probabilities of a (query block, key block) pair, from the saved lse."""
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    allowed = row_ok[:, None] & col_ok[None, :]
    if MASKED:
        allowed = allowed & window_rule(rows, cols, qy, qx, PosY, PosX, text, seq_q, r2)
    return tl.where(allowed, tl.exp(scores - lse[:, None]), 0.0)


@triton.jit
def _load_rows(ptr, stride, rows, row_ok, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    x = tl.load(ptr + rows[:, None] * stride + dims[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _dq_visit(dq, q, do, lse, delta, k_ptr, v_ptr, stride_ks, stride_vs, kv_block, rows, row_ok, qy, qx, PosY, PosX,
              text, seq_q, seq_kv, r2, scale, MASKED: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    cols = kv_block * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < seq_kv
    k = _load_rows(k_ptr, stride_ks, cols, col_ok, HEAD_DIM, UPCAST)
    v = _load_rows(v_ptr, stride_vs, cols, col_ok, HEAD_DIM, UPCAST)
    p = _probabilities(q, k, rows, cols, row_ok, col_ok, qy, qx, lse, PosY, PosX, text, seq_q, r2, scale,
                       MASKED, PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _flash_dq(
    Q, K, V, dO, Lse, Delta, dQ, PosY, PosX, FullCount, FullIndex, PartCount, PartIndex,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os, heads, seq_q, seq_kv, text, n_kv_blocks, r2, scale,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One query block: dQ over the key blocks it visits. dO, dQ share the (contiguous) strides stride_o*."""
    block = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = batch_head // heads
    h = batch_head % heads
    rows = block * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < seq_q
    k_ptr = K + b * stride_kb + h * stride_kh
    v_ptr = V + b * stride_vb + h * stride_vh
    q = _load_rows(Q + b * stride_qb + h * stride_qh, stride_qs, rows, row_ok, HEAD_DIM, UPCAST)
    do = _load_rows(dO + b * stride_ob + h * stride_oh, stride_os, rows, row_ok, HEAD_DIM, UPCAST)
    lse = tl.load(Lse + batch_head * seq_q + rows, mask=row_ok, other=0.0)
    delta = tl.load(Delta + batch_head * seq_q + rows, mask=row_ok, other=0.0)
    qy = tl.load(PosY + rows, mask=row_ok, other=0)
    qx = tl.load(PosX + rows, mask=row_ok, other=0)
    dq = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    for j in range(0, tl.load(FullCount + block)):
        kv_block = tl.load(FullIndex + block * n_kv_blocks + j)
        dq = _dq_visit(dq, q, do, lse, delta, k_ptr, v_ptr, stride_ks, stride_vs, kv_block, rows, row_ok, qy, qx,
                       PosY, PosX, text, seq_q, seq_kv, r2, scale, False, BLOCK, HEAD_DIM, UPCAST, PRECISION)
    for j in range(0, tl.load(PartCount + block)):
        kv_block = tl.load(PartIndex + block * n_kv_blocks + j)
        dq = _dq_visit(dq, q, do, lse, delta, k_ptr, v_ptr, stride_ks, stride_vs, kv_block, rows, row_ok, qy, qx,
                       PosY, PosX, text, seq_q, seq_kv, r2, scale, True, BLOCK, HEAD_DIM, UPCAST, PRECISION)
    dims = tl.arange(0, HEAD_DIM)
    out = dQ + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + dims[None, :]
    tl.store(out, (dq * scale).to(dQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_visit(dk, dv, k, v, q_ptr, do_ptr, stride_qs, stride_os, Lse, Delta, batch_head, q_block, cols, col_ok,
                PosY, PosX, text, seq_q, r2, scale, MASKED: tl.constexpr, BLOCK: tl.constexpr,
                HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    rows = q_block * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < seq_q
    q = _load_rows(q_ptr, stride_qs, rows, row_ok, HEAD_DIM, UPCAST)
    do = _load_rows(do_ptr, stride_os, rows, row_ok, HEAD_DIM, UPCAST)
    lse = tl.load(Lse + batch_head * seq_q + rows, mask=row_ok, other=0.0)
    delta = tl.load(Delta + batch_head * seq_q + rows, mask=row_ok, other=0.0)
    qy = tl.load(PosY + rows, mask=row_ok, other=0)
    qx = tl.load(PosX + rows, mask=row_ok, other=0)
    p = _probabilities(q, k, rows, cols, row_ok, col_ok, qy, qx, lse, PosY, PosX, text, seq_q, r2, scale,
                       MASKED, PRECISION)
    dv = dv + tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dk = dk + tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _flash_dkdv(
    Q, K, V, dO, Lse, Delta, dK, dV, PosY, PosX, FullCountT, FullIndexT, PartCountT, PartIndexT,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os, stride_gb, stride_gh, stride_gs, heads, seq_q, seq_kv, text, n_q_blocks, r2, scale,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One key block: dK, dV over the query blocks that visit it (dK, dV share the strides stride_g*)."""
    kv_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = batch_head // heads
    h = batch_head % heads
    cols = kv_block * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < seq_kv
    k = _load_rows(K + b * stride_kb + h * stride_kh, stride_ks, cols, col_ok, HEAD_DIM, UPCAST)
    v = _load_rows(V + b * stride_vb + h * stride_vh, stride_vs, cols, col_ok, HEAD_DIM, UPCAST)
    q_ptr = Q + b * stride_qb + h * stride_qh
    do_ptr = dO + b * stride_ob + h * stride_oh
    dk = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    for i in range(0, tl.load(FullCountT + kv_block)):
        q_block = tl.load(FullIndexT + kv_block * n_q_blocks + i)
        dk, dv = _dkdv_visit(dk, dv, k, v, q_ptr, do_ptr, stride_qs, stride_os, Lse, Delta, batch_head, q_block, cols,
                             col_ok, PosY, PosX, text, seq_q, r2, scale, False, BLOCK, HEAD_DIM, UPCAST, PRECISION)
    for i in range(0, tl.load(PartCountT + kv_block)):
        q_block = tl.load(PartIndexT + kv_block * n_q_blocks + i)
        dk, dv = _dkdv_visit(dk, dv, k, v, q_ptr, do_ptr, stride_qs, stride_os, Lse, Delta, batch_head, q_block, cols,
                             col_ok, PosY, PosX, text, seq_q, r2, scale, True, BLOCK, HEAD_DIM, UPCAST, PRECISION)
    dims = tl.arange(0, HEAD_DIM)
    offsets = b * stride_gb + h * stride_gh + cols[:, None] * stride_gs + dims[None, :]
    tl.store(dK + offsets, (dk * scale).to(dK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dV + offsets, dv.to(dV.dtype.element_ty), mask=col_ok[:, None])


class BlockSparseAttention(torch.autograd.Function):
    """softmax(Q Kᵀ·scale) V over a block-sparse pattern and each row's log-sum-exp, both
    differentiable: (B, H, seq_q, D) queries, (B, H, seq_kv, D) keys/values → (B, H, seq_q, D)
    and (B, H, seq_q) float32."""

    @staticmethod
    def forward(ctx, q, k, v, sparsity: Sparsity, scale: float):
        q, k, v = (x.contiguous() for x in (q, k, v))
        batch, heads, seq_q, dim = q.shape
        out = torch.empty_like(q)
        lse = torch.empty(batch, heads, seq_q, device=q.device, dtype=torch.float32)
        launch_local_forward(q, k, v, out, sparsity, scale, lse=lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.sparsity, ctx.scale = sparsity, scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        delta = ((grad_out.float() * out.float()).sum(-1) - grad_lse).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        inputs = (q, k, v, grad_out, lse, delta, ctx.sparsity, ctx.scale)
        for kernel, launch in (("flash_dq", functools.partial(_launch_dq, *inputs, dq)),
                               ("flash_dkdv", functools.partial(_launch_dkdv, *inputs, dk, dv))):
            launch(tuning.choose(kernel, q, launch))
        return dq, dk, dv, None, None


# Each backward kernel picks its own block size, independent of the forward's: a layout's token
# order does not depend on the block size, so `with_block` gives exact block lists for the same
# tokens (cached per layout), and a tuned block can never disagree with the lists it walks.
def _block_options(q: torch.Tensor, sparsity: Sparsity, config: dict) -> dict:
    return dict(BLOCK=sparsity.block, HEAD_DIM=q.shape[-1], num_warps=config["num_warps"], **launch_options(q))


def _launch_dq(q, k, v, grad_out, lse, delta, layout: Sparsity, scale: float, dq, config: dict) -> None:
    s = layout.with_block(config["block"])
    batch, heads, seq_q, _ = q.shape
    _flash_dq[(triton.cdiv(seq_q, s.block), batch * heads)](
        q, k, v, grad_out, lse, delta, dq, s.pos_y, s.pos_x, s.full_count, s.full_index, s.part_count, s.part_index,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3],
        heads, seq_q, s.seq_kv, s.text, s.full_index.shape[1], s.r2, scale, **_block_options(q, s, config),
    )


def _launch_dkdv(q, k, v, grad_out, lse, delta, layout: Sparsity, scale: float, dk, dv, config: dict) -> None:
    s = layout.with_block(config["block"])
    batch, heads, seq_q, _ = q.shape
    _flash_dkdv[(triton.cdiv(s.seq_kv, s.block), batch * heads)](
        q, k, v, grad_out, lse, delta, dk, dv, s.pos_y, s.pos_x,
        s.full_count_t, s.full_index_t, s.part_count_t, s.part_index_t,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *dk.stride()[:3],
        heads, seq_q, s.seq_kv, s.text, s.full_index_t.shape[1], s.r2, scale, **_block_options(q, s, config),
    )


def windowed_or_dense(q, k, v, plan: AttentionPlan, image: slice, scale: float, block: int) -> torch.Tensor:
    """The plan's attention before any blend: local window, or dense without one."""
    if plan.window is None:
        return BlockSparseAttention.apply(q, k, v, dense_sparsity(q.shape[-2], block, q.device), scale)[0]
    window = plan.window
    window.check_tokens(image)
    tokens, sparsity = window_tokens(q, k, v, window, image, block)
    return tokens.restore(BlockSparseAttention.apply(tokens.q, tokens.k, tokens.v, sparsity, scale)[0])


def text_attention(q_image, k, v, image: slice, scale: float, block: int):
    """Each image query's attention over the text keys alone and its log-normaliser,
    ((B, H, N_img, D), (B, H, N_img)), both differentiable; None without text (or image) tokens."""
    segments = text_segments(k.shape[-2], image)
    if not segments or image.stop == image.start:
        return None
    k_text, v_text = (take_text(x, segments) for x in (k, v))
    sparsity = dense_sparsity(q_image.shape[-2], block, q_image.device, k_text.shape[-2])
    return BlockSparseAttention.apply(q_image, k_text, v_text, sparsity, scale)


def with_image_target(out, text, q, k, v, target: str, image: slice, scale: float) -> torch.Tensor:
    """`out` with its image-query rows replaced by the image-scope target T·V (fp32 math);
    text queries keep their output, as in `reference.target_output`."""
    n_img = image.stop - image.start
    if n_img == 0:
        return out
    q_img, k_img, v_img = (x[:, :, image].float() for x in (q, k, v))
    means = tuple(x.mean(dim=2, keepdim=True) for x in (k_img, v_img)) if target == "uniform" else None
    image_logit, image_value = image_key(q_img, k_img, v_img, target, means, n_img, scale)
    text_out, text_lse = (None, None) if text is None else (text[0].float(), text[1])
    mixed = toward_image_key(text_out, text_lse, image_logit, image_value).to(out.dtype)
    return torch.cat([out[:, :, : image.start], mixed, out[:, :, image.stop :]], dim=2)


def trainable_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan,
                        scale: float | None = None, block: int | None = None) -> torch.Tensor:
    """(B, H, S, D) → (B, H, S, D) with autograd: dense or local-window attention on the Triton
    kernels, then the plan's SoftPAG blends in order (in torch, any scope and target, as in
    `reference_attention`). block: the forward's, the fixed fallback of the local kernel unless
    given (the forward is not timed; the backward kernels tune their own, see `tuning`)."""
    block = block or tuning.fallback("local", q)["block"]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    image = plan.image_slice(q.shape[-2])
    out = windowed_or_dense(q, k, v, plan, image, scale, block)
    text = None  # the image queries' text-key attention, shared by the image-scope targets
    for p in plan.perturbations:
        u = p.u.to(device=out.device, dtype=out.dtype)[:, :, None, None]
        if p.scope == "joint":
            target = v if p.target == "identity" else v.mean(dim=2, keepdim=True)
        else:
            if text is None:
                text = text_attention(q[:, :, image], k, v, image, scale, block)
            target = with_image_target(out, text, q, k, v, p.target, image, scale)
        out = (1 - u) * out + u * target
    return out
