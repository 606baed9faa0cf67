"""Triton flash-attention forward with the SoftPAG blend in its epilogue (joint scope).

out[b, h] = (1 − u[b, h])·softmax(Q Kᵀ·scale) V + u[b, h]·T, with T = V (identity) or
mean over keys of V (uniform). Online softmax with fp32 accumulation (half-precision
inputs feed tl.dot directly on a GPU; the interpreter upcasts); a (row, head) with
u = 1 and the identity target skips the QKᵀ/softmax loop entirely. Forward only: no
autograd (the `sdpa` backend serves training). Image scope and local windows are not
implemented here yet; `why_not` says so and dispatch falls back.

Triton has no CPU backend: on a CPU machine these kernels run only under
TRITON_INTERPRET=1 (set before triton is imported), which the tests use.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

IDENTITY, UNIFORM = 0, 1


@triton.jit
def _softpag_forward(
    Q, K, V, U, Out,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    heads, seq_len, scale,
    TARGET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = batch_head // heads
    h = batch_head % heads
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq_len
    q_ptr = Q + b * stride_qb + h * stride_qh
    k_ptr = K + b * stride_kb + h * stride_kh
    v_ptr = V + b * stride_vb + h * stride_vh
    u = tl.load(U + batch_head).to(tl.float32)

    q = tl.load(q_ptr + rows[:, None] * stride_qs + dims[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:  # the interpreter's bf16 dot is wrong; fp32 inputs stay fp32 anyway
        q = q.to(tl.float32)
    own_v = tl.load(v_ptr + rows[:, None] * stride_vs + dims[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    v_sum = tl.zeros([HEAD_DIM], tl.float32)
    need_attention = (u < 1.0) | (TARGET == 1)
    if need_attention:
        for start in range(0, seq_len, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < seq_len
            k = tl.load(k_ptr + cols[:, None] * stride_ks + dims[None, :], mask=col_ok[:, None], other=0.0)
            v = tl.load(v_ptr + cols[:, None] * stride_vs + dims[None, :], mask=col_ok[:, None], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            v_sum += tl.sum(v.to(tl.float32), axis=0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            scores = tl.where(col_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            p = tl.exp(scores - m_new[:, None])
            correction = tl.exp(m - m_new)
            l = l * correction + tl.sum(p, axis=1)
            # half inputs: tensor cores with fp32 accumulation; fp32 inputs: exact ("ieee"), not tf32
            acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        attention = acc / tl.where(l > 0, l, 1.0)[:, None]
    else:
        attention = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    if TARGET == 0:
        target = own_v
    else:
        target = tl.broadcast_to((v_sum / seq_len)[None, :], [BLOCK_M, HEAD_DIM])
    out = (1.0 - u) * attention + u * target
    o_ptr = Out + b * stride_ob + h * stride_oh
    tl.store(o_ptr + rows[:, None] * stride_os + dims[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None])


def softpag_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor, target: str,
                      scale: float | None = None, block_m: int = 32, block_n: int = 32) -> torch.Tensor:
    """(B, H, S, D) inputs (last dim contiguous), u (B, H) → (B, H, S, D)."""
    batch, heads, seq_len, dim = q.shape
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty_like(q)
    strengths = u.to(device=q.device, dtype=torch.float32).contiguous()
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    grid = (triton.cdiv(seq_len, block_m), batch * heads)
    _softpag_forward[grid](
        q, k, v, strengths, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads, seq_len, scale,
        TARGET=IDENTITY if target == "identity" else UNIFORM, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=dim,
        UPCAST=q.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1",
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
