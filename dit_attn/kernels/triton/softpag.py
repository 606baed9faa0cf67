"""Triton flash-attention forward with the SoftPAG blends in its epilogue.

Perturbations applied in order, A ← (1 − u)·A + u·T, fold into per-(row, head) weights of
five maps (`blend_weights`), one set for text queries and one for image queries:
  out = kept·A + w₁·V + w₂·mean V + w₃·T_id + w₄·T_uni,
where A is softmax(Q Kᵀ·scale) V, V and mean V (over all keys) are the joint-scope
identity and uniform targets, and T_id, T_uni the image-scope ones. Image scope edits only
the image→image logits of image queries (`reference.target_output`), so an image query's
target map is a softmax over the text keys plus one image logit e with value w:
  identity: e = q·k_own·scale, w = v_own (the off-diagonal image logits become −∞);
  uniform:  e = q·mean(K_img)·scale + log N_img, w = mean(V_img) (N_img equal logits);
  T = (1 − a)·softmax(q K_txtᵀ·scale) V_txt + a·w,  a = sigmoid(e − lse_txt).
With image-scope perturbations the kernel keeps the text keys' online softmax (m, l, acc)
apart from the image keys' and merges the two for A, so the text partial costs no extra
pass; text queries have w₃ = w₄ = 0. Online softmax with fp32 accumulation (half-precision
inputs feed tl.dot directly on a GPU; the interpreter upcasts); a query block where no row
keeps A (u = 1) skips the image keys, and the text keys too unless an image target needs them.
With autograd the dispatcher runs `backward.py` instead (same math, blends in torch).

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
from .online import key_block, online_softmax_step

# columns of `blend_weights` (kept attention, then the four targets) and rows of `target_means`;
# constexpr so the kernels can read them (int() on the host)
KEEP, JOINT_IDENTITY, JOINT_UNIFORM, IMAGE_IDENTITY, IMAGE_UNIFORM = (tl.constexpr(i) for i in range(5))
COLUMNS = tl.constexpr(5)
MEAN_V, MEAN_V_IMAGE, MEAN_K_IMAGE = (tl.constexpr(i) for i in range(3))
TARGET_COLUMNS = {("joint", "identity"): int(JOINT_IDENTITY), ("joint", "uniform"): int(JOINT_UNIFORM),
                  ("image", "identity"): int(IMAGE_IDENTITY), ("image", "uniform"): int(IMAGE_UNIFORM)}


@triton.jit
def attend_range(q, k_ptr, v_ptr, stride_ks, stride_vs, lo, hi, scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax of q against keys [lo, hi): running max, normaliser, unnormalised output."""
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols, col_ok, scores, v = key_block(q, k_ptr, v_ptr, stride_ks, stride_vs, start, hi, scale, BLOCK_N, HEAD_DIM,
                                            UPCAST, PRECISION)
        acc, m, l = online_softmax_step(scores, col_ok[None, :], v, acc, m, l, PRECISION)
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
def _weight(W, batch_head, is_image, column):
    """(rows,) float32: the blend weight `column` of each query row (text or image set)."""
    return tl.load(W + batch_head * 2 * COLUMNS + tl.where(is_image, COLUMNS, 0) + column)


@triton.jit
def block_needs(W, batch_head, lo, hi, image_start, image_stop):
    """For query rows [lo, hi): whether any row keeps plain attention, and whether any image
    row blends toward an image-scope target (which needs the text keys' partial)."""
    has_image = (lo < image_stop) & (hi > image_start)
    has_text = (lo < image_start) | (hi > image_stop)
    text_weights = W + batch_head * 2 * COLUMNS
    image_weights = text_weights + COLUMNS
    keeps_text = tl.load(text_weights + KEEP) != 0.0
    keeps_image = tl.load(image_weights + KEEP) != 0.0
    image_target = (tl.load(image_weights + IMAGE_IDENTITY) != 0.0) | (tl.load(image_weights + IMAGE_UNIFORM) != 0.0)
    return (has_text & keeps_text) | (has_image & keeps_image), has_image & image_target


@triton.jit
def _toward_image_key(text_lse, text_out, image_logit, value):
    """Softmax over the text keys plus one image key (logit, value), from the text partial."""
    a = 1.0 / (1.0 + tl.exp(text_lse - image_logit))
    return a[:, None] * value + (1.0 - a[:, None]) * text_out


@triton.jit
def blend_epilogue(attention, q, rows, row_ok, is_image, k_ptr, v_ptr, stride_ks, stride_vs, W, Means, batch_head,
                   text_m, text_l, text_acc, n_image, scale,
                   UNIFORM: tl.constexpr, IMAGE_SCOPE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """out = kept·A + w₁·V + w₂·mean V + w₃·T_id + w₄·T_uni (module docstring), per row."""
    dims = tl.arange(0, HEAD_DIM)
    own_v = tl.load(v_ptr + rows[:, None] * stride_vs + dims[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    out = _weight(W, batch_head, is_image, KEEP)[:, None] * attention
    out += _weight(W, batch_head, is_image, JOINT_IDENTITY)[:, None] * own_v
    means = Means + batch_head * 3 * HEAD_DIM
    if UNIFORM:
        mean_v = tl.load(means + MEAN_V * HEAD_DIM + dims)
        out += _weight(W, batch_head, is_image, JOINT_UNIFORM)[:, None] * mean_v[None, :]
    if IMAGE_SCOPE:
        # −inf without text keys: the target is then the image key's value
        text_lse = tl.where(text_l > 0, text_m + tl.log(tl.where(text_l > 0, text_l, 1.0)), float("-inf"))
        text_out = text_acc / tl.where(text_l > 0, text_l, 1.0)[:, None]
        qf = q.to(tl.float32)
        own_k = tl.load(k_ptr + rows[:, None] * stride_ks + dims[None, :], mask=row_ok[:, None], other=0.0)
        own_logit = tl.sum(qf * own_k.to(tl.float32), axis=1) * scale
        out += _weight(W, batch_head, is_image, IMAGE_IDENTITY)[:, None] * \
            _toward_image_key(text_lse, text_out, own_logit, own_v)
        if UNIFORM:
            mean_v_image = tl.load(means + MEAN_V_IMAGE * HEAD_DIM + dims)[None, :] + tl.zeros_like(own_v)
            mean_k_image = tl.load(means + MEAN_K_IMAGE * HEAD_DIM + dims)
            mean_logit = tl.sum(qf * mean_k_image[None, :], axis=1) * scale + tl.log(n_image * 1.0)
            out += _weight(W, batch_head, is_image, IMAGE_UNIFORM)[:, None] * \
                _toward_image_key(text_lse, text_out, mean_logit, mean_v_image)
    return out


@triton.jit
def _softpag_forward(
    Q, K, V, W, Means, Out,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    heads, seq_len, image_start, image_stop, scale,
    UNIFORM: tl.constexpr, IMAGE_SCOPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    needs_attention, needs_text = block_needs(W, batch_head, block * BLOCK_M, block * BLOCK_M + BLOCK_M,
                                              image_start, image_stop)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # empty partials: nothing skipped is ever read
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    text_m, text_l, text_acc = m, l, acc
    if IMAGE_SCOPE:  # the text keys' partial apart, then the image keys merged in for A
        if needs_attention | needs_text:
            m1, l1, a1 = attend_range(q, k_ptr, v_ptr, stride_ks, stride_vs, 0, image_start, scale,
                                      BLOCK_M, BLOCK_N, HEAD_DIM, UPCAST, PRECISION)
            m2, l2, a2 = attend_range(q, k_ptr, v_ptr, stride_ks, stride_vs, image_stop, seq_len, scale,
                                      BLOCK_M, BLOCK_N, HEAD_DIM, UPCAST, PRECISION)
            text_m, text_l, text_acc = _merge(m1, l1, a1, m2, l2, a2)
        if needs_attention:
            m3, l3, a3 = attend_range(q, k_ptr, v_ptr, stride_ks, stride_vs, image_start, image_stop, scale,
                                      BLOCK_M, BLOCK_N, HEAD_DIM, UPCAST, PRECISION)
            m, l, acc = _merge(text_m, text_l, text_acc, m3, l3, a3)
    elif needs_attention:
        m, l, acc = attend_range(q, k_ptr, v_ptr, stride_ks, stride_vs, 0, seq_len, scale,
                                 BLOCK_M, BLOCK_N, HEAD_DIM, UPCAST, PRECISION)
    attention = acc / tl.where(l > 0, l, 1.0)[:, None]
    is_image = (rows >= image_start) & (rows < image_stop)
    out = blend_epilogue(attention, q, rows, row_ok, is_image, k_ptr, v_ptr, stride_ks, stride_vs, W, Means,
                         batch_head, text_m, text_l, text_acc, image_stop - image_start, scale,
                         UNIFORM, IMAGE_SCOPE, HEAD_DIM)
    o_ptr = Out + b * stride_ob + h * stride_oh
    tl.store(o_ptr + rows[:, None] * stride_os + dims[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None])


def launch_options(q: torch.Tensor) -> dict:
    """UPCAST: fp32 inside tl.dot (fp32 inputs; and the interpreter, whose bf16 dot is wrong);
    PRECISION: exact fp32 products for fp32 inputs, tensor cores for half inputs."""
    return dict(UPCAST=q.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1",
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def blend_weights(perturbations, batch: int, heads: int, device) -> torch.Tensor:
    """(B, H, 2, 5) float32: for text queries ([..., 0, :]) and image queries ([..., 1, :]) the
    weights (kept, V, mean V, T_id, T_uni) that fold the blends A ← (1 − u)·A + u·T applied in
    order; an image-scope blend leaves text queries untouched."""
    weights = torch.zeros(batch, heads, 2, int(COLUMNS), device=device)
    weights[..., int(KEEP)] = 1.0
    for p in perturbations:
        u = p.u.to(device=device, dtype=torch.float32)[..., None]
        kinds = slice(0, 2) if p.scope == "joint" else slice(1, 2)  # (text, image) queries or image only
        weights[:, :, kinds] *= (1 - u)[..., None]
        weights[:, :, kinds, TARGET_COLUMNS[(p.scope, p.target)]] += u
    return weights


def target_means(k: torch.Tensor, v: torch.Tensor, seq_q: int, image: slice, perturbations) -> torch.Tensor | None:
    """(B, H, 3, D) float32 (mean V over the first seq_q keys, mean V and mean K over the image
    keys; zero without image keys) for uniform targets, O(S·D) with no fp32 copy; None when no
    perturbation is uniform."""
    if not any(p.target == "uniform" for p in perturbations):
        return None
    means = (v[:, :, :seq_q], v[:, :, image], k[:, :, image])
    return torch.stack([x.sum(dim=2, dtype=torch.float32) / max(x.shape[2], 1) for x in means], dim=2).contiguous()


def blend_arguments(k, v, seq_q: int, image: slice, perturbations) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The weights and means `blend_epilogue` reads, and its constexpr flags."""
    weights = blend_weights(perturbations, k.shape[0], k.shape[1], k.device).contiguous()
    means = target_means(k, v, seq_q, image, perturbations)
    flags = dict(UNIFORM=means is not None, IMAGE_SCOPE=any(p.scope == "image" for p in perturbations))
    return weights, weights if means is None else means, flags  # the means are unread without a uniform target


def softpag_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, perturbations,
                      image_tokens: tuple[int, int] | None = None, scale: float | None = None,
                      config: dict | None = None) -> torch.Tensor:
    """(B, H, S, D) inputs (last dim contiguous) → (B, H, S, D) with the SoftPAG blends of
    `perturbations` (any number, joint and image scope, any targets) folded into one epilogue.

    image_tokens: (start, stop) of the image tokens for scope="image" (None: all tokens).
    config: block_m, block_n, num_warps (default: tuned on a GPU, see `tuning`).
    """
    batch, heads, seq_len, dim = q.shape
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty_like(q)
    image_start, image_stop = image_tokens if image_tokens is not None else (0, seq_len)
    weights, means, flags = blend_arguments(k, v, seq_len, slice(image_start, image_stop), perturbations)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale

    def launch(c: dict) -> None:
        _softpag_forward[(triton.cdiv(seq_len, c["block_m"]), batch * heads)](
            q, k, v, weights, means, out,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            heads, seq_len, image_start, image_stop, scale,
            BLOCK_M=c["block_m"], BLOCK_N=c["block_n"], HEAD_DIM=dim, num_warps=c["num_warps"],
            **flags, **launch_options(q),
        )

    launch(config or tuning.choose("softpag", q, launch))
    return out
