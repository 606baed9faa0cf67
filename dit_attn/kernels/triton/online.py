"""The online-softmax update every block-sparse forward kernel makes per visited key block."""
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
