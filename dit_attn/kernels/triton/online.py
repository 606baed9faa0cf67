"""What every forward kernel does per visited key block: load it, score it, fold it into the online softmax."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(scores, allowed, v, acc, m, l, PRECISION: tl.constexpr):
    """Fold one key block into the running (acc, row max m, row sum l): scores of disallowed pairs get no
    weight; a row with no allowed key so far keeps m = -inf and contributes nothing."""
    scores = tl.where(allowed, scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(scores - safe[:, None])
    correction = tl.exp(m - safe)
    l = l * correction + tl.sum(p, axis=1)
    acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l


@triton.jit
def key_block(q, k_ptr, v_ptr, stride_ks, stride_vs, start, stop, scale, BLOCK_N: tl.constexpr,
              HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Keys [start, start + BLOCK_N) (those below `stop` loaded, the rest zero): (cols, col_ok, scaled q·k scores, v)."""
    dims = tl.arange(0, HEAD_DIM)
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < stop
    k = tl.load(k_ptr + cols[:, None] * stride_ks + dims[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(v_ptr + cols[:, None] * stride_vs + dims[None, :], mask=col_ok[:, None], other=0.0)
    if UPCAST:  # the interpreter's bf16 dot is wrong; fp32 inputs stay fp32 anyway
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    # half inputs: tensor cores with fp32 accumulation; fp32 inputs: exact ("ieee"), not tf32
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    return cols, col_ok, scores, v
