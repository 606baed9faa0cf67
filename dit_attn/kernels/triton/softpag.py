"""Triton flash-attention forward with the SoftPAG blend in its epilogue.

out[b, h] = (1 − u[b, h])·softmax(Q Kᵀ·scale) V + u[b, h]·T, with T = V (identity) or
mean over keys of V (uniform). Online softmax with fp32 accumulation (half-precision
inputs feed tl.dot directly on a GPU; the interpreter upcasts); a (row, head) with
u = 1 skips the full QKᵀ/softmax loop. scope="image": image queries blend toward a map whose
image→image logits are replaced (own key, or the mean key with multiplicity N_img), from
a second online softmax over the text keys only; text queries keep plain attention.
Inference only: with autograd the dispatcher runs `backward.py` (flash attention with dq, dk,
dv; joint-scope blends in torch). Several perturbations in one inference launch are not
implemented yet; `why_not` says so and dispatch falls back.

Triton has no CPU backend: on a CPU machine these kernels run only under
TRITON_INTERPRET=1 (set before triton is imported), which the tests use.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from . import tuning

IDENTITY, UNIFORM = 0, 1


@triton.jit
def _attend(q, k_ptr, v_ptr, stride_ks, stride_vs, lo, hi, scale,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
            UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax of q against keys [lo, hi): running max, normaliser, unnormalised output."""
    dims = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        k = tl.load(k_ptr + cols[:, None] * stride_ks + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptr + cols[:, None] * stride_vs + dims[None, :], mask=col_ok[:, None], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong; fp32 inputs stay fp32 anyway
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        scores = tl.where(col_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        correction = tl.exp(m - m_new)
        l = l * correction + tl.sum(p, axis=1)
        # half inputs: tensor cores with fp32 accumulation; fp32 inputs: exact ("ieee"), not tf32
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    return m, l, acc


@triton.jit
def _merge(m1, l1, a1, m2, l2, a2):
    """Combine two online-softmax partials (either may be empty: m = -inf, l = 0)."""
    m = tl.maximum(m1, m2)
    safe = tl.where(m == float("-inf"), 0.0, m)
    c1 = tl.exp(m1 - safe)
    c2 = tl.exp(m2 - safe)
    return m, l1 * c1 + l2 * c2, a1 * c1[:, None] + a2 * c2[:, None]


@triton.jit
def _softpag_forward(
    Q, K, V, U, MeanK, MeanV, Out,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    heads, seq_len, image_start, image_stop, scale,
    TARGET: tl.constexpr, IMAGE_SCOPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
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
    q = tl.load(q_ptr + rows[:, None] * stride_qs + dims[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    own_v = tl.load(v_ptr + rows[:, None] * stride_vs + dims[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    mean_v = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if TARGET == 1:
        mean_v += tl.load(MeanV + batch_head * HEAD_DIM + dims).to(tl.float32)[None, :]

    # plain attention is skipped where the blend keeps none of it (every row of the block replaced)
    if IMAGE_SCOPE:
        u = tl.load(U + batch_head).to(tl.float32)
        if TARGET == 0:
            value = own_v
        else:
            value = mean_v
        block_is_image = (block * BLOCK_M >= image_start) & ((block + 1) * BLOCK_M <= image_stop)
        replaced = (u == 1.0) & block_is_image
    else:  # joint scope: U holds (kept, identity, uniform) weights that fold one or several blends
        keep = tl.load(U + batch_head * 3).to(tl.float32)
        value = tl.load(U + batch_head * 3 + 1) * own_v + tl.load(U + batch_head * 3 + 2) * mean_v
        replaced = keep == 0.0
    attention = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if not replaced:
        m, l, acc = _attend(q, k_ptr, v_ptr, stride_ks, stride_vs, 0, seq_len, scale,
                            BLOCK_M, BLOCK_N, HEAD_DIM, UPCAST, PRECISION)
        attention = acc / tl.where(l > 0, l, 1.0)[:, None]

    if IMAGE_SCOPE:
        # T for image queries: softmax over the text keys plus one image logit (own key, or
        # the mean key with multiplicity N_img for uniform); text queries keep their map
        m1, l1, a1 = _attend(q, k_ptr, v_ptr, stride_ks, stride_vs, 0, image_start, scale,
                             BLOCK_M, BLOCK_N, HEAD_DIM, UPCAST, PRECISION)
        m2, l2, a2 = _attend(q, k_ptr, v_ptr, stride_ks, stride_vs, image_stop, seq_len, scale,
                             BLOCK_M, BLOCK_N, HEAD_DIM, UPCAST, PRECISION)
        m_t, l_t, acc_t = _merge(m1, l1, a1, m2, l2, a2)
        text_lse = m_t + tl.log(l_t)
        text_out = acc_t / tl.where(l_t > 0, l_t, 1.0)[:, None]
        qf = q.to(tl.float32)
        if TARGET == 0:
            own_k = tl.load(k_ptr + rows[:, None] * stride_ks + dims[None, :], mask=row_ok[:, None], other=0.0)
            image_logit = tl.sum(qf * own_k.to(tl.float32), axis=1) * scale
        else:
            mean_k = tl.load(MeanK + batch_head * HEAD_DIM + dims).to(tl.float32)
            image_logit = tl.sum(qf * mean_k[None, :], axis=1) * scale + tl.log((image_stop - image_start) * 1.0)
        weight = 1.0 / (1.0 + tl.exp(text_lse - image_logit))
        target = weight[:, None] * value + (1.0 - weight[:, None]) * text_out
        is_image = (rows >= image_start) & (rows < image_stop)
        out = tl.where(is_image[:, None], (1.0 - u) * attention + u * target, attention)
    else:
        out = keep * attention + value
    o_ptr = Out + b * stride_ob + h * stride_oh
    tl.store(o_ptr + rows[:, None] * stride_os + dims[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None])


def launch_options(q: torch.Tensor) -> dict:
    """UPCAST: fp32 inside tl.dot (fp32 inputs; and the interpreter, whose bf16 dot is wrong);
    PRECISION: exact fp32 products for fp32 inputs, tensor cores for half inputs."""
    return dict(UPCAST=q.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1",
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def joint_weights(perturbations, batch: int, heads: int, device) -> torch.Tensor:
    """(B, H, 3) float32 (kept attention, identity, uniform) weights of joint-scope blends applied
    in order: A ← (1 − u)·A + u·T for each, folded into out = kept·A + w_id·V + w_uni·mean V."""
    weights = torch.zeros(batch, heads, 3, device=device)
    weights[..., 0] = 1.0
    for p in perturbations:
        u = p.u.to(device=device, dtype=torch.float32)
        weights = weights * (1 - u)[..., None]
        weights[..., 1 if p.target == "identity" else 2] += u
    return weights


def softpag_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, perturbations,
                      image_tokens: tuple[int, int] | None = None, scale: float | None = None,
                      config: dict | None = None) -> torch.Tensor:
    """(B, H, S, D) inputs (last dim contiguous) → (B, H, S, D) with the SoftPAG blends of
    `perturbations`: any number of joint-scope ones (folded into one epilogue), or one image-scope one.

    image_tokens: (start, stop) of the image tokens for scope="image" (None: all tokens).
    config: block_m, block_n, num_warps (default: tuned on a GPU, see `tuning`).
    """
    batch, heads, seq_len, dim = q.shape
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty_like(q)
    image_start, image_stop = image_tokens if image_tokens is not None else (0, seq_len)
    image_scope = any(p.scope == "image" for p in perturbations)
    if image_scope and len(perturbations) != 1:
        raise ValueError("the Triton kernel takes one image-scope perturbation per call")
    if image_scope:
        strengths = perturbations[0].u.to(device=q.device, dtype=torch.float32).contiguous()
    else:
        strengths = joint_weights(perturbations, batch, heads, q.device).contiguous()
    uniform = any(p.target == "uniform" for p in perturbations)
    mean_k = mean_v = strengths  # placeholders: the kernel reads the means only for the uniform target
    if uniform:
        keys = slice(image_start, image_stop) if image_scope else slice(0, seq_len)
        mean_v = v[:, :, keys].mean(dim=2, dtype=torch.float32).contiguous()  # (B, H, D), O(S·D), no fp32 copy
        if image_scope:  # the mean key's logit stands for the image→image block
            mean_k = k[:, :, keys].mean(dim=2, dtype=torch.float32).contiguous()
    scale = 1.0 / math.sqrt(dim) if scale is None else scale

    def launch(c: dict) -> None:
        _softpag_forward[(triton.cdiv(seq_len, c["block_m"]), batch * heads)](
            q, k, v, strengths, mean_k, mean_v, out,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            heads, seq_len, image_start, image_stop, scale,
            TARGET=UNIFORM if uniform else IDENTITY, IMAGE_SCOPE=image_scope,
            BLOCK_M=c["block_m"], BLOCK_N=c["block_n"], HEAD_DIM=dim, num_warps=c["num_warps"], **launch_options(q),
        )

    launch(config or tuning.choose("softpag", q, launch))
    return out
